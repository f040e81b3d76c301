"""The engine: routes batches to runs, owns per-run state, emits events.

Its output depends only on the sequence of points, never on how they were
batched or where they came from: the gRPC server and ``phasewatch analyze``
both feed ``Engine.ingest``. Points are held in a small per-run reorder buffer
(``reorder_window`` distinct steps) and released to the run's
:class:`~detector.core.RunDetector` in step order, so any split of an ordered
log into batches gives the same events.

Thread-safety: one lock per run plus one for the run table; queries read
immutable snapshots and never wait on detection.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from detector.core import Event, Phase, RunDetector, RunDetectorConfig, Segment, SeriesSpec
from detector.core.types import check_name, infer_spec
from detector.errors import InvalidArgument, NotFound, ResourceExhausted


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

    def __post_init__(self) -> None:
        for name in ("max_series_per_run", "max_runs", "reorder_window", "recent_events"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")


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


class Store(Protocol):
    """Where runs, events and segments survive restarts (SQLite or PostgreSQL)."""

    def upsert_run(self, status: RunStatus) -> None: ...
    def add_events(self, run_id: str, events: Sequence[Event]) -> None: ...
    def replace_segments(self, run_id: str, segments: Sequence[Segment]) -> None: ...
    def get_run(self, run_id: str) -> RunStatus | None: ...
    def list_runs(self) -> list[RunStatus]: ...
    def get_events(self, run_id: str) -> list[Event]: ...
    def get_segments(self, run_id: str) -> list[Segment]: ...
    def close(self) -> None: ...


_RELEASED_MEMORY = 4096

Columns = Mapping[str, tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray]]


class _Run:
    """Per-run state: the reorder buffer and the run detector."""

    def __init__(self, run_id: str, labels: Mapping[str, str], config: EngineConfig) -> None:
        self.run_id = run_id
        self.labels = dict(labels)
        self.config = config
        self.detector = RunDetector(config=config.detector)
        self.lock = threading.Lock()
        self.pending: dict[int, dict[str, float]] = {}
        self.released_through: int | None = None  # every step <= this went to the detector
        self.last_seen: dict[str, int] = {}  # per series, the greatest step accepted
        # Recently released steps tell a resent point (idempotent) from a new one that
        # came too late; older than this bounded memory, a point at or below the
        # series' last step is taken as resent.
        self.released_recent: deque[int] = deque()
        self.released_set: set[int] = set()
        self.released_floor = -1
        self.max_step = -1
        self.ended = False
        self.recent: deque[Event] = deque(maxlen=config.recent_events)
        self.events: list[Event] = []  # this process's events, for the timeline
        self.status = self._make_status()

    def declare(self, spec: SeriesSpec) -> None:
        if spec.name not in self.detector.specs:
            if len(self.detector.specs) >= self.config.max_series_per_run:
                raise ResourceExhausted(
                    f"run {self.run_id!r} already has {self.config.max_series_per_run} series"
                )
            self.detector.add_series(spec)

    def ingest(self, columns: Columns) -> tuple[int, dict[str, int], list[Event]]:
        accepted = 0
        rejected: dict[str, int] = {}
        for name, (steps, values) in columns.items():
            if name not in self.detector.specs:
                self.declare(infer_spec(name))
            last = self.last_seen.get(name, -1)
            for step, value in zip(steps, values, strict=True):
                step = int(step)
                if step < 0:
                    rejected["negative_step"] = rejected.get("negative_step", 0) + 1
                    continue
                if self.released_through is not None and step <= self.released_through:
                    if step <= last and (step in self.released_set or step < self.released_floor):
                        accepted += 1  # a resent point: idempotent
                    else:
                        rejected["out_of_order"] = rejected.get("out_of_order", 0) + 1
                    continue
                row = self.pending.setdefault(step, {})
                row.setdefault(name, float(value))  # duplicates keep the first value
                accepted += 1
                if step > last:
                    last = step
                if step > self.max_step:
                    self.max_step = step
            self.last_seen[name] = last
        events = self._release(len(self.pending) - self.config.reorder_window)
        return accepted, rejected, events

    def flush(self) -> list[Event]:
        return self._release(len(self.pending))

    def _release(self, count: int) -> list[Event]:
        if count <= 0:
            return []
        steps = sorted(self.pending)[:count]
        events: list[Event] = []
        for step in steps:
            events.extend(self.detector.update(step, self.pending.pop(step)))
            self.released_recent.append(step)
            self.released_set.add(step)
            if len(self.released_recent) > _RELEASED_MEMORY:
                oldest = self.released_recent.popleft()
                self.released_set.discard(oldest)
                self.released_floor = oldest + 1
        self.released_through = steps[-1]
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

    def __init__(self, config: EngineConfig | None = None, store: Store | None = None) -> None:
        self.config = config or EngineConfig()
        self.store = store
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._events_by_kind: dict[str, int] = {}
        self._ingested = 0
        self._rejected: dict[str, int] = {}
        self._detection_seconds = 0.0
        self._detection_batches = 0

    # --- writes -------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        labels: Mapping[str, str] | None = None,
        series: Iterable[SeriesSpec] = (),
        resume: bool = False,
    ) -> RunStatus:
        """Declare a run (idempotent); a declared series keeps its first spec."""
        _check("run id", run_id)
        specs = list(series)
        for spec in specs:
            _check("series name", spec.name)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                if len(self._runs) >= self.config.max_runs:
                    raise ResourceExhausted(f"the detector already has {self.config.max_runs} runs")
                run = _Run(run_id, labels or {}, self.config)
                self._runs[run_id] = run
        with run.lock:
            if labels:
                run.labels.update(labels)
            for spec in specs:
                run.declare(spec)
            run.ended = False
            run.status = run._make_status()
            status = run.status
        if self.store is not None:
            self.store.upsert_run(status)
        return status

    def ingest(self, run_id: str, columns: Columns) -> IngestResult:
        """Add points to a run (declaring it on first use) and return new events."""
        _check("run id", run_id)
        for name, (steps, values) in columns.items():
            _check("series name", name)
            if len(steps) != len(values):
                raise InvalidArgument(
                    f"series {name!r} has {len(steps)} steps but {len(values)} values"
                )
        run = self._runs.get(run_id)
        if run is None:
            self.start_run(run_id)
            run = self._runs[run_id]
        started = time.perf_counter()
        with run.lock:
            new_series = [n for n in columns if n not in run.detector.specs]
            if len(run.detector.specs) + len(new_series) > self.config.max_series_per_run:
                raise ResourceExhausted(
                    f"run {run_id!r} would have more than "
                    f"{self.config.max_series_per_run} series"
                )
            accepted, rejected, events = run.ingest(columns)
            status = run.status
            through = -1 if run.released_through is None else run.released_through
            segments = run.detector.segments() if events else None
        elapsed = time.perf_counter() - started
        self._record(accepted, rejected, events, elapsed)
        self._persist(status, events, segments)
        return IngestResult(
            accepted=accepted,
            rejected=sum(rejected.values()),
            through_step=through,
            events=tuple(events),
            rejected_by_reason=rejected,
        )

    def end_run(self, run_id: str, final_step: int | None = None) -> list[Event]:
        """Flush the reorder buffer and mark the run ended; returns the last events."""
        run = self._get(run_id)
        started = time.perf_counter()
        with run.lock:
            events = run.flush()
            run.ended = True
            run.status = run._make_status()
            status = run.status
            segments = run.detector.segments()
        self._record(0, {}, events, time.perf_counter() - started)
        self._persist(status, events, segments)
        return events

    def flush(self, run_id: str) -> list[Event]:
        """Release every held point of a run without ending it."""
        run = self._get(run_id)
        with run.lock:
            events = run.flush()
            status = run.status
            segments = run.detector.segments()
        self._record(0, {}, events, 0.0)
        self._persist(status, events, segments)
        return events

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

    def timeline(self, run_id: str) -> tuple[list[Segment], list[Event]]:
        run = self._runs.get(run_id)
        if run is not None:
            with run.lock:
                return run.detector.segments(), list(run.events)
        if self.store is not None and self.store.get_run(run_id) is not None:
            return self.store.get_segments(run_id), self.store.get_events(run_id)
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
            )

    def forget(self, run_id: str) -> None:
        """Drop a run's in-memory state (it stays in the store)."""
        with self._lock:
            self._runs.pop(run_id, None)

    # --- internals ----------------------------------------------------------

    def _get(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFound(f"unknown run {run_id!r}")
        return run

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

    def _persist(
        self, status: RunStatus, events: Sequence[Event], segments: Sequence[Segment] | None
    ) -> None:
        if self.store is None:
            return
        self.store.upsert_run(replace(status, recent_events=()))
        if events:
            self.store.add_events(status.run_id, events)
        if segments is not None:
            self.store.replace_segments(status.run_id, segments)


def _check(kind: str, name: str) -> None:
    problem = check_name(kind, name)
    if problem is not None:
        raise InvalidArgument(problem)
