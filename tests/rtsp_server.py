"""A real RTSP server for the tests and the soak bench: GStreamer's gst-rtsp-server, through
python3-gi (Debian: gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-ugly for x264enc). Run
with the system Python that has `gi`:

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --streams 4

serves rtsp://127.0.0.1:8554/cam0 ... /cam3: live test patterns (a different one each), H.264
over RTP, 320x240 at --fps. It prints "ready" on stdout once it listens, and serves until
SIGTERM or SIGINT.
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PATTERNS = ("smpte", "ball", "snow", "pinwheel", "gradient", "circular", "spokes", "colors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--fps", type=int, default=10)
    args = ap.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    for i in range(args.streams):
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(
            f"( videotestsrc is-live=true pattern={PATTERNS[i % len(PATTERNS)]} ! "
            f"video/x-raw,width=320,height=240,framerate={args.fps}/1 ! videoconvert ! "
            "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )")
        factory.set_shared(True)  # one encoder per camera, however many clients
        server.get_mount_points().add_factory(f"/cam{i}", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
