"""Real training runs as a streaming workload for the ingestion benchmark.

The runs are the labelled ones the project keeps beside its checkout
(``<repo>/../shared/runs`` and ``<repo>/../shared/real_runs``: ``*.jsonl``
with a ``*.labels.json`` beside each, 10–13 series, up to ~1000 logged lines)
and any ``benchmarks/generated/*.jsonl``. Each is read with
:func:`detector.logfile.read_log` and cut into batches of ``lines`` logged
lines: a batch holds every series' points at the steps of those lines, as the
columnar ``MetricBatch`` a client sends, serialised once so the bare and the
full server get the same bytes.

Load O(total points); :func:`batches` O(points × log points) for one run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector.logfile import read_log

SHARED_SUBDIRS: tuple[str, ...] = ("runs", "real_runs")


@dataclass(frozen=True)
class RealRun:
    """One run log: ``columns`` name -> (steps, values), each sorted by step;
    ``steps`` the logged lines (the union of all series' steps), sorted."""

    name: str
    path: Path
    columns: dict[str, tuple[np.ndarray, np.ndarray]]
    steps: np.ndarray

    @property
    def points(self) -> int:
        return sum(len(s) for s, _ in self.columns.values())


def run_paths(repo: Path) -> tuple[list[Path], list[str]]:
    """The run logs to stream, and a note for each place that has none.

    A shared run counts only with its ``.labels.json`` (the labelled sets the
    other benchmarks use); generated runs count as they are.
    """
    shared = repo.parent / "shared"
    found: list[Path] = []
    notes: list[str] = []
    for sub in SHARED_SUBDIRS:
        folder = shared / sub
        logs = sorted(p for p in folder.glob("*.jsonl")
                      if p.with_name(p.name[:-len(".jsonl")] + ".labels.json").exists())
        if not logs:
            notes.append(f"no labelled runs in {folder} ({'absent' if not folder.is_dir() else 'empty'})")
        found += logs
    generated = repo / "benchmarks" / "generated"
    logs = sorted(generated.glob("*.jsonl"))
    if not logs:
        notes.append(f"no generated runs in {generated}")
    return found + logs, notes


def load(paths: Sequence[Path], warn: Callable[[str], None] | None = None) -> list[RealRun]:
    """Read each log; series sorted by step (read_log keeps file order)."""
    runs = []
    for path in paths:
        columns = {}
        for name, (steps, values) in read_log(path, warn=warn).items():
            order = np.argsort(steps, kind="stable")
            columns[name] = (np.asarray(steps, np.int64)[order], np.asarray(values, np.float64)[order])
        non_empty = [s for s, _ in columns.values() if len(s)]
        steps = np.unique(np.concatenate(non_empty)) if non_empty else np.zeros(0, np.int64)
        if len(steps):
            runs.append(RealRun(path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.stem,
                                path, columns, steps))
    return runs


def column_batches(run: RealRun, lines: int) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``run`` cut into batches of ``lines`` logged lines (the last may be shorter), in
    order: each every series' points at the steps of those lines, name -> (steps,
    values) views of the run's columns."""
    if lines < 1:
        raise ValueError(f"lines must be >= 1, not {lines}")
    out = []
    for lo in range(0, len(run.steps), lines):
        first = run.steps[lo]
        last = run.steps[min(lo + lines, len(run.steps)) - 1]
        batch = {}
        for name, (steps, values) in run.columns.items():
            a = int(np.searchsorted(steps, first, "left"))
            b = int(np.searchsorted(steps, last, "right"))
            if b > a:
                batch[name] = (steps[a:b], values[a:b])
        out.append(batch)
    return out


def batches(run: RealRun, lines: int) -> list[tuple[bytes, int]]:
    """``run`` as serialised ``StreamRequest`` batches of ``lines`` logged lines
    each (:func:`column_batches`), in order, with each batch's point count."""
    out = []
    for columns in column_batches(run, lines):
        series = [pb.Series(name=name, steps=steps.tolist(), values=values.tolist())
                  for name, (steps, values) in columns.items()]
        request = pb.StreamRequest(batch=pb.MetricBatch(series=series))
        out.append((request.SerializeToString(), sum(len(steps) for steps, _ in columns.values())))
    return out


def load_repo(repo: Path) -> tuple[list[RealRun], list[str]]:
    """The runs of :func:`run_paths` for the checkout at ``repo``, loaded, and its
    notes, each also printed on standard error."""
    paths, notes = run_paths(repo)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return load(paths, warn=lambda message: None), notes


def describe(runs: Sequence[RealRun]) -> str:
    """One line: how many runs, series and points, from where."""
    if not runs:
        return "no runs"
    dirs = sorted({os.path.relpath(r.path.parent) for r in runs})
    series = sorted({len(r.columns) for r in runs})
    return (f"{len(runs)} runs ({', '.join(dirs)}), {series[0]}–{series[-1]} series, "
            f"{sum(len(r.steps) for r in runs)} lines, {sum(r.points for r in runs)} points")
