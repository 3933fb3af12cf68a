"""The profile report: `profile.json` (every figure), `profile.md` (RALI against the baseline) and
PNG plots (with matplotlib, an optional extra), plus the summary table the terminal shows.

All the maths lives in `comparison()`; the writers only format what it and the runs hold.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from rali_edge import __version__
from rali_edge.engines.naming import cpu_model

SCHEMA = "rali-edge-profile/1"
# Figures compared between RALI and the baseline: (key, label, unit, higher_is_better).
METRICS = (
    ("ms_per_image", "time per image", "ms", False),
    ("images_per_s", "throughput", "images/s", True),
    ("load_w", "average power under load", "W", False),
    ("j_per_image", "energy per image", "J", False),
    ("j_per_image_above_idle", "energy per image above idle", "J", False),
    ("parameters", "parameters", "", False),
    ("peak_host_rss_bytes", "peak host memory (RSS)", "bytes", False),
    ("peak_gpu_bytes", "peak GPU memory (torch allocator)", "bytes", False),
)
RATIO_DEFINITION = (
    "how many times RALI is better: baseline / RALI for costs (time, power, energy, parameters, "
    "memory), RALI / baseline for images/s"
)


# ---------------------------------------------------------------- environment


def _version(*dists: str) -> str | None:
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().replace("\x00", "").strip() or None
    except OSError:
        return None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def environment(device: str) -> dict:
    """The machine and library versions, for readers who want to reproduce the figures."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jetson_model": _read_first_line("/proc/device-tree/model") if os.path.exists("/etc/nv_tegra_release") else None,
        "l4t_release": _read_first_line("/etc/nv_tegra_release"),
        "device": device,
        "gpu": None,
        "gpu_compute_capability": None,
        "gpu_memory_bytes": None,
        "cuda_runtime": torch.version.cuda,
        "driver": None,
        "versions": {
            "rali-edge": __version__,
            "torch": torch.__version__,
            "triton": _version("triton", "pytorch-triton"),
            "transformers": _version("transformers"),
            "tensorrt": _version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs"),
            "nvidia-ml-py": _version("nvidia-ml-py"),
            "numpy": _version("numpy"),
            "pillow": _version("pillow", "Pillow"),
        },
    }
    if torch.cuda.is_available() and device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = props.name
        env["gpu_compute_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["driver"] = _driver_version()
    return env


# ---------------------------------------------------------------- comparison


def figures(run: dict, parameters: int | None) -> dict:
    """The compared figures of one run (a RunResult dict)."""
    energy = run["energy"]
    return {
        "batch_size": run["batch_size"],
        "ms_per_image": run["per_image_ms"],
        "images_per_s": run["images_per_s"],
        "load_w": energy.get("load_avg_w"),
        "j_per_image": energy.get("j_per_image"),
        "j_per_image_above_idle": energy.get("j_per_image_above_idle"),
        "parameters": parameters,
        "peak_host_rss_bytes": run["peak_host_rss_bytes"],
        "peak_gpu_bytes": run["peak_gpu_bytes"],
    }


def _ratios(rali: dict, base: dict) -> dict:
    out = {}
    for key, _, _, higher_is_better in METRICS:
        r, b = rali.get(key), base.get(key)
        if r is None or b is None or r <= 0 or b <= 0:
            out[key] = None
        else:
            out[key] = r / b if higher_is_better else b / r
    return out


def comparison(profile: dict) -> dict:
    """RALI at batch 1 (the baseline's batch) and at its best throughput, against the baseline."""
    rali_runs = profile["rali"]["runs"]
    params = profile["rali"]["model"]["parameters"]
    one = min(rali_runs, key=lambda r: r["batch_size"])
    best = max(rali_runs, key=lambda r: r["images_per_s"])
    out = {"rali_smallest_batch": figures(one, params), "rali_best_throughput": figures(best, params)}
    base = profile.get("baseline")
    if base:
        b = figures(base["run"], base["info"]["parameters"])
        out["baseline"] = b
        out["ratios_smallest_batch"] = _ratios(out["rali_smallest_batch"], b)
        out["ratios_best_throughput"] = _ratios(out["rali_best_throughput"], b)
        out["ratio_definition"] = RATIO_DEFINITION
    return out


# ---------------------------------------------------------------- formatting


def chosen_by_auto(profile: dict) -> bool:
    """Whether `--backend auto` chose the path that ran (the settings record the resolved backend)."""
    return profile["settings"].get("backend") == "auto"


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_count(n) -> str:
    if n is None:
        return "n/a"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def fmt_number(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_metric(key: str, value) -> str:
    if key.endswith("bytes"):
        return fmt_bytes(value)
    if key == "parameters":
        return fmt_count(value)
    return fmt_number(value)


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:,.1f}x" if x >= 10 else f"{x:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def baseline_label(profile: dict) -> str:
    """What the baseline column, plots and headline call it: a random-weights run, and above all
    the tiny test architecture, must not pass for Q-Insight itself."""
    info = profile["baseline"]["info"]
    if info["mode"] == "weights":
        return "Q-Insight"
    if info.get("architecture") == "tiny":
        return "Q-Insight (TINY test architecture, random weights)"
    return "Q-Insight (random weights)"


def comparison_rows(profile: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (markdown and terminal share them)."""
    comp = profile["comparison"]
    one, best = comp["rali_smallest_batch"], comp["rali_best_throughput"]
    cols = [("RALI, batch %d" % one["batch_size"], one)]
    if best["batch_size"] != one["batch_size"]:
        cols.append(("RALI, batch %d" % best["batch_size"], best))
    base = comp.get("baseline")
    header = ["", *[c[0] for c in cols]]
    if base:
        header += [baseline_label(profile), f"ratio, batch {one['batch_size']}"]
        if len(cols) > 1:
            header.append(f"ratio, batch {best['batch_size']}")
    rows = []
    for key, label, unit, _ in METRICS:
        row = [label + (f" ({unit})" if unit and unit != "bytes" else "")]
        row += [fmt_metric(key, c[1][key]) for c in cols]
        if base:
            row.append(fmt_metric(key, base[key]))
            row.append(fmt_ratio(comp["ratios_smallest_batch"][key]))
            if len(cols) > 1:
                row.append(fmt_ratio(comp["ratios_best_throughput"][key]))
        rows.append(row)
    if base:
        tokens = profile["baseline"]["run"]["extra"]["tokens_per_image"]
        row = ["tokens generated per image", *["0" for _ in cols], fmt_number(tokens), ""]
        rows.append(row + ([""] if len(cols) > 1 else []))
    return header, rows


def summary_text(profile: dict) -> str:
    """The terminal summary: a plain aligned table."""
    header, rows = comparison_rows(profile)
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    model = profile["rali"]["model"]
    lines.append(f"RALI ran: {model['backend']} {model['dtype']}"
                 + (f", engine {Path(model['engine']).name}" if model.get("engine") else "")
                 + (" (chosen by --backend auto)" if chosen_by_auto(profile) else ""))
    if model.get("auto"):
        from rali_edge.engines.auto import Verdict

        lines += ["auto's candidates here (probe: one layer's products; measured: file to score on the fidelity "
                  "images; both against eager fp32):", *("  " + row for row in Verdict.from_dict(model["auto"]).table())]
    imgs = profile["images"]
    sizes = sorted({f"{w}x{h}" for w, h in imgs["sizes"]})
    lines.append(f"timed on {imgs['count']} images ({imgs['origin']}): {', '.join(sizes[:4])}"
                 + (f" and {len(sizes) - 4} other sizes" if len(sizes) > 4 else "")
                 + (f"; {len(imgs['skipped'])} unreadable files skipped" if imgs.get("skipped") else ""))
    power = profile["power"]
    if not power["available"]:
        lines.append(f"power: unavailable ({power['unavailable_reason']})")
    else:
        idle = power.get("idle_w")
        lines.append(f"power: {power['source']}" + (f", idle {idle:.2f} W" if idle is not None else ""))
    if profile.get("baseline"):
        lines.append(f"ratio = {RATIO_DEFINITION}")
    return "\n".join(lines)


# ---------------------------------------------------------------- markdown


def _stage_rows(run: dict, order) -> list[list[str]]:
    rows = []
    for name in [*order, *[s for s in run["stages"] if s not in order]]:
        s = run["stages"].get(name)
        if s is None:
            if name == "head" and run["extra"].get("head_in_encoder"):
                rows.append([name, "in encoder", "", "", "", "", "", ""])
            continue
        rows.append([name, *(fmt_number(s[k]) for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms")),
                     str(s["count"])])
    return rows


def markdown(profile: dict) -> str:
    from rali_edge.profiling.runner import BASELINE_STAGES, RALI_STAGES

    env, settings, power = profile["environment"], profile["settings"], profile["power"]
    model = profile["rali"]["model"]
    device = env["gpu"] or env["jetson_model"] or env["cpu"]
    out = [
        "# rali-edge profile",
        "",
        f"{profile['created']} on **{device}** ({settings['device']}), RALI backend `{model['backend']}`"
        + (f" (chosen by auto; engine `{Path(model['engine']).name}`)" if chosen_by_auto(profile) and model.get('engine')
           else " (chosen by auto)" if chosen_by_auto(profile) else "")
        + f", encoder dtype {model['dtype']}, power source: "
        + (f"{power['source']}" if power["available"] else f"unavailable ({power['unavailable_reason']})") + ".",
        "",
        f"Command: `{profile['command_line']}`",
        "",
    ]
    base = profile.get("baseline")
    out += [f"## RALI against {baseline_label(profile)}" if base else "## RALI", ""]
    header, rows = comparison_rows(profile)
    out += _table(header, rows) + [""]
    if base:
        comp = profile["comparison"]
        one, b = comp["rali_smallest_batch"], comp["baseline"]
        pct = [f"{100 * one[key] / b[key]:.2g}% of {what}"
               for key, what in (("ms_per_image", "the time per image"), ("peak_gpu_bytes", "the peak GPU memory"),
                                 ("j_per_image", "the energy per image"))
               if one[key] and b[key]]
        if pct:
            out += [f"At batch {one['batch_size']}, RALI needs " + ", ".join(pct) + " that Q-Insight needs.", ""]
        out += [f"Ratios: {RATIO_DEFINITION}. Q-Insight runs one image per request, as its demo does.", ""]
        info = base["info"]
        if info["mode"] != "weights":
            out += [f"**Q-Insight figures come from random weights**: they measure what the Qwen2.5-VL "
                    f"architecture (`{info['architecture']}`) costs for one Q-Insight request with "
                    f"{info['answer_tokens']} generated tokens, not the real model's answers. "
                    f"Answer length: {info['answer_tokens_basis']}", ""]
    out += [
        "Time per image is the mean end-to-end latency (file to score on the host) divided by the batch "
        "size; images/s is all images over all timed time. Energy per image is the load window's energy "
        "divided by the images scored in it; above idle subtracts idle power times the window. Peak host "
        "memory is the whole process's peak resident memory (Python, libraries and the model) during the run.",
        "",
        "## RALI latency per stage (ms per batch, after warm-up)",
        "",
        f"Model `{model['name']}` ({fmt_count(model['parameters'])} parameters, sha256 `{model['sha256'][:12]}`), "
        f"head `{model['head']}`. Stages: {profile['rali']['timing']}",
        "",
    ]
    for run in profile["rali"]["runs"]:
        out += [f"### batch {run['batch_size']}: {run['iterations']} iterations, "
                f"{fmt_number(run['images_per_s'])} images/s, {fmt_number(run['per_image_ms'])} ms/image", ""]
        out += _table(["stage", "mean", "p50", "p90", "p99", "min", "max", "n"], _stage_rows(run, RALI_STAGES))
        out += ["", f"Peak host memory {fmt_bytes(run['peak_host_rss_bytes'])}, peak GPU memory "
                    f"{fmt_bytes(run['peak_gpu_bytes'])}. " + _energy_sentence(run["energy"]), ""]
    if base:
        run, info = base["run"], base["info"]
        extra = run["extra"]
        out += ["## Q-Insight baseline", "",
                f"Mode **{info['mode']}**, architecture `{info['architecture']}`, {fmt_count(info['parameters'])} "
                f"parameters, {info['dtype']} on {info['device']}, attention `{info['attention']}`. Generation: "
                f"`{json.dumps(info['generation'])}`.", "",
                f"{run['iterations']} images; tokens generated per image: {extra['tokens_generated']}; "
                f"prompt tokens (image placeholders included): {extra['prompt_tokens']}"
                + ("" if info["prompt_tokens_counted"] else " (text part estimated, no tokenizer)")
                + f"; image tokens: {extra['image_tokens']}; {fmt_number(extra['ms_per_generated_token'])} ms per "
                "generated token after the first.", ""]
        if info["mode"] == "weights":
            out += [f"Ratings parsed from `<answer>`: {extra['ratings_parsed']} of {run['iterations']} "
                    f"({extra['ratings']}).", ""]
        out += _table(["stage", "mean", "p50", "p90", "p99", "min", "max", "n"], _stage_rows(run, BASELINE_STAGES))
        out += ["", "prefill = vision tower + prompt up to the first token's logits; generation = the "
                "remaining tokens.", "", f"Peak host memory {fmt_bytes(run['peak_host_rss_bytes'])}, peak GPU "
                f"memory {fmt_bytes(run['peak_gpu_bytes'])}. " + _energy_sentence(run["energy"]), ""]
        out += [f"- {n}" for n in info["notes"]] + [""]
    out += ["## Power", ""]
    if power["available"]:
        idle = power.get("idle")
        out += [f"Source `{power['source']}` (sensor update period {fmt_number(power['update_period_s'])} s). "
                + (f"Idle power {fmt_number(power['idle_w'])} W measured over {fmt_number(idle['window_s'])} s "
                   "before any model was loaded." if idle else "Idle power not measured."), ""]
        if power["source"] == "nvml":
            out += ["NVML measures the GPU board only, not the host CPU or memory.", ""]
    else:
        out += [f"Power unavailable: {power['unavailable_reason']}. Latency and memory figures are complete.", ""]
    warnings = _all_warnings(profile)
    if warnings:
        out += ["Warnings:", ""] + [f"- {w}" for w in warnings] + [""]
    imgs = profile["images"]
    out += ["## Images and settings", "",
            f"{imgs['count']} images ({imgs['origin']}): "
            + ", ".join(f"{n} {w}x{h}" for n, (w, h) in zip(imgs["names"], imgs["sizes"]))
            + ". Batches cycle through them.", "",
            f"Budget: {settings['budget']}.", ""]
    plots_written = [f for f in profile.get("files", []) if f.endswith(".png")]
    if plots_written:
        out += ["## Plots", ""] + [f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in plots_written] + [""]
    if profile["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in profile["notes"]] + [""]
    out += ["## Environment", "", "```json", json.dumps(env, indent=1), "```", ""]
    return "\n".join(out)


def _energy_sentence(energy: dict) -> str:
    if not energy["available"]:
        return "Power not measured."
    s = f"Average power {fmt_number(energy['load_avg_w'])} W over {fmt_number(energy['load_window_s'])} s, " \
        f"{fmt_number(energy['j_per_image'])} J per image"
    if energy.get("j_per_image_above_idle") is not None:
        s += f" ({fmt_number(energy['j_per_image_above_idle'])} J above idle)"
    return s + "."


def _all_warnings(profile: dict) -> list[str]:
    out = []
    for run in profile["rali"]["runs"]:
        out += [f"RALI batch {run['batch_size']}: {w}" for w in run["energy"].get("warnings", [])]
    if profile.get("baseline"):
        out += [f"Q-Insight: {w}" for w in profile["baseline"]["run"]["energy"].get("warnings", [])]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- plots


def plots(profile: dict, folder: Path) -> tuple[list[str], list[str]]:
    """PNG plots; (files written, notes). Without matplotlib: none, and a note saying so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["plots skipped: matplotlib is not installed (pip install 'rali-edge[profile]')"]
    written, notes = [], []
    runs = profile["rali"]["runs"]
    sizes = [r["batch_size"] for r in runs]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s--"), ("mean_ms", "^:")):
        ax1.plot(sizes, [r["stages"]["total"][key] for r in runs], style, label=key.replace("_ms", ""))
    ax1.set(ylabel="ms per batch (file to score)", title="RALI latency against batch size")
    ax1.legend()
    ax2.plot(sizes, [r["images_per_s"] for r in runs], "o-")
    ax2.set(ylabel="images/s", title="RALI throughput against batch size")
    for ax in (ax1, ax2):
        _batch_axis(ax, sizes)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, folder / "latency.png"))
    plt.close(fig)

    base = profile.get("baseline")
    name = baseline_label(profile) if base else ""
    labels = [f"RALI b={s}" for s in sizes] + ([name.replace(" (", "\n(")] if base else [])
    all_runs = runs + ([base["run"]] if base else [])
    colors = ["tab:blue"] * len(runs) + (["tab:red"] if base else [])
    vs = f", RALI against {name}" if base else ""
    written.append(_bars(plt, labels, [r["per_image_ms"] for r in all_runs], colors, "ms per image",
                         "Time per image" + vs, folder / "time_per_image.png"))
    energy = [r["energy"].get("j_per_image") for r in all_runs]
    if any(e is not None for e in energy):
        written.append(_bars(plt, labels, energy, colors, "J per image", "Energy per image" + vs,
                             folder / "energy_per_image.png"))
    else:
        notes.append("energy plot skipped: no power measurement")
    return written, notes


def _batch_axis(ax, sizes) -> None:
    from matplotlib.ticker import NullLocator

    if len(sizes) > 1 and max(sizes) / min(sizes) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("batch size")


def _bars(plt, labels, values, colors, ylabel, title, path: Path) -> str:
    """A bar per run with its value written on top; a log scale when values span > 20x
    (RALI and a 7B MLLM differ by orders of magnitude)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels)), 4))
    shown = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(labels, shown, color=colors)
    positive = [v for v in shown if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    for bar, v in zip(bars, values):
        ax.annotate("n/a" if v is None else fmt_number(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    name = _save(fig, path)
    plt.close(fig)
    return name


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=120)
    return path.name


# ---------------------------------------------------------------- writing


def write_report(profile: dict, folder: str | Path) -> list[str]:
    """profile.json, profile.md and the plots into `folder` (created). Returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, notes = plots(profile, folder)
    profile["notes"] = [*profile.get("notes", []), *notes]
    profile["files"] = ["profile.json", "profile.md", *written]
    (folder / "profile.md").write_text(markdown(profile), encoding="utf-8")
    (folder / "profile.json").write_text(json.dumps(profile, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    return profile["files"]


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def new_profile(settings: dict, command_line: str, argv: list[str]) -> dict:
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line,
        "argv": argv,
        "settings": settings,
        "notes": [],
    }


__all__ = ["environment", "comparison", "summary_text", "markdown", "plots", "write_report", "new_profile", "figures"]
