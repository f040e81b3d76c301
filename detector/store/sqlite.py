"""SQLite store: runs, events, segments and checkpoints that survive a restart.

One connection, guarded by one lock: SQLite serialises writers anyway, and a
single connection keeps ``:memory:`` databases shared between threads. File
databases use WAL so readers (other processes, ``sqlite3`` in a shell) do not
block the detector's writes.

SQLite serves one detector process (``shared = False``): run claims always
succeed, and nothing else writes the runs.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from detector.core.types import Event, Segment
from detector.engine import Checkpoint, RunStatus
from detector.errors import FailedPrecondition
from detector.store.rows import (
    EVENT_COLUMNS,
    RUN_COLUMNS,
    append_checkpoint_log,
    event_from_row,
    event_row,
    run_from_row,
    run_row,
    segment_from_row,
    segment_rows,
)

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
    """
    CREATE TABLE checkpoints (
        run_id TEXT PRIMARY KEY,
        through_step INTEGER NOT NULL,
        state BLOB NOT NULL,           -- pickled engine run state (detector.engine._Run)
        saved_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE checkpoint_log (      -- batches ingested since the checkpoint's state
        run_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        entry BLOB NOT NULL,           -- pickled list of batches (detector.engine._Run.replay)
        PRIMARY KEY (run_id, seq)
    );
    """,
)

SCHEMA_VERSION = len(_MIGRATIONS)


class SqliteStore:
    """The :class:`detector.engine.Store` on SQLite; safe to call from many threads.

    ``path`` is a file (its directory is created) or ``":memory:"``.
    ``recent_events`` is how many of a run's last events ``get_run`` returns
    as ``recent_events``; ``list_runs`` returns none, to stay one cheap query.

    >>> from detector.core.types import EventKind
    >>> store = SqliteStore(":memory:")
    >>> store.add_events("r", [Event(step=5, kind=EventKind.CHANGE_POINT, detected_at=9)])
    >>> [e.step for e in store.get_events("r")]
    [5]
    >>> store.close()
    """

    shared = False  # one process: claims always succeed

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
        with self._lock, self._conn:
            self._upsert_run(status)

    def add_events(self, run_id: str, events: Sequence[Event]) -> None:
        with self._lock, self._conn:
            self._add_events(run_id, events)

    def replace_segments(self, run_id: str, segments: Sequence[Segment]) -> None:
        with self._lock, self._conn:  # one transaction: readers never see a half timeline
            self._replace_segments(run_id, segments)

    def save_checkpoint(
        self,
        run_id: str,
        blob: bytes,
        through_step: int,
        *,
        status: RunStatus | None = None,
        events: Sequence[Event] = (),
        segments: Sequence[Segment] | None = None,
        append: bool = False,
    ) -> None:
        """Store a checkpoint with the status, events and segments it goes with, atomically."""
        with self._lock, self._conn:
            if status is not None:
                self._upsert_run(status)
            self._add_events(run_id, events)
            if segments is not None:
                self._replace_segments(run_id, segments)
            if append:
                append_checkpoint_log(self._conn, "?", run_id, blob, through_step)
            else:
                self._conn.execute(
                    "INSERT INTO checkpoints (run_id, through_step, state, saved_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                    "through_step = excluded.through_step, state = excluded.state, "
                    "saved_at = excluded.saved_at",
                    (run_id, through_step, blob, time.time()),
                )
                self._conn.execute("DELETE FROM checkpoint_log WHERE run_id = ?", (run_id,))

    def load_checkpoint(self, run_id: str) -> Checkpoint | None:
        with self._lock, self._conn:  # one transaction: the state and its log agree
            row = self._conn.execute(
                "SELECT state, through_step FROM checkpoints WHERE run_id = ?", (run_id,)
            ).fetchone()
            log = self._conn.execute(
                "SELECT entry FROM checkpoint_log WHERE run_id = ? ORDER BY seq", (run_id,)
            ).fetchall()
        if row is None:
            return None
        return Checkpoint(bytes(row[0]), row[1], tuple(bytes(e) for (e,) in log))

    def claim_run(self, run_id: str, owner: str) -> _LocalClaim:
        """Always granted: only this process writes a SQLite store."""
        return _LocalClaim()

    def _upsert_run(self, status: RunStatus) -> None:
        self._conn.execute(
            f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (run_id) DO UPDATE SET labels = excluded.labels, "
            "phase = excluded.phase, since_step = excluded.since_step, "
            "confidence = excluded.confidence, last_step = excluded.last_step, "
            "ended = excluded.ended, updated_at = excluded.updated_at",
            run_row(status),
        )

    def _add_events(self, run_id: str, events: Sequence[Event]) -> None:
        if events:
            self._conn.executemany(
                f"INSERT INTO events (run_id, {EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, *event_row(e)) for e in events],
            )

    def _replace_segments(self, run_id: str, segments: Sequence[Segment]) -> None:
        self._conn.execute("DELETE FROM segments WHERE run_id = ?", (run_id,))
        self._conn.executemany(
            "INSERT INTO segments (run_id, ordinal, start_step, end_step, phase, confidence) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            segment_rows(run_id, segments),
        )

    # --- reads --------------------------------------------------------------

    def get_run(self, run_id: str) -> RunStatus | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return None
            recent = self._conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY id DESC LIMIT ?",
                (run_id, self.recent_events),
            ).fetchall()
        return run_from_row(row, tuple(event_from_row(r) for r in reversed(recent)))

    def list_runs(self) -> list[RunStatus]:
        """Every stored run, by run id, without recent events. O(runs)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs ORDER BY run_id"
            ).fetchall()
        return [run_from_row(row, ()) for row in rows]

    def get_events(self, run_id: str) -> list[Event]:
        """A run's events in the order they were added."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
        return [event_from_row(r) for r in rows]

    def get_segments(self, run_id: str) -> list[Segment]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT start_step, end_step, phase, confidence FROM segments "
                "WHERE run_id = ? ORDER BY ordinal",
                (run_id,),
            ).fetchall()
        return [segment_from_row(row) for row in rows]

    def close(self) -> None:
        """Close the connection; idempotent."""
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"



class _LocalClaim:
    def release(self) -> bool:
        return True
