"""`rali-edge stream` end to end on video files and folders these tests write themselves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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
        frame = degrade(frame)
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


def degrade(frame: np.ndarray) -> np.ndarray:
    return (cv2.GaussianBlur(frame, (9, 9), 3) * 0.15).astype(np.uint8)


@pytest.fixture(scope="module")
def quality_model(small_model, tmp_path_factory) -> Path:
    """The small random model with a head we control: two prototypes, score 4.5 at the mean
    head-space direction of clean photos and 1.5 at that of the same photos dimmed and blurred.
    Calibrated on *other* photos (coffee, chelsea, rocket) than the astronaut in the test video,
    so the video's dark segment scoring lower is a real prediction of the model, not a lookup.
    (A random head gives no reason for a dark frame to score lower.)"""
    import torch
    import torch.nn.functional as F
    from skimage import data

    from rali_edge.head import RaliHead
    from rali_edge.model_file import load_model, save_model
    from rali_edge.scoring import Scorer

    model, manifest = load_model(small_model)
    scorer = Scorer(model, manifest)
    head = scorer.head

    def direction(frames):
        cls = scorer.encoder(scorer.preprocess.arrays_to_tensor(frames))
        z = F.normalize(F.layer_norm(cls.float(), (cls.shape[-1],), eps=head.ln_eps) @ head.weight.T + head.bias, dim=-1)
        return F.normalize(z.mean(0), dim=0)

    photos = [cv2.resize(getattr(data, n)(), (SIZE, SIZE), interpolation=cv2.INTER_AREA) for n in ("coffee", "chelsea", "rocket")]
    controlled = RaliHead(head.weight.shape[1], head.weight.shape[0], 2, head.ln_eps)
    with torch.no_grad():
        controlled.weight.copy_(head.weight)
        controlled.bias.copy_(head.bias)
        controlled.prototypes.copy_(torch.stack([direction(photos), direction([degrade(p) for p in photos])]))
        controlled.proto_scores.copy_(torch.tensor([4.5, 1.5]))
        controlled.logit_scale.fill_(30.0)
    model.head = controlled
    return save_model(tmp_path_factory.mktemp("model") / "quality", model, manifest)


class BatchCounter:
    """Wraps the real Scorer.score_arrays to record the size of every batch."""

    def __init__(self, monkeypatch):
        from rali_edge.scoring import Scorer

        self.batches: list[int] = []
        real = Scorer.score_arrays

        def counted(scorer, frames):
            self.batches.append(len(frames))
            return real(scorer, frames)

        monkeypatch.setattr(Scorer, "score_arrays", counted)


def run_cli(model, *args):
    args = ["stream", *map(str, args), "--model", str(model), "--summary-every", "0"]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_frame_scored_and_degraded_segment_lower(video, tmp_path, quality_model):
    out = tmp_path / "out.jsonl"
    result = run_cli(quality_model, video, "--out", out, "--alert-below", "3.0", "--alert-frames", "3")
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    frames = [r for r in records if r["type"] == "frame"]
    assert [r["frame"] for r in frames] == list(range(N_FRAMES))  # files default to policy all
    assert all(r["stream"] == 0 and r["source"] == str(video) and r["dropped"] == 0 for r in frames)
    # Media timestamps of a 10 fps file: frame i at i/10 s (the container stores milliseconds).
    assert all(abs(r["source_ts"] - r["frame"] / FPS) < 1e-3 for r in frames)
    bad = [r["score"] for r in frames if r["frame"] in BAD]
    good = [r["score"] for r in frames if r["frame"] not in BAD]
    # Measured: bad ~2.2, good 3.8..4.3. Asserting only the order, plus the threshold we alert at.
    assert max(bad) < 3.0 < min(good), (bad, good)
    alerts = [(r["alert"], r["frame"]) for r in records if r["type"] == "alert"]
    assert alerts == [("low", BAD.start + 2), ("recovered", BAD.stop + 2)]  # once each, after 3 frames
    assert "ALERT stream 0" in result.stderr


def test_scores_match_the_scorer_called_directly(video, tmp_path, quality_model):
    # The runtime must hand the scorer the decoded RGB frames unchanged (no BGR mix-up, no
    # resize of its own): records equal score_arrays on frames decoded here. Same decoder, same
    # model, different batch composition: fp32 batch-size noise only, hence 1e-4.
    import rali_edge

    out = tmp_path / "out.jsonl"
    assert run_cli(quality_model, video, "--out", out, "--every", "7").exit_code == 0
    cap = cv2.VideoCapture(str(video))
    decoded = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    expected = rali_edge.load(quality_model).score_arrays(decoded[::7])
    got = [r["score"] for r in read_jsonl(out)]
    assert np.allclose(got, expected, atol=1e-4)


def test_several_sources_are_batched_together(video, tmp_path, quality_model, monkeypatch):
    from PIL import Image

    counter = BatchCounter(monkeypatch)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(scene(i)).save(folder / f"frame{i}.png")
    out = tmp_path / "out.jsonl"
    result = run_cli(quality_model, video, video, folder, "--out", out, "--max-batch", "8")
    assert result.exit_code == 0, result.output
    frames = [r for r in read_jsonl(out) if r["type"] == "frame"]
    counts = {s: sum(r["stream"] == s for r in frames) for s in range(3)}
    assert counts == {0: N_FRAMES, 1: N_FRAMES, 2: 12}
    total = 2 * N_FRAMES + 12
    assert counter.batches[0] == 1 and sum(counter.batches[1:]) == total  # [0]: the warm-up call
    # One call per frame would be 92 calls; batching takes several sources per call.
    assert len(counter.batches) - 1 < total / 2, counter.batches
    assert max(counter.batches) <= 8
    # The two copies of the same file score alike frame by frame, whatever batch they were in.
    by_frame = {}
    for r in frames:
        by_frame.setdefault((r["frame"], r["stream"]), r["score"])
    # Records round scores to 4 decimals: a 1e-6 difference between batches can flip the last digit.
    assert all(abs(by_frame[(i, 0)] - by_frame[(i, 1)]) < 1.5e-4 for i in range(N_FRAMES))


def test_csv_to_stdout_with_every(video, quality_model):
    result = run_cli(quality_model, video, "--format", "csv", "--out", "-", "--every", "10")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[0] == "type,stream,source,frame,source_ts,wall_time,score,latency_ms,dropped,alert,threshold"
    assert [line.split(",")[3] for line in lines[1:]] == ["0", "10", "20", "30"]


def test_fps_frames_limit_and_append(video, tmp_path, quality_model):
    out = tmp_path / "out.csv"
    for _ in range(2):  # the format from the suffix, as `score` takes it
        result = run_cli(quality_model, video, "--out", out, "--append", "--fps", "2.5", "--frames", "3")
        assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].startswith("type,") and sum(line.startswith("type,") for line in lines) == 1  # one header
    assert [line.split(",")[3] for line in lines[1:]] == ["0", "4", "8"] * 2  # 10 fps file, 2.5 fps: every 4th


def test_append_refuses_a_file_of_another_format_before_the_model_loads(video, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr("rali_edge.cli.common.load_scorer", lambda **kw: loaded.append(kw))
    csv_file, jsonl_file = tmp_path / "out.csv", tmp_path / "out.jsonl"
    csv_file.write_text("type,stream,source,frame,source_ts,wall_time,score,latency_ms,dropped,alert,threshold\n")
    jsonl_file.write_text('{"type": "frame", "stream": 0}\n')
    for out, fmt, words in ((csv_file, "jsonl", "not a jsonl output"), (jsonl_file, "csv", "not a csv output"),
                            (csv_file, None, None)):
        before = out.read_text()
        args = ["stream", str(video), "--out", str(out), "--append", *(["--format", fmt] if fmt else [])]
        result = CliRunner().invoke(main, args)
        if words is None:  # the suffix's own format: accepted (the stub scorer then fails to score)
            assert "not a" not in result.output
            continue
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
        assert out.read_text() == before and loaded == []  # untouched, and no model loaded
    other = CliRunner().invoke(main, ["stream", str(video), "--out", str(tmp_path / "x.parquet")])
    assert other.exit_code == 2 and "jsonl or csv" in other.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["no-such-clip.mp4"], 2, "source not found"),
        (["{video}", "--every", "2", "--fps", "3"], 2, "alternatives"),
        (["{video}", "--on-alert", "true"], 2, "--on-alert needs --alert-below"),
        (["{video}", "--out", "/no/such/folder/out.jsonl"], 2, "cannot write"),
    ],
)
def test_usage_errors(video, args, code, message, monkeypatch):
    loaded = []
    monkeypatch.setattr("rali_edge.cli.common.load_scorer", lambda **kw: loaded.append(kw))
    result = CliRunner().invoke(main, ["stream", *[a.format(video=video) for a in args]])
    assert result.exit_code == code
    assert message in result.output
    assert loaded == []  # found before a model loads


def test_missing_opencv_is_exit_4_with_install_hint(video, monkeypatch):
    loaded = []
    monkeypatch.setattr("rali_edge.cli.common.load_scorer", lambda **kw: loaded.append(kw))
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    result = CliRunner().invoke(main, ["stream", str(video)])
    assert result.exit_code == 4
    assert "pip install 'rali-edge[stream]'" in result.output
    assert loaded == []


@pytest.mark.skipif(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER), reason="this OpenCV has GStreamer")
def test_gstreamer_pipeline_without_gstreamer_opencv_is_exit_4():
    result = CliRunner().invoke(main, ["stream", "videotestsrc ! videoconvert ! appsink"])
    assert result.exit_code == 4
    assert "no GStreamer support" in result.output and "JetPack" in result.output


def test_image_folder_needs_no_opencv(tmp_path, quality_model, monkeypatch):
    from PIL import Image

    for i in (3, 1, 2):
        Image.fromarray(scene(i)).save(tmp_path / f"img{i}.png")
    monkeypatch.setitem(sys.modules, "cv2", None)
    out = tmp_path / "out.jsonl"
    result = run_cli(quality_model, tmp_path, "--out", out)
    assert result.exit_code == 0, result.output
    assert [r["frame"] for r in read_jsonl(out)] == [0, 1, 2]


def test_model_that_cannot_load_is_exit_3(video, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = CliRunner().invoke(main, ["stream", str(video), "--model", str(empty)])
    assert result.exit_code == 3, result.output
    assert "error:" in result.output and "manifest.json" in result.output
    # A usage error while loading stays one (exit 2), as in every other command.
    usage = CliRunner().invoke(main, ["stream", str(video), "--backend", "torch", "--dtype", "int8"])
    assert usage.exit_code == 2 and "--dtype int8 runs as an ONNX engine" in usage.output, usage.output


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes fail: disk full")
def test_an_output_that_fails_mid_run_stops_the_stream_with_one_line_and_exit_4(video):
    result = CliRunner().invoke(main, ["stream", str(video), "--out", "/dev/full"])
    assert result.exit_code == 4, result.output
    assert "error: writing /dev/full: No space left on device" in result.output and "Traceback" not in result.output


def test_file_source_that_cannot_be_read_is_exit_1_and_others_are_scored(video, tmp_path, quality_model):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"this is not a video")
    out = tmp_path / "out.jsonl"
    result = run_cli(quality_model, video, broken, "--out", out)
    assert result.exit_code == 1
    assert "stream 1 (" in result.stderr and "failed" in result.stderr
    assert sum(r["stream"] == 0 for r in read_jsonl(out)) == N_FRAMES


@pytest.mark.slow
def test_unreachable_camera_is_retried_while_a_file_is_scored(video, tmp_path, quality_model):
    # Nothing listens on port 9: OpenCV's FFmpeg backend is refused at once, and the live source
    # goes into backoff (0.5 s, 1 s...) until --duration ends the run; a live source that fails is
    # not a failed run (exit 0), and the file next to it is scored in full.
    out = tmp_path / "out.jsonl"
    # --every 10: the file's 4 frames are one batch, well inside the 3 s even on a busy machine.
    result = run_cli(quality_model, video, "rtsp://127.0.0.1:9/none", "--out", out, "--duration", "3", "--every", "10")
    assert result.exit_code == 0, result.output
    assert "stream 1 (rtsp://127.0.0.1:9/none): reconnecting" in result.stderr
    assert "stream 1 [stopped]" in result.stderr and "stream 0 [ended]" in result.stderr
    assert [r["frame"] for r in read_jsonl(out)] == [0, 10, 20, 30]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_whole_lines(video, tmp_path, quality_model, sig):
    out = tmp_path / "out.jsonl"
    cli = Path(sys.executable).with_name("rali-edge")
    command = [str(cli)] if cli.exists() else [sys.executable, "-c", "from rali_edge.cli import main; main()"]
    proc = subprocess.Popen(
        [*command, "stream", str(video), str(video), "--loop", "--model", str(quality_model), "--out", str(out),
         "--summary-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60  # importing torch on a busy 2-core machine can take a while
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
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
    assert len(records) >= 6


def test_an_empty_folder_source_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    result = CliRunner().invoke(main, ["stream", str(tmp_path)])
    assert result.exit_code == 2 and "no images in this folder" in result.output, result.output


def test_a_folder_source_with_no_decodable_image_is_a_failed_source(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["stream", str(folder)])
    assert result.exit_code == 1, result.output
    assert "none of its 2 frames could be decoded" in result.output and "skipped" not in result.output


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes fail: disk full")
def test_stream_to_a_full_standard_output_is_one_line_and_exit_4(video):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "rali_edge.cli", "stream", str(video)], stdout=full,
                                stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert result.returncode == 4, result.stderr
    assert "error: writing standard output: No space left on device" in result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
