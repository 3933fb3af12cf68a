"""The measurement loops of `rali-edge profile`: RALI per batch size, then the MLLM baseline.

Each run: reset the memory peaks, warm up (not counted), open a power window, run timed
iterations until the budget is met, close the window; then summarise the stage latencies, the
throughput, the peak memory and the energy (idle was measured once, before any model loaded).

Stages are timed where they run: image decoding and preprocessing on the host clock, the encoder
and the head with CUDA events on a GPU (host clock on a CPU), and `total` on the host clock from
the encoded file to the scores back on the host, so it is the latency a caller sees. The
encoder stage includes the upload of the pixels to the GPU (the encoder backend does it).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rali_edge.errors import ImageError, RaliEdgeError
from rali_edge.images import find_images, open_image, sample_images
from rali_edge.profiling.power import PowerSampler, PowerTrace, energy_report, measure_idle
from rali_edge.profiling.stats import (
    StageTimer,
    gpu_peak_memory_bytes,
    peak_host_rss_bytes,
    reset_gpu_peak_memory,
    reset_peak_host_rss,
    summarize_latencies,
    throughput,
)

RALI_STAGES = ("decode", "preprocess", "encoder", "head", "total")
BASELINE_STAGES = ("decode", "preprocess", "prefill", "generation", "total")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- images


@dataclass
class ImageSet:
    """The images a profile runs on: file paths, or encoded bytes for synthetic images (so that
    the decode stage still decodes a JPEG)."""

    sources: list
    names: list[str]
    origin: str  # "files", "bundled samples at 12 MP" or "synthetic"
    sizes: list[tuple[int, int]]  # (width, height)
    skipped: list[dict] = field(default_factory=list)  # {"path", "error"}: files that could not be read

    def batch(self, size: int, offset: int = 0) -> list:
        """`size` sources, cycling through the set."""
        return [self.sources[(offset + i) % len(self.sources)] for i in range(size)]

    def to_dict(self) -> dict:
        return {"origin": self.origin, "count": len(self.sources), "names": self.names,
                "sizes": [list(s) for s in self.sizes], "skipped": self.skipped}


def synthetic_images(n: int = 4, size: tuple[int, int] = (1024, 768), seed: int = 0) -> ImageSet:
    """Smooth gradients with noise and a few blocks, JPEG-encoded: deterministic stand-ins with the
    shape of a KonIQ photo (1024x768) when no image files are at hand."""
    rng = np.random.default_rng(seed)
    w, h = size
    sources, names = [], []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200 + 20 * i
        noise = rng.normal(0, 8 + 6 * i, size=(h, w, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 64)), int(rng.integers(0, h - 64))
            img[y0 : y0 + 64, x0 : x0 + 64] = rng.integers(0, 255, size=3, dtype=np.uint8)
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        sources.append(buf.getvalue())
        names.append(f"synthetic-{i}.jpg")
    return ImageSet(sources, names, "synthetic", [size] * n)


# What a profile without --images times: photographs the size a phone camera takes (12 MP), not
# the bundled files themselves (300-600 pixels): decoding and resizing cost grows with the pixels,
# and the small files made throughput look 25x better than real photographs give.
DEFAULT_LONG_SIDE = 4032


def load_image_set(paths: list[str] | None) -> ImageSet:
    """Files and folders given by the user; none given: the bundled clean photographs enlarged to
    DEFAULT_LONG_SIDE (JPEG in memory), else synthetic images. Every image is opened once here, so
    that a file that cannot be read is set aside (`skipped`) before anything is timed."""
    if not paths:
        return bundled_photographs()
    found = find_images(paths)
    if found.unmatched:
        raise RaliEdgeError("; ".join(found.unmatched))
    files, sizes, skipped = [], [], []
    for f in found.paths:
        try:
            sizes.append(open_image(f).size)
            files.append(f)
        except ImageError as e:
            skipped.append({"path": f, "error": str(e).removeprefix(f"{f}: ")})
    if not files:
        raise RaliEdgeError(f"no readable image in {', '.join(paths)} ({len(skipped)} files could not be read)")
    return ImageSet(files, [Path(f).name for f in files], "files", sizes, skipped)


def bundled_photographs(long_side: int = DEFAULT_LONG_SIDE, distorted: bool = False) -> ImageSet:
    """The bundled clean photographs (with `distorted`, every bundled sample) enlarged to
    `long_side`, JPEG-encoded in memory."""
    from PIL import Image

    samples = sample_images()
    clean = [f for f in samples if distorted or "_clean" in f.name]
    if not clean:
        return synthetic_images()
    sources, names, sizes = [], [], []
    for f in clean:
        img = open_image(f)
        k = long_side / max(img.size)
        img = img.resize((round(img.width * k), round(img.height * k)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        sources.append(buf.getvalue())
        names.append(f"{f.stem}@{img.width}x{img.height}.jpg")
        sizes.append(img.size)
    return ImageSet(sources, names, f"bundled samples enlarged to {long_side} pixels on the long side (12 MP, "
                    "a phone camera's size)", sizes)


# ---------------------------------------------------------------- budget


@dataclass
class Budget:
    """How long each run lasts: at least `min_iters` timed iterations and `min_seconds`."""

    warmup: int = 3
    min_iters: int = 20
    min_seconds: float = 0.0

    @classmethod
    def from_options(cls, warmup: int, iters: int | None, duration: float | None, power: bool) -> "Budget":
        """--iters N: exactly N. --duration S: as many as fit in S seconds (at least one).
        Neither: 20 iterations, and at least 2 s when power is measured, so that the energy
        window spans many sensor updates."""
        if iters is not None and duration is not None:
            raise RaliEdgeError("--iters and --duration exclude each other; give one")
        if iters is not None:
            return cls(warmup, max(1, iters), 0.0)
        if duration is not None:
            return cls(warmup, 1, float(duration))
        return cls(warmup, 20, 2.0 if power else 0.0)

    def done(self, iters: int, elapsed_s: float) -> bool:
        return iters >= self.min_iters and elapsed_s >= self.min_seconds

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- results


@dataclass
class RunResult:
    """One measured run: RALI at one batch size, or the baseline (batch 1)."""

    label: str
    batch_size: int
    iterations: int
    images: int
    wall_s: float
    stages: dict  # stage -> LatencySummary dict, ms per batch
    per_image_ms: float  # mean total / batch size
    images_per_s: float
    peak_host_rss_bytes: int | None
    peak_gpu_bytes: int | None
    energy: dict  # EnergyReport.to_dict()
    power_trace: dict  # PowerTrace.to_dict()
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def idle_power(sampler: PowerSampler, seconds: float, progress: Progress = _quiet) -> PowerTrace | None:
    """Idle power, before any model is loaded. None without a sensor or with seconds <= 0."""
    if not sampler.available or seconds <= 0:
        return None
    progress(f"measuring idle power for {seconds:g} s ({sampler.name})")
    return measure_idle(sampler, seconds)


def _finish(label, batch_size, timer: StageTimer, wall_s, trace: PowerTrace, idle, extra=None) -> RunResult:
    times = timer.times_ms()
    total = times["total"]
    images = batch_size * len(total)
    return RunResult(
        label=label, batch_size=batch_size, iterations=len(total), images=images, wall_s=wall_s,
        stages={name: summarize_latencies(ms).to_dict() for name, ms in times.items() if ms},
        per_image_ms=math.fsum(total) / len(total) / batch_size,
        images_per_s=throughput(batch_size, total),
        peak_host_rss_bytes=peak_host_rss_bytes(), peak_gpu_bytes=_gpu_peak(timer.device),
        energy=energy_report(trace, images, idle).to_dict(), power_trace=trace.to_dict(),
        extra=extra or {},
    )


def _gpu_peak(device) -> int | None:
    device = torch.device(device)
    return gpu_peak_memory_bytes(device) if device.type == "cuda" else None


def _reset_peaks(device) -> None:
    reset_peak_host_rss()
    if torch.device(device).type == "cuda":
        reset_gpu_peak_memory(torch.device(device))


# ---------------------------------------------------------------- RALI


def head_in_encoder(scorer) -> bool:
    """True when the engine outputs the score itself (the head was built into it)."""
    return getattr(scorer.encoder, "outputs", "class_token") == "score"


@torch.inference_mode()
def _rali_iteration(scorer, sources: list, timer: StageTimer, fused_head: bool) -> torch.Tensor:
    with timer.stage("total", use_cuda=False):
        with timer.stage("decode", use_cuda=False):
            images = [open_image(s) for s in sources]
        with timer.stage("preprocess", use_cuda=False):
            pixels = scorer.preprocess(images)
        with timer.stage("encoder"):
            out = scorer.encoder(pixels)
        if fused_head:
            scores = out
        else:
            with timer.stage("head"):
                scores = scorer.head(out)
        scores = scorer.preprocess.pool(scores.float()).cpu()  # the caller has its scores: the GPU is done
    return scores


def profile_rali(scorer, images: ImageSet, batch_sizes: list[int], budget: Budget, sampler: PowerSampler,
                 idle: PowerTrace | None, progress: Progress = _quiet) -> tuple[list[RunResult], bool]:
    """(one RunResult per batch size, whether Ctrl-C stopped them: then the ones that finished)."""
    device = scorer.encoder.device
    fused = head_in_encoder(scorer)
    runs = []
    try:
        for b in batch_sizes:
            runs.append(_profile_batch(scorer, images, b, budget, sampler, idle, progress, device, fused))
    except KeyboardInterrupt:
        return runs, True
    return runs, False


def _profile_batch(scorer, images: ImageSet, b: int, budget: Budget, sampler: PowerSampler,
                   idle: PowerTrace | None, progress: Progress, device, fused: bool) -> RunResult:
    batch = images.batch(b)
    timer = StageTimer(device)
    _reset_peaks(device)
    for i in range(budget.warmup):
        progress(f"RALI batch {b}: warm-up {i + 1}/{budget.warmup}")
        _rali_iteration(scorer, batch, timer, fused)
    timer.reset()
    sampler.start()
    start = time.perf_counter()
    iters = 0
    try:
        while not budget.done(iters, time.perf_counter() - start):
            _rali_iteration(scorer, batch, timer, fused)
            iters += 1
            elapsed = time.perf_counter() - start
            progress(f"RALI batch {b}: {iters}/{budget.min_iters} iterations, {elapsed:.1f} s, "
                     f"{1000 * elapsed / iters:.1f} ms/batch")
    finally:
        wall = time.perf_counter() - start
        trace = sampler.stop()
    return _finish("RALI", b, timer, wall, trace, idle, {"head_in_encoder": fused})


# ---------------------------------------------------------------- baseline


def profile_baseline(baseline, images: ImageSet, n_images: int, sampler: PowerSampler,
                     idle: PowerTrace | None, progress: Progress = _quiet, warmup: int = 1,
                     seed: int = 0) -> RunResult:
    """Q-Insight's request on `n_images` images (cycling), one image per request as its demo does.
    Warm-up requests generate 8 tokens: enough to compile and cache every kernel."""
    device = baseline.device
    timer = StageTimer(device)
    _reset_peaks(device)
    for i in range(warmup):
        progress(f"baseline: warm-up {i + 1}/{warmup}")
        baseline.generate(baseline.prepare(open_image(images.sources[0])), max_new_tokens=8)
    timer.reset()
    torch.manual_seed(seed)
    tokens, prompt_tokens, image_tokens, ratings, answers, sizes = [], [], [], [], [], []
    sampler.start()
    start = time.perf_counter()
    try:
        for i in range(n_images):
            source = images.sources[i % len(images.sources)]
            with timer.stage("total", use_cuda=False):
                with timer.stage("decode", use_cuda=False):
                    image = open_image(source)
                with timer.stage("preprocess", use_cuda=False):
                    request = baseline.prepare(image)
                gen = baseline.generate(request)
            timer.add("prefill", gen.prefill_ms)
            timer.add("generation", gen.generation_ms)
            tokens.append(gen.new_tokens)
            prompt_tokens.append(request.prompt_tokens)
            image_tokens.append(request.image_tokens)
            sizes.append(list(request.image_size))
            ratings.append(gen.rating)
            if gen.text is not None:
                answers.append(gen.text)
            elapsed = time.perf_counter() - start
            progress(f"baseline: {i + 1}/{n_images} images, {elapsed:.1f} s, {gen.new_tokens} tokens")
    finally:
        wall = time.perf_counter() - start
        trace = sampler.stop()
    gen_ms = timer.times_ms()["generation"]
    per_token = [ms / max(1, t - 1) for ms, t in zip(gen_ms, tokens)]  # the first token ends prefill
    extra = {
        "tokens_generated": tokens,
        "tokens_per_image": math.fsum(tokens) / len(tokens),
        "ms_per_generated_token": math.fsum(per_token) / len(per_token),
        "prompt_tokens": prompt_tokens,
        "image_tokens": image_tokens,
        "image_sizes_after_resize": sizes,
        "ratings": ratings,
        "ratings_parsed": sum(r is not None for r in ratings),
        "answers": answers,
    }
    return _finish("Q-Insight", 1, timer, wall, trace, idle, extra)


__all__ = [
    "ImageSet", "Budget", "RunResult", "synthetic_images", "load_image_set", "idle_power",
    "profile_rali", "profile_baseline", "head_in_encoder", "RALI_STAGES", "BASELINE_STAGES",
]
