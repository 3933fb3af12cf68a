"""Score results as files: the formats of `rali-edge score`, written as they come, and resuming.

csv (path,score,error) and jsonl (one {path, score} or {path, error} object per line) are written
and flushed row by row, so a run killed at any moment keeps every finished row; parquet is a folder
of part files, one every PART_ROWS rows or PART_SECONDS seconds (a killed run loses at most those); json
(one list) and table are written at the end, since neither is valid before it is complete.
`resume=True` reads the paths an earlier run of the same output already has (csv, jsonl, parquet),
drops a last line that was cut off mid-write, and appends: see `ResultFile.done`.

    with ResultFile("scores.jsonl", "jsonl", resume=True) as out:
        todo = [p for p in paths if p not in out.done]
        for result in scorer.score_files(todo):
            out.add(result)
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from rali_edge.errors import OutputClosed, OutputError, UsageError

FORMATS = ("table", "json", "csv", "jsonl", "parquet")
STREAMED = ("csv", "jsonl", "parquet")  # written as scored; the ones --resume can continue
CSV_HEADER = ["path", "score", "error"]
# A parquet output is a folder of part files (as Spark, Dask and Ray write them; pandas, pyarrow,
# polars and DuckDB read the folder as one table). Each part is complete when it appears: a file
# killed before its footer would be unreadable, rows and all. A part is written every
# PART_ROWS rows or PART_SECONDS seconds, whichever comes first.
PART_ROWS = 4096
PART_SECONDS = 5.0
PART_GLOB = "part-*.parquet"


def why_not_writable(path: str | Path, folder: bool = False) -> str | None:
    """Why `path` cannot be written, found by trying, or None when it can: an existing file (or
    device) is opened for appending, which changes nothing and needs no write access to its folder;
    otherwise a temporary file is made in the folder. `path` is a file to write (or a folder of
    parts when it is one), or with `folder` a folder to write files into, made with its parents if
    missing (so its first existing ancestor is tried). Permission bits alone do not tell: /proc, a
    read-only mount or a full quota answer only when written to."""
    path = Path(path)
    if folder:
        path = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        if not path.is_dir():
            return f"{path} is a file, not a folder"
    where = path if path.is_dir() else path.parent
    if where.exists() and not where.is_dir():
        return f"{where} is a file, not a folder"
    if not where.is_dir():
        return f"the folder {where} does not exist (create it first)"
    try:
        if path.is_file() or path.is_char_device():  # a file, or a device such as /dev/null
            with open(path, "ab"):
                pass
        elif path.is_dir() or not path.exists():  # a folder to write into, or a file to make
            with tempfile.TemporaryFile(dir=where):
                pass
        # else a FIFO or socket: opening it would wait for its reader, so it is taken as it is
    except OSError as e:
        return e.strerror or str(e)
    return None


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null after a write to it failed: what Python still
    buffers would fail again when it flushes at exit (a second message, and exit code 120)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # no file descriptor (a test's captured stdout)
        pass


def format_for(path: str | Path | None, fmt: str | None) -> str:
    """The format asked for, else the one the output's suffix names (.csv, .jsonl, .json), else table."""
    if fmt:
        return fmt
    suffix = Path(path).suffix.lower() if path else ""
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(suffix, "table")


class ResultFile:
    """Where FileResults go: `path` (None: stdout) in `fmt`; see the module doc."""

    def __init__(self, path: str | Path | None, fmt: str, resume: bool = False):
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if fmt == "parquet" and path is None:
            raise UsageError("--format parquet writes a folder of part files: give -o FOLDER.parquet")
        if resume and (path is None or fmt not in STREAMED):
            raise UsageError(f"--resume continues an output file written as it is scored: give -o FILE with "
                             f"--format {' or '.join(STREAMED)}")
        self.fmt, self.path, self.resume = fmt, path, resume
        self.count = 0  # results added
        self.results = []  # kept only for the formats written at the end (json, table)
        self.done: set[str] = set()
        self._complete = None  # with resume: the byte length of the earlier run's complete lines
        if resume:
            self.done, self._complete = _finished_paths(Path(path), fmt)
        self.out = None  # opened at the first result: a run that fails before one leaves the file as it was

    @contextmanager
    def _writing(self):
        """An OSError while writing (a full disk) becomes one OutputError, and the output is left as
        it is: the rows written before stay, nothing is written after."""
        try:
            yield
        except OSError as e:
            if not self.path:  # what stdout still buffers would fail again when Python flushes it at exit
                self.out = False
                silence_stdout()
                if isinstance(e, BrokenPipeError):
                    raise OutputClosed("standard output was closed by its reader") from None
            if self.path and self.out not in (None, False) and hasattr(self.out, "close"):
                try:
                    self.out.close()
                except OSError:
                    pass
            self.out = False
            raise OutputError(f"writing {self.path or 'standard output'}: {e.strerror or e}") from None

    def _open(self) -> None:
        if self.fmt == "parquet":
            self.out = _ParquetParts(Path(self.path))
            return
        if self._complete is not None and Path(self.path).stat().st_size != self._complete:
            with open(self.path, "r+b") as f:  # a last line cut off by a kill: its image is scored again
                f.truncate(self._complete)
        appending = self.resume and Path(self.path).exists() and Path(self.path).stat().st_size > 0
        self.out = open(self.path, "a" if appending else "w", newline="", encoding="utf-8") if self.path else sys.stdout
        if self.fmt == "csv":
            self.csv = csv.writer(self.out, lineterminator="\n")
            if not appending:
                self.csv.writerow(CSV_HEADER)

    def add(self, result) -> None:
        with self._writing():
            self._add(result)

    def _add(self, result) -> None:
        if self.out is None:
            self._open()
        self.count += 1
        if self.fmt == "csv":
            self.csv.writerow([result.path, "" if result.score is None else f"{result.score:.6f}", result.error or ""])
        elif self.fmt == "jsonl":
            self.out.write(json.dumps(result.to_dict()) + "\n")
        elif self.fmt == "parquet":
            self.out.add(result)
            return
        else:
            self.results.append(result)
        if self.fmt in STREAMED:
            self.out.flush()

    def close(self, create: bool = True) -> None:
        """Finish the output. With no result yet it is still written, a valid empty output, unless
        `create` is False (a run that failed before its first result leaves -o as it was)."""
        if self.out is False:
            return
        if self.out is None and not create:
            self.out = False
            return
        try:
            with self._writing():
                self._close()
        except OutputClosed:  # at the end (json, table): the reader has gone, nothing is lost to it
            pass

    def _close(self) -> None:
        if self.out is None:
            self._open()
        if self.fmt == "parquet":
            self.out.close()
            self.out = False
            return
        if self.fmt == "json":
            json.dump([r.to_dict() for r in self.results], self.out, indent=1)
            self.out.write("\n")
        elif self.fmt == "table":
            self.out.write(f"{'score':>7}  path\n")
            for r in self.results:
                shown = f"{r.score:7.3f}" if r.error is None else "  error"
                self.out.write(f"{shown}  {r.path}" + (f"  ({r.error})" if r.error else "") + "\n")
        self.out.flush()
        if self.path:
            self.out.close()
        self.out = False  # closed: not reopened

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finished_paths(path: Path, fmt: str) -> tuple[set[str], int | None]:
    """The paths an earlier run wrote to `path` (error rows included: a bad file stays bad), and the
    length of its complete lines: a last line without its newline was cut off by a kill, and is
    dropped (by `_open`, once there is a result to write) and its image scored again. Nothing is
    changed here: a file that is not a rali-edge output is refused as it is."""
    if not path.exists():
        return set(), None
    if fmt == "parquet":
        return _ParquetParts.finished_paths(path), None
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    text = complete.decode("utf-8", errors="replace")
    if fmt == "jsonl":
        try:
            return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}, len(complete)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"--resume: {path} is not a rali-edge jsonl output (one {{path, ...}} per line)") from None
    rows = list(csv.reader(io.StringIO(text)))
    if rows and rows[0] != CSV_HEADER:
        raise UsageError(f"--resume: {path} is not a rali-edge csv output (its header is not {','.join(CSV_HEADER)})")
    return {row[0] for row in rows[1:] if row}, len(complete)


class _ParquetParts:
    """The parquet output: a folder of part-NNNNNN.parquet files (see PART_ROWS), each written under a
    temporary name and renamed when complete, so that a reader never sees a half-written part."""

    def __init__(self, folder: Path):
        pa, self.pq = _pyarrow()
        self.schema = pa.schema([("path", pa.string()), ("score", pa.float64()), ("error", pa.string())])
        self.pa, self.folder = pa, folder
        _check_parts_folder(folder)
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(".part-*.tmp"):  # a part a killed run was writing: its rows are scored again
            stale.unlink()
        self.next = 1 + max((int(p.stem.split("-")[1]) for p in folder.glob(PART_GLOB)), default=-1)
        self.rows: list = []
        self.last = time.monotonic()

    def add(self, result) -> None:
        self.rows.append(result)
        if len(self.rows) >= PART_ROWS or time.monotonic() - self.last >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = self.pa.table({"path": [r.path for r in self.rows], "score": [r.score for r in self.rows],
                               "error": [r.error for r in self.rows]}, schema=self.schema)
        name = f"part-{self.next:06d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        self.pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)
        self.next, self.rows, self.last = self.next + 1, [], time.monotonic()

    def close(self) -> None:
        self.flush()

    @staticmethod
    def finished_paths(folder: Path) -> set[str]:
        _check_parts_folder(folder)
        _, pq = _pyarrow()
        done: set[str] = set()
        for part in sorted(folder.glob(PART_GLOB)):
            try:
                done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"--resume: {part} is not a readable rali-edge part ({e}); move it away") from None
        return done


def _check_parts_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; a parquet output is a folder of part files: give a new name")
    if folder.is_dir():
        foreign = [p.name for p in folder.iterdir() if not (p.match(PART_GLOB) or p.name.endswith(".tmp"))]
        if foreign:
            raise UsageError(f"{folder} holds files that are not rali-edge parts ({', '.join(sorted(foreign)[:3])}); "
                             "give a new folder name")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from rali_edge.errors import MissingDependencyError

        raise MissingDependencyError("--format parquet needs pyarrow: pip install 'rali-edge[corpus]'") from None
    return pa, pq


__all__ = ["FORMATS", "PART_ROWS", "STREAMED", "ResultFile", "format_for"]
