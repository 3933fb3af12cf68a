"""End-to-end scoring speed on this machine: rali-edge against the published RALI pipeline.

Both run at ViT-L/14-336 size with the same random weights on the same images (random weights
cost exactly what trained ones cost), from file to score: decode, preprocess, encoder, head.

- published: transformers' CLIPImageProcessor + CLIPModel.get_image_features (fp32) and the
  published head formula, one image per call as in Q-Insight's demo_rali_score.py;
- rali-edge torch fp32 / bf16: `Scorer.score_files` (batched, decoding in threads);
- rali-edge aoti fp32 / bf16: the same with an AOTInductor engine (`rali-edge build --target aoti`).

Variants run in turns (A B C A B C ...) so that load from other processes spreads over all of
them; we report the median images/s over the repeats, the ratio to the published path, and the
largest score difference from the published scores.

    python bench/e2e.py --images 8 --repeats 3 --out bench/results/e2e-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image
    from skimage import data  # CC0 / public-domain photographs shipped with scikit-image

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "horse", "retina", "camera"]
    paths = []
    for i in range(n):
        img = Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB")
        img = img.resize((640 + 32 * i, 480), Image.BICUBIC)
        paths.append(folder / f"img{i}.jpg")
        img.save(paths[-1], quality=92)
    return paths


def build_models(folder: Path, layers: int):
    """A random ViT-L/14-336 CLIPModel (tiny text tower) and the same weights as a rali-edge model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rali_edge.head import PrototypeHead
    from rali_edge.model import EncoderConfig
    from rali_edge.model_file import Manifest, build_model, save_model
    from rali_edge.preprocess import PreprocessConfig

    torch.manual_seed(0)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=768)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})

    p, k = 512, 250
    head = PrototypeHead(
        pca_mean=torch.randn(768) * 0.1, pca_scale=torch.rand(768) + 0.5, pca_components=torch.randn(p, 768) / 768**0.5,
        prototypes=torch.randn(k, p), proto_scores=torch.rand(k) * 4 + 1, logit_scale=14.29,
    )
    cfg = EncoderConfig.from_hf(clip.config.to_dict())
    state = {k_: v for k_, v in clip.state_dict().items() if k_.startswith(("vision_model.", "visual_projection."))}
    model = build_model(cfg, state, head)
    pre = PreprocessConfig.from_hf(processor.to_dict())
    path = save_model(folder / "model", model, Manifest("bench-vitl14-336", cfg, pre.to_dict(), p, k))
    return clip, processor, head, path


def published_scorer(clip, processor, head):
    from PIL import Image

    @torch.inference_mode()
    def score(paths):
        out = []
        for path in paths:  # one image per call, as the published demo does
            pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            feats = clip.get_image_features(pixel_values=pixels)
            feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns an output object
            out += head(feats).tolist()  # the published formula
        return out

    return score


def rali_scorer(model_path, dtype, batch_size, backend="torch", engine=None):
    import rali_edge

    scorer = rali_edge.load(model_path, dtype=dtype, backend=backend, engine=engine)
    return lambda paths: [r.score for r in scorer.score_files(paths, batch_size=batch_size)]


def aoti_engine(model_path: Path, dtype: str, batch: int, folder: Path) -> Path:
    """Build an AOTInductor engine as a user would: `rali-edge build --target aoti`."""
    import subprocess

    out = folder / f"aoti-{dtype}"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "rali_edge.cli", "build", str(model_path), "--target", "aoti", "--device", "cpu",
                    "--precision", dtype, "--batch", f"1:{batch}:{batch}", "--no-check", "--no-progress", "-o", str(out)],
                   check=True)
    return next(p for p in out.iterdir() if p.suffix == ".pt2")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=24, help="encoder depth (24 = ViT-L; fewer for a quick try)")
    ap.add_argument("--no-aoti", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results table (markdown) and a .json beside it")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp, args.images)
        clip, processor, head, model_path = build_models(tmp, args.layers)
        variants = {"published (transformers, fp32)": published_scorer(clip, processor, head)}
        for dtype in ("fp32", "bf16"):
            variants[f"rali-edge torch {dtype}"] = rali_scorer(model_path, dtype, args.batch_size)
        if not args.no_aoti:
            for dtype in ("fp32", "bf16"):
                t0 = time.perf_counter()
                engine = aoti_engine(model_path, dtype, args.batch_size, tmp)
                print(f"built AOTInductor {dtype} engine in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
                variants[f"rali-edge aoti {dtype}"] = rali_scorer(model_path, "fp32", args.batch_size, "aoti", engine)

        rates = {name: [] for name in variants}
        scores = {}
        for name, fn in variants.items():  # warm-up, and the scores we compare
            scores[name] = fn(paths)
        for rep in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(paths)
                rates[name].append(len(paths) / (time.perf_counter() - t0))
                print(f"repeat {rep + 1}: {name}: {rates[name][-1]:.3f} images/s", file=sys.stderr)

    base_name = next(iter(variants))
    base_rate = statistics.median(rates[base_name])
    rows = []
    for name in variants:
        median = statistics.median(rates[name])
        diff = max(abs(a - b) for a, b in zip(scores[name], scores[base_name]))
        rows.append({"variant": name, "images_per_s": median, "ratio": median / base_rate, "max_score_diff": diff,
                     "runs": rates[name]})
    env = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "python": platform.python_version(),
        "images": args.images, "batch_size": args.batch_size, "layers": args.layers, "repeats": args.repeats,
        "command": " ".join(sys.argv),
    }
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    table = ["| variant | images/s (median) | vs published | max abs score diff vs published |", "|---|---:|---:|---:|"]
    table += [f"| {r['variant']} | {r['images_per_s']:.3f} | {r['ratio']:.2f}x | {r['max_score_diff']:.2e} |" for r in rows]
    text = "\n".join(table)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = "\n".join(f"- {k}: {v}" for k, v in env.items())
        args.out.write_text(f"# End-to-end scoring speed (CPU)\n\n{meta}\n\n{text}\n")
        args.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
