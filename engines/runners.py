"""Open a built engine as an EncoderBackend, after checking that it fits the model and machine.

    encoder = open_engine("aoti", "rali.aoti.torch2.13.cpu-x86_64.fp32.b1-16.pt2", manifest)
    Scorer(model, manifest, encoder=encoder)   # what rali_edge.load(..., backend="aoti") does

Every engine needs its sidecar (`<engine>.json`); it is read and compared with the model's
weights hash, the TensorRT/torch version and the GPU before the engine file is touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from rali_edge.engines.naming import (
    EngineInfo,
    RuntimeInfo,
    check_compatible,
    read_sidecar,
)
from rali_edge.errors import EngineMismatchError, RaliEdgeError
from rali_edge.model_file import Manifest

ENGINE_BACKENDS = ("tensorrt", "aoti", "onnx")


def engine_device(backend: str, device: str | torch.device | None) -> torch.device:
    """TensorRT has no CPU execution: the default device "cpu" means the first GPU there."""
    device = torch.device(device or "cpu")
    if backend == "tensorrt" and device.type == "cpu":
        return torch.device("cuda", 0)
    if backend == "onnx":
        return torch.device("cpu")
    return device


def runtime_for(backend: str, device: torch.device) -> RuntimeInfo:
    if backend == "tensorrt":
        from rali_edge.engines.tensorrt import tensorrt_runtime

        return tensorrt_runtime(device.index or 0)
    if backend == "aoti":
        from rali_edge.engines.aoti import torch_runtime

        return torch_runtime(device)
    return RuntimeInfo()


def open_engine(backend: str, path: str | Path, manifest: Manifest, device: str | torch.device | None = "cpu",
                model_ref: str | None = None):
    """Check the engine at `path` against `manifest` and this machine, then load it.
    Raises EngineMismatchError (what differs + the rebuild command) or MissingDependencyError."""
    if backend not in ENGINE_BACKENDS:
        raise RaliEdgeError(f"unknown engine backend {backend!r}; choose one of {', '.join(ENGINE_BACKENDS)}")
    info = read_sidecar(path)
    device = engine_device(backend, device)
    for warning in check_compatible(info, manifest.weights_sha256, runtime_for(backend, device), backend=backend,
                                    model_ref=model_ref or "<model folder>"):
        print(f"warning: {path}: {warning}", file=sys.stderr)
    size = manifest.encoder.image_size
    if tuple(info.image_size) != (size, size):
        raise EngineMismatchError(f"{path}: engine takes {tuple(info.image_size)} images, the model {size}x{size}")
    if backend == "tensorrt":
        from rali_edge.engines.tensorrt import TensorRTEncoder

        return TensorRTEncoder(path, info, device=str(device))
    if backend == "aoti":
        from rali_edge.engines.aoti import AOTIEncoder

        return AOTIEncoder(path, info.outputs, info.batch, device)
    return OnnxRuntimeEncoder(path, info)


class OnnxRuntimeEncoder:
    """EncoderBackend running an exported ONNX file with ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path, info: EngineInfo):
        from rali_edge.engines.export import onnx_session

        self.outputs, self.batch = info.outputs, info.batch
        self.device = torch.device("cpu")
        self.session = onnx_session(path)
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.batch.run_chunks(x, self._run, np.concatenate))

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {"pixels": np.ascontiguousarray(chunk)})[0]


__all__ = ["ENGINE_BACKENDS", "OnnxRuntimeEncoder", "engine_device", "open_engine", "runtime_for"]
