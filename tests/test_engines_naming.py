"""Engine names, sidecar contents, and refusal of engines built for another GPU, TensorRT version,
torch version or model. None of this needs TensorRT or a GPU: the sidecars are written by hand
with the values a Jetson Orin (sm87, TensorRT 10.3) or a desktop GPU would record."""

import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

import rali_edge
from rali_edge.cli import main
from rali_edge.engines.naming import (
    BatchRange,
    EngineInfo,
    RuntimeInfo,
    base_version,
    check_compatible,
    engine_filename,
    read_sidecar,
    sidecar_path,
    slug,
    write_sidecar,
)
from rali_edge.errors import EngineMismatchError, RaliEdgeError
from rali_edge.model_file import read_manifest

ORIN = RuntimeInfo(platform="linux", cpu_arch="aarch64", device_type="cuda", tensorrt_version="10.3.0.30",
                   cuda_version="12.6", gpu_name="Orin", compute_capability="sm87",
                   device_model="NVIDIA Jetson AGX Orin Developer Kit")
SHA = "ab" * 32


def trt_info(**changes) -> EngineInfo:
    info = EngineInfo(target="tensorrt", precision="fp16", outputs="score", batch=BatchRange(1, 4, 8),
                      image_size=(336, 336), model_name="rali-vitl14-336", model_sha256=SHA, runtime=ORIN,
                      build_options={"workspace_gib": 1.0, "typing": "weak"}, preprocess={"crop_height": 336},
                      onnx_opset=18, typing="weak")
    return replace(info, **changes)


# ------------------------------------------------------------------------------------ names
def test_tensorrt_name_matches_the_documented_example():
    name = engine_filename("rali-vitl14-336", "tensorrt", "fp16", BatchRange(1, 4, 8), "score", ORIN)
    assert name == "rali-vitl14-336.trt10.3.sm87.fp16.b1-8.plan"


def test_names_of_each_target_and_head():
    desktop = RuntimeInfo(platform="linux", cpu_arch="x86_64", device_type="cuda", tensorrt_version="11.4.1",
                          compute_capability="sm89", torch_version="2.13.0+cu128")
    b = BatchRange(2, 8, 16)
    assert engine_filename("RALI ViT-L/14@336", "tensorrt", "bf16", b, "class_token", desktop) == \
        "rali-vit-l-14-336.trt11.4.sm89.bf16.b2-16.enc.plan"
    assert engine_filename("m", "aoti", "fp16", b, "score", desktop) == "m.aoti.torch2.13.cuda-sm89.fp16.b2-16.pt2"
    cpu = RuntimeInfo(platform="linux", cpu_arch="x86_64", device_type="cpu", torch_version="2.13.0+cpu")
    assert engine_filename("m", "aoti", "fp32", b, "score", cpu) == "m.aoti.torch2.13.cpu-x86_64.fp32.b2-16.pt2"
    assert engine_filename("m", "onnx", "fp32", b, "score", cpu, opset=18) == "m.opset18.fp32.b2-16.onnx"
    with pytest.raises(RaliEdgeError, match="unknown engine backend"):
        engine_filename("m", "tflite", "fp32", b, "score", cpu)


def test_slug_and_versions():
    assert slug("  My Model / v2 ") == "my-model-v2"
    assert slug("///") == "model"
    assert base_version("2.13.0+cu126") == "2.13.0"
    assert base_version("10.3.0.30") == "10.3.0"
    assert base_version(None) == ""


@pytest.mark.parametrize("text, expected", [("1:4:8", (1, 4, 8)), ("8", (1, 8, 8)), ("2:16", (2, 16, 16)),
                                            ("4:4:4", (4, 4, 4))])
def test_batch_range_parse(text, expected):
    b = BatchRange.parse(text)
    assert (b.min, b.opt, b.max) == expected
    assert BatchRange.parse(str(b)) == b


@pytest.mark.parametrize("text", ["0:1:2", "4:2:8", "1:2:3:4", "a:b:c", "", "1:9:8"])
def test_batch_range_rejects_bad_text(text):
    with pytest.raises(RaliEdgeError, match="--batch"):
        BatchRange.parse(text)


# ---------------------------------------------------------------------------------- sidecar
def test_sidecar_records_everything_needed_and_round_trips(tmp_path):
    engine = tmp_path / "rali-vitl14-336.trt10.3.sm87.fp16.b1-8.plan"
    engine.write_bytes(b"plan")
    path = write_sidecar(engine, trt_info())
    assert path == sidecar_path(engine) == tmp_path / (engine.name + ".json")
    d = json.loads(path.read_text())
    assert d["format"] == "rali-edge-engine"
    assert d["tensorrt"] == {"version": "10.3.0.30", "typing": "weak"}
    assert d["cuda_version"] == "12.6"
    assert d["gpu"] == {"name": "Orin", "compute_capability": "sm87"}
    assert d["precision"] == "fp16" and d["outputs"] == "score"
    assert d["batch"] == {"min": 1, "opt": 4, "max": 8}
    assert d["input"] == {"name": "pixels", "shape": ["batch", 3, 336, 336], "dtype": "float32"}
    assert d["model"] == {"name": "rali-vitl14-336", "sha256": SHA}
    assert d["rali_edge_version"] == rali_edge.__version__
    assert d["onnx_opset"] == 18
    assert d["device"]["cpu_arch"] == "aarch64" and d["device"]["model"].startswith("NVIDIA Jetson")
    assert d["build_options"]["workspace_gib"] == 1.0
    assert d["created"].endswith("Z")
    back = read_sidecar(engine)
    assert back.to_dict() == d


def test_missing_sidecar_says_what_to_do(tmp_path):
    engine = tmp_path / "x.plan"
    engine.write_bytes(b"plan")
    with pytest.raises(EngineMismatchError, match=r"sidecar x\.plan\.json is missing.*rali-edge build"):
        read_sidecar(engine)
    with pytest.raises(EngineMismatchError, match="not found"):
        read_sidecar(tmp_path / "nope.plan")


def test_bad_sidecars_are_refused(tmp_path):
    engine = tmp_path / "x.plan"
    engine.write_bytes(b"plan")
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(EngineMismatchError, match="not valid JSON"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("[]")
    with pytest.raises(EngineMismatchError, match="a JSON object expected, not list"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EngineMismatchError, match="not a rali-edge engine sidecar"):
        read_sidecar(engine)
    newer = trt_info().to_dict() | {"format_version": 99}
    sidecar_path(engine).write_text(json.dumps(newer))
    with pytest.raises(EngineMismatchError, match="newer rali-edge"):
        read_sidecar(engine)
    broken = trt_info().to_dict()
    del broken["batch"]
    sidecar_path(engine).write_text(json.dumps(broken))
    with pytest.raises(EngineMismatchError, match="malformed"):
        read_sidecar(engine)


# ------------------------------------------------------------------------------ compatibility
def test_same_machine_and_model_is_accepted():
    assert check_compatible(trt_info(), SHA, ORIN, backend="tensorrt") == []


def test_other_compute_capability_is_refused_with_rebuild_command():
    desktop = replace(ORIN, cpu_arch="aarch64", compute_capability="sm86", gpu_name="NVIDIA RTX A6000")
    with pytest.raises(EngineMismatchError) as e:
        check_compatible(trt_info(), SHA, desktop, model_ref="models/rali")
    msg = str(e.value)
    assert "compute capability sm87 (Orin)" in msg and "sm86 (NVIDIA RTX A6000)" in msg
    assert "rali-edge build models/rali --target tensorrt --precision fp16 --batch 1:4:8 --head engine" in msg


def test_other_tensorrt_version_is_refused():
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10\.3\.0\.30, this machine has TensorRT 10\.7\.0"):
        check_compatible(trt_info(), SHA, replace(ORIN, tensorrt_version="10.7.0.23"))
    with pytest.raises(EngineMismatchError, match=r"this machine has TensorRT \(none\)"):
        check_compatible(trt_info(), SHA, replace(ORIN, tensorrt_version=None))
    # The 4th field is TensorRT's build number: same release, same plan format.
    assert check_compatible(trt_info(), SHA, replace(ORIN, tensorrt_version="10.3.0.26")) == []


def test_other_model_is_refused():
    with pytest.raises(EngineMismatchError, match=r"built for another model: rali-vitl14-336 \(weights sha256 abababab"):
        check_compatible(trt_info(), "cd" * 32, ORIN)


def test_every_difference_is_named_at_once():
    other = replace(ORIN, tensorrt_version="11.4.1", compute_capability="sm110", cpu_arch="x86_64")
    with pytest.raises(EngineMismatchError) as e:
        check_compatible(trt_info(), "cd" * 32, other)
    msg = str(e.value)
    for part in ("another model", "TensorRT 10.3.0.30", "sm110", "linux/aarch64", "rali-edge build"):
        assert part in msg


def test_an_engine_given_to_another_backend_names_its_backend_without_rebuild_advice():
    with pytest.raises(EngineMismatchError) as e:
        check_compatible(trt_info(), "cd" * 32, ORIN, backend="aoti")
    assert str(e.value) == "it is an engine for --backend tensorrt, not --backend aoti"


def test_engine_folder_is_resolved_or_its_engines_named(tmp_path):
    from rali_edge.engines.naming import resolve_engine

    with pytest.raises(EngineMismatchError, match="is a folder with no engine in it"):
        resolve_engine(tmp_path)
    one = tmp_path / "m.opset18.fp32.b1-16.onnx"
    one.write_bytes(b"x")
    (tmp_path / "stray.onnx").write_bytes(b"no sidecar")
    write_sidecar(one, trt_info())
    assert resolve_engine(tmp_path) == one
    assert resolve_engine(one) == one
    with pytest.raises(EngineMismatchError, match="no aoti engine"):
        resolve_engine(tmp_path, "aoti")
    two = tmp_path / "m.aoti.torch2.13.cpu-x86_64.fp32.b1-16.pt2"
    two.write_bytes(b"x")
    write_sidecar(two, trt_info())
    assert resolve_engine(tmp_path, "aoti") == two
    with pytest.raises(EngineMismatchError, match=f"2 engines; name one: {two.name}, {one.name}"):
        resolve_engine(tmp_path)
    with pytest.raises(EngineMismatchError, match="is a folder, not an engine file"):
        read_sidecar(tmp_path)


def test_same_capability_other_gpu_and_failed_check_only_warn():
    warnings = check_compatible(trt_info(fidelity={"passed": False, "max_abs_diff": 0.05, "max_score_diff": 0.02}),
                                SHA, replace(ORIN, gpu_name="Orin (nvgpu) 16GB"))
    assert len(warnings) == 2
    assert "tuned on Orin" in warnings[0] and "FAILED its fidelity check" in warnings[1]


def test_aoti_packages_need_the_same_torch_and_device():
    cpu = RuntimeInfo(platform="linux", cpu_arch="x86_64", device_type="cpu", torch_version="2.13.0+cpu")
    info = EngineInfo(target="aoti", precision="fp32", outputs="score", batch=BatchRange(1, 8, 16),
                      image_size=(336, 336), model_name="m", model_sha256=SHA, runtime=cpu)
    assert check_compatible(info, SHA, replace(cpu, torch_version="2.13.0+cu126")) == []
    with pytest.raises(EngineMismatchError, match=r"compiled by torch 2\.13\.0\+cpu, this is torch 2\.14\.0"):
        check_compatible(info, SHA, replace(cpu, torch_version="2.14.0"))
    with pytest.raises(EngineMismatchError, match="compiled for cpu, but it is asked to run on cuda"):
        check_compatible(info, SHA, replace(cpu, device_type="cuda"))
    with pytest.raises(EngineMismatchError, match="x86_64, this machine is linux/aarch64"):
        check_compatible(info, SHA, replace(cpu, cpu_arch="aarch64"))
    with pytest.raises(EngineMismatchError, match="--device cpu"):
        check_compatible(info, SHA, replace(cpu, torch_version="2.14.0"))


def test_onnx_files_only_check_the_model():
    info = trt_info(target="onnx", runtime=RuntimeInfo())
    assert check_compatible(info, SHA, replace(ORIN, compute_capability="sm75", tensorrt_version=None)) == []
    with pytest.raises(EngineMismatchError, match="another model"):
        check_compatible(info, "00" * 32, RuntimeInfo())


# --------------------------------------------------- refusal through rali_edge.load and the CLI
def _fake_aoti_engine(tmp_path, model_dir, **changes):
    """A sidecar in the shape `rali-edge build --target aoti` writes, next to a file that is not a
    package at all: the check must refuse before anything tries to load it."""
    import torch

    from rali_edge.engines.aoti import torch_runtime

    manifest = read_manifest(model_dir)
    info = EngineInfo(target="aoti", precision="fp32", outputs="score", batch=BatchRange(1, 2, 4),
                      image_size=(manifest.encoder.image_size,) * 2, model_name=manifest.name,
                      model_sha256=manifest.weights_sha256, runtime=torch_runtime("cpu"))
    for key, value in changes.items():
        if hasattr(info.runtime, key):
            setattr(info.runtime, key, value)
        else:
            setattr(info, key, value)
    engine = tmp_path / "fake.pt2"
    engine.write_bytes(b"not a package")
    write_sidecar(engine, info)
    assert torch.__version__  # the runtime above is this torch's
    return engine


def test_load_refuses_an_engine_of_another_model(small_model, tmp_path):
    engine = _fake_aoti_engine(tmp_path, small_model, model_sha256="ee" * 32)
    with pytest.raises(EngineMismatchError, match="built for another model"):
        rali_edge.load(small_model, backend="aoti", engine=engine)


def test_load_refuses_a_package_of_another_torch(small_model, tmp_path):
    engine = _fake_aoti_engine(tmp_path, small_model, torch_version="1.13.1")
    with pytest.raises(EngineMismatchError, match="compiled by torch 1.13.1"):
        rali_edge.load(small_model, backend="aoti", engine=engine)


def test_cli_score_reports_mismatch_and_missing_sidecar_without_traceback(small_model, photos, tmp_path):
    engine = _fake_aoti_engine(tmp_path, small_model, model_sha256="ee" * 32)
    args = ["score", "--model", str(small_model), "--backend", "aoti", "--engine", str(engine), str(photos[0])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert "error: cannot use engine: it was built for another model" in result.output
    assert "rali-edge build" in result.output and "Traceback" not in result.output
    shutil.copy(engine, tmp_path / "lonely.pt2")
    args[args.index(str(engine))] = str(tmp_path / "lonely.pt2")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3 and "sidecar lonely.pt2.json is missing" in result.output


def test_run_chunks_splits_pads_and_drops_the_padding():
    import numpy as np
    import torch

    seen = []

    def run(chunk):  # stands for an engine: one output row per input row
        seen.append(len(chunk))
        return chunk.sum(axis=1) if isinstance(chunk, np.ndarray) else chunk.sum(dim=1)

    x = np.arange(11 * 3, dtype=np.float32).reshape(11, 3)
    out = BatchRange(4, 4, 5).run_chunks(x, run, np.concatenate)
    assert seen == [5, 5, 4]  # 11 rows: 5 + 5 + 1, the last padded to the profile's minimum
    np.testing.assert_array_equal(out, x.sum(axis=1))
    seen.clear()
    t = torch.from_numpy(x)
    assert torch.equal(BatchRange(1, 8, 16).run_chunks(t, run, torch.cat), t.sum(dim=1))
    assert seen == [11]
