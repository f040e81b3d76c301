"""The CSV reader (a Lightning ``metrics.csv``, a pandas ``to_csv``)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.core.types import check_name
from detector.errors import LogFileError

# The block size is read where it is used, so that tests can make blocks small.
from detector.logfile import _blocks
from detector.logfile._blocks import (
    _MISSING_WORDS,
    COUNTERS,
    _assemble,
    _Bad,
    _Block,
    _no_step,
    _Seen,
    _show,
    _step_key,
    _Text,
)
from detector.logfile._jsonl import _checked_step, _classified

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
                    if len(rows) == _blocks._BLOCK_LINES:
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
