"""Finding this machine's processes by their command lines (Ray names its workers there), for
tests that kill one."""

from __future__ import annotations

from pathlib import Path


def pids_with(*words: str) -> list[int]:
    """The processes whose command line holds every one of `words`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue  # ended while we looked
            if all(word in title for word in words):
                pids.append(int(entry.name))
    return pids
