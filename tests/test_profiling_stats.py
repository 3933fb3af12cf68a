"""Latency maths, throughput, stage timers and peak memory (rali_edge.profiling.stats)."""

import numpy as np
import pytest
import torch

from rali_edge.profiling import stats
from rali_edge.profiling.stats import (
    StageTimer,
    Timer,
    percentile,
    summarize_latencies,
    throughput,
)


class FakeClock:
    """A clock that returns whatever the test sets; seconds."""

    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


# ---------------------------------------------------------------- percentiles

KNOWN_INPUTS = [
    [7.0],
    [1.0, 2.0],
    [4.0, 1.0, 3.0, 2.0],
    [5.0, 5.0, 5.0, 1.0, 9.0],
    list(np.random.default_rng(0).lognormal(mean=2.0, sigma=0.6, size=257)),
    list(np.random.default_rng(1).uniform(0.5, 80.0, size=1000)),
]


@pytest.mark.parametrize("values", KNOWN_INPUTS)
@pytest.mark.parametrize("q", [0, 1, 37.5, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(values, q):
    # numpy's default method is "linear"; the same arithmetic on float64 agrees to rounding.
    expected = np.percentile(np.asarray(values, dtype=np.float64), q, method="linear")
    assert percentile(values, q) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_percentile_by_hand():
    # Sorted [1, 2, 3, 4]; p90 rank = 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3) = 3.7. 0.9 * 3 is not
    # exact in binary, so compare to 1e-12 (a few ulps); the other ranks are exact.
    assert percentile([4, 3, 2, 1], 90) == pytest.approx(3.7, abs=1e-12)
    assert percentile([4, 3, 2, 1], 50) == 2.5
    assert percentile([4, 3, 2, 1], 0) == 1.0
    assert percentile([4, 3, 2, 1], 100) == 4.0


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_on_known_latencies():
    s = summarize_latencies([50.0, 10.0, 40.0, 20.0, 30.0])
    # rank for p90 = 0.9 * 4 = 3.6 -> 40 + 0.6 * 10 = 46; p99 rank 3.96 -> 49.6.
    assert s.count == 5
    assert s.mean_ms == 30.0
    assert s.p50_ms == 30.0
    assert s.p90_ms == pytest.approx(46.0, abs=1e-12)
    assert s.p99_ms == pytest.approx(49.6, abs=1e-12)
    assert (s.min_ms, s.max_ms) == (10.0, 50.0)
    assert s.to_dict()["p99_ms"] == s.p99_ms


def test_summary_matches_numpy_on_random_latencies():
    x = np.random.default_rng(2).gamma(2.0, 3.0, size=501)
    s = summarize_latencies(list(x))
    # fsum vs numpy's pairwise sum: equal to ~1e-15 relative.
    assert s.mean_ms == pytest.approx(float(x.mean()), rel=1e-12)
    for q, got in ((50, s.p50_ms), (90, s.p90_ms), (99, s.p99_ms)):
        assert got == pytest.approx(float(np.percentile(x, q)), rel=1e-12)
    assert s.min_ms == x.min() and s.max_ms == x.max()


def test_summary_needs_samples():
    with pytest.raises(ValueError):
        summarize_latencies([])


# ---------------------------------------------------------------- throughput


def test_throughput_known_values():
    # 3 batches of 8 images in 0.1 + 0.1 + 0.2 s = 24 images / 0.4 s = 60 images/s.
    assert throughput(8, [100.0, 100.0, 200.0]) == pytest.approx(60.0, rel=1e-12)
    # It is batch / mean latency, not the mean of per-batch rates (80, 80, 40 -> 66.7).
    lat = [100.0, 100.0, 200.0]
    assert throughput(8, lat) == pytest.approx(8 / (np.mean(lat) / 1000.0), rel=1e-12)
    assert throughput(8, lat) != pytest.approx(np.mean([8 / (v / 1000.0) for v in lat]))
    assert throughput(1, [4.0]) == pytest.approx(250.0, rel=1e-12)


def test_throughput_rejects_bad_input():
    with pytest.raises(ValueError):
        throughput(0, [1.0])
    with pytest.raises(ValueError):
        throughput(4, [])
    with pytest.raises(ValueError):
        throughput(4, [0.0, 0.0])


# ---------------------------------------------------------------- timers


@pytest.mark.parametrize("device,expected", [
    (None, False), ("cpu", False), ("cuda", True), ("cuda:1", True), ("CUDA:0", True),
    (torch.device("cpu"), False), (torch.device("cuda", 0), True), ("meta", False),
])
def test_is_cuda_device(device, expected):
    assert stats.is_cuda_device(device) is expected


def test_timer_uses_host_clock_on_cpu():
    clock = FakeClock(10.0)
    with Timer("cpu", clock=clock) as t:
        clock.now = 10.25
    assert t.use_cuda is False
    assert t.elapsed_ms == pytest.approx(250.0, abs=1e-9)


def test_timer_real_clock_is_nonnegative():
    with Timer() as t:
        sum(range(1000))
    assert t.elapsed_ms >= 0.0


def test_timer_read_before_end_fails():
    t = Timer()
    with pytest.raises(RuntimeError):
        t.elapsed_ms


def test_stage_timer_nested_stages_reset_and_add():
    clock = FakeClock(0.0)
    timer = StageTimer("cpu", clock=clock)
    # warm-up iteration, discarded by reset()
    with timer.stage("total"):
        clock.now += 5.0
    timer.reset()
    assert timer.times_ms() == {}
    for decode_s, encoder_s in ((0.002, 0.010), (0.004, 0.020)):
        with timer.stage("total"):
            with timer.stage("decode"):
                clock.now += decode_s
            with timer.stage("encoder"):
                clock.now += encoder_s
    timer.add("head", 0.5)
    ms = timer.times_ms()
    assert timer.stages == ["total", "decode", "encoder", "head"]
    assert ms["decode"] == pytest.approx([2.0, 4.0], abs=1e-9)
    assert ms["encoder"] == pytest.approx([10.0, 20.0], abs=1e-9)
    assert ms["total"] == pytest.approx([12.0, 24.0], abs=1e-9)
    assert ms["head"] == [0.5]
    summary = timer.summary()
    assert summary["total"].mean_ms == pytest.approx(18.0, abs=1e-9)
    assert summary["total"].count == 2


class _FakeEvent:
    """Stands in for torch.cuda.Event to check the CUDA-event path's bookkeeping on a CPU."""

    log = []

    def __init__(self, enable_timing=False):
        assert enable_timing, "timing events must be created with enable_timing=True"
        self.recorded_on = None
        self.synced = False
        self.t = None

    def record(self, stream=None):
        self.recorded_on = stream
        self.t = len(_FakeEvent.log) * 1.5  # each record is 1.5 ms after the previous
        _FakeEvent.log.append(("record", stream))

    def synchronize(self):
        self.synced = True
        _FakeEvent.log.append(("sync", None))

    def elapsed_time(self, end):
        assert end.synced, "elapsed_time read before the end event was synchronised"
        return end.t - self.t


def test_timer_cuda_path_records_events_and_syncs_lazily(monkeypatch):
    _FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream-of-{device}")
    timer = StageTimer("cuda:0")
    for _ in range(3):
        with timer.stage("encoder"):
            pass
    # No synchronisation while the run goes on: only records, all on the device's stream.
    assert [kind for kind, _ in _FakeEvent.log] == ["record"] * 6
    assert {stream for _, stream in _FakeEvent.log} == {"stream-of-cuda:0"}
    assert timer.times_ms()["encoder"] == [1.5, 1.5, 1.5]
    assert [kind for kind, _ in _FakeEvent.log].count("sync") == 3
    # A host stage inside a CUDA timer uses the host clock, not events.
    with timer.stage("decode", use_cuda=False) as t:
        pass
    assert t.use_cuda is False and len(_FakeEvent.log) == 9


@pytest.mark.gpu
def test_timer_cuda_events_on_gpu():
    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    import time

    host0 = time.perf_counter()
    with Timer("cuda") as t:
        for _ in range(10):
            x = x @ x
            x = x / x.norm()
    torch.cuda.synchronize()
    host_ms = (time.perf_counter() - host0) * 1000.0
    # The events bracket the GPU work, which ends before the host sees synchronize() return.
    assert t.use_cuda
    assert 0.0 < t.elapsed_ms <= host_ms + 0.5


# ---------------------------------------------------------------- memory


def test_peak_host_rss_grows_with_an_allocation():
    if not stats.reset_peak_host_rss():
        pytest.skip("this OS cannot reset the peak RSS")
    before = stats.peak_host_rss_bytes()
    buf = np.ones(16 * 1024 * 1024, dtype=np.float64)  # 128 MiB, every page written
    after = stats.peak_host_rss_bytes()
    del buf
    # Some pages may already be resident from the allocator's pool; 100 MiB is a safe floor.
    assert after - before >= 100 * 1024 * 1024


def test_peak_host_rss_agrees_with_getrusage_scale():
    import resource

    peak = stats.peak_host_rss_bytes()
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    # VmHWM can only be lower than the lifetime maximum (it may have been reset above).
    assert 0 < peak <= ru + 4096


def test_gpu_peak_memory_without_cuda_is_none():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert stats.gpu_peak_memory_bytes() is None
    stats.reset_gpu_peak_memory()  # a no-op, must not raise


@pytest.mark.gpu
def test_gpu_peak_memory_counts_an_allocation():
    stats.reset_gpu_peak_memory()
    x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    assert stats.gpu_peak_memory_bytes() >= 64 * 1024 * 1024
    del x
