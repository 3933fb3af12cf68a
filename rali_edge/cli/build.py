"""`rali-edge build` and `rali-edge check-engine`: make an engine, then prove it scores like fp32.

    rali-edge build rali-vitl14-336 --target tensorrt --precision fp16 --batch 1:4:8 -o engines/
    rali-edge build rali-vitl14-336 --target aoti                     # PyTorch only, CPU or CUDA
    rali-edge check-engine engines/rali-vitl14-336.trt10.3.sm87.fp16.b1-8.plan --model rali-vitl14-336
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import click

from rali_edge.cli import EXIT_INTERRUPTED
from rali_edge.cli.common import MODEL
from rali_edge.errors import FidelityCheckFailed, RaliEdgeError, UsageError

TARGET_HELP = "tensorrt: NVIDIA TensorRT plan (Jetson, desktop GPUs); aoti: AOTInductor package (PyTorch, CPU or CUDA); onnx: ONNX file."
DEFAULT_PRECISION = {"tensorrt": "fp16", "onnx": "fp32"}  # aoti: fp16 on CUDA, fp32 on CPU
DEFAULT_WORKSPACE_GIB = 2.0


class Progress:
    """Numbered steps on stderr with their duration. On a terminal the running step shows its
    elapsed time (and TensorRT's build phases) on one refreshed line; in logs, one line per event."""

    def __init__(self, total: int, out=None, live: bool | None = None):
        self.total, self.index = total, 0
        self.out = out or sys.stderr
        self.live = self.out.isatty() if live is None else live
        self._status, self._lock = "", threading.Lock()

    @contextmanager
    def step(self, title: str):
        self.index += 1
        label = f"[{self.index}/{self.total}] {title}"
        start = time.perf_counter()
        stop = threading.Event()
        if self.live:
            ticker = threading.Thread(target=self._tick, args=(label, start, stop), daemon=True)
            ticker.start()
        else:
            self._line(f"{label} ...")
        try:
            yield self
        except BaseException:
            stop.set()
            self._finish(f"{label}: failed after {time.perf_counter() - start:.1f} s")
            raise
        stop.set()
        self._finish(f"{label}: done in {time.perf_counter() - start:.1f} s")

    def status(self, text: str) -> None:
        """A sub-status of the running step (a TensorRT phase, say)."""
        with self._lock:
            changed, self._status = text != self._status, text
        if changed and not self.live:
            self._line(f"    {text}")

    def tensorrt_callback(self, event: str, phase: str, step: int, total: int) -> bool:
        if event == "start" and not self.live:
            self.status(f"{phase} ({total} steps)" if total else phase)
        elif self.live and event in ("start", "step"):
            self.status(f"{phase} {step}/{total}" if total else phase)
        return True  # never cancel; Ctrl-C is handled by the monitor itself

    def _tick(self, label: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            with self._lock:
                status = f"  {self._status}" if self._status else ""
            self.out.write(f"\r\x1b[2K{label} ... {time.perf_counter() - start:5.0f} s{status}"[:200])
            self.out.flush()

    def _finish(self, text: str) -> None:
        with self._lock:
            self._status = ""
        if self.live:
            self.out.write("\r\x1b[2K")
        self._line(text)

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def resolve_output(output: str | None, filename: str, suffix: str) -> Path:
    """-o: a file name with the target's suffix is used as given; anything else is a folder."""
    if output is None:
        return Path.cwd() / filename
    path = Path(output)
    if path.suffix == suffix and not path.is_dir():
        folder = path.parent
    elif path.exists() and not path.is_dir():
        raise UsageError(f"-o {output} is an existing file, not a folder or a {suffix} engine name; give a folder "
                         f"(the engine gets its descriptive name there) or a file name ending in {suffix}")
    else:
        folder, path = path, path / filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"-o {output}: cannot create the folder {folder} ({e.strerror or e})") from None
    return path


def default_device(target: str) -> str:
    import torch

    return "cuda" if target == "tensorrt" or torch.cuda.is_available() else "cpu"


def resolve_precision(target: str, precision: str | None, device: str) -> str:
    if precision is None:
        precision = DEFAULT_PRECISION.get(target) or ("fp16" if device.startswith("cuda") else "fp32")
    if target == "onnx" and precision == "bf16":
        raise UsageError(
            "--target onnx --precision bf16 is not supported: ONNX Runtime has no bf16 kernels for most "
            "operators on CPU. Use fp16 or fp32 for ONNX; bf16 works with --target tensorrt and --target aoti."
        )
    return precision


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
@click.option("--target", type=click.Choice(["tensorrt", "aoti", "onnx"]), required=True, help=TARGET_HELP)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Default: fp16 for tensorrt, fp32 for onnx; aoti: fp16 on CUDA, fp32 on CPU. Layernorm, softmax and the head stay fp32.")
@click.option("--batch", "batch_text", default="1:8:16", show_default=True,
              help="Batch sizes MIN:OPT:MAX the engine accepts (TensorRT tunes kernels for OPT). Larger batches are split.")
@click.option("--head", type=click.Choice(["engine", "triton"]), default="engine", show_default=True,
              help="engine: the RALI head runs inside the engine (needed by the torch-free TensorRT runner); "
                   "triton: the engine outputs class tokens and the scorer runs the fused head kernel.")
@click.option("--workspace", type=click.FloatRange(min=0.0, min_open=True), default=DEFAULT_WORKSPACE_GIB, show_default=True,
              help="TensorRT workspace limit in GiB (use 1 on 8 GB Jetsons).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache: read if it exists, written after the build.")
@click.option("--typing", type=click.Choice(["auto", "weak", "strong"]), default="auto", show_default=True,
              help="TensorRT precision control. auto: weak typing with fp32 constraints on TensorRT 10, strong on 11. "
                   "strong: precision from the ONNX types (less build memory).")
@click.option("--device", help="aoti: cpu or cuda[:N] (default cuda when available); tensorrt: the GPU, cuda[:N].")
@click.option("--output", "-o", help="Output folder (the engine gets its descriptive name) or file name. Default: current folder.")
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False), help="Images for the fidelity check (default: the bundled samples).")
@click.option("--max-score-diff", type=float, default=0.02, show_default=True,
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
    from rali_edge.engines.fidelity import find_images
    from rali_edge.engines.naming import BatchRange
    from rali_edge.scoring import model_path as resolve_model

    batch = BatchRange.parse(batch_text)
    outputs = "score" if head == "engine" else "class_token"
    if target == "tensorrt":
        from rali_edge.engines.tensorrt import import_tensorrt

        import_tensorrt()  # before minutes of export: a missing TensorRT is exit 4 with install advice
    device = device or default_device(target)
    precision = resolve_precision(target, precision, device)
    images = find_images(calib_dir) if check else []
    steps = {"tensorrt": 2, "aoti": 1, "onnx": 1}[target] + int(check)
    ui = Progress(steps, live=progress)
    written: list[Path] = []
    try:
        engine, info = _build(ui, resolve_model(model), target, precision, batch, outputs, workspace, timing_cache, typing,
                              device, output, keep_onnx, written)
        click.echo(f"engine: {engine} ({engine.stat().st_size / 2**20:.1f} MiB)", err=True)
        if check:
            check_device = None if target == "onnx" else device
            _check(ui, resolve_model(model), engine, info, images, max_score_diff, keep_failed, check_device)
    except KeyboardInterrupt:
        for path in written:
            path.unlink(missing_ok=True)
        click.echo("interrupted: partial files removed", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if target != "onnx":
        click.echo(f"use it: rali-edge score --model {model} --backend {target} --engine {engine} IMAGES...", err=True)
    click.echo(str(engine))


def _build(ui: Progress, model_path: Path, target, precision, batch, outputs, workspace, timing_cache, typing, device,
           output, keep_onnx, written: list[Path]):
    from rali_edge.engines.naming import (
        EngineInfo,
        RuntimeInfo,
        engine_filename,
        sidecar_path,
        write_sidecar,
    )
    from rali_edge.model_file import load_model

    model, manifest = load_model(model_path)
    size = manifest.encoder.image_size
    options = {"target": target, "precision": precision, "batch": str(batch), "head": "engine" if outputs == "score" else "triton"}
    if target == "tensorrt":
        from rali_edge.engines import tensorrt as trt_engines

        runtime = trt_engines.tensorrt_runtime(_cuda_index(device))
        plan = trt_engines.plan_precision(trt_engines.tensorrt_major(runtime.tensorrt_version), precision, typing)
        options.update(workspace_gib=workspace, typing=plan.typing, timing_cache=timing_cache)
    elif target == "aoti":
        from rali_edge.engines.aoti import torch_runtime

        runtime = torch_runtime(device)
        options["device"] = device
    else:
        runtime = RuntimeInfo()
    from rali_edge.engines.export import ONNX_OPSET, export_onnx

    opset = ONNX_OPSET if target != "aoti" else None
    name = engine_filename(manifest.name, target, precision, batch, outputs, runtime, opset)
    engine = resolve_output(output, name, Path(name).suffix)
    info = EngineInfo(target=target, precision=precision, outputs=outputs, batch=batch, image_size=(size, size),
                      model_name=manifest.name, model_sha256=manifest.weights_sha256, runtime=runtime,
                      build_options=options, preprocess=manifest.preprocess, onnx_opset=opset)
    written += [engine, sidecar_path(engine)]

    if target == "onnx":
        with ui.step(f"exporting ONNX (opset {opset}, {precision}, batch {batch.min}-{batch.max})"):
            export_onnx(model, engine, precision, outputs, batch.min, batch.max)
    elif target == "aoti":
        from rali_edge.engines.aoti import compile_aoti

        with ui.step(f"compiling with AOTInductor for {device} ({precision}, batch {batch.min}-{batch.max}); "
                     "this takes a few minutes"):
            compile_aoti(model, engine, precision, outputs, batch, device)
    else:
        onnx_path = engine.with_name(engine.name + ".onnx")
        written.append(onnx_path)
        info.typing = plan.typing
        with ui.step(f"exporting ONNX for TensorRT {runtime.tensorrt_version} ({plan.typing} typing, "
                     f"{plan.onnx_precision} weights)"):
            export_onnx(model, onnx_path, plan.onnx_precision, outputs, batch.min, batch.max)
        del model  # the PyTorch weights are not needed while TensorRT builds: give the memory back
        needed = trt_engines.estimate_build_memory_gib(
            onnx_path.stat().st_size, workspace, 0.5 if plan.onnx_precision == "fp32" and precision != "fp32" else 1.0)
        advice = trt_engines.memory_advice(needed, trt_engines.available_memory_gib(), plan)
        if advice:
            click.echo(f"warning: {advice}", err=True)
        try:
            with ui.step(f"building the TensorRT engine on {runtime.gpu_name} ({runtime.compute_capability}, {precision}, "
                         f"batch {batch}); this takes minutes"):
                result = trt_engines.build_engine(onnx_path, engine, batch=batch, image_size=(size, size), plan=plan,
                                                  workspace_gib=workspace, timing_cache=timing_cache,
                                                  progress=ui.tensorrt_callback, head_in_engine=outputs == "score")
        finally:
            if not keep_onnx:
                onnx_path.unlink(missing_ok=True)
        if result.pinned_layers:
            click.echo(f"kept {len(result.pinned_layers)} layers in fp32 (layernorm, softmax, reductions, head)", err=True)
    write_sidecar(engine, info)
    return engine, info


def _check(ui: Progress, model_path: Path, engine: Path, info, images, max_score_diff: float, keep_failed: bool,
           device: str | None) -> None:
    from rali_edge.engines.fidelity import check_engine
    from rali_edge.engines.naming import sidecar_path, write_sidecar

    with ui.step(f"fidelity check on {len(images)} images against fp32 PyTorch"):
        report = check_engine(model_path, engine, info.target, images, max_score_diff, device=device)
    info.fidelity = report.to_dict()
    write_sidecar(engine, info)
    click.echo(f"fidelity: {report.summary()}", err=True)
    if not report.passed:
        if not keep_failed:
            engine.unlink(missing_ok=True)
            sidecar_path(engine).unlink(missing_ok=True)
            where = "the engine was deleted (--keep-failed keeps it)"
        else:
            where = f"the engine is kept at {engine}, marked as failed in its sidecar"
        raise FidelityCheckFailed(
            f"fidelity check failed: max |score diff| {report.max_abs_diff:.4f} > {max_score_diff} "
            f"(worst image: {report.worst_image}); {where}. Try --precision fp32, or raise --max-score-diff "
            "if this difference is acceptable for your use."
        )


def _cuda_index(device: str) -> int:
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--device {device}: expected cuda or cuda:N") from None
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: TensorRT engines run on cuda or cuda:N")
    return 0


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
@click.option("--max-score-diff", type=float, default=0.02, show_default=True,
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

    from rali_edge.engines.fidelity import check_engine, find_images
    from rali_edge.engines.naming import read_sidecar
    from rali_edge.scoring import model_path as resolve_model

    info = read_sidecar(engine)
    model_path = resolve_model(model)
    images = find_images(calib_dir)
    if device is None and info.target == "aoti":
        device = info.runtime.device_type
    report = check_engine(model_path, engine, info.target, images, max_score_diff, device=device, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    click.echo(f"fidelity: {report.summary()}", err=True)
    if not report.passed:
        raise FidelityCheckFailed(f"fidelity check failed: max |score diff| {report.max_abs_diff:.4f} > {max_score_diff}")


__all__ = ["FidelityCheckFailed", "build_command", "check_engine_command"]
