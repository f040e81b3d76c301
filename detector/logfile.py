"""Read and write run logs: JSON Lines or CSV, one record per logged step.

JSON Lines: one object per line, ``{"step": 120, "train_loss": 0.41, ...}``.
``null`` (or the strings ``"nan"``, ``"inf"``, ``"-inf"``) is a non-finite
value, which is a point (NaN); a key absent from a line is no point for that
series at that step. CSV: a header with a ``step`` column; an empty cell is no
point, ``nan`` / ``inf`` are values, and ``None`` / ``null`` / ``NA`` / ``N/A``
(what writers print for a missing value) are empty cells.

Logs as users have them (a PyTorch Lightning ``CSVLogger`` ``metrics.csv``, a
pandas ``to_csv``, a JSONL with a timestamp) are read, with a warning for
what is not read, never silently:

- Rows may be sparse (a training row without validation values, a validation
  row with only those). Rows that share a step are merged: each series has one
  point per step, the last value the file gives it there (the later row wins,
  as when a resumed run logs a step again). A series that repeats a step is
  named in a warning, as its earlier values are not read.
- ``epoch`` is a counter, like ``step``: it is not a series.
- Non-numeric columns (JSONL: keys) are skipped and named in a warning: those
  whose non-empty cells are all something other than a number (``nan``/
  ``null`` cells do not count as numbers here), such as a ``timestamp`` or
  ``run_name`` string column. A column with numbers and a non-number is a
  mistake worth knowing (``"N/A "``, ``"0.5%"``, a shifted row) and an error
  naming the line of its first non-number: the reader cannot tell which of the
  values the user meant.
- CSV: a repeated column name is read as a series of its own, named the
  pandas way (the second ``loss`` is ``loss.1``, the third ``loss.2``), so no
  data is lost and the names tell the columns apart; a repeated ``step`` or
  ``epoch`` is not read. A column without a name (the index column pandas
  writes first) is not read. Both are named in a warning.
- Values are read as logged: accuracy in percent stays in percent (the
  detector decides that per series, never per value).

The reader is linear and column-wise: lines are parsed in blocks, and each
block is turned into numpy columns with one vectorised conversion per series,
so the only per-point Python objects are the ones the JSON or CSV parser makes.
Every problem raises :class:`~detector.errors.LogFileError` naming the file and
the first bad line; warnings go to ``warn`` (by default, one line each on
stderr).

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
# Counters, not series: ``step`` is the key of every point, ``epoch`` is not read.
COUNTERS = frozenset({STEP, EPOCH})
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv",)

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
    """Read a JSON Lines or CSV run log into columns, keyed in order of first appearance.

    Every series the file names is a key, even one without any point (a CSV
    column of empty cells). Each series has at most one point per step (the
    last the file gives it). What the file holds but is not read (see the
    module's docstring) is told to ``warn``, once per kind: by default a line
    ``phasewatch: warning: FILE: ...`` on stderr.
    """
    name = os.fspath(path)
    notes: list[str] = []
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    seen = _Seen()
    rows = 0
    for block in _iter_blocks(name, notes, seen):
        seen.update(block)
        rows += len(block.steps)
        for series, (index, values) in block.series.items():
            steps = block.steps if index is None else block.steps[index]
            pieces.setdefault(series, []).append((steps, values))
        for series in block.text:
            pieces.setdefault(series, [])  # keeps the order of first appearance
    text = seen.text
    if rows == 0:
        raise LogFileError(name, None, "the file has no records")
    if text:
        notes.append("non-numeric columns, not read: " + ", ".join(text))
    columns: Columns = {}
    repeated: list[str] = []
    for series, parts in pieces.items():
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
    report = warn if warn is not None else _warn_on_stderr
    for note in notes:
        report(f"{name}: {note}")
    return columns


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


def detect_format(path: str) -> str:
    """``"jsonl"`` or ``"csv"``: by extension, else by the first non-blank character."""
    lower = path.lower().removesuffix(".gz")
    if lower.endswith(JSON_SUFFIXES):
        return "jsonl"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    with _open_text(path) as handle:
        for line in handle:
            stripped = line.lstrip()
            if stripped:
                return "jsonl" if stripped[0] in "{[" else "csv"
    return "jsonl"


# --- reading ---------------------------------------------------------------


def _iter_blocks(path: str, notes: list[str], seen: _Seen) -> Iterator[_Block]:
    fmt = detect_format(path)
    try:
        with _open_text(path) as handle:
            if fmt == "jsonl":
                yield from _jsonl_blocks(path, handle, seen)
            else:
                yield from _csv_blocks(path, handle, notes, seen)
    except UnicodeDecodeError as exc:
        raise LogFileError(path, None, f"not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError) as exc:
        raise LogFileError(path, None, _os_problem(exc)) from None


def _open_text(path: str) -> io.TextIOBase:
    try:
        if path.lower().endswith(".gz"):
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
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _jsonl_blocks(path: str, handle: io.TextIOBase, seen: _Seen) -> Iterator[_Block]:
    first_line = 1
    while True:
        chunk = list(islice(handle, _BLOCK_LINES))
        if not chunk:
            return
        records, lines, failure = _parse_json_lines(chunk, first_line)
        first_line += len(chunk)
        if failure is not None:
            # Report the first problem in the file: rows before the bad line may hold one.
            _jsonl_block(path, records, lines, seen)
            raise LogFileError(path, failure[0], failure[1])
        if records:
            yield _jsonl_block(path, records, lines, seen)


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


def _jsonl_block(path: str, records: list[Any], lines: np.ndarray, seen: _Seen) -> _Block:
    problems: list[_Bad] = []
    bad_type = next((i for i, r in enumerate(records) if type(r) is not dict), None)
    if bad_type is not None:
        kind = _json_type_name(records[bad_type])
        problems.append(_Bad(bad_type, f"expected a JSON object, got {kind}"))
        records = records[:bad_type]  # rows after it cannot hold an earlier problem
    counts = Counter(chain.from_iterable(records))
    steps = np.zeros(len(records), dtype=np.int64)
    try:
        steps = _json_steps(records, counts.get(STEP, 0))
    except _Bad as bad:
        problems.append(bad)
    series: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    text: dict[str, tuple[int, str]] = {}
    for name, count in counts.items():
        if name in COUNTERS:
            continue
        try:
            got = _json_series(name, records, count)
        except _Bad as bad:
            problems.append(seen.earlier(name, bad))
            continue
        bad_now = seen.check(name, got)
        if bad_now is not None:
            problems.append(bad_now)
        elif isinstance(got, _Text):
            text[name] = (int(lines[got.row]), got.shown)
        else:
            series[name] = got
    if problems:
        first = min(problems, key=lambda b: b.line_in(lines))
        raise LogFileError(path, first.line_in(lines), first.problem)
    return _Block(steps=steps, series=series, text=text)


def _json_steps(records: list[dict[str, Any]], present: int) -> np.ndarray:
    if present != len(records):
        row = next(i for i, r in enumerate(records) if STEP not in r)
        raise _Bad(row, f'no "{STEP}" in this record')
    raw = [r[STEP] for r in records]
    if set(map(type, raw)) <= {int}:
        try:
            steps = np.array(raw, dtype=np.int64)
        except OverflowError:
            pass  # the slow path below names the line
        else:
            if len(steps) == 0 or steps.min() >= 0:
                return steps
    return np.array([_json_step(i, v) for i, v in enumerate(raw)], dtype=np.int64)


def _json_step(row: int, value: Any) -> int:
    integral = isinstance(value, float) and value.is_integer()
    if type(value) is not int and not integral:
        raise _Bad(row, f'"{STEP}" is not an integer: {_show(value)}')
    return _checked_step(row, int(value))


def _checked_step(row: int, step: int) -> int:
    if not 0 <= step < 2**63:
        raise _Bad(row, f'"{STEP}" must be a non-negative 64-bit integer, got {step}')
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


@dataclass(frozen=True)
class _Header:
    """What to read of a CSV: the step's position, each series' position and name."""

    width: int
    step: int
    series: list[tuple[int, str]]
    bad_names: dict[str, str]  # name -> why it is not a series name


def _csv_blocks(
    path: str, handle: io.TextIOBase, notes: list[str], seen: _Seen
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
    if STEP not in names:
        raise LogFileError(path, 1, f'no "{STEP}" column in the header')
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
    return _Header(len(names), names.index(STEP), series, bad_names)


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
    problems: list[_Bad] = []
    steps = np.zeros(len(rows), dtype=np.int64)
    try:
        steps = _csv_steps(columns[header.step])
    except _Bad as bad:
        problems.append(bad)
    series: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    text: dict[str, tuple[int, str]] = {}
    for position, name in header.series:
        try:
            got = _csv_series(name, columns[position])
        except _Bad as bad:
            problems.append(seen.earlier(name, bad))
            continue
        bad_now = seen.check(name, got)
        if bad_now is not None:
            problems.append(bad_now)
        elif isinstance(got, _Text):
            text[name] = (lines[got.row], got.shown)
        elif name in header.bad_names:
            raise LogFileError(path, 1, header.bad_names[name])  # the header comes first
        else:
            series[name] = got
    if problems:
        first = min(problems, key=lambda b: b.line_in(lines))
        raise LogFileError(path, first.line_in(lines), first.problem)
    return _Block(steps=steps, series=series, text=text)


def _csv_steps(cells: tuple[str, ...]) -> np.ndarray:
    try:
        steps = np.array(cells, dtype=np.int64)
    except (ValueError, OverflowError):
        pass  # floats like "120.0", blanks or junk: point by point below
    else:
        if steps.min() >= 0:
            return steps
    return np.array([_csv_step(i, c) for i, c in enumerate(cells)], dtype=np.int64)


def _csv_step(row: int, cell: str) -> int:
    text = cell.strip()
    if not text:
        raise _Bad(row, f'no "{STEP}" in this row')
    try:
        return _checked_step(row, int(text))
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise _Bad(row, f'"{STEP}" is not an integer: {_show(text)}')
    return _checked_step(row, int(value))


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
