"""Read and write run logs: JSON Lines or CSV, one record per logged step.

JSON Lines: one object per line, ``{"step": 120, "train_loss": 0.41, ...}``.
``null`` (or the strings ``"nan"``, ``"inf"``, ``"-inf"``) is a non-finite
value, which is a point (NaN); a key absent from a line is no point for that
series at that step. CSV: a header with a ``step`` column; an empty cell is no
point, ``nan`` / ``inf`` are values.

The reader is linear and column-wise: lines are parsed in blocks, and each
block is turned into numpy columns with one vectorised conversion per series,
so the only per-point Python objects are the ones the JSON or CSV parser makes.
Every problem raises :class:`~detector.errors.LogFileError` naming the file and
the first bad line.

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
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import numpy as np

from detector.core.types import check_name
from detector.errors import LogFileError

Columns = dict[str, tuple[np.ndarray, np.ndarray]]
"""Series name -> (int64 steps, float64 values), in file order."""

STEP = "step"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv",)

# Lines parsed before they are converted to columns: bounds the memory held in
# parsed Python objects, whatever the file size.
_BLOCK_LINES = 65_536
_NONFINITE_WORDS = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}
_PLAIN_NUMBER_TYPES = frozenset({float, int, type(None)})


class _Bad(Exception):
    """A problem at one row of a block; turned into a LogFileError by the caller."""

    def __init__(self, row: int, problem: str) -> None:
        super().__init__(problem)
        self.row = row
        self.problem = problem


@dataclass(frozen=True)
class _Block:
    """Consecutive rows of a log, column-wise.

    ``series`` maps a name to ``(rows, values)`` where ``rows`` indexes
    ``steps`` (None when the series has a point on every row of the block).
    """

    steps: np.ndarray
    series: dict[str, tuple[np.ndarray | None, np.ndarray]]


# --- public API ------------------------------------------------------------


def read_log(path: str | os.PathLike[str]) -> Columns:
    """Read a JSON Lines or CSV run log into columns, keyed in order of first appearance.

    Every series the file names is a key, even one without any point (a CSV
    column of empty cells).
    """
    name = os.fspath(path)
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    rows = 0
    for block in _iter_blocks(name):
        rows += len(block.steps)
        for series, (index, values) in block.series.items():
            steps = block.steps if index is None else block.steps[index]
            pieces.setdefault(series, []).append((steps, values))
    if rows == 0:
        raise LogFileError(name, None, "the file has no records")
    return {
        series: (
            np.concatenate([s for s, _ in parts]).astype(np.int64, copy=False),
            np.concatenate([v for _, v in parts]).astype(np.float64, copy=False),
        )
        for series, parts in pieces.items()
    }


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


def _iter_blocks(path: str) -> Iterator[_Block]:
    fmt = detect_format(path)
    try:
        with _open_text(path) as handle:
            if fmt == "jsonl":
                yield from _jsonl_blocks(path, handle)
            else:
                yield from _csv_blocks(path, handle)
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


def _jsonl_blocks(path: str, handle: io.TextIOBase) -> Iterator[_Block]:
    first_line = 1
    while True:
        chunk = list(islice(handle, _BLOCK_LINES))
        if not chunk:
            return
        records, lines, failure = _parse_json_lines(chunk, first_line)
        first_line += len(chunk)
        if failure is not None:
            # Report the first problem in the file: rows before the bad line may hold one.
            _jsonl_block(path, records, lines)
            raise LogFileError(path, failure[0], failure[1])
        if records:
            yield _jsonl_block(path, records, lines)


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


def _jsonl_block(path: str, records: list[Any], lines: np.ndarray) -> _Block:
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
    for name, count in counts.items():
        if name == STEP:
            continue
        try:
            series[name] = _json_series(name, records, count)
        except _Bad as bad:
            problems.append(bad)
    if problems:
        first = min(problems, key=lambda b: b.row)
        raise LogFileError(path, int(lines[first.row]), first.problem)
    return _Block(steps=steps, series=series)


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
) -> tuple[np.ndarray | None, np.ndarray]:
    if count == len(records):
        index = None
        raw = [r[name] for r in records]
    else:
        index = np.flatnonzero(np.fromiter((name in r for r in records), bool, len(records)))
        raw = [r[name] for r in records if name in r]
    first_row = 0 if index is None else int(index[0])
    problem = check_name("series name", name)
    if problem is not None:
        raise _Bad(first_row, problem)
    try:
        return index, _json_values(name, raw)
    except _Bad as bad:
        raise _Bad(bad.row if index is None else int(index[bad.row]), bad.problem) from None


def _json_values(name: str, raw: list[Any]) -> np.ndarray:
    """Numbers and nulls in one vectorised conversion; anything else point by point."""
    if set(map(type, raw)) <= _PLAIN_NUMBER_TYPES:
        try:
            return np.array(raw, dtype=np.float64)  # None -> NaN
        except OverflowError:
            pass  # an integer beyond float range; named below
    return np.array([_json_value(name, i, v) for i, v in enumerate(raw)], dtype=np.float64)


def _json_value(name: str, row: int, value: Any) -> float:
    if value is None:
        return math.nan
    if type(value) in (int, float):
        try:
            return float(value)
        except OverflowError:
            raise _Bad(row, f'value of "{name}" is out of range: {_show(value)}') from None
    if isinstance(value, str) and value.strip().lower() in _NONFINITE_WORDS:
        return _NONFINITE_WORDS[value.strip().lower()]
    raise _Bad(row, f'value of "{name}" is not a number: {_show(value)}')


def _csv_blocks(path: str, handle: io.TextIOBase) -> Iterator[_Block]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise LogFileError(path, reader.line_num, f"not valid CSV ({exc})") from None
    names = [h.strip() for h in header]
    _check_csv_header(path, names)
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
                _csv_block(path, names, rows, lines)
            raise LogFileError(path, reader.line_num, f"not valid CSV ({exc})") from None
        if not rows:
            return
        yield _csv_block(path, names, rows, lines)


def _check_csv_header(path: str, names: list[str]) -> None:
    if STEP not in names:
        raise LogFileError(path, 1, f'no "{STEP}" column in the header')
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise LogFileError(path, 1, f'column "{name}" appears twice in the header')
        seen.add(name)
        problem = None if name == STEP else check_name("series name", name)
        if problem is not None:
            raise LogFileError(path, 1, problem)


def _csv_block(path: str, names: list[str], rows: list[list[str]], lines: list[int]) -> _Block:
    width = len(names)
    if set(map(len, rows)) != {width}:
        row = next(i for i, r in enumerate(rows) if len(r) != width)
        raise LogFileError(
            path, lines[row], f"{len(rows[row])} fields, but the header has {width}"
        )
    problems: list[_Bad] = []
    steps = np.zeros(len(rows), dtype=np.int64)
    series: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    for name, cells in zip(names, zip(*rows, strict=True), strict=True):
        try:
            if name == STEP:
                steps = _csv_steps(cells)
            else:
                series[name] = _csv_series(name, cells)
        except _Bad as bad:
            problems.append(bad)
    if problems:
        first = min(problems, key=lambda b: b.row)
        raise LogFileError(path, lines[first.row], first.problem)
    return _Block(steps=steps, series=series)


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


def _csv_series(name: str, cells: tuple[str, ...]) -> tuple[np.ndarray | None, np.ndarray]:
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


def _csv_series_slow(name: str, cells: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    index: list[int] = []
    values: list[float] = []
    for row, cell in enumerate(cells):
        text = cell.strip()
        if not text:
            continue
        try:
            values.append(float(text))
        except ValueError:
            raise _Bad(row, f'value of "{name}" is not a number: {_show(text)}') from None
        index.append(row)
    return np.array(index, dtype=np.int64), np.array(values, dtype=np.float64)


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
