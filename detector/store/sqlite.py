"""SQLite store: runs, events and segments that survive a restart.

One connection, guarded by one lock: SQLite serialises writers anyway, and a
single connection keeps ``:memory:`` databases shared between threads. File
databases use WAL so readers (other processes, ``sqlite3`` in a shell) do not
block the detector's writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from detector.core.types import Event, EventKind, Phase, Segment
from detector.engine import RunStatus
from detector.errors import FailedPrecondition

# Each entry upgrades the schema from version i to i + 1 (PRAGMA user_version).
# Append new migrations; never edit one that has shipped.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,          -- JSON object
        phase TEXT,                    -- Phase value, NULL before the first point
        since_step INTEGER NOT NULL,
        confidence REAL NOT NULL,
        last_step INTEGER NOT NULL,
        ended INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order
        run_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        detected_at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        series TEXT NOT NULL,
        confidence REAL NOT NULL,
        message TEXT NOT NULL,
        phase TEXT,
        evidence TEXT NOT NULL         -- JSON object
    );
    CREATE INDEX events_by_run ON events (run_id, id);
    CREATE TABLE segments (
        run_id TEXT NOT NULL,
        ordinal INTEGER NOT NULL,
        start_step INTEGER NOT NULL,
        end_step INTEGER NOT NULL,
        phase TEXT NOT NULL,
        confidence REAL NOT NULL,
        PRIMARY KEY (run_id, ordinal)
    );
    """,
)

SCHEMA_VERSION = len(_MIGRATIONS)

_RUN_COLUMNS = "run_id, labels, phase, since_step, confidence, last_step, ended, updated_at"
_EVENT_COLUMNS = "step, detected_at, kind, series, confidence, message, phase, evidence"


class SqliteStore:
    """The :class:`detector.engine.Store` on SQLite; safe to call from many threads.

    ``path`` is a file (its directory is created) or ``":memory:"``.
    ``recent_events`` is how many of a run's last events ``get_run`` returns
    as ``recent_events``; ``list_runs`` returns none, to stay one cheap query.

    >>> store = SqliteStore(":memory:")
    >>> store.add_events("r", [Event(step=5, kind=EventKind.CHANGE_POINT, detected_at=9)])
    >>> [e.step for e in store.get_events("r")]
    [5]
    >>> store.close()
    """

    def __init__(self, path: str | Path, *, recent_events: int = 20) -> None:
        path = str(path)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.recent_events = recent_events
        self._lock = threading.Lock()
        # check_same_thread=False: the lock, not the thread, is what serialises use.
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0)
        try:
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
                # With WAL, NORMAL survives a process crash; only power loss can
                # lose the last transactions, and clients replay unacked points.
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"store {self.path!r} has schema version {version}; this phasewatch "
                    f"understands up to {SCHEMA_VERSION}: upgrade phasewatch"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                # executescript commits first, so each migration is its own step.
                self._conn.executescript(
                    f"BEGIN; {_MIGRATIONS[target - 1]} PRAGMA user_version = {target}; COMMIT;"
                )

    # --- writes -------------------------------------------------------------

    def upsert_run(self, status: RunStatus) -> None:
        row = (
            status.run_id,
            json.dumps(dict(status.labels), sort_keys=True),
            None if status.phase is None else status.phase.value,
            status.since_step,
            status.confidence,
            status.last_step,
            int(status.ended),
            status.updated_at,
        )
        with self._lock, self._conn:
            self._conn.execute(
                f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET labels = excluded.labels, "
                "phase = excluded.phase, since_step = excluded.since_step, "
                "confidence = excluded.confidence, last_step = excluded.last_step, "
                "ended = excluded.ended, updated_at = excluded.updated_at",
                row,
            )

    def add_events(self, run_id: str, events: Sequence[Event]) -> None:
        rows = [
            (
                run_id,
                e.step,
                e.detected_at,
                e.kind.value,
                e.series,
                e.confidence,
                e.message,
                None if e.phase is None else e.phase.value,
                json.dumps(e.evidence, sort_keys=True),
            )
            for e in events
        ]
        with self._lock, self._conn:
            self._conn.executemany(
                f"INSERT INTO events (run_id, {_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def replace_segments(self, run_id: str, segments: Sequence[Segment]) -> None:
        rows = [
            (run_id, i, s.start_step, s.end_step, s.phase.value, s.confidence)
            for i, s in enumerate(segments)
        ]
        with self._lock, self._conn:  # one transaction: readers never see a half timeline
            self._conn.execute("DELETE FROM segments WHERE run_id = ?", (run_id,))
            self._conn.executemany(
                "INSERT INTO segments (run_id, ordinal, start_step, end_step, phase, confidence) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    # --- reads --------------------------------------------------------------

    def get_run(self, run_id: str) -> RunStatus | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return None
            recent = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY id DESC LIMIT ?",
                (run_id, self.recent_events),
            ).fetchall()
        return _run(row, tuple(_event(r) for r in reversed(recent)))

    def list_runs(self) -> list[RunStatus]:
        """Every stored run, by run id, without recent events. O(runs)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY run_id"
            ).fetchall()
        return [_run(row, ()) for row in rows]

    def get_events(self, run_id: str) -> list[Event]:
        """A run's events in the order they were added."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
        return [_event(r) for r in rows]

    def get_segments(self, run_id: str) -> list[Segment]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT start_step, end_step, phase, confidence FROM segments "
                "WHERE run_id = ? ORDER BY ordinal",
                (run_id,),
            ).fetchall()
        return [Segment(start, end, Phase(phase), conf) for start, end, phase, conf in rows]

    def close(self) -> None:
        """Close the connection; idempotent."""
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"


def _run(row: tuple, recent: tuple[Event, ...]) -> RunStatus:
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


def _event(row: tuple) -> Event:
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
