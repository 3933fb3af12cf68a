"""`rali-edge serve` under load, against `Scorer.score_files` on the same images in the same run.

The server runs as users run it (`python -m rali_edge.cli serve`, default backend, a fresh engine
cache); clients are threads of this process sending one 1 MP JPEG per request (the raw body) over
keep-alive connections:

1. closed loop: 1, 4, 16 and 64 clients, each sending its next request when the last is answered:
   images/s, p50/p99 latency, mean batch size (from /metrics); `--rounds` rounds, each client
   count right after a run of the ceiling, `Scorer.score_files` over the same images in this
   process (the server idle meanwhile), so that both see the same machine; medians of the rounds;
2. open loop at half the 16 clients' rate: p50/p99 when the server is not saturated;
3. (--soak N) N requests at 16 clients, the server's RSS sampled: flat after warm-up.

    python bench/serve.py --out bench/results/serve-cpu.md                       # the built-in model
    python bench/serve.py --vitl --requests 24 --out bench/results/serve-cpu-vitl.md   # ViT-L/14-336 size
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def one_megapixel_jpegs(folder: Path, n: int) -> list[Path]:
    """`n` JPEGs of about 1 MP (1155 x 866), made from the bundled photographs (quality 90)."""
    from PIL import Image

    from rali_edge.images import sample_images

    sources = sample_images()
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.jpg"
        Image.open(sources[i % len(sources)]).convert("RGB").resize((1155, 866), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, cache: Path, max_batch: int, max_delay_ms: float):
        self.port = free_port()
        env = {**os.environ, "RALI_EDGE_CACHE": str(cache)}
        env.pop("RALI_EDGE_BACKEND", None)
        self.process = subprocess.Popen([sys.executable, "-m", "rali_edge.cli", "serve", "--model", model, "--port",
                                         str(self.port), "--max-batch", str(max_batch), "--max-delay-ms",
                                         str(max_delay_ms), "--max-queue", "1024"], env=env,
                                        stderr=subprocess.DEVNULL)
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    def batch_totals(self) -> tuple[float, float]:
        text = self.metrics()

        def value(name):
            return float(re.search(rf"^{name} ([\d.e+]+)$", text, re.M).group(1))

        return value("rali_serve_batch_images_sum"), value("rali_serve_batch_images_count")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


class Client:
    """One keep-alive connection sending one image per request."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def score(self, body: bytes) -> float:
        start = time.perf_counter()
        self.conn.request("POST", "/score", body=body, headers={"Content-Type": "image/jpeg"})
        answer = self.conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{answer.status}: {data[:200]}")
        return time.perf_counter() - start


def closed_loop(server: Server, bodies: list[bytes], clients: int, requests: int) -> dict:
    """`clients` threads, each sending its next request when the last is answered, `requests` in all."""
    latencies, lock, next_index = [], threading.Lock(), iter(range(requests))
    sum0, count0 = server.batch_totals()

    def worker():
        client = Client(server.port)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            latencies.append(client.score(bodies[i % len(bodies)]))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    sum1, count1 = server.batch_totals()
    return {"clients": clients, "requests": requests, "images_per_s": requests / wall, **_percentiles(latencies),
            "mean_batch": (sum1 - sum0) / max(count1 - count0, 1), "latencies": latencies}


def open_loop(server: Server, bodies: list[bytes], rate: float, requests: int) -> dict:
    """Requests sent at `rate` per second whatever the answers (a pool big enough never to lag)."""
    latencies = []
    local = threading.local()

    def send(i):
        if not hasattr(local, "client"):
            local.client = Client(server.port)
        latencies.append(local.client.score(bodies[i % len(bodies)]))

    start = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        for i in range(requests):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            pool.submit(send, i)
    return {"rate_per_s": rate, "requests": requests, **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[min(len(ordered) - 1,
                                                                                       int(0.99 * len(ordered)))]}


def ceiling(model: str, paths: list[Path], cache: Path) -> Callable[[], float]:
    """One run of Scorer.score_files over `paths`, as `rali-edge score` runs it: images/s."""
    os.environ["RALI_EDGE_CACHE"] = str(cache)
    os.environ.pop("RALI_EDGE_BACKEND", None)
    import rali_edge

    scorer = rali_edge.load(model)
    files = [str(p) for p in paths]
    list(scorer.score_files(files[:2]))  # warm

    def run() -> float:
        start = time.perf_counter()
        list(scorer.score_files(files))
        return len(files) / (time.perf_counter() - start)

    return run


def median_row(runs: list[dict]) -> dict:
    """The rounds of one client count: median images/s, the latencies of every round pooled."""
    latencies = [x for r in runs for x in r.pop("latencies")]
    return {"clients": runs[0]["clients"], "requests": sum(r["requests"] for r in runs),
            "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "rounds": [round(r["images_per_s"], 2) for r in runs], **_percentiles(latencies),
            "mean_batch": statistics.mean(r["mean_batch"] for r in runs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--vitl", action="store_true", help="a random ViT-L/14-336 model (bench/e2e.py's) instead")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--requests", type=int, default=192, help="requests per closed-loop phase")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every client count, each after a ceiling run")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-delay-ms", type=float, default=10.0)
    ap.add_argument("--soak", type=int, default=0, help="requests of the RSS phase (0: none)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if args.vitl:
            sys.path.insert(0, str(ROOT / "bench"))
            import e2e

            _, model = e2e.build_models(tmp, 24)
            model = str(model)
        paths = one_megapixel_jpegs(tmp, args.images)
        bodies = [p.read_bytes() for p in paths]
        cache = tmp / "engine-cache"
        run_ceiling = ceiling(model, paths, cache)
        server = Server(model, cache, args.max_batch, args.max_delay_ms)
        runs: dict[int, list[dict]] = {}
        ceiling_runs, soak = [], []
        try:
            Client(server.port).score(bodies[0])  # warm
            for _ in range(args.rounds):
                for clients in map(int, args.clients.split(",")):
                    ceiling_runs.append(run_ceiling())
                    runs.setdefault(clients, []).append(closed_loop(server, bodies, clients, args.requests))
                    print(json.dumps({"score_files": round(ceiling_runs[-1], 2),
                                      **{k: v for k, v in runs[clients][-1].items() if k != "latencies"}}),
                          file=sys.stderr)
            rows = [median_row(r) for r in runs.values()]
            ceiling_rate = statistics.median(ceiling_runs)
            at16 = next((r for r in rows if r["clients"] == 16), rows[-1])
            half = open_loop(server, bodies, at16["images_per_s"] / 2, max(args.requests // 2, 16))
            print(json.dumps(half), file=sys.stderr)
            if args.soak:
                done = 0
                while done < args.soak:
                    n = min(1000, args.soak - done)
                    closed_loop(server, bodies, 16, n)
                    done += n
                    soak.append({"requests": done, "rss_mib": round(server.rss_mib(), 1)})
                    print(json.dumps(soak[-1]), file=sys.stderr)
        finally:
            server.stop()

    report(args, model, ceiling_rate, ceiling_runs, rows, half, soak)
    return 0


def report(args, model, ceiling_rate, ceiling_runs, rows, half, soak) -> None:
    import torch

    table = ["| clients | images/s | vs score_files | p50 ms | p99 ms | mean batch |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['clients']} | {r['images_per_s']:.2f} | {r['images_per_s'] / ceiling_rate:.2f}x | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.2f} |")
    lines = [
        f"# rali-edge serve under load ({'ViT-L/14-336 size, random weights' if args.vitl else model})", "",
        f"- Command: `python bench/serve.py {' '.join(sys.argv[1:])}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores ({_cpu()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}; server and clients on this machine.",
        f"- Images: {args.images} JPEGs of 1155 x 866 (1 MP), one per request, as the raw body; "
        f"--max-batch {args.max_batch}, --max-delay-ms {args.max_delay_ms:g}, the default backend.",
        f"- Ceiling: `Scorer.score_files` over the same files in this process, run before each client count of "
        f"each of {args.rounds} round{'s' if args.rounds != 1 else ''}: median **{ceiling_rate:.2f} images/s** (runs: "
        f"{min(ceiling_runs):.1f} to {max(ceiling_runs):.1f}). Rows: medians of the rounds; latencies pooled.", "",
        *table, "",
        f"Open loop at half the 16 clients' rate ({half['rate_per_s']:.2f} requests/s, {half['requests']} requests): "
        f"p50 {half['p50_ms']:.0f} ms, p99 {half['p99_ms']:.0f} ms ({half['p99_ms'] / half['p50_ms']:.2f}x).",
    ]
    if soak:
        lines += ["", f"RSS of the server over {soak[-1]['requests']} requests at 16 clients (MiB): "
                  + ", ".join(f"{s['rss_mib']:.0f}" for s in soak) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"ceiling": ceiling_rate, "ceiling_runs": ceiling_runs, "closed": rows, "half": half,
                                                             "soak": soak}, indent=1) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
