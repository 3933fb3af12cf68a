"""`rali-edge profile`: latency, throughput, memory, power and energy per image, against Q-Insight."""

from __future__ import annotations

import gc
import shlex
import sys
import time

import click

from rali_edge.cli import EXIT_INTERRUPTED, EXIT_OK
from rali_edge.cli.common import model_options


def parse_batch_sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give positive integers separated by commas, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers separated by commas, e.g. 1,8,32")
    return sorted(set(sizes))


class ProgressLine:
    """One live line on a terminal (rewritten in place, at most 10 times a second); elsewhere
    (logs, CI) only the messages that `keep` marks, one per line."""

    def __init__(self, enabled: bool | None):
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0
        self.width = 0

    def __call__(self, text: str) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        self.width = max(self.width, len(text))
        click.echo("\r" + text.ljust(self.width), err=True, nl=False)

    def keep(self, text: str) -> None:
        self.clear()
        click.echo(text, err=True)

    def clear(self) -> None:
        if self.tty and self.width:
            click.echo("\r" + " " * self.width + "\r", err=True, nl=False)
            self.width = 0


def command_line(ctx: click.Context) -> str:
    """The command as typed, rebuilt from the options given on the command line (CliRunner and
    `python -m` leave sys.argv unhelpful)."""
    from click.core import ParameterSource

    parts = ["rali-edge", "profile"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        flag = param.opts[0] if not param.is_flag or value else (param.secondary_opts or param.opts)[0]
        if param.is_flag:
            parts.append(flag)
        elif param.multiple:
            for v in value:
                parts += [flag, str(v)]
        elif param.name == "batch_sizes":
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


@click.command(
    "profile",
    epilog="""\b
Examples:
  rali-edge profile --report out/                        # CPU, built-in model, sample images
  rali-edge profile --model rali-vitl14 --device cuda --dtype fp16 --batch-sizes 1,8,32 --report out/
  rali-edge profile --device cuda --baseline qinsight --baseline-model q-insight/ --report out/
  rali-edge profile --device cuda --baseline-random-weights --baseline-config 7b --report out/
""",
)
@model_options
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=parse_batch_sizes,
              help="RALI batch sizes, comma-separated.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0),
              help="Untimed iterations before each batch size.")
@click.option("--iters", type=click.IntRange(min=1), help="Exactly N timed iterations per batch size.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Timed seconds per batch size (instead of --iters). Default: 20 iterations, and at least "
                   "2 s when power is measured.")
@click.option("--images", "image_paths", multiple=True, type=click.Path(exists=True),
              help="Image files or folders to profile on (repeatable; unreadable files are skipped and listed). "
                   "Default: the bundled clean photographs enlarged to 12 MP (4032 pixels on the long side), so that "
                   "decoding and resizing cost what phone photographs cost.")
@click.option("--power", type=click.Choice(["auto", "nvml", "jetson", "tegrastats", "none"]), default="auto",
              show_default=True, help="Power source. auto: Jetson sensors, then tegrastats, then NVML, else none.")
@click.option("--sysfs-root", default="/sys", show_default=True, type=click.Path(),
              help="Stands in for /sys when looking for Jetson power sensors.")
@click.option("--idle-seconds", default=3.0, show_default=True, type=click.FloatRange(min=0),
              help="Idle power measurement before any model loads (0: skip).")
@click.option("--baseline", type=click.Choice(["qinsight"]),
              help="Also run Q-Insight's scoring request (Qwen2.5-VL-7B) on the same images, device and power source.")
@click.option("--baseline-model", type=click.Path(exists=True, file_okay=False),
              help="Q-Insight weights: a folder with config.json, weights, tokenizer and processor (e.g. "
                   "ByteDance/Q-Insight's score_degradation). With --baseline-random-weights: only its config and "
                   "processor are used.")
@click.option("--baseline-random-weights", is_flag=True,
              help="Random weights in the Qwen2.5-VL architecture: an architecture-cost measurement with a fixed "
                   "number of generated tokens.")
@click.option("--baseline-config", type=click.Choice(["7b", "tiny"]), default="7b", show_default=True,
              help="Architecture for --baseline-random-weights (tiny: a few layers, for checking the pipeline).")
@click.option("--baseline-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens generated per image with random weights. Default: 200, a typical Q-Insight answer "
                   "(basis stated in the report).")
@click.option("--baseline-images", default=3, show_default=True, type=click.IntRange(min=1),
              help="Requests timed for the baseline (one image each; it is slow).")
@click.option("--baseline-dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
              show_default=True, help="Baseline precision. auto: bf16 on a GPU (as Q-Insight), fp32 on a CPU.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for PyTorch (torch.set_num_threads). Default: PyTorch's choice.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the baseline's sampling.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write profile.json, profile.md and PNG plots into this folder.")
@click.option("--progress/--no-progress", default=None, help="Live progress line on stderr (default: on a terminal).")
@click.pass_context
def profile_command(ctx, batch_sizes, warmup, iters, duration, image_paths, power, sysfs_root, idle_seconds,
                    baseline, baseline_model, baseline_random_weights, baseline_config, baseline_tokens,
                    baseline_images, baseline_dtype, threads, seed, report_dir, progress, **model_kwargs):
    """Measure RALI's latency per stage, throughput, peak memory, power and energy per image, and
    optionally Q-Insight's (the 7B MLLM RALI was distilled from) on the same images and device.

    Idle power is measured first; each batch size then warms up and runs timed iterations inside
    a power window. With --report DIR the figures go to profile.json, a comparison table to
    profile.md, and plots to PNG files.
    """
    from rali_edge.profiling import report as rep
    from rali_edge.profiling import runner
    from rali_edge.profiling.power import pick_sampler

    if (baseline_model or baseline_random_weights) and not baseline:
        baseline = "qinsight"  # asking for a baseline model means asking for the baseline
    if baseline and not (baseline_model or baseline_random_weights):
        raise click.UsageError(
            "--baseline qinsight needs --baseline-model PATH (Q-Insight's weights: ByteDance/Q-Insight, "
            "subfolder score_degradation) or --baseline-random-weights (architecture cost only)")
    if baseline_tokens is not None and not baseline_random_weights:
        raise click.UsageError("--baseline-tokens applies to --baseline-random-weights; real weights stop at </answer>")
    if iters is not None and duration is not None:
        raise click.UsageError("--iters and --duration exclude each other; give one")
    if baseline:
        from rali_edge.profiling.baseline import check_transformers_installed

        check_transformers_installed()  # fail now (exit 4), not after the RALI runs

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    line = ProgressLine(progress)
    device = model_kwargs["device"]
    _check_device(device)  # before the idle measurement, not after
    settings = {
        **{k: v for k, v in model_kwargs.items()}, "batch_sizes": batch_sizes, "power": power,
        "sysfs_root": sysfs_root, "idle_seconds": idle_seconds, "baseline": baseline,
        "baseline_model": baseline_model, "baseline_random_weights": baseline_random_weights,
        "baseline_config": baseline_config, "baseline_images": baseline_images, "threads": threads, "seed": seed,
    }
    profile = rep.new_profile(settings, command_line(ctx), list(sys.argv))
    code = EXIT_OK
    sampler = pick_sampler(power, sysfs_root=sysfs_root)
    try:
        images = runner.load_image_set(list(image_paths) or None)
        profile["images"] = images.to_dict()
        for skipped in images.skipped:
            line.keep(f"skipped {skipped['path']}: {skipped['error']}")
        if images.skipped:
            profile["notes"].append(f"{len(images.skipped)} files could not be read and were left out: "
                                    + ", ".join(s["path"] for s in images.skipped))
        if images.origin == "synthetic":
            profile["notes"].append(f"no bundled sample images were found ({runner.SAMPLES_DIR}); profiled on "
                                    f"{len(images.sources)} synthetic 1024x768 JPEG images")
        budget = runner.Budget.from_options(warmup, iters, duration, sampler.available)
        settings["budget"] = _describe_budget(budget, iters, duration)
        settings["budget_detail"] = budget.to_dict()
        idle = runner.idle_power(sampler, idle_seconds, line)
        profile["power"] = _power_section(sampler, idle)
        if sampler.available:  # unavailable: the summary says so, once
            line.keep(f"power: {sampler.name}" + (f", idle {idle.average_w:.2f} W" if idle and idle.average_w else ""))

        scorer = _load_rali(model_kwargs)
        # An engine may run elsewhere than --device says (TensorRT runs on a GPU): the baseline
        # and the environment follow where RALI really ran.
        device = str(scorer.encoder.device)
        settings["effective_device"] = device
        profile["rali"] = {"model": _rali_model_info(scorer, model_kwargs), "timing": _timing_note(scorer, device)}
        runs = runner.profile_rali(scorer, images, batch_sizes, budget, sampler, idle, line)
        profile["rali"]["runs"] = [r.to_dict() for r in runs]
        for r in runs:
            line.keep(f"RALI batch {r.batch_size}: {r.per_image_ms:.3g} ms/image, {r.images_per_s:.4g} images/s")
        del scorer
        _free_memory(device)

        if baseline:
            profile["baseline"] = _run_baseline(
                images, device, baseline_model, baseline_random_weights, baseline_config, baseline_tokens,
                baseline_images, baseline_dtype, seed, sampler, idle, line)
        # A sensor can stop answering mid-run (a driver hiccup): say so, but keep the figures.
        energies = [r["energy"] for r in profile["rali"]["runs"]]
        if profile["power"]["available"] and not any(e["available"] for e in energies):
            profile["power"].update(available=False, unavailable_reason=energies[0]["unavailable_reason"])
        profile["environment"] = rep.environment(device)
        profile["comparison"] = rep.comparison(profile)
    except KeyboardInterrupt:
        line.clear()
        click.echo("interrupted: no report written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        sampler.close()
    line.clear()
    if report_dir:
        files = rep.write_report(profile, report_dir)
        click.echo(f"report: {', '.join(files)} in {report_dir}", err=True)
    click.echo(rep.summary_text(profile))
    sys.exit(code)


def _check_device(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        from rali_edge.errors import MissingDependencyError

        if not torch.cuda.is_available():
            raise MissingDependencyError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")


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


def _load_rali(model_kwargs):
    from rali_edge.cli.common import load_scorer

    return load_scorer(**model_kwargs)


def _rali_model_info(scorer, model_kwargs) -> dict:
    from rali_edge.model import count_parameters
    from rali_edge.profiling.runner import head_in_encoder
    from rali_edge.scoring import model_path

    path = str(model_path(model_kwargs.get("model")))
    torch_encoder = getattr(scorer.encoder, "encoder", None)
    if torch_encoder is not None:
        params = count_parameters(torch_encoder) + count_parameters(scorer.head)
    else:  # an engine: count the tensors of the model file it was built from
        params = _count_file_parameters(path)
    return {
        "name": scorer.manifest.name, "path": path, "sha256": scorer.model_sha256, "parameters": params,
        "backend": model_kwargs.get("backend"), "engine": model_kwargs.get("engine"),
        "dtype": model_kwargs.get("dtype"),
        "head": "in engine" if head_in_encoder(scorer) else scorer.head.impl_name,
        "image_size": [scorer.preprocess.config.crop_height, scorer.preprocess.config.crop_width],
        "encoder": scorer.manifest.encoder.to_dict(),
    }


def _count_file_parameters(folder) -> int | None:
    from math import prod
    from pathlib import Path

    from safetensors import safe_open

    from rali_edge.model_file import WEIGHTS

    try:
        with safe_open(str(Path(folder) / WEIGHTS), "pt") as f:
            return sum(prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:
        return None


def _timing_note(scorer, device) -> str:
    from rali_edge.profiling.runner import head_in_encoder

    gpu = str(device).startswith("cuda")
    note = ("decode and preprocess on the host clock; encoder (including the pixel upload) and head with "
            "CUDA events; total on the host clock, file to scores on the host" if gpu else
            "every stage on the host monotonic clock (time.perf_counter); total is file to scores")
    if head_in_encoder(scorer):
        note += "; the engine contains the head, so head time is included in encoder"
    return note


def _free_memory(device) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _run_baseline(images, device, model_path, random_weights, config, tokens, n_images, dtype, seed, sampler,
                  idle, line) -> dict:
    import torch

    from rali_edge.profiling import runner
    from rali_edge.profiling.baseline import TYPICAL_ANSWER_TOKENS, QInsightBaseline

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        dtype = "bf16" if str(device).startswith("cuda") else "fp32"
    line.keep(f"loading the baseline ({'random weights, ' + (model_path or config) if random_weights else model_path})")
    if random_weights:
        baseline = QInsightBaseline.random_weights(
            model_path or config, device=device, dtype=dtypes[dtype],
            answer_tokens=tokens or TYPICAL_ANSWER_TOKENS, seed=seed)
    else:
        baseline = QInsightBaseline.from_weights(model_path, device=device, dtype=dtypes[dtype], seed=seed)
    info = baseline.info()
    run = runner.profile_baseline(baseline, images, n_images, sampler, idle, line, seed=seed)
    line.keep(f"Q-Insight: {run.per_image_ms:.4g} ms/image, {run.extra['tokens_per_image']:.4g} tokens/image")
    del baseline
    _free_memory(device)
    return {"info": info.to_dict(), "run": run.to_dict()}


__all__ = ["profile_command"]
