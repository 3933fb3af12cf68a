"""Engines built on first use and kept: what `backend="auto"` (the default) runs.

    ~/.cache/rali-edge/engines/<model weights sha256, 16 hex>/<engine file name> (+ its .json sidecar)

`RALI_EDGE_CACHE` moves the folder. An entry is keyed on the model's weights (the folder), the
engine's file name (backend, precision, batch profile and, for TensorRT, GPU and versions:
engines/naming.py) and the `stamp` the cache adds to its sidecar (this machine's CPU or GPU and
the versions of rali-edge, torch, ONNX and ONNX Runtime or TensorRT that built and checked it).

An entry is used only when its sidecar matches the model, its stamp this machine, and its
fidelity check passed; a stale, foreign, half-written or corrupt entry is rebuilt, never trusted. An int8 build
that fails the fidelity check leaves a `.refused` note, so that the next run says so at once
instead of building again (`rali-edge cache clear` forgets it). Each entry has a lock file: two
processes starting at once build it once (the second waits, then uses it). Builds are written
under a temporary name and renamed into place, so no reader ever sees half an engine.

How `auto` chooses. The precision (dtype="auto", the default: `auto_dtype`): the fastest of
`fast_dtypes` (bf16 on CPUs with bf16 instructions, fp16 on GPUs) whose eager scores stay within
EXACT (1e-3) of fp32 on the fidelity images, measured once per model and machine and kept as a
verdict beside the engines; else fp32. The path for a precision (`choose`): on a CPU, fp32 runs
ONNX Runtime's engine (MLAS's fp32 GEMMs ran 1.7x MKL's on one 2-core Zen 5 and 1.3x on
another: bench/results/e2e-cpu.md; 0.85x on a Xeon with AMX, e2e-cpu-xeon-amx.md), unless the build's fidelity check timed it slower than eager
PyTorch fp32 on the same images (`slower_than_eager`); int8 is ONNX Runtime's too (its fastest form
that passes the fidelity check: engines/onnx.py); bf16 and fp16 run eager PyTorch (ONNX Runtime
has no bf16 CPU kernels; oneDNN uses AVX-512 BF16 or AMX where the CPU has them). On an NVIDIA
GPU, TensorRT when it is installed, else eager PyTorch with the fused Triton head.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rali_edge.engines.naming import DEFAULT_BATCH, BatchRange, cpu_model, engine_filename, read_sidecar, sidecar_path
from rali_edge.errors import FidelityCheckFailed, MissingDependencyError, PrecisionRefused, RaliEdgeError, UsageError

CACHE_ENV = "RALI_EDGE_CACHE"
OUTPUTS = "score"  # cached engines hold the head: one call per batch


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rali-edge" / "engines").expanduser()


def unwritable() -> str | None:
    """Why the cache folder cannot be written here (a read-only home in a container, a
    RALI_EDGE_CACHE that names a file), or None."""
    from rali_edge.results import why_not_writable

    reason = why_not_writable(cache_dir(), folder=True)
    return f"the engine cache {cache_dir()} cannot be written ({reason})" if reason else None


@dataclass(frozen=True)
class Choice:
    """What `auto` runs: `backend` ("torch" or an engine backend) at `precision` (an engine's
    precision, or the torch dtype), and why."""

    backend: str
    precision: str
    reason: str
    fallback: bool = False  # a faster path exists but is not installed: say so


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def choose(device: str, dtype: str) -> Choice:
    """The fastest path for `device` and `dtype` that this machine has (module doc)."""
    onnx_ok = _importable("onnxruntime", "onnx", "onnxscript")
    if str(device).startswith("cuda"):
        if dtype == "int8":
            raise UsageError("--dtype int8 runs on the CPU (ONNX Runtime); on a GPU use fp16 or bf16")
        if _importable("tensorrt"):
            return Choice("tensorrt", dtype, "TensorRT is installed")
        return Choice("torch", dtype, "TensorRT is not installed (pip install 'rali-edge[tensorrt]'), so PyTorch "
                                      "runs the encoder", fallback=True)
    if dtype == "int8":
        if not onnx_ok:
            raise MissingDependencyError("--dtype int8 needs ONNX Runtime: pip install onnx onnxruntime onnxscript")
        return Choice("onnx", "int8", "int8 runs on ONNX Runtime")
    if dtype != "fp32":
        return Choice("torch", dtype, f"ONNX Runtime has no {dtype} CPU kernels; PyTorch has")
    if onnx_ok:
        return Choice("onnx", "fp32", "ONNX Runtime's fp32 CPU kernels are the fastest measured")
    return Choice("torch", "fp32", "ONNX Runtime is not installed (pip install onnx onnxruntime onnxscript), "
                                   "so PyTorch runs the encoder (often slower)", fallback=True)


# dtype="auto" (the default): the fastest precision whose scores stay within EXACT of fp32 on the
# fidelity images, on this machine. fp32 paths differ from each other by ~1e-6 (summation order);
# 1e-3 of a 1..5 score is far below what anyone could see, and what bf16's 8-bit mantissa may cost.
EXACT = 1e-3


def fast_dtypes(device: str) -> list[str]:
    """The reduced precisions dtype="auto" tries before fp32 on `device`, fastest first: on a GPU
    fp16; on a CPU bf16 where it has bf16 instructions (AVX-512 BF16, AMX, Arm BF16; elsewhere
    oneDNN emulates bf16 and it is slower than fp32)."""
    from rali_edge.engines.naming import cpu_flags

    if str(device).startswith("cuda"):
        return ["fp16"]
    return ["bf16"] if cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"} else []


def auto_dtype(model_path: Path, manifest, device: str, progress=None) -> str:
    """The first of `fast_dtypes` that `keeps_scores`, else fp32."""
    return next((d for d in fast_dtypes(device) if keeps_scores(model_path, manifest, device, d, progress)), "fp32")


def keeps_scores(model_path: Path, manifest, device: str, dtype: str, progress=None) -> bool:
    """Whether eager PyTorch in `dtype` scores the fidelity images within EXACT of fp32 here:
    measured on first use, then remembered in the cache (a verdict beside the engines, trusted
    only while its `stamp` matches this machine)."""
    from rali_edge.engines import builder

    path = cache_dir() / manifest.weights_sha256[:16] / f"auto.{str(device).replace(':', '')}.{dtype}.verdict.json"
    here = stamp("torch", device)
    with _locked(path):
        verdict = _read_json(path)
        if verdict and verdict.get("cache") == here:
            return verdict["fidelity"]["passed"]
        progress = progress or builder.Progress()
        progress.note(f"first use of {manifest.name} here: does {dtype} keep its scores within {EXACT} of fp32? "
                      f"Measured once on the fidelity images (seconds for small models, a minute or two for ViT-L)")
        with progress.step(f"{dtype} against fp32 PyTorch"):
            report = _compare_dtype(model_path, device, dtype)
        progress.note(f"{dtype}: {report.summary()}; auto runs {dtype if report.passed else 'fp32'}")
        path.write_text(json.dumps({"dtype": dtype, "fidelity": report.to_dict(), "cache": here}, indent=2))
    return report.passed


def _compare_dtype(model_path: Path, device: str, dtype: str):
    from rali_edge.engines.fidelity import compare, exact_fp32, fidelity_images, score_files
    from rali_edge.model_file import load_model
    from rali_edge.scoring import Scorer

    images = fidelity_images(None)
    model, manifest = load_model(model_path)
    with exact_fp32():
        reference, _ = score_files(Scorer(model, manifest, device=device, dtype="fp32", head="torch"), images, 8)
    fast, skipped = score_files(Scorer(model, manifest, device=device, dtype=dtype, head="torch"), images, 8)
    return compare(reference, fast, EXACT, f"fp32 PyTorch on {device}", skipped)


SPEED_MARGIN = 1.1


def slower_than_eager(engine: Path) -> str | None:
    """Why an fp32 engine should not run, when its build's fidelity check found it slower than
    eager PyTorch fp32 on the same images (both timed there, decoding included): the table in
    `choose` is a guess about a CPU family, this is a measurement on this machine. None when the
    engine was faster, is another precision, or has no timings (older sidecars)."""
    from rali_edge.engines.naming import read_sidecar

    info = read_sidecar(engine)
    fidelity = info.fidelity or {}
    engine_s, reference_s = fidelity.get("engine_s"), fidelity.get("reference_s")
    # One pass of each, the engine's first: within SPEED_MARGIN the engine stays (a tie is noise).
    if info.precision != "fp32" or not engine_s or not reference_s or engine_s <= SPEED_MARGIN * reference_s:
        return None
    return (f"its {info.target} fp32 engine scored the fidelity images slower than eager PyTorch fp32 here "
            f"({engine_s:.2f} s against {reference_s:.2f} s, measured when it was built)")


def entry_path(manifest, choice: Choice, device: str, batch: BatchRange | None = None) -> Path:
    """Where the cache keeps the engine of `choice` for this model on this machine."""
    from rali_edge.engines.backends import backend

    chosen = backend(choice.backend)
    batch = batch or BatchRange.parse(DEFAULT_BATCH)
    name = engine_filename(manifest.name, choice.backend, choice.precision, batch, OUTPUTS,
                           chosen.runtime(chosen.run_device(device)), chosen.opset())
    return cache_dir() / manifest.weights_sha256[:16] / name


def _refusal(path: Path) -> Path:
    return path.with_name(path.name + ".refused")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def stamp(backend_name: str, device: str) -> dict:
    """What a cached engine's build depended on beyond its sidecar's portability rules: this
    machine's processor and the versions of everything that exported, quantized and checked it.
    An ONNX file is portable, but its fidelity check (and int8's choice of 7- or 8-bit weights)
    held on the CPU and ONNX Runtime that ran it, so the cache trusts it only there."""
    from importlib.metadata import PackageNotFoundError, version

    from rali_edge.engines.backends import backend

    versions = {}
    for package in ("rali-edge", "torch", "onnx", "onnxruntime", "tensorrt"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    if backend_name == "torch":  # eager PyTorch: the device it runs on
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None
        runtime = {"device": str(device), "gpu": gpu}
    else:
        chosen = backend(backend_name)
        runtime = chosen.runtime(chosen.run_device(device)).to_dict()
    return {"runtime": runtime, "cpu": cpu_model(), "versions": versions}


def usable(path: Path, manifest, backend_name: str, device: str) -> bool:
    """The entry at `path` is complete, for this model, was built on this machine with these
    versions (`stamp`), and passed its fidelity check."""
    from rali_edge.engines.backends import backend
    from rali_edge.engines.naming import check_compatible

    try:
        info = read_sidecar(path)
        if not path.is_file() or path.stat().st_size == 0 or not (info.fidelity or {}).get("passed"):
            return False
        if json.loads(sidecar_path(path).read_text()).get("cache") != stamp(backend_name, device):
            return False
        chosen = backend(backend_name)
        check_compatible(info, manifest.weights_sha256, chosen.runtime(chosen.run_device(device)), backend=backend_name)
    except RaliEdgeError:  # no sidecar, an unreadable one, or another machine's or model's engine
        return False
    return True


def evict(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)


def cached_engine(model_path: Path, manifest, choice: Choice, device: str, progress=None) -> Path:
    """The cached engine of `choice` for this model on this machine, built (and fidelity-checked)
    first if there is none that can be trusted. Raises FidelityCheckFailed when the build moves
    scores by more than the fidelity limit (PrecisionRefused for int8, and remembers it: module doc)."""
    from rali_edge.engines import builder

    path = entry_path(manifest, choice, device)
    with _locked(path):
        if usable(path, manifest, choice.backend, device):
            return path
        here = stamp(choice.backend, device)
        refused = _refusal(path)
        note = _read_json(refused)
        if note and note.get("cache") == here:
            raise PrecisionRefused(f"{note['message']} (remembered in {refused}; `rali-edge cache clear` forgets it)")
        evict(path)
        progress = progress or builder.Progress()
        progress.note(f"first use of {manifest.name} here: building its {choice.backend} {choice.precision} engine "
                      f"({choice.reason}); seconds for small models, minutes for ViT-L. Cached in {path.parent}")
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
        try:  # the staging folder goes however this ends: an engine leaves it only once checked
            try:
                built = builder.build(model_path, choice.backend, precision=choice.precision,
                                      output=staging / path.name, device=device, progress=progress)
            except FidelityCheckFailed as e:
                if choice.precision != "int8":
                    raise
                message = (f"{manifest.name} int8 moves its scores too far on this CPU ({e.short}); "
                           f"use --dtype fp32, or build one with your own limit and pass it as --engine: "
                           f"rali-edge build {model_path} --target onnx --precision int8 --max-score-diff X")
                refused.write_text(json.dumps({"message": message, "cache": here}))
                raise PrecisionRefused(message) from None
            sidecar = sidecar_path(built.engine)
            sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "cache": here}, indent=2))
            os.replace(built.engine, path)  # the engine first: a sidecar always names a whole engine
            os.replace(sidecar, sidecar_path(path))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none, or unreadable: build (and check) again
        return None


@dataclass
class Entry:
    path: Path
    size: int
    info: dict | None  # an engine's sidecar, a refusal's note or a verdict; None when unreadable
    kind: str = "engine"  # "engine", "refused" (int8 failed its check) or "verdict" (dtype="auto"'s measurement)


def entries() -> list[Entry]:
    """Every engine, refusal note and verdict in the cache."""
    found = []
    for path in sorted(cache_dir().glob("*/*")):
        if path.name.endswith(".refused"):
            found.append(Entry(path, path.stat().st_size, _read_json(path), "refused"))
        elif path.name.endswith(".verdict.json"):
            found.append(Entry(path, path.stat().st_size, _read_json(path), "verdict"))
        elif sidecar_path(path).is_file() and path.is_file():
            found.append(Entry(path, path.stat().st_size + sidecar_path(path).stat().st_size, _read_json(sidecar_path(path))))
    return found


def clear() -> tuple[int, int]:
    """Remove the cache folder; (files removed, bytes freed)."""
    root = cache_dir()
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    freed = sum(p.stat().st_size for p in files)
    shutil.rmtree(root, ignore_errors=True)
    return len(files), freed


__all__ = ["CACHE_ENV", "EXACT", "Choice", "Entry", "auto_dtype", "cache_dir", "cached_engine", "choose", "clear",
           "entries", "entry_path", "evict", "fast_dtypes", "keeps_scores", "stamp", "usable"]
