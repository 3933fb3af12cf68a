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

What runs by default, and so which entries exist, is decided in engines/auto.py; its verdicts
(`auto.<device>.<dtype>.json`) live here too, beside the model's engines.
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
from rali_edge.errors import FidelityCheckFailed, PrecisionRefused, RaliEdgeError

CACHE_ENV = "RALI_EDGE_CACHE"
OUTPUTS = "score"  # cached engines hold the head: one call per batch


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rali-edge" / "engines").expanduser()


def unwritable() -> str | None:
    """Why the cache folder cannot be written here (a read-only home in a container, a
    RALI_EDGE_CACHE that names a file), or None."""
    from rali_edge.outputs import why_not_writable

    reason = why_not_writable(cache_dir(), folder=True)
    return f"the engine cache {cache_dir()} cannot be written ({reason})" if reason else None


def entry_path(manifest, backend_name: str, precision: str, device: str, batch: BatchRange | None = None) -> Path:
    """Where the cache keeps the `backend_name` `precision` engine of this model on this machine."""
    from rali_edge.engines.backends import backend

    chosen = backend(backend_name)
    batch = batch or BatchRange.parse(DEFAULT_BATCH)
    name = engine_filename(manifest.name, backend_name, precision, batch, OUTPUTS,
                           chosen.runtime(chosen.run_device(device)), chosen.opset())
    return cache_dir() / manifest.weights_sha256[:16] / name


def _refusal(path: Path) -> Path:
    return path.with_name(path.name + ".refused")


@contextmanager
def locked(path: Path):
    """Hold `path`'s lock file: one process at a time builds an entry or measures a verdict."""
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


def usable(path: Path, manifest, backend_name: str, device: str, max_score_diff: float) -> bool:
    """The entry at `path` is complete, for this model, was built on this machine with these
    versions (`stamp`), and passed its fidelity check at `max_score_diff` or tighter."""
    from rali_edge.engines.backends import backend
    from rali_edge.engines.naming import check_compatible

    try:
        info = read_sidecar(path)
        fidelity = info.fidelity or {}
        if not path.is_file() or path.stat().st_size == 0 or not fidelity.get("passed"):
            return False
        if fidelity.get("max_abs_diff", float("inf")) > max_score_diff:
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


def cached_engine(model_path: Path, manifest, backend_name: str, precision: str, device: str, progress=None,
                  max_score_diff: float | None = None, announce: bool = True) -> Path:
    """The cached `backend_name` `precision` engine of this model on this machine, built (and
    fidelity-checked, at `max_score_diff`, default the build's) first if there is none that can
    be trusted. Raises FidelityCheckFailed when the build moves scores by more than that; an int8
    build at the default limit is then refused, and remembered (PrecisionRefused: module doc).
    `announce`: say where the engine is once it is there (not for a trial that may delete it)."""
    from rali_edge.engines.fidelity import DEFAULT_MAX_SCORE_DIFF

    path = entry_path(manifest, backend_name, precision, device)
    limit = DEFAULT_MAX_SCORE_DIFF if max_score_diff is None else max_score_diff
    with locked(path):
        if usable(path, manifest, backend_name, device, limit):
            return path
        here = stamp(backend_name, device)
        refused = _refusal(path)
        note = _read_json(refused)
        if note and note.get("cache") == here:
            raise PrecisionRefused(f"{note['message']} (remembered in {refused}; `rali-edge cache clear` forgets it)")
        evict(path)
        from rali_edge.engines import builder  # only to build: a hit imports no builder

        progress = progress or builder.Progress()
        progress.note(f"first use of {manifest.name} here: building its {backend_name} {precision} engine, then "
                      f"checking it on the fidelity images; seconds for small models, minutes for ViT-L. "
                      f"Cached in {path.parent}")
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
        try:  # the staging folder goes however this ends: an engine leaves it only once checked
            try:
                built = builder.build(model_path, backend_name, precision=precision, output=staging / path.name,
                                      device=device, progress=progress, max_score_diff=limit, announce=False)
            except FidelityCheckFailed as e:
                if precision != "int8" or max_score_diff is not None:
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
        if announce:
            progress.note(f"engine: {path}")
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
    kind: str = "engine"  # "engine", "refused" (int8 failed its check) or "verdict" (auto's measurements: auto.py)


def entries() -> list[Entry]:
    """Every engine, refusal note and verdict in the cache."""
    found = []
    for path in sorted(cache_dir().glob("*/*")):
        if path.name.endswith(".refused"):
            found.append(Entry(path, path.stat().st_size, _read_json(path), "refused"))
        elif path.name.startswith("auto.") and path.suffix == ".json":
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


__all__ = ["CACHE_ENV", "Entry", "cache_dir", "cached_engine", "clear", "entries", "entry_path", "evict", "locked", "stamp",
           "unwritable", "usable"]
