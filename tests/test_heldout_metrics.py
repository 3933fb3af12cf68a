"""The training report's held-out metrics (rali_edge.training.default_model): checked against
scipy, and `--evaluate` against the Scorer on the same grid."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
from scipy.stats import spearmanr

import rali_edge
from rali_edge.scoring import default_model_path
from rali_edge.training import data
from rali_edge.training.data import Sample
from rali_edge.training.default_model import cell_mean_srcc, heldout_metrics, main


def fake_grid(rng, crops=6):
    """Samples of a held-out grid's shape: per crop, clean plus three distortions at five levels."""
    samples = []
    for crop in range(crops):
        source = ("chelsea", "coffee", "astronaut")[crop % 3]
        samples.append(Sample(np.zeros((1, 1, 3), np.uint8), 5.0, 1.0, source, "clean", 0))
        for kind in ("blur", "noise", "contrast"):
            for level in range(1, 6):
                label = 5.0 - 0.7 * level + rng.normal(0, 0.2)
                samples.append(Sample(np.zeros((1, 1, 3), np.uint8), label, 0.0, source, kind, level))
    return samples


def test_cell_mean_srcc_is_spearman_of_the_cell_means():
    rng = np.random.default_rng(0)
    samples = fake_grid(rng)
    labels = np.array([s.label for s in samples])
    # A model that knows the level but adds a large offset per crop (its content).
    crop = np.repeat(np.arange(6), 16)
    predictions = labels + rng.normal(0, 1.5, 6)[crop]
    cells = np.array([f"{s.kind}/{s.level}" for s in samples])
    means = np.array([predictions[cells == c].mean() for c in cells])
    assert cell_mean_srcc(samples, predictions) == round(spearmanr(means, labels).statistic, 4)
    metrics = heldout_metrics(samples, predictions)
    assert abs(metrics["heldout_srcc"] - spearmanr(predictions, labels).statistic) < 1e-12
    # Averaging over cells removes the crop offsets, so it must beat the plain SRCC here.
    assert metrics["heldout_cell_mean_srcc"] > metrics["heldout_srcc"] + 0.1
    assert metrics["heldout_clean_mean_score"] == round(predictions[[s.kind == "clean" for s in samples]].mean(), 4)
    assert set(metrics["heldout_srcc_per_source"]) == {"chelsea", "coffee", "astronaut"}


def test_evaluate_prints_the_scorers_numbers_on_the_grid():
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--evaluate", str(default_model_path()), "--heldout-crops", "1", "--workers", "1"]) == 0
    printed = json.loads(out.getvalue())
    # The same grid as the quality test in test_default_model.py (seed 0 + 1, crop 0 of each photograph).
    samples = data.heldout_grid(seed=1, crops_per_source=1)
    scores = rali_edge.load().score([s.image for s in samples], batch_size=64)
    assert printed["heldout_samples"] == len(samples) == 168
    assert abs(printed["heldout_srcc"] - spearmanr(scores, [s.label for s in samples]).statistic) < 1e-9
