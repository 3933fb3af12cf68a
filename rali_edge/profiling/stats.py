"""Latency statistics, throughput, stage timers and peak memory for `rali-edge profile`.

Units: latencies are milliseconds everywhere in this module; memory is bytes.

Percentiles use linear interpolation between closest ranks, which is numpy's default
(`np.percentile(..., method="linear")`, "type 7" in Hyndman & Fan): for n sorted samples
x[0..n-1], percentile q sits at rank r = q/100 * (n-1) and is x[floor r] + (r - floor r) *
(x[ceil r] - x[floor r]). We implement it here (not via numpy) so the method is explicit
and reports say exactly what p99 means.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation, as numpy's default."""
    if len(values) == 0:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    rank = q / 100.0 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (rank - lo) * (xs[hi] - xs[lo])


@dataclass(frozen=True)
class LatencySummary:
    """Summary of per-call latencies of one stage, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_latencies(latencies_ms: Sequence[float]) -> LatencySummary:
    """mean, p50, p90, p99, min and max of latencies (ms). Needs at least one sample."""
    if len(latencies_ms) == 0:
        raise ValueError("no latencies to summarise: run at least one timed iteration")
    xs = [float(v) for v in latencies_ms]
    return LatencySummary(
        count=len(xs),
        mean_ms=math.fsum(xs) / len(xs),
        p50_ms=percentile(xs, 50),
        p90_ms=percentile(xs, 90),
        p99_ms=percentile(xs, 99),
        min_ms=min(xs),
        max_ms=max(xs),
    )


def throughput(batch_size: int, latencies_ms: Sequence[float]) -> float:
    """Images per second: all images processed divided by all time spent.

    This is batch_size / mean latency, i.e. a time-weighted rate; it is NOT the mean of
    per-batch rates (that average overweights fast outliers)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(latencies_ms) == 0:
        raise ValueError("no latencies: run at least one timed iteration")
    total_s = math.fsum(float(v) for v in latencies_ms) / 1000.0
    if total_s <= 0.0:
        raise ValueError("total latency is zero; the clock did not advance")
    return batch_size * len(latencies_ms) / total_s


# ---------------------------------------------------------------- timers


def is_cuda_device(device) -> bool:
    """True for "cuda", "cuda:1", torch.device("cuda", 0); False for None, "cpu", ...

    Avoids importing torch unless the caller already talks about a torch.device."""
    if device is None:
        return False
    if isinstance(device, str):
        return device.split(":", 1)[0].strip().lower() == "cuda"
    return getattr(device, "type", None) == "cuda"


class Timer:
    """Times one interval: `with Timer(device) as t: ...` then `t.elapsed_ms`.

    On a CUDA device it records two CUDA events on the current stream: GPU work is
    asynchronous, so host clocks would measure only the kernel launches. Reading
    `elapsed_ms` waits for the end event, so many timers can be queued during a run and
    read afterwards without adding a synchronisation per iteration. Note that events time
    the *stream*: host-only work (JPEG decode) between them is seen only as stream idle
    time; time such stages with `use_cuda=False`.

    On a CPU it uses a monotonic high-resolution clock (time.perf_counter by default)."""

    def __init__(self, device=None, *, use_cuda: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.device = device
        self.use_cuda = is_cuda_device(device) if use_cuda is None else use_cuda
        self.clock = clock
        self._start = None
        self._end = None
        self._elapsed_ms: float | None = None

    def __enter__(self) -> "Timer":
        if self.use_cuda:
            import torch

            stream = torch.cuda.current_stream(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(stream)
        else:
            self._start = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        if self.use_cuda:
            import torch

            self._end.record(torch.cuda.current_stream(self.device))
        else:
            self._end = self.clock()

    @property
    def elapsed_ms(self) -> float:
        if self._elapsed_ms is None:
            if self._start is None or self._end is None:
                raise RuntimeError("Timer read before its interval ended")
            if self.use_cuda:
                self._end.synchronize()  # the end event must have happened on the GPU
                self._elapsed_ms = float(self._start.elapsed_time(self._end))
            else:
                self._elapsed_ms = (self._end - self._start) * 1000.0
        return self._elapsed_ms


class StageTimer:
    """Collects named intervals (decode, preprocess, encoder, head, total) over many iterations.

        timer = StageTimer("cuda")
        for batch in batches:
            with timer.stage("total"):
                with timer.stage("decode", use_cuda=False): ...
                with timer.stage("encoder"): ...
        timer.summary()  # {"total": LatencySummary, "decode": ..., "encoder": ...}

    Stages nest freely. Call reset() after warm-up so warm-up iterations are not counted."""

    def __init__(self, device=None, *, clock: Callable[[], float] = time.perf_counter):
        self.device = device
        self.clock = clock
        self._timers: dict[str, list[Timer]] = {}
        self._extra_ms: dict[str, list[float]] = {}

    @contextmanager
    def stage(self, name: str, *, use_cuda: bool | None = None) -> Iterator[Timer]:
        timer = Timer(self.device, use_cuda=use_cuda, clock=self.clock)
        self._timers.setdefault(name, []).append(timer)
        with timer:
            yield timer

    def add(self, name: str, elapsed_ms: float) -> None:
        """Record a latency measured elsewhere (e.g. reported by an engine)."""
        self._extra_ms.setdefault(name, []).append(float(elapsed_ms))

    def reset(self) -> None:
        self._timers.clear()
        self._extra_ms.clear()

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys([*self._timers, *self._extra_ms]))

    def times_ms(self) -> dict[str, list[float]]:
        """Latencies per stage in recording order (waits for pending CUDA events)."""
        out: dict[str, list[float]] = {}
        for name in self.stages:
            out[name] = [t.elapsed_ms for t in self._timers.get(name, [])]
            out[name] += self._extra_ms.get(name, [])
        return out

    def summary(self) -> dict[str, LatencySummary]:
        return {name: summarize_latencies(ms) for name, ms in self.times_ms().items() if ms}


# ---------------------------------------------------------------- memory


def _vm_hwm_bytes() -> int | None:
    """Peak resident set size from /proc/self/status (Linux); resettable, unlike ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    return int(value) * 1024 if unit.lower() == "kb" else int(value)
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_host_rss_bytes() -> int | None:
    """Peak resident memory of this process in bytes, or None where the OS does not say.

    Linux: VmHWM (reset by reset_peak_host_rss()); elsewhere getrusage's ru_maxrss, which
    is kilobytes on Linux but bytes on macOS, and covers the whole process lifetime.
    On Jetson the GPU shares this memory, but CUDA allocations do not always show in RSS:
    report GPU memory separately."""
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    try:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def reset_peak_host_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`),
    so each batch size gets its own peak. Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gpu_peak_memory_bytes(device=None) -> int | None:
    """Peak bytes held by torch's CUDA caching allocator on `device` since the last reset,
    or None without CUDA. Memory that TensorRT or cuDNN workspaces allocate outside torch
    is not included."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_gpu_peak_memory(device=None) -> None:
    """Start a new peak-memory window on `device` (no-op without CUDA)."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
