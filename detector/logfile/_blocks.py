"""What every log reader shares: constants, the block of rows a reader yields, the
accumulator that turns blocks into columns, and the small helpers."""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


# --- helpers ---------------------------------------------------------------


def _sorted_by_step(steps: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if len(steps) > 1 and (steps[1:] < steps[:-1]).any():  # the method: no np.any dispatch
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
