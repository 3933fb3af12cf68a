"""Images in, quality scores out: `rali_edge.load(...)` returns a Scorer.

A Scorer = preprocessing + an encoder backend + the folded RALI head. The encoder backend is
plain PyTorch here, or an engine (ONNX Runtime, AOTInductor, TensorRT) from rali_edge.engines; an engine may
also contain the head (`outputs == "score"`), in which case the scorer skips its own.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from rali_edge.engines.backends import BACKENDS, default_backend
from rali_edge.errors import EngineMismatchError, ImageError, MissingDependencyError, ModelFormatError, RaliEdgeError, UsageError
from rali_edge.images import open_image
from rali_edge.head import rali_head_torch
from rali_edge.model import DTYPES, RaliModel
from rali_edge.model_file import Manifest, load_model, read_manifest
from rali_edge.outputs import Field
from rali_edge.preprocess import PreprocessConfig, Preprocessor, read_views

ENGINE_DTYPES = ("int8",)  # only as an engine (backend auto or onnx)
HEADS = ("auto", "triton", "torch")


DEFAULT_MODEL = "default"  # the built-in model's name wherever a model is accepted


def default_model_path() -> Path:
    """The small built-in model shipped inside the package (see rali_edge/training/)."""
    return Path(str(resources.files("rali_edge") / "assets" / "default-model"))


def model_path(model: str | Path | None) -> Path:
    """A model argument -> its folder: None or "default" is the built-in model (a folder of that
    name is `./default`), anything else a model folder."""
    return default_model_path() if model is None or str(model) == DEFAULT_MODEL else Path(model)


def is_default_model(model: str | Path | None) -> bool:
    return model_path(model).resolve() == default_model_path().resolve()


class EncoderBackend(Protocol):
    """Runs the encoder on a batch of preprocessed pixels [B, 3, H, W].

    `outputs` says what comes back: "class_token" ([B, D], before the post-layernorm; the
    scorer applies its head) or "score" ([B], the head ran inside the engine).
    """

    outputs: str
    device: torch.device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


# On a CPU, the tokens one encoder call takes at most. Past a few thousand rows a GEMM gains
# nothing, and the activations fall out of the caches. On the encoder alone, the built-in model (65 tokens a view) ran
# 256 views per call at 18 ms per photograph and 32 at 11 ms; ViT-L in bf16 (577 tokens) ran 16
# views per call at 0.74 s per view and 1 to 8 at about 0.5 s (2 cores, an Intel Xeon with AMX).
CPU_TOKENS_PER_CALL = 2048


class TorchEncoder:
    """The encoder in eager PyTorch, its matmuls in the chosen dtype (Encoder.to_mixed: residual
    stream and layernorms stay fp32). On a CPU it runs a batch in calls of at most
    CPU_TOKENS_PER_CALL tokens; a GPU takes the batch whole."""

    outputs = "class_token"

    def __init__(self, model: RaliModel, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.encoder = model.encoder.to(device=device).to_mixed(dtype).eval()
        tokens = self.encoder.config.num_patches + 1
        self.rows_per_call = max(1, CPU_TOKENS_PER_CALL // tokens) if device.type == "cpu" else None

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        if self.rows_per_call is None or len(pixels) <= self.rows_per_call:
            return self.encoder.class_token(pixels)
        return torch.cat([self.encoder.class_token(chunk) for chunk in pixels.split(self.rows_per_call)])


@dataclass
class FileResult:
    path: str
    score: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "score": self.score} if self.error is None else {"path": self.path, "error": self.error}


# The rows `rali-edge score` writes (rali_edge.outputs): a score, or the error that kept a file from one.
SCORES = (Field("path"), Field("score", float, 6), Field("error"))


def score_table(rows: list[dict]) -> str:
    """Score rows for people: the score (or "error"), the path, and the error's reason."""
    lines = [f"{'score':>7}  path"]
    for r in rows:
        error = r.get("error") or (None if r.get("score") is not None else "no score")
        shown = f"{r['score']:7.3f}" if error is None else "  error"
        lines.append(f"{shown}  {r['path']}" + (f"  ({error})" if error else ""))
    return "".join(line + "\n" for line in lines)


@dataclass
class PipelineStats:
    """Where a score_files run spent its time: the encoder's calls (batching and copies included),
    the waits for decoded images, and the whole run (time spent by the caller between results
    included)."""

    encoder_s: float = 0.0
    waiting_s: float = 0.0
    wall_s: float = 0.0

    @property
    def encoder_busy(self) -> float:
        return self.encoder_s / self.wall_s if self.wall_s else 0.0

    def bottleneck(self) -> str:
        """One line: how busy the encoder was, and what bound the run."""
        busy = f"encoder busy {100 * self.encoder_busy:.0f}% of the run"
        if self.wall_s and self.waiting_s > 0.1 * self.wall_s:
            return (f"{busy}; decoding was the bottleneck (the encoder waited for images "
                    f"{100 * self.waiting_s / self.wall_s:.0f}% of the time: more --workers or cores would help)")
        return f"{busy}; the encoder was the bottleneck (decoding kept up)"


class Scorer:
    def __init__(
        self,
        model: RaliModel,
        manifest: Manifest,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        head: str = "auto",
        encoder: EncoderBackend | None = None,
    ):
        self.manifest = manifest
        self.device = torch.device(device)
        self.dtype_name = dtype
        # What load() ran: the backend's name, its engine file, and auto's Verdict when auto chose.
        self.backend, self.engine, self.verdict = "torch", None, None
        self.preprocess = Preprocessor(PreprocessConfig.from_dict(manifest.preprocess))
        self.encoder = encoder or TorchEncoder(model, self.device, DTYPES[dtype])
        # The head stays in float32 whatever the encoder's dtype: it is tiny, and the softmax over
        # prototype similarities is where low precision would show in the score.
        self.head = model.head.with_impl(head_impl(head, self.encoder.device)).to(self.encoder.device).float()

    @property
    def model_sha256(self) -> str:
        return self.manifest.weights_sha256

    # -- tensors ---------------------------------------------------------------------------
    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, return_weights: bool = False):
        """Preprocessed pixels [B * V, 3, H, W], as `self.preprocess(images)` makes them (V views per
        image, see PreprocessConfig) -> scores [B] (float32, on the encoder's device): the mean of
        each image's view scores (and of their prototype weights, which give that mean)."""
        if return_weights:
            scores, weights = self.score_views(pixels, return_weights=True)
            return self.preprocess.pool(scores), self.preprocess.pool(weights)
        return self.preprocess.pool(self.score_views(pixels))

    @torch.inference_mode()
    def score_views(self, pixels: torch.Tensor, return_weights: bool = False):
        """Preprocessed pixels [N, 3, H, W] -> one score per row (per view, not pooled)."""
        out = self.encoder(pixels)
        if self.encoder.outputs == "score":
            if return_weights:
                raise RaliEdgeError("this engine contains the head and cannot return prototype weights")
            return out.float()
        return self.head(out, return_weights=return_weights)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings, one per row of `pixels` (per view) [N, E] (needs the
        PyTorch encoder)."""
        if not isinstance(self.encoder, TorchEncoder):
            raise RaliEdgeError("embeddings need the torch backend")
        enc = self.encoder.encoder
        return enc.embed(pixels.to(self.device, self.encoder.dtype)).float()

    # -- images ----------------------------------------------------------------------------
    def score(self, inputs, batch_size: int = 16) -> list[float]:
        """One image or a list of them -> one float per image. An image is a path (or URI), a PIL
        image, an HxWx3 uint8 RGB array, or a torch tensor of RGB pixels as pyiqa takes them:
        [3, H, W], or [B, 3, H, W] for B images, float in [0, 1] or uint8. Each is preprocessed as
        the model says (its views), `batch_size` images per encoder call. Preprocessed views
        (what `self.preprocess` makes) go to `score_pixels`. A bad image, or anything else, raises
        ImageError saying what is accepted; `score_files` goes on past bad files."""
        images = _as_images(inputs)
        scores: list[float] = []
        for start in range(0, len(images), batch_size):
            batch = [open_image(x) for x in images[start : start + batch_size]]
            scores += self.score_pixels(self.preprocess(batch)).tolist()
        return scores

    def score_arrays(self, frames: list[np.ndarray]) -> list[float]:
        """RGB uint8 HxWx3 frames (e.g. from a camera) -> scores, in one encoder call."""
        return self.score_pixels(self.preprocess.arrays_to_tensor(frames)).tolist()

    def score_files(self, paths: Iterable[str], batch_size: int = 16, workers: int | None = None,
                    stats: PipelineStats | None = None) -> Iterator[FileResult]:
        """Score files, yielding one FileResult per path in input order; a file that cannot be read
        yields its error and the others go on. `workers` threads (default: default_workers())
        decode ahead of the encoder, at most a batch and two images per thread ahead, so memory
        stays flat however slow the encoder is; `paths` may be a lazy iterable. `stats`, if given,
        is filled in as the run goes: how busy the encoder was, and which stage bound the run."""
        workers = max(1, workers or default_workers())
        stats = stats if stats is not None else PipelineStats()
        started = time.perf_counter()

        def load(path):
            views, error = read_views(self.preprocess, path)
            return path, None if views is None else torch.from_numpy(views), error

        todo = iter(paths)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoding = deque(pool.submit(load, p) for p in islice(todo, batch_size + 2 * workers))
            batch: list[tuple[str, torch.Tensor]] = []
            pending: list[FileResult] = []  # results held back so that output stays in input order
            while decoding:
                waited = time.perf_counter()
                path, pixels, error = decoding.popleft().result()
                stats.waiting_s += time.perf_counter() - waited
                for p in islice(todo, 1):
                    decoding.append(pool.submit(load, p))
                if error is not None:
                    pending.append(FileResult(path, error=error))
                else:
                    pending.append(FileResult(path))
                    batch.append((path, pixels))
                if len(batch) == batch_size:
                    yield from self._flush(batch, pending, stats)
                    batch, pending = [], []
                stats.wall_s = time.perf_counter() - started
            yield from self._flush(batch, pending, stats)
        stats.wall_s = time.perf_counter() - started

    def _flush(self, batch, pending, stats: PipelineStats) -> Iterator[FileResult]:
        if batch:
            start = time.perf_counter()
            views = [p for _, p in batch]
            pixels = None
            if self.device.type == "cuda":  # pinned: the copy to the GPU needs no staging copy
                pixels = torch.empty((sum(len(v) for v in views), *views[0].shape[1:]), dtype=views[0].dtype,
                                     pin_memory=True)
            pixels = torch.cat(views, out=pixels)  # gathered once, straight into the pinned buffer on CUDA
            scores = self.score_pixels(pixels).tolist()  # .tolist() waits for the device: the whole call is timed
            stats.encoder_s += time.perf_counter() - start
            it = iter(scores)
            for r in pending:
                if r.error is None:
                    r.score = next(it)
        yield from pending



def _as_images(inputs) -> list:
    """Scorer.score's argument as a list of single images, image tensors as HxWx3 uint8 arrays."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        return [tensor_image(t) for t in inputs]
    if isinstance(inputs, np.ndarray) and inputs.ndim == 4:  # a batch of HxWx3 arrays
        return list(inputs)
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    return [tensor_image(x) if isinstance(x, torch.Tensor) else x for x in inputs]


def tensor_image(t: torch.Tensor) -> np.ndarray:
    """An RGB image tensor, [3, H, W], float in [0, 1] or uint8 -> HxWx3 uint8 (floats rounded)."""
    views = "; preprocessed views go to Scorer.score_pixels"
    if t.ndim != 3 or t.shape[0] != 3:
        raise ImageError(f"<tensor>: image tensors are [3, H, W] or [B, 3, H, W] RGB, not {list(t.shape)}{views}")
    t = t.detach().cpu()
    if t.is_floating_point():
        low, high = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
        if low < 0 or high > 1:
            raise ImageError(f"<tensor>: float image tensors hold values in [0, 1], these run from {low:.3g} to "
                             f"{high:.3g}{views}")
        t = (t * 255).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ImageError(f"<tensor>: image tensors are float in [0, 1] or uint8, not {t.dtype}")
    return t.permute(1, 2, 0).contiguous().numpy()


def default_workers() -> int:
    """Decoding threads of score_files: one per core this process may use, up to 32 (JPEG decoding
    and PIL's resizes release the GIL, so threads decode in parallel)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(32, cores))


def head_impl(head: str, device: torch.device):
    """The head's implementation for --head `head` on `device`: rali_head_torch, or the fused
    Triton kernel (auto: on CUDA when Triton is installed)."""
    if head not in HEADS:
        raise UsageError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if head == "torch" or (head == "auto" and device.type != "cuda"):
        return rali_head_torch
    try:
        import triton  # noqa: F401
    except ImportError:
        if head == "auto":
            return rali_head_torch
        raise MissingDependencyError("--head triton needs the `triton` package (pip install triton)") from None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise MissingDependencyError(
            "--head triton needs a CUDA GPU; to run the kernel on a CPU (slowly, for checking), "
            "set TRITON_INTERPRET=1 in the environment"
        )
    use_jetpack_ptxas()
    from rali_edge.kernels.rali_head import rali_head_triton

    return TritonOrTorch(rali_head_triton) if head == "auto" else rali_head_triton


def use_jetpack_ptxas(root: str = "/", environ=os.environ) -> str | None:
    """On a Jetson, compile Triton kernels with JetPack's ptxas: PyPI's aarch64 Triton brings a
    newer one whose cubins JetPack's driver may refuse. Leaves a TRITON_PTXAS_PATH that is set."""
    ptxas = Path(root) / "usr/local/cuda/bin/ptxas"
    if "TRITON_PTXAS_PATH" not in environ and (Path(root) / "etc/nv_tegra_release").exists() and ptxas.exists():
        environ["TRITON_PTXAS_PATH"] = str(ptxas)
    return environ.get("TRITON_PTXAS_PATH")


class TritonOrTorch:
    """--head auto on CUDA: the fused Triton kernel until a call of it fails (a ptxas or driver
    that refuses its cubin, a GPU it was not built for), then the eager head from that call on,
    with one note on stderr: scoring goes on rather than stopping at the first image."""

    def __init__(self, kernel: Callable):
        self.kernel, self.impl = kernel, kernel

    @property
    def __name__(self) -> str:  # what RaliHead.impl_name reports: the head that runs now
        return self.impl.__name__

    def __call__(self, *args, **kwargs):
        if self.impl is self.kernel:
            try:
                return self.kernel(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the kernel: the eager head computes the same
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                print(f"note: the Triton head failed ({type(e).__name__}: {first_line}); using the eager "
                      f"PyTorch head (--head torch to skip the kernel, --head triton to see the error)",
                      file=sys.stderr)
                self.impl = rali_head_torch
        return self.impl(*args, **kwargs)


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, the devices rali-edge runs on; anything else is a usage error before any work."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: rali-edge runs on cpu, cuda or cuda:N")


def load(
    model: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    backend: str | None = None,
    engine: str | Path | None = None,
    head: str = "auto",
    cache: bool = True,
    progress=None,
) -> Scorer:
    """Load a rali-edge model folder (None or "default": the built-in model) as a Scorer.

    backend "auto" (the default; RALI_EDGE_BACKEND changes it) runs what this machine measured
    fastest among the ways to run `dtype` on `device` whose scores stay within 1e-3 of eager fp32
    (engines/auto.py), building its engine on first use, fidelity-checked, into the engine cache
    (engines/cache.py; cache=False: no engine is read or written, eager PyTorch runs). "torch"
    runs the encoder in PyTorch in `dtype` (auto: fp32); "aoti", "tensorrt" and "onnx" run a
    built engine (`engine=PATH`, see `rali-edge build`), checked against this model; an engine
    given without a backend runs with the backend its sidecar names, and `engine` may be a folder
    that holds one. dtype "int8" is an ONNX Runtime engine (CPU). `progress`: an
    engines.progress.Progress for what auto measures and builds on first use (default: stderr).
    """
    backend = backend or default_backend()
    _check_options(device, dtype, backend)
    path = model_path(model)
    manifest = read_manifest(path)
    verdict = None  # auto's, when auto chose
    if engine is not None:
        backend, dtype, engine = _given_engine(engine, backend, dtype)
    elif backend == "auto":
        from rali_edge.engines import auto

        backend, dtype, engine, verdict = auto.resolve(path, manifest, device, dtype, cache, progress)
    elif backend != "torch":
        raise UsageError(f"backend {backend!r} needs an engine file (--engine PATH); build one with `rali-edge build`")
    elif dtype in ENGINE_DTYPES:
        raise UsageError(f"--dtype {dtype} runs as an ONNX engine: use --backend auto (with the engine cache) or "
                         f"build one: rali-edge build MODEL --target onnx --precision {dtype}")
    else:
        dtype = "fp32" if dtype == "auto" else dtype
    # With an engine, only the head's weights are read: the engine holds the encoder's.
    rali_model, manifest = load_model(path, encoder=engine is None)
    encoder = None if engine is None else _open_engine(path, manifest, backend, dtype, engine, device, progress)
    scorer = Scorer(rali_model, manifest, device=device, dtype=dtype, head=head, encoder=encoder)
    scorer.backend, scorer.engine, scorer.verdict = backend, engine, verdict
    return scorer


def _check_options(device: str, dtype: str, backend: str) -> None:
    check_device(device)
    if dtype != "auto" and dtype not in DTYPES and dtype not in ENGINE_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join([*DTYPES, *ENGINE_DTYPES])}")
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MissingDependencyError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")


def _given_engine(engine, backend: str, dtype: str):
    """(backend, precision, file) of an engine given by name: it runs in the precision it was built in."""
    from rali_edge.engines.naming import read_sidecar, resolve_engine

    engine = resolve_engine(engine, None if backend in ("auto", "torch") else backend)
    info = read_sidecar(engine)
    if dtype not in ("auto", info.precision):
        raise UsageError(f"--dtype {dtype}: the engine {engine} was built in {info.precision}; leave --dtype out, or "
                         f"build one in {dtype} (rali-edge build MODEL --precision {dtype})")
    return (info.target if backend in ("auto", "torch") else backend), info.precision, engine


def _open_engine(path: Path, manifest, backend: str, dtype: str, engine: Path, device: str, progress):
    """The engine as the scorer's encoder, checked against the model (model_ref: the rebuild command in
    a mismatch error names this model folder). A cached engine that will not open is built again, once."""
    from rali_edge.engines import cache as engine_cache
    from rali_edge.engines.backends import open_engine

    try:
        return open_engine(backend, engine, manifest, device=device, model_ref=str(path))
    except (EngineMismatchError, ModelFormatError):
        if engine.parent.parent != engine_cache.cache_dir():
            raise
        engine_cache.evict(engine)  # a corrupt cached file
        rebuilt = engine_cache.cached_engine(path, manifest, backend, dtype, device, progress)
        return open_engine(backend, rebuilt, manifest, device=device, model_ref=str(path))
