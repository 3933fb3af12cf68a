"""`rali-edge stream` end to end on video files and folders these tests write themselves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

cv2 = pytest.importorskip("cv2")

from rali_edge.cli import main  # noqa: E402

FPS = 10
N_FRAMES = 40  # 4 s at 10 fps
BAD = range(15, 25)  # the degraded segment: darkened and blurred (a fogged lens at night)
SIZE = 96


def scene(i: int) -> np.ndarray:
    """RGB frame i: a slowly panning crop of the astronaut photo (CC0/public domain, in scikit-image)."""
    from skimage import data

    photo = data.astronaut()
    x = 100 + 3 * i
    crop = np.ascontiguousarray(photo[80 : 80 + 288, x : x + 288])
    frame = cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    if i in BAD:
        frame = cv2.GaussianBlur(frame, (9, 9), 3)
        frame = (frame * 0.15).astype(np.uint8)
    return frame


def write_video(path: Path, n: int = N_FRAMES) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (SIZE, SIZE))
    assert writer.isOpened()
    for i in range(n):
        writer.write(cv2.cvtColor(scene(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("videos") / "clip.avi")


class BrightnessScorer:
    """Stands in for the model: 1 + 4 * mean brightness. Records every batch size."""

    def __init__(self):
        self.batches: list[int] = []

    def score_arrays(self, frames):
        self.batches.append(len(frames))
        for f in frames:
            assert f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3
        return [1.0 + 4.0 * float(f.mean()) / 255.0 for f in frames]


@pytest.fixture
def fake_scorer(monkeypatch):
    scorer = BrightnessScorer()
    monkeypatch.setattr("rali_edge.cli.common.load_scorer", lambda **kwargs: scorer)
    return scorer


def run_cli(*args):
    return CliRunner().invoke(main, ["stream", *map(str, args), "--summary-every", "0"], catch_exceptions=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_frame_scored_and_degraded_segment_lower(video, tmp_path, fake_scorer):
    out = tmp_path / "out.jsonl"
    result = run_cli(video, "--out", out, "--alert-below", "2.0", "--alert-frames", "3")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    frames = [r for r in records if r["type"] == "frame"]
    assert [r["frame"] for r in frames] == list(range(N_FRAMES))  # files default to policy all
    assert all(r["stream"] == 0 and r["source"] == str(video) and r["dropped"] == 0 for r in frames)
    # Media timestamps of a 10 fps file: frame i at i/10 s (container stores ms).
    assert all(abs(r["source_ts"] - r["frame"] / FPS) < 1e-3 for r in frames)
    bad = [r["score"] for r in frames if r["frame"] in BAD]
    good = [r["score"] for r in frames if r["frame"] not in BAD]
    assert max(bad) < min(good)
    alerts = [(r["alert"], r["frame"]) for r in records if r["type"] == "alert"]
    assert alerts == [("low", BAD.start + 2), ("recovered", BAD.stop + 2)]


def test_several_sources_are_batched_together(video, tmp_path, fake_scorer):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(scene(i)).save(folder / f"frame{i}.png")
    out = tmp_path / "out.jsonl"
    result = run_cli(video, video, folder, "--out", out, "--max-batch", "8")
    assert result.exit_code == 0, result.output
    frames = [r for r in read_jsonl(out) if r["type"] == "frame"]
    counts = {s: sum(r["stream"] == s for r in frames) for s in range(3)}
    assert counts == {0: N_FRAMES, 1: N_FRAMES, 2: 12}
    total = 2 * N_FRAMES + 12
    assert sum(fake_scorer.batches[1:]) == total  # [0] is the warm-up call
    # One call per frame would be 92 calls; batching takes several sources per call.
    assert len(fake_scorer.batches) - 1 < total / 2, fake_scorer.batches
    assert max(fake_scorer.batches) <= 8


def test_csv_to_stdout_with_every(video, fake_scorer):
    result = run_cli(video, "--format", "csv", "--out", "-", "--every", "10")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[0].startswith("type,stream,source,frame,source_ts,wall_time,score,latency_ms,dropped")
    assert [line.split(",")[3] for line in lines[1:]] == ["0", "10", "20", "30"]


def test_frames_limit_and_fps(video, tmp_path, fake_scorer):
    out = tmp_path / "out.jsonl"
    result = run_cli(video, "--out", out, "--fps", "2.5", "--frames", "3")
    assert result.exit_code == 0, result.output
    assert [r["frame"] for r in read_jsonl(out)] == [0, 4, 8]  # 10 fps file, 2.5 fps: every 4th frame


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["no-such-clip.mp4"], 2, "source not found"),
        (["{video}", "--every", "2", "--fps", "3"], 2, "alternatives"),
        (["{video}", "--on-alert", "true"], 2, "--on-alert needs --alert-below"),
    ],
)
def test_usage_errors(video, fake_scorer, args, code, message):
    result = CliRunner().invoke(main, ["stream", *[a.format(video=video) for a in args]])
    assert result.exit_code == code
    assert message in result.output


def test_missing_opencv_is_exit_4_with_install_hint(video, monkeypatch, fake_scorer):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    result = CliRunner().invoke(main, ["stream", str(video)])
    assert result.exit_code == 4
    assert "pip install 'rali-edge[stream]'" in result.output
    assert fake_scorer.batches == []  # failed before loading a model


def test_model_that_cannot_load_is_exit_3(video, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = CliRunner().invoke(main, ["stream", str(video), "--model", str(empty)])
    assert result.exit_code == 3, result.output
    assert "error:" in result.output


def test_file_source_that_cannot_be_read_is_exit_1_and_others_are_scored(video, tmp_path, fake_scorer):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"this is not a video")
    out = tmp_path / "out.jsonl"
    result = run_cli(video, broken, "--out", out)
    assert result.exit_code == 1
    assert "failed" in result.stderr
    assert sum(r["stream"] == 0 for r in read_jsonl(out)) == N_FRAMES


SIGINT_DRIVER = textwrap.dedent(
    """
    import sys, time
    import rali_edge.cli.common as common

    class SlowBrightness:
        def score_arrays(self, frames):
            time.sleep(0.02)
            return [1.0 + 4.0 * float(f.mean()) / 255.0 for f in frames]

    common.load_scorer = lambda **kwargs: SlowBrightness()
    from rali_edge.cli import main
    main(["stream", *sys.argv[1:]], prog_name="rali-edge")
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_whole_lines(video, tmp_path, sig):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGINT_DRIVER)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(video), str(video), "--loop", "--out", str(out), "--summary-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopping" in stderr
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line is whole JSON
    assert len(records) >= 20
