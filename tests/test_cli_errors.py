"""Bad input to the CLI: one line saying what to do, the documented exit code, no traceback, and
no work done before the error."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rali_edge.cli import EXIT_ENVIRONMENT, EXIT_USAGE, main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, code: int, *phrases: str):
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def test_score_output_in_a_missing_folder_fails_before_scoring(small_model, photos, tmp_path):
    out = tmp_path / "nonexistent" / "x.csv"
    result = run("score", "--model", small_model, photos[0], "-o", out, "--format", "csv")
    assert_clean_error(result, EXIT_USAGE, "does not exist (create it first)")
    assert "scored" not in result.stderr  # nothing was scored


def test_score_output_that_is_a_folder(small_model, photos, tmp_path):
    assert_clean_error(run("score", "--model", small_model, photos[0], "-o", tmp_path), EXIT_USAGE, "is a folder")


def test_eval_predictions_in_a_missing_folder_fails_before_scoring(small_model, photos, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,mos\n" + "".join(f"{p},{i + 1}\n" for i, p in enumerate(photos)))
    result = run("eval", small_model, labels, "--predictions", tmp_path / "nonexistent" / "p.csv")
    assert_clean_error(result, EXIT_USAGE, "does not exist (create it first)")
    assert "SRCC" not in result.output


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no file can be made in")
def test_score_output_where_no_file_can_be_made_fails_before_scoring(small_model, photos, tmp_path):
    # Permission bits say /proc is writable for root: only trying to write tells.
    result = run("score", "--model", small_model, photos[0], "-o", "/proc/rali-edge-test.csv")
    assert_clean_error(result, EXIT_USAGE, "cannot write /proc/rali-edge-test.csv")
    assert "scored" not in result.stderr
    regular = tmp_path / "regular"
    regular.write_text("")
    under_a_file = run("score", "--model", small_model, photos[0], "-o", regular / "x.csv")
    assert_clean_error(under_a_file, EXIT_USAGE, f"{regular} is a file, not a folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no file can be made in")
def test_output_folders_no_file_can_be_made_in_fail_before_the_work(small_model, photos, tmp_path):
    profiled = run("profile", "--model", small_model, "--images", photos[0], "--report", "/proc/rali-edge-report")
    assert_clean_error(profiled, EXIT_USAGE, "cannot write into /proc/rali-edge-report")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,mos\n" + "".join(f"{p},{i + 1}\n" for i, p in enumerate(photos)))
    fitted = run("fit-head", small_model, labels, "-o", "/proc/rali-edge-model")
    assert_clean_error(fitted, EXIT_USAGE, "cannot write the model into /proc/rali-edge-model")
    assert "embeddings" not in fitted.output  # refused before embedding anything


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes fail: disk full")
def test_a_full_disk_mid_run_is_one_line_and_exit_4(small_model, photos, tmp_path):
    for fmt in ("csv", "json"):
        result = run("score", "-q", "--model", small_model, *photos, "-o", "/dev/full", "--format", fmt)
        assert_clean_error(result, EXIT_ENVIRONMENT, "error: writing /dev/full: No space left on device")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,mos\n" + "".join(f"{p},{i + 1}\n" for i, p in enumerate(photos)))
    evaluated = run("eval", small_model, labels, "--predictions", "/dev/full")
    assert_clean_error(evaluated, EXIT_ENVIRONMENT, "writing /dev/full", "the report above is complete")
    assert "SRCC" in evaluated.stdout  # the metrics were printed before the predictions failed


def test_build_output_that_is_an_existing_other_file(small_model, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    result = run("build", small_model, "--target", "onnx", "-o", existing, "--no-check")
    assert_clean_error(result, EXIT_USAGE, "is an existing file", "ending in .onnx")
    assert existing.read_text() == "keep me"


def test_every_user_facing_error_is_defined_in_errors_py():
    import importlib
    import pkgutil

    import rali_edge
    import rali_edge.engines
    import rali_edge.kernels
    from rali_edge.errors import RaliEdgeError

    skip = ("rali_edge.training",)  # needs the [train] extra; defines no errors
    names = [info.name for package in (rali_edge, rali_edge.engines, rali_edge.kernels)
             for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    assert "rali_edge.engines.naming" in names and "rali_edge.cli.stream" in names
    for name in names:
        if not name.startswith(skip) and not name.endswith("__main__"):
            try:
                importlib.import_module(name)
            except ImportError:  # an optional dependency (TensorRT, pycuda...) absent here
                continue

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    assert {c.__module__ for c in subclasses(RaliEdgeError)} == {"rali_edge.errors"}


def test_make_demo_installs_only_what_the_demo_needs():
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        import pytest

        pytest.skip("no make here")
    root = Path(__file__).resolve().parent.parent

    def plan(target):  # what make would run on a fresh machine (-B: as if nothing were built)
        return subprocess.run(["make", "-n", "-B", target, "VENV=/nonexistent/venv"], cwd=root, capture_output=True,
                              text=True, check=True).stdout

    demo, test = plan("demo"), plan("test")
    assert "pip install -q torch==2.13.0" in demo and "pip install -q ." in demo and "-e ." not in demo + test
    assert "[test]" not in demo and "'.[test]'" in test


def test_ctrl_c_in_any_command_exits_130_without_a_traceback(monkeypatch):
    import rali_edge.cli.convert as convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.convert_command, "callback", interrupted)
    result = CliRunner().invoke(main, ["convert", ".", "-o", "x"])
    assert result.exit_code == 130 and "interrupted" in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)


def test_examples_name_one_published_model():
    """README and every command's --help call the published model by its one name, rali-vitl14-336."""
    import re
    from pathlib import Path

    from rali_edge.cli import COMMANDS

    texts = [(Path(__file__).resolve().parent.parent / "README.md").read_text()]
    texts += [CliRunner().invoke(main, [name, "--help"], terminal_width=200).output for name in COMMANDS]
    assert all("rali-vitl14-336" in t for t in texts[:2])  # the README and `score --help` show it
    names = {m.rstrip(".") for text in texts for m in re.findall(r"rali-vit[\w.-]*", text)}
    assert {n for n in names if n != "rali-vitl14-336" and not n.startswith("rali-vitl14-336.")} == set()


def test_a_device_rali_edge_does_not_run_on_is_a_usage_error_before_any_work(small_model, photos, tmp_path):
    for device in ("foo", "mps", "cuda:x"):
        result = run("score", "--model", small_model, "--device", device, photos[0])
        assert_clean_error(result, EXIT_USAGE, f"--device {device}: rali-edge runs on cpu, cuda or cuda:N")
    profiled = run("profile", "--model", small_model, "--device", "foo", "--images", photos[0], "--idle-seconds", "5")
    assert_clean_error(profiled, EXIT_USAGE, "--device foo")


def test_usage_mistakes_are_exit_2(small_model, photos, tmp_path, monkeypatch):
    assert_clean_error(run("score", "--model", small_model, "--backend", "onnx", photos[0]), EXIT_USAGE,
                       "needs an engine file (--engine PATH)")
    monkeypatch.setenv("RALI_MAX_PIXELS", "abc")
    assert_clean_error(run("score", "--model", small_model, photos[0]), EXIT_USAGE, "RALI_MAX_PIXELS must be")
    monkeypatch.delenv("RALI_MAX_PIXELS")
    monkeypatch.setenv("RALI_EDGE_BACKEND", "foo")
    assert_clean_error(run("score", "--model", small_model, photos[0]), EXIT_USAGE, "RALI_EDGE_BACKEND='foo' is not")
    monkeypatch.setenv("RALI_EDGE_BACKEND", "torch")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run("build", small_model, "--target", "onnx", "-o", tmp_path, "--calib-dir", empty), EXIT_USAGE,
                       "no images")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.jpg").write_bytes(b"not a jpeg")
    built = run("build", small_model, "--target", "onnx", "-o", tmp_path, "--calib-dir", unreadable)
    assert_clean_error(built, EXIT_USAGE, "none of its 1 images can be read")
    assert "exporting" not in built.output and not list(tmp_path.glob("*.onnx"))  # refused before building


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes fail: disk full")
def test_standard_output_on_a_full_disk_is_one_line_and_exit_4(small_model, photos):
    # `rali-edge score ... > /dev/full`: the shell's redirection skips -o's check. What stdout still
    # buffers must not fail a second time at exit (Python then reports it and exits 120).
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "rali_edge.cli", "score", "-q", "--model", str(small_model),
                                 "--format", "jsonl", *map(str, photos)], stdout=full, stderr=subprocess.PIPE,
                                text=True, env=env, timeout=300)
    assert result.returncode == 4, result.stderr
    assert "error: writing standard output: No space left on device" in result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr


def test_the_writability_probe_leaves_devices_and_fifos_alone(tmp_path):
    import os
    import threading

    from rali_edge.outputs import why_not_writable

    assert why_not_writable("/dev/null") is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    answer = []
    probe = threading.Thread(target=lambda: answer.append(why_not_writable(fifo)), daemon=True)
    probe.start()
    probe.join(timeout=5)
    assert answer == [None]  # opening a FIFO with no reader would have waited forever
    assert not [p for p in tmp_path.iterdir() if p != fifo]  # no stray file
