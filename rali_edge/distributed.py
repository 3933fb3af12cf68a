"""Scoring image corpora on Ray Data: files read and decoded in CPU tasks, scored in a pool of
actors that each hold one model, one row per input.

    import ray, rali_edge.distributed as rd
    ds = ray.data.read_parquet("s3://bucket/corpus.parquet")          # any dataset with a path column
    rd.score_dataset(ds, "default", actors=4).write_parquet("s3://bucket/scores")

Every input gives exactly one row (`path`, `score`, `error`): a file that cannot be read is a row
with its error and no score. Ray retries the tasks of an actor or node that dies (Ray Data
restarts pool actors and retries their tasks, and a retried task's output replaces the lost
one's), so a killed actor neither loses nor duplicates rows. Decoding is the same code as the
local path's (`preprocess.read_views`), and so are the scores: each actor runs `rali_edge.load`.

The CLI (`rali-edge score --ray ADDRESS`) reads the rows back in input order through
`score_paths`, which checks that order row by row, and writes them as the local path does
(streamed formats, --resume).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np

from rali_edge.errors import MissingDependencyError, ScoringError, UsageError

DEFAULT_ACTORS = 1
DEFAULT_BATCH = 16  # images per decoding task and per call of an actor
# What each asks of Ray's logical CPUs, at most: a decoding task (JPEG decoding, or a wait on object
# storage) and a scoring actor (its encoder's threads; on a GPU, its feeding thread). Less when the
# cluster is small: `_requests`.
DECODE_CPUS = 0.5
ACTOR_CPUS = 1.0
# A run that gets no row back for this long stops, and says what it asked of the cluster and what
# is free there, instead of waiting forever. Long enough for every actor's first model load,
# engine build included (an ONNX ViT-L: a minute or two on a CPU).
STALL_S = 600.0


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data is an extra of ray: `ray[data]`)
    except ImportError:
        raise MissingDependencyError("--ray needs Ray Data: pip install 'rali-edge[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str):
    """Connect to the Ray cluster `address` names for the duration of the block: 'auto' (the one
    RAY_ADDRESS names or that runs on this machine), 'local' (a new one for this run, stopped
    after it), or an address (HOST:PORT, ray://HOST:PORT). A session already connected is used
    as it is and left running."""
    ray = _ray()
    if ray.is_initialized():
        yield
        return
    if address not in ("auto", "local"):
        _check_reachable(address)
    # ray.init puts its own SIGTERM handler (sys.exit) in place of the caller's: the CLI's makes
    # SIGTERM stop a run as Ctrl-C does, keeping its rows, so it is put back.
    term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    with _without_ray_log_lines():
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR", configure_logging=True)
        except ConnectionError as e:
            hint = "start one with `ray start --head`, or use --ray local" if address == "auto" else "is it running?"
            raise UsageError(f"--ray {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0][:160]}); "
                             f"{hint}") from None
        finally:
            if term is not None:
                signal.signal(signal.SIGTERM, term)
        try:
            yield
        finally:
            ray.shutdown()


# A line of Ray's C++ core, as its logging library writes it on this process's stderr:
# "[2026-12-06 23:17:32,582 E 21291 21291] core_worker.cc:2465: ...".
RAY_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \w+\.cc:\d+: ")


@contextlib.contextmanager
def _without_ray_log_lines():
    """Drop the lines Ray's C++ core writes on stderr while a session is open (a harmless "E" line
    about actor restarts on every run, among others): rali-edge says what goes wrong in its own
    words, and Ray's logs stay in its session folder (/tmp/ray/session_latest/logs). Everything
    else written to stderr passes, in order. Only where stderr is a file descriptor."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def forward():
        pending = b""
        while chunk := os.read(read_end, 65536):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            kept = b"".join(line + b"\n" for line in lines if not RAY_LOG_LINE.match(line))
            if pending and not pending.startswith(b"["):  # a progress bar's \r, a prompt: at once
                kept, pending = kept + pending, b""
            if kept:
                _write(saved, kept)
        if pending:
            _write(saved, pending)
        os.close(read_end)
        os.close(saved)

    def _write(target: int, data: bytes) -> None:
        try:  # stderr's reader gone (`2>&1 | head`): drop the lines, keep draining the pipe
            os.write(target, data)
        except OSError:
            pass

    # A daemon: Ray's own processes inherit the pipe and may hold it open after the session.
    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)  # the pipe's last writer here is gone: the thread drains it, closes it and ends
        thread.join(timeout=2)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray keeps retrying an address that does not answer for minutes; ask the port once first."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise UsageError(f"--ray {address}: give auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"--ray {address}: cannot connect to a Ray cluster there ({e.strerror or e}); "
                         "is it running (`ray status` on its head node)?") from None


def score_dataset(ds, model=None, path_column: str = "path", *, backend: str = "auto", dtype: str = "auto",
                  head: str = "auto", device: str | None = None, batch_size: int = DEFAULT_BATCH, actors: int = DEFAULT_ACTORS,
                  gpus_per_actor: float = 0.0, threads_per_actor: int | None = None, cache: bool = True):
    """A ray.data.Dataset with a column of image paths or URIs -> a Dataset with the columns path,
    score (float; null for an error row) and error (null for a scored row), one row per input.

    `model`: a name or a folder every node can read (the built-in model ships in the package).
    Decoding runs in CPU tasks (`batch_size` images each), scoring in `actors` actors, each with
    one model loaded by `rali_edge.load(model, device, dtype, backend, head=head)` (with backend auto, each
    node builds or reuses its engine in its own engine cache) and `gpus_per_actor` GPUs (device
    then defaults to cuda). `threads_per_actor`: the encoder's CPU threads (default: a node's
    cores divided among the actors, as if all ran on one node)."""
    from rali_edge.model_file import read_manifest
    from rali_edge.scoring import model_path

    if path_column not in ds.schema().names:
        raise UsageError(f"the dataset has no column {path_column!r} (its columns: {', '.join(ds.schema().names)})")
    ray = _ray()
    actor_cpus, decode_cpus = _requests(ray.cluster_resources(), actors, gpus_per_actor)
    preprocess = read_manifest(model_path(model)).preprocess
    device = device or ("cuda" if gpus_per_actor else "cpu")
    decoded = ds.map_batches(_decode_batch, fn_kwargs={"preprocess": preprocess, "path_column": path_column},
                             batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus)
    return decoded.map_batches(
        _ScoreActor, fn_constructor_kwargs=dict(model=model, backend=backend, dtype=dtype, head=head, device=device, cache=cache,
                                                threads=threads_per_actor or max(1, _node_cpus(ray) // actors)),
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus, num_gpus=gpus_per_actor or None)


def _requests(cluster: dict, actors: int, gpus_per_actor: float) -> tuple[float, float]:
    """(logical CPUs per scoring actor, per decoding task) on a cluster of `cluster`'s resources.

    The actors together leave room for a decoding task, whatever their count: actors that took
    every CPU would wait forever for images no task could decode (Ray's CPUs are counts for the
    scheduler, not cores: an actor's threads still use the cores it shares). A decoding task asks
    for less than an actor, never the same, which keeps Ray from fusing decoding into the actors
    (it fuses operators whose requests are equal): it then runs on the free cores beside them.
    A request the cluster cannot meet (more GPUs than it has) is refused at once."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if gpus_per_actor and actors * gpus_per_actor > gpus + 1e-9:
        raise UsageError(f"--ray-actors {actors} with --ray-gpus {gpus_per_actor:g} ask for {actors * gpus_per_actor:g} "
                         f"GPUs; the Ray cluster has {gpus:g} (and {cpus:g} CPUs): lower them, or add GPU nodes")
    if cpus <= 0:
        raise UsageError("the Ray cluster has no CPUs for decoding and scoring")
    decode = min(DECODE_CPUS, cpus / 4)
    actor = min(ACTOR_CPUS, (cpus - decode) / actors)
    if abs(actor - decode) < 1e-3:
        decode = actor / 2
    return _down(actor), _down(decode)  # Ray takes 4 decimals: rounded down, they still fit


def _down(x: float) -> float:
    return math.floor(x * 1e4) / 1e4


def score_paths(paths: Iterable[str], model=None, stall_s: float = STALL_S, **options) -> Iterator:
    """Paths -> FileResults in input order, scored on the connected Ray cluster (see ray_session);
    `options` as score_dataset's. Raises ScoringError if a row ever comes back out of order,
    missing or twice, which Ray's guarantees rule out: the check makes "one row per input" a fact
    of every run, not an assumption; and when no row comes back for `stall_s` seconds, saying what
    was asked of the cluster and what is free there."""
    ray = _ray()
    from rali_edge.scoring import FileResult

    paths = list(paths)
    if not paths:
        return
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # rows come back in input order
    ctx.enable_progress_bars = False  # the CLI draws its own
    expected = iter(paths)
    data_log = logging.getLogger("ray.data")  # it would log the failure's whole traceback; we say it in one line
    level = data_log.level
    data_log.setLevel(logging.CRITICAL)
    try:
        # One block per batch: Ray's default (200 blocks) would bundle blocks into batches of 16
        # and a remainder, and every remainder is an extra, small call of the encoder.
        batch_size = options.get("batch_size", DEFAULT_BATCH)
        blocks = -(-len(paths) // batch_size)
        items = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        # No more actors than batches: the others would load a model to wait.
        actors = min(options.pop("actors", DEFAULT_ACTORS), blocks)
        ds = score_dataset(items, model, actors=actors, **options)
        for row in _rows(ds, stall_s, lambda: _stalled(ray, stall_s, actors, options.get("gpus_per_actor", 0.0))):
            want = next(expected, None)
            if row["path"] != want:
                raise ScoringError(f"Ray returned a row for {row['path']!r} where {want!r} was due: rows lost or duplicated")
            yield FileResult(row["path"], score=row["score"], error=row["error"])
    except ray.exceptions.RayError as e:  # an actor that cannot load the model, a node lost for good...
        raise _our_error(e) from None
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        data_log.setLevel(level)
    missing = next(expected, None)
    if missing is not None:
        raise ScoringError(f"Ray returned no row for {missing!r} and the rest of the inputs")


class _Stop(BaseException):
    """Raised inside the thread that pulls a dataset's rows, to end it (see _rows)."""


def _rows(ds, stall_s: float, stalled) -> Iterator[dict]:
    """`ds.iter_rows()`, pulled in a thread of its own so that a wait can time out: ScoringError
    (`stalled()`'s message) when no row comes for `stall_s` seconds. However this ends, the pull
    ends too: Ray Data shuts its execution down when its iteration is interrupted, as on Ctrl-C;
    a run left going would outlive the cluster (Ray then ends the process, a minute later)."""
    rows: queue.Queue = queue.Queue(maxsize=1024)
    end = object()
    iterating = threading.Event()  # _Stop is sent only while the pull is inside Ray Data's iteration

    def pull():
        try:
            iterating.set()
            for row in ds.iter_rows():
                rows.put(row)
            iterating.clear()
            rows.put(end)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed over to the caller's thread
            iterating.clear()
            rows.put(e)

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    try:
        while True:
            try:
                row = rows.get(timeout=stall_s)
            except queue.Empty:
                raise ScoringError(stalled()) from None
            if row is end:
                return
            if isinstance(row, BaseException):
                raise row
            yield row
    finally:
        _stop(thread, rows, iterating)


def _stop(thread: threading.Thread, rows: queue.Queue, iterating: threading.Event, timeout_s: float = 30.0) -> None:
    """End the pulling thread: _Stop raised in it at its next Python instruction (Ray Data waits for
    rows in a Python loop), its queue drained so that a put it waits in returns."""
    import ctypes

    if not thread.is_alive():
        return
    if iterating.is_set():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Stop))
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            rows.get_nowait()
        thread.join(0.05)


def _stalled(ray, stall_s: float, actors: int, gpus_per_actor: float) -> str:
    cluster, free = ray.cluster_resources(), ray.available_resources()
    actor_cpus, decode_cpus = _requests(cluster, actors, gpus_per_actor)

    def have(resources):
        return f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs"

    return (f"no row came back from Ray for {stall_s:.0f} s: {actors} scoring actors ask for {actor_cpus:g} CPUs"
            f"{f' and {gpus_per_actor:g} GPUs' if gpus_per_actor else ''} each and decoding tasks for "
            f"{decode_cpus:g} CPUs; the cluster has {have(cluster)}, of which {have(free)} are free (another job "
            f"holding them? `ray status` shows what waits); the rows before are kept")


def _our_error(e: Exception) -> Exception:
    """A failed Ray run as one line: our own error raised on a worker (a model that does not load
    is a ModelFormatError there, exit 3 here) as that error, anything else as a ScoringError."""
    from rali_edge import errors

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        name, sep, message = line.partition(": ")
        cls = getattr(errors, name.removeprefix("rali_edge.errors."), None) if name.startswith("rali_edge.errors.") else None
        if sep and isinstance(cls, type) and issubclass(cls, errors.RaliEdgeError):
            return cls(f"on a Ray worker: {message[:300]}")
    cause = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", line)), type(e).__name__)
    return ScoringError(f"the Ray run failed: {cause[:300]}")


def _decode_batch(batch: dict, preprocess: dict, path_column: str) -> dict:
    """A CPU task: paths -> their views as uint8 pixels (zeros where a file cannot be read) and
    errors. uint8, not the normalised float32: 4x fewer bytes through the object store, which on
    2 cores measured faster overall (20.3 against 23.1 images/s) even with the actor normalising."""
    from rali_edge.preprocess import Preprocessor, PreprocessConfig
    from rali_edge.preprocess import read_views

    pre = Preprocessor(PreprocessConfig.from_dict(preprocess))
    c = pre.config
    paths = [str(p) for p in batch[path_column]]
    views = np.zeros((len(paths), c.view_count, *c.crop, 3), dtype=np.uint8)
    errors = [""] * len(paths)  # "" for none: Ray's blocks would turn None in an object column into NaN
    for i, path in enumerate(paths):
        pixels, error = read_views(pre, path, normalized=False)
        if pixels is None:
            errors[i] = error
        else:
            views[i] = pixels
    return {"path": np.asarray(paths, dtype=object), "views": views, "error": np.asarray(errors, dtype=object)}


class _ScoreActor:
    """One model per actor; a batch of decoded views -> path, score, error."""

    def __init__(self, model, backend: str, dtype: str, head: str, device: str, cache: bool, threads: int):
        import torch

        from rali_edge.scoring import load

        # Ray gives a 1-CPU worker one thread (OMP_NUM_THREADS=1); the encoder gets the node's share
        # instead, time-shared with the decoding tasks, as the local pipeline's threads share the cores.
        torch.set_num_threads(threads)
        self.scorer = load(model, device=device, dtype=dtype, backend=backend, head=head, cache=cache,
                           progress=_quiet_progress())

    def __call__(self, batch: dict):
        import pyarrow as pa
        import torch

        errors = [str(e) or None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        scores: list = [None] * len(errors)
        if ok.any():
            views = batch["views"][ok]
            views = views.reshape(-1, *views.shape[2:])
            pre, device = self.scorer.preprocess, self.scorer.device
            if device.type == "cpu":
                pixels = torch.from_numpy(pre.normalize(views))
            else:  # the same table on the GPU: a quarter of the bytes cross to it
                pixels = pre.normalize_uint8(torch.from_numpy(views).to(device).permute(0, 3, 1, 2))
            for i, s in zip(np.flatnonzero(ok), self.scorer.score_pixels(pixels).tolist()):
                scores[i] = float(s)
        # An Arrow table, so that a missing score or error is a null (not NaN) in every writer.
        return pa.table({"path": pa.array([str(p) for p in batch["path"]], pa.string()),
                         "score": pa.array(scores, pa.float64()), "error": pa.array(errors, pa.string())})


def _node_cpus(ray) -> int:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return int(max((n["Resources"].get("CPU", 1) for n in nodes), default=1))


def _quiet_progress():
    from rali_edge.engines.progress import Progress

    return Progress(quiet=True)


__all__ = ["DEFAULT_ACTORS", "ray_session", "score_dataset", "score_paths"]
