"""The speed probe (engines/probe.py): one layer's matrix products at a model's sizes, in each
runtime; the same products in each (checked against numpy in float64), and a median per runtime."""

import numpy as np
import pytest

from rali_edge.engines import probe
from rali_edge.model import EncoderConfig

TINY = probe.Shapes(rows=130, hidden=64, intermediate=256)


def reference(shapes):
    y = probe._input(shapes).astype(np.float64)
    for w in probe._weights(shapes):
        y = y @ w.astype(np.float64)
    return y


def test_shapes_follow_the_model_and_a_cpu_call():
    vitl = EncoderConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, projection_dim=768)
    shapes = probe.Shapes.of(vitl)
    assert (shapes.rows, shapes.hidden, shapes.intermediate) == (3 * 577, 1024, 4096)  # 3 views of 577 tokens
    assert shapes.chain() == [(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)]
    assert shapes.gflop == pytest.approx(2 * 1731 * (4 * 1024**2 + 2 * 1024 * 4096) / 1e9)


@pytest.mark.parametrize("runtime, precision, tolerance", [
    ("torch", "fp32", 1e-4),  # fp32 sums of up to 256 products: ~1e-6 relative
    ("onnx", "fp32", 1e-4),
    ("torch", "bf16", 0.1),  # six products through 8-bit mantissas
])
def test_every_runtime_computes_the_same_products(runtime, precision, tolerance):
    run = probe.torch_runner(TINY, precision) if runtime == "torch" else probe.onnx_runner(TINY, precision)
    out = run()
    got = (out.float().numpy() if hasattr(out, "numpy") else out).astype(np.float64)
    want = reference(TINY)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_probe_runs_each_in_turn_and_keeps_the_median(monkeypatch):
    order = []
    clock = iter([0.0, 5.0, 10.0, 10.5, 20.0, 21.0, 30.0, 31.0, 40.0, 43.0, 50.0, 50.1])
    monkeypatch.setattr(probe.time, "perf_counter", lambda: next(clock))
    result = probe.probe({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3)
    assert order == ["a", "b"] + ["a", "b"] * 3  # a warm-up run each, then rounds in turn
    assert result == {"a": 3.0, "b": pytest.approx(0.5)}  # a: 5, 1, 3 s; b: 0.5, 1, 0.1 s
