"""`rali-edge eval`: SRCC, KRCC and PLCC of a model or engine on labelled images."""

from __future__ import annotations

import json
import sys

import click

from rali_edge.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED
from rali_edge.cli.common import OUTPUT_FILE, backend_options
from rali_edge.errors import OutputError
from rali_edge.evaluation import LABELS


@click.command(
    "eval",
    epilog="""\b
Examples:
  rali-edge eval default koniq_test.json --root data/       # DeQA-Score metas, built-in model
  rali-edge eval rali-vitl14-336 mine.csv --device cuda --dtype fp16 --format json
  rali-edge eval rali-vitl14-336 mine.csv --backend tensorrt --engine rali.plan   # engine vs fp32: run both
""",
)
@click.argument("model")
@click.argument("dataset", type=click.Path(dir_okay=False))
@click.option("--root", type=click.Path(file_okay=False), help="Folder the image paths are relative to. Default: the dataset file's folder.")
@click.option("--label", type=click.Choice(LABELS), default="auto", show_default=True,
              help="Metas JSON: which label to use (auto: gt_score_norm when every entry has it). Rank metrics do not depend on it.")
@backend_options
@click.option("--batch-size", "-b", default=16, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--predictions", type=OUTPUT_FILE,
              help="Also write path, mos and score for every scored image: csv, or jsonl, json or parquet by the "
                   "file's suffix (checked before scoring starts).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
def eval_command(model, dataset, root, label, batch_size, fmt, predictions, progress, **backend_kwargs):
    """Measure how well MODEL's scores agree with the labels of DATASET.

    MODEL is a rali-edge model folder, or `default` for the built-in model. DATASET is a
    DeQA-Score metas .json (a list of {"image", "gt_score"[, "gt_score_norm"]}) or a .csv
    with `path` and `mos` columns. Reports SRCC, KRCC, PLCC without a fit, PLCC after the
    4-parameter logistic fit of IQA papers, the image count, failures and time.

    Images that cannot be read are listed and left out; the exit code is then 1 (0 when every
    image was scored).
    """
    from rali_edge.cli.common import load_scorer
    from rali_edge.evaluation import PREDICTIONS, evaluate, read_dataset
    from rali_edge.outputs import Output, format_for

    items = read_dataset(dataset, root=root, label=label)  # errors: one line and their exit code
    written = Output(predictions, PREDICTIONS, format_for(predictions, None, default="csv")) if predictions else None
    scorer = load_scorer(model, **backend_kwargs)
    show = sys.stderr.isatty() if progress is None else progress
    with click.progressbar(length=len(items), label="scoring", file=sys.stderr, hidden=not show) as bar:
        report = evaluate(scorer, items, batch_size=batch_size, name=str(dataset), progress=bar.update)
    if report.interrupted and not report.scored:  # stopped before any image was scored
        raise KeyboardInterrupt
    if fmt == "json":  # the report first: a predictions file that cannot be written does not lose it
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        click.echo(report.table(), nl=False)
    if written is not None:
        try:
            with written:
                for row in report.predictions:
                    written.add(row)
        except OutputError as e:
            raise OutputError(f"{e} (the report above is complete)") from None
    if report.interrupted:
        click.echo(f"interrupted: the metrics above are over the {report.scored} images scored before Ctrl-C",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_SOME_FAILED if report.failures else EXIT_OK)


__all__ = ["eval_command"]
