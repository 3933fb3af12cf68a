"""bench/gpu_check.sh on a machine without a GPU (CI): one line saying so, exit 4, nothing
written; an unknown part is a usage error (exit 2). On a GPU machine it is run, not tested."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def check(*parts):
    return subprocess.run(["bash", str(SCRIPT), *parts], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_4():
    before = sorted((SCRIPT.parent / "results").iterdir())
    result = check()
    assert result.returncode == 4
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in result.stderr
    assert sorted((SCRIPT.parent / "results").iterdir()) == before
    assert check("head", "e2e").returncode == 4


def test_an_unknown_part_is_a_usage_error_that_lists_the_parts():
    result = check("head", "bogus")
    assert result.returncode == 2
    assert "bogus" in result.stderr and "encoder" in result.stderr and "aoti" in result.stderr


def load_gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT.parent / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(gpu)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu


@pytest.mark.slow
def test_the_python_parts_dry_run_on_a_cpu(tmp_path):
    """The files-to-scores part and the encoder timing, on a 1-layer model on the CPU: the code the
    lent GPU will run, its table and its JSON, checked here first (minutes there are scarce)."""
    import json

    import rali_edge

    gpu = load_gpu_bench()
    out = tmp_path / "e2e.md"
    rows = gpu.files_to_scores(tmp_path / "work", out, n=2, repeats=1, device="cpu", layers=1)
    names = [r["path"] for r in rows]
    assert names[0].startswith("published") and any(n.startswith("rali-edge default") for n in names)
    assert all(r["images/s"] > 0 for r in rows)
    # rali-edge's default path scores what the published pipeline scores (fp32 on a CPU: 1e-3).
    assert float(rows[1]["max score diff vs published"]) < 1e-3
    assert "| path |" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["rows"] == rows
    scorer = rali_edge.load(tmp_path / "work" / "model", backend="torch", dtype="fp32")
    timed = gpu.encoder_rows(scorer, "eager fp32", tflops=1.0, batches=(1, 2), device="cpu")
    assert [r["batch"] for r in timed] == [1, 2] and all(r["ms"] > 0 for r in timed)


def test_every_python_part_the_script_calls_exists():
    """gpu_check.sh calls `bench/gpu.py PART`: each such part is one gpu.py knows (a misspelt part
    would only fail on the lent GPU, where minutes are scarce)."""
    import re

    gpu = load_gpu_bench()
    called = set(re.findall(r"bench/gpu\.py (\w+)", SCRIPT.read_text()))
    assert called == {"model", "encoder", "compile", "e2e", "aoti"}
    assert called - {"model"} <= set(gpu.PARTS)
    # ViT-L/14-336: 381 GFLOP per image in 24 full layers; rali-edge's last layer is the class row.
    assert 360 < gpu.ENCODER_GFLOP < 375
