"""Soak of `rali-edge stream` on real RTSP cameras, as a user runs it: four cameras of a real RTSP
server on 127.0.0.1 (GStreamer's gst-rtsp-server, tests/rtsp_server.py), two read through FFmpeg
(rtsp://) and two through GStreamer pipelines (rtspsrc ... ! appsink), scored for --seconds with
--http on, while the server is stopped and started again twice.

Every --sample-every seconds it records the stream process's resident memory and checks /metrics
against the JSONL output: for each stream, the records on disk before the scrape <= the scrape's
frames scored <= the records on disk after it. At the end: each stream's frame indices are unique
(no record repeated), the final summary's scored count equals its records (none lost), every
stream reconnected after each restart, and the RSS of the second half is flat.

    python bench/rtsp_soak.py --rali-edge ~/rali/bin/rali-edge --seconds 600 --out bench/results/rtsp-soak-cpu.md

--rali-edge is the command of an environment whose OpenCV has GStreamer and FFmpeg (Debian's or
JetPack's python3-opencv, installed as docs/streams-and-jetson.md says); the server runs with
/usr/bin/python3 (python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-ugly).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, cameras: int) -> subprocess.Popen:
    server = subprocess.Popen(["/usr/bin/python3", str(ROOT / "tests" / "rtsp_server.py"), "--port", str(port),
                               "--streams", str(cameras)], stdout=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "ready":
        raise SystemExit("the RTSP server did not start")
    return server


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def records_per_stream(path: Path, cameras: int) -> list[int]:
    counts = [0] * cameras
    if path.exists():
        for line in path.read_text().splitlines():
            if '"type": "frame"' in line:
                counts[json.loads(line)["stream"]] += 1
    return counts


def scraped(base: str, cameras: int) -> list[int]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts = [0] * cameras
    for m in re.finditer(r'^rali_stream_frames_scored_total\{[^}]*stream="(\d+)"[^}]*\} ([\d.e+]+)$', text, re.M):
        counts[int(m.group(1))] = int(float(m.group(2)))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rali-edge", required=True, help="the rali-edge command of an environment with GStreamer's OpenCV")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--fps", type=float, default=5)
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/rali-rtsp-soak"))
    ap.add_argument("--out", type=Path, help="the results, as markdown (and a .json beside it)")
    args = ap.parse_args()

    cameras, port, http = 4, free_port(), free_port()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "frames.jsonl"
    out.unlink(missing_ok=True)
    server = start_server(port, cameras)
    sources = [f"rtsp://127.0.0.1:{port}/cam0", f"rtsp://127.0.0.1:{port}/cam1"] + [
        f"rtspsrc location=rtsp://127.0.0.1:{port}/cam{i} latency=0 ! rtph264depay ! h264parse ! avdec_h264 ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1" for i in (2, 3)]
    command = [args.rali_edge, "stream", *sources, "--fps", str(args.fps), "--duration", str(args.seconds),
               "--http", f"127.0.0.1:{http}", "--out", str(out), "--summary-every", "60"]
    stream = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    base, start, samples, restarts, problems = f"http://127.0.0.1:{http}", time.monotonic(), [], [], []
    restart_at = [args.seconds / 3, 2 * args.seconds / 3]
    while stream.poll() is None:
        time.sleep(args.sample_every)
        t = time.monotonic() - start
        if restart_at and t >= restart_at[0]:
            restart_at.pop(0)
            stop(server)
            gone = time.time()
            time.sleep(5)
            server = start_server(port, cameras)
            restarts.append({"gone": gone, "back": time.time()})
        try:
            before = records_per_stream(out, cameras)
            metrics = scraped(base, cameras)
            after = records_per_stream(out, cameras)
        except OSError:
            continue  # the run has just ended
        consistent = all(b <= m <= a for b, m, a in zip(before, metrics, after))
        if not consistent:
            problems.append(f"t {t:.0f} s: records {before}..{after}, /metrics {metrics}")
        samples.append({"t": round(t, 1), "rss_mib": round(rss_mib(stream.pid), 1), "scored": metrics,
                        "metrics_consistent": consistent})
        print(f"t {t:6.0f} s  rss {samples[-1]['rss_mib']:7.1f} MiB  scored {metrics}  consistent {consistent}",
              flush=True)
    err = stream.stderr.read()
    stop(server)

    frames = [json.loads(line) for line in out.read_text().splitlines() if '"type": "frame"' in line]
    final = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^stream (\d) \[.*?: \d+ in, (\d+) scored", err, re.M)}
    for s in range(cameras):
        mine = [r for r in frames if r["stream"] == s]
        if len({r["frame"] for r in mine}) != len(mine):
            problems.append(f"stream {s}: a record repeated")
        if final.get(s) != len(mine):
            problems.append(f"stream {s}: {final.get(s)} scored, {len(mine)} records written")
        for r in restarts:
            if not any(f["wall_time"] > r["back"] for f in mine):
                problems.append(f"stream {s}: nothing scored after the restart at {r['back']:.0f}")
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2]
    verdict = {
        "cameras": cameras, "seconds": round(time.monotonic() - start), "fps_per_camera": args.fps,
        "restarts": len(restarts), "records": len(frames), "per_stream": [sum(r["stream"] == s for r in frames)
                                                                         for s in range(cameras)],
        "rss_start_mib": samples[0]["rss_mib"], "rss_peak_mib": max(s["rss_mib"] for s in samples),
        "rss_end_mib": samples[-1]["rss_mib"],
        "second_half_growth_mib": round(half[-1]["rss_mib"] - half[0]["rss_mib"], 1),
        "metrics_checks": len(samples), "problems": problems, "exit_code": stream.returncode,
    }
    print(json.dumps(verdict, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"verdict": verdict, "samples": samples}, indent=1) + "\n")
        curve = "\n".join(f"| {s['t']:.0f} | {s['rss_mib']:.1f} | {sum(s['scored'])} | {s['metrics_consistent']} |"
                          for s in samples)
        args.out.write_text(
            f"# Stream soak on real RTSP cameras\n\n"
            f"- Command: `python bench/rtsp_soak.py --rali-edge RALI_EDGE --seconds {args.seconds:g} --fps {args.fps:g}`, "
            f"RALI_EDGE from a venv made as docs/streams-and-jetson.md says (Debian's python3-opencv).\n"
            f"- Machine: {platform.machine()}, {platform.system()} {platform.release()}, Python of the server "
            f"{subprocess.run(['/usr/bin/python3', '--version'], capture_output=True, text=True).stdout.strip()}.\n"
            f"- Cameras: 4 live test patterns (320x240, 10 fps, H.264 over RTP) of gst-rtsp-server on 127.0.0.1; "
            f"2 read through FFmpeg, 2 through GStreamer pipelines; scored at {args.fps:g} fps each by the built-in "
            f"model (backend auto), with --http; the server stopped for 5 s and started again twice.\n\n"
            f"## Verdict\n\n```json\n{json.dumps(verdict, indent=1)}\n```\n\n"
            f"## Samples\n\n| t s | RSS MiB | frames scored | /metrics within the records |\n|---:|---:|---:|---|\n{curve}\n")
    return 0 if not problems and stream.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
