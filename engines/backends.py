"""The engine backends: one table, and the one interface each backend module implements.

    backend("aoti").open(path, info, "cpu")      # what open_engine does after checking the sidecar

A backend is one module of this package holding a `BACKEND` object (a subclass of `Backend`)
and one line in `TABLE`. Everything that differs between engine formats lives there: the file
suffix and name, the devices and precisions it takes, what it records about the machine, what
makes an engine unusable on another machine, how it is built and how it is opened. Commands,
the scorer, the fidelity check and the file naming read this table. "torch" (eager PyTorch, no
engine) is the one backend that is not in it, so the scorer and the engine cache (auto's choice
between eager PyTorch and an engine) do name it.

No torch or TensorRT import here: the torch-free TensorRT runner reads this table too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from rali_edge.errors import EngineMismatchError, UsageError


@dataclass(frozen=True)
class Entry:
    name: str
    suffix: str
    module: str  # holds BACKEND; imported only when the backend is used
    summary: str  # one line for --help


TABLE = (
    Entry("tensorrt", ".plan", "rali_edge.engines.tensorrt", "NVIDIA TensorRT plan (Jetson, desktop and server GPUs)"),
    Entry("aoti", ".pt2", "rali_edge.engines.aoti", "AOTInductor package (PyTorch alone, CPU or CUDA)"),
    Entry("onnx", ".onnx", "rali_edge.engines.onnx", "ONNX file run by ONNX Runtime (CPU)"),
)
TARGETS = tuple(e.name for e in TABLE)  # the engines `rali-edge build` makes
BACKENDS = ("auto", "torch", *TARGETS)  # what scores: the fastest (engines/cache.py), eager PyTorch, or an engine
BACKEND_ENV = "RALI_EDGE_BACKEND"  # the default backend when none is named (default: auto)


def default_backend() -> str:
    """`auto`, unless RALI_EDGE_BACKEND names another (RALI_EDGE_BACKEND=torch: eager PyTorch everywhere)."""
    import os

    name = os.environ.get(BACKEND_ENV) or "auto"
    if name not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name
SUFFIX = {e.name: e.suffix for e in TABLE}
TARGET_HELP = "; ".join(f"{e.name}: {e.summary}" for e in TABLE) + "."


@dataclass
class BuildRequest:
    """What `rali-edge build` (or `rali_edge.engines.builder.build`) was asked for; each backend
    reads the fields it uses."""

    precision: str
    batch: object  # BatchRange
    outputs: str  # "score" (head inside) or "class_token"
    device: str
    workspace_gib: float = 2.0  # TensorRT
    timing_cache: str | None = None  # TensorRT
    typing: str = "auto"  # TensorRT
    keep_onnx: bool = False  # TensorRT: keep the intermediate ONNX file
    form: str | None = None  # which of the backend's `forms` of this precision to build
    # The builder's folder for intermediate files, kept across the forms of one build and removed
    # when the build ends, however it ends (the int8 forms share one fp32 export there).
    scratch: Path | None = None


class Backend:
    """The interface. Defaults suit a backend that runs anywhere on the CPU."""

    name: str = ""
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")
    # The BuildRequest fields of this backend alone, by their `rali-edge build` flags: build()
    # refuses them for another backend rather than ignore them.
    options: dict[str, str] = {}
    # The modules it needs to build and run engines, and how to get them (auto leaves out a
    # backend whose modules are missing, and says so).
    requires: tuple[str, ...] = ()
    install: str = ""

    @property
    def suffix(self) -> str:
        return SUFFIX[self.name]

    def build_steps(self, request: BuildRequest) -> int:
        """Progress steps of `build` for `request`, the fidelity check not counted."""
        return 1

    def missing(self) -> str | None:
        """Why this backend cannot run here (its modules are not installed), or None."""
        import importlib.util

        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"{', '.join(absent)} not installed ({self.install})" if absent else None

    def auto_precisions(self, device: str, dtype: str) -> list[str]:
        """The precisions of this backend that backend auto weighs on `device` when asked for
        `dtype` (auto: the precisions that may keep scores within 1e-3 of fp32), fastest first
        (engines/auto.py)."""
        return []

    def probe_runner(self, shapes, precision: str, device: str):
        """A callable running one layer's matrix products in this backend (engines/probe.py), or
        None: the backend is then taken to multiply as fast as eager PyTorch in `precision`."""
        return None

    def forms(self, request: BuildRequest) -> list[str | None]:
        """The ways to build `request`, fastest first: the builder keeps the first whose engine
        passes the fidelity check (without a check, the last: the one closest to fp32)."""
        return [None]

    def default_device(self) -> str:
        """Where `rali-edge build` builds when given no --device."""
        return "cpu"

    def run_device(self, device: str | None) -> str:
        """Where an engine of this backend runs when the caller asks for `device` (None: the default)."""
        return device or "cpu"

    def default_precision(self, device: str) -> str:
        return "fp32"

    def check_request(self, request: BuildRequest) -> None:
        """Raise UsageError / MissingDependencyError before any work (an export takes minutes)."""

    def runtime(self, device: str):
        """The RuntimeInfo of this machine that the sidecar records and `compatibility` compares."""
        from rali_edge.engines.naming import RuntimeInfo

        return RuntimeInfo()

    def opset(self) -> int | None:
        """The ONNX opset the engine is made from, if it is made from ONNX."""
        return None

    def name_parts(self, runtime, opset: int | None) -> list[str]:
        """What the file name says about the machine and toolchain, between the model and the precision."""
        raise NotImplementedError

    def compatibility(self, built, here) -> tuple[list[str], list[str]]:
        """(problems that make the engine unusable here, warnings) from the two RuntimeInfos."""
        return [], []

    def rebuild_options(self, info) -> str:
        """Extra `rali-edge build` options that make this engine again (beyond precision, batch, head)."""
        return ""

    def build(self, load_model, path: Path, request: BuildRequest, info, progress, written: list[Path]) -> None:
        """Write the engine for the model that `load_model()` returns (a RaliModel, loaded afresh at
        each call: the backend holds it only while it needs it) at `path`, in `build_steps(request)` steps of
        `progress`; record extra files in `written` (removed when the build is interrupted) and
        what the build decided in `info` (the sidecar, written afterwards)."""
        raise NotImplementedError

    def open(self, path: Path, info, device: str):
        """The EncoderBackend the Scorer calls (pixels in; scores or class tokens out)."""
        raise NotImplementedError


def same_platform(built, here) -> list[str]:
    """Machine code runs only on the OS and CPU architecture that built it."""
    if built.cpu_arch != here.cpu_arch or built.platform != here.platform:
        return [f"it was built on {built.platform}/{built.cpu_arch}, this machine is {here.platform}/{here.cpu_arch}"]
    return []


def backend(name: str) -> Backend:
    """The backend called `name` (one of TARGETS)."""
    for entry in TABLE:
        if entry.name == name:
            return importlib.import_module(entry.module).BACKEND
    raise UsageError(f"unknown engine backend {name!r}; choose one of {', '.join(TARGETS)}")


def open_engine(name: str, path: str | Path, manifest, device: str | None = "cpu", model_ref: str | None = None):
    """Check the engine at `path` against `manifest` and this machine, then open it with backend
    `name`. Raises EngineMismatchError (what differs + the rebuild command) or MissingDependencyError.

        encoder = open_engine("aoti", "rali.aoti.torch2.13.cpu-x86_64.fp32.b1-16.pt2", manifest)
        Scorer(model, manifest, encoder=encoder)   # what rali_edge.load(..., backend="aoti") does
    """
    import sys

    from rali_edge.engines.naming import check_compatible, read_sidecar

    chosen = backend(name)
    info = read_sidecar(path)
    device = chosen.run_device(None if device is None else str(device))
    for warning in check_compatible(info, manifest.weights_sha256, chosen.runtime(device), backend=name,
                                    model_ref=model_ref or "<model folder>"):
        print(f"warning: {path}: {warning}", file=sys.stderr)
    size = manifest.encoder.image_size
    if tuple(info.image_size) != (size, size):
        raise EngineMismatchError(f"{path}: engine takes {tuple(info.image_size)} images, the model {size}x{size}")
    return chosen.open(Path(path), info, device)


__all__ = ["BACKENDS", "BACKEND_ENV", "Backend", "default_backend", "BuildRequest", "SUFFIX", "TABLE", "TARGETS", "TARGET_HELP", "backend",
           "open_engine", "same_platform"]
