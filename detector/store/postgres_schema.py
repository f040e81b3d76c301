"""The PostgreSQL schema, as migrations: what :class:`~detector.store.postgres.PostgresStore`
applies, in order, under an advisory lock, when it opens a database."""

from __future__ import annotations

# Each entry upgrades the schema from version i to i + 1. Append; never edit one
# that has shipped. Same tables as SQLite, plus run_owner.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        phase TEXT,
        since_step BIGINT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL,
        last_step BIGINT NOT NULL,
        ended BOOLEAN NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        run_id TEXT NOT NULL,
        step BIGINT NOT NULL,
        detected_at BIGINT NOT NULL,
        kind TEXT NOT NULL,
        series TEXT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL,
        message TEXT NOT NULL,
        phase TEXT,
        evidence TEXT NOT NULL
    );
    CREATE INDEX events_by_run ON events (run_id, id);
    CREATE TABLE segments (
        run_id TEXT NOT NULL,
        ordinal INTEGER NOT NULL,
        start_step BIGINT NOT NULL,
        end_step BIGINT NOT NULL,
        phase TEXT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, ordinal)
    );
    CREATE TABLE checkpoints (
        run_id TEXT PRIMARY KEY,
        through_step BIGINT NOT NULL,
        state BYTEA NOT NULL,
        saved_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE run_owner (
        run_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        since DOUBLE PRECISION NOT NULL
    );
    """,
    """
    CREATE TABLE checkpoint_log (
        run_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        entry BYTEA NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    """,
    # The step an appended entry covers, in its own row (as in SQLite, where moving it
    # in the checkpoints row rewrote the state blob on every append); NULL before.
    """
    ALTER TABLE checkpoint_log ADD COLUMN through_step BIGINT;
    """,
)

SCHEMA_VERSION = len(_MIGRATIONS)
