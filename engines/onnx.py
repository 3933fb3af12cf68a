"""ONNX engines: the engine function exported to an ONNX file, run by ONNX Runtime on the CPU.

The file is portable (no machine code inside), so the sidecar's machine record is not compared;
only the model's weights hash and the image size are.

int8: the fp32 export with ONNX Runtime's dynamic quantization of the encoder's weight matmuls
(int8 weights per output channel, uint8 activations quantized per batch at run time; MatMulInteger
runs on AVX-512 VNNI / AVX-VNNI where the CPU has them, on AVX2 otherwise). The patch convolution,
the attention's activation-by-activation matmuls, every layernorm and softmax, the whole head and
the MLPs' second linear layers stay fp32: its inputs come out of the GELU, one-sided and
heavy-tailed, and one uint8 scale per batch for them moved the built-in model's view scores by up
to 0.35 (0.07 without them). Without VNNI the weights use 7 bits (`reduce_range`): ONNX Runtime's u8s8 kernels for
AVX2/AVX-512 without VNNI can saturate with 8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rali_edge.engines.backends import Backend, BuildRequest
from rali_edge.engines.export import HEAD_PREFIX, export_onnx, node_scopes, onnx_session
from rali_edge.engines.naming import ONNX_OPSET, EngineInfo
from rali_edge.errors import UsageError


class OnnxRuntimeEncoder:
    """EncoderBackend running an exported ONNX file with ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path, info: EngineInfo):
        self.outputs, self.batch = info.outputs, info.batch
        self.device = torch.device("cpu")
        self.session = onnx_session(path)
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.batch.run_chunks(x, self._run, np.concatenate))

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {"pixels": np.ascontiguousarray(chunk)})[0]


class OnnxBackend(Backend):
    name = "onnx"
    precisions = ("fp32", "fp16", "int8")

    def build_steps(self, request: BuildRequest) -> int:
        return 2 if request.precision == "int8" else 1  # int8: export, then quantize

    def run_device(self, device: str | None) -> str:
        return "cpu"  # the CPU execution provider, whatever device the scorer was asked for

    def check_request(self, request: BuildRequest) -> None:
        if request.precision == "bf16":
            raise UsageError(
                "--target onnx --precision bf16 is not supported: ONNX Runtime has no bf16 kernels for most "
                "operators on CPU. Use fp16 or fp32 for ONNX; bf16 works with --target tensorrt and --target aoti."
            )

    def opset(self) -> int:
        return ONNX_OPSET

    def name_parts(self, runtime, opset: int | None) -> list[str]:
        return [f"opset{opset}"]

    def build(self, model, path: Path, request: BuildRequest, info: EngineInfo, progress, written: list[Path]) -> None:
        batch = request.batch
        if request.precision != "int8":
            with progress.step(f"exporting ONNX (opset {info.onnx_opset}, {request.precision}, batch {batch.min}-{batch.max})"):
                export_onnx(model, path, request.precision, request.outputs, batch.min, batch.max)
            return
        fp32 = path.with_name(path.name + ".fp32.tmp")
        written.append(fp32)
        try:
            with progress.step(f"exporting ONNX (opset {info.onnx_opset}, fp32, batch {batch.min}-{batch.max})"):
                export_onnx(model, fp32, "fp32", request.outputs, batch.min, batch.max)
            del model  # the quantizer holds the graph twice; the torch weights are not needed any more
            vnni = has_vnni()
            with progress.step(f"quantizing to int8 ({'VNNI' if vnni else 'no VNNI on this CPU: 7-bit weights'})"):
                kept = quantize_int8(fp32, path, reduce_range=not vnni)
        finally:
            fp32.unlink(missing_ok=True)
        info.build_options["int8"] = {"reduce_range": not vnni, "fp32_nodes_excluded": kept}

    def open(self, path: Path, info: EngineInfo, device: str) -> OnnxRuntimeEncoder:
        return OnnxRuntimeEncoder(path, info)


def has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has the int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI)."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:  # not Linux: assume the safe 7-bit weights
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _stays_fp32(node) -> bool:
    return node.name.startswith(HEAD_PREFIX) or any(scope.endswith(".mlp.fc2") for scope in node_scopes(node))


def quantize_int8(fp32: Path, out: Path, reduce_range: bool) -> int:
    """ONNX Runtime's dynamic int8 quantization of the encoder's weight matmuls but the MLPs'
    second layers (module doc); returns how many nodes were kept in fp32 by name."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32), load_external_data=False).graph
    kept = [n.name for n in graph.node if _stays_fp32(n)]
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its advice to pre-process is printed on the root logger
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=kept,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    return len(kept)


BACKEND = OnnxBackend()

__all__ = ["BACKEND", "OnnxRuntimeEncoder", "has_vnni", "quantize_int8"]
