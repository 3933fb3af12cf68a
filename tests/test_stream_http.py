"""`rali-edge stream --http`: Prometheus metrics, the streams as JSON and a live page, served while
two sources are scored, looked at as Prometheus reads them and as a person sees them: the page in
a real headless Chromium (Debian's; .ci/run installs it)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

prometheus_parser = pytest.importorskip("prometheus_client.parser")

SAMPLES = Path(__file__).resolve().parent.parent / "rali_edge" / "assets" / "samples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read(), answer.headers["Content-Type"]


def write_video(path: Path, stills: list, seconds_each: float = 1.0, fps: int = 10) -> None:
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, stills[0].size)
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 100)  # blocking artefacts would be a distortion of their own
    for still in stills:
        bgr = np.ascontiguousarray(np.asarray(still)[..., ::-1])
        for _ in range(int(seconds_each * fps)):
            writer.write(bgr)
    writer.release()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """Two looping videos of the bundled clean photographs, one sharp and one badly blurred (it
    alerts), read as cameras deliver them and scored by the built-in model with --http; yields
    (base URL, the JSONL output, the process)."""
    folder = tmp_path_factory.mktemp("sources")
    photos = [Image.open(p).convert("RGB").resize((320, 240)) for p in sorted(SAMPLES.glob("*_clean.jpg"))]
    clean, blurred = folder / "clean.avi", folder / "blurred.avi"
    write_video(clean, photos)
    write_video(blurred, [p.filter(ImageFilter.GaussianBlur(6)) for p in photos])
    port, out = free_port(), folder / "frames.jsonl"
    env = {**os.environ, "RALI_EDGE_BACKEND": "torch"}
    process = subprocess.Popen([sys.executable, "-m", "rali_edge.cli", "stream", str(clean), str(blurred), "--loop",
                                "--realtime", "--fps", "4", "--duration", "45", "--alert-below", "2.5", "--alert-frames", "3",
                                "--http", f"127.0.0.1:{port}", "--out", str(out), "--summary-every", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until both streams have scored frames and the blurred one alerts
        try:
            streams = json.loads(get(f"{base}/streams")[0])["streams"]
            if all(s["scored"] >= 6 for s in streams) and streams[1]["alerting"]:
                break
        except OSError:
            pass
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"the streams never got going: {process.communicate()}")
    yield base, out, process
    process.wait(timeout=120)


def test_passwords_in_sources_are_not_served():
    from rali_edge.runtime.monitor import redacted

    assert redacted("rtsp://admin:s3cret@10.0.0.5:554/stream1") == "rtsp://admin:***@10.0.0.5:554/stream1"
    assert redacted("rtsp://10.0.0.5/stream1") == "rtsp://10.0.0.5/stream1"
    pipeline = "rtspsrc location=rtsp://u:p@cam/x latency=0 ! appsink"
    assert "p@" not in redacted(pipeline) and "u:***@cam" in redacted(pipeline)


def test_streams_as_json(running):
    base, _, _ = running
    body, kind = get(f"{base}/streams")
    streams = json.loads(body)["streams"]
    assert kind == "application/json" and [s["stream"] for s in streams] == [0, 1]
    clean, blurred = streams
    assert clean["status"] == "running" and not clean["alerting"] and blurred["alerting"]
    assert blurred["latest_score"] < 2.5 < clean["latest_score"]
    assert len(clean["history"]) >= 6 and all(1.0 <= v <= 5.0 for _, v in clean["history"])


def test_prometheus_metrics_per_stream(running):
    base, _, _ = running
    body, kind = get(f"{base}/metrics")
    assert kind.startswith("text/plain")
    families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(body.decode())}
    scored = {s.labels["stream"]: s.value for s in families["rali_stream_frames_scored"].samples
              if s.name.endswith("_total")}
    assert set(scored) == {"0", "1"} and all(v >= 6 for v in scored.values())
    alert = {s.labels["stream"]: s.value for s in families["rali_stream_alert"].samples}
    assert alert == {"0": 0.0, "1": 1.0}
    hist = [s for s in families["rali_stream_score"].samples if s.name == "rali_stream_score_count"]
    assert {s.labels["stream"] for s in hist} == {"0", "1"}
    for name in ("rali_stream_latency_seconds", "rali_stream_frames_read", "rali_stream_reconnects", "rali_stream_up",
                 "process_resident_memory_bytes"):
        assert name in families, name


def test_the_newest_frame_as_a_thumbnail(running):
    base, _, _ = running
    body, kind = get(f"{base}/frame/0.jpg")
    assert kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    import io

    assert Image.open(io.BytesIO(body)).width <= 320
    with pytest.raises(urllib.error.HTTPError, match="404"):
        get(f"{base}/frame/7.jpg")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_in_a_real_browser(running, tmp_path):
    base, _, _ = running
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,520", "--virtual-time-budget=6000"]
    dom = subprocess.run([*flags, "--dump-dom", f"{base}/"], capture_output=True, text=True, timeout=120).stdout
    cards = re.findall(r'<div class="card( alerting)?" id="stream-(\d)">(.*?)</svg>', dom, re.S)
    assert [c[1] for c in cards] == ["0", "1"], dom[-2000:]
    (clean_alert, _, clean), (blurred_alert, _, blurred) = cards
    assert clean_alert == "" and blurred_alert == " alerting"  # the blurred camera is highlighted
    for html in (clean, blurred):
        assert re.search(r'class="state running">running<', html)
        assert re.search(r'class="score">[1-5]\.\d\d<', html)  # its newest score
        assert re.search(r'<img class="thumb"[^>]*data-loaded="1"', html)  # its newest frame, shown
        assert re.search(r'<polyline[^>]*points="[\d., ]{20,}"', html)  # its scores over time, drawn
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", f"{base}/"], capture_output=True, timeout=120)
    assert Image.open(shot).size == (1100, 520)
    if os.environ.get("RALI_EDGE_SCREENSHOT"):  # how docs/stream-page.png is made
        shutil.copy(shot, os.environ["RALI_EDGE_SCREENSHOT"])


def test_the_run_ends_with_every_record_written(running):
    base, out, process = running
    process.wait(timeout=120)  # the run ends (--duration): the output is complete
    assert process.returncode == 0, process.communicate()
    frames = [json.loads(line) for line in out.read_text().splitlines()]
    counts = {str(s): sum(r["type"] == "frame" and r["stream"] == s for r in frames) for s in (0, 1)}
    assert all(n >= 6 for n in counts.values())
    assert {r["stream"] for r in frames if r["type"] == "alert"} == {1}
