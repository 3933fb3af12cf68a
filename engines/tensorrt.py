"""TensorRT engines: the backend (engines/backends.py), the runtime and two runners; the builder
is engines/tensorrt_build.py.

Runners:
- `TensorRTEncoder`: an EncoderBackend for rali_edge.load(..., backend="tensorrt") on torch CUDA
  tensors, with `execute_async_v3` on a stream of its own and a CUDA graph for batch 1.
- `TensorRTScorer`: no torch at all (pycuda buffers, numpy preprocessing, the head inside the
  engine), for devices where installing torch is a burden:
      TensorRTScorer("rali.trt10.3.sm87.fp16.b1-8.plan").score(["a.jpg", "b.jpg"])

Only this module and tensorrt_build.py import `tensorrt`, and only inside functions: everything
around it (names, sidecars, precision plans, which layers to pin) is plain Python that is tested
without a GPU.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rali_edge.engines.backends import Backend, BuildRequest, same_platform
from rali_edge.engines.naming import (
    INPUT_NAME,
    ONNX_OPSET,
    EngineInfo,
    RuntimeInfo,
    base_version,
    check_compatible,
    compute_capability_tag,
    device_model,
    major_minor,
    read_sidecar,
)
from rali_edge.errors import (
    EngineMismatchError,
    MissingDependencyError,
    RaliEdgeError,
    ScoringError,
    UsageError,
)


INSTALL_HINT = (
    "TensorRT's Python package is not installed (or not visible to this Python). "
    "On a Jetson, use the TensorRT that ships with JetPack: `sudo apt install python3-libnvinfer "
    "python3-libnvinfer-dev`, and create your virtualenv with --system-site-packages so it sees it "
    "(never pip-install another TensorRT there). On a desktop GPU: pip install 'rali-edge[tensorrt]' (NVIDIA "
    "driver R580 or newer; with an older CUDA 12 driver: pip install rali-edge pycuda tensorrt-cu12). "
    "Without TensorRT, `--target aoti` builds an engine with PyTorch alone."
)
# PyPI's `tensorrt` (11.x) is built for CUDA 13: on an older driver it imports, then cannot start CUDA.
DRIVER_HINT = (
    "PyPI's tensorrt is built for CUDA 13 (tensorrt-cu13) and needs an NVIDIA driver R580 or newer (nvidia-smi "
    "shows yours); with a CUDA 12 driver (R525 or newer) use TensorRT's CUDA 12 build: pip uninstall tensorrt "
    "tensorrt-cu13 tensorrt-cu13-libs tensorrt-cu13-bindings, then pip install tensorrt-cu12 (or 'tensorrt<11'). "
    "On a Jetson use JetPack's TensorRT (sudo apt install python3-libnvinfer), never a PyPI wheel."
)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    except OSError as e:  # the bindings are there but libnvinfer.so is not
        raise MissingDependencyError(f"TensorRT is installed but cannot load its libraries ({e}). {DRIVER_HINT}") from None
    return trt


def _create(trt, factory, logger):
    """trt.Builder(logger) or trt.Runtime(logger). TensorRT gives no object (pybind's TypeError)
    when it cannot start CUDA, most often a driver older than the CUDA this TensorRT was built for."""
    try:
        return factory(logger)
    except TypeError:
        raise MissingDependencyError(
            f"TensorRT {trt.__version__} cannot start CUDA (see its messages above). {DRIVER_HINT}") from None


@contextmanager
def on_gpu(index: int):
    """Make GPU `index` current on this thread: TensorRT builds, loads and runs on the device that is
    current when its builder, runtime and contexts are created and when it enqueues. With torch when
    it has CUDA, else with pycuda (as gpu_info finds the GPU)."""
    torch = torch_with_cuda()
    if torch is not None:
        with torch.cuda.device(index):
            yield
        return
    cuda = pycuda_driver()
    cuda.init()
    context = cuda.Device(index).retain_primary_context()
    context.push()
    try:
        yield
    finally:
        context.pop()
        context.detach()


def torch_with_cuda():
    """torch where it is installed and sees a CUDA GPU, else None: then pycuda serves (the
    torch-free runner on a Jetson). The one place that choice is made (on_gpu, gpu_info)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def pycuda_driver():
    """pycuda's driver module (not yet initialised), or MissingDependencyError saying what to install."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise MissingDependencyError(
            "no CUDA GPU visible: install torch with CUDA, or pycuda (pip install pycuda) for the torch-free runner"
        ) from None
    return cuda


def tensorrt_major(version: str) -> int:
    m = re.match(r"(\d+)", str(version))
    if not m:
        raise RaliEdgeError(f"cannot read the TensorRT version {version!r}")
    return int(m.group(1))


# ------------------------------------------------------------------------------------ runtime
def gpu_info(device_index: int = 0) -> tuple[str, str, str | None]:
    """(GPU name, compute capability tag, CUDA version) from torch when it has CUDA, else pycuda."""
    torch = torch_with_cuda()
    if torch is not None:
        major, minor = torch.cuda.get_device_capability(device_index)
        return torch.cuda.get_device_name(device_index), compute_capability_tag(major, minor), torch.version.cuda
    cuda = pycuda_driver()
    try:
        cuda.init()
        device = cuda.Device(device_index)
        version = ".".join(str(v) for v in cuda.get_version()[:2])
        return device.name(), compute_capability_tag(*device.compute_capability()), version
    except cuda.Error as e:
        raise MissingDependencyError(f"no usable CUDA GPU: {e}") from None


def tensorrt_runtime(device_index: int = 0) -> RuntimeInfo:
    trt = import_tensorrt()
    name, cc, cuda_version = gpu_info(device_index)
    return RuntimeInfo(device_type="cuda", tensorrt_version=trt.__version__, cuda_version=cuda_version, gpu_name=name,
                       compute_capability=cc, device_model=device_model())


def _logger(trt):
    """A TensorRT logger that prints warnings and errors and keeps the errors (`.errors`) for our messages."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            # Severity: INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4.
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)

    return Logger()


def _deserialize(trt, path: str | Path):
    logger = _logger(trt)
    runtime = _create(trt, trt.Runtime, logger)
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise EngineMismatchError(
            f"{path}: TensorRT {trt.__version__} could not load this engine ({_details(logger)}); "
            "rebuild it on this machine with `rali-edge build`"
        )
    return runtime, engine, logger


def _details(logger) -> str:
    return "; ".join(logger.errors[-2:]) or "no details"


def _io_names(trt, engine) -> tuple[str, str]:
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != [INPUT_NAME] or len(outputs) != 1:
        raise EngineMismatchError(f"engine has inputs {inputs} and outputs {outputs}; not a rali-edge engine")
    return inputs[0], outputs[0]


# ------------------------------------------------------------------------- runner with torch
def graph_failure(warmed: bool, captured: bool) -> str | None:
    """Why the batch-1 CUDA graph cannot be replayed, from what execute_async_v3 returned in the
    warm-up run and under capture, or None when it can: a graph whose enqueue failed would replay
    into an output buffer nothing wrote."""
    if not warmed:
        return "TensorRT's warm-up run failed"
    if not captured:
        return "TensorRT's run under capture failed"
    return None


class TensorRTEncoder:
    """EncoderBackend: torch CUDA tensors in and out. TensorRT runs on a stream of its own
    (enqueueV3 on the default stream adds a device synchronisation), after what the caller had
    queued on its current stream and before what it queues next, so the caller reads the results
    on its stream. Batch 1 replays a CUDA graph (captured on first use) on a second execution
    context, which saves the per-layer launch cost that dominates small batches on Jetson CPUs.
    The two contexts share one activation buffer: the lock and the one stream keep them from
    ever running at once."""

    def __init__(self, path: str | Path, info: EngineInfo, device: str = "cuda", cuda_graph: bool | None = None):
        import torch

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise MissingDependencyError(
                "the TensorRT backend runs on torch CUDA tensors, but this torch has no CUDA; install "
                "NVIDIA's CUDA build of torch, or use the torch-free rali_edge.engines.tensorrt.TensorRTScorer"
            )
        self.torch, self.trt = torch, trt
        self.outputs, self.batch, self.image_size = info.outputs, info.batch, tuple(info.image_size)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RaliEdgeError(f"TensorRT engines run on CUDA devices; got --device {device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self._runtime, self.engine, self._logger = _deserialize(trt, path)
            self._memory = None  # the activation buffer, made with the first context
            self.context = self._new_context()
            self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        self.input_name, self.output_name = _io_names(trt, self.engine)
        self.out_dtype = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(self.output_name))
        if cuda_graph is None:
            cuda_graph = os.environ.get("RALI_TRT_CUDA_GRAPH", "1") != "0"
        self.use_graph = cuda_graph and self.batch.min == 1
        self._graph = None

    def __call__(self, pixels):
        torch = self.torch
        caller = torch.cuda.current_stream(self.device)
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_stream(caller)  # the caller may still be writing the pixels
            out = self.batch.run_chunks(pixels.to(self.device, torch.float32), self._run, torch.cat)
        caller.wait_stream(self.stream)  # what the caller queues next (reading `out`) waits for TensorRT
        out.record_stream(caller)  # made on our stream: not to be reused before the caller is done with it
        return out

    def _new_context(self):
        """An execution context on the runner's one activation buffer. The default (STATIC) would
        preallocate the activations for each context, twice the memory on an 8 GB Orin; the plain
        and the graph contexts never run at once, so they can share. TensorRT 10.0 (no
        device_memory_size_v2) keeps the default."""
        size = getattr(self.engine, "device_memory_size_v2", None)
        if size is None:
            return self.engine.create_execution_context()
        if self._memory is None:
            self._memory = self.torch.empty(size, dtype=self.torch.uint8, device=self.device)
        context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self._memory.data_ptr(), size)
        return context

    def _bind(self, context, pixels):
        """Point `context` at `pixels` and at a new output tensor of the shape that gives; returns the output."""
        context.set_input_shape(self.input_name, tuple(pixels.shape))
        out = self.torch.empty(tuple(context.get_tensor_shape(self.output_name)), dtype=self.out_dtype,
                               device=self.device)
        context.set_tensor_address(self.input_name, pixels.data_ptr())
        context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _run(self, chunk):
        """One chunk within the profile (run_chunks has padded it to batch.min), on self.stream."""
        if chunk.shape[0] == 1 and self.use_graph:
            if self._graph is None:
                self._graph = self._capture()
            if self._graph is not None:
                graph, _, static_in, static_out = self._graph
                static_in.copy_(chunk)
                graph.replay()
                return static_out.clone()
        out = self._bind(self.context, chunk.contiguous())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ScoringError(f"TensorRT could not run the engine ({_details(self._logger)})")
        return out

    def _capture(self):
        """(graph, its context, input, output) of one batch-1 run on a context of its own (whose shapes
        then stay at batch 1), or None, with a note, when TensorRT cannot run under capture: the plain
        path takes over. Called on self.stream, which the capture records."""
        torch = self.torch
        try:
            context = self._new_context()
            static_in = torch.zeros((1, 3, *self.image_size), device=self.device)
            static_out = self._bind(context, static_in)
            graph = torch.cuda.CUDAGraph()
            # The first enqueue finishes TensorRT's lazy setup, which must not happen under capture;
            # synchronising makes an error of that run raise here rather than at a replay.
            warmed = context.execute_async_v3(self.stream.cuda_stream)
            self.stream.synchronize()
            captured = False
            if warmed:
                # thread_local: CUDA calls of other threads (decoders, a second scorer) stay legal meanwhile.
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    captured = context.execute_async_v3(self.stream.cuda_stream)
                finally:
                    graph.capture_end()  # ends the capture whatever the enqueue did
            problem = graph_failure(warmed, captured)
        except Exception as e:  # noqa: BLE001  not every engine can be captured; run without
            problem = f"{type(e).__name__}: {e}"
        if problem:
            print(f"[rali-edge] CUDA graph capture failed ({problem}); running batch 1 without it", file=sys.stderr)
            self.use_graph = False
            return None
        return graph, context, static_in, static_out


def _torch_dtype(torch, trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineMismatchError(f"engine output type {dtype} is not supported")
    return table[dtype]


# ------------------------------------------------------------------------------ torch-free
class TensorRTScorer:
    """Images in, scores out, with TensorRT, pycuda and numpy only (no torch). Needs an engine
    built with the head inside (`rali-edge build ... --target tensorrt --head engine`)."""

    def __init__(self, engine_path: str | Path, model_sha256: str | None = None, device_index: int = 0):
        trt = import_tensorrt()
        try:
            import pycuda.driver as cuda
        except ImportError:
            raise MissingDependencyError("the torch-free TensorRT runner needs pycuda: pip install pycuda") from None
        self.path = Path(engine_path)
        self.info = read_sidecar(self.path)
        self.warnings = check_compatible(self.info, model_sha256, tensorrt_runtime(device_index), backend="tensorrt")
        if self.info.outputs != "score":
            raise RaliEdgeError(
                f"{self.path}: this engine outputs class tokens (built with --head triton); the torch-free runner "
                f"needs the head inside the engine: {self.info.rebuild_command().replace('--head triton', '--head engine')}"
            )
        from rali_edge.preprocess import PreprocessConfig, Preprocessor  # numpy path: no torch

        self.preprocess = Preprocessor(PreprocessConfig.from_dict(self.info.preprocess))
        self.cuda = cuda
        cuda.init()
        self._context = cuda.Device(device_index).retain_primary_context()
        self._context.push()
        try:
            self._runtime, self.engine, self._logger = _deserialize(trt, self.path)
            self.context = self.engine.create_execution_context()
            self.input_name, self.output_name = _io_names(trt, self.engine)
            b, (h, w) = self.info.batch.max, self.info.image_size
            self.host_in = cuda.pagelocked_empty((b, 3, h, w), np.float32)
            self.host_out = cuda.pagelocked_empty((b,), trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
            self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
            self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
            self.stream = cuda.Stream()
        finally:
            self._context.pop()

    def score(self, images, batch_size: int | None = None) -> list[float]:
        """Paths, PIL images or HxWx3 uint8 arrays (one or a list) -> one float per image."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        from rali_edge.images import open_image

        step = min(batch_size or self.info.batch.max, self.info.batch.max)
        scores: list[float] = []
        for start in range(0, len(images), step):
            batch = np.concatenate([self.preprocess.views_array(open_image(x)) for x in images[start : start + step]])
            scores += self.preprocess.pool(self.score_pixels(batch)).tolist()
        return scores

    def score_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [N, 3, H, W] -> float32 scores [N], one per row (per view)."""
        if len(pixels) == 0:
            return np.zeros(0, np.float32)
        return self.info.batch.run_chunks(np.ascontiguousarray(pixels, dtype=np.float32), self._run, np.concatenate)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        """One chunk within the profile (run_chunks has padded it to batch.min)."""
        cuda, m = self.cuda, pixels.shape[0]
        self.host_in[:m] = pixels
        self._context.push()
        try:
            self.context.set_input_shape(self.input_name, (m, *pixels.shape[1:]))
            self.context.set_tensor_address(self.input_name, int(self.dev_in))
            self.context.set_tensor_address(self.output_name, int(self.dev_out))
            cuda.memcpy_htod_async(self.dev_in, self.host_in[:m], self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RaliEdgeError("TensorRT execute_async_v3 failed (see the TensorRT messages above)")
            cuda.memcpy_dtoh_async(self.host_out[:m], self.dev_out, self.stream)
            self.stream.synchronize()
        finally:
            self._context.pop()
        return self.host_out[:m].astype(np.float32)

    def close(self) -> None:
        if getattr(self, "_context", None) is not None:
            self._context.push()
            try:
                self.dev_in.free()
                self.dev_out.free()
                self.context = self.engine = None
            finally:
                self._context.pop()
                self._context.detach()
                self._context = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------ backend
def cuda_index(device: str) -> int:
    """cuda -> 0, cuda:N -> N; TensorRT has no CPU execution, so "cpu" means the first GPU."""
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"--device {device}: expected cuda or cuda:N") from None
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: TensorRT engines run on cuda or cuda:N")
    return 0


class TensorRTBackend(Backend):
    name = "tensorrt"
    options = {"workspace_gib": "--workspace", "timing_cache": "--timing-cache", "typing": "--typing",
               "keep_onnx": "--keep-onnx"}
    requires = ("tensorrt",)
    install = "pip install 'rali-edge[tensorrt]'; on Jetson, JetPack's python3-libnvinfer"

    def auto_precisions(self, device: str, dtype: str) -> list[str]:
        if not str(device).startswith("cuda"):
            return []
        return {"auto": ["fp16", "fp32"], "fp32": ["fp32"], "fp16": ["fp16"], "bf16": ["bf16"]}.get(dtype, [])

    def build_steps(self, request: BuildRequest) -> int:
        return 2  # export ONNX, build the plan

    def default_device(self) -> str:
        return "cuda"

    def run_device(self, device: str | None) -> str:
        return f"cuda:{cuda_index(device or 'cuda')}"

    def default_precision(self, device: str) -> str:
        return "fp16"

    def check_request(self, request: BuildRequest) -> None:
        cuda_index(request.device)
        import_tensorrt()  # a missing TensorRT is exit 4 with install advice, before minutes of export

    def runtime(self, device: str) -> RuntimeInfo:
        return tensorrt_runtime(cuda_index(device))

    def opset(self) -> int:
        return ONNX_OPSET

    def name_parts(self, runtime: RuntimeInfo, opset: int | None) -> list[str]:
        return [f"trt{major_minor(runtime.tensorrt_version)}", runtime.compute_capability or "smNA"]

    def compatibility(self, built: RuntimeInfo, here: RuntimeInfo) -> tuple[list[str], list[str]]:
        problems, warnings = [], []
        if base_version(built.tensorrt_version) != base_version(here.tensorrt_version):
            problems.append(
                f"it was built with TensorRT {built.tensorrt_version}, this machine has TensorRT "
                f"{here.tensorrt_version or '(none)'}; TensorRT plans only load in the version that built them"
            )
        if built.compute_capability != here.compute_capability:
            problems.append(
                f"it was built for a GPU of compute capability {built.compute_capability} ({built.gpu_name}), "
                f"this GPU is {here.compute_capability or '(none)'} ({here.gpu_name or 'no GPU found'})"
            )
        elif built.gpu_name and here.gpu_name and built.gpu_name != here.gpu_name:
            warnings.append(
                f"engine tuned on {built.gpu_name}, running on {here.gpu_name} (same compute capability: it "
                "loads, but kernels were timed on the other GPU; rebuild here for best speed)"
            )
        problems += same_platform(built, here)
        if (built.cuda_version and here.cuda_version
                and major_minor(built.cuda_version).split(".")[0] != major_minor(here.cuda_version).split(".")[0]):
            warnings.append(f"built with CUDA {built.cuda_version}, running with CUDA {here.cuda_version}")
        return problems, warnings

    def build(self, load_model, path: Path, request: BuildRequest, info: EngineInfo, progress, written: list[Path]) -> None:
        from rali_edge.engines.tensorrt_build import build_plan

        build_plan(load_model, path, request, info, progress, written, self.build_steps(request))

    def open(self, path: Path, info: EngineInfo, device: str) -> TensorRTEncoder:
        return TensorRTEncoder(path, info, device=device)


BACKEND = TensorRTBackend()


__all__ = ["BACKEND", "DRIVER_HINT", "INSTALL_HINT", "TensorRTEncoder", "TensorRTScorer", "cuda_index", "graph_failure",
           "import_tensorrt", "on_gpu", "tensorrt_major", "tensorrt_runtime"]
