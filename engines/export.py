"""What an engine computes, as a torch module, and its ONNX export.

`ExportEncoder` is the one definition of an engine's function: float32 pixels [B, 3, H, W] in,
float32 class-token state [B, D] (head outside) or score [B] (head inside) out. The ONNX export,
the AOTInductor package and (through the ONNX file) the TensorRT engine are all made from it.

Precision policy for fp16/bf16 (ViTs overflow in fp16 layernorm: NVIDIA/TensorRT#2564, #2709):
- convolution, linear layers, attention matmuls and the residual stream run in the low precision;
- every layernorm and every attention softmax runs in fp32 (cast in, cast back out);
- the RALI head runs entirely in fp32: its softmax over prototype similarities is multiplied by
  the logit scale (~14-100), so one fp16 ulp of a similarity already moves the score.
The casts are explicit in the graph, so a strongly typed TensorRT network (TensorRT 11, or 10 with
--typing strong) and ONNX Runtime compute exactly this. The engine's inputs and outputs stay fp32.

The ONNX graph uses opset 18 (torch's exporter has no lower one; >= 17 keeps LayerNormalization
one node, which TensorRT maps to its normalization layer). Head nodes are renamed `rali_head/...`
so that the TensorRT 10 weak-typing builder can pin them to fp32 by name.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from rali_edge.engines.naming import HEAD_PREFIX, ONNX_OPSET
from rali_edge.errors import EngineMismatchError, MissingDependencyError, RaliEdgeError
from rali_edge.head import rali_head_torch
from rali_edge.model import DTYPES, Attention, RaliModel

# ONNX ops that stay fp32 in every precision (the TensorRT 10 builder pins their layers too).
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceL2", "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceMax")
METADATA_KEY = "rali_edge"


class ExportEncoder(nn.Module):
    """fp32 pixels [B, 3, H, W] -> fp32 score [B] (outputs="score") or class token [B, D].

    The model's own encoder, on a copy whose convolution, linear and embedding weights are cast
    to the precision; its layernorms compute in fp32 (model.LayerNorm) and its attention softmax
    is switched to fp32, so the exported graph carries those casts for TensorRT and ONNX Runtime.
    """

    def __init__(self, model: RaliModel, precision: str = "fp32", outputs: str = "score"):
        super().__init__()
        if precision not in DTYPES:
            raise RaliEdgeError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
        if outputs not in ("score", "class_token"):
            raise RaliEdgeError(f"unknown outputs {outputs!r}; choose score or class_token")
        self.precision, self.outputs, self.dtype = precision, outputs, DTYPES[precision]
        encoder = copy.deepcopy(model.encoder).eval()
        if self.dtype != torch.float32:
            for module in encoder.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    module.to(self.dtype)
                if isinstance(module, Attention):
                    module.softmax_fp32 = True
            emb = encoder.vision_model.embeddings
            emb.class_embedding = nn.Parameter(emb.class_embedding.detach().to(self.dtype), requires_grad=False)
        self.encoder = encoder
        self.head = None
        if outputs == "score":  # the head always computes in fp32, in eager PyTorch
            self.head = model.head.with_impl(rali_head_torch).float().eval()
        self.config = model.encoder.config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cls_state = self.encoder.class_token(pixels).float()
        return cls_state if self.head is None else self.head(cls_state)


def example_pixels(model: RaliModel, batch: int = 2) -> torch.Tensor:
    cfg = model.encoder.config
    return torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))


def dynamic_batch(batch_min: int, batch_max: int):
    """torch.export's dynamic shape spec for the batch axis, or None for a fixed batch."""
    if batch_min == batch_max:
        return None
    return {"pixels": {0: torch.export.Dim("batch", min=batch_min, max=batch_max)}}


def example_batch(batch_min: int, batch_max: int) -> int:
    # An example of size 1 would make torch.export specialise the batch axis to 1.
    return batch_min if batch_min == batch_max else max(2, batch_min)


@contextlib.contextmanager
def quiet_export():
    """torch.export and the ONNX exporter log pages of graph dumps and warnings at WARNING level;
    a build shows its own progress instead. Errors still raise."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
             "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: RaliModel, path: str | Path, precision: str = "fp32", outputs: str = "score",
                batch_min: int = 1, batch_max: int = 16) -> Path:
    """Write the engine function as an ONNX file (one file, weights inside) with a batch axis
    `batch` (dynamic unless batch_min == batch_max), input `pixels` and output `score` or
    `class_token`. Returns the path."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError:
        raise MissingDependencyError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from None
    path = Path(path)
    module = ExportEncoder(model, precision, outputs).eval()
    example = example_pixels(model, example_batch(batch_min, batch_max))
    try:
        with torch.no_grad(), quiet_export():
            program = torch.onnx.export(
                module, (example,), input_names=["pixels"], output_names=[outputs], opset_version=ONNX_OPSET,
                dynamo=True, dynamic_shapes=dynamic_batch(batch_min, batch_max), verbose=False,
            )
    except Exception as e:
        raise RaliEdgeError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    proto = program.model_proto
    head_nodes = mark_head_nodes(proto)
    if outputs == "score" and head_nodes == 0:
        # TensorRT 10's weak typing finds the head by these names; without them it could run the
        # head in fp16 without a word. (The exporter's node metadata is where the names come from.)
        raise RaliEdgeError("ONNX export: could not find the head's nodes (torch's exporter metadata changed?)")
    _set_metadata(proto, {"precision": precision, "outputs": outputs, "head_prefix": HEAD_PREFIX,
                          "head_nodes": head_nodes, "fp32_ops": list(FP32_OPS), "batch": [batch_min, batch_max]})
    import onnx

    # Weights inside the file: a ViT-L is 1.2 GB in fp32, under protobuf's 2 GB limit.
    onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() > (1 << 31) - (1 << 26))
    return path


def node_scopes(node) -> list[str]:
    """The torch module path of an exported ONNX node (from the exporter's node metadata)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(s) for s in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def mark_head_nodes(proto) -> int:
    """Prefix the names of the head's nodes with HEAD_PREFIX; returns how many were renamed."""
    renamed = 0
    for node in proto.graph.node:
        if "head" in node_scopes(node) and not node.name.startswith(HEAD_PREFIX):
            node.name = HEAD_PREFIX + node.name
            renamed += 1
    return renamed


def _set_metadata(proto, values: dict) -> None:
    entry = next((p for p in proto.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        entry = proto.metadata_props.add()
        entry.key = METADATA_KEY
    entry.value = json.dumps(values)


__all__ = [
    "FP32_OPS",
    "ExportEncoder",
    "export_onnx",
    "mark_head_nodes",
]
