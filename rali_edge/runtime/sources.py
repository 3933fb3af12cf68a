"""Frame sources for `rali-edge stream`: what a SOURCE argument means and how to read it.

A source is one of
- a video file                      `clip.mp4`, `file:///data/clip.mkv`
- an image folder (name order)      `frames/`
- a single image                    `photo.jpg` (a one-frame source)
- a V4L2 device (USB camera)        `/dev/video0`, `v4l2:///dev/video0?width=1280&height=720&fps=30&fourcc=MJPG`
- a network stream                  `rtsp://...`, `rtsps://`, `http(s)://`, `rtmp://`, `udp://`, `tcp://`, `srt://`
- a GStreamer pipeline              `nvarguscamerasrc ! ... ! appsink` (or prefixed with `gst:`)

OpenCV (cv2) reads everything but folders and single images (those use Pillow, already a
dependency), so image folders work without OpenCV. cv2 is imported only when needed.

Every reader hands out RGB uint8 HxWx3 frames. Reading is split in `grab()` and `retrieve()`
like cv2.VideoCapture, so frames passed over by `--every`/`--fps` are never colour-converted
(V4L2 cameras: never MJPEG-decoded either).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from rali_edge.errors import MissingDependencyError, SourceError, SourceOpenError
from rali_edge.images import IMAGE_SUFFIXES, describe_suffixes, images_in, natural_key

INSTALL_HINT = "pip install 'rali-edge[stream]'"
NETWORK_SCHEMES = {"rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt", "rtp"}
# A blocked network read must not hang a reader forever: OpenCV gives up after these.
NETWORK_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class SourceSpec:
    text: str  # what the user typed; shown in records and summaries
    kind: str  # "video" | "folder" | "image" | "v4l2" | "network" | "gstreamer"
    target: str  # path, URL, device or pipeline handed to the reader
    options: dict = field(default_factory=dict, compare=False)  # v4l2 capture settings

    @property
    def live(self) -> bool:
        """Live sources produce frames whether we read them or not: they drop, reconnect, never end."""
        return self.kind in ("v4l2", "network", "gstreamer")

    @property
    def default_policy(self) -> str:
        return "latest" if self.live else "all"


def parse_source(text: str) -> SourceSpec:
    """Classify one SOURCE argument. Raises SourceError for a path that does not exist."""
    text = text.strip()
    if not text:
        raise SourceError("empty SOURCE")
    if text.startswith("gst:") or " ! " in text or text.endswith("appsink"):
        pipeline = text[4:].strip() if text.startswith("gst:") else text
        if "appsink" not in pipeline:
            raise SourceError(
                f"GStreamer pipeline must end in appsink so OpenCV can take the frames: {pipeline!r} "
                "(e.g. '... ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1')"
            )
        return SourceSpec(text, "gstreamer", pipeline)
    url = urlparse(text)
    scheme = url.scheme.lower()
    if scheme == "v4l2":
        device = unquote(url.netloc + url.path) or "/dev/video0"
        if device.isdigit():  # v4l2://1
            device = f"/dev/video{device}"
        elif not device.startswith("/"):  # v4l2://dev/video0 (one slash short)
            device = "/" + device
        return SourceSpec(text, "v4l2", device, _v4l2_options(url.query, text))
    if scheme in NETWORK_SCHEMES:
        return SourceSpec(text, "network", text)
    if scheme == "file":
        text_path = unquote(url.path)
    elif scheme and len(scheme) > 1 and not Path(text).exists():  # one letter would be a Windows drive
        raise SourceError(f"unknown source scheme {scheme!r} in {text!r}")
    else:
        text_path = text
    path = Path(text_path).expanduser()
    if re.fullmatch(r"/dev/video\d+", text_path):
        return SourceSpec(text, "v4l2", text_path)
    if path.is_dir():
        if not images_in(path):  # as `score` says of an empty folder, before a model loads
            raise SourceError(f"{text}: no images in this folder ({describe_suffixes()})")
        return SourceSpec(text, "folder", str(path))
    if path.is_file():
        kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
        return SourceSpec(text, kind, str(path))
    if text_path.isdigit():  # `0` -> first camera, as OpenCV users expect
        return SourceSpec(text, "v4l2", f"/dev/video{text_path}")
    raise SourceError(f"source not found: {text!r} (not a file, folder, device, URL or GStreamer pipeline)")


def _v4l2_options(query: str, text: str) -> dict:
    """`?width=1280&height=720&fps=30&fourcc=MJPG`: USB cameras often need MJPG for >480p at full rate."""
    known = {"width": int, "height": int, "fps": float, "fourcc": str}
    options = {}
    for key, values in parse_qs(query).items():
        if key not in known:
            raise SourceError(f"unknown v4l2 option {key!r} in {text!r}; known: {', '.join(known)}")
        try:
            options[key] = known[key](values[-1])
        except ValueError:
            raise SourceError(f"bad value for v4l2 option {key!r} in {text!r}") from None
    if "fourcc" in options and len(options["fourcc"]) != 4:
        raise SourceError(f"fourcc must have 4 characters (e.g. MJPG, YUYV): {options['fourcc']!r}")
    return options


def require_cv2():
    """Import OpenCV, or say why it cannot be imported and what to do (MissingDependencyError)."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # OpenCV's own warnings would drown the summaries
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # numpy's page-long ABI warning: said in one line below
            import cv2
    except ImportError as e:
        raise MissingDependencyError(_why_no_cv2(e, said.getvalue())) from None
    return cv2


def _why_no_cv2(e: ImportError, printed: str) -> str:
    if e.name == "cv2":
        return (f"OpenCV is needed to read videos, cameras and network streams, and this Python has none. Install "
                f"it with: {INSTALL_HINT}   (on Jetson and for GStreamer pipelines, use the system's OpenCV instead, "
                "python3-opencv: it has GStreamer; a venv needs --system-site-packages to see it)")
    if "numpy" in f"{e} {printed}".lower():
        return (f"OpenCV is installed but cannot be imported: it was built against numpy 1.x, and this environment "
                f"has numpy {np.__version__} ({Path(np.__file__).parent}). A system OpenCV (JetPack's, Debian's or "
                "Ubuntu's python3-opencv) needs the system's numpy 1.x: remove the newer one from this environment "
                "(pip uninstall numpy, in a venv made with --system-site-packages), or pip install 'numpy<2'")
    return f"OpenCV is installed but cannot be imported ({type(e).__name__}: {e})"


def check_available(spec: SourceSpec) -> None:
    """Fail early (before a model loads) when the library a source needs is missing."""
    if spec.kind in ("folder", "image"):
        return
    cv2 = require_cv2()
    if spec.kind == "gstreamer" and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        raise MissingDependencyError(
            "this OpenCV build has no GStreamer support, so GStreamer pipelines cannot be read. "
            "opencv-python-headless from PyPI is built without it: on Jetson, `pip uninstall opencv-python-headless` "
            "and use the OpenCV that JetPack installs (a venv needs --system-site-packages to see it); elsewhere "
            "Ubuntu's python3-opencv or an OpenCV built with -DWITH_GSTREAMER=ON. Check with: "
            "python3 -c \"import cv2; print(cv2.getBuildInformation())\" | grep GStreamer"
        )
    if spec.kind == "gstreamer":
        _check_pipeline(spec)


def _check_pipeline(spec: SourceSpec) -> None:
    """A pipeline GStreamer cannot parse (a typo, an element that is not installed) is a usage
    error, not a camera to wait for: parsed with GStreamer's own parser where its Python bindings
    (python3-gi, beside a system OpenCV) are there; elements are made, nothing is opened."""
    try:
        import gi

        gi.require_version("Gst", "1.0")
        from gi.repository import GLib, Gst
    except (ImportError, ValueError):
        return  # OpenCV will say when it opens it
    Gst.init(None)
    try:
        Gst.parse_launch(spec.target)
    except GLib.Error as e:
        raise SourceError(f"GStreamer cannot read the pipeline {spec.text!r}: {e.message}") from None


def _cameras() -> str:
    found = sorted(Path("/dev").glob("video*"), key=lambda p: natural_key(p.name))
    return ", ".join(str(p) for p in found) or "none"


class VideoReader:
    """cv2.VideoCapture for files, V4L2 devices, network URLs and GStreamer pipelines."""

    def __init__(self, spec: SourceSpec, start_frame: int = 0):
        cv2 = require_cv2()
        self._cv2 = cv2
        self.spec = spec
        if spec.kind == "gstreamer":
            cap = cv2.VideoCapture(spec.target, cv2.CAP_GSTREAMER)
        elif spec.kind == "v4l2":
            cap = cv2.VideoCapture(spec.target, cv2.CAP_V4L2)
        elif spec.kind == "network":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS]
            cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, params)
        else:
            cap = cv2.VideoCapture(spec.target, cv2.CAP_ANY)
        if not cap.isOpened():
            cap.release()
            # A camera that is not there yet is retried (it may be plugged in); say so, since a typo
            # in the device number looks the same.
            missing = spec.kind == "v4l2" and not Path(spec.target).exists()
            raise SourceOpenError(f"cannot open {spec.text!r} as a {spec.kind} source"
                                  + (f": there is no {spec.target} (cameras here: {_cameras()})" if missing else ""))
        if spec.kind == "v4l2":
            self._configure_v4l2(cap, spec.options)
        if start_frame > 0 and not spec.live:  # resume a file after a read failure
            cap.set(cv2.CAP_PROP_POS_FRAMES, start_frame)
        self._cap = cap
        self.nominal_fps = cap.get(cv2.CAP_PROP_FPS) or None
        self.timestamp: float | None = None
        self.last_error: str | None = None

    def _configure_v4l2(self, cap, options: dict) -> None:
        cv2 = self._cv2
        if "fourcc" in options:  # must come before the size: the size list depends on the format
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*options["fourcc"]))
        if "width" in options:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, options["width"])
        if "height" in options:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, options["height"])
        if "fps" in options:
            cap.set(cv2.CAP_PROP_FPS, options["fps"])
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # fewer queued driver buffers = fresher frames

    def grab(self) -> bool:
        """Advance one frame; False at the end of the stream (or when a live source stops).

        Sets `timestamp`: the position in the media for files, the wall-clock capture time for
        live sources (their own clocks have arbitrary origins)."""
        if not self._cap.grab():
            return False
        if self.spec.live:
            self.timestamp = time.time()
        else:
            self.timestamp = self._cap.get(self._cv2.CAP_PROP_POS_MSEC) / 1000.0
        return True

    def retrieve(self) -> np.ndarray | None:
        """The grabbed frame as RGB, or None when it cannot be decoded (counted as undecodable)."""
        ok, frame = self._cap.retrieve()
        if not ok or frame is None:
            self.last_error = "a grabbed frame could not be decoded"
            return None
        return to_rgb(frame, self._cv2)

    def close(self) -> None:
        self._cap.release()


def to_rgb(frame: np.ndarray, cv2) -> np.ndarray:
    """OpenCV BGR (or gray, or BGRA from some pipelines) -> contiguous RGB; cvtColor is SIMD and drops the GIL."""
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class ImageFolderReader:
    """Images of a folder in natural name order, read with Pillow (no OpenCV needed).

    An image that cannot be decoded is left out (retrieve() gives None), like a corrupt frame in a video."""

    def __init__(self, spec: SourceSpec, start_frame: int = 0):
        self.spec = spec
        if spec.kind == "image":
            paths = [Path(spec.target)]
        else:
            folder = Path(spec.target)
            if not folder.is_dir():
                raise SourceOpenError(f"folder {spec.text!r} is gone")
            paths = images_in(folder)
        self.paths = paths
        self.nominal_fps = None
        self.timestamp = None  # images have no media time
        self.last_error: str | None = None  # why the last image could not be decoded
        self._next = start_frame
        self._current: Path | None = None

    def grab(self) -> bool:
        if self._next >= len(self.paths):
            return False
        self._current = self.paths[self._next]
        self._next += 1
        return True

    def retrieve(self) -> np.ndarray | None:
        # open_image: the colour rules of `rali-edge score` (alpha onto white, 16-bit grey scaled),
        # so a folder streamed here scores exactly as the same files scored there.
        from rali_edge.errors import ImageError
        from rali_edge.images import open_image

        try:
            return np.asarray(open_image(self._current))
        except ImageError as e:
            self.last_error = str(e)
            return None

    def close(self) -> None:
        pass


def open_source(spec: SourceSpec, start_frame: int = 0):
    """Open a reader for `spec`, resuming files and folders at `start_frame` (after a failure)."""
    if spec.kind in ("folder", "image"):
        return ImageFolderReader(spec, start_frame)
    return VideoReader(spec, start_frame)
