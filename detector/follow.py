"""Follow a run log that a training job is writing, and stream its new points
to a detector through the client SDK (``phasewatch follow``).

Any log :mod:`detector.logfile` reads can be followed: JSON Lines and CSV
that grow by lines, a ``trainer_state.json`` the Trainer rewrites, a
TensorBoard directory that gains records and files. Every ``interval``
seconds the follower looks at the files' sizes and modification times; when
one changed it re-reads the log (a half-written last line or record is left
for the next look) and sends each series' points beyond the last step it
sent for that series, row by row in step order, through :class:`Run`.
A look costs one ``stat`` per file; a read is O(size of the log) for the text
formats (about 0.6 s for 500 000 points of JSON Lines), and O(new records)
for TensorBoard, whose loaders keep their place between reads. Polling rather than inotify
(``watchdog``): it works the same on network file systems and in containers,
and a read per change is what re-reading a rewritten ``trainer_state.json``
or a new event file needs anyway.

Resuming: a restarted follower asks the detector for the run's last step
(``GetPhase``'s ``last_step``, which counts the points the detector holds
back for reordering) and sends from that step on. Points below it were
received by the detector: a stream delivers batches in order, and the log's
rows come in step order, so what reached the detector is a prefix of what was
sent. The points at that step itself are sent again, as the row may have
been cut between two batches; the detector ignores a point it already has.
A series whose points step backwards in the file (a job that restarted from
a checkpoint and logs old steps again) is followed from its highest step.

Back-pressure: the follower logs no more while the client holds more than
half of its buffer, so a long log caught up at start is never dropped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from detector.client import ClientConfig, DisabledRun, Run
from detector.errors import LogFileError
from detector.logfile import Columns, log_files, read_growing_log

DEFAULT_INTERVAL = 2.0
# A log that cannot be read this many looks in a row is an error, not a write in progress.
READ_FAILURES_ALLOWED = 3

Say = Callable[[str], None]


@dataclass
class FollowStats:
    """What a follower did: looks, reads, rows and points handed to the client."""

    looks: int = 0
    reads: int = 0
    rows: int = 0
    points: int = 0


class Follower:
    """Sends the new points of one log to one run, a look at a time.

    ``resume_step`` is the detector's last step for the run (None for a new
    run): points at or above it are sent, those below are not. Logging waits
    while the client holds more than ``room_points`` points.
    """

    def __init__(
        self, path: str | os.PathLike[str], run: Run | DisabledRun, *, resume_step: int | None = None,
        say: Say | None = None, room_points: int = ClientConfig.max_buffered_points // 2,
    ) -> None:
        self.path = os.fspath(path)
        self.run = run
        self.stats = FollowStats()
        self._floor = -1 if resume_step is None else resume_step - 1
        self._sent: dict[str, int] = {}  # series -> highest step sent
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._failures = 0
        self._say = say or (lambda _: None)
        self._warned: set[str] = set()
        self._cache: dict[str, object] = {}  # a TensorBoard log's loaders, kept between reads
        self._room = max(1, room_points)

    def look(self) -> int:
        """Read the log if it changed and send its new points; returns how many.

        Raises LogFileError when the log stays unreadable for
        ``READ_FAILURES_ALLOWED`` looks in a row.
        """
        self.stats.looks += 1
        signature = self._current_signature()
        if signature is None:
            self._warn_once(f"{self.path}: no log there yet; waiting for it")
            return 0
        if signature == self._signature:
            return 0
        try:
            columns = read_growing_log(self.path, warn=self._warn_once, cache=self._cache)
        except LogFileError as error:
            if error.problem == "the file has no records":
                return 0  # created, not written yet
            self._failures += 1
            if self._failures >= READ_FAILURES_ALLOWED:
                raise
            return 0  # a file being rewritten (trainer_state.json): look again
        self._failures = 0
        self._signature = signature
        self.stats.reads += 1
        return self._send(columns)

    def _current_signature(self) -> tuple[tuple[str, int, int], ...] | None:
        try:
            files = log_files(self.path)
            return tuple(
                (f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files
            )
        except (OSError, LogFileError):
            return None  # not there yet (a job that has not started logging)

    def _send(self, columns: Columns) -> int:
        names: list[str] = []
        steps: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for name, (series_steps, series_values) in columns.items():
            new = series_steps > self._sent.get(name, self._floor)
            if new.any():
                names.append(name)
                steps.append(series_steps[new])
                values.append(series_values[new])
        if not names:
            return 0
        which = np.concatenate([np.full(len(s), i) for i, s in enumerate(steps)])
        all_steps = np.concatenate(steps)
        all_values = np.concatenate(values)
        order = np.argsort(all_steps, kind="stable")
        bounds = np.flatnonzero(np.diff(all_steps[order])) + 1
        sent = 0
        for rows in np.split(order, bounds):
            step = int(all_steps[rows[0]])
            row = {names[i]: float(v) for i, v in zip(which[rows], all_values[rows], strict=True)}
            self._wait_for_room()
            if not self.run.log(step, row):  # the run was closed under us
                break
            for name in row:
                self._sent[name] = max(self._sent.get(name, self._floor), step)
            self.stats.rows += 1
            sent += len(row)
        self.stats.points += sent
        return sent

    def _wait_for_room(self) -> None:
        while self.run.stats.buffered > self._room and not self.run.closed:
            time.sleep(0.05)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._say(message if message.endswith("waiting for it") else f"warning: {message}")


def follow(
    follower: Follower,
    *,
    interval: float = DEFAULT_INTERVAL,
    idle_exit: float | None = None,
    stop: threading.Event | None = None,
) -> FollowStats:
    """Look at the log every ``interval`` seconds until ``stop`` is set, or until
    it has not changed for ``idle_exit`` seconds (None: never)."""
    stop = stop or threading.Event()
    last_change = time.monotonic()
    while not stop.is_set():
        before = follower.stats.reads
        follower.look()
        now = time.monotonic()
        if follower.stats.reads != before:
            last_change = now
        elif idle_exit is not None and now - last_change >= idle_exit:
            break
        stop.wait(interval)
    return follower.stats
