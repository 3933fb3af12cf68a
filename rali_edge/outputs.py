"""Rows written as they come: the one output of every command that writes records (`score`,
`stream`, `eval --predictions`), and the one check that a path can be written.

    with Output("scores.csv", SCORES) as out:            # the format from the suffix
        out.add({"path": "a.jpg", "score": 3.1})

Formats: csv and jsonl are written and flushed row by row, each row one whole line, so a run
killed at any moment keeps every finished row and a reader tailing the file never sees half a
line; parquet is a folder of part files, one every PART_ROWS rows or PART_SECONDS seconds (a
killed run loses at most those); json (one list) and table (for people) are written at the end,
since neither is valid before it is complete. The format is the one asked for, else the one the
output's suffix names (SUFFIXES), else the caller's default.

A row is a dict of the output's `Fields`: a missing field is empty (csv, parquet) or left out
(json, jsonl); floats are rounded to their field's digits in every format (NaN and infinities
are empty), and csv writes them with exactly those digits.

Continuing an output: `resume` (score --resume) reads the keys of the rows an earlier run wrote
(`done`), drops a last line cut off by a kill, and appends; `append` (stream --append) appends.
Both refuse a file that is not such an output, in the same format with the same columns, and
change nothing in it then.

A failed write (a full disk) is one OutputError, the rows before kept; a reader that closes
standard output (`| head`) is OutputClosed, a quiet stop.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rali_edge.errors import MissingDependencyError, OutputClosed, OutputError, UsageError

FORMATS = ("table", "json", "csv", "jsonl", "parquet")
STREAMED = ("csv", "jsonl", "parquet")  # written as they come; the ones that resume and append continue
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# A parquet output is a folder of part files (as Spark, Dask and Ray write them; pandas, pyarrow,
# polars and DuckDB read the folder as one table). Each part is complete when it appears: a file
# killed before its footer would be unreadable, rows and all.
PART_ROWS = 4096
PART_SECONDS = 5.0
PART_GLOB = "part-*.parquet"


@dataclass(frozen=True)
class Field:
    name: str
    type: type = str  # str, float or int
    digits: int | None = None  # floats: rounded to this many decimals


Fields = tuple[Field, ...]


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


def format_for(path: str | Path | None, fmt: str | None, default: str = "table") -> str:
    """The format asked for, else the one the output's suffix names, else `default`."""
    if fmt:
        return fmt
    return SUFFIXES.get(Path(path).suffix.lower(), default) if path else default


def clean_row(fields: Fields, row: dict) -> dict:
    """`row` as it is written: its fields in order, floats rounded to their digits, NaN and
    infinities None (JSON has no NaN)."""
    return {f.name: _value(f, row[f.name]) for f in fields if f.name in row}


def _value(field: Field, value):
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if field.digits is not None:
            return round(value, field.digits)
    return value


class Output:
    """Where rows go: `path` (None or "-": stdout) in `fmt`; see the module doc. `key` names the
    field that says which rows a resumed run already has; `table` renders the rows for people."""

    def __init__(self, path: str | Path | None, fields: Fields, fmt: str = "jsonl", *, resume: bool = False,
                 append: bool = False, key: str = "path", table: Callable[[list[dict]], str] | None = None):
        path = None if path in (None, "-") else path
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if fmt == "parquet" and path is None:
            raise UsageError("--format parquet writes a folder of part files: give -o FOLDER.parquet")
        continues = "--resume" if resume else "--append" if append else None
        if continues and path is not None and fmt not in STREAMED:
            raise UsageError(f"{continues} continues an output written as it goes: give --format "
                             f"{' or '.join(STREAMED)}")
        if resume and path is None:
            raise UsageError(f"--resume continues an output file: give -o FILE with --format {' or '.join(STREAMED)}")
        self.fields, self.fmt, self.path, self.key, self.table = fields, fmt, path, key, table
        self.continues = bool(continues) and path is not None
        self.count = 0  # rows added
        self.rows: list[dict] = []  # kept only for the formats written at the end (json, table)
        self.done: set = set()
        self._complete = None  # when continuing: the byte length of the earlier run's complete lines
        if self.continues:
            self.done, self._complete = self._earlier_rows(continues)
        self.out = None  # opened at the first row: a run that fails before one leaves the file as it was

    # -- writing ---------------------------------------------------------------------------
    def add(self, row: dict) -> None:
        with self._writing():
            self._write(clean_row(self.fields, row))

    def _write(self, row: dict) -> None:
        if self.out is None:
            self._open()
        self.count += 1
        if self.fmt == "csv":
            self.csv.writerow([self._csv_cell(f, row.get(f.name)) for f in self.fields])
        elif self.fmt == "jsonl":
            self.out.write(json.dumps(row) + "\n")
        elif self.fmt == "parquet":
            self.out.add(row)
            return
        else:
            self.rows.append(row)
        if self.fmt in STREAMED:
            self.out.flush()

    @staticmethod
    def _csv_cell(field: Field, value) -> str:
        if value is None:
            return ""
        if isinstance(value, float) and field.digits is not None:
            return f"{value:.{field.digits}f}"
        return value

    def flush(self) -> None:
        """What is buffered, to the file (a second Ctrl-C quits at once, after this)."""
        if self.out not in (None, False) and self.fmt != "parquet":
            self.out.flush()

    def close(self, create: bool = True) -> None:
        """Finish the output. With no row yet it is still written, a valid empty output, unless
        `create` is False (a run that failed before its first row leaves the output as it was)."""
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
            json.dump(self.rows, self.out, indent=1)
            self.out.write("\n")
        elif self.fmt == "table":
            self.out.write((self.table or _plain_table)(self.rows))
        self.out.flush()
        if self.path:
            self.out.close()
        self.out = False  # closed: not reopened

    def _open(self) -> None:
        if self.fmt == "parquet":
            self.out = _ParquetParts(Path(self.path), self.fields, fresh=not self.continues)
            return
        if self._complete is not None and Path(self.path).stat().st_size != self._complete:
            with open(self.path, "r+b") as f:  # a last line cut off by a kill: its row is written again
                f.truncate(self._complete)
        appending = self.continues and Path(self.path).exists() and Path(self.path).stat().st_size > 0
        self.out = open(self.path, "a" if appending else "w", newline="", encoding="utf-8") if self.path else sys.stdout
        if self.fmt == "csv":
            self.csv = csv.writer(self.out, lineterminator="\n")
            if not appending:
                self.csv.writerow([f.name for f in self.fields])

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

    # -- continuing ------------------------------------------------------------------------
    def _earlier_rows(self, option: str) -> tuple[set, int | None]:
        """The keys of the rows an earlier run wrote (error rows included: a bad file stays bad),
        and the length of its complete lines: a last line without its newline was cut off by a
        kill, and is dropped once there is a row to write. Nothing is changed here: a file that is
        not such an output is refused as it is."""
        path = Path(self.path)
        if not path.exists():
            return set(), None
        if self.fmt == "parquet":
            return _ParquetParts.earlier_keys(path, self.key, option), None
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.decode("utf-8", errors="replace").splitlines()
        names = [f.name for f in self.fields]
        if self.fmt == "jsonl":
            try:
                rows = [json.loads(line) for line in lines if line.strip()]
                if not all(isinstance(r, dict) and self.key in r for r in rows):
                    raise ValueError
            except ValueError:
                raise UsageError(f"{option}: {path} is not a jsonl output of this command (one JSON object with "
                                 f"a {self.key!r} per line); give another file or --format") from None
            return {r[self.key] for r in rows}, len(complete)
        rows = list(csv.reader(io.StringIO("\n".join(lines))))
        if rows and rows[0] != names:
            raise UsageError(f"{option}: {path} is not a csv output of this command (its header is not "
                             f"{','.join(names)}); give another file or --format")
        column = names.index(self.key)
        return {row[column] for row in rows[1:] if len(row) > column}, len(complete)

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain_table(rows: list[dict]) -> str:
    return "".join("  ".join(f"{k}={v}" for k, v in row.items()) + "\n" for row in rows)


class _ParquetParts:
    """The parquet output: a folder of part-NNNNNN.parquet files (see PART_ROWS), each written under a
    temporary name and renamed when complete, so that a reader never sees a half-written part."""

    def __init__(self, folder: Path, fields: Fields, fresh: bool = True):
        """`fresh`: the parts an earlier run left are replaced, as a file output is rewritten
        (resume and append continue them)."""
        pa, self.pq = _pyarrow()
        types = {str: pa.string(), float: pa.float64(), int: pa.int64()}
        self.schema = pa.schema([(f.name, types[f.type]) for f in fields])
        self.pa, self.folder, self.fields = pa, folder, fields
        _check_parts_folder(folder, "-o")
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(".part-*.tmp"):  # a part a killed run was writing: its rows are written again
            stale.unlink()
        if fresh:
            for part in folder.glob(PART_GLOB):
                part.unlink()
        self.next = 1 + max((int(p.stem.split("-")[1]) for p in folder.glob(PART_GLOB)), default=-1)
        self.rows: list[dict] = []
        self.last = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= PART_ROWS or time.monotonic() - self.last >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = self.pa.table({f.name: [r.get(f.name) for r in self.rows] for f in self.fields}, schema=self.schema)
        name = f"part-{self.next:06d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        self.pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)
        self.next, self.rows, self.last = self.next + 1, [], time.monotonic()

    def close(self) -> None:
        self.flush()

    @staticmethod
    def earlier_keys(folder: Path, key: str, option: str) -> set:
        _check_parts_folder(folder, option)
        _, pq = _pyarrow()
        done: set = set()
        for part in sorted(folder.glob(PART_GLOB)):
            try:
                done.update(pq.read_table(part, columns=[key]).column(key).to_pylist())
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"{option}: {part} is not a readable rali-edge part ({e}); move it away") from None
        return done


def _check_parts_folder(folder: Path, option: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; a parquet output is a folder of part files: give a new name")
    if folder.is_dir():
        foreign = [p.name for p in folder.iterdir() if not (p.match(PART_GLOB) or p.name.endswith(".tmp"))]
        if foreign:
            raise UsageError(f"{option} {folder}: it holds files that are not rali-edge parts "
                             f"({', '.join(sorted(foreign)[:3])}); give a new folder name")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("--format parquet needs pyarrow: pip install 'rali-edge[corpus]'") from None
    return pa, pq


__all__ = ["FORMATS", "PART_ROWS", "STREAMED", "SUFFIXES", "Field", "Fields", "Output", "clean_row", "format_for",
           "silence_stdout", "why_not_writable"]
