"""backend="auto" (the default): what runs, decided by what this machine measures.

    verdict = decide(model_folder, manifest, "cpu", "auto")   # kept in the engine cache
    verdict.choice                                            # -> ("onnx", "fp32"), say

The candidates (`candidates`): eager PyTorch fp32, the reference, and the ways that might beat it
on the device: on a CPU eager bf16 and ONNX Runtime's fp32 engine; on a GPU TensorRT (fp16, fp32)
and eager fp16. A named precision narrows them: --dtype fp32 weighs eager PyTorch against the
fp32 engine; --dtype bf16, fp16 or int8 has one candidate, which runs as asked.

Against the reference, a candidate runs only when it is measured both faster and as exact:

1. The probe (engines/probe.py, seconds): one layer's matrix products at the model's own sizes
   in each runtime. A candidate the probe does not find MARGIN faster than the reference is
   dropped, with nothing built: on a CPU where nothing beats eager fp32, the first use of a
   ViT-L costs the probe and no more.
2. The trial, fastest first by the probe: its scores on the fidelity images (the bundled
   samples) within EXACT of the reference's, and its file-to-score time on them MARGIN below the
   reference's (both warm). An engine is built into the cache for its trial, and the build's
   fidelity check is the trial; an eager precision stops at the first image that moves too far.
3. The first candidate that passes its trial runs; when none does, eager PyTorch fp32.

The verdict (the probe's times, each trial's numbers, the choice) is kept in the cache beside the
model's engines, keyed by the model's weights, the device, the dtype asked for and `cache.stamp`
(this CPU or GPU and the versions of torch, ONNX Runtime, TensorRT and rali-edge): a new
version or another machine measures again. `rali-edge build --target auto` tries every
candidate and prints them all.

MARGIN is 1.1: on the shared 2-core machines this was written on, one product's timing moved by
up to 10% between repeats, so a smaller margin would let noise choose; and an engine that gains
less than that does not repay its first-use build (a minute for ViT-L) and its disk.
EXACT (1e-3 of a score on the 1..5 scale) is far below what anyone could see: fp32 paths differ
by ~1e-6 (summation order); bf16's 8-bit mantissa usually moves scores further.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rali_edge.engines import cache
from rali_edge.engines.backends import TABLE, backend
from rali_edge.errors import FidelityCheckFailed, MissingDependencyError, UsageError

MARGIN = 1.1
EXACT = 1e-3
REFERENCE = ("torch", "fp32")


@dataclass
class Candidate:
    """One way to run the encoder here, and what was measured of it."""

    backend: str  # "torch" (eager) or an engine backend
    precision: str
    probe_s: float | None = None  # the probe: seconds for one layer's matrix products
    speedup: float | None = None  # the trial: the reference's time on the fidelity images / this one's
    max_abs_diff: float | None = None  # the trial: largest |score difference| from the reference
    passed: bool | None = None  # the trial's verdict (None: not tried)
    note: str = ""  # why it was not tried, or what its trial found

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def key(self) -> tuple[str, str]:
        return self.backend, self.precision


@dataclass
class Verdict:
    candidates: list[Candidate]
    choice: tuple[str, str]
    measured: bool = True  # False: one candidate, run as asked without measuring
    stamp: dict = field(default_factory=dict)

    def candidate(self, key: tuple[str, str]) -> Candidate | None:
        return next((c for c in self.candidates if c.key == key), None)

    def probe_speedup(self, c: Candidate) -> float | None:
        reference = self.candidate(REFERENCE)
        if reference is None or not reference.probe_s or not c.probe_s:
            return None
        return reference.probe_s / c.probe_s

    def summary(self) -> str:
        """One line: what runs, and why."""
        backend, precision = self.choice
        if not self.measured:
            return f"auto runs {backend} {precision}, as asked"
        chosen = self.candidate(self.choice)
        if self.choice == REFERENCE:
            return f"auto runs eager PyTorch fp32: nothing measured faster here by {MARGIN}x with scores within {EXACT}"
        return (f"auto runs {backend} {precision}: {chosen.speedup:.2f}x eager PyTorch fp32 here, scores within "
                f"{chosen.max_abs_diff:.1e}")

    def table(self) -> list[str]:
        """The candidates, one line each, for `build --target auto`, `profile` and `cache list`."""
        lines = [f"{'candidate':<15} {'probe':>7} {'measured':>9} {'max |diff|':>11}  verdict"]
        for c in self.candidates:
            probe = self.probe_speedup(c)
            mark = "  <- auto" if c.key == self.choice else ""
            lines.append(f"{c.name:<15} {_x(probe):>7} {_x(c.speedup):>9} "
                         f"{'-' if c.max_abs_diff is None else f'{c.max_abs_diff:.4f}':>11}  {c.note}{mark}")
        return lines

    def to_dict(self) -> dict:
        return {"candidates": [asdict(c) for c in self.candidates], "choice": list(self.choice),
                "measured": self.measured, "cache": self.stamp}

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        return cls([Candidate(**c) for c in d["candidates"]], tuple(d["choice"]), d.get("measured", True),
                   d.get("cache", {}))


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


# The reduced precisions eager PyTorch offers auto, by device type (bf16 on CPUs: oneDNN's AVX-512
# BF16 or AMX kernels where the CPU has them; fp16 on GPUs: tensor cores).
EAGER_REDUCED = {"cpu": "bf16", "cuda": "fp16"}


def _missing(name: str) -> str | None:
    return None if name == "torch" else backend(name).missing()


def candidates(device: str, dtype: str) -> list[Candidate]:
    """The ways to run `dtype` on `device` that auto weighs, the reference first (module doc).
    A named reduced precision (bf16, fp16, int8) is one candidate: an engine of a backend that
    offers it and is installed, else eager PyTorch."""
    engines = [Candidate(e.name, p) for e in TABLE for p in backend(e.name).auto_precisions(device, dtype)]
    if dtype in ("auto", "fp32"):
        eager = [Candidate("torch", EAGER_REDUCED[torch_device_type(device)])] if dtype == "auto" else []
        # Reduced precisions before fp32, engines before eager PyTorch: a tie on the probe goes first.
        return [Candidate(*REFERENCE)] + sorted(engines + eager, key=lambda c: c.precision == "fp32")
    installed = [c for c in engines if not _missing(c.backend)]
    if installed:
        return installed[:1]
    if dtype != "int8":  # eager PyTorch runs bf16 and fp16 on any device
        return [Candidate("torch", dtype)]
    if engines:
        raise MissingDependencyError(f"--dtype int8 needs ONNX Runtime: {_missing(engines[0].backend)}")
    raise UsageError("--dtype int8 runs on the CPU (ONNX Runtime); on a GPU use fp16 or bf16")


def torch_device_type(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def decide(model_path: Path, manifest, device: str, dtype: str, progress=None, try_all: bool = False) -> Verdict:
    """What auto runs for this model, device and dtype: the verdict kept in the cache, or measured
    now and kept (module doc). `try_all`: measure every candidate again, each with its trial
    (`rali-edge build --target auto`)."""
    path = cache.cache_dir() / manifest.weights_sha256[:16] / f"auto.{str(device).replace(':', '')}.{dtype}.json"
    here = cache.stamp("torch", device)
    with cache.locked(path):
        kept = _read(path)
        if kept is not None and kept.stamp == here and not try_all:
            return kept
        if progress is None:
            from rali_edge.engines.progress import Progress

            progress = Progress()
        verdict = _measure(model_path, manifest, device, dtype, progress, try_all)
        verdict.stamp = here
        path.write_text(json.dumps(verdict.to_dict(), indent=2))
    return verdict


def _read(path: Path) -> Verdict | None:
    try:
        return Verdict.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: measured again
        return None


def _measure(model_path: Path, manifest, device: str, dtype: str, progress, try_all: bool) -> Verdict:
    found = candidates(device, dtype)
    if found[0].key != REFERENCE:
        return Verdict(found, found[0].key, measured=False)
    reference, others = found[0], found[1:]
    for c in others:
        c.note = _missing(c.backend) or ""
    runnable = [c for c in others if not c.note]
    progress.note(f"first use of {manifest.name} here: measuring which way to run it is fastest "
                  f"({', '.join(c.name for c in found)}; seconds, then kept)")
    with progress.step("speed probe: one layer's matrix products in each runtime"):
        _probe(manifest, device, [reference, *runnable])
    verdict = Verdict(found, REFERENCE)
    ranked = sorted(runnable, key=lambda c: c.probe_s or float("inf"))
    for c in ranked:
        speedup = verdict.probe_speedup(c)
        if not try_all and (speedup is None or speedup < MARGIN):
            c.note = f"probe {_x(speedup)}: not tried (needs {MARGIN}x)"
            continue
        if not try_all and verdict.choice != REFERENCE:
            c.note = "not tried: a faster candidate passed"
            continue
        _trial(model_path, manifest, device, c, progress)
        if c.passed and verdict.choice == REFERENCE:
            verdict.choice = c.key
    for c in runnable:  # engines built for a trial they lost free their disk
        if c.backend != "torch" and c.key != verdict.choice and c.passed is not None:
            entry = cache.entry_path(manifest, c.backend, c.precision, device)
            with cache.locked(entry):
                cache.evict(entry)
    reference.note = "reference"
    progress.note(verdict.summary())
    if verdict.choice[0] != "torch":
        progress.note(f"engine: {cache.entry_path(manifest, *verdict.choice, device)}")
    return verdict


def _probe(manifest, device: str, found: list[Candidate]) -> None:
    from rali_edge.engines import probe

    shapes = probe.Shapes.of(manifest.encoder)
    runners = {}
    for c in found:
        own = None if c.backend == "torch" else backend(c.backend).probe_runner(shapes, c.precision, device)
        if own is not None:
            runners[c.key] = own
        else:  # eager PyTorch, and the engines taken to multiply as fast as it does in their precision
            runners.setdefault(("torch", c.precision), probe.torch_runner(shapes, c.precision, device))
    times = probe.probe(runners)
    for c in found:
        c.probe_s = times.get(c.key, times.get(("torch", c.precision)))


def _trial(model_path: Path, manifest, device: str, c: Candidate, progress) -> None:
    """Accuracy within EXACT and speed MARGIN above the reference, on the fidelity images."""
    from rali_edge.engines.fidelity import compare_eager

    try:
        if c.backend == "torch":
            with progress.step(f"{c.name} against eager fp32 on the fidelity images"):
                report = compare_eager(model_path, device, c.precision, EXACT)
        else:
            engine = cache.cached_engine(model_path, manifest, c.backend, c.precision, device, progress,
                                         max_score_diff=EXACT, announce=False)
            from rali_edge.engines.naming import read_sidecar

            report = _report(read_sidecar(engine).fidelity)
    except FidelityCheckFailed as e:
        c.passed, c.note = False, f"scores move too far ({e.short})"
        return
    except Exception as e:  # noqa: BLE001 - a build or a device that fails: this candidate loses, eager fp32 runs
        c.passed, c.note = False, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return
    c.max_abs_diff = report.max_abs_diff
    c.speedup = report.reference_s / report.engine_s if report.engine_s and report.reference_s else None
    if not report.passed:
        c.passed, c.note = False, f"scores move {report.max_abs_diff:.4f} (limit {EXACT})"
    elif c.speedup is None or c.speedup < MARGIN:
        c.passed, c.note = False, f"{_x(c.speedup)} on the fidelity images (needs {MARGIN}x)"
    else:
        c.passed, c.note = True, "faster and as exact"


def _report(fidelity: dict):
    from rali_edge.engines.fidelity import FidelityReport

    return FidelityReport(**fidelity)


def resolve(model_path: Path, manifest, device: str, dtype: str, use_cache: bool = True, progress=None):
    """(backend, precision, engine file or None, the Verdict or None with no cache) that auto runs
    for this model here."""
    unwritable = use_cache and cache.unwritable()
    if unwritable:  # as --no-cache: auto still runs, on what needs no engine
        if progress is None:
            from rali_edge.engines.progress import Progress

            progress = Progress()
        progress.note(f"note: {unwritable}; running as --no-cache does (set {cache.CACHE_ENV} to a writable folder)")
        use_cache = False
    if not use_cache:
        if dtype == "int8":
            raise UsageError(f"--dtype {dtype} needs an engine, and --no-cache turns the engine cache off; build one: "
                             f"rali-edge build MODEL --target onnx --precision {dtype}")
        return "torch", "fp32" if dtype == "auto" else dtype, None, None
    verdict = decide(model_path, manifest, device, dtype, progress)
    backend, precision = verdict.choice
    # An engine auto chose passed its trial at EXACT: gone since (a cache cleared by hand), it is
    # built and checked at EXACT again; one run as asked (int8) at the build's own limit.
    limit = EXACT if verdict.measured else None
    engine = None if backend == "torch" else cache.cached_engine(model_path, manifest, backend, precision, device,
                                                                 progress, max_score_diff=limit)
    return backend, precision, engine, verdict


__all__ = ["EXACT", "MARGIN", "Candidate", "Verdict", "candidates", "decide", "resolve"]
