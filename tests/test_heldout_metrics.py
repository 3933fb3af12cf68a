"""The training report's held-out metrics (rali_edge.training.default_model): checked against
scipy, and `--evaluate` against the Scorer on the same grid."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import rali_edge
from rali_edge.model_file import load_model
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_tiny_training_run_reports_what_evaluate_measures(tmp_path):
    # The whole recipe on a tiny budget (64 samples, one epoch: the model itself is poor). The
    # report, the manifest and `evaluate` of the saved folder must state the same held-out SRCC:
    # they share the grid (seed + 1) and heldout_metrics.
    from rali_edge.training import default_model as dm

    recipe = dm.Recipe(train_samples=64, epochs=1, heldout_crops=1, warmup_steps=1, ranking=None,
                       head=dict(pca_dim=8, prototypes=8, buckets=4, epochs=5, lr=0.01, batch_size=64,
                                 learn_temperature=True, seed=0, validation_folds=2))
    summary = dm.train(recipe, tmp_path / "model", threads=1, workers=1, log=lambda msg: None)
    dm.write_report(summary, tmp_path / "TRAINING.md")
    results = summary["results"]
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["source"]["heldout_srcc"] == round(results["heldout_srcc"], 4)
    assert f"| SRCC | {results['heldout_srcc']:.4f} |" in (tmp_path / "TRAINING.md").read_text()
    again = dm.evaluate(tmp_path / "model", recipe.seed, recipe.heldout_crops, workers=1)
    assert abs(again["heldout_srcc"] - results["heldout_srcc"]) < 1e-9
    assert again["heldout_cell_mean_srcc"] == results["heldout_cell_mean_srcc"]


@pytest.mark.slow
def test_refit_head_gives_what_the_full_run_gave(tmp_path):
    # --refit-head reruns steps 3-4 on a trained encoder. With the run's own head recipe it must
    # reproduce the run's weights exactly; with another, only the head may change.
    from rali_edge.training import default_model as dm

    recipe = dm.Recipe(train_samples=64, epochs=1, heldout_crops=1, warmup_steps=1, ranking=None,
                       head=dict(pca_dim=8, prototypes=8, buckets=4, epochs=6, lr=0.01, batch_size=64,
                                 learn_temperature=True, seed=0, validation_folds=2))
    summary = dm.train(recipe, tmp_path / "run", threads=1, workers=1, log=lambda msg: None)
    (tmp_path / "run" / "training.json").write_text(json.dumps(summary))
    assert summary["results"]["head_fit"]["validation"]["grouped"]

    same = dm.refit_head(tmp_path / "run", tmp_path / "same", workers=1, log=lambda msg: None, head=recipe.head)
    assert same["weights_sha256"] == summary["weights_sha256"]
    assert same["results"]["heldout_srcc"] == summary["results"]["heldout_srcc"]

    other_head = {**recipe.head, "prototypes": 4, "validation_folds": 0}
    other = dm.refit_head(tmp_path / "run", tmp_path / "other", workers=1, log=lambda msg: None, head=other_head)
    assert other["recipe"]["head"] == other_head and other["head_refitted"]
    assert other["history"] == summary["history"]  # the encoder's training is the run's
    run_model, _ = load_model(tmp_path / "run")
    other_model, manifest = load_model(tmp_path / "other")
    assert manifest.num_prototypes == 4
    for name, tensor in run_model.encoder.state_dict().items():
        assert torch.equal(tensor, other_model.encoder.state_dict()[name]), name
    dm.write_report(other, tmp_path / "TRAINING.md")
    assert "--refit-head" in (tmp_path / "TRAINING.md").read_text()
