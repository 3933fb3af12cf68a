"""What a cheaper built-in encoder would cost: the encoder alone (TorchEncoder, as score_files runs it
on a CPU: a batch of 16 photographs' 4 x 4 views of 128 pixels, in calls of at most
CPU_TOKENS_PER_CALL tokens), per photograph, for the shipped shape and smaller ones. Random
weights cost what trained ones cost. Interleaved, medians; the views' decoding and normalisation
are not included (bench/views_cost.py times the whole path).

    python bench/encoder_shapes.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rali_edge.model import EncoderConfig, RaliModel
from rali_edge.scoring import TorchEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import encoder_flops  # noqa: E402  (the layers' matmul FLOPs, as the ViT-L floor counts them)

PHOTOGRAPHS, VIEWS = 16, 16
SHAPES = {  # name: (patch, width, layers); MLP 4x the width, 4 heads, 128-pixel views
    "patch 16, width 128, 4 layers (shipped)": (16, 128, 4),
    "patch 32, width 128, 4 layers": (32, 128, 4),
    "patch 32, width 96, 4 layers": (32, 96, 4),
    "patch 32, width 64, 4 layers": (32, 64, 4),
    "patch 32, width 128, 2 layers": (32, 128, 2),
    "patch 16, width 64, 4 layers": (16, 64, 4),
    "patch 16, width 64, 2 layers": (16, 64, 2),
    "patch 16, width 96, 2 layers": (16, 96, 2),
    "patch 16, width 128, 2 layers": (16, 128, 2),
}


def encoder(patch: int, width: int, layers: int) -> TorchEncoder:
    cfg = EncoderConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                        num_attention_heads=4, image_size=128, patch_size=patch, projection_dim=64)
    return TorchEncoder(RaliModel(cfg, pca_dim=64, num_prototypes=32).eval(), torch.device("cpu"), torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pixels = torch.randn(PHOTOGRAPHS * VIEWS, 3, 128, 128)
    encoders = {name: encoder(*shape) for name, shape in SHAPES.items()}
    times = {name: [] for name in encoders}
    for name, enc in encoders.items():  # warm-up
        enc(pixels)
    for _ in range(args.repeats):
        for name, enc in encoders.items():
            t = time.perf_counter()
            enc(pixels)
            times[name].append((time.perf_counter() - t) / PHOTOGRAPHS)
    rows = []
    for name, (patch, width, layers) in SHAPES.items():
        tokens = (128 // patch) ** 2 + 1
        # Per view: the patch embedding, then every layer in full (weight matmuls and attention).
        gflop = 2 * (tokens - 1) * 3 * patch * patch * width + sum(encoder_flops(layers, width, 4 * width, tokens).values())
        rows.append({"shape": name, "tokens_per_view": tokens, "gflop_per_photograph": round(VIEWS * gflop / 1e9, 3),
                     "ms_per_photograph": round(statistics.median(times[name]) * 1e3, 2),
                     "params": sum(p.numel() for p in encoders[name].encoder.parameters())})
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": 2, "repeats": args.repeats, "rows": rows}, indent=1))
    print("| encoder | tokens a view | GFLOP a photograph (16 views) | ms a photograph |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens_per_view']} | {r['gflop_per_photograph']} | {r['ms_per_photograph']} |")


if __name__ == "__main__":
    main()
