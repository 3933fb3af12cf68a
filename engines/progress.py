"""Numbered steps with their durations, on stderr: what builds, auto's first use and the engine
cache print while they work (`Progress(quiet=True)` prints nothing)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


class Progress:
    """Numbered steps with their duration. On a terminal the running step shows its elapsed time
    (and TensorRT's build phases) on one refreshed line; in logs, one line per event."""

    def __init__(self, total: int = 0, out=None, live: bool | None = None, quiet: bool = False):
        self.total, self.index = total, 0
        self.quiet = quiet
        self.out = out or sys.stderr
        self.live = (not quiet) and (self.out.isatty() if live is None else live)
        self._status, self._lock = "", threading.Lock()

    @contextmanager
    def step(self, title: str):
        self.index += 1
        self.total = max(self.total, self.index)  # a step nobody counted in advance: never "[1/0]"
        label = f"[{self.index}/{self.total}] {title}"
        start = time.perf_counter()
        stop = threading.Event()
        if self.live:
            ticker = threading.Thread(target=self._tick, args=(label, start, stop), daemon=True)
            ticker.start()
        else:
            self._line(f"{label} ...")
        try:
            yield self
        except BaseException:
            stop.set()
            self._finish(f"{label}: failed after {time.perf_counter() - start:.1f} s")
            raise
        stop.set()
        self._finish(f"{label}: done in {time.perf_counter() - start:.1f} s")

    def status(self, text: str) -> None:
        """A sub-status of the running step (a TensorRT phase, say)."""
        with self._lock:
            changed, self._status = text != self._status, text
        if changed and not self.live:
            self._line(f"    {text}")

    def note(self, text: str) -> None:
        """A line between steps: a warning, or what a step decided."""
        self._line(text)

    def tensorrt_callback(self, event: str, phase: str, step: int, total: int) -> bool:
        if event == "start" and not self.live:
            self.status(f"{phase} ({total} steps)" if total else phase)
        elif self.live and event in ("start", "step"):
            self.status(f"{phase} {step}/{total}" if total else phase)
        return True  # never cancel; Ctrl-C is handled by the monitor itself

    def _tick(self, label: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            with self._lock:
                status = f"  {self._status}" if self._status else ""
            self.out.write(f"\r\x1b[2K{label} ... {time.perf_counter() - start:5.0f} s{status}"[:200])
            self.out.flush()

    def _finish(self, text: str) -> None:
        with self._lock:
            self._status = ""
        if self.live:
            self.out.write("\r\x1b[2K")
        self._line(text)

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        self.out.write(text + "\n")
        self.out.flush()


__all__ = ["Progress"]
