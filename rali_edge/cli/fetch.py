"""`rali-edge fetch`: download the published RALI folder from the Hugging Face hub and convert it."""

from __future__ import annotations

import click

from rali_edge.cli.convert import report


@click.command("fetch")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Folder to write the converted model to.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Hub cache folder (default: huggingface_hub's, e.g. ~/.cache/huggingface/hub).")
@click.option("--revision", default=None, help="Branch, tag or commit of ByteDance/Q-Insight (default: main).")
@click.option("--name", default=None, help="Model name in the manifest. Default: from the encoder, e.g. rali-vitl14-336.")
def fetch_command(out, cache_dir, revision, name):
    """Download RALI (hub repository ByteDance/Q-Insight, folder RALI) and convert it.

    \b
    Needs huggingface_hub (pip install 'rali-edge[hub]'). Offline (HF_HUB_OFFLINE=1) it uses the
    local hub cache. Without the hub, download the RALI folder by hand and run `rali-edge convert`.
    """
    from rali_edge.loading import PUBLISHED_REPO, PUBLISHED_SUBFOLDER, fetch_published
    from rali_edge.model_file import read_manifest

    click.echo(f"fetching {PUBLISHED_REPO}/{PUBLISHED_SUBFOLDER} (revision {revision or 'main'})...", err=True)
    path = fetch_published(out, cache_dir=cache_dir, revision=revision, name=name)
    report(path, read_manifest(path))
