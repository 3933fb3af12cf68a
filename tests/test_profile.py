"""`rali-edge profile` end to end on a CPU: the report files, the figures' consistency, power
sources that are absent, failing or fake (a Jetson Orin sysfs tree), and the Q-Insight baseline
with a tiny random Qwen2.5-VL. No timing is asserted: only how the figures relate."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from PIL import Image

from rali_edge.cli import main
from rali_edge.profiling import runner

STAGES = ("decode", "preprocess", "encoder", "head", "total")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # --threads sets torch's global thread count; put it back for the other tests.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def image_dir(photos):
    return str(photos[0].parent)


def run_profile(*args):
    result = CliRunner().invoke(main, ["profile", "--threads", "1", "--warmup", "1", *args])
    return result


def load_report(folder):
    return json.loads((folder / "profile.json").read_text())


def check_summary(s, count):
    assert s["count"] == count
    # Order statistics of the same samples: exact inequalities, no tolerance needed.
    assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["min_ms"] <= s["mean_ms"] <= s["max_ms"]
    assert s["min_ms"] >= 0


def test_plots_skipped_for_want_of_matplotlib_are_said_on_the_terminal(small_model, image_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "1", "--iters", "1", "--warmup", "0",
                         "--power", "none", "--images", image_dir, "--report", str(out))
    assert result.exit_code == 0, result.output
    assert "note: plots skipped: matplotlib is not installed (pip install 'rali-edge[profile]')" in result.output
    assert any("matplotlib is not installed" in n for n in load_report(out)["notes"])
    assert not list(out.glob("*.png"))


def test_cpu_profile_writes_the_full_report(small_model, image_dir, tmp_path):
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--device", "cpu", "--batch-sizes", "3,1",
                         "--iters", "3", "--power", "none", "--images", image_dir, "--report", str(out))
    assert result.exit_code == 0, result.output
    report = load_report(out)
    # Every file the report lists exists, and nothing else was written.
    assert sorted(report["files"]) == sorted(p.name for p in out.iterdir())
    assert {"profile.json", "profile.md", "latency.png", "time_per_image.png"} <= set(report["files"])
    assert "energy_per_image.png" not in report["files"]  # no power: said in the notes instead
    assert any("energy plot skipped" in n for n in report["notes"])

    runs = report["rali"]["runs"]
    assert [r["batch_size"] for r in runs] == [1, 3]  # sorted
    for run in runs:
        b = run["batch_size"]
        assert run["iterations"] == 3 and run["images"] == 3 * b
        assert set(run["stages"]) == set(STAGES)
        for s in run["stages"].values():
            check_summary(s, 3)
        total = run["stages"]["total"]["mean_ms"]
        # total encloses the other stages in every iteration, so it does in the mean too.
        assert total >= sum(run["stages"][s]["mean_ms"] for s in STAGES[:-1])
        # throughput = images / time = batch * 1000 / mean total ms (float rounding only: 1e-9).
        assert run["images_per_s"] == pytest.approx(b * 1000.0 / total, rel=1e-9)
        assert run["per_image_ms"] == pytest.approx(total / b, rel=1e-9)
        assert run["peak_host_rss_bytes"] > 0 and run["peak_gpu_bytes"] is None
        assert run["energy"]["available"] is False

    from rali_edge.model import count_parameters
    from rali_edge.model_file import load_model

    model, _ = load_model(small_model)
    assert report["rali"]["model"]["parameters"] == count_parameters(model.encoder) + count_parameters(model.head)
    assert report["power"] == {**report["power"], "available": False, "source": "none"}
    assert "--power none" in report["power"]["unavailable_reason"]
    assert report["images"]["origin"] == "files" and report["images"]["count"] == 4
    assert report["command_line"].startswith("rali-edge profile --model")
    assert report["environment"]["versions"]["torch"] == torch.__version__
    assert "baseline" not in report

    comp = report["comparison"]
    assert comp["rali_smallest_batch"]["batch_size"] == 1
    best = max(runs, key=lambda r: r["images_per_s"])
    assert comp["rali_best_throughput"]["images_per_s"] == best["images_per_s"]

    md = (out / "profile.md").read_text()
    assert "| time per image (ms) |" in md and "RALI, batch 1" in md
    assert "Power unavailable" in md and "![latency](latency.png)" in md
    # The terminal shows the summary table on stdout, what was timed, and power's absence once.
    assert "time per image (ms)" in result.stdout and "power: unavailable" in result.stdout
    assert result.output.count("power: unavailable") == 1
    assert "timed on 4 images (files): " in result.stdout


def test_default_images_are_photographs_at_phone_camera_size():
    images = runner.load_image_set(None)
    assert len(images.sources) == 3  # the bundled clean photographs
    assert all(max(size) == runner.DEFAULT_LONG_SIDE for size in images.sizes)
    assert "12 MP" in images.origin
    decoded = [Image.open(io.BytesIO(src)) for src in images.sources]
    assert [im.size for im in decoded] == images.sizes and all(im.format == "JPEG" for im in decoded)


def test_an_unreadable_file_is_skipped_and_reported(small_model, image_dir, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "1", "--iters", "2", "--power", "none",
                         "--images", str(folder), "--report", str(out))
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert [s["path"] for s in report["images"]["skipped"]] == [str(folder / "broken.jpg")]
    assert report["images"]["count"] == len(list(Path(image_dir).iterdir()))
    assert f"skipped {folder / 'broken.jpg'}: " in result.output and "1 unreadable files skipped" in result.stdout


class FailingNvml:
    """pynvml whose library is missing (as on a machine without the NVIDIA driver)."""

    class NVMLError_LibraryNotFound(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        pass


@pytest.mark.parametrize("pynvml", [None, FailingNvml()], ids=["absent", "failing"])
def test_nvml_absent_or_failing_reports_power_unavailable(small_model, image_dir, tmp_path, monkeypatch, pynvml):
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)  # None makes `import pynvml` raise ImportError
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "2", "--iters", "2", "--power", "nvml",
                         "--images", image_dir, "--report", str(out))
    assert result.exit_code == 0, result.output
    report = load_report(out)
    assert report["power"]["available"] is False and report["power"]["source"] == "nvml"
    reason = report["power"]["unavailable_reason"]
    assert ("nvidia-ml-py" in reason) if pynvml is None else ("NVML Shared Library Not Found" in reason)
    run = report["rali"]["runs"][0]
    assert run["iterations"] == 2 and run["energy"]["available"] is False and run["energy"]["j_per_image"] is None
    assert "Power unavailable" in (out / "profile.md").read_text()


def _orin_nano(root, vdd_in_ma):
    """A Jetson Orin Nano INA3221 tree (mainline hwmon driver). VDD_IN is the board total."""
    d = root / "bus" / "i2c" / "drivers" / "ina3221" / "1-0040" / "hwmon" / "hwmon1"
    d.mkdir(parents=True, exist_ok=True)
    for n, (label, mv, ma) in {1: ("VDD_IN", 5000, vdd_in_ma), 2: ("VDD_CPU_GPU_CV", 5000, 200),
                               3: ("VDD_SOC", 5000, 300)}.items():
        (d / f"in{n}_label").write_text(label + "\n")
        (d / f"in{n}_input").write_text(f"{mv}\n")
        (d / f"curr{n}_input").write_text(f"{ma}\n")


def test_jetson_power_gives_energy_per_image(small_model, image_dir, tmp_path, monkeypatch):
    from rali_edge.profiling import runner

    sysfs = tmp_path / "sys"
    idle_ma, load_ma = 500, 1200  # 2.5 W idle, 6.0 W under load (5 V rail)
    _orin_nano(sysfs, load_ma)
    real_measure_idle = runner.measure_idle

    def measure_idle_at_idle_current(sampler, seconds):
        _orin_nano(sysfs, idle_ma)
        try:
            return real_measure_idle(sampler, seconds)
        finally:
            _orin_nano(sysfs, load_ma)

    monkeypatch.setattr(runner, "measure_idle", measure_idle_at_idle_current)
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "2", "--iters", "3", "--power", "jetson",
                         "--sysfs-root", str(sysfs), "--idle-seconds", "0.2", "--images", image_dir,
                         "--report", str(out))
    assert result.exit_code == 0, result.output
    report = load_report(out)
    power = report["power"]
    assert power["available"] and power["source"] == "ina3221"
    # Board power is VDD_IN alone (not the sum of rails): 5000 mV * 500 mA = 2.5 W.
    assert power["idle_w"] == pytest.approx(2.5, rel=1e-12)
    e = report["rali"]["runs"][0]["energy"]
    assert e["available"] and e["images"] == 6
    assert e["load_avg_w"] == pytest.approx(6.0, rel=1e-12)  # constant readings: exact up to rounding
    window = e["load_window_s"]
    assert e["j_per_image"] == pytest.approx(6.0 * window / 6, rel=1e-9)
    assert e["j_per_image_above_idle"] == pytest.approx((6.0 - 2.5) * window / 6, rel=1e-9)
    # Three tiny iterations are far shorter than 5 sensor periods: the report must say so.
    assert any("shorter than" in w for w in e["warnings"])
    assert "energy_per_image.png" in report["files"] and (out / "energy_per_image.png").stat().st_size > 0
    md = (out / "profile.md").read_text()
    assert "Idle power 2.5 W" in md and "shorter than" in md


def test_baseline_random_tiny_qwen25vl_on_cpu(small_model, image_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    try:  # transformers 5 (no torchvision needed); 4.x keeps it in the slow image processor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from rali_edge.profiling.baseline import QWEN25VL_TINY, SYSTEM_PROMPT, USER_PROMPT

    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "1,2", "--iters", "2", "--power", "none",
                         "--images", image_dir, "--baseline-random-weights", "--baseline-config", "tiny",
                         "--baseline-tokens", "8", "--baseline-images", "2", "--report", str(out))
    assert result.exit_code == 0, result.output
    report = load_report(out)
    base = report["baseline"]
    info, run = base["info"], base["run"]
    assert info["mode"] == "random-weights" and info["architecture"] == "tiny"
    assert info["generation"]["min_new_tokens"] == info["generation"]["max_new_tokens"] == 8
    assert run["extra"]["tokens_generated"] == [8, 8] and run["extra"]["tokens_per_image"] == 8

    # Parameters: the same architecture built independently on the meta device.
    with torch.device("meta"):
        ref = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**QWEN25VL_TINY))
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())

    # Image tokens: transformers' own resize rule (tiny caps at 112x112 pixels), 2x2 patches merged.
    for size, n_image, n_prompt in zip(report["images"]["sizes"], run["extra"]["image_tokens"],
                                       run["extra"]["prompt_tokens"]):
        h, w = smart_resize(size[1], size[0], factor=28, min_pixels=3136, max_pixels=112 * 112)
        assert n_image == (h // 14) * (w // 14) // 4
        # Chat-template layout: 15 special/role tokens + estimated text (4 chars/token) + image.
        assert n_prompt == 15 + math.ceil(len(SYSTEM_PROMPT) / 4) + math.ceil(len(USER_PROMPT) / 4) + n_image

    assert set(run["stages"]) == {"decode", "preprocess", "prefill", "generation", "total"}
    for s in run["stages"].values():
        check_summary(s, 2)
    assert run["stages"]["total"]["mean_ms"] >= sum(
        run["stages"][s]["mean_ms"] for s in ("decode", "preprocess", "prefill", "generation"))

    comp = report["comparison"]
    rali1 = report["rali"]["runs"][0]
    assert comp["ratios_smallest_batch"]["ms_per_image"] == pytest.approx(
        run["per_image_ms"] / rali1["per_image_ms"], rel=1e-12)
    assert comp["ratios_smallest_batch"]["parameters"] == pytest.approx(
        info["parameters"] / report["rali"]["model"]["parameters"], rel=1e-12)
    md = (out / "profile.md").read_text()
    # The tiny test architecture is named as such wherever the baseline is: headline, table, plots.
    assert "## RALI against Q-Insight (TINY test architecture, random weights)" in md
    assert "| Q-Insight (TINY test architecture, random weights) |" in md
    assert "architecture-cost measurement" in md
    assert "tokens generated per image" in md
    assert "Q-Insight (TINY test architecture, random weights)" in result.stdout


def test_baseline_needs_weights_or_random(small_model):
    result = run_profile("--model", str(small_model), "--baseline", "qinsight", "--power", "none")
    assert result.exit_code == 2
    assert "--baseline-model" in result.output and "--baseline-random-weights" in result.output


def test_baseline_without_transformers_exits_4(small_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = run_profile("--model", str(small_model), "--baseline-random-weights", "--power", "none")
    assert result.exit_code == 4
    assert "pip install 'rali-edge[baseline]'" in result.output


def test_a_baseline_folder_that_is_no_model_fails_before_rali_runs(small_model, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("RALI was profiled before the baseline folder was checked")

    monkeypatch.setattr(runner, "profile_rali", must_not_run)
    result = run_profile("--model", str(small_model), "--baseline-model", str(tmp_path), "--power", "none")
    assert result.exit_code == 3 and "no config.json" in result.output


def test_profile_from_python(small_model, image_dir):
    """The library call the command wraps: the same profile dict, no output of its own."""
    from rali_edge.profiling import report
    from rali_edge.profiling.session import run_profile as profile

    kept = []

    class Lines:
        def __call__(self, text):
            pass

        def keep(self, text):
            kept.append(text)

    result = profile(small_model, batch_sizes=[2, 1, 2], warmup=0, iters=2, images=[image_dir], power="none",
                     idle_seconds=0, threads=1, progress=Lines())
    assert [r["batch_size"] for r in result["rali"]["runs"]] == [1, 2]
    assert result["rali"]["model"]["head"] == "torch" and result["settings"]["effective_device"] == "cpu"
    assert any(line.startswith("RALI batch 2:") for line in kept)
    assert "RALI" in report.summary_text(result)


def test_iters_and_duration_exclude_each_other(small_model):
    result = run_profile("--model", str(small_model), "--iters", "2", "--duration", "1", "--power", "none")
    assert result.exit_code == 2 and "exclude" in result.output


def test_duration_budget_runs_until_the_time_is_spent(small_model, image_dir, tmp_path):
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "1", "--duration", "0.3", "--power", "none",
                         "--images", image_dir, "--report", str(out))
    assert result.exit_code == 0, result.output
    run = load_report(out)["rali"]["runs"][0]
    assert run["wall_s"] >= 0.3 and run["iterations"] >= 1
    assert run["stages"]["total"]["count"] == run["iterations"]


class FusedEngine:
    """Stands in for an engine with the head inside (outputs == "score"), like a TensorRT plan
    built with --head engine; runs the same torch model so its scores are known."""

    outputs = "score"

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, pixels):
        return self.model(pixels)


@pytest.mark.parametrize("fused", [False, True], ids=["torch-head", "head-in-engine"])
def test_profiled_pipeline_gives_the_scorers_scores(small_model, photos, fused):
    import rali_edge
    from rali_edge.model_file import load_model
    from rali_edge.profiling import runner
    from rali_edge.profiling.power import NullSampler
    from rali_edge.scoring import Scorer

    model, manifest = load_model(small_model)
    scorer = Scorer(model, manifest, encoder=FusedEngine(model) if fused else None)
    images = runner.load_image_set([str(p) for p in photos])
    timer = runner.StageTimer("cpu")
    scores = runner._rali_iteration(scorer, images.batch(5), timer, runner.head_in_encoder(scorer))
    # Reference: the public API on the same files (cycled to 5). Same ops on the same inputs, so
    # equal up to float32 rounding of batch-size-dependent kernels: 1e-5 on scores in [1, 5].
    expected = rali_edge.load(small_model).score(images.batch(5))
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=0, atol=1e-5)
    assert ("head" in timer.stages) is (not fused)

    runs, _ = runner.profile_rali(scorer, images, [2], runner.Budget(0, 2, 0.0), NullSampler(), None)
    assert runs[0].extra["head_in_encoder"] is fused and ("head" in runs[0].stages) is (not fused)


def test_python_api_records_the_backend_it_resolved(small_model, image_dir):
    # backend=None is RALI_EDGE_BACKEND's choice (torch in the tests: conftest.py), not auto's:
    # the report must not say that auto chose the path.
    from rali_edge.profiling import report as rep
    from rali_edge.profiling.session import run_profile as profile

    result = profile(small_model, batch_sizes=(1,), iters=1, warmup=0, power="none", images=[image_dir],
                     idle_seconds=0)
    assert result["settings"]["backend"] == "torch" and not rep.chosen_by_auto(result)


def test_ctrl_c_keeps_the_batch_sizes_that_finished(small_model, image_dir, tmp_path, monkeypatch):
    real = runner._profile_batch

    def stopped_at_batch_2(scorer, images, b, *args):
        if b == 2:
            raise KeyboardInterrupt
        return real(scorer, images, b, *args)

    monkeypatch.setattr(runner, "_profile_batch", stopped_at_batch_2)
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "1,2,4", "--iters", "2", "--power", "none",
                         "--images", image_dir, "--idle-seconds", "0", "--report", str(out))
    assert result.exit_code == 130, result.output
    assert "interrupted during the RALI runs" in result.stderr and "the 1 that finished" in result.stderr
    report = load_report(out)
    assert [r["batch_size"] for r in report["rali"]["runs"]] == [1] and report["interrupted"]
    assert "batch" in result.stdout  # the summary was printed

    def stopped_at_once(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_profile_batch", stopped_at_once)
    nothing = run_profile("--model", str(small_model), "--batch-sizes", "1", "--iters", "2", "--power", "none",
                          "--images", image_dir, "--idle-seconds", "0", "--report", str(tmp_path / "none"))
    assert nothing.exit_code == 130 and "no report" in nothing.stderr and not (tmp_path / "none").exists()


def test_ctrl_c_after_the_rali_runs_keeps_them_all(small_model, image_dir, tmp_path, monkeypatch):
    from rali_edge.profiling import report as rep

    def interrupted(device):
        raise KeyboardInterrupt

    calls = []
    real = rep.environment
    # The first read of the environment is interrupted (nvidia-smi can take seconds); the report's is not.
    monkeypatch.setattr(rep, "environment", lambda device: calls.append(device) or (
        interrupted(device) if len(calls) == 1 else real(device)))
    out = tmp_path / "report"
    result = run_profile("--model", str(small_model), "--batch-sizes", "1,2", "--iters", "2", "--power", "none",
                         "--images", image_dir, "--idle-seconds", "0", "--report", str(out))
    assert result.exit_code == 130, result.output
    assert "interrupted after the RALI runs" in result.stderr
    assert [r["batch_size"] for r in load_report(out)["rali"]["runs"]] == [1, 2]
