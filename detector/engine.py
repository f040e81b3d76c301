"""The engine: routes batches to runs, owns per-run state, emits events.

Its output depends only on the sequence of points, never on how they were
batched or where they came from: the gRPC server and ``phasewatch analyze``
both feed ``Engine.ingest``. Points are held in a small per-run reorder buffer
(``reorder_window`` distinct steps) and released to the run's
:class:`~detector.core.RunDetector` in step order, so any split of an ordered
log into batches gives the same events.

Thread-safety: one lock per run plus one for the run table; queries read
immutable snapshots and never wait on detection.

Durability: with a store, every ingest that changed a run is checkpointed
together with the events, segments and status it produced, in one store
transaction, *before* ``through_step`` is returned: an acknowledged step is
always covered by the checkpoint, and the stored events are exactly those of
the checkpointed state. A checkpoint is the pickled run state (detector,
reorder buffer, dedup memory; ~40 kB a series) plus a log of the batches
ingested since: a commit that only ingested appends its batches to the log
(16 bytes a point), and the whole state is written again once the log holds
``checkpoint_log_points`` points or anything else changed the run. A run that
is not in memory is restored from its checkpoint on its next
``start_run``/``ingest``: the state is loaded and the log replayed, which
detection's determinism makes exact. When the store refuses a write, the
run's in-memory state (now ahead of its checkpoint) is dropped, so that the
next call restores the last checkpoint and the client replays the rest.

Ownership (scale-out): a writer ``claim()``s a run for as long as its stream
is open. On a shared store (PostgreSQL) only one replica can hold a run; the
others get :class:`~detector.errors.Aborted` naming the owner, and a run is
forgotten from memory when its last claim is released, since another replica
may write it next.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import itertools
import logging
import os
import pickle
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import numpy as np

from detector.core import Event, Phase, RunDetector, RunDetectorConfig, Segment, SeriesSpec
from detector.core.types import Role, Split, check_name, infer_spec
from detector.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PhasewatchError,
    ResourceExhausted,
    Unavailable,
)
from detector.limits import RunRateLimiter


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the engine; the detector's own are in ``detector``."""

    max_series_per_run: int = 1024
    max_runs: int = 10_000
    # Distinct steps held back for reordering; a point older than the oldest
    # held step is a duplicate (ignored) or too late (rejected).
    reorder_window: int = 2
    recent_events: int = 20
    detector: RunDetectorConfig = field(default_factory=RunDetectorConfig)
    # Points a second per run (a token bucket, see detector.limits); None: no limit.
    max_points_per_second: float | None = None
    # The bucket's size in points; None: one second's worth.
    points_burst: float | None = None
    # Between full checkpoints, a commit appends only its batches to the run's
    # checkpoint log; a full one is written once the log holds this many points
    # (0: every commit writes a full checkpoint). Restoring replays the log, so
    # this bounds restore time (~5 µs a point) against write volume (a full
    # checkpoint is ~40 kB a series, a logged point 16 bytes).
    checkpoint_log_points: int = 16384
    # A run's events kept in memory for its timeline (the newest) when there is
    # no store; with one, timelines are read from the store, which keeps them all.
    max_timeline_events: int = 10_000
    # A batch is detected in blocks of about this many points, split by step:
    # cost stays linear in the batch (one 400k-point block cost 10x its share),
    # other runs detect between blocks, and a stopping server or a cancelled
    # call stops after the current block.
    block_points: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_series_per_run", "max_runs", "reorder_window", "recent_events",
                     "max_timeline_events", "block_points"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_log_points < 0:
            raise InvalidArgument(
                f"checkpoint_log_points must be at least 0, got {self.checkpoint_log_points}"
            )
        if self.max_points_per_second is not None:
            RunRateLimiter(self.max_points_per_second, self.points_burst)  # validates both


@dataclass(frozen=True)
class SeriesStatus:
    """One headline series of a run (training/validation loss and accuracy, as the
    labeller picked them), for the exporter's per-series gauges and the alerts."""

    name: str
    role: Role
    split: Split
    in_plateau: bool
    trend_tau: float | None  # Kendall's tau of the last trend window; None before one
    trend_p_value: float | None
    last_value: float  # raw, may be non-finite


@dataclass(frozen=True)
class RunStatus:
    """An immutable view of one run, as queries and the exporter see it."""

    run_id: str
    labels: Mapping[str, str]
    phase: Phase | None
    since_step: int
    confidence: float
    last_step: int
    ended: bool
    recent_events: tuple[Event, ...] = ()
    updated_at: float = 0.0
    series: tuple[SeriesStatus, ...] = ()  # headline series only: at most 4


@dataclass(frozen=True)
class IngestResult:
    """What one ``ingest`` did. ``through_step``: every point at or below it has been
    processed by the detector (points held for reordering are above it); -1 if none."""

    accepted: int
    rejected: int
    through_step: int
    events: tuple[Event, ...]
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSnapshot:
    """What the Prometheus collector reads; built without holding run locks."""

    runs: tuple[RunStatus, ...]
    events_by_kind: Mapping[str, int]
    ingested_points: int
    rejected_by_reason: Mapping[str, int]
    detection_seconds: float
    detection_batches: int
    # Calls per DETECTION_BUCKETS bucket (not cumulative), the last one past the
    # greatest bound: the exporter's histogram.
    detection_buckets: tuple[int, ...] = ()


# Upper bounds (seconds) of the detection-time histogram: a batch takes ~0.1-10 ms,
# a ruptures localisation or a checkpoint write tens of ms.
DETECTION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class Checkpoint(NamedTuple):
    """A run's checkpoint as stored: the full ``state``, the step the last write
    covers, and the ``log`` entries appended since ``state`` was written (oldest first)."""

    state: bytes
    through_step: int
    log: tuple[bytes, ...] = ()


class RunClaim(Protocol):
    """A replica's hold on one run, from ``Store.claim_run`` until ``release()``."""

    def release(self) -> bool:
        """Give the hold back; True when this process holds the run no more."""
        ...


class Store(Protocol):
    """Where runs, events, segments and checkpoints survive restarts (SQLite or PostgreSQL).

    ``shared`` is True when other processes may write the same runs (PostgreSQL):
    then claims exclude other replicas and the engine keeps a run in memory only
    while it holds a claim on it.
    """

    shared: bool

    def upsert_run(self, status: RunStatus) -> None: ...
    def add_events(self, run_id: str, events: Sequence[Event]) -> None: ...
    def replace_segments(self, run_id: str, segments: Sequence[Segment]) -> None: ...
    def get_run(self, run_id: str) -> RunStatus | None: ...
    def list_runs(self) -> list[RunStatus]: ...
    def get_events(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[Event]:
        """A run's events in insertion order, ``limit`` of them from ``offset`` (None: all)."""
        ...
    def get_segments(self, run_id: str) -> list[Segment]: ...
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
        """Store a run's checkpoint, and with it (same transaction) its status, new
        events and segments. ``append``: ``blob`` is a log entry added to the run's
        stored checkpoint (which must exist); else it replaces the checkpoint and
        its log. Raises Aborted if another replica took the run over."""
        ...
    def load_checkpoint(self, run_id: str) -> Checkpoint | None:
        """The last checkpoint of a run with its log, or None."""
        ...
    def claim_run(self, run_id: str, owner: str) -> RunClaim:
        """Hold a run for writing; raises Aborted naming the owner if another holds it."""
        ...
    def close(self) -> None: ...


log = logging.getLogger("phasewatch.engine")

_RELEASED_MEMORY = 4096
# Steps are 0 ..= MAX_STEP. 2^53 - 1 is the largest integer that float64 (the
# detectors' step arithmetic, JSON numbers in every client) holds exactly, and
# leaves int64 room for "step + 1" and segment ends downstream: a step beyond
# it is refused (InvalidArgument) rather than overflowing later (issue 18).
MAX_STEP = 2**53 - 1
# Labels are copied into every RunPhase, ListRuns page and /metrics scrape: bound
# them so that one run cannot make those exceed what clients accept (issue 18).
MAX_LABELS = 64
MAX_LABEL_KEY_BYTES = 128
MAX_LABEL_VALUE_BYTES = 1024
# Bump when the checkpoint's layout changes; older checkpoints are then refused
# with a clear error instead of being misread (version 1, the per-step dict
# reorder buffer, is still read: see _Run.restore).
CHECKPOINT_VERSION = 2

Columns = Mapping[str, tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray]]


class _Run:
    """Per-run state: the reorder buffer and the run detector.

    The reorder buffer is columnar: per series, the held points as sorted,
    distinct (steps, values) arrays, and the sorted distinct steps held by any
    series (``pending_steps``; their count is what ``reorder_window`` bounds).
    Each ingest sorts, deduplicates and merges a batch in numpy, then releases
    the oldest held steps as one block to ``RunDetector.update_many``. Cost per
    batch: O(points log points) in numpy plus O(series) Python calls, no Python
    object per point; per released line, the labeller's O(1) state machine.
    The released-steps memory (the last 4096 released steps, sorted since steps
    are released in order) tells a resent point from a new one that came too late.
    """

    def __init__(self, run_id: str, labels: Mapping[str, str], config: EngineConfig,
                 *, timeline: bool = True) -> None:
        self.run_id = run_id
        self.labels = dict(labels)
        self.config = config
        self.detector = RunDetector(config=config.detector, keep_events=0)  # see self.events
        self.lock = threading.Lock()
        # Held points per series: sorted distinct steps and their first values.
        self.pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.pending_steps = _EMPTY_STEPS  # sorted distinct steps held by any series
        self.released_through: int | None = None  # every step <= this went to the detector
        self.last_seen: dict[str, int] = {}  # per series, the greatest step accepted
        # Recently released steps (sorted) tell a resent point (idempotent) from a new
        # one that came too late; older than this bounded memory, a point at or below
        # the series' last step is taken as resent.
        self.released_recent = _EMPTY_STEPS
        self.released_floor = -1
        self.max_step = -1
        self.ended = False
        self.recent: deque[Event] = deque(maxlen=config.recent_events)
        # The run's newest events, for its timeline (bounded: memory per run must not
        # grow with its length); none without ``timeline``, when a store keeps them.
        self.events: deque[Event] = deque(maxlen=config.max_timeline_events if timeline else 0)
        self.changes = 0  # bumped by every new point: a checkpoint is due when it moved
        self.saved_changes = 0
        # The batches ingested since the last commit, for the checkpoint log; None
        # when something else changed the run (a full checkpoint is then due).
        self.unlogged: list[dict[str, tuple[np.ndarray, np.ndarray]]] | None = None
        self.logged_points = 0  # points in the stored checkpoint's log
        self.defunct = False  # dropped after a failed store write: callers must re-fetch
        self.status = self._make_status()

    @property
    def through_step(self) -> int:
        return -1 if self.released_through is None else self.released_through

    def checkpoint(self) -> bytes:
        """Everything needed to go on detecting this run elsewhere (pickled).

        Not in it: the timeline's event list, which the store keeps in step with
        the checkpoint, and the engine settings, which are the restoring engine's.
        """
        state = {
            "version": CHECKPOINT_VERSION,
            "run_id": self.run_id,
            "labels": self.labels,
            "detector": self.detector.state(),
            "pending": self.pending,
            "pending_steps": self.pending_steps,
            "released_through": self.released_through,
            "last_seen": self.last_seen,
            "released_recent": self.released_recent,
            "released_floor": self.released_floor,
            "max_step": self.max_step,
            "ended": self.ended,
            "recent": list(self.recent),
            "changes": self.changes,
        }
        # Not compressed: zlib took 1.8 ms for 300 kB (8 series), 15x the pickling,
        # and the checkpoint log makes full writes rare.
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, blob: bytes, config: EngineConfig) -> _Run:
        """The run a :meth:`checkpoint` was taken of. Its timeline is the store's, so
        it keeps none in memory.

        The blob comes from the store, which is trusted like the detector's own
        memory: unpickling runs code, so only phasewatch may write the store.
        """
        try:
            if blob[:1] != _PICKLE_START:  # zlib-compressed, as written before 0.x
                blob = zlib.decompress(blob)
            state = pickle.loads(blob)
        except (zlib.error, pickle.UnpicklingError, EOFError) as error:
            raise FailedPrecondition(f"unreadable checkpoint: {error}") from None
        version = state.get("version") if isinstance(state, dict) else None
        if version == 1:
            state = _checkpoint_v1_to_v2(state)
        elif version != CHECKPOINT_VERSION:
            raise FailedPrecondition(
                f"checkpoint version {version!r}, this phasewatch reads {CHECKPOINT_VERSION}"
            )
        run = cls(state["run_id"], state["labels"], config, timeline=False)
        run.detector = RunDetector.from_state(state["detector"], config.detector, keep_events=0)
        run.pending = state["pending"]
        run.pending_steps = state["pending_steps"]
        run.released_through = state["released_through"]
        run.last_seen = state["last_seen"]
        run.released_recent = state["released_recent"]
        run.released_floor = state["released_floor"]
        run.max_step = state["max_step"]
        run.ended = state["ended"]
        run.recent.extend(state["recent"])
        run.changes = run.saved_changes = state["changes"]
        run.unlogged = []  # the stored checkpoint is this state
        run.status = run._make_status()
        return run

    def replay(self, log: Sequence[bytes]) -> None:
        """Ingest the batches of a checkpoint's log again, as they were first ingested.

        Detection is deterministic, so this rebuilds the state the log's last write
        covered; the events it finds again are already in the stored timeline (a
        restored run keeps none in memory). O(points in the log), which
        ``checkpoint_log_points`` bounds.
        """
        self.unlogged = None
        points = 0
        for entry in log:
            try:
                batches = pickle.loads(entry)
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
                raise FailedPrecondition(f"unreadable checkpoint log entry: {error}") from None
            for columns in batches:
                self.ingest(columns)
                points += sum(len(steps) for steps, _ in columns.values())
        self.unlogged = []
        self.logged_points = points
        self.saved_changes = self.changes
        self.status = self._make_status()

    def declare(self, spec: SeriesSpec) -> None:
        if spec.name not in self.detector.specs:
            if len(self.detector.specs) >= self.config.max_series_per_run:
                raise ResourceExhausted(
                    f"run {self.run_id!r} already has {self.config.max_series_per_run} series"
                )
            self.detector.add_series(spec)

    def ingest(self, columns: Columns) -> tuple[int, dict[str, int], list[Event]]:
        """Hold a batch's points, then release all but ``reorder_window`` held steps.

        Per series, in numpy: negative steps are rejected; a point at or below
        ``through_step`` is a resent one (accepted, ignored) when the series had
        already been sent that step or later and the step was released (or is
        older than the released-steps memory), else rejected as out of order; the
        rest are held, a step already held for the series keeping its first
        value. O(points log points) per batch, plus the release.
        """
        batch = {
            name: (np.asarray(steps, dtype=np.int64).reshape(-1),
                   np.asarray(values, dtype=np.float64).reshape(-1))
            for name, (steps, values) in columns.items()
        }
        unlogged, self.unlogged = self.unlogged, None  # if this raises half-way: a full one
        result = self._ingest(batch)
        if unlogged is not None:
            unlogged.append(batch)
            self.unlogged = unlogged
        return result

    def _ingest(
        self, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ) -> tuple[int, dict[str, int], list[Event]]:
        accepted = 0
        rejected: dict[str, int] = {}
        through = self.released_through
        held: list[np.ndarray] = []
        for name, (steps, values) in columns.items():
            if name not in self.detector.specs:
                self.declare(infer_spec(name))
            last = self.last_seen.get(name, -1)
            if len(steps) == 0:
                self.last_seen[name] = last
                continue
            negative = int(np.count_nonzero(steps < 0))
            if negative:
                rejected["negative_step"] = rejected.get("negative_step", 0) + negative
            hold = steps >= 0 if through is None else steps > through
            if through is not None:
                late = (steps >= 0) & ~hold
                if late.any():
                    # "step <= last" with last as it stood at that point of the batch:
                    # the series' last step, raised by the held points before it.
                    running = np.maximum.accumulate(np.where(hold, steps, -1))
                    last_before = np.maximum(last, np.r_[-1, running[:-1]])
                    late_steps = steps[late]
                    known = late_steps < self.released_floor
                    if len(self.released_recent):
                        at = np.searchsorted(self.released_recent, late_steps)
                        at = np.minimum(at, len(self.released_recent) - 1)
                        known |= self.released_recent[at] == late_steps
                    resent = int(np.count_nonzero(known & (late_steps <= last_before[late])))
                    accepted += resent
                    if len(late_steps) > resent:
                        rejected["out_of_order"] = (
                            rejected.get("out_of_order", 0) + len(late_steps) - resent
                        )
            if not hold.all():
                steps, values = steps[hold], values[hold]
            if len(steps) == 0:
                self.last_seen[name] = last
                continue
            accepted += len(steps)
            top = int(steps.max())
            self.last_seen[name] = max(last, top)
            self.max_step = max(self.max_step, top)
            # Distinct steps, first value of each (np.unique's index is the first occurrence).
            if len(steps) > 1 and not (steps[1:] > steps[:-1]).all():
                steps, first = np.unique(steps, return_index=True)
                values = values[first]
            old = self.pending.get(name)
            if old is not None:
                new = ~_isin_sorted(steps, old[0])
                if not new.all():
                    steps, values = steps[new], values[new]
                if len(steps):
                    merged = np.concatenate((old[0], steps))
                    order = np.argsort(merged, kind="stable")
                    steps, values = merged[order], np.concatenate((old[1], values))[order]
                else:
                    steps, values = old
            if len(steps) != (0 if old is None else len(old[0])):
                self.changes += len(steps) - (0 if old is None else len(old[0]))
                self.pending[name] = (steps, values)
                held.append(steps)
        if held:
            self.pending_steps = np.unique(np.concatenate([self.pending_steps, *held]))
        events = self._release(len(self.pending_steps) - self.config.reorder_window)
        return accepted, rejected, events

    def flush(self) -> list[Event]:
        if len(self.pending_steps):
            self.unlogged = None  # not a batch: the log cannot replay it
        return self._release(len(self.pending_steps))

    def _release(self, count: int) -> list[Event]:
        """Give the ``count`` oldest held steps to the detector, as one block."""
        if count <= 0:
            return []
        lines = self.pending_steps[:count]
        self.pending_steps = self.pending_steps[count:]
        cut = int(lines[-1])
        block: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (steps, values) in list(self.pending.items()):
            k = int(np.searchsorted(steps, cut, side="right"))
            if k == 0:
                continue
            block[name] = (steps[:k], values[:k])
            if k == len(steps):
                del self.pending[name]
            else:
                self.pending[name] = (steps[k:], values[k:])
        events = self.detector.update_many(block, lines)
        memory = np.concatenate((self.released_recent, lines))
        if len(memory) > _RELEASED_MEMORY:
            self.released_floor = int(memory[len(memory) - _RELEASED_MEMORY - 1]) + 1
            memory = memory[len(memory) - _RELEASED_MEMORY :].copy()
        self.released_recent = memory
        self.released_through = cut
        self.changes += 1
        self.recent.extend(events)
        self.events.extend(events)
        self.status = self._make_status()
        return events

    def _make_status(self) -> RunStatus:
        phase, since, confidence = self.detector.current_phase()
        return RunStatus(
            run_id=self.run_id,
            labels=dict(self.labels),
            phase=phase,
            since_step=since,
            confidence=confidence,
            last_step=self.max_step,
            ended=self.ended,
            recent_events=tuple(self.recent),
            updated_at=time.time(),
            series=_headline_series(self.detector),
        )


class Engine:
    """Routes batches to runs and answers queries.

    >>> engine = Engine()
    >>> _ = engine.start_run("demo", labels={"team": "a"})
    >>> result = engine.ingest("demo", {"train_loss": ([0, 10, 20], [2.0, 1.5, 1.2])})
    >>> result.accepted, result.rejected
    (3, 0)
    >>> engine.status("demo").last_step
    20
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        store: Store | None = None,
        *,
        replica: str | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.store = store
        # Named in "run X is owned by replica Y" answers; serve() sets host:port.
        self.replica = replica or f"{socket.gethostname()} (pid {os.getpid()})"
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        # One run's detection at a time (taken under a run lock, never the other
        # way round). Detection holds the interpreter lock anyway, but numpy lets
        # it go around many small calls: with several threads detecting at once,
        # each of those became a handoff between them, and 8 concurrent runs
        # cost 2.5x the CPU per point of one (measured in process, 512-point batches).
        self._detecting = threading.Lock()
        self._events_by_kind: dict[str, int] = {}
        self._ingested = 0
        self._rejected: dict[str, int] = {}
        self._detection_seconds = 0.0
        self._detection_batches = 0
        self._detection_counts = [0] * (len(DETECTION_BUCKETS) + 1)
        rate = self.config.max_points_per_second
        self._rate = None if rate is None else RunRateLimiter(rate, self.config.points_burst)

    # --- writes -------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        labels: Mapping[str, str] | None = None,
        series: Iterable[SeriesSpec] = (),
        resume: bool = False,
        restart: bool = False,
    ) -> RunStatus:
        """Declare a run (idempotent); a declared series keeps its first spec.

        ``restart``: when the run's stored checkpoint is damaged (which is
        otherwise FailedPrecondition), replace it by a fresh run that keeps the
        stored labels, last step and timeline (see ``_restarted``).
        """
        _check("run id", run_id)
        _check_labels(labels or {})
        specs = list(series)
        for spec in specs:
            _check("series name", spec.name)
        restarted = False
        if restart and run_id not in self._runs:
            try:
                self._restore(run_id)  # only to learn whether it is readable
            except FailedPrecondition as error:
                log.warning("run %r restarted from its stored timeline: %s", run_id, error)
                fresh = self._restarted(run_id)
                with self._lock:
                    restarted = self._runs.setdefault(run_id, fresh) is fresh
        run = self._acquire(run_id, labels=labels or {})
        try:
            if labels:
                if len(run.labels.keys() | labels.keys()) > MAX_LABELS:
                    raise InvalidArgument(
                        f"run {run_id!r} would have more than {MAX_LABELS} labels"
                    )
                run.labels.update(labels)
            for spec in specs:
                run.declare(spec)
            run.ended = False
            run.changes += 1  # labels, series, ended: the next commit checkpoints them
            run.unlogged = None  # not a batch: the log cannot replay it
            run.status = run._make_status()
            status = run.status
            if self.store is not None:
                # Under the run lock, so that it cannot overwrite a later commit's status.
                self.store.upsert_run(replace(status, recent_events=()))
                if restarted:
                    self._commit(run, (), None)  # the damaged checkpoint goes now
        finally:
            run.lock.release()
        return status

    def ingest(
        self, run_id: str, columns: Columns, *, stopping: Callable[[], bool] | None = None
    ) -> IngestResult:
        """Add points to a run (declaring it on first use) and return new events.

        A batch larger than ``block_points`` is detected block by block (split
        by step, see ``_blocks``), letting other runs' detection in between.
        When ``stopping()`` (default: that of ``stop_between_blocks``) turns
        true between blocks, what was detected is
        checkpointed and :class:`~detector.errors.Unavailable` is raised: the
        client resends the batch, whose points already in count as resent.
        """
        _check("run id", run_id)
        for name, (steps, values) in columns.items():
            _check("series name", name)
            if len(steps) != len(values):
                raise InvalidArgument(
                    f"series {name!r} has {len(steps)} steps but {len(values)} values"
                )
            _check_steps(name, steps)
        if self._rate is not None:  # RateLimited before anything of the batch goes in
            self._rate.take(run_id, sum(len(steps) for steps, _ in columns.values()))
        if run_id not in self._runs:
            self.start_run(run_id)  # declares it, or restores it from its checkpoint
        run = self._acquire(run_id, labels={})
        started = time.perf_counter()
        blocks = _blocks(columns, self.config.block_points)
        stopping = stopping or _STOPPING.get()
        done = 0
        try:
            new_series = [n for n in columns if n not in run.detector.specs]
            if len(run.detector.specs) + len(new_series) > self.config.max_series_per_run:
                raise ResourceExhausted(
                    f"run {run_id!r} would have more than "
                    f"{self.config.max_series_per_run} series"
                )
            accepted, events = 0, []
            rejected: dict[str, int] = {}
            for block in blocks:
                if done and stopping is not None and stopping():
                    break
                with self._detecting:
                    block_accepted, block_rejected, block_events = run.ingest(block)
                done += 1
                accepted += block_accepted
                for reason, count in block_rejected.items():
                    rejected[reason] = rejected.get(reason, 0) + count
                events += block_events
            through = run.through_step
            segments = run.detector.segments() if events else None
            elapsed = time.perf_counter() - started
            self._commit(run, events, segments)  # before through_step goes out
        finally:
            run.lock.release()
        self._record(accepted, rejected, events, elapsed)
        if done < len(blocks):
            raise Unavailable(
                f"run {run_id!r}: stopped after {done} of {len(blocks)} blocks of the batch "
                f"(the detector is stopping or the call was cancelled); points through step "
                f"{through} are in, resend the batch"
            )
        return IngestResult(
            accepted=accepted,
            rejected=sum(rejected.values()),
            through_step=through,
            events=tuple(events),
            rejected_by_reason=rejected,
        )

    def end_run(self, run_id: str, final_step: int | None = None) -> list[Event]:
        """Flush the reorder buffer and mark the run ended; returns the last events."""
        if final_step is not None and final_step > MAX_STEP:
            raise InvalidArgument(f"final step {final_step} is beyond the largest step, {MAX_STEP}")
        run = self._acquire(run_id)
        started = time.perf_counter()
        try:
            with self._detecting:
                events = run.flush()
                # A second end must not localise again.
                finished = [] if run.ended else run.detector.finish()
            run.recent.extend(finished)
            run.events.extend(finished)
            events += finished
            run.ended = True
            run.changes += 1
            run.unlogged = None  # the end and its finish() are not batches
            run.status = run._make_status()
            self._commit(run, events, run.detector.segments())
        finally:
            run.lock.release()
        self._record(0, {}, events, time.perf_counter() - started)
        return events

    def flush(self, run_id: str) -> list[Event]:
        """Release every held point of a run without ending it."""
        run = self._acquire(run_id)
        try:
            with self._detecting:
                events = run.flush()
            self._commit(run, events, run.detector.segments())
        finally:
            run.lock.release()
        self._record(0, {}, events, 0.0)
        return events

    def checkpoint_all(self) -> int:
        """Write the checkpoint of every in-memory run not yet saved as it is (shutdown).

        Every ingest already checkpoints what it changed; this catches the rest
        (labels and series declared by a ``start_run`` with no points since).
        Runs another replica took over are skipped with a warning. Returns how
        many checkpoints were written.
        """
        if self.store is None:
            return 0
        written = 0
        for run in list(self._runs.values()):
            with run.lock:
                if run.defunct or self._runs.get(run.run_id) is not run:
                    continue
                if run.changes == run.saved_changes:
                    continue
                try:
                    self._commit(run, (), None)
                except PhasewatchError as error:
                    log.warning("run %r not checkpointed at shutdown: %s", run.run_id, error)
                    continue
                written += 1
        return written

    def claim(self, run_id: str) -> RunClaim:
        """Hold ``run_id`` for writing until ``release()`` (a stream's lifetime).

        Raises :class:`~detector.errors.Aborted`, naming the owner, when another
        replica of a shared store holds it. Without a store, or on a store only
        this process writes, claims always succeed. On a shared store the run is
        forgotten from memory when its last claim is released: another replica
        may write it next, and this one restores it from the store when needed.
        """
        _check("run id", run_id)
        if self.store is None:
            return _NoClaim()
        return _EngineClaim(self, run_id, self.store.claim_run(run_id, self.replica))

    # --- queries ------------------------------------------------------------

    def status(self, run_id: str) -> RunStatus:
        run = self._runs.get(run_id)
        if run is not None:
            return run.status
        if self.store is not None:
            stored = self.store.get_run(run_id)
            if stored is not None:
                return stored
        raise NotFound(f"unknown run {run_id!r}")

    def timeline(
        self, run_id: str, offset: int = 0, limit: int | None = None
    ) -> tuple[list[Segment], list[Event]]:
        """A run's segments and its events, ``limit`` of them from ``offset`` (None: all).

        A page costs O(offset + limit) store reads, not O(all events)."""
        run = self._runs.get(run_id)
        end = None if limit is None else offset + limit
        if run is not None:
            with run.lock:
                segments = run.detector.segments()
                if self.store is None:
                    return segments, list(itertools.islice(run.events, offset, end))
                # Under the run lock: the store holds exactly this state's events.
                return segments, self.store.get_events(run_id, offset, limit)
        if self.store is not None and self.store.get_run(run_id) is not None:
            return self.store.get_segments(run_id), self.store.get_events(run_id, offset, limit)
        raise NotFound(f"unknown run {run_id!r}")

    def list_runs(
        self, label_selector: Mapping[str, str] | None = None, phase: Phase | None = None
    ) -> list[RunStatus]:
        found: dict[str, RunStatus] = {}
        if self.store is not None:
            found.update((r.run_id, r) for r in self.store.list_runs())
        found.update((run_id, run.status) for run_id, run in list(self._runs.items()))
        selector = label_selector or {}
        return [
            r
            for _, r in sorted(found.items())
            if all(r.labels.get(k) == v for k, v in selector.items())
            and (phase is None or r.phase == phase)
        ]

    def snapshot(self) -> EngineSnapshot:
        runs = tuple(run.status for run in list(self._runs.values()))
        with self._lock:
            return EngineSnapshot(
                runs=runs,
                events_by_kind=dict(self._events_by_kind),
                ingested_points=self._ingested,
                rejected_by_reason=dict(self._rejected),
                detection_seconds=self._detection_seconds,
                detection_batches=self._detection_batches,
                detection_buckets=tuple(self._detection_counts),
            )

    def forget(self, run_id: str) -> None:
        """Drop a run's in-memory state (it stays in the store)."""
        with self._lock:
            self._runs.pop(run_id, None)

    # --- internals ----------------------------------------------------------

    def _acquire(self, run_id: str, labels: Mapping[str, str] | None = None) -> _Run:
        """The run with its lock held, restored from the store if not in memory.

        ``labels`` is None: an unknown run is NotFound; else it is created with them.
        """
        while True:
            run = self._runs.get(run_id)
            if run is None:
                restored = self._restore(run_id)  # store I/O outside the table lock
                with self._lock:
                    run = self._runs.get(run_id)
                    if run is None:
                        if restored is None and labels is None:
                            raise NotFound(f"unknown run {run_id!r}")
                        if len(self._runs) >= self.config.max_runs:
                            raise ResourceExhausted(
                                f"the detector already has {self.config.max_runs} runs"
                            )
                        # With a store, timelines are read from it.
                        run = restored or _Run(run_id, labels or {}, self.config,
                                               timeline=self.store is None)
                        self._runs[run_id] = run
            run.lock.acquire()
            if not run.defunct:
                return run
            run.lock.release()  # dropped while we waited: take the restored one

    def _restore(self, run_id: str) -> _Run | None:
        if self.store is None:
            return None
        saved = self.store.load_checkpoint(run_id)
        if saved is None:
            return None
        try:
            run = _Run.restore(saved.state, self.config)
            run.replay(saved.log)
        except PhasewatchError as error:
            raise FailedPrecondition(self._damaged(run_id, str(error))) from None
        except Exception as error:  # a checkpoint that unpickles to something else
            raise FailedPrecondition(
                self._damaged(run_id, f"{type(error).__name__}: {error}")
            ) from None
        if run.run_id != run_id:
            raise FailedPrecondition(self._damaged(run_id, f"it is run {run.run_id!r}'s"))
        return run

    @staticmethod
    def _damaged(run_id: str, problem: str) -> str:
        return (
            f"run {run_id!r}: its stored checkpoint is damaged ({problem}); restart it "
            "from its stored timeline with RunStart.restart (`phasewatch restart "
            f"{run_id}`): detection starts afresh after its last stored step"
        )

    def _restarted(self, run_id: str) -> _Run:
        """A fresh run in place of one whose checkpoint is damaged.

        Labels, last step and timeline (events, segments) are the store's; the
        detectors start empty, and points at or below the last stored step are
        rejected as out of order. O(1) store reads.
        """
        stored = self.store.get_run(run_id) if self.store is not None else None
        run = _Run(run_id, stored.labels if stored else {}, self.config,
                   timeline=self.store is None)
        if stored is not None and stored.last_step >= 0:
            run.released_through = run.max_step = stored.last_step
            run.released_floor = stored.last_step + 1
        run.changes += 1
        run.unlogged = None  # the next commit writes a whole checkpoint over the damaged one
        run.status = run._make_status()
        return run

    def _commit(
        self, run: _Run, events: Sequence[Event], segments: Sequence[Segment] | None
    ) -> None:
        """Checkpoint a changed run with what the change produced (run lock held).

        When only batches changed it since the last commit and the log has room,
        they are appended to the stored checkpoint's log (a few kB) instead of
        writing the whole state (~40 kB a series).
        """
        batches = run.unlogged
        if self.store is None or (not events and run.changes == run.saved_changes):
            if batches:
                batches.clear()  # they changed nothing: replaying them would not either
            return
        points = sum(len(s) for b in batches or () for s, _ in b.values())
        append = bool(batches) and run.logged_points + points <= self.config.checkpoint_log_points
        try:
            self.store.save_checkpoint(
                run.run_id,
                pickle.dumps(batches, protocol=pickle.HIGHEST_PROTOCOL) if append
                else run.checkpoint(),
                run.through_step,
                status=replace(run.status, recent_events=()),
                events=events,
                segments=segments,
                append=append,
            )
        except BaseException:
            # Memory is now ahead of the checkpoint, and these events are stored
            # nowhere: drop the run, so that the next call restores the checkpoint
            # and the client's replay redoes the rest.
            run.defunct = True
            with self._lock:
                if self._runs.get(run.run_id) is run:
                    del self._runs[run.run_id]
            raise
        run.saved_changes = run.changes
        run.logged_points = run.logged_points + points if append else 0
        run.unlogged = []

    def _record(
        self, accepted: int, rejected: Mapping[str, int], events: Sequence[Event], seconds: float
    ) -> None:
        with self._lock:
            self._ingested += accepted
            for reason, count in rejected.items():
                self._rejected[reason] = self._rejected.get(reason, 0) + count
            for event in events:
                key = event.kind.value
                self._events_by_kind[key] = self._events_by_kind.get(key, 0) + 1
            self._detection_seconds += seconds
            self._detection_batches += 1
            self._detection_counts[bisect.bisect_left(DETECTION_BUCKETS, seconds)] += 1


class _NoClaim:
    """The claim of an engine without a store: nothing to hold."""

    def release(self) -> bool:
        return True


class _EngineClaim:
    """A store claim that also forgets the run when a shared store's last claim goes."""

    def __init__(self, engine: Engine, run_id: str, claim: RunClaim) -> None:
        self._engine = engine
        self._run_id = run_id
        self._claim: RunClaim | None = claim

    def release(self) -> bool:
        claim, self._claim = self._claim, None
        if claim is None:  # idempotent
            return True
        last = claim.release()
        store = self._engine.store
        if last and store is not None and store.shared:
            self._engine.forget(self._run_id)
        return last


_EMPTY_STEPS = np.zeros(0, dtype=np.int64)
_PICKLE_START = b"\x80"  # the PROTO opcode every pickle of protocol >= 2 starts with


def _isin_sorted(needles: np.ndarray, haystack: np.ndarray) -> np.ndarray:
    """``np.isin`` for a sorted ``haystack``: O(n log m) by binary search."""
    if len(haystack) == 0:
        return np.zeros(len(needles), dtype=bool)
    at = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return haystack[at] == needles


def _checkpoint_v1_to_v2(state: dict) -> dict:
    """A version-1 checkpoint (reorder buffer as {step: {series: value}}) as version 2."""
    per_series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(state["pending"]):
        for name, value in state["pending"][step].items():
            steps, values = per_series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    pending = {
        name: (np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))
        for name, (steps, values) in per_series.items()
    }
    return {
        **state,
        "version": 2,
        "pending": pending,
        "pending_steps": np.asarray(sorted(state["pending"]), dtype=np.int64),
        "released_recent": np.asarray(state["released_recent"], dtype=np.int64),
    }


def _headline_series(detector: RunDetector) -> tuple[SeriesStatus, ...]:
    """The labeller's headline series: what per-series gauges are kept for (bounded)."""
    roles = detector.labeller.roles
    names = dict.fromkeys(n for n in (roles.train_loss, roles.val_loss, roles.train_acc, roles.val_acc) if n)
    out = []
    for name in names:
        series = detector.detectors.get(name)
        if series is None:
            continue
        trend = series.trend
        out.append(SeriesStatus(
            name=name,
            role=series.spec.role,
            split=series.spec.split,
            in_plateau=series.in_plateau,
            trend_tau=None if trend is None else trend.statistic,
            trend_p_value=None if trend is None else trend.p_value,
            last_value=series.last_value,
        ))
    return tuple(out)


_STOPPING: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "phasewatch_stopping", default=None
)


@contextlib.contextmanager
def stop_between_blocks(stopping: Callable[[], bool]) -> Iterator[None]:
    """``Engine.ingest`` calls made inside stop between blocks once ``stopping()``.

    The server's way to pass a call's cancellation to the engine, also through
    engines that override ``ingest`` with the plain signature.
    """
    token = _STOPPING.set(stopping)
    try:
        yield
    finally:
        _STOPPING.reset(token)


def _blocks(columns: Columns, size: int) -> list[Columns]:
    """``columns`` cut by step into blocks of about ``size`` points, in step order.

    Block ``i`` holds every point whose step is in (cut[i-1], cut[i]], in its
    batch order, so the blocks ingested in turn amount to the batch (an
    ordered log gives the same events however it is cut). A series with no
    points goes in the first block (it declares the series). O(points log points).
    """
    arrays = {
        name: (np.asarray(steps, dtype=np.int64).reshape(-1),
               np.asarray(values, dtype=np.float64).reshape(-1))
        for name, (steps, values) in columns.items()
    }
    total = sum(len(steps) for steps, _ in arrays.values())
    if total <= size:
        return [arrays]
    ordered = np.sort(np.concatenate([steps for steps, _ in arrays.values()]))
    cuts = np.unique(ordered[size - 1 :: size])
    blocks: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(len(cuts) + 1)]
    for name, (steps, values) in arrays.items():
        if len(steps) == 0:
            blocks[0][name] = (steps, values)
            continue
        where = np.searchsorted(cuts, steps, side="left")
        order = np.argsort(where, kind="stable")
        bounds = np.searchsorted(where[order], np.arange(len(cuts) + 2))
        for i in range(len(cuts) + 1):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                part = order[lo:hi]
                blocks[i][name] = (steps[part], values[part])
    return [block for block in blocks if block]


def _check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels; a run may have at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key.encode()) > MAX_LABEL_KEY_BYTES:
            raise InvalidArgument(
                f"label key {key[:40]!r} must be 1 to {MAX_LABEL_KEY_BYTES} bytes"
            )
        if len(value.encode()) > MAX_LABEL_VALUE_BYTES:
            raise InvalidArgument(
                f"label {key!r}: value of {len(value.encode())} bytes; at most "
                f"{MAX_LABEL_VALUE_BYTES}"
            )


def _check_steps(name: str, steps: Sequence[int] | np.ndarray) -> None:
    """InvalidArgument when a step is above MAX_STEP (negative ones are rejected per point)."""
    if len(steps) == 0:
        return
    try:
        top = int(np.max(np.asarray(steps, dtype=np.int64)))
    except OverflowError:  # a Python int beyond int64
        top = MAX_STEP + 1
    if top > MAX_STEP:
        raise InvalidArgument(
            f"series {name!r}: step {top} is beyond the largest step, {MAX_STEP} (2^53 - 1); "
            "nothing of this batch was taken"
        )


def _check(kind: str, name: str) -> None:
    problem = check_name(kind, name)
    if problem is not None:
        raise InvalidArgument(problem)
