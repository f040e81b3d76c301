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
the checkpointed state. A checkpoint is a base plus a log of what was done to
the run since: a commit appends what changed the run (batches at 16 bytes a
point, starts with their labels and series, flushes, ends) to the log, and
the whole state (detector, reorder buffer, dedup memory; ~40 kB a series) is
written as the new base, with an empty log, once the log would pass
``checkpoint_log_points`` points. A run's first base is the empty run (the
"replay form", :meth:`_Run.replay_checkpoint`), so a run shorter than that
never writes its state. A run that is not in memory is restored from its
checkpoint on its next ``start_run``/``ingest``: the base is loaded and the
log replayed, which detection's determinism makes exact, in O(points in the
log). When the store refuses a write, the
run's in-memory state (now ahead of its checkpoint) is dropped, so that the
next call restores the last checkpoint and the client replays the rest.

Layout: the shared types (statuses, results, the store interface) are in
:mod:`detector.ports`, one run's reorder buffer and checkpoint format in
:mod:`detector.engine.run`; this module is the engine around them (the run
table, locks, limits, durability, metrics). Over 400 lines because those
rules are one object's: every public method takes the same locks in the same
order and commits through one path.

Ownership (scale-out): a writer ``claim()``s a run for as long as its stream
is open. On a shared store (PostgreSQL) only one replica can hold a run; the
others get :class:`~detector.errors.Aborted` naming the owner, and a run is
forgotten from memory when its last claim is released, since another replica
may write it next.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from detector.core import Event, Phase, Segment, SeriesSpec
from detector.engine.blocks import _STOPPING, _blocks, stop_between_blocks
from detector.engine.claims import _EngineClaim, _NoClaim
from detector.engine.config import (
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    MAX_STEP,
    EngineConfig,
    _check,
    _check_all_steps,
    _check_labels,
)
from detector.engine.run import (  # noqa: F401 - CHECKPOINT_VERSION importable here
    CHECKPOINT_VERSION,
    Columns,
    _Run,
    encode_log_entry,
    op_points,
)
from detector.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PhasewatchError,
    ResourceExhausted,
    Unavailable,
)
from detector.events import DomainEvent, EventHub, EventsDetected, RunEnded, RunLeft, RunUpdated
from detector.limits import RunRateLimiter
from detector.ports import (  # noqa: F401 - the shared types, importable from here as before
    DETECTION_BUCKETS,
    Checkpoint,
    EngineSnapshot,
    IngestResult,
    RunClaim,
    RunStatus,
    SeriesStatus,
    Store,
)

log = logging.getLogger("phasewatch.engine")


@functools.cache
def _default_config() -> EngineConfig:
    """``EngineConfig()``, made once per process. O(1)."""
    return EngineConfig()


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
        events: EventHub | None = None,
    ) -> None:
        # The default settings are one shared instance: immutable all the way down (a
        # series detector clones the config's trigger), and ~45 us to build, per
        # engine of every `analyze`.
        self.config = config or _default_config()
        # What happened to runs, for subscribers (alerts, analyze's sinks): see
        # detector.events. Published after a run's lock is let go.
        self.events = events if events is not None else EventHub()
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
            if labels and len(run.labels.keys() | labels.keys()) > MAX_LABELS:
                raise InvalidArgument(f"run {run_id!r} would have more than {MAX_LABELS} labels")
            run.start(labels or {}, specs)  # the next commit checkpoints it
            status = run.status
            if self.store is not None:
                # Under the run lock, so that it cannot overwrite a later commit's status.
                self.store.upsert_run(_without_recent(status))
                if restarted:
                    self._commit(run, (), None)  # the damaged checkpoint goes now
        finally:
            run.lock.release()
        self._publish(RunUpdated(status, time.time()))
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
        _check_all_steps(columns)
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
            # The detection lock is let go between the blocks of a large batch (other runs
            # detect in between) and, see _commit_detected, held through the commit.
            self._detecting.acquire()
            try:
                for block in blocks:
                    if done and stopping is not None and stopping():
                        break
                    if done:
                        self._detecting.release()
                        self._detecting.acquire()
                    block_accepted, block_rejected, block_events = run.ingest(block)
                    done += 1
                    accepted += block_accepted
                    for reason, count in block_rejected.items():
                        rejected[reason] = rejected.get(reason, 0) + count
                    events += block_events
                through = run.through_step
                status = run.status
                segments = run.detector.segments() if events else None
                elapsed = time.perf_counter() - started
            except BaseException:
                self._detecting.release()
                raise
            self._commit_detected(run, events, segments)  # before through_step goes out
        finally:
            run.lock.release()
        self._record(accepted, rejected, events, elapsed)
        now = time.time()
        if events:
            self._publish(EventsDetected(run_id, tuple(events), now))
        if accepted:
            self._publish(RunUpdated(status, now))
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
            events, status = self._detect_and_commit(run, run.end)
        finally:
            run.lock.release()
        self._record(0, {}, events, time.perf_counter() - started)
        now = time.time()
        if events:
            self._publish(EventsDetected(run_id, tuple(events), now))
        self._publish(RunEnded(status, now))
        return events

    def flush(self, run_id: str) -> list[Event]:
        """Release every held point of a run without ending it."""
        run = self._acquire(run_id)
        try:
            events, _ = self._detect_and_commit(run, run.flush)
        finally:
            run.lock.release()
        self._record(0, {}, events, 0.0)
        if events:
            self._publish(EventsDetected(run_id, tuple(events), time.time()))
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
            forgotten = self._runs.pop(run_id, None)
        if forgotten is not None:
            self._publish(RunLeft(run_id, time.time()))

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
                        # With a store, timelines are read from it. Made empty: start_run's
                        # labels are the first thing its checkpoint log records.
                        run = restored or _Run(run_id, {}, self.config,
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
        run.from_empty = False
        run.status = run._make_status()
        return run

    def _detect_and_commit(
        self, run: _Run, detect: Callable[[], list[Event]]
    ) -> tuple[list[Event], RunStatus]:
        """``detect()`` (the run's end or flush) under the detection lock, then
        :meth:`_commit_detected` (run lock held): its events and the run's status."""
        self._detecting.acquire()
        try:
            events = detect()
            status = run.status
            segments = run.detector.segments()
        except BaseException:
            self._detecting.release()
            raise
        self._commit_detected(run, events, segments)
        return events, status

    def _commit_detected(
        self, run: _Run, events: Sequence[Event], segments: Sequence[Segment] | None
    ) -> None:
        """:meth:`_commit` right after detection, with the detection lock held; lets the
        lock go (whether the commit succeeds or raises).

        Where a commit is work in this process (``store.local_commits``: SQLite's WAL,
        no fsync, no round trip), it is made before the lock goes: a thread that let
        the lock go first handed it to another detecting thread, and then every SQLite
        and numpy call that lets the interpreter lock go became a handover between
        the two (a context switch each way, ~15 µs of CPU on a 2-core VM): in process,
        32 threads ingesting 32-line batches into SQLite took ~6 % more CPU a point
        (3.66 against 3.43 µs, benchmarks' min of five). A commit that
        waits on the network (PostgreSQL) lets the lock go first, so that other runs
        detect meanwhile.
        """
        if self.store is not None and not self.store.local_commits:
            self._detecting.release()
            self._commit(run, events, segments)
            return
        try:
            self._commit(run, events, segments)
        finally:
            self._detecting.release()

    def _commit(
        self, run: _Run, events: Sequence[Event], segments: Sequence[Segment] | None
    ) -> None:
        """Checkpoint a changed run with what the change produced (run lock held).

        When the log has room for what changed the run since the last commit
        (``unlogged``: batches, starts, flushes, ends), that is appended to the
        stored checkpoint's log (a few kB) instead of writing the whole state
        (~40 kB a series); a run's first checkpoint is then those changes alone
        (:meth:`_Run.replay_checkpoint`), so a short run never writes its state.
        """
        ops = run.unlogged
        if self.store is None or (not events and run.changes == run.saved_changes):
            if ops:
                ops.clear()  # they changed nothing: replaying them would not either
            return
        points = sum(op_points(op) for op in ops or ())
        fits = (bool(ops) and self.config.checkpoint_log_points > 0
                and run.logged_points + points <= self.config.checkpoint_log_points)
        append = fits and not run.from_empty
        if fits and ops:  # (fits implies ops)
            blob = run.replay_checkpoint(ops) if run.from_empty else encode_log_entry(ops)
        else:
            blob = run.checkpoint()
        try:
            self.store.save_checkpoint(
                run.run_id,
                blob,
                run.through_step,
                status=_without_recent(run.status),
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
        run.logged_points = run.logged_points + points if fits else 0
        run.from_empty = False
        run.unlogged = []

    def _publish(self, message: DomainEvent) -> None:
        # Outside every run lock: a handler may take its own locks (the dispatcher does).
        self.events.publish(message)

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


def _without_recent(status: RunStatus) -> RunStatus:
    """``status`` without its recent events, as the store takes it (the store keeps
    events itself). ``dataclasses.replace`` cost 2.5x as much (13 us), a commit a batch."""
    return RunStatus(
        run_id=status.run_id, labels=status.labels, phase=status.phase,
        since_step=status.since_step, confidence=status.confidence, last_step=status.last_step,
        ended=status.ended, recent_events=(), updated_at=status.updated_at,
        series=status.series, collapse_scopes=status.collapse_scopes,
    )


__all__ = [
    "CHECKPOINT_VERSION", "DETECTION_BUCKETS", "MAX_LABELS", "MAX_LABEL_KEY_BYTES",
    "MAX_LABEL_VALUE_BYTES", "MAX_STEP", "Checkpoint", "Columns", "Engine", "EngineConfig",
    "EngineSnapshot", "IngestResult", "RunClaim", "RunStatus", "SeriesStatus", "Store",
    "stop_between_blocks",
]
