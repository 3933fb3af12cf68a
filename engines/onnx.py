"""ONNX engines: the engine function exported to an ONNX file, run by ONNX Runtime on the CPU.

The file is portable (no machine code inside), so the sidecar's machine record is not compared;
only the model's weights hash and the image size are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rali_edge.engines.backends import Backend, BuildRequest
from rali_edge.engines.export import export_onnx, onnx_session
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
    precisions = ("fp32", "fp16")

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
        with progress.step(f"exporting ONNX (opset {info.onnx_opset}, {request.precision}, batch {batch.min}-{batch.max})"):
            export_onnx(model, path, request.precision, request.outputs, batch.min, batch.max)

    def open(self, path: Path, info: EngineInfo, device: str) -> OnnxRuntimeEncoder:
        return OnnxRuntimeEncoder(path, info)


BACKEND = OnnxBackend()

__all__ = ["BACKEND", "OnnxRuntimeEncoder"]
