"""`rali-edge profile`: latency, throughput, memory, power and energy per image, against Q-Insight."""

from __future__ import annotations

import shlex
import sys
import time

import click

from rali_edge.cli import EXIT_INTERRUPTED, EXIT_OK
from rali_edge.cli.common import OUTPUT_FOLDER, model_options
from rali_edge.errors import OutputError
from rali_edge.profiling.power import POWER_KINDS


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
  rali-edge profile --report out/                        # CPU, built-in model, 12 MP photographs
  rali-edge profile --model rali-vitl14-336 --device cuda --dtype fp16 --batch-sizes 1,8,32 --report out/
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
@click.option("--power", type=click.Choice(POWER_KINDS), default="auto",
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
@click.option("--report", "report_dir", type=OUTPUT_FOLDER,
              help="Write profile.json, profile.md and PNG plots into this folder (checked before measuring).")
@click.option("--progress/--no-progress", default=None, help="Live progress line on stderr (default: on a terminal).")
@click.pass_context
def profile_command(ctx, batch_sizes, warmup, iters, duration, image_paths, power, sysfs_root, idle_seconds,
                    baseline, baseline_model, baseline_random_weights, baseline_config, baseline_tokens,
                    baseline_images, baseline_dtype, threads, seed, report_dir, progress, **model_kwargs):
    """Measure RALI's latency per stage, throughput, peak memory, power and energy per image, and
    optionally Q-Insight's (the 7B MLLM RALI was distilled from) on the same images and device.

    Idle power is measured first; each batch size then warms up and runs timed iterations inside
    a power window. With --report DIR the figures go to profile.json, a comparison table to
    profile.md, and plots to PNG files. Python: rali_edge.profiling.session.run_profile.
    """
    from rali_edge.profiling.session import Baseline, run_profile

    # Asking for a baseline model means asking for the baseline.
    wants_baseline = baseline or baseline_model or baseline_random_weights or baseline_tokens is not None
    line = ProgressLine(progress)
    model_kwargs["cache"] = not model_kwargs.pop("no_cache")
    try:
        profile = run_profile(
            **model_kwargs, batch_sizes=batch_sizes, warmup=warmup, iters=iters, duration=duration,
            images=list(image_paths), power=power, sysfs_root=sysfs_root, idle_seconds=idle_seconds,
            baseline=Baseline(baseline_model, baseline_random_weights, baseline_config, baseline_tokens,
                              baseline_images, baseline_dtype, seed) if wants_baseline else None,
            threads=threads, command_line=command_line(ctx), argv=list(sys.argv), progress=line)
    except KeyboardInterrupt:
        profile = None
    line.clear()
    if profile is None or not profile["rali"].get("runs"):
        click.echo("interrupted before any batch size finished: no report", err=True)
        sys.exit(EXIT_INTERRUPTED)
    _print_and_write(profile, report_dir)
    if profile.get("interrupted"):
        click.echo(f"interrupted {profile['interrupted']}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_OK)


def _print_and_write(profile: dict, report_dir: str | None) -> None:
    from rali_edge.profiling import report

    click.echo(report.summary_text(profile))  # first: a report that cannot be written does not lose it
    if report_dir:
        noted = len(profile.get("notes", []))
        try:
            files = report.write_report(profile, report_dir)
        except OSError as e:
            raise OutputError(f"writing the report into {report_dir}: {e.strerror or e} (the summary above is "
                              "complete)") from None
        for note in profile["notes"][noted:]:  # what the report says of itself (plots skipped...), here too
            click.echo(f"note: {note}", err=True)
        click.echo(f"report: {', '.join(files)} in {report_dir}", err=True)


__all__ = ["profile_command"]
