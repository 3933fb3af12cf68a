"""The whole RALI model in one file: a CLIP vision transformer and the RALI prototype head.

The encoder mirrors Hugging Face's CLIPVisionModelWithProjection (same parameter names, so a
vision state_dict loads as it is) without importing transformers and without the text tower.
The head (rali_edge/head.py) takes the encoder's class-token hidden state *before* the
post-layernorm: the layernorm's gamma/beta are folded into it with the projection and the PCA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from rali_edge.head import RaliHead

# The precisions the encoder runs in (the head always in fp32), by the names every command takes.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# HF CLIPVisionConfig defaults, for fields a config.json leaves out.
HF_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}


@dataclass(frozen=True)
class EncoderConfig:
    """The fields of an HF CLIPVisionConfig that the vision tower needs."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    def __post_init__(self):
        # A config from a file is checked here, not where torch would fail on it later.
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"encoder {f.name} must be a positive integer, not {value!r}")
            if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"encoder {f.name} must be a number, not {value!r}")
            if kind is str and not isinstance(value, str):
                raise ValueError(f"encoder {f.name} must be a string, not {value!r}")

    @classmethod
    def from_hf(cls, config: dict) -> "EncoderConfig":
        """Build from an HF CLIP `config.json`: a CLIPConfig (with `vision_config`) or a
        CLIPVisionConfig. Fields left out take HF's defaults (ViT-B/32's, not ours). For a
        CLIPConfig the top-level projection_dim is the one CLIPModel uses: transformers 5 also
        writes its default 512 inside vision_config, which CLIPModel ignores."""
        if isinstance(config.get("vision_config"), dict) or config.get("model_type") == "clip":
            vision = {**HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
            vision["projection_dim"] = config.get("projection_dim", HF_VISION_DEFAULTS["projection_dim"])
        else:
            vision = {**HF_VISION_DEFAULTS, **config}
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in vision.items() if k in known})
        activation(cfg.hidden_act)  # ValueError naming the supported ones
        if cfg.hidden_size % cfg.num_attention_heads or cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} / {cfg.num_attention_heads} heads or image_size "
                f"{cfg.image_size} / patch_size {cfg.patch_size} does not divide"
            )
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's x * sigmoid(1.702 x). Without autograd, in place in one new buffer: the MLP's
    elementwise passes cost a fifth of a small encoder's time on a CPU, mostly in memory traffic."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x * torch.sigmoid(1.702 * x)
    return torch.mul(x, 1.702).sigmoid_().mul_(x)


def activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported hidden_act {name!r} (expected quick_gelu, gelu, gelu_new or gelu_pytorch_tanh)")


class LayerNorm(nn.LayerNorm):
    """Computed in fp32 whatever the input dtype, returned in the input dtype (a no-op for fp32).
    ViT layernorms overflow in fp16 (NVIDIA/TensorRT#2564), and an exported graph must say
    explicitly that they run in fp32 for TensorRT to keep them there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        # Engines in fp16/bf16 set this: the softmax then runs in fp32, written out so that the
        # exported graph carries the casts (SDPA would export a low-precision softmax).
        self.softmax_fp32 = False

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]; with `queries`, only the outputs of the first `queries` tokens
        (all N tokens still serve as keys and values)."""
        b, n, d = x.shape
        h = self.num_heads

        def heads(t):
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        q_in = x if queries is None else x[:, :queries]
        if self.softmax_fp32:
            # q is scaled before q @ k^T, as SDPA does, so that low-precision scores stay small.
            q, k, v = heads(self.q_proj(q_in) * (d // h) ** -0.5), heads(self.k_proj(x)), heads(self.v_proj(x))
            out = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1).to(x.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(heads(self.q_proj(q_in)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, q_in.shape[1], d))


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        # Each branch runs in the weights' dtype; the residual stream keeps its own (fp32 when the
        # encoder's residual_fp32 is set; otherwise the same dtype, and the casts are no-ops).
        low = self.mlp.fc1.weight.dtype
        x = x + self.self_attn(self.layer_norm1(x).to(low)).to(x.dtype)
        return x + self.mlp(self.layer_norm2(x).to(low)).to(x.dtype)

    def class_row(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x)[:, 0] without computing the other rows: the class token's attention over
        every token, then its own MLP. The encoder keeps only this row of its last block, so the
        last block's queries, output projection and MLP for the patch tokens would be wasted
        (a quarter of a 4-layer model's work; 1/24 of ViT-L's)."""
        low = self.mlp.fc1.weight.dtype
        cls = x[:, :1] + self.self_attn(self.layer_norm1(x).to(low), queries=1).to(x.dtype)
        return (cls + self.mlp(self.layer_norm2(cls).to(low)).to(x.dtype))[:, 0]


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, d)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Token embeddings in `dtype` (default: the weights')."""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        patches = patches.to(dtype or patches.dtype)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class _Layers(nn.Module):
    # Only here so that parameter names read `encoder.layers.N...` as in HF's CLIPEncoder.
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """HF `CLIPVisionTransformer`: names match `vision_model.*` of a CLIPModel."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's spelling
        self.encoder = _Layers(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Encoder(nn.Module):
    """CLIP image encoder. Its state_dict keys are those of HF's CLIPModel, less the text tower:
    `vision_model.*` and `visual_projection.weight`."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTower(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        # With weights in bf16/fp16: keep the residual stream (the sum every block adds to) in
        # fp32, as the layernorms are. Its 8-bit bf16 mantissa otherwise rounds every block's
        # addition: at ViT-L depth that moved scores by 1.4e-3 (bench/results/e2e-cpu.md).
        self.residual_fp32 = False

    def class_token(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, D] class-token state before the post-layernorm."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels, torch.float32 if self.residual_fp32 else None))
        *body, last = vm.encoder.layers
        for block in body:
            x = block(x)
        return last.class_row(x)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embedding, as HF's `get_image_features`."""
        return self.project(self.class_token(pixels))

    def project(self, cls: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model.post_layernorm(cls).to(self.visual_projection.weight.dtype))

    def to_mixed(self, dtype: torch.dtype) -> "Encoder":
        """The weight matmuls (and convolution) in `dtype`; the residual stream, layernorms and
        embeddings' additive terms in fp32 (see residual_fp32). Eager PyTorch in bf16/fp16."""
        self.to(dtype)
        if dtype != torch.float32:
            self.residual_fp32 = True
            embeddings = self.vision_model.embeddings
            for module in [m for m in self.modules() if isinstance(m, LayerNorm)] + [embeddings.position_embedding]:
                module.float()
            embeddings.class_embedding.data = embeddings.class_embedding.data.float()
        return self

    forward = class_token


class RaliModel(nn.Module):
    """Pixels -> quality score: CLIP encoder, then the folded prototype head."""

    def __init__(self, cfg: EncoderConfig, pca_dim: int, num_prototypes: int, encoder: bool = True):
        super().__init__()
        self.encoder = Encoder(cfg) if encoder else None  # None: the head alone (an engine encodes)
        self.head = RaliHead(cfg.hidden_size, pca_dim, num_prototypes, cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.class_token(pixels))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


__all__ = ["DTYPES", "Encoder", "EncoderConfig", "RaliModel", "count_parameters"]
