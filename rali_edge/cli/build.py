"""`rali-edge build` and `rali-edge check-engine`: make an engine, then prove it scores like fp32.

    rali-edge build rali-vitl14-336 --target tensorrt --precision fp16 --batch 1:4:8 -o engines/
    rali-edge build rali-vitl14-336 --target aoti                     # PyTorch only, CPU or CUDA
    rali-edge check-engine engines/rali-vitl14-336.trt10.3.sm87.fp16.b1-8.plan --model rali-vitl14-336
"""

from __future__ import annotations

import sys

import click

from rali_edge.cli import EXIT_INTERRUPTED
from rali_edge.cli.common import MODEL
from rali_edge.engines.backends import TARGET_HELP, TARGETS, BuildRequest
from rali_edge.engines.builder import HEADS
from rali_edge.engines.fidelity import DEFAULT_MAX_SCORE_DIFF
from rali_edge.engines.naming import DEFAULT_BATCH, PRECISIONS
from rali_edge.errors import FidelityCheckFailed


@click.command(
    "build",
    epilog="""\b
Examples:
  rali-edge build rali-vitl14-336 --target tensorrt --precision fp16 --batch 1:4:8 -o engines/
  rali-edge build rali-vitl14-336 --target tensorrt --typing strong --workspace 1   # 8 GB Jetson
  rali-edge build rali-vitl14-336 --target aoti --device cpu
  rali-edge build rali-vitl14-336 --target onnx --precision fp16
Then: rali-edge score --model rali-vitl14-336 --backend tensorrt --engine ENGINE photo.jpg
""",
)
@click.argument("model", type=MODEL, default="default", required=False)
@click.option("--target", type=click.Choice(("auto", *TARGETS)), required=True,
              help="auto: the engine `--backend auto` uses here (built into the engine cache), and every path it could "
                   "take, timed side by side. " + TARGET_HELP)
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="Default: fp16 for tensorrt, fp32 for onnx; aoti: fp16 on CUDA, fp32 on CPU. Layernorm, softmax and the head stay fp32.")
@click.option("--batch", "batch_text", default=DEFAULT_BATCH, show_default=True,
              help="Batch sizes MIN:OPT:MAX the engine accepts (TensorRT tunes kernels for OPT). Larger batches are split.")
@click.option("--head", type=click.Choice(list(HEADS)), default="engine", show_default=True,
              help="engine: the RALI head runs inside the engine (needed by the torch-free TensorRT runner); "
                   "triton: the engine outputs class tokens and the scorer runs the fused head kernel.")
@click.option("--workspace", type=click.FloatRange(min=0.0, min_open=True), default=BuildRequest.workspace_gib, show_default=True,
              help="TensorRT workspace limit in GiB (use 1 on 8 GB Jetsons).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache: read if it exists, written after the build.")
@click.option("--typing", type=click.Choice(["auto", "weak", "strong"]), default="auto", show_default=True,
              help="TensorRT precision control. auto: weak typing with fp32 constraints on TensorRT 10, strong on 11. "
                   "strong: precision from the ONNX types (less build memory).")
@click.option("--device", help="aoti: cpu or cuda[:N] (default cuda when available); tensorrt: the GPU, cuda[:N].")
@click.option("--output", "-o", help="Output folder (the engine gets its descriptive name) or file name. Default: current folder.")
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False), help="Images for the fidelity check (default: the bundled samples).")
@click.option("--max-score-diff", type=float, default=DEFAULT_MAX_SCORE_DIFF, show_default=True,
              help="Fail when an image's score differs from fp32 PyTorch by more than this (1..5 scale).")
@click.option("--check/--no-check", default=True, show_default=True, help="Run the fidelity check after building.")
@click.option("--keep-onnx", is_flag=True, help="tensorrt: keep the intermediate ONNX file next to the plan.")
@click.option("--keep-failed", is_flag=True, help="Keep an engine that fails the fidelity check (it is deleted otherwise).")
@click.option("--progress/--no-progress", default=None, help="Live progress line (default: when stderr is a terminal).")
def build_command(model, target, precision, batch_text, head, workspace, timing_cache, typing, device, output,
                  calib_dir, max_score_diff, check, keep_onnx, keep_failed, progress):
    """Build an engine for MODEL (a rali-edge model folder) and check its scores against fp32 PyTorch.

    The engine file is named after the model, target, TensorRT/torch version, GPU, precision and
    batch range, and gets a JSON sidecar (<engine>.json) that rali-edge checks before loading it:
    an engine built for another GPU, TensorRT version or model is refused with the command that
    rebuilds it. Exit code 0 when built and checked, 1 when the check fails, 4 when TensorRT (or
    another needed library) is missing.
    """
    from rali_edge.engines.builder import Progress, build

    if target == "auto":
        _refuse_options_auto_ignores()
        return _build_auto(model, precision or "auto", device or "cpu", Progress(live=progress))
    # A backend's own options go only when given, so that build() can refuse them for another target.
    own = {"workspace_gib": ("workspace", workspace), "timing_cache": ("timing_cache", timing_cache),
           "typing": ("typing", typing), "keep_onnx": ("keep_onnx", keep_onnx)}
    given = {field: value for field, (name, value) in own.items() if _given(name)}
    try:
        built = build(model, target, precision=precision, batch=batch_text, head=head, device=device, output=output,
                      check=check, calib_dir=calib_dir, max_score_diff=max_score_diff, keep_failed=keep_failed,
                      progress=Progress(live=progress), **given)
    except KeyboardInterrupt:
        click.echo("interrupted: partial files removed", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(f"use it: rali-edge score --model {model} --engine {built.engine} IMAGES...", err=True)
    click.echo(str(built.engine))


# What --target auto takes: the cache decides the rest (file name, batch profile, head, check).
AUTO_TAKES = {"model", "target", "precision", "device", "progress"}


def _given(name: str) -> bool:
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) == ParameterSource.COMMANDLINE


def _refuse_options_auto_ignores() -> None:
    ctx = click.get_current_context()
    given = [(param.secondary_opts or param.opts)[0] if ctx.params[param.name] is False else param.opts[0]
             for param in ctx.command.params if param.name not in AUTO_TAKES and _given(param.name)]
    if given:
        raise click.UsageError(f"{', '.join(given)}: not with --target auto, which builds the engine cache's own engine "
                               f"(its name, batch range, head and check); name a target (--target onnx, tensorrt or "
                               f"aoti) to choose them")


def _build_auto(model, dtype: str, device: str, progress) -> None:
    from rali_edge.engines.builder import build_auto

    engine, verdict = build_auto(model, device=device, dtype=dtype, progress=progress)
    for line in verdict.table():
        click.echo(line, err=True)
    click.echo("auto runs eager PyTorch here (no engine to build)" if engine is None else str(engine))


@click.command(
    "check-engine",
    epilog="""\b
Example:
  rali-edge check-engine rali-vitl14-336.trt10.3.sm87.fp16.b1-8.plan --model rali-vitl14-336 --calib-dir shots/
""",
)
@click.argument("engine", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "-m", type=MODEL, default="default",
              help="The model folder the engine was built from, or `default`: the built-in model.")
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False), help="Images to score (default: the bundled samples).")
@click.option("--max-score-diff", type=float, default=DEFAULT_MAX_SCORE_DIFF, show_default=True,
              help="Fail when an image's score differs from fp32 PyTorch by more than this (1..5 scale).")
@click.option("--device", help="aoti: cpu or cuda[:N] (default: what the engine was built for); tensorrt: cuda[:N].")
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(min=1), help="Images per call.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def check_engine_command(engine, model, calib_dir, max_score_diff, device, batch_size, as_json):
    """Score images with ENGINE and with fp32 PyTorch; report max |score diff| and SRCC.

    Exit code 0 when the largest difference is within --max-score-diff, 1 when it is not, 3 when
    the engine does not fit this model or machine (the message says how to rebuild it).
    """
    import json

    from rali_edge.engines.builder import check

    report = check(engine, model, calib_dir, max_score_diff, device=device, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    click.echo(f"fidelity: {report.summary()}", err=True)
    if not report.passed:
        raise FidelityCheckFailed(f"fidelity check failed: max |score diff| {report.max_abs_diff:.4f} > {max_score_diff}")


__all__ = ["FidelityCheckFailed", "build_command", "check_engine_command"]
