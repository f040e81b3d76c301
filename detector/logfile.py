"""Read and write run logs: the files training jobs already write, one reader per format.

Formats, told apart by content (the extension alone decides nothing):

- **JSON Lines**: one object per line, ``{"step": 120, "train_loss": 0.41, ...}``.
  The step is the first of ``step``, ``global_step``, ``trainer/global_step``,
  ``train/global_step``, ``_step`` (W&B) that the first record has; the other
  counters (``epoch``, W&B's ``_runtime`` and ``_timestamp``) are not series.
  ``null`` (or the strings ``"nan"``, ``"inf"``, ``"-inf"``) is a non-finite
  value, which is a point (NaN); a key absent from a line is no point for that
  series at that step.
- **CSV** (a PyTorch Lightning ``CSVLogger`` ``metrics.csv``, a pandas
  ``to_csv``): a header with a step column (the same names as above); an
  empty cell is no point, ``nan`` / ``inf`` are values, and ``None`` /
  ``null`` / ``NA`` / ``N/A`` (what writers print for a missing value) are
  empty cells.
- **Hugging Face** ``trainer_state.json``: one JSON document whose
  ``log_history`` entries are read like JSON Lines records (``loss``,
  ``eval_loss``, ``learning_rate``, ``grad_norm``, ...). The end-of-training
  summary entry (``train_runtime``, ``total_flos``, ...) and the throughput
  keys (``*_runtime``, ``*_per_second``) are not series. A problem names the
  entry, ``log_history[i]``.
- **TensorBoard** event files (``events.out.tfevents.*``), or a directory of
  them: scalar summaries, read with TensorBoard's own loader (the optional
  ``tensorboard`` extra), see :mod:`detector.tblog`.

A directory is read as its TensorBoard event files (subdirectories
included: a subdirectory's tags are named ``SUBDIR/TAG``, as
``add_scalars`` writes them); without any, as the one log file it holds
(``metrics.csv``, ``trainer_state.json``, ``*.jsonl``; of several
``trainer_state.json``, as in Hugging Face checkpoint folders, the newest,
whose history holds the others').

Each reader turns its file into blocks of rows, and one accumulator turns the
blocks into columns. Logs as users have them are read, with a warning for
what is not read, never silently:

- Rows may be sparse (a training row without validation values, a validation
  row with only those). Rows that share a step are merged: each series has one
  point per step, the last value the file gives it there (the later row wins,
  as when a resumed run logs a step again). A series that repeats a step is
  named in a warning, as its earlier values are not read.
- Non-numeric columns (JSONL: keys) are skipped and named in a warning: those
  whose non-empty cells are all something other than a number (``nan``/
  ``null`` cells do not count as numbers here), such as a ``timestamp`` or
  ``run_name`` string column. A column with numbers and a non-number is a
  mistake worth knowing (``"N/A "``, ``"0.5%"``, a shifted row) and an error
  naming the line of its first non-number: the reader cannot tell which of the
  values the user meant.
- CSV: a repeated column name is read as a series of its own, named the
  pandas way (the second ``loss`` is ``loss.1``, the third ``loss.2``), so no
  data is lost and the names tell the columns apart; a repeated counter is
  not read. A column without a name (the index column pandas writes first)
  is not read. Both are named in a warning.
- Values are read as logged: accuracy in percent stays in percent (the
  detector decides that per series, never per value).

The text readers are linear and column-wise: lines are parsed in blocks, and
each block is turned into numpy columns with one vectorised conversion per
series, so the only per-point Python objects are the ones the JSON or CSV
parser makes. Every problem raises :class:`~detector.errors.LogFileError`
naming the file and the first bad line; warnings go to ``warn`` (by default,
one line each on stderr).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
>>> write_jsonl(path, [{"step": 0, "loss": 2.0}, {"step": 10, "loss": None, "acc": 0.5}])
>>> columns = read_log(path)
>>> {name: (s.tolist(), v.tolist()) for name, (s, v) in columns.items()}
{'loss': ([0, 10], [2.0, nan]), 'acc': ([10], [0.5])}
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

import numpy as np

from detector.core.types import check_name
from detector.errors import LogFileError

Columns = dict[str, tuple[np.ndarray, np.ndarray]]
"""Series name -> (int64 steps, float64 values), in file order."""

STEP = "step"
EPOCH = "epoch"
# Names of the step counter, in order of preference: the first one a log has is its step.
STEP_KEYS = (STEP, "global_step", "trainer/global_step", "train/global_step", "_step")
# Counters and clocks, not series: the step keys, the epoch, W&B's run clock.
COUNTERS = frozenset({*STEP_KEYS, EPOCH, "_runtime", "_timestamp"})
FORMATS = ("jsonl", "csv", "trainer_state", "tensorboard")
# Hugging Face log_history keys that time the run rather than train it.
_HF_TIMING = re.compile(r"(^|_)(runtime|per_second)$|^total_flos$")
# Written only in the summary entry at the end of training.
_HF_SUMMARY_KEY = "train_runtime"
_TB_MAGIC = b"brain.Event:"

# Lines parsed before they are converted to columns: bounds the memory held in
# parsed Python objects, whatever the file size.
_BLOCK_LINES = 65_536
_NONFINITE_WORDS = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}
_PLAIN_NUMBER_TYPES = frozenset({float, int, type(None)})
# CSV cells that writers print for a missing value: no point, like an empty cell.
_MISSING_WORDS = frozenset({"none", "null", "na", "n/a"})

Warn = Callable[[str], None]
"""Takes one warning about a log file, a line of text naming the file."""


class _Bad(Exception):
    """A problem at one row of a block (or at ``line``, an earlier block's line);
    turned into a LogFileError by the caller."""

    def __init__(self, row: int, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.row = row
        self.problem = problem
        self.line = line

    def line_in(self, lines: Any) -> int:
        return self.line if self.line is not None else int(lines[self.row])


class _Text:
    """A column of a block whose non-empty cells are all non-numbers (or NaN)."""

    def __init__(self, row: int, shown: str) -> None:
        self.row = row  # the first non-number
        self.shown = shown


@dataclass
class _Seen:
    """What the blocks before this one told of each column: numeric or not."""

    text: dict[str, tuple[int, str]] = field(default_factory=dict)  # line, first non-number
    numeric: set[str] = field(default_factory=set)  # has a number other than NaN

    def check(
        self, name: str, got: tuple[np.ndarray | None, np.ndarray] | _Text
    ) -> _Bad | None:
        """The problem, if this block's part of a column and the earlier ones
        together hold a number and a non-number."""
        if isinstance(got, _Text):
            if name in self.numeric:
                return _Bad(got.row, _not_a_number(name, got.shown))
        elif name in self.text and not np.isnan(got[1]).all():
            line, shown = self.text[name]
            return _Bad(0, _not_a_number(name, shown), line)
        return None

    def earlier(self, name: str, bad: _Bad) -> _Bad:
        """A column with a number and a non-number in this block: its first
        non-number may be in an earlier block."""
        if name in self.text:
            line, shown = self.text[name]
            return _Bad(0, _not_a_number(name, shown), line)
        return bad

    def update(self, block: _Block) -> None:
        for name, (_, values) in block.series.items():
            if not np.isnan(values).all():
                self.numeric.add(name)
        for name, first in block.text.items():
            self.text.setdefault(name, first)


def _not_a_number(name: str, shown: str) -> str:
    return f'value of "{name}" is not a number: {shown}'


@dataclass(frozen=True)
class _Block:
    """Consecutive rows of a log, column-wise.

    ``series`` maps a name to ``(rows, values)`` where ``rows`` indexes
    ``steps`` (None when the series has a point on every row of the block).
    ``text`` maps the names of non-numeric columns to the line and value of
    their first non-number in the block.
    """

    steps: np.ndarray
    series: dict[str, tuple[np.ndarray | None, np.ndarray]]
    text: dict[str, tuple[int, str]]


# --- public API ------------------------------------------------------------


def read_log(path: str | os.PathLike[str], *, warn: Warn | None = None) -> Columns:
    """Read a run log (any of the module's formats, or a directory) into columns,
    keyed in order of first appearance.

    Every series the file names is a key, even one without any point (a CSV
    column of empty cells). Each series has at most one point per step (the
    last the file gives it). What the file holds but is not read (see the
    module's docstring) is told to ``warn``, once per kind: by default a line
    ``phasewatch: warning: FILE: ...`` on stderr. O(size of the file).
    """
    return _read(os.fspath(path), warn, complete_lines=False)


def read_growing_log(
    path: str | os.PathLike[str], *, warn: Warn | None = None, cache: dict[str, Any] | None = None
) -> Columns:
    """:func:`read_log` for a file that is being written: a last line without its
    newline is not read yet (the writer is half-way through it).

    ``cache``: a dict the caller keeps between calls on the same path; a
    TensorBoard log then reads only the records written since the last call.
    """
    return _read(os.fspath(path), warn, complete_lines=True, cache=cache)


def log_files(path: str | os.PathLike[str]) -> list[str]:
    """The files :func:`read_log` reads for ``path``: the path itself for a
    file, else the event files (or the one log file) of the directory."""
    name = os.fspath(path)
    if not os.path.isdir(name):
        return [name]
    events = _event_files(name)
    return events if events else [_log_in_directory(name)]


def detect_format(path: str) -> str:
    """One of :data:`FORMATS`, from the file's first bytes (and, for JSON, the
    first line): ``"tensorboard"`` for a TensorBoard record, ``"jsonl"`` when
    the first non-blank line is a JSON value (or the file is empty),
    ``"trainer_state"`` for a JSON document with a ``log_history``, else
    ``"csv"``."""
    if os.path.isdir(path):
        return "tensorboard" if _event_files(path) else detect_format(_log_in_directory(path))
    if _is_event_file(path):
        return "tensorboard"
    with _open_text(path) as handle:
        try:
            first = next((line for line in handle if line.strip()), "")
        except UnicodeDecodeError as exc:
            raise LogFileError(path, None, f"not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise LogFileError(path, None, _os_problem(exc)) from None
    if not first or first.lstrip()[0] not in "{[":
        return "csv" if first else "jsonl"
    try:
        record = json.loads(first)
        return "trainer_state" if isinstance(record, dict) and "log_history" in record else "jsonl"
    except ValueError:
        pass  # a document over many lines (trainer_state.json), or a bad first line
    try:
        with _open_text(path) as handle:
            document = json.load(handle)
    except (ValueError, OSError):
        return "jsonl"  # the JSON Lines reader names the bad line
    return "trainer_state" if isinstance(document, dict) and "log_history" in document else "jsonl"


def _read(
    name: str, warn: Warn | None, *, complete_lines: bool, cache: dict[str, Any] | None = None
) -> Columns:
    if os.path.isdir(name) and not _event_files(name):
        name = _log_in_directory(name)
    fmt = detect_format(name)
    rows = _Rows()
    try:
        if fmt == "tensorboard":
            from detector import tblog  # the optional tensorboard package: only for these files

            reader = (cache or {}).get(name)
            if reader is None:
                reader = tblog.TensorBoardLog(name)
                if cache is not None:
                    cache[name] = reader
            blocks = reader.blocks(rows.notes)
        elif fmt == "trainer_state":
            blocks = _trainer_state_blocks(name, rows)
        else:
            blocks = _text_blocks(name, fmt, rows, complete_lines)
        for block in blocks:
            rows.add(block)
    except UnicodeDecodeError as exc:
        raise LogFileError(name, None, f"not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError) as exc:
        raise LogFileError(name, None, _os_problem(exc)) from None
    return rows.columns(name, warn if warn is not None else _warn_on_stderr)


class _Rows:
    """The shared accumulator: blocks of rows in, columns out.

    Per series it keeps the blocks' pieces and, at the end, one point per
    step (the last). O(points) plus a sort for a series whose steps repeat.
    """

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.seen = _Seen()
        self.pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.count = 0

    def add(self, block: _Block) -> None:
        self.seen.update(block)
        self.count += len(block.steps)
        for series, (index, values) in block.series.items():
            steps = block.steps if index is None else block.steps[index]
            self.pieces.setdefault(series, []).append((steps, values))
        for series in block.text:
            self.pieces.setdefault(series, [])  # keeps the order of first appearance

    def columns(self, name: str, warn: Warn) -> Columns:
        text = self.seen.text
        if self.count == 0:
            raise LogFileError(name, None, "the file has no records")
        notes = self.notes
        if text:
            notes.append("non-numeric columns, not read: " + ", ".join(text))
        columns: Columns = {}
        repeated: list[str] = []
        for series, parts in self.pieces.items():
            if series in text:
                continue
            if not parts:  # only in blocks where it had no cell at all (JSONL)
                columns[series] = (np.zeros(0, np.int64), np.zeros(0, np.float64))
                continue
            steps = np.concatenate([s for s, _ in parts]).astype(np.int64, copy=False)
            values = np.concatenate([v for _, v in parts]).astype(np.float64, copy=False)
            columns[series] = _last_per_step(steps, values)
            if len(columns[series][0]) < len(steps):
                repeated.append(series)
        if repeated:
            notes.append(
                "series with more than one value at a step (the last one is read): "
                + ", ".join(repeated)
            )
        for note in notes:
            warn(f"{name}: {note}")
        return columns


def _assemble(
    path: str,
    lines: Any,
    steps: Callable[[], np.ndarray],
    count: int,
    series: Iterable[tuple[str, Callable[[], tuple[np.ndarray | None, np.ndarray] | _Text]]],
    seen: _Seen,
    problems: list[_Bad],
) -> _Block:
    """One block from a reader's per-column conversions: numeric columns become
    series, all-text ones are set aside, and the first problem of the block
    (by line) is raised, naming the file and line."""
    try:
        step_column = steps()
    except _Bad as bad:
        problems.append(bad)
        step_column = np.zeros(count, dtype=np.int64)
    numeric: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    text: dict[str, tuple[int, str]] = {}
    for name, convert in series:
        try:
            got = convert()
        except _Bad as bad:
            problems.append(seen.earlier(name, bad))
            continue
        bad_now = seen.check(name, got)
        if bad_now is not None:
            problems.append(bad_now)
        elif isinstance(got, _Text):
            text[name] = (int(lines[got.row]), got.shown)
        else:
            numeric[name] = got
    if problems:
        first = min(problems, key=lambda b: b.line_in(lines))
        raise LogFileError(path, first.line_in(lines), first.problem)
    return _Block(steps=step_column, series=numeric, text=text)


def _warn_on_stderr(message: str) -> None:
    print(f"phasewatch: warning: {message}", file=sys.stderr)


def _last_per_step(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last point of each step, in file order."""
    if len(steps) < 2 or bool(np.all(steps[1:] > steps[:-1])):
        return steps, values
    _, last_from_end = np.unique(steps[::-1], return_index=True)
    keep = np.sort(len(steps) - 1 - last_from_end)
    if len(keep) == len(steps):
        return steps, values
    return steps[keep], values[keep]


def iter_batches(columns: Mapping[str, tuple[Any, Any]], max_points: int) -> Iterator[Columns]:
    """Split columns into batches of about ``max_points`` points, in step order.

    All points of one step stay in the same batch, which is how a training
    job logs: a whole row at a time. A batch ends at the first step where the
    running total of points reaches the next multiple of ``max_points``, so
    batches average ``max_points`` and differ from it by less than a row.
    Series without points in a batch are left out of it. A series whose
    steps are out of order is sorted (stably, so of two points at the same
    step the first in the file comes first).
    """
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    ordered = {name: _sorted_by_step(steps, values) for name, (steps, values) in columns.items()}
    non_empty = [steps for steps, _ in ordered.values() if len(steps)]
    if not non_empty:
        return
    unique_steps, counts = np.unique(np.concatenate(non_empty), return_counts=True)
    cumulative = np.cumsum(counts)
    targets = np.arange(max_points, cumulative[-1], max_points)
    last_rows = np.unique(np.searchsorted(cumulative, targets, side="left"))
    if len(last_rows) == 0 or last_rows[-1] != len(unique_steps) - 1:
        last_rows = np.append(last_rows, len(unique_steps) - 1)
    # Batch i holds the steps (upper[i-1], upper[i]]; per series, one
    # searchsorted over all batch ends gives every slice.
    upper = unique_steps[last_rows]
    cuts = {
        name: np.concatenate(([0], np.searchsorted(steps, upper, side="right")))
        for name, (steps, _) in ordered.items()
    }
    for i in range(len(upper)):
        batch: Columns = {}
        for name, (steps, values) in ordered.items():
            lo, hi = cuts[name][i], cuts[name][i + 1]
            if hi > lo:
                batch[name] = (steps[lo:hi], values[lo:hi])
        yield batch


def count_points(columns: Mapping[str, tuple[Any, Any]]) -> int:
    """The number of points in columns."""
    return sum(len(steps) for steps, _ in columns.values())


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write records as JSON Lines; non-finite floats become ``null``."""
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            clean = {k: _json_safe(v) for k, v in row.items()}
            out.write(json.dumps(clean, allow_nan=False))
            out.write("\n")



# --- finding the log -------------------------------------------------------


def _is_event_file(path: str) -> bool:
    """A TFRecord whose first record is a TensorBoard ``file_version`` event."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    return _TB_MAGIC in head[12:]  # after the record's length and its checksum


def _event_files(directory: str) -> list[str]:
    """Event files under a directory, each folder's in name order (the name
    holds the time the writer opened it), the top folder's first."""
    found: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found.extend(
            os.path.join(root, f) for f in sorted(files) if _is_event_file(os.path.join(root, f))
        )
    return found


_LOG_NAMES = ("metrics.csv", "trainer_state.json")
_LOG_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".csv")


def _log_in_directory(directory: str) -> str:
    candidates: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        candidates.extend(
            os.path.join(root, f) for f in sorted(files)
            if f in _LOG_NAMES or f.lower().endswith(_LOG_SUFFIXES)
        )
    if candidates and all(os.path.basename(c) == "trainer_state.json" for c in candidates):
        return max(candidates, key=os.path.getmtime)  # the newest history holds the older ones
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise LogFileError(
            directory, None, "no TensorBoard event files and no log file (metrics.csv, "
            "trainer_state.json, *.jsonl, *.csv) in this directory"
        )
    shown = ", ".join(os.path.relpath(c, directory) for c in candidates[:4])
    more = f" and {len(candidates) - 4} more" if len(candidates) > 4 else ""
    raise LogFileError(directory, None, f"several log files here ({shown}{more}): name one")


# --- JSON Lines and CSV ----------------------------------------------------


def _text_blocks(path: str, fmt: str, rows: _Rows, complete_lines: bool) -> Iterator[_Block]:
    with _open_text(path) as handle:
        lines = _complete(handle) if complete_lines else handle
        if fmt == "jsonl":
            yield from _jsonl_blocks(path, lines, rows.seen)
        else:
            yield from _csv_blocks(path, lines, rows.notes, rows.seen)


def _complete(handle: Iterable[str]) -> Iterator[str]:
    """The lines that end in a newline: the last one may still be being written."""
    for line in handle:
        if not line.endswith(("\n", "\r")):
            return
        yield line


def _open_text(path: str) -> io.TextIOBase:
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        if gzipped:
            return gzip.open(path, "rt", encoding="utf-8-sig", newline="")  # type: ignore[return-value]
        return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - returned to a with
    except OSError as exc:
        raise LogFileError(path, None, _os_problem(exc)) from None


def _os_problem(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a log file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, gzip.BadGzipFile):
        return f"not a gzip file ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _step_key(keys: Iterable[str]) -> str | None:
    present = set(keys)
    return next((key for key in STEP_KEYS if key in present), None)


def _no_step(what: str) -> str:
    others = ", ".join(STEP_KEYS[1:])
    return f'no "{STEP}" {what} (nor {others})'


def _jsonl_blocks(path: str, handle: Iterable[str], seen: _Seen) -> Iterator[_Block]:
    first_line = 1
    key: str | None = None
    while True:
        chunk = list(islice(handle, _BLOCK_LINES))
        if not chunk:
            return
        records, lines, failure = _parse_json_lines(chunk, first_line)
        first_line += len(chunk)
        if key is None and records and isinstance(records[0], dict):
            key = _step_key(records[0])
            if key is None:
                raise LogFileError(path, int(lines[0]), _no_step("in this record"))
        if failure is not None:
            # Report the first problem in the file: rows before the bad line may hold one.
            _records_block(path, records, lines, seen, key or STEP)
            raise LogFileError(path, failure[0], failure[1])
        if records:
            yield _records_block(path, records, lines, seen, key or STEP)


def _parse_json_lines(
    chunk: list[str], first_line: int
) -> tuple[list[Any], np.ndarray, tuple[int, str] | None]:
    """Parse the lines of a block, skipping blank ones.

    Returns the records, their line numbers, and (line, problem) for the first
    line that is not JSON, in which case the records are those before it.
    """
    try:
        records = list(map(json.loads, chunk))
        return records, np.arange(first_line, first_line + len(chunk)), None
    except ValueError:
        pass  # a blank or bad line: line by line below, so the common case keeps no bookkeeping
    records = []
    lines: list[int] = []
    for number, text in enumerate(chunk, start=first_line):
        if not text.strip():
            continue
        try:
            records.append(json.loads(text.rstrip()))  # a column past the end reads oddly
        except ValueError as exc:
            return records, np.array(lines, dtype=np.int64), (number, _json_problem(exc))
        lines.append(number)
    return records, np.array(lines, dtype=np.int64), None


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    return f"not valid JSON ({exc})"



def _records_block(
    path: str, records: list[Any], lines: np.ndarray, seen: _Seen, key: str,
    skip: frozenset[str] = COUNTERS,
) -> _Block:
    """JSON records (objects) as a block; ``key`` is the step, ``skip`` not series."""
    problems: list[_Bad] = []
    bad_type = next((i for i, r in enumerate(records) if type(r) is not dict), None)
    if bad_type is not None:
        kind = _json_type_name(records[bad_type])
        problems.append(_Bad(bad_type, f"expected a JSON object, got {kind}"))
        records = records[:bad_type]  # rows after it cannot hold an earlier problem
    counts = Counter(chain.from_iterable(records))

    def converter(name: str, count: int) -> Callable[[], Any]:
        return lambda: _json_series(name, records, count)

    return _assemble(
        path,
        lines,
        lambda: _json_steps(records, counts.get(key, 0), key),
        len(records),
        ((name, converter(name, count)) for name, count in counts.items() if name not in skip),
        seen,
        problems,
    )


def _json_steps(records: list[dict[str, Any]], present: int, key: str) -> np.ndarray:
    if present != len(records):
        row = next(i for i, r in enumerate(records) if key not in r)
        raise _Bad(row, f'no "{key}" in this record')
    raw = [r[key] for r in records]
    if set(map(type, raw)) <= {int}:
        try:
            steps = np.array(raw, dtype=np.int64)
        except OverflowError:
            pass  # the slow path below names the line
        else:
            if len(steps) == 0 or steps.min() >= 0:
                return steps
    return np.array([_json_step(i, v, key) for i, v in enumerate(raw)], dtype=np.int64)


def _json_step(row: int, value: Any, key: str) -> int:
    integral = isinstance(value, float) and value.is_integer()
    if type(value) is not int and not integral:
        raise _Bad(row, f'"{key}" is not an integer: {_show(value)}')
    return _checked_step(row, int(value), key)


def _checked_step(row: int, step: int, key: str) -> int:
    if not 0 <= step < 2**63:
        raise _Bad(row, f'"{key}" must be a non-negative 64-bit integer, got {step}')
    return step


def _json_series(
    name: str, records: list[dict[str, Any]], count: int
) -> tuple[np.ndarray | None, np.ndarray] | _Text:
    if count == len(records):
        index = None
        raw = [r[name] for r in records]
    else:
        index = np.flatnonzero(np.fromiter((name in r for r in records), bool, len(records)))
        raw = [r[name] for r in records if name in r]
    try:
        values = _json_values(name, raw)
    except _Bad as bad:
        raise _Bad(bad.row if index is None else int(index[bad.row]), bad.problem) from None
    if isinstance(values, _Text):
        return _Text(values.row if index is None else int(index[values.row]), values.shown)
    problem = check_name("series name", name)
    if problem is not None:
        raise _Bad(0 if index is None else int(index[0]), problem)
    return index, values


def _json_values(name: str, raw: list[Any]) -> np.ndarray | _Text:
    """Numbers and nulls in one vectorised conversion; anything else point by point."""
    if set(map(type, raw)) <= _PLAIN_NUMBER_TYPES:
        try:
            return np.array(raw, dtype=np.float64)  # None -> NaN
        except OverflowError:
            pass  # an integer beyond float range; named below
    values = np.full(len(raw), math.nan)
    first_text: _Text | None = None
    for row, value in enumerate(raw):
        number = _json_value(name, row, value)
        if number is None:
            first_text = first_text or _Text(row, _show(value))
        else:
            values[row] = number
    return _classified(name, values, first_text)


def _json_value(name: str, row: int, value: Any) -> float | None:
    """The number a JSON value stands for, or None for a non-number."""
    if value is None:
        return math.nan
    if type(value) in (int, float):
        try:
            return float(value)
        except OverflowError:
            raise _Bad(row, f'value of "{name}" is out of range: {_show(value)}') from None
    if isinstance(value, str) and value.strip().lower() in _NONFINITE_WORDS:
        return _NONFINITE_WORDS[value.strip().lower()]
    return None


def _classified(name: str, values: np.ndarray, first_text: _Text | None) -> np.ndarray | _Text:
    """``values`` if there was no non-number; else the non-numeric column, unless
    it has numbers too (NaN does not count): then an error at its first non-number."""
    if first_text is None:
        return values
    if np.isnan(values).all():
        return first_text
    raise _Bad(first_text.row, _not_a_number(name, first_text.shown))



# --- Hugging Face trainer_state.json ---------------------------------------


def _trainer_state_blocks(path: str, rows: _Rows) -> Iterator[_Block]:
    """``log_history`` as one block of records. O(size of the file): the
    document is parsed whole, as the Trainer rewrites it whole."""
    try:
        with _open_text(path) as handle:
            document = json.load(handle)
    except json.JSONDecodeError as exc:
        raise LogFileError(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    history = document.get("log_history") if isinstance(document, dict) else None
    if not isinstance(history, list):
        raise LogFileError(path, None, '"log_history" is not a list')
    summary = [r for r in history if isinstance(r, dict) and _HF_SUMMARY_KEY in r]
    records = [r for r in history if not (isinstance(r, dict) and _HF_SUMMARY_KEY in r)]
    index = [i for i, r in enumerate(history) if not (isinstance(r, dict) and _HF_SUMMARY_KEY in r)]
    keys = {k for r in records if isinstance(r, dict) for k in r}
    timing = sorted(k for k in keys if _HF_TIMING.search(k))
    if summary:
        rows.notes.append("the end-of-training summary in log_history is not read")
    if timing:
        rows.notes.append("timing keys, not read: " + ", ".join(timing))
    if not records:
        return
    try:
        yield _records_block(
            path, records, np.array(index, dtype=np.int64), rows.seen, STEP,
            skip=COUNTERS | frozenset(timing),
        )
    except LogFileError as error:  # its "line" is the entry's index: say so
        raise LogFileError(path, None, f"log_history[{error.line}]: {error.problem}") from None


# --- CSV -------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """What to read of a CSV: the step's position and name, each series' position and name."""

    width: int
    step: int
    key: str
    series: list[tuple[int, str]]
    bad_names: dict[str, str]  # name -> why it is not a series name


def _csv_blocks(
    path: str, handle: Iterable[str], notes: list[str], seen: _Seen
) -> Iterator[_Block]:
    reader = csv.reader(handle)
    try:
        header_row = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise LogFileError(path, reader.line_num, f"not valid CSV ({exc})") from None
    header = _csv_header(path, [h.strip() for h in header_row], notes)
    while True:
        rows: list[list[str]] = []
        lines: list[int] = []
        try:
            for row in reader:
                if row:  # a blank line
                    rows.append(row)
                    lines.append(reader.line_num)
                    if len(rows) == _BLOCK_LINES:
                        break
        except csv.Error as exc:
            if rows:
                _csv_block(path, header, rows, lines, seen)
            raise LogFileError(path, reader.line_num, f"not valid CSV ({exc})") from None
        if not rows:
            return
        yield _csv_block(path, header, rows, lines, seen)


def _csv_header(path: str, names: list[str], notes: list[str]) -> _Header:
    """Name the columns to read: repeats get a suffix, counters and unnamed ones are left out."""
    key = _step_key(names)
    if key is None:
        raise LogFileError(path, 1, _no_step("column in the header"))
    taken = set(names)
    seen: set[str] = set()
    series: list[tuple[int, str]] = []
    renamed: list[str] = []
    dropped: list[str] = []
    for position, name in enumerate(names):
        if not name:
            dropped.append(f"column {position + 1} (no name)")
            continue
        if name in seen:
            if name in COUNTERS:
                dropped.append(f'repeated "{name}" (column {position + 1})')
                continue
            suffix = 1
            while f"{name}.{suffix}" in taken:
                suffix += 1
            renamed.append(f'"{name}" as "{name}.{suffix}"')
            name = f"{name}.{suffix}"
            taken.add(name)
        seen.add(name)
        if name not in COUNTERS:
            series.append((position, name))
    if renamed:
        notes.append("repeated column names, read as series of their own: " + ", ".join(renamed))
    if dropped:
        notes.append("columns not read: " + ", ".join(dropped))
    bad_names = {
        name: problem
        for _, name in series
        if (problem := check_name("series name", name)) is not None
    }
    return _Header(len(names), names.index(key), key, series, bad_names)


def _csv_block(
    path: str, header: _Header, rows: list[list[str]], lines: list[int], seen: _Seen
) -> _Block:
    width = header.width
    if set(map(len, rows)) != {width}:
        row = next(i for i, r in enumerate(rows) if len(r) != width)
        raise LogFileError(
            path, lines[row], f"{len(rows[row])} fields, but the header has {width}"
        )
    columns = list(zip(*rows, strict=True))

    def converter(position: int, name: str) -> Callable[[], Any]:
        def convert() -> tuple[np.ndarray | None, np.ndarray] | _Text:
            got = _csv_series(name, columns[position])
            if not isinstance(got, _Text) and name in header.bad_names:
                raise _Bad(0, header.bad_names[name], line=1)  # the header comes first
            return got

        return convert

    return _assemble(
        path,
        lines,
        lambda: _csv_steps(columns[header.step], header.key),
        len(rows),
        ((name, converter(position, name)) for position, name in header.series),
        seen,
        [],
    )


def _csv_steps(cells: tuple[str, ...], key: str) -> np.ndarray:
    try:
        steps = np.array(cells, dtype=np.int64)
    except (ValueError, OverflowError):
        pass  # floats like "120.0", blanks or junk: point by point below
    else:
        if steps.min() >= 0:
            return steps
    return np.array([_csv_step(i, c, key) for i, c in enumerate(cells)], dtype=np.int64)


def _csv_step(row: int, cell: str, key: str) -> int:
    text = cell.strip()
    if not text:
        raise _Bad(row, f'no "{key}" in this row')
    try:
        return _checked_step(row, int(text), key)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise _Bad(row, f'"{key}" is not an integer: {_show(text)}')
    return _checked_step(row, int(value), key)


def _csv_series(
    name: str, cells: tuple[str, ...]
) -> tuple[np.ndarray | None, np.ndarray] | _Text:
    try:
        return None, np.fromiter(map(float, cells), np.float64, len(cells))
    except ValueError:
        pass  # empty cells (no point) or junk: masked conversion below
    text = np.array(cells)
    present = text != ""
    try:
        values = text[present].astype(np.float64)
    except ValueError:
        return _csv_series_slow(name, cells)
    return np.flatnonzero(present), values


def _csv_series_slow(
    name: str, cells: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray] | _Text:
    index: list[int] = []
    values: list[float] = []
    first_text: _Text | None = None
    for row, cell in enumerate(cells):
        text = cell.strip()
        if not text or text.lower() in _MISSING_WORDS:
            continue
        try:
            values.append(float(text))
        except ValueError:
            first_text = first_text or _Text(row, _show(text))
            continue
        index.append(row)
    got = _classified(name, np.array(values, dtype=np.float64), first_text)
    if isinstance(got, _Text):
        return got
    return np.array(index, dtype=np.int64), got


# --- helpers ---------------------------------------------------------------


def _sorted_by_step(steps: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if len(steps) > 1 and np.any(steps[1:] < steps[:-1]):
        order = np.argsort(steps, kind="stable")
        return steps[order], values[order]
    return steps, values


def _json_type_name(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_safe(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
