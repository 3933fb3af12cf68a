"""`rali-edge score`: quality scores for image files, folders and globs."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import click

from rali_edge.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED
from rali_edge.cli.common import OUTPUT_FILE, model_options

class ResultWriter:
    """Writes results as they come for csv (so an interrupted run keeps every scored line),
    at the end for table and json (a json list is only valid once closed)."""

    def __init__(self, fmt: str, out):
        self.fmt, self.out, self.results = fmt, out, []
        if fmt == "csv":
            self.csv = csv.writer(out, lineterminator="\n")
            self.csv.writerow(["path", "score", "error"])

    def add(self, result):
        self.results.append(result)
        if self.fmt == "csv":
            score = "" if result.score is None else f"{result.score:.6f}"
            self.csv.writerow([result.path, score, result.error or ""])
            self.out.flush()

    def close(self):
        if self.fmt == "json":
            json.dump([r.to_dict() for r in self.results], self.out, indent=1)
            self.out.write("\n")
        elif self.fmt == "table":
            self.out.write(f"{'score':>7}  path\n")
            for r in self.results:
                shown = f"{r.score:7.3f}" if r.error is None else "  error"
                self.out.write(f"{shown}  {r.path}" + (f"  ({r.error})" if r.error else "") + "\n")
        self.out.flush()


@click.command(
    "score",
    epilog="""\b
Examples:
  rali-edge score photo.jpg                       # built-in model, table
  rali-edge score shots/ --format csv -o out.csv  # a folder, recursively
  rali-edge score 'cam/**/*.jpg' --model rali-vitl14-336 --device cuda --dtype fp16 --format json
""",
)
@click.argument("paths", nargs=-1, required=True)
@model_options
@click.option("--batch-size", "-b", default=16, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="json: a list of {path, score} or {path, error}, in input order; csv: path,score,error.")
@click.option("--output", "-o", type=OUTPUT_FILE, help="Write results here instead of stdout (checked before scoring starts).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--quiet", "-q", is_flag=True, help="No note on stderr about the built-in demonstration model.")
def score_command(paths, batch_size, fmt, output, progress, quiet, **model_kwargs):
    """Score the quality of images (1 = very poor, 5 = excellent).

    PATHS are image files, folders (searched recursively for the image suffixes every command
    uses, in natural order: 2.jpg before 10.jpg) or globs ('**' recursive); a file named twice
    is scored once. A file that cannot be read is reported with its error and the others are
    still scored; an empty folder or a glob that matches nothing is reported on stderr. Exit
    code 0 when every input was scored, 1 when some failed, 130 when interrupted (results so far
    are written).
    """
    from rali_edge.cli.common import DEMO_NOTE, load_scorer
    from rali_edge.images import find_images
    from rali_edge.scoring import is_default_model

    found = find_images(paths)
    for message in found.unmatched:
        click.echo(f"error: {message}", err=True)
    files = found.paths
    scorer = load_scorer(**model_kwargs)
    if not quiet and is_default_model(model_kwargs["model"]):
        click.echo(DEMO_NOTE, err=True)
    out = open(output, "w", newline="") if output else sys.stdout
    writer = ResultWriter(fmt, out)
    show = sys.stderr.isatty() if progress is None else progress
    start, failed, code = time.perf_counter(), 0, EXIT_OK
    try:
        with click.progressbar(length=len(files), label="scoring", file=sys.stderr, hidden=not show) as bar:
            for result in scorer.score_files(files, batch_size=batch_size):
                writer.add(result)
                failed += result.error is not None
                bar.update(1)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        click.echo(f"interrupted: writing the {len(writer.results)} results so far", err=True)
    finally:
        writer.close()
        if output:
            out.close()
    elapsed = time.perf_counter() - start
    done = len(writer.results) - failed
    click.echo(f"{done} scored, {failed} failed, {elapsed:.2f} s ({done / max(elapsed, 1e-9):.1f} images/s)", err=True)
    if code == EXIT_OK and (failed or found.unmatched):
        code = EXIT_SOME_FAILED
    sys.exit(code)


__all__ = ["score_command"]
