"""`rali-edge stream`: score cameras, network streams, video files and image folders frame by frame."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import click

from rali_edge.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED
from rali_edge.cli.common import OUTPUT_FILE_OR_STDOUT, model_options
from rali_edge.errors import ModelLoadError, RaliEdgeError
from rali_edge.runtime.stream import SafeSink, checked, warm_up


EPILOG = """\b
Sources:
  clip.mp4  file:///data/clip.mkv      video files (policy all: every selected frame)
  frames/                              image folder, natural name order (no OpenCV needed)
  /dev/video0  v4l2:///dev/video0?width=1280&height=720&fps=30&fourcc=MJPG
  rtsp://user:pass@cam/stream  http://cam/mjpg
  'nvarguscamerasrc ! ... ! appsink'   GStreamer pipeline (needs an OpenCV with GStreamer)
  Live sources (cameras, URLs, pipelines) default to --policy latest and are reopened
  with backoff when they fail; files end at EOF.

\b
Output (one line per scored frame, flushed at once; jsonl, or csv with these columns):
  {"type": "frame", "stream": 0, "source": "cam.mp4", "frame": 12, "source_ts": 0.48,
   "wall_time": 1712345678.1, "score": 3.87, "latency_ms": 41.2, "dropped": 0}
  Alerts: {"type": "alert", "alert": "low"|"recovered", "threshold": 2.5, ...}
  --on-alert gets RALI_ALERT, RALI_STREAM_ID, RALI_SOURCE, RALI_FRAME, RALI_SCORE,
  RALI_THRESHOLD, RALI_ALERT_FRAMES, RALI_SOURCE_TS, RALI_WALL_TIME, RALI_RECORD (JSON).
  Summaries (fps in, fps scored, dropped, mean score, state) go to stderr.

\b
Examples:
  rali-edge stream clip.mp4 --every 5 --out scores.jsonl
  rali-edge stream /dev/video0 /dev/video2 rtsp://cam3/live rtsp://cam4/live \\
      --device cuda --dtype fp16 --fps 5 --alert-below 2.5 --alert-frames 15 \\
      --on-alert 'notify-send "camera $RALI_STREAM_ID: $RALI_ALERT ($RALI_SCORE)"'
  rali-edge stream frames/ --format csv --out - | tee scores.csv
  rali-edge stream 'nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1' --device cuda --backend tensorrt --engine rali.engine

\b
Ctrl-C or SIGTERM stops reading, scores the frames already taken, flushes the output and
exits 0. Exit codes: 0 done, 1 a file source could not be read (others were scored),
2 usage, 3 model/engine cannot be loaded, 4 OpenCV/GStreamer/CUDA missing.
"""


@click.command("stream", epilog=EPILOG)
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@model_options
@click.option("--every", type=click.IntRange(min=1), help="Score every Nth frame of each source.")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True),
              help="Score at most F frames per second of each source (media time for files, wall time for live sources and folders).")
@click.option("--policy", type=click.Choice(["latest", "all"]),
              help="latest: score only the newest frame, count the others as dropped (default for live sources); "
                   "all: score every selected frame, slowing the reader down if needed (default for files and folders).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Most frames per encoder call; the pending frames of all sources are scored together.")
@click.option("--out", "out_path", type=OUTPUT_FILE_OR_STDOUT, default="-", show_default=True,
              help="Output file (checked before anything starts), or - for stdout.")
@click.option("--append", is_flag=True,
              help="Append to --out FILE instead of replacing it (a service that restarts); a file of another "
                   "format or other columns is refused.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]),
              help="Default: from --out's suffix (.csv, .jsonl), else jsonl.")
@click.option("--alert-below", type=float, metavar="SCORE", help="Alert when a stream's score stays below SCORE ...")
@click.option("--alert-frames", default=10, show_default=True, type=click.IntRange(min=1),
              help="... for this many scored frames in a row (and recover after as many at or above it).")
@click.option("--on-alert", metavar="CMD", help="Shell command run on each alert and recovery (details in RALI_* environment variables).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="S", help="Stop after S seconds.")
@click.option("--frames", "max_frames", type=click.IntRange(min=1), metavar="N", help="End each source after N selected frames.")
@click.option("--summary-every", default=10.0, show_default=True, type=float, metavar="S",
              help="Seconds between summary lines on stderr (0: only the final summary).")
@click.option("--loop", is_flag=True, help="Restart files and folders at their end (demos, soak tests).")
@click.option("--realtime", is_flag=True, help="Read files at their own frame rate, as a camera would deliver them.")
@click.option("--http", "http_address", metavar="[HOST:]PORT",
              help="Serve /metrics (Prometheus), /streams (JSON) and a live page at / while streaming "
                   "(HOST defaults to 127.0.0.1: this machine only). Needs pip install 'rali-edge[http]'.")
def stream_command(sources, every, fps, policy, max_batch, out_path, append, fmt, alert_below, alert_frames, on_alert,
                   duration, max_frames, summary_every, loop, realtime, http_address, **model_kwargs):
    """Score video streams frame by frame: cameras, RTSP/HTTP, GStreamer, video files, folders.

    One reader thread per SOURCE; the scorer takes the pending frame of every source and scores
    them in one batch, so four cameras cost one encoder call. Memory stays bounded however slow
    the scorer is.
    """
    from rali_edge.outputs import Output, format_for
    from rali_edge.runtime.sources import SourceError, check_available, parse_source
    from rali_edge.runtime.stream import RECORDS, StreamOptions, StreamRuntime

    if every is not None and fps is not None:
        raise click.UsageError("--every and --fps are alternatives: give one of them")
    if on_alert and alert_below is None:
        raise click.UsageError("--on-alert needs --alert-below")
    try:
        specs = [parse_source(s) for s in sources]
    except SourceError as e:
        raise click.UsageError(str(e)) from None
    for spec in specs:
        check_available(spec)  # missing OpenCV/GStreamer: exit 4 now, before a model loads
    fmt = format_for(None if out_path == "-" else out_path, fmt, default="jsonl")
    if fmt not in ("jsonl", "csv"):
        raise click.UsageError(f"--out {out_path}: a stream writes jsonl or csv, line by line; give one of those "
                               "suffixes, or --format")
    output = Output(out_path, RECORDS, fmt, append=append, key="type")  # a file to refuse: before the model loads
    if http_address:
        from rali_edge.runtime.monitor import _prometheus, parse_address

        address = parse_address(http_address)
        _prometheus()  # missing: exit 4 now, before a model loads
    options = StreamOptions(
        policy=policy, max_batch=max_batch, every=every or 1, fps=fps, frames=max_frames, duration=duration,
        loop=loop, realtime=realtime, alert_below=alert_below, alert_frames=alert_frames, on_alert=on_alert,
        summary_every=summary_every,
    )

    stop = threading.Event()
    outputs = []  # what a second signal flushes before quitting
    restore = install_stop_handlers(stop, outputs)
    try:
        scorer = load_scorer_or_explain(model_kwargs)
        if stop.is_set():  # stopped while the model loaded: nothing was taken
            return
        score_batch = checked(scorer.score_arrays)
        warm_up(score_batch)
        outputs.append(output)
        sink = SafeSink(output, stop)
        runtime = StreamRuntime(specs, score_batch, sink, options, stop=stop)
        monitor = None
        try:
            if http_address:
                from rali_edge.runtime.monitor import Monitor

                monitor = runtime.monitor = Monitor(runtime, address)
                click.echo(f"serving {monitor.start()} (Prometheus metrics at /metrics, JSON at /streams)", err=True)
            start = time.monotonic()
            result = runtime.run()
            elapsed = time.monotonic() - start
        finally:
            if monitor is not None:
                monitor.close()
            sink.close()
    finally:
        restore()
    if sink.failed:
        raise sink.failed
    scored = sum(s["scored"] for s in result.streams)
    click.echo(
        f"{scored} frames scored in {result.batches} batches "
        f"(mean batch {scored / max(result.batches, 1):.2f}) in {elapsed:.1f} s",
        err=True,
    )
    sys.exit(EXIT_SOME_FAILED if result.failed else EXIT_OK)


def load_scorer_or_explain(model_kwargs):
    """The scorer; errors that say what they are keep their exit code (2 usage, 3 model, 4 a missing
    library or device), anything else about loading the model is exit 3."""
    from rali_edge.cli.common import load_scorer

    try:
        return load_scorer(**model_kwargs)
    except RaliEdgeError as e:
        if e.exit_code != RaliEdgeError.exit_code:
            raise
        raise ModelLoadError(f"cannot load the model: {e}") from None
    except Exception as e:  # noqa: BLE001  torch/engine loaders raise many types; the user needs the message
        raise ModelLoadError(f"cannot load the model: {type(e).__name__}: {e}") from None


def install_stop_handlers(stop: threading.Event, outputs: list):
    """SIGINT/SIGTERM: set `stop` (the runtime drains and flushes). A second signal exits at once,
    after flushing what was written (each record is written whole, so no line is cut)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if stop.is_set():
            try:
                for output in outputs:
                    output.flush()
            finally:
                os._exit(EXIT_INTERRUPTED)
        stop.set()
        # os.write: no buffered stream (and no lock that the interrupted code may hold)
        os.write(2, b"stopping: scoring the frames already taken (signal again to quit now)\n")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


__all__ = ["stream_command"]
