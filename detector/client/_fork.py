"""Process hooks: runs survive ``os.fork()`` (the child starts over with an empty
buffer) and are closed at interpreter exit.

The hooks are installed once, when the first run is made. Before a fork every
live run's lock is taken, so no child inherits a buffer half-way through an
update; the child drops the parent's threads and channel (kept referenced in
:data:`FORK_ORPHANS`, so that no destructor touches them) and each run resumes
on a new channel from its first ``log()``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detector.client._run import Run

_LIVE: set[Run] = set()
_LIVE_LOCK = threading.Lock()
_HOOKS_INSTALLED = False
FORK_ORPHANS: list[object] = []  # the parent's objects, kept alive in a child
_FORK_HELD: list[threading.Lock] = []


def register(run: Run) -> None:
    global _HOOKS_INSTALLED
    with _LIVE_LOCK:
        _LIVE.add(run)
        if not _HOOKS_INSTALLED:
            _HOOKS_INSTALLED = True
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(
                    before=_before_fork,
                    after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child,
                )
            atexit.register(_close_at_exit)


def unregister(run: Run) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(run)


def _before_fork() -> None:
    # Hold every run's lock across fork, so that no child inherits a buffer
    # half-way through an update by one of our threads.
    _LIVE_LOCK.acquire()
    for run in list(_LIVE):
        lock = run._lock
        if lock.acquire(timeout=5.0):
            _FORK_HELD.append(lock)


def _after_fork_in_parent() -> None:
    while _FORK_HELD:
        _FORK_HELD.pop().release()
    _LIVE_LOCK.release()


def _after_fork_in_child() -> None:
    global _LIVE_LOCK
    FORK_ORPHANS.extend(_FORK_HELD)
    _FORK_HELD.clear()
    _LIVE_LOCK = threading.Lock()
    for run in list(_LIVE):
        with contextlib.suppress(Exception):
            run._after_fork_in_child()


def _close_at_exit() -> None:
    with _LIVE_LOCK:
        runs = list(_LIVE)
    for run in runs:
        with contextlib.suppress(Exception):
            run.close(timeout=run._config.exit_timeout)
