"""The GPU parts of bench/gpu_check.sh that no other tool measures: the encoder's throughput and
file-to-score on real-size JPEGs, at ViT-L/14-336 size (random weights cost what trained ones do).

    python bench/gpu.py model   WORK             # the ViT-L model (rali-edge and published layouts)
    python bench/gpu.py encoder WORK OUT.md      # eager fp16/bf16, plain and as a CUDA graph
    python bench/gpu.py compile WORK OUT.md      # torch.compile of the encoder
    python bench/gpu.py aoti    WORK OUT.md      # an AOTInductor engine built as a user builds it
    python bench/gpu.py e2e     WORK OUT.md      # files -> scores: published vs rali-edge, and decoding alone

Every time is the median of CUDA-event timings after warm-up, on inputs already on the GPU (encoder,
aoti) or from JPEG files (e2e). The floor is this GPU's bf16 matmul rate, measured in the same run on
8192^3 random matrices, over the encoder's matmul GFLOP per image (e2e.rali_encoder_gflop); images/s
over it is "% of floor".
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the CPU benchmark's model, images and published pipeline)

ENCODER_GFLOP = e2e.rali_encoder_gflop()  # about 368 at ViT-L/14-336 (the last layer: the class token's row)
BATCHES = (1, 8, 32, 128, 256)
GOALS = "bf16 >= 1400 images/s at batch 128 (68% of the floor); batch 1 <= 2 ms"


def cuda_ms(fn, repeats: int = 20, warmup: int = 3, device: str = "cuda") -> float:
    """Median milliseconds of fn() between CUDA events (a host clock on a CPU: the tests' dry run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cpu":
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def bf16_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / cuda_ms(lambda: a @ b, repeats=10) / 1e9


def environment() -> list[str]:
    from importlib.metadata import version

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    else:
        device = "CPU (a dry run: these numbers are not GPU results)"
    return [f"- device: {device}",
            f"- torch {torch.__version__}, triton {version('triton')}, CUDA {torch.version.cuda}",
            f"- command: python bench/gpu.py {' '.join(sys.argv[1:])}"]


def write(out: Path, title: str, lines: list[str], rows: list[dict]) -> None:
    text = "\n".join([f"# {title}", "", *environment(), *lines, ""])
    if rows:
        keys = list(rows[0])
        text += "\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
        text += "\n".join("| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"title": title, "notes": lines, "rows": rows}, indent=1))
    print(text)


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------ parts
def make_model(work: Path, layers: int = 24) -> Path:
    """The random ViT-L/14-336 model, once per WORK folder (the other parts reuse it)."""
    if not (work / "model" / "manifest.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        e2e.build_models(work, layers)
    return work / "model"


def encoder_rows(scorer, label: str, tflops: float, batches=BATCHES, graph: bool = False,
                 device: str = "cuda") -> list[dict]:
    rows = []
    for b in batches:
        pixels = torch.randn(b * scorer.preprocess.view_count, 3, 336, 336, device=device)
        fn = lambda: scorer.score_pixels(pixels)  # noqa: E731
        if graph:  # the whole encoder and head replayed as one CUDA graph: no launch gaps
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn(), fn()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):  # the stream the head's workspace was made on
                fn()
            fn = g.replay  # noqa: E731
        ms = cuda_ms(fn, device=device)
        rate = b / ms * 1000
        rows.append({"path": label, "batch": b, "ms": ms, "images/s": rate,
                     "% of bf16 floor": 100 * rate * ENCODER_GFLOP / (tflops * 1000)})
    return rows


def encoder(work: Path, out: Path) -> None:
    """Eager fp16 and bf16, plain and replayed as a CUDA graph. The table is rewritten after each
    path, so a part stopped at its time limit keeps what it measured."""
    import rali_edge

    model, tflops = make_model(work), bf16_tflops()
    notes = [f"- bf16 matmul rate measured here: {tflops:.0f} TFLOP/s; floor {tflops * 1000 / ENCODER_GFLOP:.0f} "
             f"images/s ({ENCODER_GFLOP:.0f} GFLOP per image)", f"- goals: {GOALS}"]
    rows = []
    for dtype in ("fp16", "bf16"):
        scorer = rali_edge.load(model, device="cuda", dtype=dtype, backend="torch", head="auto")
        eager = encoder_rows(scorer, f"eager {dtype}", tflops)
        for r in eager:  # after the calls: --head auto may have fallen back to the eager head
            r["path"] += f", head {scorer.head.impl_name}"
        rows += eager
        write(out, "Encoder throughput (ViT-L/14-336, encoder + head)", notes, rows)
        rows += encoder_rows(scorer, f"eager {dtype} + CUDA graph", tflops, batches=(1, 8, 128), graph=True)
        write(out, "Encoder throughput (ViT-L/14-336, encoder + head)", notes, rows)
        del scorer
        torch.cuda.empty_cache()


def compiled(work: Path, out: Path) -> None:
    """torch.compile of the encoder in bf16: reduce-overhead (CUDA graphs) at batch 1, the default
    mode at batch 128; compile times included in the label."""
    import rali_edge

    model, tflops = make_model(work), bf16_tflops()
    scorer = rali_edge.load(model, device="cuda", dtype="bf16", backend="torch", head="auto")
    module = scorer.encoder.encoder  # TorchEncoder calls its class_token(pixels)
    rows = []
    for mode, batches in (("reduce-overhead", (1,)), ("default", (128,))):
        t0 = time.perf_counter()
        module.class_token = torch.compile(type(module).class_token.__get__(module), mode=mode, dynamic=False)
        timed = encoder_rows(scorer, f"torch.compile bf16 ({mode})", tflops, batches=batches)
        for r in timed:
            r["path"] += f", compiled and timed in {time.perf_counter() - t0:.0f} s"
        rows += timed
        del module.class_token  # back to the eager method
        write(out, "torch.compile of the encoder (ViT-L/14-336, bf16)", [
            f"- bf16 matmul rate measured here: {tflops:.0f} TFLOP/s", f"- goals: {GOALS}"], rows)


def aoti(work: Path, out: Path) -> None:
    import rali_edge

    model, tflops = make_model(work), bf16_tflops()
    folder = work / f"aoti-{time.time():.0f}"  # a fresh folder: build never overwrites an engine
    folder.mkdir()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rali_edge.cli", "build", str(model), "--target", "aoti", "--device", "cuda",
                    "--precision", "bf16", "--batch", "1:128:256", "--no-progress", "-o", str(folder)],
                   check=True)
    built = time.perf_counter() - t0
    engine = next(p for p in folder.iterdir() if p.suffix == ".pt2")
    scorer = rali_edge.load(model, device="cuda", engine=engine)
    rows = encoder_rows(scorer, "AOTInductor bf16", tflops, batches=(1, 8, 128, 256))
    write(out, "AOTInductor engine (ViT-L/14-336, bf16)", [
        f"- built with `rali-edge build --target aoti --device cuda --precision bf16 --batch 1:128:256` in {built:.0f} s "
        "(fidelity check included)", f"- bf16 matmul rate measured here: {tflops:.0f} TFLOP/s", f"- goals: {GOALS}"], rows)


def files_to_scores(work: Path, out: Path, n: int = 16, repeats: int = 3, device: str = "cuda",
                    layers: int = 24) -> list[dict]:
    """12 MP JPEGs to scores: the published pipeline on the GPU, rali-edge as `rali-edge score
    --device cuda` runs it, and the decoding and preprocessing alone (the same threads)."""
    from concurrent.futures import ThreadPoolExecutor

    import rali_edge
    from rali_edge.images import open_image
    from rali_edge.scoring import default_workers

    make_model(work, layers)
    photos = work / "photos"
    photos.mkdir(exist_ok=True)
    paths = e2e.make_images(photos, n)
    n = len(paths)  # the bundled samples are 15: fewer when n is more
    published = e2e.published_scorer(work, device=device)
    default = rali_edge.load(work / "model", device=device)
    fp16 = rali_edge.load(work / "model", device=device, dtype="fp16", backend="torch")

    def decode_only(workers=2):
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda p: default.preprocess.views_tensor(open_image(p)), paths))

    variants = {
        "published (transformers fp32, 1 image per call)": published,
        f"rali-edge default ({default.backend} {default.dtype_name}), batch 8":
            lambda ps: [r.score for r in default.score_files(ps, batch_size=8)],
        "rali-edge torch fp16, batch 32": lambda ps: [r.score for r in fp16.score_files(ps, batch_size=32)],
        f"decode + preprocess alone, {default_workers()} threads (as score_files)": lambda ps: decode_only(default_workers()),
        "decode + preprocess alone, 2 threads": lambda ps: decode_only(2),
    }
    scores = {name: fn(paths) for name, fn in variants.items()}  # warm-up, and the scores compared
    times = {name: [] for name in variants}
    for _ in range(repeats):  # in turns, so that the machine's state spreads over all of them
        for name, fn in variants.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn(paths)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    base = next(iter(variants))
    rows = []
    for name, ts in times.items():
        s = statistics.median(ts)
        diff = (max(abs(a - b) for a, b in zip(scores[name], scores[base])) if scores[name] else None)
        rows.append({"path": name, "images/s": n / s, "ms/image": 1000 * s / n,
                     "vs published": statistics.median(times[base]) / s, "max score diff vs published":
                     "-" if diff is None else f"{diff:.1e}"})
    write(out, "Files to scores on the GPU (12 MP JPEGs)", [
        f"- {n} JPEGs: the bundled samples (clean and distorted photographs) enlarged to 12 MP; median of {repeats}",
        "- decoding bounds the path when the rali-edge rows run near the decode-alone rows"], rows)
    return rows


PARTS = {"encoder": encoder, "compile": compiled, "aoti": aoti, "e2e": files_to_scores}

if __name__ == "__main__":
    part, work = sys.argv[1], Path(sys.argv[2])
    if part == "model":
        print(make_model(work))
    else:
        PARTS[part](work, Path(sys.argv[3]))
