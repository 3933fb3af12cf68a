"""Building TensorRT engines (ONNX -> plan, TensorRT Python API): what `rali-edge build
--target tensorrt` runs through TensorRTBackend.build (engines/tensorrt.py holds the backend and
the runners).

Two precision paths, picked from the installed TensorRT's major version (`plan_precision`):
- TensorRT 10 (JetPack 6 on Orin): weak typing. The fp32 ONNX is parsed, BuilderFlag.FP16/BF16
  lets TensorRT choose low precision per layer, and OBEY_PRECISION_CONSTRAINTS pins layernorm,
  softmax, reductions and every RALI head layer to fp32 (`pin_fp32_layers`). `--typing strong`
  uses the TensorRT 11 path instead, which also needs less memory to build (fp16 weights in the
  ONNX): useful on an 8 GB Orin.
- TensorRT 11: strongly typed networks only (the weak-typing flags are gone). The ONNX file itself
  is mixed precision (export.py casts layernorm/softmax/head to fp32) and TensorRT follows it.

`tensorrt` is imported inside functions only: the precision plans, which layers to pin and the
memory estimate are plain Python, tested without a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rali_edge.engines.backends import BuildRequest
from rali_edge.engines.naming import HEAD_PREFIX, INPUT_NAME, BatchRange, EngineInfo
from rali_edge.engines.tensorrt import _create, _logger, cuda_index, import_tensorrt, on_gpu, tensorrt_major
from rali_edge.errors import MissingDependencyError, RaliEdgeError

FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
GIB = 1 << 30


# ---------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class PrecisionPlan:
    """How to get a precision out of a given TensorRT version."""

    onnx_precision: str  # the precision of the ONNX file to export ("fp32" = weights fp32, no casts)
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()  # BuilderFlag names to set
    cleared_flags: tuple[str, ...] = ()  # BuilderFlag names to clear when they exist
    pin_fp32: bool = False  # pin layernorm/softmax/reduce/head layers to fp32 (weak typing only)

    @property
    def typing(self) -> str:
        return "strong" if self.strongly_typed else "weak"


def plan_precision(trt_major: int, precision: str, typing: str = "auto") -> PrecisionPlan:
    """TensorRT 10: weak typing (builder flags + fp32 constraints) unless typing="strong";
    TensorRT 11+: strong typing only, precision from the ONNX types."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise RaliEdgeError(f"unknown precision {precision!r}; choose fp32, fp16 or bf16")
    if typing not in ("auto", "weak", "strong"):
        raise RaliEdgeError(f"unknown typing {typing!r}; choose auto, weak or strong")
    if trt_major < 10:
        raise MissingDependencyError(
            f"TensorRT {trt_major}.x is too old: rali-edge needs TensorRT >= 10 (JetPack 6.1 or newer on Jetson); "
            "use --target aoti meanwhile")
    # TF32 rounds fp32 matmul inputs to 10 mantissa bits; "fp32" should mean fp32.
    no_tf32 = ("TF32",) if precision == "fp32" else ()
    if trt_major >= 11 or typing == "strong":
        if trt_major >= 11 and typing == "weak":
            raise RaliEdgeError("TensorRT 11 removed weak typing (builder precision flags); use --typing strong or auto")
        return PrecisionPlan(precision, strongly_typed=True, cleared_flags=no_tf32)
    if precision == "fp32":
        return PrecisionPlan("fp32", strongly_typed=False, cleared_flags=no_tf32)
    return PrecisionPlan("fp32", strongly_typed=False, builder_flags=(precision.upper(), "OBEY_PRECISION_CONSTRAINTS"),
                         pin_fp32=True)


def fallback_plan(trt_major: int, precision: str, typing: str) -> PrecisionPlan | None:
    """The plan to build with when TensorRT built nothing (build_serialized_network returned None)
    from plan_precision(trt_major, precision, typing), or None when there is nothing else to try.
    Weak typing under OBEY_PRECISION_CONSTRAINTS may find no kernel that keeps a pinned layernorm or
    softmax in fp32; strong typing (the casts are in the ONNX, as on TensorRT 11) builds those as
    given, and needs less memory too. Only when --typing auto chose weak typing: an explicit
    --typing weak is kept."""
    plan = plan_precision(trt_major, precision, typing)
    if typing != "auto" or "OBEY_PRECISION_CONSTRAINTS" not in plan.builder_flags:
        return None
    return plan_precision(trt_major, precision, "strong")


def wants_fp32(layer_name: str, layer_type: str) -> bool:
    """Whether a TensorRT layer must stay fp32 under weak typing: layernorm, softmax and
    reductions anywhere (the ViT fp16 overflow), and every layer the parser made from a head node
    (export.py names those nodes `rali_head/...`; the parser keeps node names in layer names)."""
    return layer_type in FP32_LAYER_TYPES or HEAD_PREFIX in layer_name


def pin_fp32_layers(trt, network) -> list[str]:
    """Set precision and output types to fp32 on the layers `wants_fp32` picks; returns their names.
    Layers with non-float outputs (shapes, indices) and constants are left alone."""
    floats = {trt.float32, trt.float16} | ({trt.bfloat16} if hasattr(trt, "bfloat16") else set())
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.CONSTANT or not wants_fp32(layer.name, layer.type.name):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(t.dtype not in floats for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


# ------------------------------------------------------------------------------------- memory
def estimate_build_memory_gib(onnx_bytes: int, workspace_gib: float, engine_weight_fraction: float = 1.0) -> float:
    """A rough upper estimate of the memory a TensorRT build of this ONNX file takes. On Jetson the
    GPU shares the RAM, so all of it counts against the board's memory:
    the parsed ONNX and the network's copy of its weights (2x the file), the engine's weights
    (x engine_weight_fraction: 0.5 when fp32 weights become fp16), the workspace, and ~1 GiB for
    the CUDA context, cuBLAS/cuDNN handles and tactic scratch."""
    weights = onnx_bytes / GIB
    return round(2 * weights + engine_weight_fraction * weights + workspace_gib + 1.0, 1)


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), in GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_advice(needed_gib: float, available_gib: float | None, plan: PrecisionPlan) -> str | None:
    """A warning when the build probably does not fit (the kernel's OOM killer ends it without a
    word from TensorRT: nanoowl#5, jetson-containers#598)."""
    if available_gib is None or available_gib >= needed_gib:
        return None
    tips = ["--workspace 1"]
    if not plan.strongly_typed and plan.onnx_precision == "fp32" and plan.builder_flags:
        tips.insert(0, "--typing strong (fp16 weights in the ONNX: half the memory)")
    return (
        f"this build may need ~{needed_gib:.1f} GiB but only {available_gib:.1f} GiB is available; if it gets "
        f"killed, try {' and '.join(tips)}, stop the desktop (sudo systemctl isolate multi-user.target) "
        "and other GPU programs, or build on a bigger board of the same JetPack and GPU"
    )



# ------------------------------------------------------------------------------------ builder
ProgressCallback = Callable[[str, str, int, int], bool]  # (event, phase, step, num_steps) -> keep going


def _progress_monitor(trt, callback: ProgressCallback):
    """Adapt TensorRT's IProgressMonitor (10.0+) to a plain callback; returning False cancels, and
    `.stop` is then what build_engine raises once TensorRT has returned."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}
            self.stop: BaseException | None = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            callback("start", phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            try:
                if callback("step", phase_name, step, self.steps.get(phase_name, 0)):
                    return True
                self.stop = RaliEdgeError("the TensorRT build was cancelled")
            except KeyboardInterrupt as e:
                self.stop = e  # cancels the build cleanly instead of raising through C++
            return False

        def phase_finish(self, phase_name):
            callback("finish", phase_name, self.steps.pop(phase_name, 0), 0)

    return Monitor()


@dataclass
class BuildResult:
    plan_path: Path
    tensorrt_version: str
    typing: str
    pinned_layers: list[str] = field(default_factory=list)
    timing_cache_written: bool = False


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, batch: BatchRange, image_size: tuple[int, int],
                 plan: PrecisionPlan, workspace_gib: float | None = None, timing_cache: str | Path | None = None,
                 progress: ProgressCallback | None = None, head_in_engine: bool = True) -> BuildResult | None:
    """Parse the ONNX file, configure precision, one optimisation profile (batch.min/opt/max),
    the workspace limit and the timing cache, and write the serialized engine to plan_path.
    Builds on the current CUDA device (`on_gpu`). Returns None when TensorRT built no engine (no
    kernels for the constraints, or out of memory; its messages are printed): `fallback_plan`
    says what to try next."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = _create(trt, trt.Builder, logger)
    flags = 0
    if plan.strongly_typed:
        # TensorRT 10 needs the flag; in 11 every network is strongly typed (the flag may be gone).
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strong is not None:
            flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        details = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "; ".join(logger.errors)
        raise RaliEdgeError(f"TensorRT could not parse {onnx_path}: {details}")
    _check_network_io(network, image_size)

    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * GIB))
    for name in plan.builder_flags:
        if not hasattr(trt.BuilderFlag, name):
            raise RaliEdgeError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; try --typing strong")
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    pinned = pin_fp32_layers(trt, network) if plan.pin_fp32 else []
    if plan.pin_fp32 and head_in_engine and not any(HEAD_PREFIX in name for name in pinned):
        raise RaliEdgeError(
            "TensorRT's layer names do not carry the ONNX node names, so the head cannot be kept in fp32 "
            "with weak typing; build with --typing strong instead"
        )

    profile = builder.create_optimization_profile()
    shape = lambda b: (b, 3, *image_size)
    profile.set_shape(INPUT_NAME, shape(batch.min), shape(batch.opt), shape(batch.max))
    config.add_optimization_profile(profile)

    if timing_cache is not None:
        cached = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(cached)
        if not config.set_timing_cache(cache, False):
            # A cache from another GPU, CUDA or TensorRT: start a fresh one rather than fail.
            print(f"[rali-edge] timing cache {timing_cache} does not match this device; starting a new one",
                  file=sys.stderr, flush=True)
            config.set_timing_cache(config.create_timing_cache(b""), False)
    monitor = None  # held here: TensorRT calls into it until the build returns
    if progress is not None and hasattr(config, "progress_monitor"):
        monitor = _progress_monitor(trt, progress)
        config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.stop is not None:
        raise monitor.stop  # a Ctrl-C stays one: the builder removes the partial files
    del monitor
    if serialized is None:
        return None
    plan_path = Path(plan_path)
    plan_path.write_bytes(memoryview(serialized))
    written = False
    if timing_cache is not None:
        Path(timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
        written = True
    return BuildResult(plan_path, trt.__version__, plan.typing, pinned, written)


def _check_network_io(network, image_size: tuple[int, int]) -> None:
    if network.num_inputs != 1 or network.get_input(0).name != INPUT_NAME:
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        raise RaliEdgeError(f"the ONNX file has inputs {names}; expected one input named {INPUT_NAME!r}")
    dims = tuple(network.get_input(0).shape)
    if dims[1:] != (3, *image_size):
        raise RaliEdgeError(f"the ONNX input is {dims}; expected (batch, 3, {image_size[0]}, {image_size[1]})")


def build_plan(load_model, path: Path, request: BuildRequest, info: EngineInfo, progress, written: list[Path],
               steps: int) -> None:
    """TensorRTBackend.build: export, build (and, when weak typing built nothing, build strongly typed)."""
    major = tensorrt_major(info.runtime.tensorrt_version)
    plan = plan_precision(major, request.precision, request.typing)
    onnx_path = path.with_name(path.name + ".onnx")
    written.append(onnx_path)
    try:
        with on_gpu(cuda_index(request.device)):  # the GPU that info.runtime (the sidecar) describes
            result = _export_and_build(load_model, path, onnx_path, request, info, plan, progress)
            retry = fallback_plan(major, request.precision, request.typing) if result is None else None
            if retry is not None:
                progress.note("TensorRT built no weak-typed engine (no kernels for the fp32 layernorm, softmax "
                              "and head, or out of memory); building it strongly typed instead (--typing strong)")
                progress.total += steps
                plan = retry
                result = _export_and_build(load_model, path, onnx_path, request, info, plan, progress)
    finally:
        if not request.keep_onnx:
            onnx_path.unlink(missing_ok=True)
    if result is None:
        raise RaliEdgeError(
            f"TensorRT could not build the engine ({plan.typing} typing; see its messages above). If it ran out "
            f"of memory, lower --workspace{'' if plan.strongly_typed else ' or try --typing strong'}.")
    info.typing = plan.typing  # what was built: the sidecar says so
    info.build_options.update(workspace_gib=request.workspace_gib, typing=plan.typing,
                              timing_cache=request.timing_cache)
    if result.pinned_layers:
        progress.note(f"kept {len(result.pinned_layers)} layers in fp32 (layernorm, softmax, reductions, head)")

def _export_and_build(load_model, path: Path, onnx_path: Path, request: BuildRequest, info: EngineInfo,
                      plan: PrecisionPlan, progress) -> BuildResult | None:
    """The two build steps for one precision plan: export the ONNX file it needs, build the plan.
    The weights are loaded for the export alone and freed before TensorRT builds (Jetson builds
    get killed for memory); the rare strongly typed retry loads them again."""
    from rali_edge.engines.export import export_onnx

    runtime, batch = info.runtime, request.batch
    with progress.step(f"exporting ONNX for TensorRT {runtime.tensorrt_version} ({plan.typing} typing, "
                       f"{plan.onnx_precision} weights)"):
        export_onnx(load_model(), onnx_path, plan.onnx_precision, request.outputs, batch.min, batch.max)
    needed = estimate_build_memory_gib(
        onnx_path.stat().st_size, request.workspace_gib,
        0.5 if plan.onnx_precision == "fp32" and request.precision != "fp32" else 1.0)
    advice = memory_advice(needed, available_memory_gib(), plan)
    if advice:
        progress.note(f"warning: {advice}")
    with progress.step(f"building the TensorRT engine on {runtime.gpu_name} ({runtime.compute_capability}, "
                       f"{request.precision}, batch {batch}); this takes minutes"):
        return build_engine(onnx_path, path, batch=batch, image_size=tuple(info.image_size), plan=plan,
                            workspace_gib=request.workspace_gib, timing_cache=request.timing_cache,
                            progress=progress.tensorrt_callback, head_in_engine=request.outputs == "score")


__all__ = ["GIB", "BuildResult", "PrecisionPlan", "available_memory_gib", "build_engine", "build_plan",
           "estimate_build_memory_gib", "fallback_plan", "memory_advice", "pin_fp32_layers", "plan_precision",
           "wants_fp32"]
