"""PostgreSQL store: what SQLite does, shared by several detector replicas.

Behaves like :class:`~detector.store.sqlite.SqliteStore` (one test suite runs
against both) and adds what scale-out needs (``shared = True``):

- **Ownership.** ``claim_run`` takes a session-level advisory lock
  (``pg_try_advisory_lock``) on a 64-bit hash of the schema and run id, on a
  connection kept for locks only, and holds it until the last claim of that
  run in this process is released. PostgreSQL releases a session's locks when
  the session ends, so a replica that dies (SIGKILL, OOM, lost node) gives up
  its runs without any home-made lease: as soon as PostgreSQL notices the
  connection is gone (at once when the process dies and its kernel closes the
  socket; within about a minute of TCP keepalives, set on that session, when
  the whole node is lost). One connection holds all of a replica's locks, so
  ten thousand open runs do not cost ten thousand connections.
- **Who owns a run** is also written to ``run_owner`` (replica name, epoch,
  since when), so that a refused replica can name the owner, and so that
  writes are fenced: each claim bumps the run's epoch, and a checkpoint is only
  written while the epoch is still the one this process claimed. A replica that
  lost its lock connection and was taken over gets ``Aborted`` on its next
  write instead of overwriting the new owner's checkpoint.

Data goes through a pool of connections (psycopg_pool: ``pool_size``, 8 by
default), so the batches of different streams are written concurrently
instead of queueing behind one connection; writes of one batch are one
transaction, and a connection is checked when taken from the pool (one round
trip), so one broken by a PostgreSQL restart is replaced instead of failing a
write. The advisory locks live on a connection of their own, kept apart from
the pool (one SQL statement at a time, behind a lock): a pooled connection is
shared and recycled, while a session lock belongs to the session that took it.
Errors PostgreSQL cannot serve, and no pooled connection within
``pool_timeout`` seconds, are :class:`~detector.errors.Unavailable` (gRPC
``UNAVAILABLE``: clients retry).

The URL is libpq's (``postgresql://user@host:5432/db?sslmode=require``); a
schema other than ``public`` is chosen with
``?options=-csearch_path%3Dmyschema``, as with any libpq client.

Over 400 lines: :class:`PostgresStore` is the whole :class:`~detector.ports.Store`
port (runs, events, segments, checkpoints and their log, claims), as
:class:`~detector.store.sqlite.SqliteStore` is, and every method shares the
pool, the error mapping and the epoch fencing; the schema's migrations are in
:mod:`detector.store.postgres_schema`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from detector.core.types import Event, Segment
from detector.errors import Aborted, FailedPrecondition, InvalidArgument, Unavailable
from detector.ports import Checkpoint, RunStatus
from detector.store import _redact
from detector.store.postgres_schema import _MIGRATIONS, SCHEMA_VERSION
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

log = logging.getLogger("phasewatch.store")

# pg_advisory_xact_lock key serialising migrations of replicas that start together.
_MIGRATION_LOCK = 0x7068_6173_6577_6174  # "phasewat"

# libpq settings we want unless the URL says otherwise: notice a dead server
# within about a minute instead of the kernel's two hours.
_CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "application_name": "phasewatch",
}

DEFAULT_POOL_SIZE = 8
DEFAULT_POOL_TIMEOUT = 10.0  # seconds to wait for a pooled connection (libpq's connect_timeout)

# The server side of the lock session: lets PostgreSQL notice a lost replica
# (and release its locks) within about a minute. Any role may set these.
_LOCK_SESSION_SETTINGS = (
    "SET tcp_keepalives_idle = 30",
    "SET tcp_keepalives_interval = 10",
    "SET tcp_keepalives_count = 3",
)


class PostgresStore:
    """The :class:`detector.engine.Store` on PostgreSQL, shared by replicas; thread-safe.

    ``url`` is a libpq connection URL. ``recent_events`` is how many of a run's
    last events ``get_run`` returns. ``pool_size`` bounds the data connections
    (plus one for the locks), ``pool_timeout`` the wait for one.
    """

    shared = True
    local_commits = False  # a round trip, and the server's WAL flush

    def __init__(
        self,
        url: str,
        *,
        recent_events: int = 20,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    ) -> None:
        if pool_size < 1 or not pool_timeout > 0:
            raise InvalidArgument("pool_size must be at least 1 and pool_timeout positive")
        self.url = url
        self.recent_events = recent_events
        try:
            params = conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as error:
            raise InvalidArgument(f"store {_redact(url)!r}: {_first_line(error)}") from None
        for key, value in _CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        self._conninfo = conninfo.make_conninfo("", **params)
        self._closed = False
        self.pool_timeout = pool_timeout
        self._locks_lock = threading.Lock()  # the lock connection and the tables below
        self._lock_conn: psycopg.Connection[Any] | None = None
        self._generation = 0  # bumped when the lock connection is replaced
        self._held: dict[str, int] = {}  # run id -> open claims in this process
        self._epochs: dict[str, int] = {}  # run id -> epoch this process claimed
        # The first connection is made directly: an unreachable store fails at
        # once, with libpq's reason, rather than after the pool's retries.
        try:
            with self._connect() as conn:
                self.schema: str = _one(conn.execute("SELECT current_schema()").fetchone())
                self._migrate(conn)
        except psycopg.OperationalError as error:
            raise Unavailable(f"store {self}: {_first_line(error)}") from error
        self._pool = ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            timeout=pool_timeout,
            check=ConnectionPool.check_connection,
            name="phasewatch-data",
            open=False,
        )
        self._pool.open()

    # --- connections ----------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._conninfo, autocommit=True)

    @contextlib.contextmanager
    def _data(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled data connection, with PostgreSQL's errors mapped (the pool
        discards a broken connection when it comes back)."""
        if self._closed:
            raise Unavailable(f"store {self} is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as error:
            raise Unavailable(
                f"store {self}: no connection within {self.pool_timeout:g} s ({_first_line(error)})"
            ) from error
        except PoolClosed as error:
            raise Unavailable(f"store {self} is closed") from error
        except psycopg.OperationalError as error:
            raise Unavailable(f"store {self}: {_first_line(error)}") from error

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS phasewatch_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM phasewatch_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO phasewatch_schema (version) VALUES (0)")
            version = 0 if row is None else row[0]
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"store {self} has schema version {version}; this phasewatch "
                    f"understands up to {SCHEMA_VERSION}: upgrade phasewatch"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                conn.execute(_MIGRATIONS[target - 1])
                conn.execute("UPDATE phasewatch_schema SET version = %s", (target,))

    # --- writes ---------------------------------------------------------------

    def upsert_run(self, status: RunStatus) -> None:
        with self._data() as conn:
            self._upsert_run(conn, status)

    def add_events(self, run_id: str, events: Sequence[Event]) -> None:
        with self._data() as conn, conn.transaction():
            self._add_events(conn, run_id, events)

    def replace_segments(self, run_id: str, segments: Sequence[Segment]) -> None:
        with self._data() as conn, conn.transaction():
            self._replace_segments(conn, run_id, segments)

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
        """Store a checkpoint with its status, events and segments in one transaction.

        Raises :class:`Aborted` when this process claimed the run but another
        replica has claimed it since: the new owner's state must not be overwritten.
        """
        epoch = self._epochs.get(run_id)
        with self._data() as conn, conn.transaction():
            if epoch is not None:
                # FOR SHARE: a takeover (which updates the row) waits for this commit.
                row = conn.execute(
                    "SELECT epoch, owner FROM run_owner WHERE run_id = %s FOR SHARE", (run_id,)
                ).fetchone()
                if row is None or row[0] != epoch:
                    raise Aborted(
                        f"run {run_id!r} was taken over by replica "
                        f"{row[1] if row else '?'!r}; this replica no longer writes it"
                    )
            if status is not None:
                self._upsert_run(conn, status)
            self._add_events(conn, run_id, events)
            if segments is not None:
                self._replace_segments(conn, run_id, segments)
            if append:
                append_checkpoint_log(conn, "%s", run_id, blob, through_step)
            else:
                conn.execute(
                    "INSERT INTO checkpoints (run_id, through_step, state, saved_at) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (run_id) DO UPDATE SET "
                    "through_step = excluded.through_step, state = excluded.state, "
                    "saved_at = excluded.saved_at",
                    (run_id, through_step, blob, time.time()),
                )
                conn.execute("DELETE FROM checkpoint_log WHERE run_id = %s", (run_id,))

    def load_checkpoint(self, run_id: str) -> Checkpoint | None:
        with self._data() as conn, conn.transaction():  # the state and its log agree
            row = conn.execute(
                "SELECT state, through_step FROM checkpoints WHERE run_id = %s", (run_id,)
            ).fetchone()
            log = conn.execute(
                "SELECT entry, through_step FROM checkpoint_log WHERE run_id = %s ORDER BY seq",
                (run_id,),
            ).fetchall()
        return checkpoint_from_rows(row, log)

    @staticmethod
    def _upsert_run(conn: psycopg.Connection[Any], status: RunStatus) -> None:
        row = list(run_row(status))
        row[6] = bool(row[6])  # ended: BOOLEAN here, INTEGER in SQLite
        conn.execute(
            f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (run_id) DO UPDATE SET labels = excluded.labels, "
            "phase = excluded.phase, since_step = excluded.since_step, "
            "confidence = excluded.confidence, last_step = excluded.last_step, "
            "ended = excluded.ended, updated_at = excluded.updated_at",
            row,
        )

    @staticmethod
    def _add_events(conn: psycopg.Connection[Any], run_id: str, events: Sequence[Event]) -> None:
        if events:
            with conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO events (run_id, {EVENT_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [(run_id, *event_row(e)) for e in events],
                )

    @staticmethod
    def _replace_segments(
        conn: psycopg.Connection[Any], run_id: str, segments: Sequence[Segment]
    ) -> None:
        conn.execute("DELETE FROM segments WHERE run_id = %s", (run_id,))
        if segments:
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO segments (run_id, ordinal, start_step, end_step, phase, "
                    "confidence) VALUES (%s, %s, %s, %s, %s, %s)",
                    segment_rows(run_id, segments),
                )

    # --- ownership ------------------------------------------------------------

    def claim_run(self, run_id: str, owner: str) -> _PostgresClaim:
        """Hold ``run_id`` for this process until the claim is released.

        Claims of one run in one process stack (PostgreSQL's session locks do
        too); the lock is given back with the last. Raises :class:`Aborted`
        naming the owner when another session holds the run.
        """
        with self._locks_lock:
            if self._closed:
                raise Unavailable(f"store {self} is closed")
            count = self._held.get(run_id, 0)
            if count == 0:
                key = self.lock_key(run_id)
                conn = self._lock_connection()
                try:
                    got = _one(conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone())
                except psycopg.OperationalError as error:
                    raise Unavailable(f"store {self}: {_first_line(error)}") from error
                if not got:
                    raise self._owned(run_id)
                try:
                    self._epochs[run_id] = self._take_ownership(run_id, owner)
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                    raise
            self._held[run_id] = count + 1
            return _PostgresClaim(self, run_id, self._generation)

    def lock_key(self, run_id: str) -> int:
        """The advisory lock key of a run: 64 bits of BLAKE2b of schema and run id.

        64 bits make a collision between two live runs negligible (about 1e-10
        with 100 000 open runs); the schema keeps deployments that share a
        database apart.
        """
        digest = hashlib.blake2b(f"{self.schema}\0{run_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

    def owner_of(self, run_id: str) -> tuple[str, int, float] | None:
        """The last replica recorded as taking the run: (owner, epoch, since), or None."""
        with self._data() as conn:
            row = conn.execute(
                "SELECT owner, epoch, since FROM run_owner WHERE run_id = %s", (run_id,)
            ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def _owned(self, run_id: str) -> Aborted:
        """The Aborted naming the replica that owns ``run_id`` (in text and ``owner``)."""
        try:
            recorded = self.owner_of(run_id)
        except Unavailable:
            recorded = None
        if recorded is None:
            who = "another replica"
        else:
            since = datetime.fromtimestamp(recorded[2], timezone.utc).isoformat(timespec="seconds")
            who = f"replica {recorded[0]} (since {since})"
        return Aborted(
            f"run {run_id!r} is owned by {who}: a stream of it is open there. Retry "
            "after that stream ends; a replica that dies gives its runs up at once",
            owner=None if recorded is None else str(recorded[0]),
            run_id=run_id,
        )

    def _take_ownership(self, run_id: str, owner: str) -> int:
        with self._data() as conn:
            return int(
                _one(conn.execute(
                    "INSERT INTO run_owner (run_id, owner, epoch, since) VALUES (%s, %s, 1, %s) "
                    "ON CONFLICT (run_id) DO UPDATE SET owner = excluded.owner, "
                    "epoch = run_owner.epoch + 1, since = excluded.since RETURNING epoch",
                    (run_id, owner, time.time()),
                ).fetchone())
            )

    def _lock_connection(self) -> psycopg.Connection[Any]:
        conn = self._lock_conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            # The old session, and every lock it held, is gone. Our open claims
            # are void: forget them, and let fencing stop their writers if
            # another replica takes a run over.
            log.warning("store %s: the lock session was lost; re-opening it", self)
            conn.close()
            self._held.clear()
            self._generation += 1
        try:
            conn = self._connect()
            for statement in _LOCK_SESSION_SETTINGS:
                conn.execute(statement)
        except psycopg.OperationalError as error:
            raise Unavailable(f"store {self}: {_first_line(error)}") from error
        self._lock_conn = conn
        return conn

    def _release(self, run_id: str, generation: int) -> bool:
        with self._locks_lock:
            if generation != self._generation or run_id not in self._held:
                return True  # the session that held it is gone, and the lock with it
            count = self._held[run_id] - 1
            if count > 0:
                self._held[run_id] = count
                return False
            del self._held[run_id]
            self._epochs.pop(run_id, None)
            conn = self._lock_conn
            if conn is not None and not conn.closed:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (self.lock_key(run_id),))
                except psycopg.Error:
                    log.warning("store %s: could not unlock run %r", self, run_id, exc_info=True)
            return True

    # --- reads ----------------------------------------------------------------

    def get_run(self, run_id: str) -> RunStatus | None:
        with self._data() as conn:
            row = conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = %s", (run_id,)
            ).fetchone()
            if row is None:
                return None
            recent = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = %s ORDER BY id DESC LIMIT %s",
                (run_id, self.recent_events),
            ).fetchall()
        return run_from_row(row, tuple(event_from_row(r) for r in reversed(recent)))

    def list_runs(self) -> list[RunStatus]:
        """Every stored run, by run id (byte order, as SQLite), without recent events."""
        with self._data() as conn:
            rows = conn.execute(
                f'SELECT {RUN_COLUMNS} FROM runs ORDER BY run_id COLLATE "C"'
            ).fetchall()
        return [run_from_row(row, ()) for row in rows]

    def get_events(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[Event]:
        """A run's events in the order they were added: ``limit`` of them from ``offset``."""
        with self._data() as conn:
            rows = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = %s ORDER BY id "
                "LIMIT %s OFFSET %s", (run_id, limit, offset)
            ).fetchall()
        return [event_from_row(r) for r in rows]

    def get_segments(self, run_id: str) -> list[Segment]:
        with self._data() as conn:
            rows = conn.execute(
                "SELECT start_step, end_step, phase, confidence FROM segments "
                "WHERE run_id = %s ORDER BY ordinal",
                (run_id,),
            ).fetchall()
        return [segment_from_row(row) for row in rows]

    def close(self) -> None:
        """Close both connections, which gives every claimed run up; idempotent."""
        with self._locks_lock:
            self._closed = True
            if self._lock_conn is not None:
                self._lock_conn.close()
            self._held.clear()
            self._epochs.clear()
        self._pool.close()

    def __str__(self) -> str:
        return repr(_redact(self.url))

    def __repr__(self) -> str:
        return f"PostgresStore({_redact(self.url)!r})"


class _PostgresClaim:
    """One stream's claim on a run; ``release()`` is idempotent."""

    def __init__(self, store: PostgresStore, run_id: str, generation: int) -> None:
        self._store: PostgresStore | None = store
        self._run_id = run_id
        self._generation = generation

    def release(self) -> bool:
        store, self._store = self._store, None
        if store is None:
            return True
        return store._release(self._run_id, self._generation)


def _one(row: Any) -> Any:
    """The value of a one-column row that the statement always returns (``SELECT f()``,
    ``RETURNING``); psycopg types ``fetchone()`` as optional for statements in general."""
    return row[0]


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
