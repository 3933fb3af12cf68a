"""AOTInductor engines: the encoder compiled ahead of time into a `.pt2` package by torch.

This is the engine format that works where TensorRT is not installed (CPUs, GPUs without
TensorRT) and the one CI builds and runs end to end. A package holds machine code for one device
type (and, on CUDA, one GPU architecture) and loads only in the torch version that compiled it, so
its sidecar records both and `check_compatible` refuses a mismatch before loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rali_edge.engines.export import (
    ExportEncoder,
    dynamic_batch,
    example_batch,
    example_pixels,
    quiet_export,
)
from rali_edge.engines.backends import Backend, BuildRequest, same_platform
from rali_edge.engines.naming import (
    DEFAULT_BATCH,
    BatchRange,
    EngineInfo,
    RuntimeInfo,
    base_version,
    compute_capability_tag,
    device_model,
    major_minor,
)
from rali_edge.errors import EngineMismatchError, MissingDependencyError, RaliEdgeError
from rali_edge.model import DTYPES, RaliModel


def torch_runtime(device: str | torch.device = "cpu") -> RuntimeInfo:
    """The RuntimeInfo of this torch installation on `device`."""
    device = torch.device(device)
    info = RuntimeInfo(device_type=device.type, torch_version=torch.__version__, cuda_version=torch.version.cuda)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MissingDependencyError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.gpu_name = torch.cuda.get_device_name(index)
        info.compute_capability = compute_capability_tag(*torch.cuda.get_device_capability(index))
    info.device_model = device_model()
    return info


def compile_aoti(model: RaliModel, package_path: str | Path, precision: str = "fp32", outputs: str = "score",
                 batch: BatchRange | None = None, device: str = "cpu") -> Path:
    """torch.export the engine function with a dynamic batch axis, then
    `torch._inductor.aoti_compile_and_package` it for `device`. Returns the package path."""
    try:
        from torch._inductor import aoti_compile_and_package
    except ImportError:
        raise MissingDependencyError(f"AOTInductor packages need torch >= 2.6 (this is {torch.__version__})") from None
    batch = batch or BatchRange.parse(DEFAULT_BATCH)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise RaliEdgeError(f"AOTInductor target: device {device} is not supported (cpu or cuda)")
    if precision not in DTYPES:
        raise RaliEdgeError(f"unknown precision {precision!r}")
    module = ExportEncoder(model, precision, outputs).eval().to(device)
    example = example_pixels(model, example_batch(batch.min, batch.max)).to(device)
    package_path = Path(package_path)
    try:
        with torch.no_grad(), quiet_export():
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic_batch(batch.min, batch.max))
            out = aoti_compile_and_package(program, package_path=str(package_path))
    except Exception as e:
        hint = ""
        if "g++" in str(e) or "compiler" in str(e).lower():
            hint = " (AOTInductor needs a C++ compiler: install g++ / build-essential)"
        raise RaliEdgeError(f"AOTInductor compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}{hint}") from e
    return Path(out)


class AOTIEncoder:
    """EncoderBackend running an AOTInductor package. Batches larger than the package's maximum
    are split; smaller than its minimum are padded (and the padding dropped)."""

    def __init__(self, path: str | Path, outputs: str, batch: BatchRange, device: str | torch.device = "cpu"):
        self.outputs, self.batch = outputs, batch
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        from torch._inductor import aoti_load_package

        try:
            self.runner = aoti_load_package(
                str(path), device_index=self.device.index if self.device.type == "cuda" else -1)
        except Exception as e:
            raise EngineMismatchError(f"{path}: cannot load the AOTInductor package ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); rebuild it with "
                                      "`rali-edge build --target aoti`") from None

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, torch.float32)
        return self.batch.run_chunks(pixels, lambda chunk: self.runner(chunk.contiguous()), torch.cat)


class AOTIBackend(Backend):
    name = "aoti"

    def default_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def default_precision(self, device: str) -> str:
        return "fp16" if device.startswith("cuda") else "fp32"

    def runtime(self, device: str) -> RuntimeInfo:
        return torch_runtime(device)

    def name_parts(self, runtime: RuntimeInfo, opset: int | None) -> list[str]:
        where = f"cuda-{runtime.compute_capability}" if runtime.device_type == "cuda" else f"cpu-{runtime.cpu_arch}"
        return ["aoti", f"torch{major_minor(runtime.torch_version)}", where]

    def compatibility(self, built: RuntimeInfo, here: RuntimeInfo) -> tuple[list[str], list[str]]:
        problems = []
        if base_version(built.torch_version) != base_version(here.torch_version):
            problems.append(
                f"it was compiled by torch {built.torch_version}, this is torch {here.torch_version}; "
                "AOTInductor packages are only guaranteed to load in the torch version that compiled them"
            )
        if built.device_type != here.device_type:
            problems.append(f"it was compiled for {built.device_type}, but it is asked to run on {here.device_type}")
        elif built.device_type == "cuda" and built.compute_capability != here.compute_capability:
            problems.append(
                f"it was compiled for compute capability {built.compute_capability}, this GPU is "
                f"{here.compute_capability or '(none)'}"
            )
        return problems + same_platform(built, here), []

    def rebuild_options(self, info: EngineInfo) -> str:
        return f" --device {info.runtime.device_type}"

    def build(self, load_model, path: Path, request: BuildRequest, info: EngineInfo, progress, written: list[Path]) -> None:
        info.build_options["device"] = request.device
        batch = request.batch
        with progress.step(f"compiling with AOTInductor for {request.device} ({request.precision}, batch "
                           f"{batch.min}-{batch.max}); this takes a few minutes"):
            compile_aoti(load_model(), path, request.precision, request.outputs, batch, request.device)

    def open(self, path: Path, info: EngineInfo, device: str) -> AOTIEncoder:
        return AOTIEncoder(path, info.outputs, info.batch, device)


BACKEND = AOTIBackend()


__all__ = ["BACKEND", "AOTIEncoder", "compile_aoti", "torch_runtime"]
