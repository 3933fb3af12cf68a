"""The RALI head in one file: its published form, the one folding, and the one arithmetic.

    PrototypeHead      what a published checkpoint stores and `fit-head` makes; calling it is the
                       published formula term by term (the reference every test compares with)
    PrototypeHead.fold(encoder) -> RaliHead
                       the only folding: post-layernorm affine, visual projection, standardisation
                       and PCA become one matrix and bias, in float64
    rali_head_torch    the folded head's arithmetic in PyTorch; the Triton kernel
                       (rali_edge.kernels.rali_head.rali_head_triton) is its twin, same signature
    RaliHead           the module the model file holds; it computes with the implementation it was
                       built with (`with_impl` makes one that computes with another)

This module imports neither the kernels nor the model: the kernel reads its constants from here,
the scorer picks the implementation, and nothing imports back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORMALIZE_EPS = 1e-12  # F.normalize's default, as in the published PrototypeScorer
LOGIT_SCALE_MIN = 1e-6  # published: tau = 1 / logit_scale.clamp(min=1e-6)


def rali_head_torch(cls, weight, bias, prototypes, proto_scores, logit_scale, ln_eps: float, return_weights=False):
    """Class-token states [B, D] (before the post-layernorm) -> scores [B], computed in float32
    whatever the input dtype; with return_weights also the softmax weights [B, K].

    An all-zero projected row (z = 0) normalises to 0, so every similarity is 0, the softmax is
    uniform and the score is the mean of the prototype scores.
    """
    x = F.layer_norm(cls.float(), (cls.shape[-1],), eps=ln_eps)
    z = F.normalize(x @ weight.float().T + bias.float(), dim=-1, eps=NORMALIZE_EPS)
    w = torch.softmax((z @ prototypes.float().T) * logit_scale, dim=-1)
    score = w @ proto_scores.float()
    return (score, w) if return_weights else score


class RaliHead(nn.Module):
    """The folded head: class-token state [B, D] -> score [B]. Its buffers are what the model file
    saves under `head.*`; `impl` is rali_head_torch or a function of the same signature."""

    def __init__(self, hidden_size: int, pca_dim: int, num_prototypes: int, ln_eps: float = 1e-5,
                 impl: Callable = rali_head_torch):
        super().__init__()
        self.ln_eps = ln_eps
        self.impl = impl
        self.register_buffer("weight", torch.zeros(pca_dim, hidden_size))
        self.register_buffer("bias", torch.zeros(pca_dim))
        self.register_buffer("prototypes", torch.zeros(num_prototypes, pca_dim))
        self.register_buffer("proto_scores", torch.zeros(num_prototypes))
        self.register_buffer("logit_scale", torch.ones(()))

    @property
    def impl_name(self) -> str:
        """"torch" or "triton" (what reports print)."""
        return self.impl.__name__.removeprefix("rali_head_")

    def with_impl(self, impl: Callable) -> RaliHead:
        """A copy of this head (same values, dtype and device) that computes with `impl`; this
        one is left as it is (a model may serve several scorers)."""
        p, d = self.weight.shape
        other = RaliHead(d, p, self.prototypes.shape[0], self.ln_eps, impl)
        other.load_state_dict(self.state_dict())
        return other.to(device=self.weight.device, dtype=self.weight.dtype)

    def forward(self, cls: torch.Tensor, return_weights: bool = False):
        # logit_scale stays a 0-d tensor: float() here would stop torch.export and torch.compile.
        return self.impl(cls, self.weight, self.bias, self.prototypes, self.proto_scores, self.logit_scale,
                         self.ln_eps, return_weights=return_weights)


@dataclass
class PrototypeHead:
    """RALI's head in its published form, on the projected embedding [B, E]."""

    pca_mean: torch.Tensor  # [E]
    pca_scale: torch.Tensor  # [E]
    pca_components: torch.Tensor  # [P, E]
    prototypes: torch.Tensor  # [K, P]
    proto_scores: torch.Tensor  # [K]
    logit_scale: float

    @property
    def pca_dim(self) -> int:
        return self.pca_components.shape[0]

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def to(self, dtype: torch.dtype) -> PrototypeHead:
        return PrototypeHead(self.pca_mean.to(dtype), self.pca_scale.to(dtype), self.pca_components.to(dtype),
                             self.prototypes.to(dtype), self.proto_scores.to(dtype), self.logit_scale)

    def __call__(self, embedding: torch.Tensor, return_weights: bool = False):
        """The published PrototypeScorer, term by term."""
        x_pca = ((embedding - self.pca_mean) / self.pca_scale.abs()) @ self.pca_components.T
        x = F.normalize(x_pca, dim=-1)
        sim = x @ F.normalize(self.prototypes, dim=-1).T
        tau = 1.0 / torch.as_tensor(self.logit_scale, dtype=sim.dtype).clamp(min=LOGIT_SCALE_MIN)
        w = torch.softmax(sim / tau, dim=-1)
        score = w @ self.proto_scores.to(w.dtype)
        return (score, w) if return_weights else score

    def fold(self, encoder) -> RaliHead:
        """This head folded with `encoder`'s (a rali_edge.model.Encoder) post-layernorm and projection.

        With n = (h - mean(h)) / std(h) the plain layernorm of the class token h:
            z = C diag(1/|s|) (Wp (g * n + beta) - mu) = (C diag(1/|s|) Wp diag(g)) n + C diag(1/|s|) (Wp beta - mu)
        Done in float64 so that folding adds no rounding of its own; stored in float32.
        """
        f64 = {"dtype": torch.float64}
        post_ln = encoder.vision_model.post_layernorm
        components = self.pca_components.to(**f64) / self.pca_scale.to(**f64).abs()  # [P, E] = C diag(1/|s|)
        proj = encoder.visual_projection.weight.detach().to(**f64)  # [E, D]
        weight = components @ proj * post_ln.weight.detach().to(**f64)  # [P, D]
        bias = components @ (proj @ post_ln.bias.detach().to(**f64) - self.pca_mean.to(**f64))
        head = RaliHead(weight.shape[1], self.pca_dim, self.num_prototypes, float(encoder.config.layer_norm_eps))
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
            head.prototypes.copy_(F.normalize(self.prototypes.to(**f64), dim=-1))
            head.proto_scores.copy_(self.proto_scores)
            head.logit_scale.fill_(max(float(self.logit_scale), LOGIT_SCALE_MIN))
        return head


__all__ = ["LOGIT_SCALE_MIN", "NORMALIZE_EPS", "PrototypeHead", "RaliHead", "rali_head_torch"]
