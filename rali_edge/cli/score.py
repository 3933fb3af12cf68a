"""`rali-edge score`: quality scores for image files, folders and globs."""

from __future__ import annotations

import contextlib
import sys
import time

import click

from rali_edge.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED
from rali_edge.cli.common import OUTPUT_FILE, model_options
from rali_edge.errors import OutputClosed
from rali_edge.outputs import FORMATS

@click.command(
    "score",
    epilog="""\b
Examples:
  rali-edge score photo.jpg                       # built-in model, table
  rali-edge score shots/ --format csv -o out.csv  # a folder, recursively
  rali-edge score 'cam/**/*.jpg' --model rali-vitl14-336 --device cuda --dtype fp16 --format json
  rali-edge score s3://bucket/photos/ -o scores.parquet --resume   # pip install 'rali-edge[corpus]' s3fs
  rali-edge score --from-list corpus.parquet --ray auto --ray-actors 8 --ray-gpus 1 -o scores.parquet
""",
)
@click.argument("paths", nargs=-1)
@model_options
@click.option("--batch-size", "-b", default=16, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="csv: path,score,error; jsonl: one {path, score} or {path, error} per line (both written as "
                   "scored: a killed run keeps every finished row); parquet: a folder of part files (-o "
                   "NAME.parquet), one every 4096 rows or 5 s; json: one list, in input order. "
                   "Default: from -o's suffix (.csv, .jsonl, .json, .parquet), else table.")
@click.option("--output", "-o", type=OUTPUT_FILE, help="Write results here instead of stdout (checked before scoring starts).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: skip the images already in -o (csv, jsonl or parquet) and append the rest.")
@click.option("--from-list", "lists", multiple=True, type=click.Path(),
              help="Also score the paths a list names: one per line, a CSV with a path column, or a Parquet file "
                   "or folder with a path column (repeatable).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Decoding threads (default: one per core, up to 32); they decode at most a batch ahead.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Score on a Ray cluster (pip install 'rali-edge[ray]'): decoding in CPU tasks, scoring in an actor "
                   "pool, one row per input even when an actor dies. auto: the cluster RAY_ADDRESS names or that runs "
                   "here; local: start one for this run; or HOST:PORT / ray://HOST:PORT.")
@click.option("--ray-actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: scoring actors, one model each.")
@click.option("--ray-gpus", type=click.FloatRange(min=0), default=0, show_default=True,
              help="With --ray: GPUs per actor (then --device defaults to cuda on the actors).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--quiet", "-q", is_flag=True,
              help="No notes on stderr: the built-in model's, and what auto measures and builds on first use.")
def score_command(paths, batch_size, fmt, output, resume, lists, workers, ray_address, ray_actors, ray_gpus, progress,
                  quiet, **model_kwargs):
    """Score the quality of images (1 = very poor, 5 = excellent).

    PATHS are image files, folders (searched recursively for the image suffixes every command
    uses, in natural order: 2.jpg before 10.jpg) or globs ('**' recursive), or URIs (s3://,
    gs://, http(s)://, file://; a folder ends in '/'; read with retries); a file named twice
    is scored once. --from-list FILE adds the paths a list names, taken as written (one per
    line, or a CSV or Parquet with a path column). A file that cannot be read is reported with
    its error and the others are still scored; an empty folder or a glob that matches nothing
    is reported on stderr. Exit code 0 when every input was scored, 1 when some failed, 130
    when interrupted (results so far are written; with -o FILE.csv, .jsonl or .parquet,
    --resume then scores only the rest).
    """
    from rali_edge.cli.common import DEMO_NOTE
    from rali_edge.images import find_images, paths_from_list
    from rali_edge.outputs import Output, format_for
    from rali_edge.scoring import SCORES, PipelineStats, is_default_model, score_table

    if not paths and not lists:
        raise click.UsageError("give PATHS (files, folders, globs) or --from-list FILE")
    found = find_images(paths)
    listed = [p for f in lists for p in paths_from_list(f)]
    if not found.paths and not listed:  # nothing at all to score: a usage error, before the model loads
        raise click.UsageError("nothing to score: " + "; ".join(found.unmatched or ["the lists name no file"]))
    for message in found.unmatched:
        click.echo(f"error: {message}", err=True)
    writer = Output(output, SCORES, format_for(output, fmt), resume=resume, table=score_table)  # usage errors first
    if output and not fmt and writer.fmt == "table":
        click.echo(f"note: -o {output}: its suffix names no format, so it gets the table for people; for scripts "
                   "use .csv, .jsonl, .json or .parquet, or --format", err=True)
    inputs = list(dict.fromkeys([*found.paths, *listed]))  # a path named twice is scored once
    files = [p for p in inputs if p not in writer.done]
    if resume:
        click.echo(f"resuming {output}: {len(inputs) - len(files)} images already there, {len(files)} to score",
                   err=True)
    if not quiet and is_default_model(model_kwargs["model"]):
        click.echo(DEMO_NOTE, err=True)
    show = sys.stderr.isatty() if progress is None else progress
    start, failed, code = time.perf_counter(), 0, EXIT_OK
    stats = PipelineStats()
    try:
        with _results(files, batch_size, workers, ray_address, ray_actors, ray_gpus, model_kwargs, stats, quiet) as results, \
                click.progressbar(length=len(files), label="scoring", file=sys.stderr, hidden=not show) as bar:
            for result in results:
                writer.add(result.to_dict())
                failed += result.error is not None
                bar.update(1)
    except OutputClosed:
        pass  # the reader of stdout (`| head`) took what it wanted: stop quietly, as `stream` does
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        click.echo(f"interrupted: writing the {writer.count} results so far", err=True)
    except BaseException:  # a model that does not load (here or on Ray's workers), a lost cluster...
        writer.close(create=False)  # ...keeps the rows so far and never empties -o before the first
        raise
    writer.close()
    elapsed = time.perf_counter() - start
    done = writer.count - failed
    click.echo(f"{done} scored, {failed} failed, {elapsed:.2f} s ({done / max(elapsed, 1e-9):.1f} images/s)", err=True)
    if stats.wall_s >= 1.0:  # a run long enough for the split to mean something (not with --ray: Ray's own)
        click.echo(stats.bottleneck(), err=True)
    if code == EXIT_OK and (failed or found.unmatched):
        code = EXIT_SOME_FAILED
    sys.exit(code)


@contextlib.contextmanager
def _results(files, batch_size, workers, ray_address, ray_actors, ray_gpus, model_kwargs, stats, quiet):
    """The FileResults of `files` in input order: from this process's pipeline, or from Ray."""
    from rali_edge.cli.common import load_scorer

    if ray_address is None:
        yield load_scorer(**model_kwargs, quiet=quiet).score_files(files, batch_size=batch_size, workers=workers,
                                                                   stats=stats)
        return
    from rali_edge.distributed import ray_session, score_paths

    if model_kwargs.get("engine"):
        raise click.UsageError("--ray builds or reuses engines on each node (backend auto): leave out --engine")
    device = model_kwargs["device"] if model_kwargs["device"] != "cpu" or not ray_gpus else "cuda"
    with ray_session(ray_address):
        yield score_paths(files, model_kwargs["model"], backend=model_kwargs["backend"], dtype=model_kwargs["dtype"],
                          head=model_kwargs["head"], device=device, batch_size=batch_size, actors=ray_actors,
                          gpus_per_actor=ray_gpus, cache=not model_kwargs["no_cache"])


__all__ = ["score_command"]
