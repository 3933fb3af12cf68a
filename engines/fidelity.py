"""The fidelity check: does an engine score images like fp32 PyTorch does?

Every `rali-edge build` ends with it, and `rali-edge check-engine` runs it on its own. A set of
images (the bundled samples, or --calib-dir) is scored by the engine, exactly as a user would run
it (its backend, its device, the head it uses), and by the fp32 PyTorch model with the eager head;
the check reports the largest |score difference| (scores are on the 1..5 scale) and the rank
correlation (SRCC) between the two, and fails above --max-score-diff.

The two scorers run one after the other, not side by side: on an 8 GB Jetson a ViT-L in fp32 and
its engine together would not leave much room. Each is timed on the images after a first image
that warms it up (ONNX Runtime and oneDNN prepare their kernels on the first call): the times
are what auto (engines/auto.py) weighs.
"""

from __future__ import annotations

import contextlib
import gc
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rali_edge.errors import RaliEdgeError, UsageError
from rali_edge.images import describe_suffixes, images_in, sample_images

DEFAULT_MAX_SCORE_DIFF = 0.02


@dataclass
class FidelityReport:
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    srcc: float
    max_score_diff: float
    passed: bool
    worst_image: str
    reference: str  # what the engine was compared with
    skipped: int = 0  # images that could not be read
    engine_s: float | None = None  # seconds the engine took to score the images but the first, decoding included
    reference_s: float | None = None  # and the reference (eager PyTorch fp32), on the same images

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        srcc = "n/a" if np.isnan(self.srcc) else f"{self.srcc:.4f}"
        text = (f"{verdict}: {self.images} images, max |score diff| {self.max_abs_diff:.4f} "
                f"(limit {self.max_score_diff}), mean {self.mean_abs_diff:.4f}, SRCC {srcc} vs {self.reference}")
        if not self.passed:
            text += f"; worst: {self.worst_image}"
        if self.skipped:
            text += f"; {self.skipped} unreadable images skipped"
        return text


def fidelity_images(calib_dir: str | Path | None = None) -> list[Path]:
    """Images of --calib-dir (searched recursively), else the bundled samples."""
    if calib_dir is not None:
        folder = Path(calib_dir)
        if not folder.is_dir():
            raise UsageError(f"--calib-dir {folder}: not a folder")
        images = images_in(folder)
        if not images:
            raise UsageError(f"--calib-dir {folder}: no images ({describe_suffixes()})")
        return images
    images = sample_images()
    if not images:
        raise RaliEdgeError(
            "no images for the fidelity check: this install has no bundled samples; pass --calib-dir DIR "
            "(a few dozen typical images), or --no-check to skip the check"
        )
    return images


def compare(reference: dict[str, float], engine: dict[str, float], max_score_diff: float,
            reference_name: str = "fp32 PyTorch", skipped: int = 0) -> FidelityReport:
    """Compare two {image: score} maps over the images both scored."""
    from rali_edge.evaluation import srcc

    common = [k for k in reference if k in engine]
    if not common:
        raise RaliEdgeError("fidelity check: no image could be scored")
    ref = np.array([reference[k] for k in common], np.float64)
    got = np.array([engine[k] for k in common], np.float64)
    diff = np.abs(got - ref)
    worst = int(np.argmax(diff))
    # NaN scores (an engine that overflowed) must fail, and np.max would propagate them anyway.
    max_diff = float(np.max(diff)) if not np.isnan(diff).any() else float("inf")
    return FidelityReport(
        images=len(common), max_abs_diff=max_diff, mean_abs_diff=float(np.nanmean(diff)),
        srcc=srcc(ref, got) if len(common) > 1 else float("nan"), max_score_diff=max_score_diff,
        passed=max_diff <= max_score_diff, worst_image=common[worst], reference=reference_name, skipped=skipped,
    )


@contextmanager
def exact_fp32():
    """fp32 that is IEEE fp32 on CUDA too, for references: torch runs fp32 convolutions (the patch
    embedding) in TF32 by default, with 10-bit mantissas, and matmuls too under
    set_float32_matmul_precision("high"). Restored afterwards."""
    import torch

    if not hasattr(torch.backends.cudnn.conv, "fp32_precision"):  # torch < 2.9: the allow_tf32 switches
        knobs, name, exact = [torch.backends.cuda.matmul, torch.backends.cudnn], "allow_tf32", False
    else:
        knobs, name, exact = [torch.backends.cuda.matmul, torch.backends.cudnn.conv], "fp32_precision", "ieee"
    before = [getattr(k, name) for k in knobs]
    try:
        for k in knobs:
            setattr(k, name, exact)
        yield
    finally:
        for k, value in zip(knobs, before):
            setattr(k, name, value)


def score_files(scorer, paths: list[Path], batch_size: int, warm_up: bool = True) -> tuple[dict[str, float], int, float]:
    """({image: score}, images that could not be read, seconds they took). `warm_up`: the first
    image is scored once before, untimed (a first call prepares kernels)."""
    if warm_up:
        list(scorer.score_files([str(p) for p in paths[:1]], batch_size=1))
    scores, failed = {}, 0
    start = time.perf_counter()
    for result in scorer.score_files([str(p) for p in paths], batch_size=batch_size):
        if result.error is None:
            scores[result.path] = result.score
        else:
            failed += 1
    return scores, failed, time.perf_counter() - start


def check_engine(model_path: str | Path, engine_path: str | Path, backend: str, images: list[Path],
                 max_score_diff: float = DEFAULT_MAX_SCORE_DIFF, device: str | None = None,
                 batch_size: int = 8) -> FidelityReport:
    """Score `images` with the engine (as rali_edge.load would run it) and with the fp32 PyTorch
    model on the same device, then compare."""
    import torch

    from rali_edge.engines.backends import open_engine

    from rali_edge.model_file import load_model
    from rali_edge.scoring import Scorer

    # The head alone beside the engine (one copy of the encoder's weights in memory at a time); the
    # weights are still verified against the manifest.
    model, manifest = load_model(model_path, encoder=False)
    encoder = open_engine(backend, engine_path, manifest, device=device, model_ref=str(model_path))
    run_device = encoder.device
    scorer = Scorer(model, manifest, device=run_device, encoder=encoder)
    engine_scores, skipped, engine_s = score_files(scorer, images, batch_size)
    del scorer
    del encoder, model
    gc.collect()
    if run_device.type == "cuda":
        torch.cuda.empty_cache()
    model, manifest = load_model(model_path, verify=False)
    reference = Scorer(model, manifest, device=run_device, dtype="fp32", head="torch")
    with exact_fp32():
        reference_scores, _, reference_s = score_files(reference, images, batch_size)
    report = compare(reference_scores, engine_scores, max_score_diff, f"fp32 PyTorch on {run_device}", skipped)
    report.engine_s, report.reference_s = engine_s, reference_s
    return report


def compare_eager(model_path: str | Path, device: str, precision: str, max_score_diff: float,
                  batch_size: int = 4) -> FidelityReport:
    """Eager PyTorch in `precision` against eager fp32, on the bundled samples: both held at once
    (eager weights are small beside an engine build) and run batch by batch in turns, each timed
    after a first image that warms it up. Stops at the first batch that moves a score by more
    than `max_score_diff`: most reduced precisions fail at once, and then cost seconds."""
    from rali_edge.model_file import load_model
    from rali_edge.scoring import Scorer

    images = fidelity_images(None)
    # Two copies of the weights: a Scorer casts its model's encoder to its dtype in place.
    reference = Scorer(*load_model(model_path), device=device, dtype="fp32", head="torch")
    candidate = Scorer(*load_model(model_path, verify=False), device=device, dtype=precision, head="torch")
    ref, got, times, skipped = {}, {}, [0.0, 0.0], 0
    batches = [images[:1]] + [images[s:s + batch_size] for s in range(1, len(images), batch_size)]
    for i, batch in enumerate(batches):  # the first, one image, warms both up and is not timed
        for j, (scorer, into) in enumerate(((reference, ref), (candidate, got))):
            began = time.perf_counter()
            with exact_fp32() if j == 0 else contextlib.nullcontext():
                scores, failed, _ = score_files(scorer, batch, batch_size, warm_up=False)
            if i:
                times[j] += time.perf_counter() - began
            into.update(scores)
            skipped += failed if j == 0 else 0
        report = compare(ref, got, max_score_diff, f"fp32 PyTorch on {device}", skipped)
        if not report.passed:
            return report
    report.reference_s, report.engine_s = times
    return report


__all__ = [
    "DEFAULT_MAX_SCORE_DIFF",
    "FidelityReport",
    "check_engine",
    "compare",
    "compare_eager",
    "exact_fp32",
    "fidelity_images",
]
