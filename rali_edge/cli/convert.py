"""`rali-edge convert`: a published RALI folder -> a rali-edge model folder (no pickled code runs)."""

from __future__ import annotations

import click


def report(out, manifest) -> None:
    """Where the model went and what it is, in two lines."""
    c = manifest.encoder
    logit_scale = manifest.source.get("logit_scale")
    scale = f", logit scale {logit_scale:.4g}" if isinstance(logit_scale, (int, float)) else ""
    click.echo(f"wrote {out} (manifest.json, weights.safetensors)")
    click.echo(
        f"{manifest.name}: CLIP ViT hidden {c.hidden_size} x {c.num_hidden_layers} layers, patch {c.patch_size}, "
        f"image {c.image_size}, E={c.projection_dim}; head P={manifest.pca_dim}, K={manifest.num_prototypes}{scale}"
    )


@click.command("convert")
@click.argument("src_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Folder to write the model to (new, empty, or a rali-edge model folder to replace).")
@click.option("--name", default=None, help="Model name in the manifest. Default: from the encoder, e.g. rali-vitl14-336.")
def convert_command(src_dir, out, name):
    """Convert a published RALI folder (ckpt.pt, pca.pkl, basis.npz, best/) into a rali-edge model.

    \b
    Reads ckpt.pt with torch.load(weights_only=True), basis.npz without pickles and pca.pkl with
    a restricted unpickler (numpy arrays and scikit-learn PCA attributes only): nothing in the
    folder can run code. ckpt.pt's tensors win over best/ and basis.npz, as in the published code.
    """
    from rali_edge.loading import convert_published
    from rali_edge.model_file import read_manifest

    path = convert_published(src_dir, out, name=name)
    report(path, read_manifest(path))
