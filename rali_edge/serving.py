"""`rali-edge serve`: quality scores over HTTP for other programs (`pip install 'rali-edge[serve]'`:
FastAPI on uvicorn).

    POST /score                    multipart files (field `file`, repeatable) or one image as the body
                                   -> [{"name", "score"} or {"name", "error"}, ...], in order
    POST /v2/models/rali/infer     the KServe v2 / Triton HTTP protocol: images as a BYTES tensor IMAGE
                                   (JSON, or Triton's binary extension) -> FP32 tensor SCORE
    GET  /v2, /v2/health/live, /v2/health/ready, /v2/models/rali, /v2/models/rali/ready
    GET  /healthz, /readyz (ready once the model is loaded and warm), /metrics (Prometheus)

Requests share encoder calls: decoded images wait in one bounded queue, and a batch is scored as
soon as it holds `max_batch` images or its first image has waited `max_delay_ms`. Decoding runs in
a pool of threads, off the event loop. Past `max_queue` waiting images a request gets 503 with
Retry-After at once.

Untrusted input never hurts the service: a body over `max_bytes` gets 413 (read no further); what
is not an image 415, a truncated, empty or too large one (RALI_MAX_PIXELS, read from the header,
before any pixel is decoded) 422; a client that sends too slowly is cut off after
`read_timeout_s` (408); a client that goes away stops costing anything (its images leave the
queue); an error inside scoring answers 500 to the requests of that batch only after each of
them was tried alone. Clients send bytes, never paths: nothing is read from the server's disk,
and URLs are fetched only for the schemes `allow_urls` names. With `api_key`, every route but the
health checks needs `Authorization: Bearer KEY`.
"""


import asyncio
import hmac
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rali_edge.errors import ImageError, MissingDependencyError, UsageError

MODEL_NAME = "rali"  # the model's name in the KServe v2 routes
API_KEY_ENV = "RALI_EDGE_API_KEY"


@dataclass
class ServeOptions:
    max_batch: int = 16  # images per encoder call
    max_delay_ms: float = 10.0  # how long the first image of a batch waits for others
    max_queue: int = 256  # images waiting to be scored; past it, 503
    max_bytes: int = 32 << 20  # a request's body
    max_images: int = 64  # per request
    read_timeout_s: float = 30.0  # between two chunks of a request's body (and a URL's whole read)
    body_timeout_s: float = 120.0  # a request's whole body
    max_connections: int = 512  # open connections; past it uvicorn answers 503
    decode_threads: int = 0  # 0: one per core
    allow_urls: tuple[str, ...] = ()  # schemes of URLs a client may ask the server to fetch (e.g. https)
    api_key: str | None = None

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.max_bytes < 1 or self.max_images < 1:
            raise UsageError("--max-batch, --max-queue, --max-bytes and --max-images must be at least 1")


def require_serving() -> None:
    """FastAPI, uvicorn, python-multipart and prometheus_client, or what to install."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"rali-edge serve needs {', '.join(missing)}: pip install 'rali-edge[serve]'")


# ---------------------------------------------------------------------------------- errors
class HTTPProblem(Exception):
    """An answer other than 200, with its status and one line saying why."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def image_status(e: ImageError) -> int:
    """415 for what is not an image at all, 422 for an image that cannot be used."""
    return 415 if "not an image file" in str(e) else 422


# ---------------------------------------------------------------------------------- metrics
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("rali_serve_requests", "Requests answered, by route and status.", ["route", "status"],
                                registry=r)
        self.images = Counter("rali_serve_images", "Images handled, by outcome (scored or error).", ["outcome"],
                              registry=r)
        self.errors = Counter("rali_serve_errors", "Errors, by kind.", ["kind"], registry=r)
        self.batch = Histogram("rali_serve_batch_images", "Images per encoder call.",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_wait = Histogram("rali_serve_queue_wait_seconds", "Time an image waited for its encoder call.",
                                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.latency = Histogram("rali_serve_request_seconds", "Request latency, by route.", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.queued = Gauge("rali_serve_queued_images", "Images waiting to be scored.", registry=r)


# ---------------------------------------------------------------------------------- batching
@dataclass
class _Item:
    views: np.ndarray  # one image's views, float32 [V, 3, H, W]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """One queue of decoded images shared by every request; one worker scores them in batches of
    at most `max_batch`, waiting at most `max_delay_s` for a batch to fill, in a thread of its own
    (the event loop never waits for the encoder). `score_views(pixels) -> scores` takes the views
    of several images stacked ([sum V, 3, H, W]) and gives one score per image."""

    def __init__(self, score_views: Callable[[np.ndarray], list[float]], options: ServeOptions, metrics: Metrics):
        self.score_views, self.options, self.metrics = score_views, options, metrics
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.waiting = 0  # images queued, not yet taken into a batch
        self.scorer = ThreadPoolExecutor(1, thread_name_prefix="rali-edge-score")
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        self.scorer.shutdown(wait=True)

    def reserve(self, n: int) -> None:
        """Room for `n` images, or 503 at once."""
        if self.waiting + n > self.options.max_queue:
            self.metrics.errors.labels("queue_full").inc()
            raise HTTPProblem(503, f"the server is busy: {self.waiting} images are waiting (at most "
                                   f"{self.options.max_queue}); try again shortly", {"Retry-After": "1"})
        self.waiting += n
        self.metrics.queued.set(self.waiting)

    def submit(self, views: np.ndarray) -> asyncio.Future:
        item = _Item(views, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(item)
        return item.future

    def release(self, n: int) -> None:
        self.waiting -= n
        self.metrics.queued.set(self.waiting)

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = batch[0].queued_at + self.options.max_delay_ms / 1000
            while len(batch) < self.options.max_batch:
                if not self.queue.empty():  # what is there joins at once, however late the batch is
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [item for item in batch if not item.future.done()]  # its client has gone: costs nothing
            if batch:
                await self._score(batch)

    async def _score(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.observe(now - item.queued_at)
        loop = asyncio.get_running_loop()
        try:
            # stacked in the scoring thread: megabytes of views copied on the event loop would hold up every request
            scores = await loop.run_in_executor(self.scorer, lambda: self.score_views(np.concatenate([i.views for i in batch])))
        except Exception:  # noqa: BLE001 - one bad image must not fail the others: each alone
            if len(batch) > 1:
                for item in batch:
                    await self._score([item])
                return
            self.metrics.errors.labels("scoring").inc()
            scores = None
        self.metrics.batch.observe(len(batch))
        for i, item in enumerate(batch):
            if item.future.done():
                continue
            if scores is None:
                item.future.set_exception(HTTPProblem(500, "scoring this image failed on the server"))
            else:
                item.future.set_result(float(scores[i]))


# ---------------------------------------------------------------------------------- the service
class Service:
    """Decoding, the batcher and the answers for a loaded Scorer; the HTTP routes (`create_app`)
    call it. Ready once its batcher runs and a first batch warmed the scorer up."""

    def __init__(self, scorer, options: ServeOptions):
        self.scorer, self.options = scorer, options
        self.metrics = Metrics()
        self.ready = False
        self.batcher: Batcher | None = None
        threads = options.decode_threads or len(os.sched_getaffinity(0))
        self.decoders = ThreadPoolExecutor(max(1, threads), thread_name_prefix="rali-edge-decode")
        self.fetchers = ThreadPoolExecutor(4, thread_name_prefix="rali-edge-fetch")  # --allow-urls

    async def start(self) -> None:
        """Start batching (the scorer was warmed up by `warm_up` before the port opened)."""
        self.batcher = Batcher(self._score_views, self.options, self.metrics)
        self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()
        self.decoders.shutdown(wait=False, cancel_futures=True)
        self.fetchers.shutdown(wait=False, cancel_futures=True)

    def warm_up(self) -> None:
        """One image scored before the port opens: ready means warm, and a scorer that cannot score
        is one line and exit code 3, not a server that answers 500."""
        from rali_edge.errors import ModelLoadError, RaliEdgeError

        try:
            self._score_views(self._views(_grey_png(), "warm-up"))
        except RaliEdgeError:
            raise
        except Exception as e:  # noqa: BLE001 - an engine or a device failing on its first batch
            raise ModelLoadError(f"the model cannot score ({type(e).__name__}: {str(e)[:300]})") from None

    def _score_views(self, pixels: np.ndarray) -> list[float]:
        import torch

        return self.scorer.score_pixels(torch.from_numpy(pixels)).tolist()

    def _views(self, data: bytes, name: str) -> np.ndarray:
        from rali_edge.images import open_image

        return self.scorer.preprocess.views_array(open_image(data, name))

    async def score_images(self, images: list[tuple[str, bytes]]) -> list[dict]:
        """(name, bytes) each -> {"name", "score"} or {"name", "error", "status"} each, in order."""
        if not images:
            raise HTTPProblem(400, "no image in the request: send multipart files (field `file`) or one image as the body")
        most = min(self.options.max_images, self.options.max_queue)  # more could never be taken: not "busy"
        if len(images) > most:
            raise HTTPProblem(413, f"{len(images)} images in one request; at most {most}")
        self.batcher.reserve(len(images))
        loop = asyncio.get_running_loop()
        futures: list = []
        try:
            decoded = await asyncio.gather(*(loop.run_in_executor(self.decoders, self._decode, name, data)
                                             for name, data in images))
            for views in decoded:
                futures.append(None if isinstance(views, HTTPProblem) else self.batcher.submit(views))
            results = []
            for (name, _), views, future in zip(images, decoded, futures):
                try:
                    if future is None:
                        raise views
                    results.append({"name": name, "score": await future})
                    self.metrics.images.labels("scored").inc()
                except HTTPProblem as e:
                    self.metrics.images.labels("error").inc()
                    results.append({"name": name, "error": e.message, "status": e.status})
            return results
        finally:
            for future in futures:  # a client that went away: its images leave the queue unscored
                if future is not None and not future.done():
                    future.cancel()
            self.batcher.release(len(images))

    def _decode(self, name: str, data: bytes):
        try:
            return self._views(data, name)
        except ImageError as e:
            kind = "not_an_image" if image_status(e) == 415 else "bad_image"
            self.metrics.errors.labels(kind).inc()
            return HTTPProblem(image_status(e), str(e))

    def check_url(self, url: str) -> None:
        """400 unless the server fetches URLs of this scheme (`allow_urls`)."""
        from urllib.parse import urlparse

        scheme = urlparse(url).scheme.lower()
        if scheme not in self.options.allow_urls:
            allowed = ", ".join(self.options.allow_urls) or "none: start the server with --allow-urls SCHEME"
            raise HTTPProblem(400, f"{url!r}: URLs of scheme {scheme or '(none)'!r} are not fetched (allowed: {allowed})")

    async def fetch(self, urls: list[str]) -> list[tuple[str, bytes]]:
        """The URLs' bytes, fetched at once in a small pool of their own (the decoders never wait
        on a remote), each at most max_bytes, all within read_timeout_s."""
        for url in urls:
            self.check_url(url)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.options.read_timeout_s
        reads = [loop.run_in_executor(self.fetchers, self._fetch_one, url, deadline) for url in urls]
        try:
            data = await asyncio.wait_for(asyncio.gather(*reads), self.options.read_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPProblem(408, f"the URLs did not arrive within {self.options.read_timeout_s:g} s") from None
        return list(zip(urls, data))

    def _fetch_one(self, url: str, deadline: float) -> bytes:
        """One read, no retries (a client is waiting): at most max_bytes, until the deadline."""
        limit, chunks, size = self.options.max_bytes, [], 0
        try:
            if url.lower().startswith(("http://", "https://")):
                import urllib.request  # redirects only to http, https or ftp: never to a file

                opened = urllib.request.urlopen(url, timeout=self.options.read_timeout_s)
            else:
                from rali_edge.storage import filesystem

                fs, path = filesystem(url)
                opened = fs.open(path, "rb")
            with opened as source:
                while chunk := source.read(min(1 << 20, limit + 1 - size)):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        raise HTTPProblem(413, f"{url}: over {limit} bytes")
                    if time.monotonic() > deadline:
                        raise HTTPProblem(408, f"{url}: did not arrive within {self.options.read_timeout_s:g} s")
        except HTTPProblem:
            raise
        except Exception as e:  # noqa: BLE001 - the remote's failure is the client's answer
            raise HTTPProblem(422, f"{url}: cannot fetch ({type(e).__name__}: {str(e)[:200]})") from None
        return b"".join(chunks)


def _grey_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- KServe v2
def parse_infer(body: bytes, header_length: int | None) -> tuple[list[bytes], bool]:
    """A KServe v2 infer request -> (the IMAGE tensor's elements, whether SCORE is wanted in
    binary). JSON with the tensor's data as strings, or Triton's binary extension: a JSON header of
    `header_length` bytes, then each binary input in order, a BYTES element being a 4-byte
    little-endian length and its bytes."""
    try:
        head = json.loads(body[:header_length] if header_length is not None else body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPProblem(400, "the inference request is not valid JSON") from None
    inputs = head.get("inputs") if isinstance(head, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HTTPProblem(400, 'give one input: {"name": "IMAGE", "datatype": "BYTES", "shape": [N], "data": [...]}')
    tensor = inputs[0]
    if tensor.get("name") != "IMAGE" or tensor.get("datatype") != "BYTES":
        raise HTTPProblem(400, f"the input must be IMAGE of datatype BYTES, not {tensor.get('name')!r} "
                               f"{tensor.get('datatype')!r}")
    size = _parameters(tensor).get("binary_data_size")
    if size is not None:
        if header_length is None or not isinstance(size, int) or header_length + size > len(body):
            raise HTTPProblem(400, "binary_data_size does not match the request's binary data")
        elements, raw, at = [], body[header_length:header_length + size], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise HTTPProblem(400, "a BYTES element's length is cut off")
            (n,) = struct.unpack_from("<I", raw, at)
            if at + 4 + n > len(raw):
                raise HTTPProblem(400, "a BYTES element is longer than the data sent")
            elements.append(raw[at + 4:at + 4 + n])
            at += 4 + n
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise HTTPProblem(400, "IMAGE's data must be a list of strings (or Triton's binary data)")
        elements = [d.encode("latin-1", errors="replace") for d in data]
    outputs = head.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise HTTPProblem(400, "outputs must be a list of objects")
    binary = any(_parameters(o).get("binary_data") is True for o in outputs)
    return elements, binary


def _parameters(tensor: dict) -> dict:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise HTTPProblem(400, "a tensor's parameters must be an object")
    return parameters


def infer_response(scores: list[float], binary: bool, request_id: str | None) -> tuple[bytes, dict]:
    """The SCORE tensor, as JSON or with Triton's binary extension."""
    out = {"name": "SCORE", "datatype": "FP32", "shape": [len(scores)]}
    head = {"model_name": MODEL_NAME, "model_version": "1", **({"id": request_id} if request_id else {})}
    if not binary:
        return json.dumps({**head, "outputs": [{**out, "data": scores}]}).encode(), {}
    data = np.asarray(scores, "<f4").tobytes()
    header = json.dumps({**head, "outputs": [{**out, "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


MODEL_METADATA = {
    "name": MODEL_NAME, "versions": ["1"], "platform": "rali-edge",
    "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "SCORE", "datatype": "FP32", "shape": [-1]}],
}



# ---------------------------------------------------------------------------------- HTTP
class _Cut(Exception):
    """A request body cut off by the limits (too large, too slow)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Limits:
    """ASGI middleware: a declared Content-Length over `max_bytes` is answered 413 before any of the
    body is read; a body that grows past it, or whose next chunk takes more than `read_timeout_s`,
    is cut off where it is read (`_Cut`, which the routes answer 413 or 408)."""

    def __init__(self, app, options: ServeOptions):
        self.app, self.options = app, options

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isascii() and declared.isdigit() and int(declared) > self.options.max_bytes:
            return await _plain(send, 413, f"the body is {int(declared)} bytes; at most {self.options.max_bytes}")
        seen, complete, deadline = 0, False, time.monotonic() + self.options.body_timeout_s

        async def limited():
            nonlocal seen, complete
            if complete:  # the body is in: what comes now is the client going away, whenever it does
                return await receive()
            wait = min(self.options.read_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except asyncio.TimeoutError:
                raise _Cut(408, f"the body did not arrive in time (at most {self.options.read_timeout_s:g} s between "
                                f"chunks, {self.options.body_timeout_s:g} s in all)") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.options.max_bytes:
                    raise _Cut(413, f"the body is over {self.options.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def _cut_in(e: BaseException) -> "_Cut | None":
    """The _Cut inside `e`: Starlette reads bodies in task groups, which wrap it in exception groups."""
    if isinstance(e, _Cut):
        return e
    return next((c for inner in getattr(e, "exceptions", ()) if (c := _cut_in(inner)) is not None), None)


async def _read(reading):
    """Await a body read; a body cut off by the limits becomes its answer (413 or 408)."""
    try:
        return await reading
    except Exception as e:  # noqa: BLE001 - only a cut is ours; anything else goes on as it was
        cut = _cut_in(e)
        if cut is None:
            raise
        raise HTTPProblem(cut.status, cut.message) from None


async def _plain(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
RESULTS = {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "score": {"type": "number"}, "error": {"type": "string"}}}}


def _answers(*statuses: int, ok: dict | None = None, listed: tuple[int, ...] = ()) -> dict:
    """OpenAPI responses: {"error"} for `statuses`, `ok` for 200, and the results list for `listed`
    (POST /score answers every image, also when none could be scored)."""
    why = {200: "scored", 400: "a malformed request", 401: "no or a wrong API key", 408: "the body came too slowly",
           413: "the body or the number of images is over the limit", 415: "not an image",
           422: "an image that cannot be used (truncated, empty, too large)", 500: "scoring failed",
           503: "busy or still loading: try again (Retry-After)"}
    out = {s: {"description": why[s], "content": {"application/json": {"schema": ERROR}}} for s in statuses}
    if ok is not None:
        out[200] = {"description": why[200], "content": {"application/json": {"schema": ok}}}
    for s in listed:
        out[s] = {"description": why[s], "content": {"application/json": {"schema": RESULTS}}}
    return out


def create_app(service: Service):
    """The FastAPI app of `service`: its routes, OpenAPI description, limits and API key."""
    require_serving()
    import fastapi
    from contextlib import asynccontextmanager

    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from starlette.formparsers import MultiPartParser

    from rali_edge import __version__

    options = service.options
    MultiPartParser.spool_max_size = options.max_bytes  # uploads stay in memory: nothing is written to disk

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = fastapi.FastAPI(title="rali-edge", version=__version__, lifespan=lifespan,
                          description="No-reference image quality scores (RALI): 1 very poor .. 5 excellent.")

    @app.exception_handler(HTTPProblem)
    async def problem(request, e: HTTPProblem):
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.middleware("http")
    async def account(request: Request, call_next):
        started = time.monotonic()
        if options.api_key and not request.url.path.startswith(("/healthz", "/readyz", "/v2/health")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                response = JSONResponse({"error": "give the API key: Authorization: Bearer KEY"}, 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                service.metrics.requests.labels("unauthorized", "401").inc()  # not the path: clients choose it
                return response
        response = await call_next(request)
        route = request.scope.get("route")
        name = route.path if route is not None else "other"
        service.metrics.requests.labels(name, str(response.status_code)).inc()
        service.metrics.latency.labels(name).observe(time.monotonic() - started)
        return response

    async def answered_unless_gone(request: Request, work):
        """Run `work`; a client that disconnects first cancels it (its images leave the queue)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(request.receive())  # after the body: returns when the client leaves
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            service.metrics.errors.labels("client_gone").inc()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
        gone.cancel()
        return task.result()

    @app.post("/score", summary="Score one or more images", responses=_answers(400, 401, 408, 413, 503, ok=RESULTS,
                                                                                    listed=(415, 422)),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                  "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                  "image/png": {"schema": {"type": "string", "format": "binary"}},
                  "application/json": {"schema": {"type": "object", "required": ["urls"], "properties": {
                      "urls": {"type": "array", "items": {"type": "string"}}}}}}}})
    async def score(request: Request):
        """Images as multipart files (field `file`, repeatable), or one image as the body, or (with
        --allow-urls) `{"urls": [...]}`. One result per image, in order: {"name", "score"} or
        {"name", "error"}. 200 when at least one image was scored; else the first image's status."""
        images, urls = await _images(request)

        async def fetched_and_scored():
            return await service.score_images(images + (await service.fetch(urls) if urls else []))

        results = await answered_unless_gone(request, fetched_and_scored())
        if not isinstance(results, list):
            return results
        status = 200 if any("score" in r for r in results) else results[0]["status"]
        return JSONResponse([{k: v for k, v in r.items() if k != "status"} for r in results], status)

    async def _images(request: Request) -> tuple[list[tuple[str, bytes]], list[str]]:
        """(the images sent, the URLs to fetch)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            try:
                form = await _read(request.form(max_files=options.max_images, max_fields=options.max_images))
            except HTTPProblem:
                raise
            except Exception as e:  # noqa: BLE001 - python-multipart's and Starlette's parse errors
                raise HTTPProblem(400, f"cannot read the multipart body ({str(e)[:200]})") from None
            files = form.getlist("file")
            if not all(hasattr(f, "read") for f in files):
                raise HTTPProblem(400, "the field `file` must hold files")
            return [(f.filename or f"file {i}", await f.read()) for i, f in enumerate(files)], []
        body = await _read(request.body())
        if kind == "application/json":
            try:
                urls = json.loads(body)["urls"]
                assert isinstance(urls, list) and all(isinstance(u, str) for u in urls)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise HTTPProblem(400, 'a JSON body is {"urls": ["https://..."]}') from None
            if len(urls) > options.max_images:
                raise HTTPProblem(413, f"{len(urls)} images in one request; at most {options.max_images}")
            for url in urls:
                service.check_url(url)
            return [], urls
        return [("body", body)], []

    @app.get("/healthz", summary="The process answers", responses=_answers())
    async def healthz():
        return {"alive": True}

    @app.get("/readyz", summary="The model is loaded and warm", responses=_answers(503))
    async def readyz():
        if not service.ready:
            raise HTTPProblem(503, "the model is still loading", {"Retry-After": "2"})
        return {"ready": True}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=_answers(401))
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # KServe v2 / Triton HTTP (the Open Inference Protocol).
    @app.get("/v2", summary="Server metadata", responses=_answers(401))
    async def server_metadata():
        return {"name": "rali-edge", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="Liveness", responses=_answers())
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness", responses=_answers(503))
    async def ready():
        return await readyz()

    @app.get(f"/v2/models/{MODEL_NAME}", summary="Model metadata", responses=_answers(401))
    async def model_metadata():
        return MODEL_METADATA

    @app.get(f"/v2/models/{MODEL_NAME}/ready", summary="Model readiness", responses=_answers(401, 503))
    async def model_ready():
        return await readyz()

    @app.post(f"/v2/models/{MODEL_NAME}/infer", summary="Score images (KServe v2: IMAGE BYTES -> SCORE FP32)",
              responses=_answers(400, 401, 408, 413, 415, 422, 503, ok={"type": "object"}),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["inputs"], "properties": {
                      "id": {"type": "string"},
                      "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                          "type": "object", "required": ["name", "datatype", "shape"], "properties": {
                              "name": {"const": "IMAGE"}, "datatype": {"const": "BYTES"},
                              "shape": {"type": "array", "items": {"type": "integer"}},
                              "data": {"type": "array", "items": {"type": "string"}},
                              "parameters": {"type": "object"}}}},
                      "outputs": {"type": "array", "items": {"type": "object"}}}}}}}})
    async def infer(request: Request):
        body = await _read(request.body())
        length = request.headers.get("inference-header-content-length")
        if length is not None and not (length.isascii() and length.isdigit() and int(length) <= len(body)):
            raise HTTPProblem(400, "Inference-Header-Content-Length does not fit the body")
        elements, binary = parse_infer(body, int(length) if length is not None else None)
        results = await answered_unless_gone(request, service.score_images(
            [(f"IMAGE[{i}]", e) for i, e in enumerate(elements)]))
        if not isinstance(results, list):
            return results
        failed = next((r for r in results if "error" in r), None)
        if failed is not None:
            raise HTTPProblem(failed["status"], failed["error"])
        request_id = None
        if length is None:
            with_id = json.loads(body)
            request_id = with_id.get("id") if isinstance(with_id, dict) and isinstance(with_id.get("id"), str) else None
        content, headers = infer_response([r["score"] for r in results], binary, request_id)
        kind = "application/octet-stream" if binary else "application/json"
        return Response(content, media_type=kind, headers=headers)

    return Limits(app, options)


def check_port(host: str, port: int) -> None:
    """A port this process cannot listen on is a usage error, found before the model loads."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def run(scorer, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
        log: Callable[[str], None] = print) -> None:
    """Serve `scorer` (a loaded rali_edge Scorer) until SIGTERM or Ctrl-C: then no new connection
    is taken, the requests in flight are answered, and it returns (uvicorn's graceful shutdown)."""
    import uvicorn

    service = Service(scorer, options)
    service.warm_up()
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning", access_log=False,
                            timeout_keep_alive=5, timeout_graceful_shutdown=30, lifespan="on",
                            limit_concurrency=options.max_connections)
    server = uvicorn.Server(config)
    log(f"serving http://{host}:{port}/ (POST /score, KServe v2 at /v2/models/{MODEL_NAME}/infer, /metrics, "
        "OpenAPI at /docs)")
    server.run()



# ---------------------------------------------------------------------------------- Ray Serve
def _replica_app(load_options: dict, options: ServeOptions):
    """The app one Ray Serve replica runs: the model loaded once, warmed up, and the same routes,
    limits and batching as `rali-edge serve` in one process (evaluated on the replica)."""
    from rali_edge.scoring import load

    service = Service(load(**load_options), options)
    service.warm_up()
    return create_app(service)


def run_on_ray(load_options: dict, options: ServeOptions, address: str, replicas: int, gpus_per_replica: float = 0.0,
               host: str = "127.0.0.1", port: int = 8000, log: Callable[[str], None] = print) -> None:
    """The same app as a Ray Serve deployment of `replicas` replicas (each loads the model once;
    `gpus_per_replica` GPUs each) on the cluster `address` names (rali_edge.distributed.ray_session),
    served at host:port by Ray Serve's proxy, until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from rali_edge.distributed import ray_session

    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError("serve --ray needs Ray Serve: pip install 'rali-edge[serve,ray]'") from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ray_session(address):
            serve.start(http_options={"host": host, "port": port})
            def build_app():  # a function (not a partial): Ray Serve runs functions on the replica, as builders
                return _replica_app(load_options, options)

            deployment = serve.deployment(serve.ingress(build_app)(), name="rali", num_replicas=replicas,
                                          ray_actor_options={"num_gpus": gpus_per_replica or 0, "num_cpus": 1})
            serve.run(deployment.bind(), name="rali", route_prefix="/")
            log(f"serving http://{host}:{port}/ on Ray Serve: {replicas} replicas (SIGTERM or Ctrl-C to stop)")
            stop.wait()
            serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["API_KEY_ENV", "MODEL_NAME", "Batcher", "HTTPProblem", "ServeOptions", "Service", "check_port", "create_app",
           "infer_response", "parse_infer", "require_serving", "run", "run_on_ray"]
