"""`rali-edge stream --http [HOST:]PORT`: what the streams do, for Prometheus and for people.

    /metrics          Prometheus text format, a label per stream (stream, source)
    /streams          the same as JSON, with each stream's scores of the last minutes
    /                 a page to keep open: each stream's newest scored frame, its score over the
                      last minutes, its state, its alert
    /frame/<id>.jpg   a stream's newest scored frame, as a thumbnail

The stream runtime tells the monitor of each scored frame (`scored`). That costs the scoring loop
little: counters are read from the runtime's own when asked, histograms take one observation, and
a frame is kept (a reference to the array the reader made, no copy) at most every FRAME_EVERY_S
seconds per stream; thumbnails are encoded when the page asks, once per kept frame. The server is
the standard library's ThreadingHTTPServer, in threads of its own: no client makes the scoring
loop wait. prometheus_client writes the exposition format (`pip install 'rali-edge[http]'`).
"""

from __future__ import annotations

import io
import json
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from rali_edge.errors import MissingDependencyError, UsageError

FRAME_EVERY_S = 0.5  # newest frame kept for the page at most this often per stream
HISTORY_S = 600.0  # the page's chart: the last ten minutes
HISTORY_POINTS = 1200  # at most a point every half second over them
THUMBNAIL_WIDTH = 320
SCORE_BUCKETS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def redacted(source: str) -> str:
    """A source as the monitor shows it: a URL's password (rtsp://user:PASSWORD@cam) replaced."""
    return re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", source)


def parse_address(text: str) -> tuple[str, int]:
    """--http PORT or HOST:PORT -> (host, port); the host defaults to 127.0.0.1 (this machine only)."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--http {text}: give PORT or HOST:PORT (e.g. 8080, or 0.0.0.0:8080 for every interface)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise MissingDependencyError("--http needs prometheus_client: pip install 'rali-edge[http]'") from None
    return prometheus_client


@dataclass
class _Seen:
    """What the monitor keeps of one stream beyond the runtime's counters."""

    score: float | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))  # (wall time, score)
    frame: object = None  # the newest kept frame (an RGB array), and its index
    frame_index: int = -1
    kept_at: float = 0.0
    thumbnail: tuple[int, bytes] | None = None  # (frame index, JPEG)


class Monitor:
    """Serves the runtime's streams over HTTP (module doc). `start()` binds and serves;
    `close()` stops."""

    def __init__(self, runtime, address: tuple[str, int]):
        prom = _prometheus()
        self.runtime, self.address = runtime, address
        self.seen = [_Seen() for _ in runtime.states]
        self.lock = threading.Lock()
        self.registry = prom.CollectorRegistry()
        prom.ProcessCollector(registry=self.registry)
        prom.PlatformCollector(registry=self.registry)
        labels = ("stream", "source")
        self.score_hist = prom.Histogram("rali_stream_score", "Scores of the scored frames (1 very poor .. 5 excellent).",
                                         labels, buckets=SCORE_BUCKETS, registry=self.registry)
        self.latency_hist = prom.Histogram("rali_stream_latency_seconds", "From a frame's capture to its score.",
                                           labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_Counters(self))
        self.server: ThreadingHTTPServer | None = None

    # -- the runtime's side ----------------------------------------------------------------
    def scored(self, state, frame, record: dict) -> None:
        """One scored frame (called by the scoring loop: cheap)."""
        labels = (str(state.id), redacted(state.spec.text))
        score = record["score"]
        if math.isfinite(score):
            self.score_hist.labels(*labels).observe(score)
        self.latency_hist.labels(*labels).observe(record["latency_ms"] / 1000.0)
        seen = self.seen[state.id]
        with self.lock:
            seen.score = score if math.isfinite(score) else None
            seen.history.append((record["wall_time"], seen.score))
            if frame.image is not None and time.monotonic() - seen.kept_at >= FRAME_EVERY_S:
                seen.frame, seen.frame_index, seen.kept_at = frame.image, frame.index, time.monotonic()

    # -- what is served --------------------------------------------------------------------
    def snapshot(self) -> list[dict]:
        """Every stream's counters, state, latest score, alert and recent scores (/streams)."""
        with self.runtime.cond:
            stats = [(s.stats(), s.alerting) for s in self.runtime.states]
        now = time.time()
        out = []
        for (s, alerting), seen in zip(stats, self.seen):
            with self.lock:
                history = [(t, v) for t, v in seen.history if now - t <= HISTORY_S]
                latest, index = seen.score, seen.frame_index
            out.append({**s, "source": redacted(s["source"]), "alerting": alerting,
                        "alert_below": self.runtime.options.alert_below,
                        "latest_score": latest, "frame": index, "history": history})
        return out

    def thumbnail(self, stream: int) -> bytes | None:
        """The newest kept frame of `stream` as a JPEG, THUMBNAIL_WIDTH wide (made once per frame)."""
        seen = self.seen[stream]
        with self.lock:
            image, index, cached = seen.frame, seen.frame_index, seen.thumbnail
        if image is None:
            return None
        if cached is not None and cached[0] == index:
            return cached[1]
        from PIL import Image

        picture = Image.fromarray(image)
        picture.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH * 4))
        buf = io.BytesIO()
        picture.save(buf, "JPEG", quality=80)
        with self.lock:
            seen.thumbnail = (index, buf.getvalue())
        return buf.getvalue()

    def metrics(self) -> tuple[bytes, str]:
        prom = _prometheus()
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    # -- serving ---------------------------------------------------------------------------
    def start(self) -> str:
        """Bind and serve in the background; the URL of the page."""
        monitor = self

        class Handler(_Handler):
            pass

        Handler.monitor = monitor
        try:
            self.server = ThreadingHTTPServer(self.address, Handler)
        except OSError as e:
            raise UsageError(f"--http {self.address[0]}:{self.address[1]}: cannot listen there ({e.strerror or e})") from None
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="rali-edge-http", daemon=True).start()
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _Counters:
    """The runtime's own counters, read when Prometheus scrapes (no bookkeeping in the loop)."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["stream", "source"]
        counters = {
            "frames_read": ("frames_read", "Frames read from the source."),
            "frames_scored": ("scored", "Frames scored."),
            "frames_dropped": ("dropped", "Frames replaced by newer ones before they were scored (policy latest)."),
            "frames_undecodable": ("undecodable", "Selected frames that could not be decoded."),
            "reconnects": ("reconnects", "Times the source was opened again after it failed."),
        }
        families = {name: CounterMetricFamily(f"rali_stream_{name}", text, labels=labels)
                    for name, (_, text) in counters.items()}
        latest = GaugeMetricFamily("rali_stream_latest_score", "The newest frame's score.", labels=labels)
        up = GaugeMetricFamily("rali_stream_up", "1 while the stream runs, 0 while it reconnects or after it ended.",
                               labels=labels)
        alert = GaugeMetricFamily("rali_stream_alert", "1 while the stream's alert (--alert-below) is on.", labels=labels)
        for s in self.monitor.snapshot():
            values = [str(s["stream"]), s["source"]]
            for name, (key, _) in counters.items():
                families[name].add_metric(values, s[key])
            if s["latest_score"] is not None:
                latest.add_metric(values, s["latest_score"])
            up.add_metric(values, 1.0 if s["status"] == "running" else 0.0)
            alert.add_metric(values, 1.0 if s["alerting"] else 0.0)
        yield from families.values()
        yield from (latest, up, alert)


class _Handler(BaseHTTPRequestHandler):
    monitor: Monitor
    timeout = 10  # a client that stalls mid-request is cut off

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, kind = self.monitor.metrics()
            return self._send(200, body, kind)
        if path == "/streams":
            return self._send(200, json.dumps({"streams": self.monitor.snapshot()}).encode(), "application/json")
        if path in ("/", "/index.html"):
            page = resources.files("rali_edge.runtime").joinpath("monitor.html").read_bytes()
            return self._send(200, page, "text/html; charset=utf-8")
        if path.startswith("/frame/") and path.endswith(".jpg"):
            stream = path[len("/frame/"):-len(".jpg")]
            if stream.isascii() and stream.isdigit() and int(stream) < len(self.monitor.seen):
                jpeg = self.monitor.thumbnail(int(stream))
                if jpeg is not None:
                    return self._send(200, jpeg, "image/jpeg")
        self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - no line per request on the run's stderr
        pass


__all__ = ["FRAME_EVERY_S", "Monitor", "parse_address"]
