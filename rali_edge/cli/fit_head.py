"""`rali-edge fit-head`: a RALI prototype head fitted to your own labelled images."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rali_edge.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED
from rali_edge.evaluation import LABELS


@click.command(
    "fit-head",
    epilog="""\b
Examples:
  rali-edge fit-head rali-vitl14-336 my_camera.csv -o rali-mycam          # the paper's recipe
  rali-edge fit-head default train.json --root data/ -o tiny-mine --pca-dim 32 --prototypes 64 --buckets 16
  rali-edge eval rali-mycam my_camera_test.csv                              # then measure it
""",
)
@click.argument("encoder_model")
@click.argument("dataset", type=click.Path(dir_okay=False))
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Model folder to write: a new or empty folder, or a model folder with --force.")
@click.option("--force", is_flag=True, help="Overwrite the model folder OUTPUT if it holds one.")
@click.option("--root", type=click.Path(file_okay=False), help="Folder the image paths are relative to. Default: the dataset file's folder.")
@click.option("--label", type=click.Choice(LABELS), default="auto", show_default=True,
              help="Metas JSON: which label to fit (auto: gt_score_norm, the 1..5 scale, when every entry has it).")
@click.option("--pca-dim", default=512, show_default=True, type=click.IntRange(min=1), help="P: PCA dimensions (at most the embedding size).")
@click.option("--prototypes", default=250, show_default=True, type=click.IntRange(min=1), help="K: prototypes in all.")
@click.option("--buckets", default=240, show_default=True, type=click.IntRange(min=1), help="Equal-width score buckets for k-means.")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=0), help="Fine-tuning epochs (MSE).")
@click.option("--validation-folds", default=0, show_default=True, type=click.IntRange(min=0),
              help="K >= 2: choose the fine-tuning epochs (at most --epochs) by K-fold validation, the count with the "
                   "lowest MSE on the left-out images, then fit on all images. 0: the paper's fixed --epochs. "
                   "Try 5 when the head fits your images much better than new ones.")
@click.option("--lr", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Fine-tuning learning rate (Adam).")
@click.option("--temperature", default=0.07, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Softmax temperature tau.")
@click.option("--learn-temperature/--fixed-temperature", default=False, show_default=True, help="Fine-tune the temperature too.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds k-means and fine-tuning: same seed, same head.")
@click.option("--cache", type=click.Path(dir_okay=False), help="Embeddings cache (.npz). Default: OUTPUT.embeddings.npz next to OUTPUT.")
@click.option("--no-cache", is_flag=True, help="Do not read or write an embeddings cache.")
@click.option("--name", help="Model name in the manifest. Default: <encoder model name>+fit-head.")
@click.option("--device", default="cpu", show_default=True, help="Device for the embeddings: cpu, cuda or cuda:N.")
@click.option("--batch-size", "-b", default=16, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
def fit_head_command(encoder_model, dataset, out, root, label, pca_dim, prototypes, buckets, epochs, validation_folds, lr, temperature,
                     learn_temperature, seed, cache, no_cache, name, device, batch_size, progress, force):
    """Fit a RALI prototype head on DATASET with the encoder of ENCODER_MODEL, and write a model
    folder with the same encoder and the new head.

    ENCODER_MODEL is a rali-edge model folder, or `default` for the built-in model. DATASET is a
    metas .json or a path,mos .csv (see `rali-edge eval`). The recipe is the paper's: standardise
    and PCA the embeddings, k-means inside equal-width score buckets, prototype score = mean score
    of its cluster, then fine-tune prototypes and scores with an MSE loss. Embeddings are computed
    once and cached, so trying other recipe settings is fast.

    Images that cannot be read are listed and left out (exit code 1; 0 when every image was used).
    """
    from rali_edge.evaluation import read_dataset
    from rali_edge.fit_head import HeadRecipe, fit_head_model

    if validation_folds == 1:
        raise click.BadParameter("0 (no validation) or at least 2", param_hint="--validation-folds")
    recipe = HeadRecipe(pca_dim=pca_dim, prototypes=prototypes, buckets=buckets, epochs=epochs, lr=lr,
                        validation_folds=validation_folds,
                        logit_scale=1.0 / temperature, learn_temperature=learn_temperature, seed=seed)
    cache_path = None if no_cache else (cache or str(Path(out).resolve()) + ".embeddings.npz")

    def log(msg):
        click.echo(msg, err=True)

    def go():
        items = read_dataset(dataset, root=root, label=label)
        show = sys.stderr.isatty() if progress is None else progress
        with click.progressbar(length=len(items), label="embedding", file=sys.stderr, hidden=not show) as bar:
            return fit_head_model(encoder_model, items, out, recipe,
                                  cache=cache_path, name=name, device=device, batch_size=batch_size,
                                  dataset_name=str(dataset), log=log, progress=bar.update, force=force)

    try:
        path, report, embedded = go()  # RaliEdgeError: handled by the CLI group (`error: ...`)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    for failure in embedded.failures:
        click.echo(f"failed: {failure['path']}: {failure['error']}", err=True)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(
        f"wrote {path}: {report.prototypes} prototypes in {report.buckets_used} buckets, PCA {report.pca_dim}, "
        f"{len(embedded.paths)} images ({len(embedded.failures)} failed"
        + (f"; {report.samples} views, each fitted as a sample" if report.samples != len(embedded.paths) else "")
        + f"); training MSE {report.mse_before:.4f} "
        f"(k-means) -> {report.mse_after:.4f} (fine-tuned, {report.epochs} epochs)"
    )
    sys.exit(EXIT_SOME_FAILED if embedded.failures else EXIT_OK)


__all__ = ["fit_head_command"]
