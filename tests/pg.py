"""The test PostgreSQL: fresh schemas and databases that tests own and drop.

``PHASEWATCH_TEST_POSTGRES`` names the server and database (default
``postgresql://127.0.0.1:5432/test``; ``.ci/run`` starts it). In CI an
unreachable server is a failure, elsewhere a skip.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest

BASE_URL = os.environ.get("PHASEWATCH_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


def _connect(url: str):  # -> psycopg.Connection
    try:
        import psycopg
    except ImportError as error:
        _unavailable(f"psycopg is not installed ({error}): pip install -e '.[dev,postgres]'")
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        _unavailable(f"no PostgreSQL at {url}: {error}")


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``search_path`` set to ``schema`` through libpq's ``options``."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A new empty schema in the test database, as a store URL; dropped afterwards."""
    schema = f"pw_{uuid.uuid4().hex[:12]}"
    with _connect(BASE_URL) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(BASE_URL, schema)
    finally:
        with _connect(BASE_URL) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new empty database on the test server, as a store URL; dropped afterwards."""
    name = f"pw_{uuid.uuid4().hex[:12]}"
    base, _, _ = BASE_URL.rpartition("/")
    with _connect(BASE_URL) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{base}/{name}"
    finally:
        with _connect(BASE_URL) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def terminate_backend(pid: int, timeout: float = 10.0) -> None:
    """End one server session, as a crashed replica or a network cut would, and wait
    until it is gone (pg_terminate_backend only signals it)."""
    with _connect(BASE_URL) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        deadline = time.monotonic() + timeout
        while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"session {pid} still alive after {timeout}s"
            time.sleep(0.01)
