"""The stream runtime's logic with fake readers and fake scorers (no model, no torch).

Fake frames carry their identity in their pixels (stream id in [0,0,0], frame index in [0,0,1],
a "true score" in [0,0,2]), so a fake scorer can check what it was given and answer known scores.
"""

from __future__ import annotations

import csv
import json
import math
import threading
import time

import numpy as np
import pytest

from rali_edge.images import natural_key
from rali_edge.runtime.sources import SourceError, SourceSpec, open_source, parse_source
from rali_edge.runtime.stream import (
    Backoff,
    FrameSelector,
    ListSink,
    StreamOptions,
    StreamRuntime,
    run_streams,
)

FAST_BACKOFF = Backoff(initial=0.01, factor=2.0, maximum=0.05)


def frame(stream: int, index: int, value: int = 4) -> np.ndarray:
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = (stream, index % 256, value)
    return image


class FakeReader:
    """Yields `n` frames from `start`; optionally raises at one position, or sleeps per frame."""

    def __init__(self, stream, n, start=0, values=None, raise_at=None, delay=0.0, live=False):
        self.stream, self.n, self.pos = stream, n, start
        self.values, self.raise_at, self.delay, self.live = values, raise_at, delay, live
        self.timestamp = None
        self.closed = False

    def grab(self) -> bool:
        if self.raise_at is not None and self.pos == self.raise_at:
            raise OSError("device unplugged")
        if self.pos >= self.n:
            return False
        if self.delay:
            time.sleep(self.delay)
        self.timestamp = self.pos / 25.0
        self.pos += 1
        return True

    def retrieve(self):
        i = self.pos - 1
        return frame(self.stream, i, 4 if self.values is None else self.values[i])

    def close(self):
        self.closed = True


def specs(n, kind="video"):
    return [SourceSpec(f"fake-{i}", kind, f"fake-{i}") for i in range(n)]


def identity_scorer(calls, delay=0.0):
    """Scores = the value planted in each frame; records every batch as (stream, index) pairs."""

    def score(frames):
        calls.append([(int(f[0, 0, 0]), int(f[0, 0, 1])) for f in frames])
        if delay:
            time.sleep(delay)
        return [float(f[0, 0, 2]) for f in frames]

    return score


# ------------------------------------------------------------------ frame selection


def test_every_n_selects_multiples():
    sel = FrameSelector(every=3)
    assert [i for i in range(10) if sel(i, i / 25)] == [0, 3, 6, 9]


def test_fps_on_media_time_is_exact():
    # 25 fps source, --fps 5: every 5th frame; container timestamps are ms-rounded, hence SLACK.
    sel = FrameSelector(fps=5)
    chosen = [i for i in range(50) if sel(i, round(i * 40.0) / 1000)]
    assert chosen == list(range(0, 50, 5))


def test_fps_keeps_long_run_rate_on_a_jittery_clock():
    # 30 fps live source with +-4 ms jitter, --fps 7: 10 s give 70 frames (+-1 at the edges).
    rng = np.random.default_rng(0)
    sel = FrameSelector(fps=7)
    times = np.arange(300) / 30 + rng.uniform(-0.004, 0.004, 300)
    assert abs(sum(sel(i, t) for i, t in enumerate(times)) - 70) <= 1


def test_fps_restarts_after_a_gap_without_a_burst():
    sel = FrameSelector(fps=10)
    assert sel(0, 0.0) and not sel(1, 0.05) and sel(2, 0.1)
    # 5 s without frames (camera reconnecting): the next frame is taken, the one 10 ms later is not
    assert sel(3, 5.0) and not sel(4, 5.01)


def test_backoff_grows_and_caps():
    b = Backoff(initial=0.5, factor=2, maximum=3)
    assert [b.delay(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


# ------------------------------------------------------------------ batching


def test_sources_are_batched_together_and_every_frame_is_scored_once():
    calls = []
    readers = {f"fake-{i}": i for i in range(4)}
    sink = ListSink()
    result = run_streams(
        specs(4),
        identity_scorer(calls, delay=0.005),
        sink,
        StreamOptions(max_batch=8, summary_every=0),
        open_reader=lambda spec, start: FakeReader(readers[spec.text], 30, start),
        log=lambda line: None,
    )
    seen = [pair for batch in calls for pair in batch]
    assert sorted(seen) == [(s, i) for s in range(4) for i in range(30)]  # policy all: every frame, once
    assert all(len(batch) <= 8 for batch in calls)
    # 120 frames one by one would be 120 calls; batched across sources it is ~15.
    assert len(calls) <= 40, len(calls)
    assert any(len({s for s, _ in batch}) == 4 for batch in calls), "no batch mixed all four sources"
    assert result.batches == len(calls)
    for s in range(4):
        assert [r["frame"] for r in sink.frames(s)] == list(range(30))  # in order within a stream
        assert result.streams[s]["status"] == "ended"


def test_more_sources_than_batch_slots_are_served_in_turn():
    # max_batch 2 with 5 sources: rotation keeps every source moving (no starvation).
    calls = []
    sink = ListSink()
    run_streams(
        specs(5),
        identity_scorer(calls),
        sink,
        StreamOptions(max_batch=2, summary_every=0),
        open_reader=lambda spec, start: FakeReader(int(spec.text[-1]), 6, start),
        log=lambda line: None,
    )
    assert all(len(b) <= 2 for b in calls)
    first_ten = {s for batch in calls[:10] for s, _ in batch}
    assert first_ten == set(range(5))
    assert len(sink.frames()) == 30


def test_buffers_stay_bounded_with_a_slow_scorer():
    # The memory bound: under policy all no source holds more than queue_frames frames, under
    # latest never more than one, however slow the scorer.
    peaks = {"all": 0, "latest": 0}
    runtime_box = {}

    def slow(frames):
        rt = runtime_box["rt"]
        for s in rt.states:
            peaks[s.policy] = max(peaks[s.policy], len(s.pending))
        time.sleep(0.01)
        return [1.0] * len(frames)

    sources = [SourceSpec("fake-0", "video", "x"), SourceSpec("fake-1", "network", "y")]
    options = StreamOptions(max_batch=2, queue_frames=3, summary_every=0, frames=40)
    rt = StreamRuntime(
        sources, slow, ListSink(), options,
        open_reader=lambda spec, start: FakeReader(int(spec.text[-1]), 10**6, start, delay=0.0005),
        log=lambda line: None,
    )
    runtime_box["rt"] = rt
    result = rt.run()
    assert rt.states[0].policy == "all" and rt.states[1].policy == "latest"  # defaults by source kind
    assert 1 <= peaks["all"] <= 3
    assert peaks["latest"] <= 1
    assert result.streams[0]["scored"] == 40


# ------------------------------------------------------------------ policy latest


def test_latest_policy_counts_drops_exactly():
    calls = []
    sink = ListSink()
    result = run_streams(
        specs(2),
        identity_scorer(calls, delay=0.02),  # 20 ms per batch, frames every ~1 ms: most are dropped
        sink,
        StreamOptions(policy="latest", summary_every=0),
        open_reader=lambda spec, start: FakeReader(int(spec.text[-1]), 60, start, delay=0.001),
        log=lambda line: None,
    )
    for s in range(2):
        stats = result.streams[s]
        records = sink.frames(s)
        assert stats["frames_in"] == 60
        assert stats["dropped"] > 0
        assert stats["frames_in"] == stats["scored"] + stats["dropped"]
        assert stats["scored"] == len(records)
        # Every drop is reported once, on the record of the frame that replaced it.
        assert sum(r["dropped"] for r in records) == stats["dropped"]
        indices = [r["frame"] for r in records]
        assert indices == sorted(indices) and indices[-1] == 59  # newest frames; the last is never dropped


# ------------------------------------------------------------------ faults


def test_reader_that_raises_is_reopened_where_it_stopped_and_others_continue():
    opened = []
    logs = []

    def open_reader(spec, start):
        opened.append((spec.text, start))
        s = int(spec.text[-1])
        # stream 0 fails at frame 10 on its first opening only
        raise_at = 10 if s == 0 and len([o for o in opened if o[0] == spec.text]) == 1 else None
        return FakeReader(s, 30, start, raise_at=raise_at)

    sink = ListSink()
    result = run_streams(
        specs(3), identity_scorer([]), sink,
        StreamOptions(summary_every=0, backoff=FAST_BACKOFF),
        open_reader=open_reader, log=logs.append,
    )
    assert ("fake-0", 10) in opened  # resumed at the frame that failed
    for s in range(3):
        assert [r["frame"] for r in sink.frames(s)] == list(range(30))
        assert result.streams[s]["status"] == "ended"
    assert result.streams[0]["reconnects"] == 1
    assert any("reconnecting" in line and "device unplugged" in line for line in logs)


def test_a_live_reader_stuck_in_a_read_is_replaced_and_the_stream_goes_on():
    """A live source whose read never returns (a GStreamer pipeline after its camera came back,
    as seen on a real RTSP server): after stall_s a new reader opens it again and scoring goes on;
    the stuck reader, when it finally returns, leaves without touching the stream."""
    release = threading.Event()
    opened = []

    class StuckReader(FakeReader):
        def grab(self):
            if self.pos == 5:
                release.wait()  # blocked, as a read that never returns
                return True
            return super().grab()

    def open_reader(spec, start):
        opened.append(start)
        return (StuckReader if len(opened) == 1 else FakeReader)(0, 10**6, 0, live=True, delay=0.01)

    sink, logs = ListSink(), []
    result = run_streams(
        [SourceSpec("cam", "network", "rtsp://cam")], identity_scorer([]), sink,
        StreamOptions(summary_every=0, backoff=FAST_BACKOFF, stall_s=0.5, duration=2.5, policy="all"),
        open_reader=open_reader, log=logs.append,
    )
    release.set()  # the stuck read returns now: its reader must leave quietly
    time.sleep(0.2)
    assert len(opened) == 2 and result.streams[0]["reconnects"] == 1
    assert any("no frame for" in line and "opening it again" in line for line in logs)
    frames = [r["frame"] for r in sink.frames(0)]
    assert frames[:5] == list(range(5)) and len(frames) > 20  # scored before and after the stall
    assert len(set(frames)) == len(frames)  # no frame index twice


def test_file_that_becomes_unreadable_fails_after_retries_and_others_finish():
    attempts = []

    def open_reader(spec, start):
        if spec.text == "fake-1":
            attempts.append(start)
            if len(attempts) > 1:
                raise OSError("permission denied")
            return FakeReader(1, 20, start, raise_at=5)  # reads 5 frames, then the file goes away
        return FakeReader(0, 20, start)

    sink = ListSink()
    result = run_streams(
        specs(2), identity_scorer([]), sink,
        StreamOptions(summary_every=0, backoff=FAST_BACKOFF, file_retries=3),
        open_reader=open_reader, log=lambda line: None,
    )
    assert attempts == [0, 5, 5, 5]  # the first opening, then 3 retries resuming at frame 5
    assert [s["status"] for s in result.streams] == ["ended", "failed"]
    assert [s["stream"] for s in result.failed] == [1]
    assert len(sink.frames(0)) == 20 and len(sink.frames(1)) == 5


def test_file_that_never_opens_fails_at_once():
    attempts = []

    def open_reader(spec, start):
        attempts.append(spec.text)
        raise OSError("not a video")

    result = run_streams(specs(1), identity_scorer([]), ListSink(), StreamOptions(summary_every=0),
                         open_reader=open_reader, log=lambda line: None)
    assert attempts == ["fake-0"] and result.streams[0]["status"] == "failed"


def test_live_source_keeps_reconnecting_with_backoff_until_stopped():
    attempts = []

    def open_reader(spec, start):
        if spec.kind == "network":
            attempts.append(time.monotonic())
            raise OSError("connection refused")
        return FakeReader(0, 10**6, start, delay=0.002)

    sources = [SourceSpec("rtsp://cam/1", "network", "rtsp://cam/1"), SourceSpec("fake-0", "network", "x")]
    sources[1] = SourceSpec("fake-0", "gstreamer", "x ! appsink")
    lines = []
    result = run_streams(
        sources, identity_scorer([]), ListSink(),
        StreamOptions(summary_every=0.1, duration=0.6, backoff=Backoff(0.02, 2.0, 0.08)),
        open_reader=open_reader, log=lines.append,
    )
    assert result.stopped
    gaps = np.diff(attempts)
    assert len(attempts) >= 4
    # delays 0.02, 0.04, 0.08, 0.08...: growing then capped (generous upper bound: shared CPU)
    assert gaps[0] >= 0.02 and gaps[2] >= 0.08 and gaps[1] < gaps[2] + 0.05
    assert result.streams[0]["status"] == "stopped" and result.streams[1]["scored"] > 10
    assert any("stream 0 [reconnecting" in line for line in lines)  # the state shows in summaries


# ------------------------------------------------------------------ alerts


def test_alert_fires_once_and_recovers_once_with_hook_env(tmp_path):
    values = [4] * 20 + [1] * 20 + [4] * 20
    values[30] = 4  # one good frame inside the bad run must not recover the alert (no flapping)
    hook_log = tmp_path / "hook.txt"
    sink = ListSink()
    run_streams(
        specs(1), identity_scorer([]), sink,
        StreamOptions(summary_every=0, alert_below=2.5, alert_frames=5,
                      on_alert=f'echo "$RALI_ALERT $RALI_STREAM_ID $RALI_SOURCE $RALI_FRAME $RALI_SCORE $RALI_THRESHOLD" >> {hook_log}'),
        open_reader=lambda spec, start: FakeReader(0, 60, start, values=values),
        log=lambda line: None,
    )
    alerts = sink.alerts()
    assert [(a["alert"], a["frame"]) for a in alerts] == [("low", 24), ("recovered", 44)]
    assert alerts[0]["threshold"] == 2.5 and alerts[0]["score"] == 1.0
    # records come in order: the alert follows the frame that triggered it
    kinds = [(r["type"], r["frame"]) for r in sink.records]
    assert kinds.index(("alert", 24)) == kinds.index(("frame", 24)) + 1
    assert hook_log.read_text().splitlines() == ["low 0 fake-0 24 1.0000 2.5", "recovered 0 fake-0 44 4.0000 2.5"]


def test_no_alert_for_a_short_dip():
    values = [4] * 10 + [1] * 4 + [4] * 10
    sink = ListSink()
    run_streams(
        specs(1), identity_scorer([]), sink,
        StreamOptions(summary_every=0, alert_below=2.5, alert_frames=5),
        open_reader=lambda spec, start: FakeReader(0, len(values), start, values=values),
        log=lambda line: None,
    )
    assert sink.alerts() == []


# ------------------------------------------------------------------ stop, limits


def test_stop_scores_what_was_taken_and_nothing_after():
    stop = threading.Event()
    calls = []

    def score(frames):
        if len(calls) == 3:
            stop.set()  # as the SIGINT handler does
        return identity_scorer(calls, delay=0.005)(frames)

    sink = ListSink()
    result = run_streams(
        specs(2), score, sink, StreamOptions(summary_every=0, max_batch=2, queue_frames=4),
        open_reader=lambda spec, start: FakeReader(int(spec.text[-1]), 10**6, start),
        stop=stop, log=lambda line: None,
    )
    assert result.stopped
    for s in result.streams:
        assert s["frames_in"] == s["scored"]  # the buffered frames were scored, none lost
        assert s["status"] == "stopped"
    assert len(sink.frames()) == sum(s["scored"] for s in result.streams) < 40


def test_frames_limit_and_every():
    sink = ListSink()
    result = run_streams(
        specs(1), identity_scorer([]), sink, StreamOptions(summary_every=0, every=4, frames=5),
        open_reader=lambda spec, start: FakeReader(0, 100, start), log=lambda line: None,
    )
    assert [r["frame"] for r in sink.frames()] == [0, 4, 8, 12, 16]
    assert result.streams[0]["frames_read"] == 17


def test_loop_restarts_files():
    sink = ListSink()
    run_streams(
        specs(1), identity_scorer([]), sink, StreamOptions(summary_every=0, loop=True, frames=25),
        open_reader=lambda spec, start: FakeReader(0, 10, start), log=lambda line: None,
    )
    frames = sink.frames()
    assert len(frames) == 25 and [r["frame"] for r in frames] == list(range(25))  # indices keep counting
    assert [r["source_ts"] for r in frames[9:12]] == [0.36, 0.0, 0.04]  # media time restarts


def test_realtime_paces_files_at_their_frame_rate():
    # FakeReader stamps frame i at i/25 s: 11 frames span 0.4 s of media time, so reading them
    # "as a camera would" cannot take less (a lower bound only: a busy machine may take longer).
    start = time.monotonic()
    sink = ListSink()
    run_streams(specs(1), identity_scorer([]), sink, StreamOptions(summary_every=0, realtime=True),
                open_reader=lambda spec, start: FakeReader(0, 11, start), log=lambda line: None)
    assert time.monotonic() - start >= 0.4
    assert len(sink.frames()) == 11


def test_scorer_error_stops_the_run():
    def broken(frames):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_streams(
            specs(2), broken, ListSink(), StreamOptions(summary_every=0),
            open_reader=lambda spec, start: FakeReader(int(spec.text[-1]), 10**6, start), log=lambda line: None,
        )


# ------------------------------------------------------------------ writers


RECORD = {"type": "frame", "stream": 1, "source": "a,b ! appsink", "frame": 3, "source_ts": None,
          "wall_time": 1700000000.123456789, "score": 3.123456, "latency_ms": 12.3456, "dropped": 2}


def test_jsonl_records_are_whole_lines_and_rounded(tmp_path):
    from rali_edge.outputs import Output
    from rali_edge.runtime.stream import RECORDS

    out = Output(tmp_path / "r.jsonl", RECORDS)
    out.add(RECORD)
    out.add({**RECORD, "score": math.nan})
    lines = (tmp_path / "r.jsonl").read_text().splitlines()  # on disk before close
    first = json.loads(lines[0])
    assert first["score"] == 3.1235 and first["latency_ms"] == 12.35 and first["source_ts"] is None
    assert json.loads(lines[1])["score"] is None  # NaN is not JSON


def test_csv_records_have_a_header_and_quoting(tmp_path):
    from rali_edge.outputs import Output
    from rali_edge.runtime.stream import RECORDS

    with Output(tmp_path / "r.csv", RECORDS, "csv") as out:
        out.add(RECORD)
        out.add({"type": "alert", "stream": 1, "source": "s", "frame": 9, "source_ts": 0.5, "wall_time": 1.0,
                 "score": 1.0, "alert": "low", "threshold": 2.5})
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[0]["source"] == "a,b ! appsink" and rows[0]["score"] == "3.1235" and rows[0]["alert"] == ""
    assert rows[1]["alert"] == "low" and rows[1]["latency_ms"] == "" and rows[1]["threshold"] == "2.5000"


# ------------------------------------------------------------------ sources


def test_parse_source_kinds(tmp_path):
    video = tmp_path / "clip.avi"
    video.write_bytes(b"x")
    (tmp_path / "img.png").write_bytes(b"x")
    cases = {
        str(video): ("video", False),
        str(tmp_path): ("folder", False),
        str(tmp_path / "img.png"): ("image", False),
        f"file://{video}": ("video", False),
        "/dev/video0": ("v4l2", True),
        "v4l2:///dev/video2?width=1280&height=720&fourcc=MJPG": ("v4l2", True),
        "rtsp://user:pw@10.0.0.5:554/stream1": ("network", True),
        "http://cam.local/mjpg": ("network", True),
        "nvarguscamerasrc sensor-id=0 ! nvvidconv ! appsink": ("gstreamer", True),
    }
    for text, (kind, live) in cases.items():
        spec = parse_source(text)
        assert (spec.kind, spec.live) == (kind, live), text
        assert spec.default_policy == ("latest" if live else "all")
    spec = parse_source("v4l2:///dev/video2?width=1280&height=720&fourcc=MJPG")
    assert spec.target == "/dev/video2" and spec.options == {"width": 1280, "height": 720, "fourcc": "MJPG"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("no/such/clip.mp4", "not found"),
        ("videotestsrc ! fakesink", "appsink"),
        ("v4l2:///dev/video0?exposure=3", "unknown v4l2 option"),
        ("ftp://host/clip.mp4", "unknown source scheme"),
    ],
)
def test_parse_source_errors(text, message):
    with pytest.raises(SourceError, match=message):
        parse_source(text)


def test_folder_reads_in_natural_order_and_skips_bad_images(tmp_path):
    from PIL import Image

    for i in (10, 2, 1):
        Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(tmp_path / f"f{i}.png")
    (tmp_path / "f5.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    assert sorted(["f10.png", "f2.png"], key=natural_key) == ["f2.png", "f10.png"]
    sink, lines = ListSink(), []
    result = run_streams([parse_source(str(tmp_path))], lambda fs: [float(f[0, 0, 0]) for f in fs], sink,
                         StreamOptions(summary_every=0), log=lines.append)
    assert [r["score"] for r in sink.frames()] == [1.0, 2.0, 10.0]
    assert [r["frame"] for r in sink.frames()] == [0, 1, 3]  # f5.png (index 2) could not be decoded
    assert result.streams[0]["undecodable"] == 1 and any("f5.png" in line for line in lines)
    assert any("could not be decoded" in line for line in lines) and not any("skipped" in line for line in lines)


def test_video_file_reader_resumes_at_a_frame(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "ramp.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 32))
    for i in range(20):
        writer.write(np.full((32, 32, 3), (i * 12, 0, 255 - i * 12), np.uint8))  # BGR
    writer.release()
    reader = open_source(parse_source(str(path)), start_frame=10)
    assert reader.grab()
    rgb = reader.retrieve()
    reader.close()
    # MJPEG is lossy: +-6 levels on flat colours. BGR (120, 0, 135) must come back as RGB (135, 0, 120).
    assert abs(reader.timestamp - 0.4) < 1e-6
    assert np.allclose(rgb[16, 16], (135, 0, 120), atol=6)


def test_a_camera_that_is_not_there_says_so_while_it_is_retried():
    pytest.importorskip("cv2")
    from rali_edge.errors import SourceOpenError
    from rali_edge.runtime.sources import VideoReader

    with pytest.raises(SourceOpenError, match=r"there is no /dev/video97 \(cameras here: "):
        VideoReader(parse_source("/dev/video97"))
