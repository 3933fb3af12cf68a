"""The whole-photograph held-out evaluation (rali_edge.training.whole_photos) on a tiny set: two
of the bundled held-out photographs, two distortions, five levels. The real set (15 photographs
of 0.1-20 MP) is built by the module's CLI; its numbers are in the default model's TRAINING.md."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import rali_edge
from rali_edge.distortions import distort, ms_ssim_to_score
from rali_edge.evaluation import read_dataset, srcc
from rali_edge.scoring import default_model_path
from rali_edge.training import whole_photos as wp
from small_model import make_small_model

SAMPLES = default_model_path().parent / "samples"
TINY = ("chelsea", "coffee")
KINDS = ("blur", "noise")


def load_sample(name: str) -> np.ndarray:  # module level: build_set's worker processes call it
    with Image.open(SAMPLES / f"{name}_clean.jpg") as f:
        return np.asarray(f.convert("RGB"))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return wp.build_set(out, photos=TINY, kinds=KINDS, load=load_sample, log=lambda _: None)


def test_label_windows_are_four_quadrant_centres_inside_the_image():
    assert wp.label_windows(300, 451) == [(0, 0, 300, 451)]  # small: the whole image
    windows = wp.label_windows(2448, 3264)
    assert len(windows) == 4 and len(set(windows)) == 4
    for top, left, h, w in windows:
        assert (h, w) == (512, 512) and 0 <= top <= 2448 - 512 and 0 <= left <= 3264 - 512
    assert (2448 // 4 - 256, 3264 // 4 - 256, 512, 512) in windows


def test_label_is_the_training_map_of_ms_ssim_and_falls_with_blur():
    photo = load_sample("chelsea")
    assert wp.label(photo, photo) == ms_ssim_to_score(1.0) == 5.0
    labels = [wp.label(photo, distort(photo, "blur", level)) for level in (1, 3, 5)]
    assert labels[0] > labels[1] > labels[2]


def test_set_has_every_version_as_a_jpeg_and_a_csv_eval_reads(tiny_set):
    rows = wp.read_set(tiny_set)
    assert len(rows) == len(TINY) * (1 + len(KINDS) * 5)
    assert {(r["photo"], r["distortion"], r["level"]) for r in rows} == {
        (p, "clean", 0) for p in TINY} | {(p, k, lvl) for p in TINY for k in KINDS for lvl in range(1, 6)}
    for r in rows:
        with Image.open(r["file"]) as f:
            assert f.format == "JPEG" and f.size == (int(r["width"]), int(r["height"]))
    clean = {r["photo"]: r["mos"] for r in rows if r["distortion"] == "clean"}
    assert all(v > 4 for v in clean.values())  # only JPEG quality 95 separates them from the original
    for photo in TINY:
        blur = [r["mos"] for r in sorted(rows, key=lambda r: r["level"]) if r["photo"] == photo and r["distortion"] == "blur"]
        assert blur == sorted(blur, reverse=True) and blur[0] > blur[-1]
    assert [x.path for x in read_dataset(tiny_set)] == [r["file"] for r in rows]  # `rali-edge eval MODEL labels.csv`


@pytest.mark.slow
def test_rebuilding_keeps_written_files_and_remakes_missing_ones(tiny_set):
    kept = tiny_set.parent / "coffee" / "noise-3.jpg"
    lost = tiny_set.parent / "chelsea" / "blur-2.jpg"
    before = kept.stat().st_mtime_ns, lost.read_bytes()
    lost.unlink()
    rows_before = tiny_set.read_text()
    wp.build_set(tiny_set.parent, photos=TINY, kinds=KINDS, load=load_sample, log=lambda _: None)
    assert kept.stat().st_mtime_ns == before[0]
    assert lost.read_bytes() == before[1]  # seeded: the same file again
    assert tiny_set.read_text() == rows_before
    assert not list(tiny_set.parent.rglob("*.part"))


def test_within_photo_rank_orders_levels_per_photograph():
    rows = [{"photo": p, "distortion": k, "level": lvl} for p in ("a", "b") for k, lvl in
            [("clean", 0)] + [("blur", i) for i in range(1, 6)] + [("noise", i) for i in range(1, 6)]]
    falling = {"a": [5, 4, 3, 2, 1, 0], "b": [0, 1, 2, 3, 4, 5]}  # a in order, b reversed
    scores = []
    for photo in ("a", "b"):
        blur = falling[photo]
        scores += [blur[0]] + blur[1:] + [1.0, 2.0, 1.5, 0.5, 0.0]
    assert wp.within_photo_rank(rows, scores, "blur") == {"a": 1.0, "b": -1.0}
    noise = wp.within_photo_rank(rows, scores, "noise")
    assert noise["a"] == pytest.approx(srcc([0, -1, -2, -3, -4, -5], [5, 1.0, 2.0, 1.5, 0.5, 0.0]))


def test_size_bands_split_by_the_long_side_and_the_comparison_keeps_shared_distortions():
    assert [wp.size_band({"width": w, "height": h}) for w, h in ((451, 300), (999, 1200), (3999, 10), (6028, 3391))] == [
        "under 1000 px", "1000-3999 px", "1000-3999 px", "4000 px and over"]

    def summary(kinds, by_size):
        return {"per_distortion": {k: {"within_photo_mean": 0.5, "pooled_srcc": 0.25, "within_photo_by_size": by_size}
                                   for k in kinds}}

    lines = wp.comparison_lines({"ours": summary(("blur", "noise", "contrast"), {"under 1000 px": 0.9}),
                                 "PEER": summary(("blur", "noise"), {"under 1000 px": 0.7, "4000 px and over": 0.6})})
    text = "\n".join(lines)
    assert "| blur | 0.500 | 0.250 | 0.500 | 0.250 |" in text and "contrast" not in text
    assert "| blur | under 1000 px | 0.900 | 0.700 |" in text
    assert "| noise | 4000 px and over | - | 0.600 |" in text  # a band one scorer has no photograph in


def test_evaluate_scores_through_score_files_and_summarises(tiny_set, tmp_path):
    model = make_small_model(tmp_path / "m", native_grid=2)
    summary = wp.evaluate(model, tiny_set, log=lambda _: None)
    rows = wp.read_set(tiny_set)
    expected = [r.score for r in rali_edge.load(model).score_files([r["file"] for r in rows])]
    assert summary["images"] == len(rows)
    assert summary["srcc"] == pytest.approx(srcc(expected, [r["mos"] for r in rows]), abs=1e-4)
    for kind in KINDS:
        ranks = wp.within_photo_rank(rows, expected, kind)
        got = summary["per_distortion"][kind]
        assert got["within_photo_mean"] == pytest.approx(np.mean(list(ranks.values())), abs=1e-4)
        assert got["within_photo_min"] == pytest.approx(min(ranks.values()), abs=1e-4)
        assert got["within_photo_by_size"] == {"under 1000 px": got["within_photo_mean"]}  # both under 1000 px
    assert summary["main_distortions"] == ["blur", "noise"]
    assert summary["photos"] == {"chelsea": "451x300", "coffee": "600x400"}
    text = "\n".join(wp.report_lines(summary))
    assert "| blur |" in text and "| noise |" in text and "jpeg2000" not in text


def test_cli_writes_json_and_the_model_report(tiny_set, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    out = tmp_path / "r.json"
    assert wp.main(["--model", str(model), "--set", str(tiny_set.parent), "--json", str(out),
                    "--update-report", str(model)]) == 0
    summary = json.loads(out.read_text())
    assert json.loads((model / "training.json").read_text())["whole_photos"] == summary
    report = (model / "TRAINING.md").read_text()
    assert "## Whole photographs" in report
    assert f"| blur | {summary['per_distortion']['blur']['within_photo_mean']:.3f} |" in report
    assert "| blur |" in capsys.readouterr().out


def test_cli_reports_a_set_that_is_not_one(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("path,mos\nx.jpg,3\n")
    assert wp.main(["--set", str(tmp_path)]) == 2
    assert "not a whole-photograph set" in capsys.readouterr().err


def test_every_photo_is_held_out_of_training():
    from rali_edge.training import data, debian_photos

    for name, photo in wp.PHOTOS.items():
        assert name not in data.GROUP_SOURCES  # stage 1's sources and stage 2's
        if photo.package != "scikit-image":
            assert debian_photos.PHOTOS[name].package == photo.package
        else:
            assert name in data.HELDOUT_SOURCES
    licences = (SAMPLES / "LICENSES.md").read_text()  # the samples' photographs are among them
    assert all(name in licences for name in TINY)


@pytest.fixture(scope="module")
def peers_python(tmp_path_factory):
    """An environment of its own with the classical peers, made as rali_edge/training/peers.py says."""
    import subprocess
    import sys

    venv = tmp_path_factory.mktemp("peers") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "brisque==0.2.0", "libsvm-official", "pypiqe==1.2",
                           "numpy<2.4", "opencv-python-headless", "pillow"], capture_output=True, text=True, timeout=900)
    if done.returncode:
        pytest.skip(f"could not install brisque and pypiqe: {done.stderr.strip().splitlines()[-1:]}")
    return str(venv / "bin" / "python")


@pytest.mark.slow
def test_peers_score_the_same_files_and_the_comparison_is_printed(tiny_set, tmp_path, capsys, peers_python):
    out = tmp_path / "summary.json"
    assert wp.main(["--model", "default", "--set", str(tiny_set.parent), "--peers", peers_python, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| distortion | rali-edge: within | rali-edge: pooled | BRISQUE: within | BRISQUE: pooled | PIQE: within" in printed
    assert "| blur | under 1000 px |" in printed
    summary = json.loads(out.read_text())
    for peer in ("brisque", "piqe"):
        blur = summary["peers"][peer]["per_distortion"]["blur"]
        assert -1.0 <= blur["within_photo_mean"] <= 1.0 and set(blur["within_photo"]) == set(TINY)
    # The peers' scores are turned so that higher is better: blur at level 5 ranks below clean.
    assert summary["peers"]["brisque"]["per_distortion"]["blur"]["within_photo_mean"] > 0

    # The scores are kept in the set for this environment: a second model compared reuses them.
    assert len(next(tiny_set.parent.glob("peers-scores-*.jsonl")).read_text().splitlines()) == len(wp.read_set(tiny_set))
    again = tmp_path / "again.json"
    assert wp.main(["--model", "default", "--set", str(tiny_set.parent), "--peers", peers_python, "--json", str(again)]) == 0
    assert "BRISQUE and PIQE scores of all" in capsys.readouterr().err
    assert json.loads(again.read_text())["peers"] == summary["peers"]


STUB_PEERS = """#!/bin/sh
# A stand-in for the peers' interpreter, to test what whole_photos does with its answers: the
# real peers run in the slow test above. $2 is peers.py's first argument.
echo "$*" >> "$STUB_CALLS"
if [ "$2" = "--versions" ]; then echo "${STUB_VERSIONS:-stub 1}" | sed 's/.*/{"brisque": "&"}/'; exit 0; fi
if [ -n "$STUB_EXIT" ]; then exit "$STUB_EXIT"; fi
if [ -n "$STUB_SKIP" ]; then read -r skipped; echo "a library's warning on standard output"; fi
while read -r path; do
  [ -n "$path" ] && echo "{\\"path\\": \\"$path\\", \\"brisque\\": $(wc -c < "$path"), \\"piqe\\": 1.5}"
done
"""


@pytest.fixture
def stub_peers(tmp_path, monkeypatch):
    stub = tmp_path / "stub-python"
    stub.write_text(STUB_PEERS)
    stub.chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("STUB_CALLS", str(calls))
    return stub, calls


def scoring_calls(calls) -> int:
    return sum("--workers" in line for line in calls.read_text().splitlines()) if calls.exists() else 0


def test_peer_scores_are_kept_per_file_and_environment_and_reused(tiny_set, tmp_path, stub_peers, monkeypatch):
    stub, calls = stub_peers
    set_dir = tmp_path / "set"
    shutil.copytree(tiny_set.parent, set_dir)
    for old in set_dir.glob("peers-scores-*"):
        old.unlink()
    rows = wp.read_set(set_dir / "labels.csv")
    first = wp.peer_scores(rows, str(stub), log=lambda _: None, cache_dir=set_dir)
    assert first["brisque"] == [-float(os.path.getsize(r["file"])) for r in rows]  # negated: higher is better
    assert scoring_calls(calls) == 1
    # Reused: nothing scored again, also from the set moved elsewhere.
    moved = tmp_path / "moved"
    set_dir.rename(moved)
    assert wp.peer_scores(wp.read_set(moved / "labels.csv"), str(stub), log=lambda _: None, cache_dir=moved) == first
    assert scoring_calls(calls) == 1
    # A rebuilt file is scored again, alone; a cache line of another shape is ignored.
    rebuilt = moved / "coffee" / "blur-3.jpg"
    os.utime(rebuilt, ns=(rebuilt.stat().st_atime_ns, rebuilt.stat().st_mtime_ns + 10**9))
    cache = next(moved.glob("peers-scores-*.jsonl"))
    with open(cache, "a") as f:
        f.write('{"key": ["coffee/blur-4.jpg", 1, 2], "brisque": "x"}\n{"path": "cut sh')
    log = []
    wp.peer_scores(wp.read_set(moved / "labels.csv"), str(stub), log=log.append, cache_dir=moved)
    assert scoring_calls(calls) == 2 and "scoring 1 files" in log[0]
    # Another peers environment does not reuse them.
    monkeypatch.setenv("STUB_VERSIONS", "0.3.0")
    wp.peer_scores(wp.read_set(moved / "labels.csv"), str(stub), log=lambda _: None, cache_dir=moved)
    assert scoring_calls(calls) == 3 and len(list(moved.glob("peers-scores-*.jsonl"))) == 2


def test_peers_that_fail_or_are_missing_are_one_line_and_exit_4(tiny_set, stub_peers, monkeypatch, capsys):
    stub, _ = stub_peers
    monkeypatch.setenv("STUB_EXIT", "3")  # killed with nothing on stderr
    monkeypatch.setenv("STUB_VERSIONS", "failing")
    args = ["--model", "default", "--set", str(tiny_set.parent)]
    assert wp.main([*args, "--peers", str(stub)]) == 4
    assert "the peers could not run in" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.delenv("STUB_EXIT")
    monkeypatch.setenv("STUB_SKIP", "1")  # a file without an answer, and a line that is not one
    assert wp.main([*args, "--peers", str(stub)]) == 4
    assert "failed on 1 files" in capsys.readouterr().err.splitlines()[-1]
    assert wp.main([*args, "--peers", "/no/such/python"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the peers could not run in /no/such/python") and "Traceback" not in "\n".join(err)


def test_unknown_peer_distortions_are_refused_before_scoring(capsys):
    with pytest.raises(SystemExit) as e:
        wp.main(["--peers", "x", "--peer-distortions", "blur,jpg"])
    assert e.value.code == 2 and "unknown jpg" in capsys.readouterr().err
