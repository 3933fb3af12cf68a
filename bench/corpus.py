"""Scoring a corpus on one machine: images/s of the local pipeline (`Scorer.score_files`, as
`rali-edge score` runs it) and of Ray Data (`rali_edge.distributed.score_paths`, as
`rali-edge score --ray local` runs it) side by side in one run, alternating, medians; the local
pipeline's encoder-busy share and bottleneck; and the resident memory of the local path over a
long run (RSS sampled every 500 images).

    python bench/corpus.py --out bench/results/corpus-cpu.md             # the built-in model and ViT-L size
    python bench/corpus.py --long 0 --vitl 0 --images 40                # a quick try

Photographs: the bundled samples (whole photographs, clean and distorted) re-saved as ~1 MP JPEGs.
The ViT-L/14-336 model has random weights (they cost what trained ones cost) and runs eager
PyTorch fp32 on both paths, so the comparison is of the pipelines, not of engines.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_jpegs(folder: Path, n: int, pixels: int, tag: str) -> list[str]:
    """`n` JPEG files of about `pixels` pixels each, cycling through the bundled photographs."""
    from rali_edge.images import sample_images

    samples = sample_images()
    sources = []
    for p in samples:
        im = Image.open(p).convert("RGB")
        k = (pixels / (im.width * im.height)) ** 0.5
        sources.append(im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.LANCZOS))
    written = []
    for i, im in enumerate(sources):
        path = folder / f"{tag}-{i}.jpg"
        im.save(path, quality=90)
        written.append(str(path))
    return [written[i % len(written)] for i in range(n)]  # the same files again: a corpus of n paths


def vitl_model(folder: Path) -> Path:
    from small_model import make_small_model

    from rali_edge.model import EncoderConfig

    cfg = EncoderConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, projection_dim=768)
    return make_small_model(folder / "vitl", config=cfg, pca_dim=512, num_prototypes=250)


def timed(results, batch_size: int):
    """(images/s over the whole run, seconds to the first batch, images/s after the first batch):
    what a user waits for, the start within it (a model load; on Ray also its workers and actors),
    and the rate once running, which is what a corpus of millions sees."""
    start, first, n = time.perf_counter(), None, 0
    for i, r in enumerate(results, 1):
        n += r.error is None
        if i == batch_size:
            first = time.perf_counter() - start
    wall = time.perf_counter() - start
    running = (n - batch_size) / (wall - first) if n >= 8 * batch_size else float("nan")  # too few batches to say
    return n / wall, first, running


def timed_local(model, paths, backend, batch_size):
    import rali_edge
    from rali_edge.scoring import PipelineStats

    stats = PipelineStats()
    start = time.perf_counter()
    scorer = rali_edge.load(model, backend=backend)
    loaded = time.perf_counter() - start
    rate, first, running = timed(scorer.score_files(paths, batch_size=batch_size, stats=stats), batch_size)
    return (len(paths) / (len(paths) / rate + loaded), first + loaded, running), stats


def timed_ray(model, paths, backend, batch_size):
    from rali_edge.distributed import score_paths

    return timed(score_paths(paths, model, backend=backend, batch_size=batch_size), batch_size)


def _decode(path: str) -> np.ndarray:
    from rali_edge.preprocess import read_views

    return read_views(_decode.pre, path, normalized=False)[0]


def decode_rates(paths: list[str]) -> dict[str, float]:
    """images/s of decoding alone with one thread per core (score_files' choice) and with one
    process per core (the views pickled back to this process, as a process pipeline would)."""
    import rali_edge
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    _decode.pre = rali_edge.load("default").preprocess
    rates = {}
    for name, pool_type in (("threads", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
        with pool_type(max_workers=os.cpu_count()) as pool:  # forked processes inherit _decode.pre
            list(pool.map(_decode, paths[: 2 * os.cpu_count()]))  # workers started
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                for _views in pool.map(_decode, paths, chunksize=4):
                    pass
                runs.append(len(paths) / (time.perf_counter() - start))
        rates[name] = statistics.median(runs)
    return rates


def _rate(rate: float, local: float | None = None) -> str:
    if rate != rate:  # nan: too few batches
        return "-"
    return f"{rate:.2f}" + (f" ({rate / local:.2f}x)" if local else "")


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def long_run(model, paths, batch_size):
    """RSS of this process every 500 images of one long local run."""
    import rali_edge

    scorer = rali_edge.load(model)
    samples = []
    for i, _ in enumerate(scorer.score_files(paths, batch_size=batch_size), 1):
        if i % 500 == 0:
            samples.append((i, rss_mib()))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000, help="images per timed run, built-in model")
    ap.add_argument("--vitl", type=int, default=16, help="images per timed run at ViT-L size (0: skip)")
    ap.add_argument("--long", type=int, default=10_000, help="images of the long local run for RSS (0: skip)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1, help="time decoding alone, threads against processes (0: skip)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import ray

    import rali_edge

    tmp = Path(tempfile.mkdtemp(prefix="rali-corpus-"))
    one_mp = make_jpegs(tmp, args.images, 1_000_000, "1mp")
    cases = [("built-in model (default path)", "default", "auto", one_mp, 16)]
    if args.vitl:
        cases.append(("ViT-L/14-336 size, eager fp32", str(vitl_model(tmp)), "torch", one_mp[: args.vitl], 8))

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for title, model, backend, paths, batch in cases:
        timed_local(model, paths[:batch], backend, batch)  # warm: engines from the cache, first-touch costs
        timed_ray(model, paths[:batch], backend, batch)
        local, on_ray, busy = [], [], []
        for _ in range(args.repeats):  # alternating: drift of the machine hits both paths alike
            rates, stats = timed_local(model, paths, backend, batch)
            local.append(rates)
            busy.append(stats)
            on_ray.append(timed_ray(model, paths, backend, batch))
        lm = [statistics.median(r[i] for r in local) for i in range(3)]
        rm = [statistics.median(r[i] for r in on_ray) for i in range(3)]
        rows.append((title, len(paths), lm, rm, busy[-1].bottleneck()))
        print(rows[-1], flush=True)
    ray.shutdown()

    decode_paths = one_mp[:200]
    decoding = decode_rates(decode_paths) if args.decode else {}
    long_rows = long_run("default", make_jpegs(tmp, args.long, 300_000, "long"), 16) if args.long else []
    lines = [
        "# Scoring a corpus on one machine: the local pipeline and Ray Data",
        "",
        f"Command: `python bench/corpus.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"ray {ray.__version__}, rali-edge {rali_edge.__version__}.  ",
        "Images: the bundled photographs re-saved as ~1 MP JPEGs (quality 90), decode included. Local: "
        "`Scorer.score_files` (decoding threads, one per core). Ray: `score_paths` on a local cluster "
        f"(decoding tasks, 1 scoring actor), rows read back in input order. Medians of {args.repeats} run(s), the paths alternating.",
        "",
        "| model | images | path | images/s (whole run, start included) | first batch after, s | images/s after the first batch | local pipeline |",
        "|---|---|---|---|---|---|---|",
        *[line for t, n, lm, rm, b in rows for line in (
            f"| {t} | {n} | local | {lm[0]:.2f} | {lm[1]:.1f} | {_rate(lm[2])} | {b} |",
            f"| | | Ray | {rm[0]:.2f} ({rm[0] / lm[0]:.2f}x local) | {rm[1]:.1f} | {_rate(rm[2], lm[2])} | |")],
    ]
    if decoding:
        lines += ["", f"Decoding alone ({len(decode_paths)} of the 1 MP JPEGs to their uint8 views, {os.cpu_count()} workers, "
                  "median of 3): " + ", ".join(f"{k} {v:.1f} images/s" for k, v in decoding.items()) + "."]
    if long_rows:
        first, peak = long_rows[0][1], max(r for _, r in long_rows)
        lines += ["", f"Long run, local path, built-in model, {args.long} JPEGs of 0.3 MP: RSS {first:.0f} MiB after "
                  f"500 images, at most {peak:.0f} MiB (+{100 * (peak / first - 1):.1f}%); every 500 images: "
                  + ", ".join(f"{r:.0f}" for _, r in long_rows) + " MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
