"""The JSON readers: JSON Lines, and Hugging Face ``trainer_state.json`` (whose
``log_history`` entries are read like JSON Lines records)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from typing import Any

import numpy as np

from detector.core.types import check_name
from detector.errors import LogFileError

# The block size is read where it is used, so that tests can make blocks small.
from detector.logfile import _blocks
from detector.logfile._blocks import (
    _HF_SUMMARY_KEY,
    _HF_TIMING,
    _NONFINITE_WORDS,
    _PLAIN_NUMBER_TYPES,
    COUNTERS,
    STEP,
    _assemble,
    _Bad,
    _Block,
    _json_type_name,
    _no_step,
    _not_a_number,
    _open_text,
    _Rows,
    _Seen,
    _show,
    _step_key,
    _Text,
)


def _jsonl_blocks(path: str, handle: Iterable[str], seen: _Seen) -> Iterator[_Block]:
    first_line = 1
    key: str | None = None
    while True:
        chunk = list(islice(handle, _blocks._BLOCK_LINES))
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
        records = _loads_lines(chunk)
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


# json.loads is the C scanner behind three Python frames and two regular-expression
# matches per call; on a log of short lines those cost as much as the parse. The
# scanner of a decoder with json.loads' defaults (no hooks, strict).
_SCAN_ONCE: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_LINE_ENDS = frozenset({"", "\n", "\r\n"})


def _loads_lines(chunk: list[str]) -> list[Any]:
    """``[json.loads(line) for line in chunk]``: the same values, or the same error.

    A line is scanned directly when it starts with its value and ends with it
    (up to the line break); anything else (leading or trailing whitespace, a
    byte-order mark, a bad or blank line) goes to ``json.loads`` itself. O(length).
    """
    scan, ends, loads = _SCAN_ONCE, _LINE_ENDS, json.loads
    records: list[Any] = []
    append = records.append
    for line in chunk:
        try:
            value, end = scan(line, 0)
        except StopIteration:  # not a value at column 1: json.loads says what it is
            value = loads(line)
        else:
            if line[end:] not in ends:
                value = loads(line)
        append(value)
    return records


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
