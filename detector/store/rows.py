"""Rows of the store tables, shared by the SQLite and PostgreSQL stores.

Labels and evidence are JSON text in both (one format to read with ``sqlite3``
or ``psql``); enums are stored by value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from detector.core.types import Event, EventKind, Phase, Segment
from detector.errors import FailedPrecondition
from detector.ports import Checkpoint, RunStatus

RUN_COLUMNS = "run_id, labels, phase, since_step, confidence, last_step, ended, updated_at"
EVENT_COLUMNS = "step, detected_at, kind, series, confidence, message, phase, evidence"


def run_row(status: RunStatus) -> tuple[Any, ...]:
    """The ``runs`` row of a status, in :data:`RUN_COLUMNS` order."""
    return (
        status.run_id,
        json.dumps(dict(status.labels), sort_keys=True),
        None if status.phase is None else status.phase.value,
        status.since_step,
        status.confidence,
        status.last_step,
        int(status.ended),
        status.updated_at,
    )


def run_from_row(row: Sequence[Any], recent: tuple[Event, ...]) -> RunStatus:
    run_id, labels, phase, since, confidence, last, ended, updated = row
    return RunStatus(
        run_id=run_id,
        labels=json.loads(labels),
        phase=None if phase is None else Phase(phase),
        since_step=since,
        confidence=confidence,
        last_step=last,
        ended=bool(ended),
        recent_events=recent,
        updated_at=updated,
    )


def event_row(event: Event) -> tuple[Any, ...]:
    """An ``events`` row without its run id, in :data:`EVENT_COLUMNS` order."""
    return (
        event.step,
        event.detected_at,
        event.kind.value,
        event.series,
        event.confidence,
        event.message,
        None if event.phase is None else event.phase.value,
        json.dumps(event.evidence, sort_keys=True),
    )


def event_from_row(row: Sequence[Any]) -> Event:
    step, detected_at, kind, series, confidence, message, phase, evidence = row
    return Event(
        step=step,
        kind=EventKind(kind),
        detected_at=detected_at,
        series=series,
        confidence=confidence,
        message=message,
        phase=None if phase is None else Phase(phase),
        evidence=json.loads(evidence),
    )


def segment_rows(run_id: str, segments: Sequence[Segment]) -> list[tuple[Any, ...]]:
    """``segments`` rows: run id, ordinal, start, end, phase, confidence."""
    return [
        (run_id, i, s.start_step, s.end_step, s.phase.value, s.confidence)
        for i, s in enumerate(segments)
    ]


def segment_from_row(row: Sequence[Any]) -> Segment:
    start, end, phase, confidence = row
    return Segment(start, end, Phase(phase), confidence)


def append_checkpoint_log(conn: Any, mark: str, run_id: str, entry: bytes, through_step: int) -> None:
    """Add ``entry``, covering ``through_step``, to the log of the run's stored
    checkpoint, on an open transaction of either store (``mark``: its parameter
    marker, ? or %s). The checkpoints row is only read (through its primary key
    index, not its state): O(log rows) whatever the size of the state."""
    if conn.execute(
        f"SELECT 1 FROM checkpoints WHERE run_id = {mark}", (run_id,)
    ).fetchone() is None:
        raise FailedPrecondition(f"run {run_id!r} has no checkpoint to append a log entry to")
    conn.execute(
        f"INSERT INTO checkpoint_log (run_id, seq, entry, through_step) VALUES ({mark}, "
        f"(SELECT COALESCE(MAX(seq), 0) + 1 FROM checkpoint_log WHERE run_id = {mark}), "
        f"{mark}, {mark})",
        (run_id, run_id, entry, through_step),
    )


def checkpoint_from_rows(
    row: Sequence[Any] | None, log: Sequence[Sequence[Any]]
) -> Checkpoint | None:
    """The :class:`Checkpoint` of a ``checkpoints`` row (state, through_step) and its
    log rows (entry, through_step) in order: the last log entry's step when it has
    one (entries written before it was kept have none), else the state's."""
    if row is None:
        return None
    through = row[1]
    for _, step in log:
        if step is not None:
            through = step
    return Checkpoint(bytes(row[0]), through, tuple(bytes(entry) for entry, _ in log))
