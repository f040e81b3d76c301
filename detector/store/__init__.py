"""Stores: where runs, events, segments and checkpoints survive restarts.

``open_store(url)`` picks the backend from the URL scheme:

- ``None``: the default file, ``sqlite:///<user data dir>/phasewatch.db``;
- ``sqlite:///PATH``: a file (``sqlite:///runs.db`` is relative to the working
  directory, ``sqlite:////var/lib/phasewatch.db`` absolute, as in SQLAlchemy);
  its directory must exist, and a file that is there must be a sound
  phasewatch store (see :class:`SqliteStore`);
- ``sqlite://``, ``sqlite://:memory:`` or ``sqlite:///:memory:``: in memory,
  gone when closed (for tests and demos);
- ``postgresql://…`` or ``postgres://…``: PostgreSQL (libpq URL), shared by
  replicas; needs the ``postgres`` extra (``pip install 'phasewatch[postgres]'``).
"""

from __future__ import annotations

from pathlib import Path

from detector.errors import InvalidArgument
from detector.ports import Store
from detector.store.sqlite import SqliteStore

__all__ = ["SqliteStore", "Store", "default_store_url", "open_store"]

_MEMORY_URLS = frozenset({"sqlite://", "sqlite://:memory:", "sqlite:///:memory:"})


def default_store_url() -> str:
    """``sqlite:///`` plus the phasewatch file under the user's data directory."""
    import platformdirs  # only needed when no store was given

    return f"sqlite:///{Path(platformdirs.user_data_dir('phasewatch')) / 'phasewatch.db'}"


def open_store(url: str | None) -> Store:
    """Open (creating if needed) the store named by ``url``.

    >>> store = open_store("sqlite://:memory:")
    >>> store.list_runs()
    []
    >>> store.close()
    """
    if url is None:  # the default file's directory is ours to create
        return SqliteStore(default_store_url().removeprefix("sqlite:///"), create_directory=True)
    if url in _MEMORY_URLS:
        return SqliteStore(":memory:")
    if url.startswith("sqlite:///"):
        return SqliteStore(url.removeprefix("sqlite:///"))
    scheme = url.partition("://")[0].lower()
    if scheme in ("postgresql", "postgres"):
        try:
            from detector.store.postgres import PostgresStore
        except ImportError as error:  # psycopg is an optional dependency
            raise InvalidArgument(
                f"store {_redact(url)!r}: the PostgreSQL store needs psycopg "
                f"({error}): pip install 'phasewatch[postgres]'"
            ) from None
        return PostgresStore(url)
    raise InvalidArgument(
        f"store {_redact(url)!r}: unsupported URL; use sqlite:///PATH, sqlite://:memory: "
        "or postgresql://…"
    )


def _redact(url: str) -> str:
    # Error messages get logged: never repeat a password from user:password@host.
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
