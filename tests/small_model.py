"""A small random RALI model in rali-edge's format, for tests that need a real model folder
but not the published checkpoint (tests/published.py builds that one)."""

from __future__ import annotations

from pathlib import Path

import torch

from rali_edge.head import PrototypeHead
from rali_edge.model import Encoder, EncoderConfig
from rali_edge.model_file import Manifest, build_model, save_model
from rali_edge.preprocess import PreprocessConfig

SMALL = EncoderConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    image_size=56, patch_size=14, projection_dim=32,
)


def make_small_model(out_dir: str | Path, seed: int = 0, pca_dim: int = 24, num_prototypes: int = 20,
                     config: EncoderConfig = SMALL, **views) -> Path:
    """`views`: PreprocessConfig's view fields (native_grid, resized_view); default one resized view."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = Encoder(config)
    with torch.no_grad():  # random, but not degenerate: non-trivial layernorm affines
        for name, p in encoder.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    e = config.projection_dim
    head = PrototypeHead(
        pca_mean=torch.randn(e, generator=g) * 0.1,
        pca_scale=torch.rand(e, generator=g) + 0.5,
        pca_components=torch.randn(pca_dim, e, generator=g),
        prototypes=torch.randn(num_prototypes, pca_dim, generator=g),
        proto_scores=torch.rand(num_prototypes, generator=g) * 4 + 1,
        logit_scale=14.29,
    )
    model = build_model(config, encoder.state_dict(), head)
    pre = PreprocessConfig(resize_shortest_edge=config.image_size, crop_height=config.image_size, crop_width=config.image_size, **views)
    manifest = Manifest(f"rali-test-{seed}", config, pre.to_dict(), pca_dim, num_prototypes, source={"kind": "random", "seed": seed})
    return save_model(out_dir, model, manifest)
