"""End-to-end scoring speed on this machine: every path rali-edge has here against the published
RALI pipeline, from JPEG file to score, at ViT-L/14-336 size (random weights cost exactly what
trained ones cost).

- published: transformers' CLIPImageProcessor + CLIPModel.get_image_features (fp32) loaded with
  from_pretrained, and the published head formula, one image per call as in Q-Insight's
  demo_rali_score.py;
- rali-edge default: `rali_edge.load(model)` and `Scorer.score_files`, what `rali-edge score`
  runs: backend auto, its engine built on first use into an engine cache (a temporary one here);
- rali-edge torch fp32 / bf16 (`--backend torch`), auto int8 (`--dtype int8`), and with `--aoti`
  the AOTInductor engines; each at batch 1 and batch 8.

The images are --images of the bundled samples (clean and distorted photographs) enlarged to
12 MP (a phone camera's size, what `rali-edge profile` times by default). The head is made by
RALI's own recipe for the random encoder (`recipe_head`), so that scores spread over the 1..5
scale and respond to the encoder as a trained head's do. Variants run in turns (A B C A B C ...),
in one process, so that load from other processes spreads over all of them; we report the median
images/s, the ratio to the published path, and each path's peak RSS (a fresh process per path
that loads it and scores the images: in the timing process every path is loaded at once).
Accuracy is measured apart from the timing, on 78 photographs at their own sizes (the bundled
clean ones, clean and with five distortions at five levels: `accuracy_images`): each path's
largest score difference from the published scores, and the rank agreement (SRCC) with them.

An int8 engine that auto refuses (its fidelity check fails at 0.02) is built anyway with no limit
and timed, marked as refused: what it would cost and how far it moves the scores.

The floor: this machine's GEMM rates, measured here (torch fp32 and bf16, ONNX Runtime fp32 and
int8 dynamic quantization on a [577 x 1024] x [1024 x 4096] matmul, the MLP's first layer), times
the encoder's matmul FLOPs (381 GFLOP per image at ViT-L/14-336, attention included).

    python bench/e2e.py --images 8 --repeats 3 --out bench/results/e2e-cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rali_edge.model_file import WEIGHTS

CHILD = "--rss-child"


# ------------------------------------------------------------------------------ the workload
def make_images(folder: Path, n: int) -> list[str]:
    """`n` of the bundled samples (clean and distorted photographs, spread over all of them),
    enlarged to 12 MP and written as JPEG files."""
    from rali_edge.profiling.runner import bundled_photographs

    photos = bundled_photographs(distorted=True)
    picked = sorted({round(i * (len(photos.sources) - 1) / max(n - 1, 1)) for i in range(n)})
    paths = []
    for i in picked:
        path = folder / photos.names[i]
        path.write_bytes(photos.sources[i])
        paths.append(str(path))
    return paths


def build_models(folder: Path, layers: int) -> tuple[Path, Path]:
    """A random ViT-L/14-336 CLIPModel (tiny text tower) saved as the published `best/` folder is,
    and the same weights as a rali-edge model; the head's parameters go in a file beside them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rali_edge.model import EncoderConfig
    from rali_edge.model_file import Manifest, build_model, save_model
    from rali_edge.preprocess import PreprocessConfig

    torch.manual_seed(0)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=768)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    clip.save_pretrained(folder / "best")
    processor.save_pretrained(folder / "best")

    head = recipe_head(clip, processor)
    p, k = head.pca_dim, head.num_prototypes
    torch.save(dataclasses.asdict(head), folder / "head.pt")
    cfg = EncoderConfig.from_hf(clip.config.to_dict())
    state = {k_: v for k_, v in clip.state_dict().items() if k_.startswith(("vision_model.", "visual_projection."))}
    pre = PreprocessConfig.from_hf(processor.to_dict())
    model = save_model(folder / "model", build_model(cfg, state, head), Manifest("bench-vitl14-336", cfg, pre.to_dict(), p, k))
    return folder / "best", model


HEAD_PHOTOS = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat", "camera", "coins", "gravel")
HEAD_DISTORTIONS, HEAD_LEVELS = ("blur", "noise", "jpeg", "contrast"), (1, 3, 5)


def recipe_head(clip, processor):
    """A head made by RALI's recipe (rali_edge.fit_head: standardise + PCA, k-means prototypes in
    score buckets, fine-tuned) for this random encoder, from its embeddings of labelled photographs:
    scikit-image's (none of the bundled samples), clean (5) and distorted (MS-SSIM labels, as the
    built-in model's). Its scores spread over the 1..5 scale as a trained model's do, and it is as
    sensitive to a change of the embedding as the recipe makes a head: a random head with random
    prototypes hardly responds to the encoder (scores within ~0.05 of 3), which made reduced
    precision look 14-33x more faithful than such heads (bf16 moved them by 0.0035 against 0.050-0.115).
    Smaller than the paper's (PCA 64, 64 prototypes): 104 samples cannot support 512 components."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from rali_edge.distortions import distort, ms_ssim, ms_ssim_to_score
    from rali_edge.fit_head import HeadRecipe, fit_prototype_head

    rng = np.random.default_rng(0)
    images, labels = [], []
    for name in HEAD_PHOTOS:
        clean = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((336, 336), Image.Resampling.BICUBIC))
        images.append(clean)
        labels.append(5.0)
        for kind in HEAD_DISTORTIONS:
            for level in HEAD_LEVELS:
                images.append(distort(clean, kind, level, rng))
                labels.append(ms_ssim_to_score(ms_ssim(clean, images[-1])))
    feats, device = [], "cuda" if torch.cuda.is_available() else "cpu"  # bench/gpu.py builds the model here too
    with torch.inference_mode():
        clip.to(device)
        for i in range(0, len(images), 8):
            pixels = processor(images=[Image.fromarray(x) for x in images[i:i + 8]], return_tensors="pt")["pixel_values"]
            out = clip.get_image_features(pixel_values=pixels.to(device))
            feats.append(getattr(out, "pooler_output", out).float().cpu())
        clip.to("cpu")
    head, _ = fit_prototype_head(torch.cat(feats).numpy(), np.array(labels),
                                 HeadRecipe(pca_dim=64, prototypes=64, buckets=24, epochs=50))
    return head


def accuracy_images(folder: Path) -> list[str]:
    """The set every path's scores are compared on: the bundled clean photographs at their own
    sizes, clean and with five distortions at five levels (78 JPEGs, quality 95)."""
    import numpy as np
    from PIL import Image

    from rali_edge.distortions import distort
    from rali_edge.images import open_image, sample_images

    folder.mkdir()
    rng, paths = np.random.default_rng(1), []
    for source in (p for p in sample_images() if "_clean" in p.name):
        clean = np.asarray(open_image(source))
        variants = [("clean", clean)] + [(f"{kind}-{level}", distort(clean, kind, level, rng))
                                         for kind in ("blur", "noise", "jpeg", "contrast", "motion") for level in range(1, 6)]
        for label, pixels in variants:
            paths.append(str(folder / f"{source.stem.removesuffix('_clean')}_{label}.jpg"))
            Image.fromarray(pixels).save(paths[-1], quality=95)
    return paths


# ------------------------------------------------------------------------------- the paths
def published_scorer(folder: Path, device: str = "cpu"):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    from rali_edge.head import PrototypeHead

    import transformers

    clip = CLIPModel.from_pretrained(folder / "best").eval().to(device)
    # PIL's processor everywhere: with torchvision installed transformers 5 would resize with it
    # instead, and the score differences would include the resampler's.
    processor = getattr(transformers, "CLIPImageProcessorPil", CLIPImageProcessor).from_pretrained(folder / "best")
    head = PrototypeHead(**torch.load(folder / "head.pt", weights_only=True))

    @torch.inference_mode()
    def score(paths):
        out = []
        for path in paths:  # one image per call, as the published demo does
            pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            feats = clip.get_image_features(pixel_values=pixels.to(device))
            feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns an output object
            out += head(feats.cpu()).tolist()  # the published formula
        return out

    return score


# name -> (what rali_edge.load is given, batch size). "default" is what a user gets.
def rali_paths(aoti: dict[str, Path]) -> dict[str, tuple[dict, int]]:
    paths = {}
    for batch in (1, 8):
        paths[f"rali-edge default (auto), batch {batch}"] = ({}, batch)
        paths[f"rali-edge auto fp32, batch {batch}"] = ({"dtype": "fp32"}, batch)
        paths[f"rali-edge torch fp32, batch {batch}"] = ({"backend": "torch"}, batch)
        paths[f"rali-edge torch bf16, batch {batch}"] = ({"backend": "torch", "dtype": "bf16"}, batch)
        paths[f"rali-edge auto int8, batch {batch}"] = ({"dtype": "int8"}, batch)
    for dtype, engine in aoti.items():
        paths[f"rali-edge aoti {dtype}, batch 8"] = ({"engine": str(engine)}, 8)
    return paths


def rali_scorer(model: Path, options: dict, batch: int):
    import rali_edge
    from rali_edge.errors import PrecisionRefused

    refused = False
    try:
        scorer = rali_edge.load(model, **options)
    except PrecisionRefused:  # time it anyway (module doc): built once with no limit, kept for the RSS processes
        from rali_edge.engines.builder import build

        refused, out = True, model.parent / f"refused-{options['dtype']}"
        if not out.is_dir():
            out.mkdir()
            build(model, "onnx", precision=options["dtype"], max_score_diff=float("inf"), output=out)
        scorer = rali_edge.load(model, engine=next(out.glob("*.onnx")))
    run = lambda paths: [r.score for r in scorer.score_files(paths, batch_size=batch)]  # noqa: E731
    run.verdict = scorer.verdict  # what auto measured here, when auto chose
    what = f"{scorer.backend} {scorer.dtype_name}"
    if scorer.engine is not None:  # int8: which form the fidelity check let through
        from rali_edge.engines.naming import read_sidecar

        form = read_sidecar(scorer.engine).build_options.get("int8", {}).get("form")
        what += f" {form}" if form else ""
    return run, what + (" (refused by auto at 0.02)" if refused else "")


def aoti_engine(model: Path, dtype: str, folder: Path) -> Path:
    """Build an AOTInductor engine as a user would: `rali-edge build --target aoti`."""
    out = folder / f"aoti-{dtype}"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "rali_edge.cli", "build", str(model), "--target", "aoti", "--device", "cpu",
                    "--precision", dtype, "--batch", "1:8:8", "--no-check", "--no-progress", "-o", str(out)], check=True)
    return next(p for p in out.iterdir() if p.suffix == ".pt2")


# ------------------------------------------------------------------------------- the floor
def encoder_flops(layers: int = 24, d: int = 1024, mlp: int = 4096, tokens: int = 577) -> dict[str, float]:
    """Matmul FLOPs per image by kind: the weight matmuls ONNX Runtime's int8 quantizes (q, k, v,
    out, fc1), those it keeps fp32 (fc2), and attention's two activation matmuls."""
    return {"quantized": layers * 2 * tokens * (4 * d * d + d * mlp), "fc2": layers * 2 * tokens * mlp * d,
            "attention": layers * 2 * 2 * tokens * tokens * d}


def rali_encoder_gflop(layers: int = 24, d: int = 1024, mlp: int = 4096, tokens: int = 577) -> float:
    """What rali-edge's encoder multiplies per image: every layer but the last in full, and of the
    last only the keys and values of all tokens (the class token's row needs them) and the class
    token's own row (encoder_flops counts all 24 layers, as the published path runs them)."""
    full = sum(encoder_flops(layers - 1, d, mlp, tokens).values())
    keys_values = 2 * tokens * 2 * d * d
    class_row = 2 * (2 * d * d + 2 * d * mlp) + 2 * 2 * tokens * d  # q and out, the MLP, attention
    return (full + keys_values + class_row) / 1e9


def gemm_rates(m: int = 577, k: int = 1024, n: int = 4096, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of one [m x k] x [k x n] matmul on this machine, median of `repeats`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rali_edge.engines.onnx import has_vnni, onnx_session, quantize_int8

    flop = 2 * m * k * n
    a, b = torch.randn(m, k), torch.randn(k, n) / k**0.5

    def median_rate(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flop / statistics.median(times) / 1e9

    rates = {"torch fp32": median_rate(lambda: a @ b)}
    ab, bb = a.bfloat16(), b.bfloat16()
    rates["torch bf16"] = median_rate(lambda: ab @ bb)
    with tempfile.TemporaryDirectory() as tmp:
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                                  [numpy_helper.from_array(b.numpy(), "w")])
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), fp32)
        x = {"x": a.numpy().astype(np.float32)}
        session = onnx_session(fp32)
        rates["onnxruntime fp32"] = median_rate(lambda: session.run(None, x))
        quantize_int8(fp32, Path(tmp) / "int8.onnx", reduce_range=not has_vnni())
        session8 = onnx_session(Path(tmp) / "int8.onnx")
        rates["onnxruntime int8"] = median_rate(lambda: session8.run(None, x))
    return rates


def floors(rates: dict[str, float], layers: int) -> dict[str, float]:
    """Seconds per image if every matmul ran at the measured GEMM rate (nothing else costs)."""
    f = encoder_flops(layers)
    total = sum(f.values())
    return {
        "torch fp32": total / rates["torch fp32"] / 1e9,
        "torch bf16": total / rates["torch bf16"] / 1e9,
        "onnx fp32": total / rates["onnxruntime fp32"] / 1e9,
        "onnx int8 mlp-out-fp32": f["quantized"] / rates["onnxruntime int8"] / 1e9
                                  + (f["fc2"] + f["attention"]) / rates["onnxruntime fp32"] / 1e9,
        "onnx int8 smoothed": (f["quantized"] + f["fc2"]) / rates["onnxruntime int8"] / 1e9
                              + f["attention"] / rates["onnxruntime fp32"] / 1e9,
    }


def floor_of(ran: str, rates_floor: dict[str, float]) -> float | None:
    """The floor of what a path ran ("onnx fp32", "torch bf16", "onnx int8 smoothed"...; AOTI: torch's)."""
    backend, rest = ran.split(" (")[0].split(" ", 1)  # less a note such as "(refused by auto at 0.02)"
    return rates_floor.get(f"{'torch' if backend == 'aoti' else backend} {rest}")


# -------------------------------------------------------------------------------- peak RSS
def child(argv: list[str]) -> None:
    """In a fresh process: load one path, score the images, print the peak RSS (MiB)."""
    folder, name, images = Path(argv[0]), argv[1], argv[2:]
    if name == "published":
        published_scorer(folder)(images)
    else:
        options, batch = json.loads(name)
        rali_scorer(folder / "model", options, batch)[0](images)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the parent (here
    # the benchmark process, which holds every path at once).
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mib = lambda key: int(status[key].split()[0]) / 1024  # noqa: E731 (kB)
    print(json.dumps({"peak_rss_mib": mib("VmHWM"), "end_rss_mib": mib("VmRSS")}))


def peak_rss(folder: Path, name: str, images: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, CHILD, str(folder), name, *images], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ main
def machine() -> dict:
    from importlib.metadata import version

    import rali_edge
    from rali_edge.engines.naming import cpu_flags, cpu_model
    from rali_edge.engines.onnx import has_vnni

    flags = cpu_flags()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "instructions": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}),
        "vnni": has_vnni(), "python": platform.python_version(), "rali-edge": rali_edge.__version__,
        **{pkg: version(pkg) for pkg in ("torch", "onnxruntime", "onnx", "transformers")},
    }


def main():
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24, help="encoder depth (24 = ViT-L; fewer for a quick try)")
    ap.add_argument("--aoti", action="store_true", help="also build and time AOTInductor fp32 and bf16 engines")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-path peak-RSS processes")
    ap.add_argument("--out", type=Path, help="write the results (markdown) and a .json beside it")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["RALI_EDGE_CACHE"] = str(tmp / "engine-cache")  # the first use builds, as a user's would
        os.environ.pop("RALI_EDGE_BACKEND", None)
        paths = make_images(tmp, args.images)
        _, model = build_models(tmp, args.layers)
        rates = gemm_rates()
        print("GEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()), file=sys.stderr)
        aoti = {dtype: aoti_engine(model, dtype, tmp) for dtype in ("fp32", "bf16")} if args.aoti else {}

        variants, ran, builds = {"published (transformers fp32, 1 image per call)": published_scorer(tmp)}, {}, {}
        ran[next(iter(variants))] = "published fp32"
        specs = rali_paths(aoti)
        for name, (options, batch) in list(specs.items()):
            t0 = time.perf_counter()
            fn, what = rali_scorer(model, options, batch)
            if (what, batch) in {(ran[n], specs[n][1]) for n in variants if n in specs}:
                del specs[name]  # what the default already runs (e.g. torch bf16): timed once
                continue
            variants[name], ran[name] = fn, what
            builds[name] = time.perf_counter() - t0  # load, and for auto's first use the build
            print(f"loaded {name} ({ran[name]}) in {builds[name]:.0f} s", file=sys.stderr)

        for fn in variants.values():  # warm-up
            fn(paths)
        accuracy_set, scores = accuracy_images(tmp / "accuracy"), {}
        for name, fn in variants.items():  # the accuracy set, once per path that runs differently
            done = next((n for n in scores if ran[n] == ran[name]), None)
            scores[name] = scores[done] if done else fn(accuracy_set)
            print(f"scored the accuracy set: {name}", file=sys.stderr)
        rates_per_variant = {name: [] for name in variants}
        for rep in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(paths)
                rates_per_variant[name].append(len(paths) / (time.perf_counter() - t0))
                print(f"repeat {rep + 1}: {name}: {rates_per_variant[name][-1]:.3f} images/s", file=sys.stderr)
        verdict = next(fn.verdict for name, fn in variants.items() if name.startswith("rali-edge default"))
        del variants
        # The floor takes the best rate seen, before or after the paths ran (a floor is a bound).
        rates = {k: max(v, again) for (k, v), again in zip(rates.items(), gemm_rates().values())}

        rss = {}
        if not args.no_rss:
            rss[next(iter(rates_per_variant))] = peak_rss(tmp, "published", paths)
            for name, spec in specs.items():
                rss[name] = peak_rss(tmp, json.dumps(spec), paths)
                print(f"RSS {name}: peak {rss[name]['peak_rss_mib']:.0f} MiB, "
                      f"after scoring {rss[name]['end_rss_mib']:.0f} MiB", file=sys.stderr)
        weights_mib = (model / WEIGHTS).stat().st_size / 2**20

    floor = floors(rates, args.layers)
    report(args, rates, floor, rates_per_variant, scores, ran, builds, rss, weights_mib, machine(), len(accuracy_set),
           verdict)


def srcc(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def report(args, rates, floor, per_variant, scores, ran, builds, rss, weights_mib, env, accuracy_images_n,
           verdict) -> None:
    base = next(iter(per_variant))
    base_rate = statistics.median(per_variant[base])
    rows = []
    for name, runs in per_variant.items():
        median = statistics.median(runs)
        f = floor_of(ran[name], floor)
        rows.append({
            "variant": name, "ran": ran[name], "images_per_s": median, "s_per_image": 1 / median,
            "ratio": median / base_rate, "max_score_diff": max(abs(a - b) for a, b in zip(scores[name], scores[base])),
            "srcc_vs_published": srcc(scores[name], scores[base]), "floor_s": f,
            "of_floor": (f * median) if f else None, **rss.get(name, {}), "load_s": builds.get(name),
            "runs": runs,
        })
    env = {**env, "images": f"{args.images} JPEGs: bundled samples (clean and distorted photographs) enlarged to 12 MP", "layers": args.layers,
           "repeats": args.repeats, "command": " ".join(["python", "bench/e2e.py", *sys.argv[1:]]),
           "load_average_at_end": os.getloadavg()}
    table = ["| path | ran | s/image | vs published | max abs score diff vs published | SRCC vs published | floor s/image "
             "| % of floor | peak RSS MiB | RSS after MiB | load s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cell = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        table.append(f"| {r['variant']} | {r['ran']} | {r['s_per_image']:.3f} | {r['ratio']:.2f}x | "
                     f"{r['max_score_diff']:.2e} | {r['srcc_vs_published']:.4f} | {cell(r['floor_s'], '.3f')} | "
                     f"{cell(r['of_floor'] and 100 * r['of_floor'], '.0f')} | {cell(r.get('peak_rss_mib'), '.0f')} | "
                     f"{cell(r.get('end_rss_mib'), '.0f')} | "
                     f"{cell(r['load_s'], '.0f')} |")
    gemm = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
    spread = scores[base]
    env["accuracy set"] = (f"{accuracy_images_n} photographs at their own sizes (accuracy_images); published scores "
                           f"{min(spread):.3f} to {max(spread):.3f}, std {statistics.pstdev(spread):.3f}")
    text = "\n".join(table) + f"\n\nGEMM GFLOP/s ([577 x 1024] x [1024 x 4096]): {gemm}. Encoder weights: {weights_mib:.0f} MiB (fp32)."
    if verdict is not None:  # the default's own measurement, on its first use in this run ("load s" above)
        text += ("\n\nWhat auto measured on its first use here (probe: one layer's matrix products; measured: the "
                 "fidelity images, file to score; both against eager fp32):\n\n```\n" + "\n".join(verdict.table())
                 + f"\n```\n\n{verdict.summary()}.")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = "\n".join(f"- {k}: {v}" for k, v in env.items())
        args.out.write_text(f"# End-to-end scoring speed (CPU)\n\n{meta}\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps({"env": env, "gemm_gflops": rates, "floor_s": floor,
                                                             "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
