"""TensorRT: everything around the TensorRT API is tested here on any machine (precision plans,
which layers stay fp32, memory advice, the torch-free preprocessing, the missing-TensorRT path);
builds and runs are marked `tensorrt` and skip, with the reason, where TensorRT or a GPU is absent."""

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import rali_edge
from rali_edge.cli import main
from rali_edge.engines.builder import Progress
from rali_edge.engines import export
from rali_edge.engines.naming import major_minor, sidecar_path
from rali_edge.engines.naming import HEAD_PREFIX
from rali_edge.engines.tensorrt import DRIVER_HINT, graph_failure, tensorrt_major
from rali_edge.engines.tensorrt_build import (
    PrecisionPlan,
    estimate_build_memory_gib,
    fallback_plan,
    memory_advice,
    plan_precision,
    wants_fp32,
)
from rali_edge.errors import EngineMismatchError, MissingDependencyError, RaliEdgeError
from rali_edge.preprocess import PreprocessConfig

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------ without TensorRT
@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here; this checks the message when it is not")
def test_build_tensorrt_without_tensorrt_is_a_clear_error(small_model, tmp_path):
    result = run("build", small_model, "--target", "tensorrt", "-o", tmp_path)
    assert result.exit_code == 4, result.output  # EXIT_ENVIRONMENT: a needed library is missing
    assert "error: TensorRT's Python package is not installed" in result.output
    assert "sudo apt install python3-libnvinfer" in result.output and "--system-site-packages" in result.output
    assert "pip install 'rali-edge[tensorrt]'" in result.output and "--target aoti" in result.output
    assert "R580" in result.output and "tensorrt-cu12" in result.output  # PyPI's TensorRT 11 needs a new driver
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_driver_hint_says_what_to_install_on_older_drivers():
    """Shown when TensorRT's libraries do not load or it cannot start CUDA."""
    for words in ("R580", "R525", "pip install tensorrt-cu12", "'tensorrt<11'", "pip uninstall tensorrt tensorrt-cu13",
                  "JetPack", "apt install python3-libnvinfer"):
        assert words in DRIVER_HINT, words


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here; this checks the message when it is not")
def test_tensorrt_engines_without_tensorrt_are_a_clear_error(small_model, photos, tmp_path):
    from rali_edge.engines.naming import (
        BatchRange,
        EngineInfo,
        RuntimeInfo,
        write_sidecar,
    )
    from rali_edge.engines.tensorrt import TensorRTScorer

    from rali_edge.model_file import read_manifest

    manifest = read_manifest(small_model)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"plan")
    write_sidecar(engine, EngineInfo("tensorrt", "fp16", "score", BatchRange(1, 1, 4), (56, 56), manifest.name,
                                     manifest.weights_sha256, RuntimeInfo(device_type="cuda", tensorrt_version="10.3.0")))
    result = run("score", "--model", small_model, "--backend", "tensorrt", "--engine", engine, photos[0])
    assert result.exit_code == 4 and "python3-libnvinfer" in result.output and "Traceback" not in result.output
    with pytest.raises(MissingDependencyError, match="rali-edge\\[tensorrt\\]"):
        TensorRTScorer(engine)


# ---------------------------------------------------------------------------- precision plans
def test_tensorrt10_fp16_uses_builder_flags_and_fp32_constraints():
    plan = plan_precision(10, "fp16")
    assert plan == PrecisionPlan("fp32", strongly_typed=False, builder_flags=("FP16", "OBEY_PRECISION_CONSTRAINTS"),
                                 pin_fp32=True)
    assert plan.typing == "weak"
    assert plan_precision(10, "bf16").builder_flags == ("BF16", "OBEY_PRECISION_CONSTRAINTS")


def test_tensorrt11_is_strongly_typed_with_precision_from_the_onnx_types():
    for precision in ("fp16", "bf16"):
        plan = plan_precision(11, precision)
        assert plan.strongly_typed and plan.onnx_precision == precision
        assert plan.builder_flags == () and not plan.pin_fp32  # these flags no longer exist in 11
    assert plan_precision(10, "fp16", typing="strong") == plan_precision(11, "fp16")
    with pytest.raises(RaliEdgeError, match="TensorRT 11 removed weak typing"):
        plan_precision(11, "fp16", typing="weak")


def test_fp32_turns_tf32_off_and_old_tensorrt_is_refused():
    assert plan_precision(10, "fp32").cleared_flags == ("TF32",)
    assert plan_precision(11, "fp32").cleared_flags == ("TF32",)
    assert plan_precision(10, "fp16").cleared_flags == ()
    with pytest.raises(MissingDependencyError, match="TensorRT >= 10"):
        plan_precision(8, "fp16")
    with pytest.raises(RaliEdgeError, match="precision"):
        plan_precision(10, "int8")
    assert tensorrt_major("10.3.0.30") == 10 and tensorrt_major("11.4.1") == 11


def test_weak_builds_that_find_no_engine_are_retried_strongly_typed():
    """TensorRT 10 with fp32-pinned layers under OBEY_PRECISION_CONSTRAINTS may build nothing; --typing
    auto then retries with strong typing (what the sidecar records), an explicit choice is kept."""
    for precision in ("fp16", "bf16"):
        assert fallback_plan(10, precision, "auto") == plan_precision(10, precision, "strong")
        assert fallback_plan(10, precision, "auto").typing == "strong"
        assert fallback_plan(10, precision, "weak") is None  # asked for: the build error says --typing strong
        assert fallback_plan(10, precision, "strong") is None  # nothing left to try
        assert fallback_plan(11, precision, "auto") is None  # strong already
    assert fallback_plan(10, "fp32", "auto") is None  # no constraints to miss


@pytest.mark.parametrize("typing", ["auto", "weak"])
def test_tensorrt_build_that_finds_no_engine(monkeypatch, tmp_path, typing):
    """The backend's retry, around TensorRT (build_engine and the export replaced): auto re-exports
    the ONNX for strong typing, builds again and records strong typing; an explicit weak fails."""
    from contextlib import nullcontext

    from rali_edge.engines import tensorrt as engines_trt
    from rali_edge.engines import tensorrt_build
    from rali_edge.engines.backends import BuildRequest
    from rali_edge.engines.naming import BatchRange, EngineInfo, RuntimeInfo

    plans, exported = [], []

    def build_engine(onnx_path, plan_path, *, plan, **options):
        plans.append(plan.typing)
        return None if len(plans) == 1 else tensorrt_build.BuildResult(Path(plan_path), "10.3.0", plan.typing)

    def export_onnx(model, path, precision, *args):
        exported.append(precision)
        Path(path).write_bytes(b"onnx")

    monkeypatch.setattr(tensorrt_build, "build_engine", build_engine)
    monkeypatch.setattr(tensorrt_build, "on_gpu", lambda index: nullcontext())
    monkeypatch.setattr(export, "export_onnx", export_onnx)
    info = EngineInfo("tensorrt", "fp16", "score", BatchRange(1, 1, 4), (56, 56), "m", "sha",
                      RuntimeInfo(device_type="cuda", tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="sm87"))
    request = BuildRequest(precision="fp16", batch=info.batch, outputs="score", device="cuda", typing=typing)
    out = io.StringIO()
    progress = Progress(2, out=out, live=False)
    loads = []
    load_model = lambda: loads.append(1)  # noqa: E731 (the backend loads the weights for each export)
    if typing == "weak":
        with pytest.raises(RaliEdgeError, match="could not build the engine .weak typing.*or try --typing strong"):
            engines_trt.BACKEND.build(load_model, tmp_path / "m.plan", request, info, progress, [])
        assert plans == ["weak"]
        return
    engines_trt.BACKEND.build(load_model, tmp_path / "m.plan", request, info, progress, [])
    assert plans == ["weak", "strong"] and exported == ["fp32", "fp16"]  # strong typing: casts in an fp16 ONNX
    assert len(loads) == 2  # loaded per export, not held through TensorRT's build
    assert info.typing == "strong" and info.build_options["typing"] == "strong"  # the sidecar's record
    assert "building it strongly typed instead" in out.getvalue() and progress.total == 4
    assert not (tmp_path / "m.plan.onnx").exists()


def test_cuda_graph_is_used_only_when_both_enqueues_succeeded():
    assert graph_failure(True, True) is None
    assert "warm-up" in graph_failure(False, False)
    assert "under capture" in graph_failure(True, False)


def test_layers_kept_in_fp32():
    """Names as the ONNX parser gives them (the node name, sometimes with a suffix)."""
    for name, kind in [("node_layer_norm_3", "NORMALIZATION"), ("node_softmax_1", "SOFTMAX"),
                       ("node_linalg_vector_norm", "REDUCE"), (HEAD_PREFIX + "node_matmul_1", "MATRIX_MULTIPLY"),
                       (HEAD_PREFIX + "node_div", "ELEMENTWISE"), (HEAD_PREFIX + "node_add_231_12", "ELEMENTWISE")]:
        assert wants_fp32(name, kind), name
    for name, kind in [("node_matmul_17", "MATRIX_MULTIPLY"), ("node_Conv_176", "CONVOLUTION"),
                       ("node_add_41", "ELEMENTWISE"), ("node_sigmoid_2", "ACTIVATION")]:
        assert not wants_fp32(name, kind), name


# ------------------------------------------------------------------------------------ memory
def test_build_memory_estimate_and_advice():
    vit_l_fp32_onnx = int(1.22 * 2**30)
    weak = plan_precision(10, "fp16")
    # 2 x 1.22 (parsed + network) + 0.61 (fp16 engine weights) + 2 workspace + 1 overhead
    assert estimate_build_memory_gib(vit_l_fp32_onnx, 2.0, 0.5) == pytest.approx(6.0, abs=0.1)
    assert memory_advice(6.0, 16.0, weak) is None
    assert memory_advice(6.0, None, weak) is None  # unknown: say nothing
    advice = memory_advice(6.0, 5.2, weak)
    assert "~6.0 GiB" in advice and "5.2 GiB" in advice and "--typing strong" in advice and "--workspace 1" in advice
    assert "--typing strong" not in memory_advice(6.0, 5.2, plan_precision(10, "fp16", "strong"))


# -------------------------------------------------------------------- torch-free preprocessing
def _cases(photos):
    rng = np.random.default_rng(0)
    yield from photos
    yield rng.integers(0, 256, (31, 97, 3), dtype=np.uint8)  # wide and smaller than the crop
    yield rng.integers(0, 256, (200, 57), dtype=np.uint8)  # grey, tall
    rgba = Image.fromarray(rng.integers(0, 256, (80, 60, 4), dtype=np.uint8), "RGBA")  # alpha onto white
    yield rgba


def test_progress_lines_in_logs():
    out = io.StringIO()
    ui = Progress(2, out=out, live=False)
    with ui.step("building"):
        ui.tensorrt_callback("start", "Building engine", 0, 3)
        ui.tensorrt_callback("step", "Building engine", 1, 3)
    with pytest.raises(ValueError), ui.step("checking"):
        raise ValueError("boom")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] building ..."
    assert lines[1] == "    Building engine (3 steps)"
    assert lines[2].startswith("[1/2] building: done in ")
    assert lines[3] == "[2/2] checking ..." and lines[4].startswith("[2/2] checking: failed after ")


# ------------------------------------------------------------- with TensorRT and a CUDA GPU
@pytest.fixture(scope="module")
def plan(small_model, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt")
    cache = out / "timing.cache"
    result = run("build", small_model, "--target", "tensorrt", "--precision", "fp16", "--batch", "1:2:4",
                 "--timing-cache", cache, "--calib-dir", photos[0].parent, "-o", out)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip()), cache


@pytest.mark.tensorrt
def test_tensorrt_build_names_and_records_the_engine(plan):
    import tensorrt as trt

    path, cache = plan
    major, minor = torch.cuda.get_device_capability()
    assert path.name == f"rali-test-0.trt{major_minor(trt.__version__)}.sm{major}{minor}.fp16.b1-4.plan"
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["tensorrt"]["version"] == trt.__version__
    assert sidecar["tensorrt"]["typing"] == ("weak" if int(trt.__version__.split(".")[0]) == 10 else "strong")
    assert sidecar["gpu"]["compute_capability"] == f"sm{major}{minor}"
    assert sidecar["gpu"]["name"] == torch.cuda.get_device_name()
    assert sidecar["fidelity"]["passed"]  # within the default 0.02
    assert cache.stat().st_size > 0  # timing cache written


@pytest.mark.tensorrt
@pytest.mark.parametrize("batch", [1, 3, 7])  # 1: CUDA graph; 3: dynamic shape; 7: split 4 + 3
def test_tensorrt_scores_match_pytorch(plan, small_model, batch):
    engine = rali_edge.load(small_model, device="cuda", backend="tensorrt", engine=plan[0])
    pixels = torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch))
    want = rali_edge.load(small_model, head="torch").score_pixels(pixels)
    # fp16 encoder, fp32 head: the build's fidelity limit.
    torch.testing.assert_close(engine.score_pixels(pixels).cpu(), want, atol=0.02, rtol=0)
    if batch == 1:
        assert engine.encoder._graph is not None or not engine.encoder.use_graph


def _encoder(plan, **kwargs):
    from rali_edge.engines.naming import read_sidecar
    from rali_edge.engines.tensorrt import TensorRTEncoder

    return TensorRTEncoder(plan[0], read_sidecar(plan[0]), **kwargs)


def _pixels(n, seed=0, device="cuda"):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.tensorrt
def test_tensorrt_cuda_graph_matches_the_plain_path_at_batch_1(plan):
    graph, plain = _encoder(plan, cuda_graph=True), _encoder(plan, cuda_graph=False)
    for seed in range(3):  # new pixels each time: every replay reads its input anew
        pixels = _pixels(1, seed)
        torch.testing.assert_close(graph(pixels), plain(pixels), rtol=0, atol=1e-5)
    assert graph._graph is not None and plain._graph is None


@pytest.mark.tensorrt
def test_tensorrt_contexts_share_one_activation_buffer(plan):
    encoder, plain = _encoder(plan, cuda_graph=True), _encoder(plan, cuda_graph=False)
    size = encoder.engine.device_memory_size_v2
    batches = _pixels(3, seed=1), _pixels(1, seed=2)
    want = [plain(p) for p in batches]
    for _ in range(2):  # the graph (batch 1) and the plain context (batch 3) overwrite each other's activations
        for p, w in zip(batches, want):
            torch.testing.assert_close(encoder(p), w, rtol=0, atol=1e-5)
    assert encoder._graph is not None and encoder._memory.numel() == size

    def free():
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]

    start = free()
    ours = encoder._new_context()  # noqa: F841  (held while measuring)
    mid = free()
    default = encoder.engine.create_execution_context()  # noqa: F841  STATIC: preallocates its own activations
    end = free()
    # A context on the shared buffer costs `size` less than TensorRT's default (within the driver's 2 MiB page).
    assert (mid - end) - (start - mid) >= size - 2 * 2**20, (start - mid, mid - end, size)


@pytest.mark.tensorrt
@pytest.mark.parametrize("n", [1, 3])  # 1: the CUDA graph; 3: the plain context
def test_tensorrt_runs_on_its_own_stream_in_order_with_the_callers(plan, n):
    encoder = _encoder(plan, cuda_graph=True)
    assert encoder.stream.cuda_stream not in (0, torch.cuda.current_stream().cuda_stream)
    source = _pixels(n)
    want = encoder(source).clone()
    caller = torch.cuda.Stream()
    caller.wait_stream(torch.cuda.current_stream())  # `source` is ready
    with torch.cuda.stream(caller):
        pixels = torch.zeros_like(source)
        torch.cuda._sleep(100_000_000)  # the caller's stream is busy for tens of milliseconds...
        pixels.copy_(source)  # ...before it writes the pixels: TensorRT must wait for them
        got = encoder(pixels).clone()  # read on the caller's stream: must wait for TensorRT
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.tensorrt
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensorrt_builds_and_runs_on_the_gpu_it_is_given(small_model, photos, tmp_path):
    from rali_edge.engines.builder import build

    free = lambda: [torch.cuda.mem_get_info(i)[0] for i in (0, 1)]
    before = free()
    lowest = list(before)

    class Watch(Progress):
        def tensorrt_callback(self, event, phase, step, total):
            lowest[:] = map(min, lowest, free())
            return True

    built = build(small_model, "tensorrt", device="cuda:1", batch="1:2:4", output=tmp_path,
                  calib_dir=photos[0].parent, progress=Watch(quiet=True))  # the fidelity check runs on cuda:1 too
    assert built.info.runtime.gpu_name == torch.cuda.get_device_name(1)
    assert before[1] - lowest[1] > before[0] - lowest[0]  # TensorRT's build memory was on GPU 1
    engine = rali_edge.load(small_model, device="cuda:1", backend="tensorrt", engine=built.engine)
    pixels = _pixels(3, device="cpu")
    scores = engine.score_pixels(pixels)
    assert scores.device == torch.device("cuda:1")
    torch.testing.assert_close(scores.cpu(), rali_edge.load(small_model, head="torch").score_pixels(pixels),
                               atol=0.02, rtol=0)


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("pycuda") is None, reason="the torch-free runner needs pycuda")
def test_torch_free_runner_matches_pytorch(plan, small_model, photos):
    from rali_edge.engines.tensorrt import TensorRTScorer

    from rali_edge.model_file import read_manifest

    with TensorRTScorer(plan[0], model_sha256=read_manifest(small_model).weights_sha256) as scorer:
        got = scorer.score([str(p) for p in photos])
    assert got == pytest.approx(rali_edge.load(small_model).score(photos), abs=0.02)


@pytest.mark.tensorrt
def test_tensorrt_refuses_other_gpu_or_version(plan, small_model, tmp_path):
    copy = tmp_path / plan[0].name
    shutil.copy(plan[0], copy)
    sidecar = json.loads(sidecar_path(plan[0]).read_text())
    sidecar_path(copy).write_text(json.dumps(sidecar | {"gpu": {"name": "Orin", "compute_capability": "sm87"}}))
    if sidecar["gpu"]["compute_capability"] != "sm87":
        with pytest.raises(EngineMismatchError, match="compute capability sm87"):
            rali_edge.load(small_model, device="cuda", backend="tensorrt", engine=copy)
    sidecar["tensorrt"]["version"] = "9.9.9"
    sidecar_path(copy).write_text(json.dumps(sidecar))
    with pytest.raises(EngineMismatchError, match="built with TensorRT 9.9.9"):
        rali_edge.load(small_model, device="cuda", backend="tensorrt", engine=copy)


@pytest.mark.tensorrt
@pytest.mark.parametrize("args, limit", [(["--precision", "fp32"], 1e-3), (["--typing", "strong"], 0.02),
                                         (["--head", "triton"], 0.02)])
def test_tensorrt_other_builds(small_model, photos, tmp_path, args, limit):
    result = run("build", small_model, "--target", "tensorrt", "--batch", "1:2:4", "--calib-dir", photos[0].parent,
                 "--max-score-diff", limit, "-o", tmp_path, *args)
    assert result.exit_code == 0, result.output
    engine = rali_edge.load(small_model, device="cuda", backend="tensorrt", engine=result.stdout.strip())
    assert engine.score(photos) == pytest.approx(rali_edge.load(small_model).score(photos), abs=limit)


def test_torch_free_modules_import_without_torch(photos, tmp_path):
    """The TensorRT runner's modules must import, and preprocess, on a device without torch."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from rali_edge.engines.tensorrt import TensorRTScorer\n"
        "from rali_edge.images import open_image\n"
        "from rali_edge.preprocess import PreprocessConfig, Preprocessor\n"
        "from rali_edge.engines.naming import read_sidecar, check_compatible\n"
        "import json\n"
        f"config = PreprocessConfig.from_dict(json.loads({json.dumps(json.dumps(PreprocessConfig(resize_shortest_edge=56, crop_height=56, crop_width=56).to_dict()))}))\n"
        f"pixels = Preprocessor(config).pil_to_array(open_image({str(photos[0])!r}))[None]\n"
        "print(pixels.shape, pixels.dtype)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 56, 56) float32"


@pytest.mark.slow
def test_strongly_typed_bf16_onnx_for_tensorrt11(small_model, tmp_path):
    """TensorRT 11 takes its precision from the ONNX types: bf16 matmuls, fp32 layernorm,
    softmax and head, fp32 inputs and outputs."""
    import onnx

    from rali_edge.model_file import load_model

    model, _ = load_model(small_model)
    path = export.export_onnx(model, tmp_path / "m.onnx", plan_precision(11, "bf16").onnx_precision, "score", 1, 4)
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input]}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    bf16, fp32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    first_input = {(n.op_type, n.name.startswith(HEAD_PREFIX), types[n.input[0]]) for n in proto.graph.node
                   if n.op_type in ("MatMul", "Conv", "LayerNormalization", "Softmax")}
    assert first_input == {("Conv", False, bf16), ("MatMul", False, bf16), ("MatMul", True, fp32),
                           ("LayerNormalization", False, fp32), ("LayerNormalization", True, fp32),
                           ("Softmax", False, fp32), ("Softmax", True, fp32)}
    assert proto.graph.output[0].type.tensor_type.elem_type == fp32


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("pycuda") is not None,
                    reason="this machine has a way to reach a GPU")
def test_no_gpu_and_no_pycuda_says_what_to_install():
    from rali_edge.engines import tensorrt as engines_trt

    with pytest.raises(MissingDependencyError, match="install torch with CUDA, or pycuda"):
        engines_trt.gpu_info(0)
    with pytest.raises(MissingDependencyError, match="install torch with CUDA, or pycuda"):
        with engines_trt.on_gpu(0):
            pass
