"""SQLite store: runs, events, segments and checkpoints that survive a restart.

One connection, guarded by one lock: SQLite serialises writers anyway, and a
single connection keeps ``:memory:`` databases shared between threads. File
databases use WAL so readers (other processes, ``sqlite3`` in a shell) do not
block the detector's writes.

WAL checkpoints (copying the log back into the database file, with two
fsyncs) run on a background thread with its own connection, not inside a
commit: SQLite's automatic checkpoint ran in whichever commit filled the log
past 1000 pages, holding the store lock (and so every stream's commit) for
7-15 ms while the median commit took 0.08 ms.

SQLite serves one detector process (``shared = False``): run claims always
succeed, and nothing else writes the runs.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from detector.core.types import Event, Segment
from detector.errors import FailedPrecondition, InvalidArgument
from detector.ports import Checkpoint, RunStatus
from detector.store.rows import (
    EVENT_COLUMNS,
    RUN_COLUMNS,
    append_checkpoint_log,
    checkpoint_from_rows,
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
    """
    CREATE TABLE store_info (          -- who this store is: written once, at creation
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # The step an appended log entry covers lives in its own row: moving it in the
    # checkpoints row made SQLite rewrite that row's whole state blob (hundreds of
    # kB) on every append. NULL in entries written before this migration.
    """
    ALTER TABLE checkpoint_log ADD COLUMN through_step INTEGER;
    """,
)

logger = logging.getLogger("phasewatch.store")

SCHEMA_VERSION = len(_MIGRATIONS)
_SQLITE_HEADER = b"SQLite format 3\x00"
_SUFFIXES = ("-wal", "-shm")


class SqliteStore:
    """The :class:`detector.engine.Store` on SQLite; safe to call from many threads.

    ``path`` is a file or ``":memory:"``. A file is checked before use (see
    ``_check_file``, ``PRAGMA quick_check``, the schema version) and refused with
    FailedPrecondition naming it when damaged; its directory must exist unless
    ``create_directory``. ``store_id`` is the identity written at creation.
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
    local_commits = True  # WAL with synchronous=NORMAL: a commit appends to the log, no fsync

    def __init__(self, path: str | Path, *, recent_events: int = 20,
                 create_directory: bool = False, checkpoint_seconds: float = 1.0) -> None:
        path = str(path)
        if path != ":memory:":
            path = str(Path(path).absolute())
            _check_file(path, create_directory)
        self.path = path
        self.recent_events = recent_events
        self.store_id = ""
        self._lock = threading.Lock()
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()
        try:
            # check_same_thread=False: the lock, not the thread, is what serialises use.
            self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as error:
            raise FailedPrecondition(f"store {path}: cannot open it ({error})") from None
        try:
            if path != ":memory:":
                self._check_integrity()
                self._check_schema()  # before WAL, which writes the header
                self._conn.execute("PRAGMA journal_mode=WAL")
                # With WAL, NORMAL survives a process crash; only power loss can
                # lose the last transactions, and clients replay unacked points.
                self._conn.execute("PRAGMA synchronous=NORMAL")
                # Checkpoints run on the checkpointer thread, not in a commit.
                self._conn.execute("PRAGMA wal_autocheckpoint=0")
            self._migrate()
        except sqlite3.DatabaseError as error:
            self._conn.close()
            raise FailedPrecondition(
                f"store {path} is damaged or not a phasewatch store ({error}); "
                "restore it from a backup, or move it away to start an empty store"
            ) from None
        except BaseException:
            self._conn.close()
            raise
        if path != ":memory:":
            self._checkpointer = threading.Thread(
                target=self._checkpoint_wal, args=(checkpoint_seconds,),
                name="phasewatch-wal-checkpoint", daemon=True,
            )
            self._checkpointer.start()

    def _checkpoint_wal(self, every: float) -> None:
        """Every ``every`` seconds, a PASSIVE checkpoint on a connection of its own:
        it copies what it can of the WAL into the database file without waiting
        for (or blocking) the writer or readers; the sqlite3 module lets the
        interpreter lock go meanwhile. The WAL stays about ``every`` seconds of
        commits long; a last checkpoint runs when the store closes."""
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as error:
            logger.warning("store %s: no background WAL checkpoints (%s)", self.path, error)
            return
        try:
            while not self._closing.wait(every):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as error:  # retried at the next tick
                    logger.warning("store %s: WAL checkpoint failed (%s)", self.path, error)
        finally:
            conn.close()

    def _check_integrity(self) -> None:
        """``PRAGMA quick_check``: O(size of the file), once at start.

        A damaged page found now is refused with the file named, instead of being
        served as SERVING and failing resumes later with INTERNAL.
        """
        rows = self._conn.execute("PRAGMA quick_check(3)").fetchall()
        problems = [" ".join(str(r[0]).split()) for r in rows if r[0] != "ok"]
        if problems:
            raise FailedPrecondition(
                f"store {self.path} is damaged (PRAGMA quick_check: {'; '.join(problems)}); "
                "restore it from a backup, or move it away to start an empty store"
            )

    def _check_schema(self) -> None:
        """FailedPrecondition for a newer schema, or a SQLite file that is not phasewatch's."""
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"store {self.path} has schema version {version}; this phasewatch "
                f"understands up to {SCHEMA_VERSION}: upgrade phasewatch"
            )
        if version == 0:
            tables = self._conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
            if tables:
                raise FailedPrecondition(
                    f"store {self.path} is a SQLite file with {tables} tables but no "
                    "phasewatch schema: not a phasewatch store"
                )

    def _migrate(self) -> None:
        with self._lock:
            self._check_schema()
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            for target in range(version + 1, SCHEMA_VERSION + 1):
                # executescript commits first, so each migration is its own step.
                self._conn.executescript(
                    f"BEGIN; {_MIGRATIONS[target - 1]} PRAGMA user_version = {target}; COMMIT;"
                )
            with self._conn:
                # Stores made before store_info get their identity now.
                self._conn.execute(
                    "INSERT OR IGNORE INTO store_info (key, value) VALUES ('store_id', ?), "
                    "('created_at', ?)",
                    (uuid.uuid4().hex, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                )
            self.store_id = self._conn.execute(
                "SELECT value FROM store_info WHERE key = 'store_id'"
            ).fetchone()[0]

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
                "SELECT entry, through_step FROM checkpoint_log WHERE run_id = ? ORDER BY seq",
                (run_id,),
            ).fetchall()
        return checkpoint_from_rows(row, log)

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

    def get_events(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[Event]:
        """A run's events in the order they were added: ``limit`` of them from ``offset``.

        O(offset + limit) through the (run_id, id) index."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? ORDER BY id "
                "LIMIT ? OFFSET ?", (run_id, -1 if limit is None else limit, offset)
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
        """Stop the checkpointer and close the connection (SQLite checkpoints the
        WAL when its last connection closes); idempotent."""
        self._closing.set()
        if self._checkpointer is not None and self._checkpointer is not threading.current_thread():
            self._checkpointer.join()
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"


def _check_file(path: str, create_directory: bool) -> None:
    """Refuse, naming the file, what must not be taken as a new empty store.

    A new store is only created where no file exists. An existing file of 0
    bytes is a store that was emptied (a truncation, a failed copy), not a new
    one: serving it would answer NOT_FOUND for every run and tell resuming
    clients to start over. A file that does not start with SQLite's header is
    not opened at all (nothing is written to, say, /etc/passwd).
    """
    file = Path(path)
    if not file.parent.is_dir():
        if not create_directory:
            raise InvalidArgument(
                f"store {path}: directory {file.parent} does not exist (create it first)"
            )
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidArgument(f"store {path}: cannot create its directory ({error})") from None
    if not file.exists():
        for suffix in _SUFFIXES:
            if Path(path + suffix).exists():
                raise FailedPrecondition(
                    f"store {path} is missing but its {path + suffix} is there: the store "
                    "was removed or moved; restore it, or remove the leftovers to start anew"
                )
        return
    if file.is_dir():
        raise InvalidArgument(f"store {path} is a directory, not a file")
    try:
        with open(file, "rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as error:
        raise InvalidArgument(f"store {path}: cannot read it ({error.strerror})") from None
    if not header:
        raise FailedPrecondition(
            f"store {path} is an empty file (0 bytes), not a new store: it was truncated "
            "or copied half-way; restore it from a backup, or remove it to start an empty store"
        )
    if header != _SQLITE_HEADER:
        raise FailedPrecondition(f"store {path} is not a SQLite database (not opened)")


class _LocalClaim:
    def release(self) -> bool:
        return True
