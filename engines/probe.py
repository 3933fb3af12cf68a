"""The speed probe: how fast each way of running the encoder does its matrix products here, in
a second or two, before anything is exported or built.

A ViT spends nearly all its time in the weight matmuls of its layers (ViT-L/14-336: 91% of its
FLOPs), so the probe runs one layer's six of them (q, k, v, out, fc1, fc2) at the model's own
sizes, chained, with as many rows as one encoder call takes, in each runtime and precision:
eager PyTorch (MKL or oneDNN on a CPU, cuBLAS on a GPU) and ONNX Runtime (MLAS). The graph for
ONNX Runtime is written here with onnx.helper (MatMul nodes and random weights): nothing of the
model is exported. Runs are interleaved (A B C A B C ...) and each runtime's median is kept, so
that load from other processes falls on all of them alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

PROBE_ROWS_MAX = 2048  # rows per product: an encoder call on a CPU holds at most about this many tokens
REPEATS = 3


@dataclass(frozen=True)
class Shapes:
    rows: int  # tokens in one encoder call
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, encoder_config) -> "Shapes":
        tokens = encoder_config.num_patches + 1
        return cls(max(1, PROBE_ROWS_MAX // tokens) * tokens, encoder_config.hidden_size,
                   encoder_config.intermediate_size)

    def chain(self) -> list[tuple[int, int]]:
        """(in, out) features of one layer's weight matmuls, in order: q, k, v, out, fc1, fc2."""
        h, i = self.hidden, self.intermediate
        return [(h, h)] * 4 + [(h, i), (i, h)]

    @property
    def gflop(self) -> float:
        return 2 * self.rows * sum(k * n for k, n in self.chain()) / 1e9


def _weights(shapes: Shapes, seed: int = 0) -> list[np.ndarray]:
    # Scaled so that values stay near 1 through the chain: no overflow, and no denormals, which
    # run many times slower on x86 and would time something else.
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for k, n in shapes.chain()]


def _input(shapes: Shapes) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((shapes.rows, shapes.hidden)).astype(np.float32)


def torch_runner(shapes: Shapes, precision: str, device: str = "cpu"):
    """One layer's products in eager PyTorch, in `precision` (fp32, bf16, fp16)."""
    import torch

    from rali_edge.model import DTYPES

    dtype, dev = DTYPES[precision], torch.device(device)
    weights = [torch.from_numpy(w.T.copy()).to(dev, dtype) for w in _weights(shapes)]
    x = torch.from_numpy(_input(shapes)).to(dev, dtype)

    @torch.inference_mode()
    def run():
        y = x
        for w in weights:
            y = torch.nn.functional.linear(y, w)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return y

    return run


def onnx_runner(shapes: Shapes, precision: str = "fp32"):
    """One layer's products as an ONNX graph of MatMul nodes, run by ONNX Runtime on the CPU with
    the session settings of the engines (engines/onnx.py)."""
    from onnx import TensorProto, helper, numpy_helper

    from rali_edge.engines.onnx import onnx_session

    weights = _weights(shapes)
    names = [f"w{j}" for j in range(len(weights))]
    nodes = [helper.make_node("MatMul", ["x" if j == 0 else f"y{j - 1}", names[j]], [f"y{j}"])
             for j in range(len(weights))]
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [shapes.rows, shapes.hidden])],
        [helper.make_tensor_value_info(f"y{len(weights) - 1}", TensorProto.FLOAT, [shapes.rows, shapes.hidden])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # what every ONNX Runtime since 1.16 reads
    session = onnx_session(model.SerializeToString())
    x = _input(shapes)

    def run():
        return session.run(None, {"x": x})[0]

    return run


def probe(runners: dict, repeats: int = REPEATS) -> dict:
    """{name: runner} -> {name: median seconds of one run}: one warm-up run each, then `repeats`
    rounds in turn."""
    for run in runners.values():
        run()
    times: dict = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


__all__ = ["Shapes", "onnx_runner", "probe", "torch_runner"]
