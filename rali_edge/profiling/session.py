"""One whole profile, what `rali-edge profile` runs: idle power, RALI at each batch size, then
optionally Q-Insight on the same images, device and power source.

    from rali_edge.profiling.session import Baseline, run_profile
    from rali_edge.profiling import report

    profile = run_profile(model="default", batch_sizes=[1, 8], iters=10, power="none")
    print(report.summary_text(profile))
    report.write_report(profile, "out/")          # profile.json, profile.md, plots

The result is the profile dict that report.py formats (schema rali-edge-profile/1).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from math import prod
from pathlib import Path

from rali_edge.engines.backends import default_backend
from rali_edge.errors import MissingDependencyError, UsageError
from rali_edge.images import SAMPLES_DIR
from rali_edge.profiling import report as rep
from rali_edge.profiling import runner
from rali_edge.profiling.power import cuda_uuid, pick_sampler


class _Silent:
    """The progress interface of runner.py (a live line, and lines to keep), saying nothing."""

    def __call__(self, text: str) -> None:
        pass

    def keep(self, text: str) -> None:
        pass


@dataclass
class Baseline:
    """Q-Insight's scoring request, the MLLM RALI was distilled from. `model`: its weights folder
    (ByteDance/Q-Insight, score_degradation); with `random_weights`, only the architecture
    (`config` "7b" or "tiny", or the config of `model`) and `tokens` generated per image."""

    model: str | None = None
    random_weights: bool = False
    config: str = "7b"
    tokens: int | None = None
    images: int = 3
    dtype: str = "auto"  # bf16 on a GPU, as Q-Insight runs; fp32 on a CPU
    seed: int = 0

    def check(self) -> None:
        if not (self.model or self.random_weights):
            raise UsageError("--baseline qinsight needs --baseline-model PATH (Q-Insight's weights: ByteDance/Q-Insight, "
                             "subfolder score_degradation) or --baseline-random-weights (architecture cost only)")
        if self.tokens is not None and not self.random_weights:
            raise UsageError("--baseline-tokens applies to --baseline-random-weights; real weights stop at </answer>")
        from rali_edge.profiling.baseline import check_transformers_installed, resolve_model_folder

        # Fail now, not after the RALI runs: transformers missing (exit 4), a folder that is no model (exit 3).
        check_transformers_installed()
        if self.model:
            resolve_model_folder(self.model)


def run_profile(model=None, *, backend: str | None = None, engine=None, device: str = "cpu", dtype: str = "auto",
                head: str = "auto", cache: bool = True, batch_sizes=(1, 8, 32), warmup: int = 3, iters: int | None = None,
                duration: float | None = None, images: list[str] | None = None, power: str = "auto",
                sysfs_root: str = "/sys", idle_seconds: float = 3.0, baseline: Baseline | None = None,
                threads: int | None = None, command_line: str = "", argv: list[str] | None = None,
                progress=None) -> dict:
    """Profile RALI (the model, backend and engine as `rali_edge.load` takes them) on `images`
    (files or folders; None: the bundled photographs at 12 MP), and `baseline` if given.
    `progress`: an object with __call__(text) for a live line and keep(text) for lines to keep
    (default: silent). Usage errors and a missing GPU or transformers are raised before any
    measurement. Ctrl-C (KeyboardInterrupt) during the RALI runs or the baseline ends the profile:
    it then holds what finished, and its "interrupted" says where it stopped (with no RALI run
    finished, its RALI runs are empty); before the RALI runs start it passes through."""
    from rali_edge.scoring import check_device

    if iters is not None and duration is not None:
        raise UsageError("--iters and --duration exclude each other; give one")
    check_device(device)
    if baseline is not None:
        baseline.check()
    if str(device).startswith("cuda"):  # before the idle measurement, not after
        import torch

        if not torch.cuda.is_available():
            raise MissingDependencyError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    line = progress or _Silent()
    # Recorded as resolved: None means RALI_EDGE_BACKEND's choice, which may be torch, not auto.
    backend = backend or default_backend()
    load = {"model": model, "device": device, "dtype": dtype, "backend": backend, "engine": engine, "head": head,
            "cache": cache}
    batch_sizes = sorted(set(batch_sizes))
    settings = {
        **load, "batch_sizes": batch_sizes, "power": power, "sysfs_root": sysfs_root, "idle_seconds": idle_seconds,
        "baseline": "qinsight" if baseline else None, "baseline_model": baseline.model if baseline else None,
        "baseline_random_weights": bool(baseline and baseline.random_weights),
        "baseline_config": baseline.config if baseline else "7b", "baseline_images": baseline.images if baseline else 3,
        "threads": threads, "seed": baseline.seed if baseline else 0,
    }
    profile = rep.new_profile(settings, command_line, list(argv or []))
    # NVML must watch the GPU that runs the model, found by UUID (its indices are not torch's).
    gpu = cuda_uuid(device) if str(device).startswith("cuda") else 0
    sampler = pick_sampler(power, sysfs_root=sysfs_root, gpu=gpu)
    try:
        image_set = _images(profile, images, line)
        budget = runner.Budget.from_options(warmup, iters, duration, sampler.available)
        settings["budget"] = _describe_budget(budget, iters, duration)
        settings["budget_detail"] = budget.to_dict()
        idle = runner.idle_power(sampler, idle_seconds, line)
        profile["power"] = _power_section(sampler, idle)
        if sampler.available:  # unavailable: the summary says so, once
            line.keep(f"power: {sampler.name}" + (f", idle {idle.average_w:.2f} W" if idle and idle.average_w else ""))

        import rali_edge

        scorer = rali_edge.load(**load)
        # An engine may run elsewhere than `device` says (TensorRT runs on a GPU): the baseline
        # and the environment follow where RALI really ran.
        device = str(scorer.encoder.device)
        settings["effective_device"] = device
        profile["rali"] = {"model": _rali_model_info(scorer, load), "timing": _timing_note(scorer, device)}
        runs, stopped = runner.profile_rali(scorer, image_set, batch_sizes, budget, sampler, idle, line)
        if stopped:  # the batch sizes finished before Ctrl-C still make a report
            _complete(profile, runs, device, f"during the RALI runs (batch sizes {batch_sizes} asked for)")
            return profile
        try:  # from here on every RALI run is finished: a Ctrl-C keeps them all
            _complete(profile, runs, device)
            del scorer
            _free_memory(device)
            for r in runs:
                line.keep(f"RALI batch {r.batch_size}: {r.per_image_ms:.3g} ms/image, {r.images_per_s:.4g} images/s")
            if baseline is not None:
                profile["baseline"] = _run_baseline(baseline, image_set, device, sampler, idle, line)
                profile["comparison"] = rep.comparison(profile)
        except KeyboardInterrupt:
            if "comparison" not in profile:  # stopped while the environment was read
                _complete(profile, runs, device)
            profile["interrupted"] = "after the RALI runs: RALI's figures are complete" + (
                ", the baseline's missing" if baseline is not None else "")
            profile["notes"].append(f"interrupted {profile['interrupted']}")
    finally:
        sampler.close()
    return profile


def _complete(profile: dict, runs: list, device: str, interrupted: str | None = None) -> None:
    """The figures that follow from RALI's runs (a report can be written from here on)."""
    profile["rali"]["runs"] = [r.to_dict() for r in runs]
    if interrupted:
        profile["interrupted"] = f"{interrupted}; the report holds the {len(runs)} that finished"
        profile["notes"].append(f"interrupted {profile['interrupted']}")
    if not runs:
        return
    # A sensor can stop answering mid-run (a driver hiccup): say so, but keep the figures.
    energies = [r["energy"] for r in profile["rali"]["runs"]]
    if profile["power"]["available"] and not any(e["available"] for e in energies):
        profile["power"].update(available=False, unavailable_reason=energies[0]["unavailable_reason"])
    profile["environment"] = rep.environment(device)
    profile["comparison"] = rep.comparison(profile)


def _images(profile: dict, paths, line) -> runner.ImageSet:
    images = runner.load_image_set(list(paths) if paths else None)
    profile["images"] = images.to_dict()
    for skipped in images.skipped:
        line.keep(f"skipped {skipped['path']}: {skipped['error']}")
    if images.skipped:
        profile["notes"].append(f"{len(images.skipped)} files could not be read and were left out: "
                                + ", ".join(s["path"] for s in images.skipped))
    if images.origin == "synthetic":
        profile["notes"].append(f"no bundled sample images were found ({SAMPLES_DIR}); profiled on "
                                f"{len(images.sources)} synthetic 1024x768 JPEG images")
    return images


def _describe_budget(budget, iters, duration) -> str:
    if iters is not None:
        how = f"{iters} timed iterations per batch size"
    elif duration is not None:
        how = f"{duration:g} s of timed iterations per batch size"
    else:
        how = f"at least {budget.min_iters} timed iterations" + (
            f" and {budget.min_seconds:g} s" if budget.min_seconds else "") + " per batch size"
    return f"{budget.warmup} untimed warm-up iteration{'s' if budget.warmup != 1 else ''}, then {how}"


def _power_section(sampler, idle) -> dict:
    return {
        "source": sampler.name,
        "available": sampler.available,
        "unavailable_reason": sampler.unavailable_reason,
        "update_period_s": sampler.update_period_s if sampler.available else None,
        "min_window_s": sampler.min_window_s if sampler.available else None,
        "rails": getattr(sampler, "rail_names", None),
        "idle": idle.to_dict() if idle is not None else None,
        "idle_w": idle.average_w if idle is not None else None,
    }


def _rali_model_info(scorer, load: dict) -> dict:
    from rali_edge.model import count_parameters
    from rali_edge.scoring import model_path

    path = str(model_path(load["model"]))
    torch_encoder = getattr(scorer.encoder, "encoder", None)
    if torch_encoder is not None:
        params = count_parameters(torch_encoder) + count_parameters(scorer.head)
    else:  # an engine: count the tensors of the model file it was built from
        params = _count_file_parameters(path)
    return {
        "name": scorer.manifest.name, "path": path, "sha256": scorer.model_sha256, "parameters": params,
        # What ran: auto's choice and its cached engine, or what was asked for.
        "backend": scorer.backend, "engine": None if scorer.engine is None else str(scorer.engine),
        "dtype": scorer.dtype_name, "asked": {"backend": load["backend"], "dtype": load["dtype"]},
        "auto": None if scorer.verdict is None else scorer.verdict.to_dict(),  # what auto measured here
        "head": "in engine" if runner.head_in_encoder(scorer) else scorer.head.impl_name,
        "image_size": [scorer.preprocess.config.crop_height, scorer.preprocess.config.crop_width],
        "encoder": scorer.manifest.encoder.to_dict(),
    }


def _count_file_parameters(folder) -> int | None:
    from safetensors import safe_open

    from rali_edge.model_file import WEIGHTS

    try:
        with safe_open(str(Path(folder) / WEIGHTS), "pt") as f:
            return sum(prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:  # the count is a nicety of the report: a model file it cannot read leaves it out
        return None


def _timing_note(scorer, device) -> str:
    gpu = str(device).startswith("cuda")
    note = ("decode and preprocess on the host clock; encoder (including the pixel upload) and head with "
            "CUDA events; total on the host clock, file to scores on the host" if gpu else
            "every stage on the host monotonic clock (time.perf_counter); total is file to scores")
    if runner.head_in_encoder(scorer):
        note += "; the engine contains the head, so head time is included in encoder"
    return note


def _free_memory(device) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _run_baseline(options: Baseline, images, device, sampler, idle, line) -> dict:
    import torch

    from rali_edge.profiling.baseline import TYPICAL_ANSWER_TOKENS, QInsightBaseline

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = options.dtype if options.dtype != "auto" else ("bf16" if str(device).startswith("cuda") else "fp32")
    what = f"random weights, {options.model or options.config}" if options.random_weights else options.model
    line.keep(f"loading the baseline ({what})")
    if options.random_weights:
        baseline = QInsightBaseline.random_weights(
            options.model or options.config, device=device, dtype=dtypes[dtype],
            answer_tokens=options.tokens or TYPICAL_ANSWER_TOKENS, seed=options.seed)
    else:
        baseline = QInsightBaseline.from_weights(options.model, device=device, dtype=dtypes[dtype], seed=options.seed)
    info = baseline.info()
    run = runner.profile_baseline(baseline, images, options.images, sampler, idle, line, seed=options.seed)
    line.keep(f"Q-Insight: {run.per_image_ms:.4g} ms/image, {run.extra['tokens_per_image']:.4g} tokens/image")
    del baseline
    _free_memory(device)
    return {"info": info.to_dict(), "run": run.to_dict()}


__all__ = ["Baseline", "run_profile"]
