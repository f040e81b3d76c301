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

The readers live in :mod:`~detector.logfile._jsonl` (JSON Lines and
``trainer_state.json``), :mod:`~detector.logfile._csv` and
:mod:`detector.tblog` (TensorBoard); what they share (the block of rows, the
accumulator, the constants) in :mod:`~detector.logfile._blocks`; finding the
log in a directory in :mod:`~detector.logfile._find`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from detector.errors import LogFileError
from detector.logfile._blocks import (  # the public names, and _Block for detector.tblog
    COUNTERS,
    EPOCH,
    FORMATS,
    STEP,
    STEP_KEYS,
    Columns,
    Warn,
    _Block,
    _complete,
    _json_safe,
    _open_text,
    _os_problem,
    _Rows,
    _sorted_by_step,
    _warn_on_stderr,
)
from detector.logfile._csv import _csv_blocks
from detector.logfile._find import _event_files, _is_event_file, _log_in_directory
from detector.logfile._jsonl import _jsonl_blocks, _trainer_state_blocks

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


def iter_batches(columns: Mapping[str, tuple[Any, Any]], max_points: int) -> Iterator[Columns]:
    """Split columns into batches of about ``max_points`` points, in step order.

    All points of one step stay in the same batch, which is how a training
    job logs: a whole row at a time. A batch ends at the first step where the
    running total of points reaches the next multiple of ``max_points``, so
    batches average ``max_points`` and differ from it by less than a row.
    Series without points in a batch are left out of it. A series whose
    steps are out of order is sorted (stably, so of two points at the same
    step the first in the file comes first). O(points log points) (the sort of
    all steps); O(points) when they all fit in one batch.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    ordered = {name: _sorted_by_step(steps, values) for name, (steps, values) in columns.items()}
    non_empty = [steps for steps, _ in ordered.values() if len(steps)]
    if not non_empty:
        return
    if sum(len(steps) for steps in non_empty) <= max_points:
        # One batch (every run ``analyze`` reads, at its batch size): what the cuts
        # below give, without the sort of every step they need.
        yield {name: part for name, part in ordered.items() if len(part[0])}
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


# --- JSON Lines and CSV ----------------------------------------------------


def _text_blocks(path: str, fmt: str, rows: _Rows, complete_lines: bool) -> Iterator[_Block]:
    with _open_text(path) as handle:
        lines = _complete(handle) if complete_lines else handle
        if fmt == "jsonl":
            yield from _jsonl_blocks(path, lines, rows.seen)
        else:
            yield from _csv_blocks(path, lines, rows.notes, rows.seen)


__all__ = [
    "COUNTERS", "EPOCH", "FORMATS", "STEP", "STEP_KEYS", "Columns", "Warn", "count_points",
    "detect_format", "iter_batches", "log_files", "read_growing_log", "read_log", "write_jsonl",
]
