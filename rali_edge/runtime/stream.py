"""The stream runtime: reader threads, one batching scorer, records, summaries and alerts.

    reader thread (one per source)          main thread
    grab -> select (--every/--fps)          take the pending frames of every source (round robin,
         -> retrieve (RGB) -> buffer  --->  up to --max-batch) -> one score_batch call -> records,
                                            alerts, summaries

Buffers are bounded, so memory stays flat however slow the scorer is:
- policy "latest" (live sources): one slot per source; a newer frame replaces the waiting one
  and the replaced frame is counted as dropped. Readers never wait, so cameras never lag.
- policy "all" (files, folders): a queue of `queue_frames` per source; a reader waits when its
  queue is full (backpressure), so every selected frame is scored.
Accounting per stream: frames_in (selected frames put in the buffer) = scored + dropped
once the run has ended, since the frames still waiting when a stop comes are scored too.

Faults: a reader that raises, a source that cannot be opened, or a live source that stops
is reopened with exponential backoff (live: forever; files: `file_retries` times in a row,
resuming where they stopped; a file that never opened fails at once: it is bad input). A file ends cleanly at EOF. Setting `stop` (SIGINT/SIGTERM in the CLI,
--duration, or the last source ending) stops the readers; what was already taken is scored.

The scorer is any `score_batch(frames: list[np.ndarray]) -> list[float]` taking RGB uint8
HxWx3 frames, so this module never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rali_edge.errors import OutputClosed, OutputError, RaliEdgeError, ScoringError
from rali_edge.outputs import Field, clean_row
from rali_edge.runtime.sources import SourceSpec, open_source

POLICIES = ("latest", "all")
# The records a stream writes (rali_edge.outputs), one per scored frame and per alert.
RECORDS = (
    Field("type"),  # "frame" or "alert"
    Field("stream", int),  # stream id: the position of the source on the command line, from 0
    Field("source"),
    Field("frame", int),  # index of the frame in its source (every frame read counts, selected or not)
    Field("source_ts", float, 6),  # seconds: position in the media (files), capture wall time (live), empty (folders)
    Field("wall_time", float, 6),  # unix seconds when the record was made
    Field("score", float, 4),
    Field("latency_ms", float, 2),  # from the frame's capture to its score (queueing + scoring)
    Field("dropped", int),  # frames of this stream dropped (policy latest) since its previous record
    Field("alert"),  # alert records: "low" or "recovered"
    Field("threshold", float, 4),  # alert records: --alert-below
)

ScoreBatch = Callable[[list], list]


@dataclass
class Backoff:
    """Wait before reopening a failed source: initial, initial*factor, ... capped at maximum (seconds)."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))


@dataclass
class StreamOptions:
    policy: str | None = None  # None: "latest" for live sources, "all" for files and folders
    max_batch: int = 8
    queue_frames: int | None = None  # per-source queue under policy "all"; default max_batch
    every: int = 1  # score every Nth frame read
    fps: float | None = None  # score at most this many frames per second of source time
    frames: int | None = None  # each source ends after this many selected frames
    duration: float | None = None  # stop everything after this many seconds
    loop: bool = False  # restart files and folders at their end (demos, soak tests)
    realtime: bool = False  # read files at their own frame rate, as if they were cameras
    alert_below: float | None = None
    alert_frames: int = 10
    on_alert: str | None = None  # shell command run on each alert and recovery (in order, in the background)
    summary_every: float = 10.0  # seconds between summary lines; 0 or less: only the final one
    backoff: Backoff = field(default_factory=Backoff)
    file_retries: int = 3  # reopen attempts in a row for a failing file or folder before giving up
    # A live source whose reader has waited this long in one open or read (a GStreamer pipeline that
    # never returns after its camera came back, say) is opened again in a new reader thread.
    stall_s: float = 20.0

    def validate(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if self.max_batch < 1 or self.every < 1 or self.alert_frames < 1:
            raise ValueError("max_batch, every and alert_frames must be at least 1")
        if self.fps is not None and self.fps <= 0:
            raise ValueError("fps must be positive")
        if self.queue_frames is not None and self.queue_frames < 1:
            raise ValueError("queue_frames must be at least 1")


@dataclass
class Frame:
    stream: int
    index: int
    source_ts: float | None
    captured: float  # time.monotonic() at grab
    image: np.ndarray


class FrameSelector:
    """Which frames to score: every Nth read, then at most `fps` per second of source time.

    The rate limit keeps a schedule (next due time += period) so the long-run rate is exactly
    `fps` whatever the source's own rate, and restarts the schedule after a gap (no bursts)."""

    SLACK = 1e-3  # timestamps from containers round to the millisecond

    def __init__(self, every: int = 1, fps: float | None = None):
        self.every = every
        self.period = None if fps is None else 1.0 / fps
        self.reset()

    def reset(self) -> None:
        self._due: float | None = None

    def __call__(self, index: int, t: float) -> bool:
        if index % self.every:
            return False
        if self.period is None:
            return True
        if self._due is not None and t < self._due - self.SLACK:
            return False
        if self._due is None or t - self._due > self.period:
            self._due = t + self.period
        else:
            self._due += self.period
        return True


class StreamState:
    """One source: its buffer, its counters and its alert state. Guarded by the runtime's lock."""

    def __init__(self, stream_id: int, spec: SourceSpec, policy: str, capacity: int):
        self.id = stream_id
        self.spec = spec
        self.policy = policy
        self.capacity = 1 if policy == "latest" else capacity
        self.pending: deque[Frame] = deque()
        self.read = 0  # frames grabbed from the source
        self.frames_in = 0  # frames selected and put in the buffer
        self.scored = 0
        self.dropped = 0
        self.dropped_since_record = 0
        self.undecodable = 0  # selected frames that could not be decoded
        self.reconnects = 0
        self.score_sum = 0.0
        self.status = "starting"  # running | reconnecting | ended | failed | stopped
        self.detail = ""
        self.finished = False  # the reader will put no more frames
        # Which reader thread is this source's (a stalled one is replaced: the old one, when its
        # read ever returns, sees that it is not current and leaves), and since when it waits in
        # an open or a read (None while it is not in one).
        self.generation = 0
        self.waiting: tuple[int, float] | None = None  # (the waiting reader's generation, since when)
        self.stalls = 0  # readers replaced since this source's last frame: each waits twice as long
        # consecutive scores below / at-or-above the alert threshold
        self.below = 0
        self.above = 0
        self.alerting = False
        self.window = (time.monotonic(), 0, 0, 0.0)  # summary window start: time, frames_in, scored, score_sum

    def stats(self) -> dict:
        return {
            "stream": self.id,
            "source": self.spec.text,
            "policy": self.policy,
            "status": self.status,
            "frames_read": self.read,
            "frames_in": self.frames_in,
            "scored": self.scored,
            "dropped": self.dropped,
            "undecodable": self.undecodable,
            "reconnects": self.reconnects,
            "mean_score": self.score_sum / self.scored if self.scored else None,
        }


@dataclass
class RunResult:
    streams: list[dict]
    batches: int
    stopped: bool  # ended by a stop request (signal or --duration) rather than by the sources ending

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.streams if s["status"] == "failed"]


class StreamRuntime:
    def __init__(
        self,
        sources: list[SourceSpec],
        score_batch: ScoreBatch,
        sink,
        options: StreamOptions | None = None,
        stop: threading.Event | None = None,
        log: Callable[[str], None] | None = None,
        open_reader: Callable = open_source,
        monitor=None,
    ):
        if not sources:
            raise ValueError("no sources")
        self.options = options or StreamOptions()
        self.options.validate()
        self.score_batch = score_batch
        self.sink = sink
        self.stop = stop or threading.Event()
        self.log = log or _stderr_line
        self.open_reader = open_reader
        self.monitor = monitor  # told of each scored frame (runtime/monitor.py, --http); set before run()
        capacity = self.options.queue_frames or self.options.max_batch
        self.states = [StreamState(i, spec, self.options.policy or spec.default_policy, capacity) for i, spec in enumerate(sources)]
        self.cond = threading.Condition()
        self.batches = 0
        self._rotation = 0
        self._hooks = HookRunner(self.log)
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- readers

    def _set_status(self, state: StreamState, status: str, detail: str = "") -> None:
        with self.cond:
            previous = state.status
            state.status, state.detail = status, detail
            if status in ("ended", "failed", "stopped"):
                state.finished = True
                self.cond.notify_all()
        if status in ("reconnecting", "failed") or (status == "running" and previous == "reconnecting"):
            self.log(f"stream {state.id} ({state.spec.text}): {status}" + (f": {detail}" if detail else ""))

    def _put(self, state: StreamState, frame: Frame) -> bool:
        """Hand a frame to the scorer. False when stopping (the frame was not taken)."""
        with self.cond:
            if state.policy == "all":
                while len(state.pending) >= state.capacity and not self.stop.is_set():
                    self.cond.wait(0.1)  # backpressure: the scorer is behind
            if self.stop.is_set():
                return False
            if state.policy == "latest" and state.pending:
                state.pending.popleft()  # the camera moved on: only the newest frame matters
                state.dropped += 1
                state.dropped_since_record += 1
            state.pending.append(frame)
            state.frames_in += 1
            self.cond.notify_all()
            return True

    def _read_loop(self, state: StreamState, generation: int = 0) -> None:
        opts, spec = self.options, state.spec
        selector = FrameSelector(opts.every, opts.fps)
        reader = None
        position = 0  # frames grabbed in this pass over a file: where to resume after a failure
        failures = 0  # failures in a row; a decoded frame resets it
        taken = 0  # frames put in the buffer (for --frames)
        pace = None  # (wall, media) origin for --realtime
        opened = False  # a file that never opens is bad input: no retries for it
        try:
            while not self.stop.is_set() and state.generation == generation:
                try:
                    if reader is None:
                        self._waiting(state, generation, True)
                        reader = self.open_reader(spec, position)
                        self._waiting(state, generation, False)
                        if state.generation != generation:
                            break  # replaced while it opened
                        opened = True
                        if failures:
                            with self.cond:
                                state.reconnects += 1
                        self._set_status(state, "running")
                    self._waiting(state, generation, True)
                    grabbed = reader.grab()
                    self._waiting(state, generation, False)
                    if state.generation != generation:
                        break  # replaced while it read
                    if not grabbed:
                        if spec.live:
                            raise EOFError("the stream stopped sending frames")
                        _close(reader)
                        played = position
                        reader, position, pace = None, 0, None
                        if opts.loop and played > 0:  # (an empty file would loop forever)
                            selector.reset()
                            continue
                        if taken == 0 and state.undecodable:  # frames, but none decodable: a bad file or folder
                            self._set_status(state, "failed", f"none of its {state.undecodable} frames could be decoded")
                            return
                        self._set_status(state, "ended")
                        return
                    with self.cond:
                        index = state.read
                        state.read += 1
                    position += 1
                    ts = reader.timestamp
                    if opts.realtime and not spec.live and ts is not None:
                        pace = pace or (time.monotonic(), ts)
                        wait = pace[0] + (ts - pace[1]) - time.monotonic()
                        if wait > 0 and self.stop.wait(wait):
                            break
                    if not selector(index, ts if ts is not None else time.monotonic()):
                        continue
                    image = reader.retrieve()
                    if image is None:
                        with self.cond:
                            state.undecodable += 1
                            n = state.undecodable
                        if n <= 3 or n % 100 == 0:  # a camera sending garbage must not flood stderr
                            why = getattr(reader, "last_error", "") or "undecodable"
                            self.log(f"stream {state.id} ({spec.text}): frame {index} could not be decoded ({n} so far): {why}")
                        continue
                    failures = 0
                    state.stalls = 0
                    if not self._put(state, Frame(state.id, index, ts, time.monotonic(), image)):
                        break
                    taken += 1
                    if opts.frames is not None and taken >= opts.frames:
                        self._set_status(state, "ended")
                        return
                except Exception as e:  # noqa: BLE001  any reader fault: reopen, never crash the run
                    self._waiting(state, generation, False)
                    _close(reader)
                    reader = None
                    if state.generation != generation:
                        break
                    failures += 1
                    if not spec.live and not opened:
                        self._set_status(state, "failed", _describe(e))
                        return
                    if not spec.live and failures > opts.file_retries:
                        self._set_status(state, "failed", f"{_describe(e)} (gave up after {failures} attempts)")
                        return
                    delay = opts.backoff.delay(failures)
                    self._set_status(state, "reconnecting", f"{_describe(e)}; retry {failures} in {delay:.1f} s")
                    if self.stop.wait(delay):
                        break
            if state.generation == generation:
                self._set_status(state, "stopped")
        finally:
            _close(reader)
            if state.generation == generation:  # a replaced reader leaves the source to its successor
                with self.cond:
                    state.finished = True
                    if state.status not in ("ended", "failed"):
                        state.status = "stopped"
                    self.cond.notify_all()

    @staticmethod
    def _waiting(state: StreamState, generation: int, now_waiting: bool) -> None:
        """Mark (or clear) the current reader's wait in an open or a read; a replaced reader's
        wait is not the source's any more, and changes nothing."""
        if state.generation == generation:
            state.waiting = (generation, time.monotonic()) if now_waiting else None

    def _stall_limit(self, state: StreamState) -> float:
        # Doubled for each reader replaced since the last frame (at most an hour): a pipeline whose
        # open never returns gets a handful of replacements an hour, not three a minute.
        return min(self.options.stall_s * 2 ** state.stalls, 3600.0)

    def _stalled_since(self, state: StreamState, now: float) -> float | None:
        waiting = state.waiting
        if (not state.spec.live or state.finished or waiting is None or waiting[0] != state.generation
                or now - waiting[1] < self._stall_limit(state)):
            return None
        return waiting[1]

    def _stalled(self, now: float) -> bool:
        return any(self._stalled_since(s, now) is not None for s in self.states)

    def _replace_stalled_readers(self) -> None:
        """A live source whose reader has waited in one open or read for its stall limit gets a new
        reader thread; the old one is left where it waits (a read cannot be interrupted from
        outside safely) and leaves when it returns, if ever."""
        now = time.monotonic()
        for state in self.states:
            since = self._stalled_since(state, now)
            if since is None:
                continue
            with self.cond:
                state.generation += 1
                state.waiting = None
                state.stalls += 1
                state.reconnects += 1
            self._set_status(state, "reconnecting", f"no frame for {now - since:.0f} s; opening it again")
            self._start_reader(state)

    def _start_reader(self, state: StreamState) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]  # replaced readers that left
        thread = threading.Thread(target=self._read_loop, args=(state, state.generation),
                                  name=f"rali-reader-{state.id}.{state.generation}", daemon=True)
        self._threads.append(thread)
        thread.start()

    # ---------------------------------------------------------------- scorer

    def _take(self) -> list[Frame]:
        """Up to max_batch pending frames, one per source per round, starting at a rotating source
        so that no source waits behind the others when there are more sources than batch slots."""
        batch: list[Frame] = []
        n = len(self.states)
        order = [self.states[(self._rotation + k) % n] for k in range(n)]
        self._rotation = (self._rotation + 1) % n
        while len(batch) < self.options.max_batch:
            took = False
            for state in order:
                if state.pending and len(batch) < self.options.max_batch:
                    batch.append(state.pending.popleft())
                    took = True
            if not took:
                break
        if batch:
            self.cond.notify_all()  # wake readers waiting for room
        return batch

    def _score(self, batch: list[Frame]) -> None:
        scores = list(self.score_batch([f.image for f in batch]))
        if len(scores) != len(batch):
            raise RuntimeError(f"the scorer returned {len(scores)} scores for {len(batch)} frames")
        self.batches += 1
        now_mono, now_wall = time.monotonic(), time.time()
        for frame, score in zip(batch, scores):
            state = self.states[frame.stream]
            score = float(score)
            with self.cond:
                state.scored += 1
                if math.isfinite(score):
                    state.score_sum += score
                dropped, state.dropped_since_record = state.dropped_since_record, 0
            record = {
                "type": "frame",
                "stream": state.id,
                "source": state.spec.text,
                "frame": frame.index,
                "source_ts": frame.source_ts,
                "wall_time": now_wall,
                "score": score,
                "latency_ms": (now_mono - frame.captured) * 1000.0,
                "dropped": dropped,
            }
            self.sink.write(record)
            if self.monitor is not None:
                self.monitor.scored(state, frame, record)
            self._check_alert(state, frame, score, now_wall)

    def _check_alert(self, state: StreamState, frame: Frame, score: float, now_wall: float) -> None:
        """Alert once when `alert_frames` scores in a row are below the threshold; recover once when
        as many in a row are back at or above it (the same run length both ways: no flapping)."""
        threshold = self.options.alert_below
        if threshold is None or not math.isfinite(score):
            return
        if score < threshold:
            state.below, state.above = state.below + 1, 0
        else:
            state.below, state.above = 0, state.above + 1
        n = self.options.alert_frames
        if not state.alerting and state.below >= n:
            state.alerting = True
            kind = "low"
        elif state.alerting and state.above >= n:
            state.alerting = False
            kind = "recovered"
        else:
            return
        record = {
            "type": "alert",
            "stream": state.id,
            "source": state.spec.text,
            "frame": frame.index,
            "source_ts": frame.source_ts,
            "wall_time": now_wall,
            "score": score,
            "alert": kind,
            "threshold": threshold,
        }
        self.sink.write(record)
        verb = "below" if kind == "low" else "back at or above"
        self.log(f"ALERT stream {state.id} ({state.spec.text}): {kind}: score {verb} {threshold:g} for {n} frames (frame {frame.index}, score {score:.3f})")
        if self.options.on_alert:
            self._run_hook(record)

    def _run_hook(self, record: dict) -> None:
        env = dict(os.environ)
        env.update(
            RALI_ALERT=record["alert"],
            RALI_STREAM_ID=str(record["stream"]),
            RALI_SOURCE=record["source"],
            RALI_FRAME=str(record["frame"]),
            RALI_SCORE=f"{record['score']:.4f}",
            RALI_THRESHOLD=f"{record['threshold']:g}",
            RALI_ALERT_FRAMES=str(self.options.alert_frames),
            RALI_SOURCE_TS="" if record["source_ts"] is None else f"{record['source_ts']:.3f}",
            RALI_WALL_TIME=f"{record['wall_time']:.3f}",
            RALI_RECORD=json.dumps(clean_row(RECORDS, record)),
        )
        self._hooks.submit(self.options.on_alert, env)

    # ---------------------------------------------------------------- summaries

    def summary_lines(self, final: bool = False) -> list[str]:
        now = time.monotonic()
        lines = []
        with self.cond:
            for s in self.states:
                t0, in0, sc0, sum0 = s.window
                dt = max(now - t0, 1e-9)
                if final:
                    mean = s.score_sum / s.scored if s.scored else float("nan")
                    lines.append(
                        f"stream {s.id} [{s.status}] {s.spec.text}: {s.frames_in} in, {s.scored} scored, "
                        f"{s.dropped} dropped, {s.undecodable} undecodable, {s.reconnects} reconnects, mean score {mean:.3f}"
                        + (f" ({s.detail})" if s.status == "failed" else "")
                    )
                    continue
                n_scored = s.scored - sc0
                mean = (s.score_sum - sum0) / n_scored if n_scored else float("nan")
                state = s.status + (f": {s.detail}" if s.status == "reconnecting" else "")
                lines.append(
                    f"stream {s.id} [{state}] {s.spec.text}: in {(s.frames_in - in0) / dt:.1f} fps, "
                    f"scored {n_scored / dt:.1f} fps, dropped {s.dropped}, mean score {mean:.3f}"
                    + (f", undecodable {s.undecodable}" if s.undecodable else "")
                )
                s.window = (now, s.frames_in, s.scored, s.score_sum)
        return lines

    # ---------------------------------------------------------------- run

    def run(self) -> RunResult:
        opts = self.options
        for state in self.states:
            self._start_reader(state)
        start = time.monotonic()
        deadline = None if opts.duration is None else start + opts.duration
        next_summary = start + opts.summary_every if opts.summary_every > 0 else math.inf
        try:
            while True:
                with self.cond:
                    while True:
                        if any(s.pending for s in self.states):
                            break
                        if self.stop.is_set() or all(s.finished for s in self.states):
                            break
                        now = time.monotonic()
                        if deadline is not None and now >= deadline:
                            self.stop.set()
                            continue
                        if now >= next_summary or self._stalled(now):
                            break
                        self.cond.wait(min(0.5, next_summary - now, (deadline or math.inf) - now))
                    batch = self._take()
                    done = not batch and (self.stop.is_set() or all(s.finished for s in self.states))
                if batch:
                    self._score(batch)
                self._replace_stalled_readers()
                if time.monotonic() >= next_summary and not self.stop.is_set():  # (the final summary follows)
                    for line in self.summary_lines():
                        self.log(line)
                    next_summary = time.monotonic() + opts.summary_every
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop.set()
                if done:
                    break
            stopped_by_request = self.stop.is_set()  # (a natural end never sets it)
        finally:
            self.stop.set()
            deadline = time.monotonic() + 2.0  # readers stuck in a read are daemons: not waited for
            for thread in self._threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            self._hooks.close()
        for line in self.summary_lines(final=True):
            self.log(line)
        return RunResult([s.stats() for s in self.states], self.batches, stopped_by_request)


class HookRunner:
    """Runs --on-alert commands one after the other in a thread of its own: scoring never waits
    for a hook, and a "recovered" hook never runs before the "low" one it answers."""

    TIMEOUT = 60.0  # a hung hook is killed so that the next alerts still run
    QUEUE = 100  # alerts waiting for their hook; more are reported, not queued (memory stays bounded)

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.queue: queue.Queue = queue.Queue(self.QUEUE)
        self.thread: threading.Thread | None = None

    def submit(self, command: str, env: dict) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="rali-alert-hooks", daemon=True)
            self.thread.start()
        try:
            self.queue.put_nowait((command, env))
        except queue.Full:
            self.log(f"--on-alert: {self.QUEUE} alerts already wait for their command; this one ({env['RALI_ALERT']}, stream {env['RALI_STREAM_ID']}) is not run")

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            command, env = item
            try:
                # stdout to our stderr: it must never mix into records written to stdout (--out -)
                done = subprocess.run(command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=_stderr_fd(), timeout=self.TIMEOUT)
                if done.returncode:
                    self.log(f"--on-alert command exited with code {done.returncode}")
            except subprocess.TimeoutExpired:
                self.log(f"--on-alert command still running after {self.TIMEOUT:.0f} s: killed")
            except OSError as e:
                self.log(f"--on-alert command could not start: {e}")

    def close(self, timeout: float = 10.0) -> None:
        """Let the queued hooks run (up to `timeout` seconds), then stop the thread."""
        if self.thread is None:
            return
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.log("--on-alert commands still running at exit; not waited for")


def run_streams(sources: list[SourceSpec], score_batch: ScoreBatch, sink, options: StreamOptions | None = None, **kwargs) -> RunResult:
    return StreamRuntime(sources, score_batch, sink, options, **kwargs).run()


# -------------------------------------------------------------------- output


class ListSink:
    """Keeps records in memory (tests, Python callers)."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def frames(self, stream: int | None = None) -> list[dict]:
        return [r for r in self.records if r["type"] == "frame" and (stream is None or r["stream"] == stream)]

    def alerts(self, stream: int | None = None) -> list[dict]:
        return [r for r in self.records if r["type"] == "alert" and (stream is None or r["stream"] == stream)]

    def close(self) -> None:
        pass


# -------------------------------------------------------------------- helpers


_log_lock = threading.Lock()


def _stderr_line(line: str) -> None:
    with _log_lock:  # reader threads and the scorer log at once: keep lines whole
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def _close(reader) -> None:
    if reader is not None:
        try:
            reader.close()
        except Exception:  # noqa: BLE001  closing a broken source must not hide why it broke
            pass


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------ around a run (the CLI's and bench's)
def warm_up(score_batch) -> None:
    """One throw-away call before the readers start: the first call pays for lazy init and kernel
    compilation, which would otherwise show as latency (and drops) on the first real frames."""
    import numpy as np

    score_batch([np.full((224, 224, 3), 128, np.uint8)])


def checked(score_batch):
    def score(frames):
        try:
            return score_batch(frames)
        except RaliEdgeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ScoringError(f"scoring failed: {type(e).__name__}: {e}") from e

    return score


class SafeSink:
    """An Output (rali_edge.outputs) as a stream's sink: a reader that closes standard output
    (`rali-edge stream ... | head`) stops the run cleanly, and a failed write (a full disk) stops
    it and is kept as `failed`, one error for the end, the records before written."""

    def __init__(self, output, stop: threading.Event):
        self.output, self.stop = output, stop
        self.broken = False
        self.failed: OutputError | None = None

    def write(self, record: dict) -> None:
        if not self.broken:
            self._guard(self.output.add, record)

    def close(self) -> None:
        if not self.broken:
            self._guard(self.output.close)

    def _guard(self, call, *args) -> None:
        try:
            call(*args)
        except OutputClosed:
            self.broken = True
            self.stop.set()
        except OutputError as e:
            self.broken = True
            self.stop.set()
            self.failed = OutputError(f"{e}; the frames before were written")
