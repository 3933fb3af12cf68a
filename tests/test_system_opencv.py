"""Cameras on the stack Jetson users run, on Debian: the system's OpenCV (python3-opencv 4.6,
built with GStreamer and against numpy 1.x, as JetPack's is) in a --system-site-packages venv
made from Debian's own Python, installed by the docs' recipe as written, and a real RTSP server
on 127.0.0.1 (GStreamer's gst-rtsp-server through python3-gi: tests/rtsp_server.py).

Streams are read through FFmpeg (rtsp://) and through GStreamer pipelines (rtspsrc ... ! appsink,
videotestsrc ... ! appsink), four cameras at once, a server that goes away and comes back, a
camera that never answers, and a pipeline GStreamer cannot parse. `.ci/run` installs the Debian
packages; where they are missing the tests skip and say which."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
RECIPE_PAGE = ROOT / "docs" / "streams-and-jetson.md"
TORCH = "torch==2.13.0"  # the recipe's "$TORCH": the CPU wheel this machine has


def _system_stack_missing() -> str | None:
    probe = ("import cv2, gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer; "
             "assert cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER)")
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return f"no {SYSTEM_PYTHON}"
    if done.returncode:
        return ("needs Debian's python3-opencv, gir1.2-gst-rtsp-server-1.0 and GStreamer's plugins (.ci/run installs "
                f"them): {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'missing'}")
    return None


MISSING = _system_stack_missing()
if MISSING:
    pytest.skip(MISSING, allow_module_level=True)


def recipe() -> list[str]:
    """The shell lines of the docs' recipe for the system's OpenCV, as written."""
    text = RECIPE_PAGE.read_text()
    section = text[text.index("### The system's OpenCV"):]
    block = re.search(r"^```sh\n(.*?)^```", section, re.M | re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """The docs' recipe run line by line: `sudo apt install` is what .ci/run did (checked above),
    `~/rali` is a folder of this test, `python3` is Debian's, "$TORCH" the CPU wheel on disk, and
    `rali-edge` is this clone (the package is not fetched from PyPI)."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "TORCH": TORCH, "PATH": f"/usr/bin:{os.environ['PATH']}"}
    for var in ("VIRTUAL_ENV", "PYTHONPATH", "RALI_EDGE_BACKEND"):
        env.pop(var, None)
    lines = recipe()
    assert lines[0].startswith("sudo apt install python3-opencv") and "--system-site-packages" in lines[1]
    for line in lines[1:]:
        command = line.split("#")[0].strip().replace("pip install rali-edge", f"pip install {ROOT}")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], env=env, cwd=home, capture_output=True,
                              text=True, timeout=1200)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if "grep GStreamer" in command:
            assert "YES" in done.stdout, done.stdout
    return home / "rali"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    def __init__(self, port: int, streams: int = 4):
        self.port, self.streams, self.process = port, streams, None

    def start(self) -> "RtspServer":
        self.process = subprocess.Popen([SYSTEM_PYTHON, str(ROOT / "tests" / "rtsp_server.py"), "--port", str(self.port),
                                         "--streams", str(self.streams)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def url(self, i: int) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam{i}"

    def pipeline(self, i: int) -> str:
        return (f"rtspsrc location={self.url(i)} latency=0 ! rtph264depay ! h264parse ! avdec_h264 ! videoconvert ! "
                "video/x-raw,format=BGR ! appsink drop=1 max-buffers=1")


@pytest.fixture
def server():
    running = RtspServer(free_port()).start()
    yield running
    running.stop()


def stream(venv: Path, *args, timeout: float = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RALI_EDGE_CACHE": str(venv / "cache"), **(env_extra or {})}
    env.pop("RALI_EDGE_BACKEND", None)
    return subprocess.run([str(venv / "bin" / "rali-edge"), "stream", *map(str, args), "--summary-every", "0"],
                          env=env, capture_output=True, text=True, timeout=timeout)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # a torn line would not parse


def test_the_recipe_leaves_the_system_opencv_and_numpy_working(venv):
    code = "import cv2, numpy; print(cv2.__file__); print(numpy.__version__)"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    where, version = done.stdout.split()
    assert where.startswith("/usr/lib/python3/dist-packages/") and version.startswith("1.")


def test_rtsp_through_ffmpeg_and_gstreamer_and_a_test_pipeline(venv, server, tmp_path):
    out = tmp_path / "out.jsonl"
    test_pattern = "videotestsrc pattern=ball ! video/x-raw,width=320,height=240 ! videoconvert ! video/x-raw,format=BGR ! appsink"
    # --policy all: every selected frame is scored (live sources default to latest, which drops).
    done = stream(venv, server.url(0), server.pipeline(1), test_pattern, "--frames", "5", "--policy", "all", "--out", out)
    assert done.returncode == 0, done.stderr
    frames = [r for r in records(out) if r["type"] == "frame"]
    assert sorted({r["stream"] for r in frames}) == [0, 1, 2]
    assert all(sum(r["stream"] == s for r in frames) == 5 for s in range(3))
    assert all(1.0 <= r["score"] <= 5.0 for r in frames)


def test_four_cameras_are_scored_in_shared_batches(venv, server, tmp_path):
    out = tmp_path / "out.jsonl"
    done = stream(venv, *(server.url(i) for i in range(4)), "--frames", "10", "--policy", "all", "--out", out)
    assert done.returncode == 0, done.stderr
    frames = [r for r in records(out) if r["type"] == "frame"]
    assert sorted({r["stream"] for r in frames}) == [0, 1, 2, 3] and len(frames) == 40
    batches = re.search(r"40 frames scored in (\d+) batches", done.stderr)
    assert batches and int(batches.group(1)) < 40, done.stderr  # four cameras, fewer encoder calls than frames


def test_every_stream_reconnects_when_the_server_comes_back(venv, tmp_path):
    out = tmp_path / "out.jsonl"
    server = RtspServer(free_port(), streams=2).start()
    env = {**os.environ, "RALI_EDGE_CACHE": str(venv / "cache")}
    env.pop("RALI_EDGE_BACKEND", None)
    run = subprocess.Popen([str(venv / "bin" / "rali-edge"), "stream", server.url(0), server.pipeline(1), "--fps", "3",
                            "--duration", "40", "--summary-every", "0", "--out", str(out)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(12)
        server.stop()  # the cameras go away for a while...
        gone = time.time()
        time.sleep(6)
        server.start()  # ... and come back on the same address
        back = time.time()
        _, err = run.communicate(timeout=180)
    finally:
        server.stop()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    frames = [r for r in records(out) if r["type"] == "frame"]
    for s in (0, 1):
        mine = [r for r in frames if r["stream"] == s]
        assert any(r["wall_time"] < gone for r in mine) and any(r["wall_time"] > back for r in mine), (s, err)
        assert len({r["frame"] for r in mine}) == len(mine)  # no record repeated
        assert [r["frame"] for r in mine] == sorted(r["frame"] for r in mine)
    summary = [line for line in err.splitlines() if re.match(r"stream \d \[", line)]  # the final summary
    assert len(summary) == 2 and all(int(re.search(r"(\d+) reconnects", line).group(1)) >= 1 for line in summary)


def test_a_camera_that_never_answers_is_retried_while_the_others_are_scored(venv, server, tmp_path):
    out = tmp_path / "out.jsonl"
    silent = f"rtsp://127.0.0.1:{free_port()}/nobody"
    done = stream(venv, server.url(0), silent, "--duration", "12", "--fps", "2", "--out", out)
    assert done.returncode == 0, done.stderr
    frames = [r for r in records(out) if r["type"] == "frame"]
    assert frames and {r["stream"] for r in frames} == {0}
    last = [line for line in done.stderr.splitlines() if line.startswith("stream 1 [")]
    assert last and ("reconnecting" in last[-1] or "0 scored" in last[-1]), done.stderr


def test_a_pipeline_gstreamer_cannot_parse_is_a_one_line_usage_error(venv):
    done = stream(venv, "videotestsrc ! notanelement ! appsink", timeout=120)
    assert done.returncode == 2 and 'no element "notanelement"' in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1


def test_numpy_2_beside_the_system_opencv_is_said_in_one_line(venv, server):
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    assert subprocess.run([*pip, "numpy>=2"], capture_output=True, timeout=600).returncode == 0
    try:
        done = stream(venv, server.url(0), "--frames", "1", timeout=120)
    finally:
        subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-y", "-q", "numpy"], capture_output=True, timeout=300)
    assert done.returncode == 4 and "Traceback" not in done.stderr, done.stderr
    assert "built against numpy 1.x" in done.stderr and "numpy 2." in done.stderr
