"""Every example in the README and docs/ runs as written: the ```bash blocks through bash (the
installed `rali-edge` on PATH), the ```python blocks through this Python, in order, page by page,
in a folder holding the files the examples name (photo.jpg, shots/, labels.csv, clip.mp4 ...),
with the real default backend and an engine cache of their own. Blocks marked ```sh and ```py are
not run: each must say why (a GPU, a Jetson, a network, the published weights), which
`test_blocks_not_run_say_why` checks, so that a CPU example cannot hide among them."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
# What keeps a block from running on a CPU in CI; a block marked sh or py names one of them.
NOT_HERE = ("cuda", "tensorrt", ".plan", "jetson", "nvpmodel", "sudo", "pip install", "rali-vitl14-336", "s3://",
            "gs://", "/dev/video", "rtsp://", "nvarguscamerasrc", "v4l2", "--baseline-model", "make test",
            "python -m rali_edge.training")
SAMPLES = ROOT / "rali_edge" / "assets" / "samples"


def blocks(page: Path) -> list[tuple[str, str]]:
    return BLOCK.findall(page.read_text())


def test_there_are_examples_to_run_on_every_page():
    for page in PAGES:
        if page.name == "development.md":  # make setup, test-fast and test: what CI runs
            continue
        assert any(kind in ("bash", "python") for kind, _ in blocks(page)), f"{page.name} runs no example"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_blocks_not_run_say_why(page):
    for kind, code in blocks(page):
        if kind in ("sh", "py"):
            assert any(word in code.lower() for word in NOT_HERE), f"{page.name}: runnable?\n{code}"


def make_workspace(folder: Path) -> None:
    """The files the examples name: photographs (the bundled samples), a folder of them, labels,
    a list, a short video and a folder of frames."""
    samples = sorted(SAMPLES.glob("*.jpg"))
    shutil.copytree(SAMPLES, folder / "shots", ignore=shutil.ignore_patterns("*.md"))
    for name, sample in (("photo.jpg", "coffee_clean.jpg"), ("a.jpg", "chelsea_clean.jpg"), ("b.jpg", "astronaut_noise-4.jpg")):
        shutil.copy(SAMPLES / sample, folder / name)
    (folder / "more" / "x").mkdir(parents=True)
    Image.open(samples[0]).save(folder / "more" / "x" / "y.png")
    rows = []
    for p in samples:  # clean 5, then lower with the distortion's level
        level = re.search(r"-(\d)\.jpg$", p.name)
        rows.append(f"shots/{p.name},{5.0 if level is None else 4.5 - 0.7 * int(level.group(1)):.1f}")
    (folder / "labels.csv").write_text("path,mos\n" + "\n".join(rows) + "\n")
    (folder / "todo.txt").write_text("\n".join(f"shots/{p.name}" for p in samples[:4]) + "\n")
    (folder / "frames").mkdir()
    for i, p in enumerate(samples[:6]):
        shutil.copy(p, folder / "frames" / f"f{i}.jpg")
    _write_video(folder / "clip.mp4", samples[:4])


def _write_video(path: Path, stills: list[Path], frames_each: int = 5) -> None:
    cv2 = pytest.importorskip("cv2")
    size = (320, 240)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for still in stills:
        bgr = np.asarray(Image.open(still).convert("RGB").resize(size))[..., ::-1]
        for _ in range(frames_each):
            writer.write(np.ascontiguousarray(bgr))
    writer.release()


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    """One engine cache for every page, as one user's machine has: what auto measured and built
    for one page's examples is reused by the next."""
    return tmp_path_factory.mktemp("engine-cache")


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_example_runs(page, tmp_path, engine_cache):
    make_workspace(tmp_path)
    env = {**os.environ, "RALI_EDGE_CACHE": str(engine_cache),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RALI_EDGE_BACKEND", None)  # the examples run as users run them: backend auto
    for kind, code in blocks(page):
        if kind == "bash":
            command = ["bash", "-euo", "pipefail", "-c", code]
        elif kind == "python":
            command = [sys.executable, "-c", code]
        else:
            continue
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "Traceback" not in output, f"{page.name}:\n{code}\n---\n{output[-3000:]}"
