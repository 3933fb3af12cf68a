"""Soak test for `rali-edge stream`: N looping file sources for S seconds through the real
runtime, sampling the process's resident memory (and CUDA memory) every few seconds.

The stream runtime's buffers are bounded, so after warm-up the RSS curve must be flat; this
prints the curve, the growth over the second half of the run and a linear-fit slope.

    .venv/bin/python bench/stream_soak.py --sources 4 --seconds 600                  # built-in model, CPU
    .venv/bin/python bench/stream_soak.py --device cuda --dtype fp16 --json bench/results/stream_soak.json
    .venv/bin/python bench/stream_soak.py --fake-scorer 0.02 --seconds 60            # runtime only, no model

Without --video it writes a 10 s 640x480 MJPG clip of a panning photo to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rali_edge.runtime.sources import parse_source, require_cv2
from rali_edge.outputs import Output
from rali_edge.runtime.stream import RECORDS, SafeSink, StreamOptions, StreamRuntime, warm_up


def rss_mib() -> float:
    """Resident set size of this process, from /proc (Linux, Jetson included)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cuda_mib() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.memory_allocated() / 2**20


def write_clip(path: Path, seconds: float = 10, fps: int = 30, size=(640, 480)) -> Path:
    cv2 = require_cv2()
    w, h = size
    try:
        from skimage import data

        photo = data.astronaut()  # public domain (NASA), ships with scikit-image
    except ImportError:
        rng = np.random.default_rng(0)
        photo = cv2.resize(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), (512, 512))
    photo = cv2.resize(photo, (w + 200, h + 200))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for i in range(int(seconds * fps)):
        x = (i * 2) % 200
        writer.write(cv2.cvtColor(np.ascontiguousarray(photo[100 : 100 + h, x : x + w]), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def fake_scorer(seconds_per_batch: float):
    def score(frames):
        time.sleep(seconds_per_batch)
        return [float(f.mean()) / 64.0 + 1.0 for f in frames]

    return score


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--video", help="a video file to loop (default: a generated 640x480 clip)")
    ap.add_argument("--model", help="model folder (default: the built-in model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--engine")
    ap.add_argument("--policy", choices=["all", "latest"], default="all")
    ap.add_argument("--realtime", action="store_true", help="read files at their frame rate (with --policy latest: drops)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--fake-scorer", type=float, metavar="SECONDS", help="no model: sleep this long per batch")
    ap.add_argument("--json", help="write the samples and the verdict here")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    video = Path(args.video) if args.video else write_clip(Path(tmp.name) / "soak.avi")
    if args.fake_scorer is not None:
        score_batch, scorer_name = fake_scorer(args.fake_scorer), f"fake ({args.fake_scorer} s per batch)"
    else:
        import rali_edge

        scorer = rali_edge.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend, engine=args.engine)
        score_batch, scorer_name = scorer.score_arrays, f"{args.model or 'built-in'} {scorer.backend} {args.device} {scorer.dtype_name}"
        warm_up(score_batch)  # as the CLI does

    specs = [parse_source(str(video)) for _ in range(args.sources)]
    options = StreamOptions(policy=args.policy, max_batch=args.max_batch, loop=True, realtime=args.realtime,
                            duration=args.seconds, summary_every=0)
    sink = SafeSink(Output(os.devnull, RECORDS), threading.Event())
    runtime = StreamRuntime(specs, score_batch, sink, options, log=lambda line: None)

    samples = []
    start = time.monotonic()
    done = threading.Event()

    def sample():
        while True:
            scored = sum(s.scored for s in runtime.states)
            dropped = sum(s.dropped for s in runtime.states)
            samples.append({"t": round(time.monotonic() - start, 1), "rss_mib": round(rss_mib(), 1),
                            "cuda_mib": cuda_mib(), "scored": scored, "dropped": dropped})
            s = samples[-1]
            cuda = "" if s["cuda_mib"] is None else f"  cuda {s['cuda_mib']:8.1f} MiB"
            print(f"t {s['t']:7.1f} s  rss {s['rss_mib']:8.1f} MiB{cuda}  scored {scored:8d}  dropped {dropped:8d}", flush=True)
            if done.wait(args.sample_every):
                return

    print(f"soak: {args.sources} x {video.name} for {args.seconds:.0f} s, scorer {scorer_name}, policy {args.policy}", flush=True)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = runtime.run()
    done.set()
    sampler.join()
    elapsed = time.monotonic() - start

    # Warm-up (allocator pools, decoder buffers) happens in the first part of the run; the claim
    # is about what follows: compare the second half's first and last samples, and fit a slope.
    half = [s for s in samples if s["t"] >= elapsed / 2] or samples
    growth = half[-1]["rss_mib"] - half[0]["rss_mib"]
    t = np.array([s["t"] for s in half])
    rss = np.array([s["rss_mib"] for s in half])
    slope = round(float(np.polyfit(t, rss, 1)[0] * 60), 3) if len(half) >= 3 else None  # MiB per minute
    scored = sum(s["scored"] for s in result.streams)
    verdict = {
        "sources": args.sources, "seconds": round(elapsed, 1), "scorer": scorer_name, "policy": args.policy,
        "frames_scored": scored, "fps_scored": round(scored / elapsed, 2), "batches": result.batches,
        "rss_start_mib": samples[0]["rss_mib"], "rss_peak_mib": max(s["rss_mib"] for s in samples),
        "rss_end_mib": samples[-1]["rss_mib"], "second_half_growth_mib": round(growth, 1),
        "second_half_slope_mib_per_min": slope,
        "host": platform.node(), "python": platform.python_version(),
    }
    print(json.dumps(verdict, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"verdict": verdict, "samples": samples}, indent=1) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
