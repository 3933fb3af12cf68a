"""ONNX export of the engine function, run with ONNX Runtime and compared with PyTorch, and the
`rali-edge build --target onnx` / `check-engine` commands end to end.

Reference everywhere: the model's own fp32 PyTorch path (RaliModel.forward / Encoder.class_token),
not ExportEncoder, so that the export wrapper is checked as well."""

import io
import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from rali_edge.cli import main
from rali_edge.distortions import DISTORTIONS
from rali_edge.engines import export
from rali_edge.engines.export import export_onnx
from rali_edge.engines.naming import HEAD_PREFIX, ONNX_OPSET
from rali_edge.engines.naming import BatchRange
from rali_edge.engines.onnx import has_vnni, onnx_session
from rali_edge import model_file
from rali_edge.model_file import load_model
from rali_edge.preprocess import PreprocessConfig, Preprocessor

VARIANTS = [(p, o) for p in ("fp32", "fp16") for o in ("score", "class_token")]


@pytest.fixture(scope="module")
def model(small_model):
    return load_model(small_model)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {(p, o): export_onnx(model[0], folder / f"{p}.{o}.onnx", p, o, batch_min=1, batch_max=8) for p, o in VARIANTS}


@pytest.fixture(scope="module")
def inputs(model, photos):
    """Random pixels (wider than real ones: stresses the layernorms) and real photographs."""
    random = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(1)) * 1.5
    real = Preprocessor(PreprocessConfig.from_dict(model[1].preprocess))(photos)
    return {"random": random, "real": real}


def reference(model, pixels, outputs):
    with torch.no_grad():
        return (model(pixels) if outputs == "score" else model.encoder.class_token(pixels)).numpy()


@pytest.mark.parametrize("kind", ["random", "real"])
@pytest.mark.parametrize("precision, outputs", VARIANTS)
def test_onnxruntime_matches_pytorch(model, exported, inputs, precision, outputs, kind):
    pixels = inputs[kind]
    got = onnx_session(exported[precision, outputs]).run(None, {"pixels": pixels.numpy()})[0]
    want = reference(model[0], pixels, outputs)
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got - want).max()
    if precision == "fp32":
        # Same fp32 maths in another order (ORT's GEMMs, fused layernorm): ~1e-6 seen; the
        # acceptance bound for the score is 1e-4.
        assert err <= 1e-4, err
    elif outputs == "score":
        # fp16 matmuls (11-bit mantissa) give class tokens ~1e-3 off; the fp32 head turns that
        # into ~1e-3 of score (seen: 1.5e-3). 0.01 is half the product's fidelity limit (0.02).
        assert err <= 0.01, err
    else:
        # Relative to the size of the class-token state.
        assert err / np.abs(want).max() <= 1e-2, err


def test_dynamic_batch_gives_the_same_per_image_results(model, exported, inputs):
    session = onnx_session(exported["fp32", "score"])
    pixels = inputs["random"].numpy()
    together = session.run(None, {"pixels": pixels})[0]
    alone = np.concatenate([session.run(None, {"pixels": pixels[i : i + 1]})[0] for i in range(len(pixels))])
    # Batch 1 and batch 5 (the export example was batch 2) share one graph; fp32 reordering only.
    assert together.shape == (5,)
    np.testing.assert_allclose(alone, together, atol=1e-5)


def _types(path):
    """ONNX elem_type of every tensor, after shape inference."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return proto, types


@pytest.mark.parametrize("precision, outputs", VARIANTS)
def test_graph_keeps_layernorm_softmax_and_head_in_fp32(model, exported, precision, outputs):
    proto, types = _types(exported[precision, outputs])
    layers = model[0].encoder.config.num_hidden_layers
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    nodes = proto.graph.node
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    # opset >= 17: each layernorm is one node (pre-LN + 2 per block, + the head's own).
    assert len(norms) == 1 + 2 * layers + (outputs == "score")
    for n in norms + [n for n in nodes if n.op_type == "Softmax"]:
        assert types[n.input[0]] == onnx.TensorProto.FLOAT, (n.name, n.op_type)
    graph_io = [*proto.graph.input, *proto.graph.output]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in graph_io)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    low = [n for n in nodes if n.op_type in ("MatMul", "Gemm") and types[n.input[0]] == onnx.TensorProto.FLOAT16]
    # fp16 must really be fp16: q, k, v, out, fc1, fc2 and the two attention matmuls per block.
    assert len(low) == (8 * layers if precision == "fp16" else 0)


def test_every_head_node_is_marked_for_tensorrt(exported):
    proto = onnx.load(str(exported["fp32", "score"]))
    nodes = list(proto.graph.node)
    head = [n for n in nodes if n.name.startswith(HEAD_PREFIX)]
    assert {"LayerNormalization", "MatMul", "ReduceL2", "Softmax"} <= {n.op_type for n in head}
    # Everything computed from the class token is head; the rest of the head is shape plumbing.
    head_ln = next(n for n in head if n.op_type == "LayerNormalization")
    downstream, frontier = set(), {head_ln.input[0]}
    while frontier:
        users = [n for n in nodes if set(n.input) & frontier and n.name not in downstream]
        downstream |= {n.name for n in users}
        frontier = {o for n in users for o in n.output}
    assert downstream and all(name.startswith(HEAD_PREFIX) for name in downstream)
    extra = {n.op_type for n in head if n.name not in downstream}
    assert extra <= {"Concat", "Shape", "Gather", "Unsqueeze", "Reshape", "Slice", "Constant", "Expand"}
    class_token_only = onnx.load(str(exported["fp32", "class_token"]))
    assert not any(n.name.startswith(HEAD_PREFIX) for n in class_token_only.graph.node)


# ------------------------------------------------------------------------------------- int8
@pytest.mark.slow
@pytest.mark.parametrize("reduce_range", [False, True])  # VNNI CPUs, and 7-bit weights for the others
def test_int8_quantizes_the_encoder_matmuls_and_keeps_the_rest_fp32(model, exported, inputs, tmp_path, reduce_range):
    from rali_edge.engines.onnx import quantize_int8

    int8 = tmp_path / "int8.onnx"
    kept = quantize_int8(exported["fp32", "score"], int8, reduce_range=reduce_range, mlp_out_fp32=True)
    proto, types = _types(int8)
    nodes = proto.graph.node
    layers = model[0].encoder.config.num_hidden_layers
    quantized = [n for n in nodes if n.op_type == "MatMulInteger"]
    # q, k, v, out and fc1 per block; fc2 (its input is GELU's, with outliers 8 bits clip) stays fp32.
    assert len(quantized) == 5 * layers
    head_matmuls = [n for n in nodes if n.op_type == "MatMul" and n.name.startswith(HEAD_PREFIX)]
    # Left in fp32: the two attention matmuls (no weights) and fc2 per block, and the head's.
    assert head_matmuls and len([n for n in nodes if n.op_type == "MatMul"]) == 3 * layers + len(head_matmuls)
    assert kept >= layers + len(head_matmuls)
    assert not any(n.name.startswith(HEAD_PREFIX) and n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")
                   for n in nodes)
    for n in [n for n in nodes if n.op_type in ("LayerNormalization", "Softmax")]:
        assert types[n.input[0]] == onnx.TensorProto.FLOAT, n.name
    if not reduce_range and not has_vnni():
        return  # 8-bit weights saturate ONNX Runtime's u8s8 kernels without VNNI (engines/onnx.py): the builder never makes them there
    got = onnx_session(int8).run(None, {"pixels": inputs["real"].numpy()})[0]
    want = reference(model[0], inputs["real"], "score")
    # The random small model's narrow layers quantize coarsely (~0.05 of score seen); the real
    # models' bound (0.02) is the fidelity check's job, and bench/e2e.py's. A broken quantization
    # (wrong scales, a quantized softmax) moves scores by whole points.
    assert np.abs(got - want).max() <= 0.15


@pytest.mark.slow
def test_smoothing_is_exact_in_fp32_and_lets_fc2_be_quantized(model, exported, inputs, tmp_path):
    import shutil

    from rali_edge.engines.onnx import quantize_int8, smooth_mlp_outputs

    smoothed = tmp_path / "smoothed.onnx"
    fp32 = tmp_path / "fp32.onnx"
    shutil.copy(exported["fp32", "score"], fp32)
    before = fp32.read_bytes()
    layers = model[0].encoder.config.num_hidden_layers
    assert smooth_mlp_outputs(fp32, smoothed, inputs["real"].numpy(), BatchRange(1, 2, 2)) == layers
    assert fp32.read_bytes() == before  # the fp32 export stays as it was, for the next form
    pixels = {"pixels": inputs["random"].numpy()}
    plain = onnx_session(exported["fp32", "score"]).run(None, pixels)[0]
    # x / s times (s w) is x w up to fp32 rounding of the scales (seen: ~1e-6 of score).
    np.testing.assert_allclose(onnx_session(smoothed).run(None, pixels)[0], plain, atol=1e-4)
    graph = onnx.load(str(smoothed)).graph
    scales = [n for n in graph.node if n.name.startswith("smooth_")]
    assert len(scales) == layers and all(n.op_type == "Mul" for n in scales)

    int8 = tmp_path / "int8.onnx"
    quantize_int8(smoothed, int8, reduce_range=not has_vnni(), mlp_out_fp32=False)  # as the builder does
    nodes = onnx.load(str(int8)).graph.node
    assert len([n for n in nodes if n.op_type == "MatMulInteger"]) == 6 * layers  # fc2 as well
    assert not any(n.name.startswith(HEAD_PREFIX) and n.op_type == "MatMulInteger" for n in nodes)
    got = onnx_session(int8).run(None, {"pixels": inputs["real"].numpy()})[0]
    assert np.abs(got - reference(model[0], inputs["real"], "score")).max() <= 0.15  # as in the test above


@pytest.mark.slow
def test_int8_build_tries_the_smoothed_form_first_then_fc2_in_fp32(small_model, photos, tmp_path, monkeypatch, capsys):
    from rali_edge.engines import builder
    from rali_edge.engines.fidelity import FidelityReport

    real_check = builder.check_engine
    verdicts = iter([False, True])  # the first form fails its check, the second passes

    def check_engine(*args, **kwargs):
        report = real_check(*args, **kwargs)
        return FidelityReport(**{**report.to_dict(), "passed": next(verdicts)})

    monkeypatch.setattr(builder, "check_engine", check_engine)
    exports = []
    real_export = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: exports.append(a[1]) or real_export(*a, **k))
    loads = []
    real_load = model_file.load_model
    monkeypatch.setattr(model_file, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    log = io.StringIO()
    built = builder.build(small_model, "onnx", precision="int8", output=tmp_path, calib_dir=photos[0].parent,
                          progress=builder.Progress(out=log, live=False))
    assert built.info.build_options["int8"]["form"] == "mlp-out-fp32" and built.fidelity.passed
    assert "int8 as smoothed failed the fidelity check" in log.getvalue() and "building it as mlp-out-fp32" in log.getvalue()
    # One fp32 export for both forms: the second reuses the first's from the build's scratch folder.
    assert len(exports) == 1 and "reusing the earlier form's export" in log.getvalue()
    # ... and the weights are loaded for that export only (each of the two fidelity checks loads them twice).
    assert len(loads) == 1 + 2 * 2
    assert "FAILED its fidelity check" not in capsys.readouterr().err  # the first form's verdict is not the second's
    assert [p.name for p in tmp_path.iterdir()] and not any(".scratch-" in p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(builder, "check_engine", real_check)
    first = builder.build(small_model, "onnx", precision="int8", output=tmp_path / "loose", calib_dir=photos[0].parent,
                          max_score_diff=1.0)
    # Calibrated on its own set (a training photograph, clean and with each distortion), not on the
    # images the fidelity check judges it by.
    assert first.info.build_options["int8"]["form"] == "smoothed"
    assert f"clean and {len(DISTORTIONS)} distortions" in first.info.build_options["int8"]["calibration"]
    assert not any(".scratch-" in p.name for p in (tmp_path / "loose").iterdir())
    # A fixed batch profile (4:4:4) takes no other batch size: calibration runs in its chunks too.
    fixed = builder.build(small_model, "onnx", precision="int8", batch="4:4:4", output=tmp_path / "fixed",
                          calib_dir=photos[0].parent, max_score_diff=1.0)
    assert fixed.info.build_options["int8"]["form"] == "smoothed"
    unchecked = builder.build(small_model, "onnx", precision="int8", output=tmp_path / "unchecked", check=False)
    assert unchecked.info.build_options["int8"]["form"] == "mlp-out-fp32"  # no check: the form closest to fp32


@pytest.mark.slow
def test_fidelity_check_holds_one_copy_of_the_encoder_at_a_time(small_model, photos, tmp_path, monkeypatch):
    from rali_edge.engines import fidelity

    from rali_edge.engines import builder

    built = builder.build(small_model, "onnx", output=tmp_path, check=False)
    encoders = []
    real_load = model_file.load_model
    monkeypatch.setattr(model_file, "load_model",
                        lambda *a, **k: encoders.append(k.get("encoder", True)) or real_load(*a, **k))
    report = fidelity.check_engine(small_model, built.engine, "onnx", photos)
    assert report.passed and report.images == len(photos)
    assert encoders == [False, True]  # the head beside the engine, then the fp32 reference alone


def test_vnni_is_read_from_the_cpu_flags(tmp_path):
    from rali_edge.engines.onnx import has_vnni

    for flags, expected in [("fpu avx2 avx512f avx512_vnni", True), ("fpu avx2 avx_vnni", True), ("fpu avx2 fma", False)]:
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
        assert has_vnni(str(tmp_path / "cpuinfo")) is expected
    assert has_vnni(str(tmp_path / "missing")) is False


# -------------------------------------------------------------------------------------- CLI
def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton head on a CPU needs the interpreter")
def test_cli_build_onnx_then_check_engine(small_model, photos, tmp_path):
    calib = photos[0].parent
    result = run("build", small_model, "--target", "onnx", "--head", "triton", "--batch", "1:2:4",
                 "--calib-dir", calib, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    engine = tmp_path / "rali-test-0.opset18.fp32.b1-4.enc.onnx"
    assert result.stdout.strip() == str(engine)
    sidecar = json.loads((tmp_path / (engine.name + ".json")).read_text())
    assert sidecar["outputs"] == "class_token" and sidecar["onnx_opset"] == ONNX_OPSET
    assert sidecar["fidelity"]["passed"] and sidecar["fidelity"]["images"] == len(photos)
    assert sidecar["fidelity"]["max_abs_diff"] <= 1e-4  # fp32: see test_onnxruntime_matches_pytorch
    assert "fidelity: PASS" in result.output and "[1/2] exporting ONNX" in result.output

    checked = run("check-engine", engine, "--model", small_model, "--calib-dir", calib, "--json")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["passed"] and report["images"] == len(photos) and report["srcc"] == pytest.approx(1.0)
    strict = run("check-engine", engine, "--model", small_model, "--calib-dir", calib, "--max-score-diff", "0")
    if report["max_abs_diff"] > 0:  # ORT and PyTorch round differently: a zero limit must fail
        assert strict.exit_code == 1 and "fidelity check failed" in strict.output


def test_cli_score_takes_the_backend_from_the_engine_and_an_engine_folder(small_model, photos, tmp_path):
    built = run("build", small_model, "--target", "onnx", "--batch", "1:2:4", "--no-check", "-o", tmp_path)
    assert built.exit_code == 0, built.output
    engine = built.stdout.strip()
    reference = json.loads(run("score", "--model", small_model, "--format", "json", "-q", *photos).stdout)
    for args in (["--engine", engine], ["--engine", tmp_path], ["--backend", "onnx", "--engine", tmp_path]):
        result = run("score", "--model", small_model, "--format", "json", "-q", *args, *photos)
        assert result.exit_code == 0, result.output
        scores = [r["score"] for r in json.loads(result.stdout)]
        assert scores == pytest.approx([r["score"] for r in reference], abs=1e-4)  # fp32 ONNX Runtime vs PyTorch
    # An engine runs in the precision it was built in: another --dtype is an error, not a label.
    same = run("score", "--model", small_model, "--dtype", "fp32", "--engine", engine, "-q", photos[0])
    assert same.exit_code == 0, same.output
    other = run("score", "--model", small_model, "--dtype", "int8", "--engine", engine, photos[0])
    assert other.exit_code == 2 and "was built in fp32; leave --dtype out" in other.output
    wrong = run("score", "--model", small_model, "--backend", "aoti", "--engine", engine, photos[0])
    assert wrong.exit_code == 3 and "it is an engine for --backend onnx, not --backend aoti" in wrong.output
    assert "Rebuild" not in wrong.output and "Traceback" not in wrong.output
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = run("score", "--model", small_model, "--backend", "aoti", "--engine", empty, photos[0])
    assert folder.exit_code == 3 and "is a folder with no aoti engine in it" in folder.output


@pytest.mark.slow
def test_cli_failed_fidelity_check_deletes_the_engine(small_model, photos, tmp_path):
    result = run("build", small_model, "--target", "onnx", "--precision", "fp16", "--batch", "1:2:4",
                 "--calib-dir", photos[0].parent, "--max-score-diff", "1e-7", "-o", tmp_path)
    assert result.exit_code == 1, result.output
    assert "fidelity check failed: max |score diff|" in result.output and "deleted" in result.output
    assert list(tmp_path.iterdir()) == [] and "Traceback" not in result.output


def test_cli_refuses_bf16_onnx_clearly(small_model, tmp_path):
    result = run("build", small_model, "--target", "onnx", "--precision", "bf16", "-o", tmp_path)
    assert result.exit_code == 2  # a usage error
    assert "bf16 is not supported" in result.output and "--target tensorrt" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("batch", ["abc", "8:4:1"])
def test_cli_bad_batch_is_a_usage_error(small_model, tmp_path, batch):
    result = run("build", small_model, "--target", "onnx", "--batch", batch, "-o", tmp_path)
    assert result.exit_code == 2 and f"--batch {batch!r}" in result.output and "Traceback" not in result.output


def test_cli_without_images_says_how_to_give_some(small_model, tmp_path, monkeypatch):
    from rali_edge.engines import fidelity

    monkeypatch.setattr(fidelity, "sample_images", list)
    result = run("build", small_model, "--target", "onnx", "-o", tmp_path)
    assert result.exit_code == 1 and "--calib-dir DIR" in result.output and "--no-check" in result.output


def test_fidelity_comparison():
    from rali_edge.engines.fidelity import compare

    ref = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    report = compare(ref, {"a": 1.01, "b": 2.0, "c": 2.99, "d": 4.005, "extra": 5.0}, 0.02)
    assert report.passed and report.images == 4  # only images both sides scored
    assert report.max_abs_diff == pytest.approx(0.01) and report.mean_abs_diff == pytest.approx(0.00625)
    assert report.srcc == pytest.approx(1.0)
    report = compare(ref, {"a": 1.0, "b": 2.5, "c": 3.0, "d": 4.0}, 0.02)
    assert not report.passed and report.worst_image == "b" and "FAIL" in report.summary()
    nan = compare(ref, {"a": 1.0, "b": float("nan"), "c": 3.0, "d": 4.0}, 0.02)
    assert not nan.passed and nan.max_abs_diff == float("inf")  # an overflowed engine must fail


@pytest.mark.slow
def test_cli_corrupt_engine_is_exit_3(small_model, photos, tmp_path):
    built = run("build", small_model, "--target", "onnx", "--batch", "1:2:4", "--no-check", "-o", tmp_path)
    engine = built.stdout.strip()
    with open(engine, "r+b") as f:  # a truncated download: the sidecar is fine, the file is not
        f.truncate(100)
    result = run("score", "--model", small_model, "--engine", engine, photos[0])
    assert result.exit_code == 3 and "ONNX Runtime cannot load this file" in result.output
    assert "Traceback" not in result.output
