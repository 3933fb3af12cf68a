"""The built-in default model: loads offline, matches its manifest, and ranks distortions of
photographs it never saw in training as its training report says."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest
from click.testing import CliRunner

import rali_edge
from rali_edge.cli import main
from rali_edge.evaluation import srcc
from rali_edge.model_file import sha256_file
from rali_edge.scoring import default_model_path
from rali_edge.training import data
from rali_edge.training.default_model import MODEL_NAME, Recipe
from rali_edge.training.samples import SAMPLES

SAMPLES_DIR = default_model_path().parent / "samples"


@pytest.fixture(scope="module")
def scorer():
    return rali_edge.load()


def test_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the default model must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    scorer = rali_edge.load()
    assert scorer.manifest.name == MODEL_NAME
    score = scorer.score(np.full((90, 120, 3), 128, np.uint8))[0]
    assert 1.0 <= score <= 5.0


def test_weights_hash_matches_manifest():
    manifest = json.loads((default_model_path() / "manifest.json").read_text())
    weights = default_model_path() / manifest["weights"]["file"]
    assert sha256_file(weights) == manifest["weights"]["sha256"]
    assert weights.stat().st_size < 8_000_000  # "a few MB in the wheel"


@pytest.fixture(scope="module")
def heldout_srcc(scorer):
    # The training report's held-out set itself (same seed, same generator): 8 crops of each
    # held-out photograph, clean and with every distortion at every level, 1344 images.
    recipe = Recipe()
    samples = data.heldout_grid(seed=recipe.seed + 1, crops_per_source=recipe.heldout_crops, workers=2)
    assert {s.source for s in samples} == set(data.HELDOUT_SOURCES)
    assert not set(data.HELDOUT_SOURCES) & set(data.TRAIN_SOURCES)
    scores = scorer.score([s.image for s in samples], batch_size=64)
    return srcc(scores, [s.label for s in samples])


@pytest.mark.slow
def test_heldout_srcc_is_the_one_the_report_states(heldout_srcc):
    # The number in the manifest and TRAINING.md is measured again here. Tolerance 0.01: the
    # JPEG and JPEG2000 distortions are made by this machine's codec libraries, whose versions
    # can change a few of the 1344 images.
    manifest = json.loads((default_model_path() / "manifest.json").read_text())
    assert heldout_srcc == pytest.approx(manifest["source"]["heldout_srcc"], abs=0.01)


def test_heldout_distortions_rank_like_their_labels(heldout_srcc):
    # The bar. The shipped model clears it by little (TRAINING.md: 0.8026), so a change
    # of codec library that moves a few held-out images can fail this: retrain, do not lower it.
    assert heldout_srcc >= 0.8, heldout_srcc


def test_training_report_states_the_shipped_number():
    manifest = json.loads((default_model_path() / "manifest.json").read_text())
    report = (default_model_path() / "TRAINING.md").read_text()
    number = manifest["source"]["heldout_srcc"]
    assert re.search(rf"\| SRCC \| {number:.4f}", report), "TRAINING.md and the manifest disagree"
    # Every photograph the shipped model was trained or checked on is credited with its licence.
    used = manifest["source"]["train_sources"] + manifest["source"]["heldout_sources"]
    for name in used:
        source = data.SOURCES[name]
        assert source.name in report and source.licence in report


# The bundled samples (whole photographs at their own sizes) that the built-in model scores
# above their clean photograph: what a retraining must fix. Asserted, so the list is updated
# (with docs/built-in-model.md) when a model ranks them right. coffee_motion-3 since stage 2
# (stage 1 alone ranked every sample right): coffee is a small, already compressed web photograph,
# whose own blocking a blur smooths away (docs/built-in-model.md, "What is left").
KNOWN_MISRANKED = {("coffee", "motion", 3)}


def test_bundled_samples_clean_scores_highest(scorer):
    for name, distortions in SAMPLES:
        clean = scorer.score([str(SAMPLES_DIR / f"{name}_clean.jpg")])[0]
        for kind, level in distortions:
            distorted = scorer.score([str(SAMPLES_DIR / f"{name}_{kind}-{level}.jpg")])[0]
            # The README's table: every distorted version below its clean photograph, but the known one.
            assert (distorted < clean) != ((name, kind, level) in KNOWN_MISRANKED), (name, kind, level, clean, distorted)
    licences = (SAMPLES_DIR / "LICENSES.md").read_text()
    assert all(name in licences for name, _ in SAMPLES)


def test_bundled_samples_are_the_recipe_s_files():
    # Names only: JPEG and JPEG2000 bytes depend on the codec library versions.
    want = {f"{name}_clean.jpg" for name, _ in SAMPLES} | {f"{name}_{k}-{lv}.jpg" for name, d in SAMPLES for k, lv in d}
    assert {p.name for p in SAMPLES_DIR.glob("*.jpg")} == want
    assert sum(p.stat().st_size for p in SAMPLES_DIR.iterdir()) < 700_000  # a few hundred KB in the repo


def test_cli_scores_the_samples_with_the_default_model():
    result = CliRunner().invoke(main, ["score", str(SAMPLES_DIR), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == sum(1 + len(d) for _, d in SAMPLES) and all("score" in r for r in rows)
