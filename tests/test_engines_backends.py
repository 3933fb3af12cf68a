"""The backend registry (engines/backends.py) is the one switch between engine formats, and the
library's build (engines/builder.py) is what `rali-edge build` runs.

Every TABLE line must name a module whose BACKEND agrees with it; no module outside the backends
compares target or backend names; builder.build makes a working, checked engine from Python."""

import ast
from pathlib import Path

import pytest
import torch

import rali_edge
from rali_edge.engines import backends
from rali_edge.engines.backends import TABLE, Backend, backend
from rali_edge.engines.builder import Progress, build
from rali_edge.engines.naming import read_sidecar
from rali_edge.errors import RaliEdgeError, UsageError

import rali_edge.engines
import rali_edge.kernels

PACKAGES = [Path(list(m.__path__)[0]) for m in (rali_edge, rali_edge.engines, rali_edge.kernels)]
ENGINES = PACKAGES[1]
BACKEND_MODULES = {e.module.rsplit(".", 1)[1] + ".py" for e in TABLE}


@pytest.mark.parametrize("entry", TABLE, ids=lambda e: f"{e.name}-backend")
def test_every_table_line_names_a_backend_that_agrees(entry):
    chosen = backend(entry.name)
    assert isinstance(chosen, Backend)
    assert chosen.name == entry.name
    assert chosen.suffix == entry.suffix
    assert chosen.precisions
    # The interface's abstract parts are implemented, not inherited.
    for method in ("name_parts", "build", "open"):
        assert getattr(type(chosen), method) is not getattr(Backend, method), f"{entry.name} lacks {method}"


def test_unknown_backend_is_a_one_line_error():
    with pytest.raises(RaliEdgeError, match="unknown engine backend 'coreml'; choose one of tensorrt, aoti, onnx"):
        backend("coreml")


def _name_comparisons(tree: ast.AST) -> list[str]:
    """`x == "aoti"`-style comparisons (or `in ("onnx", ...)`) against a backend's name."""
    names = {e.name for e in TABLE}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for right in node.comparators:
                values = right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right]
                found += [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
    return found


def test_no_module_outside_the_backends_switches_on_their_names():
    offenders, walked = {}, 0
    for path in sorted(p for package in PACKAGES for p in package.rglob("*.py")):
        if path.parent == ENGINES and path.name in BACKEND_MODULES:
            continue
        walked += 1
        found = _name_comparisons(ast.parse(path.read_text()))
        if found:
            offenders[str(path)] = found
    assert walked > 40 and offenders == {}


def test_the_check_sees_a_switch():
    """The walk above is able to fail."""
    assert _name_comparisons(ast.parse('if target == "aoti" or b in ("onnx", "x"): pass')) == ["aoti", "onnx"]


def test_build_from_python_makes_a_checked_engine(small_model, tmp_path):
    built = build(small_model, "onnx", batch="1:4", output=tmp_path, progress=Progress(quiet=True))
    assert built.engine.parent == tmp_path and built.engine.suffix == ".onnx"
    assert built.fidelity is not None and built.fidelity.passed
    info = read_sidecar(built.engine)
    assert (info.target, info.precision, str(info.batch)) == ("onnx", "fp32", "1:4:4")
    assert info.fidelity["passed"] is True
    # ... and the library opens what it built.
    from rali_edge.engines.onnx import OnnxRuntimeEncoder

    assert isinstance(rali_edge.load(small_model, engine=built.engine).encoder, OnnxRuntimeEncoder)


def test_build_refuses_what_the_backend_does_not_take_before_any_work(small_model, tmp_path):
    with pytest.raises(UsageError, match="bf16"):
        build(small_model, "onnx", precision="bf16", output=tmp_path, progress=Progress(quiet=True))
    with pytest.raises(UsageError, match="--head"):
        build(small_model, "onnx", head="fast", output=tmp_path, progress=Progress(quiet=True))
    with pytest.raises(UsageError, match="scratch"):  # the builder's own per-build field, not an option
        build(small_model, "onnx", scratch=tmp_path, output=tmp_path, progress=Progress(quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_build_leaves_no_files(small_model, tmp_path, monkeypatch):
    chosen = backend("onnx")

    def interrupted(model, path, request, info, progress, written):
        path.write_bytes(b"half an engine")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(chosen), "build", lambda self, *a: interrupted(*a))
    with pytest.raises(KeyboardInterrupt):
        build(small_model, "onnx", output=tmp_path, check=False, progress=Progress(quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_backends_module_imports_without_torch():
    """The torch-free TensorRT runner reads the table."""
    source = ast.parse(Path(backends.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(source) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(source)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in imported


@pytest.mark.parametrize("command", ["score", "eval", "profile", "stream"])
def test_every_command_that_takes_an_engine_names_every_backend(command):
    from click.testing import CliRunner

    from rali_edge.cli import main

    text = " ".join(CliRunner().invoke(main, [command, "--help"], terminal_width=500).output.split())
    for entry in TABLE:
        assert f"{entry.name} {entry.suffix}" in text, (command, entry.name)


def test_the_fidelity_reference_is_ieee_fp32_and_the_setting_is_restored():
    """On CUDA torch runs fp32 convolutions in TF32 by default: the reference turns that off, for
    convolutions and matmuls, and puts the user's settings back, also after an error."""
    from rali_edge.engines.fidelity import exact_fp32

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with pytest.raises(KeyError):
        with exact_fp32():
            assert conv.fp32_precision == matmul.fp32_precision == "ieee"
            raise KeyError
    assert (conv.fp32_precision, matmul.fp32_precision) == before


@pytest.mark.gpu
def test_gpu_reference_convolution_is_fp32_not_tf32():
    """The patch embedding's convolution under exact_fp32 is within fp32 rounding of float64; TF32
    (10-bit mantissas) would be about 1e-3 off relative."""
    from rali_edge.engines.fidelity import exact_fp32

    x, w = torch.randn(2, 3, 336, 336, device="cuda"), torch.randn(1024, 3, 14, 14, device="cuda")
    exact = torch.nn.functional.conv2d(x.double(), w.double(), stride=14)
    with exact_fp32():
        got = torch.nn.functional.conv2d(x, w, stride=14)
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5


@pytest.mark.slow
def test_build_refuses_the_options_of_another_backend(small_model, tmp_path):
    from click.testing import CliRunner

    from rali_edge.cli import main
    from rali_edge.engines import builder
    from rali_edge.errors import UsageError

    with pytest.raises(UsageError, match="--target onnx does not take --typing, --workspace"):
        builder.build(small_model, "onnx", output=tmp_path, check=False, typing="strong", workspace_gib=1.0)
    result = CliRunner().invoke(main, ["build", str(small_model), "--target", "onnx", "-o", str(tmp_path),
                                       "--no-check", "--keep-onnx"])
    assert result.exit_code == 2 and "--target onnx does not take --keep-onnx" in result.output
    assert not list(tmp_path.iterdir())
    plain = CliRunner().invoke(main, ["build", str(small_model), "--target", "onnx", "-o", str(tmp_path), "--no-check"])
    assert plain.exit_code == 0, plain.output  # the TensorRT options' defaults are not "given"


@pytest.mark.slow
def test_a_failed_rebuild_leaves_the_engine_already_there(small_model, photos, tmp_path, monkeypatch):
    from rali_edge.engines import builder
    from rali_edge.engines.naming import sidecar_path
    from rali_edge.errors import RaliEdgeError

    first = builder.build(small_model, "onnx", output=tmp_path, calib_dir=photos[0].parent)
    engine, sidecar = first.engine.read_bytes(), sidecar_path(first.engine).read_text()

    def check_engine(*args, **kwargs):
        raise RaliEdgeError("no image could be scored")

    monkeypatch.setattr(builder, "check_engine", check_engine)
    with pytest.raises(RaliEdgeError, match="no image could be scored"):
        builder.build(small_model, "onnx", output=tmp_path, calib_dir=photos[0].parent)
    assert first.engine.read_bytes() == engine and sidecar_path(first.engine).read_text() == sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.engine.name, sidecar_path(first.engine).name])
