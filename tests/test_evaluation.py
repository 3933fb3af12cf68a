"""evaluation: metrics against scipy, the logistic fit, both dataset formats, bad images, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import optimize, stats

import rali_edge
from rali_edge.cli import main
from rali_edge.evaluation import (
    DatasetError,
    correlations,
    evaluate,
    fit_logistic,
    krcc,
    logistic4,
    plcc,
    rankdata,
    read_dataset,
    srcc,
)


def with_ties(seed, n=300):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = 0.7 * x + rng.normal(size=n)
    return np.round(x, 1), np.round(y, 1)  # rounding makes many ties in both


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_scipy(seed):
    x, y = with_ties(seed)
    # Same formulas in float64 as scipy (average ranks, tau-b): equal to rounding, 1e-12.
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x), atol=0)
    assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert krcc(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)
    assert plcc(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    # krcc's chunks must not change the count
    assert krcc(x, y, chunk=7) == pytest.approx(krcc(x, y), abs=1e-15)


def test_metrics_undefined_cases_are_nan():
    m = correlations([3.0], [2.0])
    assert all(np.isnan(v) for v in (m.srcc, m.krcc, m.plcc, m.plcc_fitted))
    m = correlations([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])  # constant predictions
    assert np.isnan(m.srcc) and np.isnan(m.plcc) and np.isnan(m.plcc_fitted)


@pytest.mark.parametrize("params", [(4.6, 1.2, 0.3, 0.45), (1.5, 4.8, -0.2, 0.8), (80.0, 10.0, 3.0, -0.6)])
def test_logistic_fit_recovers_known_parameters(params):
    x = np.random.default_rng(0).uniform(-2, 4, size=200)
    y = logistic4(x, *params)
    fit = fit_logistic(x, y)
    # Noiseless data: least squares has its minimum exactly there (|b4| only: the sign of b4 is
    # not identifiable, the formula uses |b4|).
    got = np.array(fit.params)
    got[3] = abs(got[3])
    np.testing.assert_allclose(got, np.array(params[:3] + (abs(params[3]),)), rtol=1e-6, atol=1e-6)
    assert fit.plcc == pytest.approx(1.0, abs=1e-12) and fit.converged


@pytest.mark.parametrize("seed", [0, 1])
def test_logistic_fit_matches_scipy_curve_fit(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(1, 5, size=150)
    y = logistic4(x, 90, 15, 3.1, 0.5) + rng.normal(0, 6, size=150)  # MOS-like 0..100 labels

    def f(x, b1, b2, b3, b4):  # the formula as IQA papers write it
        return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2

    ref, _ = optimize.curve_fit(f, x, y, p0=[y.max(), y.min(), x.mean(), x.std()], maxfev=20000)
    fit = fit_logistic(x, y)
    # Both reach the same least-squares minimum; their stopping rules differ at ~1e-6 relative.
    np.testing.assert_allclose(fit.params[:3], ref[:3], rtol=1e-4)
    assert abs(fit.params[3]) == pytest.approx(abs(ref[3]), rel=1e-4)
    assert fit.plcc == pytest.approx(stats.pearsonr(f(x, *ref), y)[0], abs=1e-7)
    assert fit.plcc >= plcc(x, y) - 1e-9  # the fit can only help a monotone relation


# --- datasets ------------------------------------------------------------------------------
def test_metas_json_uses_gt_score_norm_when_all_have_it(tmp_path):
    (tmp_path / "metas.json").write_text(json.dumps([
        {"id": "a", "image": "imgs/a.jpg", "gt_score": 61.0, "gt_score_norm": 3.44},
        {"id": "b", "image": "imgs/b.jpg", "gt_score": 20.0, "gt_score_norm": 1.8},
    ]))
    items = read_dataset(tmp_path / "metas.json", root="/data")
    assert [(i.path, i.mos) for i in items] == [("/data/imgs/a.jpg", 3.44), ("/data/imgs/b.jpg", 1.8)]
    items = read_dataset(tmp_path / "metas.json", label="gt_score")
    assert [(i.path, i.mos) for i in items] == [(str(tmp_path / "imgs/a.jpg"), 61.0), (str(tmp_path / "imgs/b.jpg"), 20.0)]


def test_metas_json_falls_back_to_gt_score(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"image": "a.png", "gt_score": 2}, {"image": "b.png", "gt_score": 4, "gt_score_norm": 5}]))
    assert [i.mos for i in read_dataset(tmp_path / "m.json")] == [2.0, 4.0]


def test_csv_dataset(tmp_path):
    (tmp_path / "d.csv").write_text("path,mos,extra\nx/a.png,3.5,foo\n/abs/b.png,1.25,bar\n")
    items = read_dataset(tmp_path / "d.csv")
    assert [(i.path, i.mos) for i in items] == [(str(tmp_path / "x/a.png"), 3.5), ("/abs/b.png", 1.25)]


@pytest.mark.parametrize("name, content, message", [
    ("d.txt", "whatever", "unknown dataset format"),
    ("d.json", "{not json", "not valid JSON"),
    ("d.json", json.dumps({"image": "a"}), "list of objects"),
    ("d.json", json.dumps([{"image": "a"}]), "needs `image` and `gt_score`"),
    ("d.json", json.dumps([{"image": "a", "gt_score": "high"}]), "not a number"),
    ("d.json", "[]", "no labelled images"),
    ("d.csv", "file,score\na.png,3\n", "`path` and `mos`"),
    ("d.csv", "path,mos\na.png,nan\n", "not finite"),
])
def test_bad_dataset_files_say_what_is_wrong(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset(tmp_path / name)
    assert info.value.exit_code == 2
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "absent.csv")


# --- evaluate on images ----------------------------------------------------------------------
@pytest.fixture()
def labelled_folder(tmp_path):
    """Six images (PNG and JPEG) with made-up labels, plus a missing and a broken file."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        pixels = np.clip(rng.normal(40 * i, 30, size=(50 + 7 * i, 64, 3)), 0, 255).astype(np.uint8)
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(tmp_path / name)
        rows.append((name, 1.0 + 0.7 * i))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    rows += [("missing.png", 2.0), ("broken.jpg", 3.0)]
    (tmp_path / "data.csv").write_text("path,mos\n" + "".join(f"{p},{m}\n" for p, m in rows))
    (tmp_path / "metas.json").write_text(json.dumps([{"image": p, "gt_score": m} for p, m in rows]))
    return tmp_path


@pytest.mark.parametrize("fmt", ["data.csv", "metas.json"])
def test_evaluate_reports_failures_and_measures_the_rest(small_model, labelled_folder, fmt):
    items = read_dataset(labelled_folder / fmt)
    scorer = rali_edge.load(small_model)
    report = evaluate(scorer, items, batch_size=4)
    assert report.count == 8 and report.scored == 6
    assert [f["path"].rsplit("/", 1)[1] for f in report.failures] == ["missing.png", "broken.jpg"]
    assert "not found" in report.failures[0]["error"]
    # The metrics are those of the good images' scores, computed independently here.
    good = items[:6]
    scores = scorer.score([i.path for i in good])
    np.testing.assert_allclose([p["score"] for p in report.predictions], scores, atol=1e-6)
    assert report.metrics.srcc == pytest.approx(stats.spearmanr(scores, [i.mos for i in good])[0], abs=1e-9)
    assert report.metrics.plcc == pytest.approx(stats.pearsonr(scores, [i.mos for i in good])[0], abs=1e-6)
    assert "SRCC" in report.table() and "missing.png" in report.table()


def test_cli_eval_json_and_exit_codes(small_model, labelled_folder, tmp_path):
    runner = CliRunner()
    preds = tmp_path / "preds.csv"
    result = runner.invoke(main, ["eval", str(small_model), str(labelled_folder / "data.csv"), "--format", "json",
                                  "--predictions", str(preds)])
    assert result.exit_code == 1, result.output  # some images failed, the rest were measured
    report = json.loads(result.stdout)
    assert report["count"] == 8 and report["scored"] == 6 and len(report["failures"]) == 2
    assert set(report["metrics"]) >= {"srcc", "krcc", "plcc", "plcc_fitted"} and report["seconds"] > 0
    assert len(preds.read_text().splitlines()) == 7  # header + 6 scored

    # Only good images: exit code 0, a table.
    good = labelled_folder / "good.csv"
    good.write_text("path,mos\n" + "".join(f"img{i}.{'png' if i % 2 else 'jpg'},{i}\n" for i in range(6)))
    result = runner.invoke(main, ["eval", str(small_model), str(good)])
    assert result.exit_code == 0, result.output
    assert "SRCC" in result.stdout and "PLCC fitted" in result.stdout

    result = runner.invoke(main, ["eval", str(tmp_path / "no-model"), str(good)])
    assert result.exit_code == 3 and "error:" in result.output
    bad = labelled_folder / "bad.csv"
    bad.write_text("file,score\n")
    result = runner.invoke(main, ["eval", str(small_model), str(bad)])
    assert result.exit_code == 2 and "error:" in result.output and "`path` and `mos`" in result.output


def test_ctrl_c_keeps_the_metrics_of_the_images_scored_before(small_model, photos, tmp_path, monkeypatch):
    from rali_edge.scoring import Scorer

    real = Scorer.score_files

    def stopped_after_three(self, paths, **kwargs):
        for i, result in enumerate(real(self, paths, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(Scorer, "score_files", stopped_after_three)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,mos\n" + "".join(f"{p},{i % 5 + 1}\n" for i, p in enumerate(photos * 2)))
    predictions = tmp_path / "p.csv"
    result = CliRunner().invoke(main, ["eval", str(small_model), str(labels), "--predictions", str(predictions)])
    assert result.exit_code == 130, result.output
    assert f"{2 * len(photos)} labelled, 3 scored, 0 failed, {2 * len(photos) - 3} not reached" in result.stdout
    assert "SRCC" in result.stdout and "over the 3 images scored before Ctrl-C" in result.stderr
    assert len(predictions.read_text().splitlines()) == 1 + 3
