"""The alert dispatcher: events in, deliveries out, never in detection's way.

:meth:`AlertDispatcher.submit` takes the events of a run; given an engine's
:class:`~detector.events.EventHub` (``events=``), the dispatcher subscribes to
it and submits what the engine detects, wherever the engine runs (``serve``,
``analyze``). It only puts the events on a bounded queue and returns at
once; when the queue is full the events are dropped and counted, never waited
for. One daemon worker thread takes them off, keeps the active alerts
(:class:`~detector.alerts.model.AlertBook`) and delivers changes to every sink:

- each sink has its own *pending* table, keyed by the alert's labels, holding
  the latest version of every alert it still has to receive; a failed delivery
  leaves it there, so nothing is lost while a sink is down, only merged;
- failed deliveries are retried with exponential backoff (``retry_initial``
  doubling up to ``retry_max``, with jitter), counted, logged once per streak,
  and never raised into the engine; an answer that no retry can fix (HTTP 400)
  drops that batch, counted as discarded;
- sinks that want it (Alertmanager) get every active alert again each
  ``resend_interval``, as Alertmanager expects of its clients, so alerts lost
  by an Alertmanager restart come back;
- with ``events``, the worker looks at the runs with active alerts every
  ``check_interval`` and resolves the alerts of runs that ended or went quiet
  (see :class:`~detector.alerts.model.AlertPolicy`), and forgets those of runs
  another replica took over. It knows of them from the hub's messages alone
  (:class:`~detector.events.RunUpdated`, ``RunEnded``, ``RunLeft``): the
  dispatcher never calls back into the engine.

Closing does not resolve anything: a restarted detector re-raises nothing,
and Alertmanager resolves what is no longer re-sent (``endsAt`` lies four
resend intervals ahead).

A little over 400 lines: the producer side, the worker's cycle, delivery with
backoff and the runs' side share the sinks' pending tables, which only the
worker thread touches; splitting them would spread that ownership over files.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from detector.alerts.model import (
    ALERT_RULES,
    RESOLVING_KINDS,
    Alert,
    AlertBook,
    AlertKey,
    AlertPolicy,
)
from detector.alerts.sinks import AlertSink, SinkError
from detector.core.types import Event, infer_spec
from detector.errors import InvalidArgument
from detector.events import DomainEvent, EventHub, EventsDetected, RunEnded, RunLeft, RunUpdated
from detector.ports import RunStatus

log = logging.getLogger("phasewatch.alerts")

# Kinds that raise or resolve an alert; the others never reach the queue.
_RELEVANT_KINDS = frozenset(ALERT_RULES) | RESOLVING_KINDS
_MAX_BATCH = 500  # alerts per request: bounded bodies even after a long outage
_MAX_DRAIN = 10_000  # events taken off the queue per cycle


@dataclass(frozen=True)
class SinkStats:
    """Counters of one sink: alerts delivered (re-sends included), failed attempts,
    alerts given up (rejected by the receiver or over ``max_pending``), alerts waiting."""

    name: str
    sent: int
    failures: int
    discarded: int
    pending: int


@dataclass(frozen=True)
class AlertStats:
    """What the Prometheus collector reads about alerting."""

    active: int
    events_dropped: int
    sinks: tuple[SinkStats, ...]


class _SinkState:
    """Per-sink delivery state; touched only by the worker thread, except the counters."""

    def __init__(self, sink: AlertSink, resend_at: float) -> None:
        self.sink = sink
        self.pending: dict[AlertKey, Alert] = {}
        self.next_attempt = 0.0  # monotonic
        self.backoff = 0.0
        self.streak = 0  # consecutive failures
        self.resend_at = resend_at  # monotonic
        self.sent = 0
        self.failures = 0
        self.discarded = 0


class AlertDispatcher:
    """Feeds ``sinks`` from engine events through a bounded queue and a worker thread.

    ``events`` (optional, an engine's hub) feeds the dispatcher and tells it of
    runs that ended, went quiet or left, and of series' declared roles; without
    it events come by :meth:`submit` and alerts resolve only by events and
    time. The worker starts at once; call :meth:`close` to stop it.
    """

    def __init__(
        self,
        sinks: Sequence[AlertSink],
        *,
        events: EventHub | None = None,
        policy: AlertPolicy | None = None,
        resend_interval: float = 60.0,
        queue_size: int = 10_000,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        max_pending: int = 10_000,
        check_interval: float = 1.0,
    ) -> None:
        if not sinks:
            raise InvalidArgument("an alert dispatcher needs at least one sink")
        names = [sink.name for sink in sinks]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"alert sink names must be unique, got {names}")
        for name, value in (
            ("resend_interval", resend_interval),
            ("retry_initial", retry_initial),
            ("retry_max", retry_max),
            ("check_interval", check_interval),
        ):
            if not value > 0:
                raise InvalidArgument(f"{name} must be positive, got {value}")
        if retry_max < retry_initial:
            raise InvalidArgument("retry_max must be at least retry_initial")
        if queue_size < 1 or max_pending < 1:
            raise InvalidArgument("queue_size and max_pending must be at least 1")
        self.policy = policy or AlertPolicy()
        self.resend_interval = resend_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_pending = max_pending
        self.check_interval = check_interval
        self._book = AlertBook(self.policy, is_plateau_series=self._is_plateau_series)
        self._queue: queue.Queue[tuple[str, Event, float] | None] = queue.Queue(queue_size)
        start = time.monotonic()
        self._sinks = [_SinkState(sink, start + resend_interval) for sink in sinks]
        self._lock = threading.Lock()  # guards the counters and the published snapshot
        self._events_dropped = 0
        self._active: tuple[Alert, ...] = ()
        self._next_check = 0.0
        # The latest status of each run the hub told of, and the runs that left;
        # written by the publisher's thread, read by the worker, under _lock.
        self._statuses: dict[str, RunStatus] = {}
        self._left: set[str] = set()
        # Last wall time a run with alerts was heard of, for stale_after: its
        # status's updated_at, else its latest event. The worker's own.
        self._heard: dict[str, float] = {}
        self._random = random.Random()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phasewatch-alerts", daemon=True)
        self._thread.start()
        self._unsubscribe = events.subscribe(self._on_domain_event) if events is not None else None

    # --- producer side (any thread, never blocks) ----------------------------------

    def submit(self, run_id: str, events: Sequence[Event], at: float | None = None) -> bool:
        """Queue the events of ``run_id`` published at ``at`` (default now).

        Returns False when some were dropped because the queue was full.
        """
        stamp = time.time() if at is None else at
        ok = True
        for event in events:
            if event.kind not in _RELEVANT_KINDS:
                continue
            try:
                self._queue.put_nowait((run_id, event, stamp))
            except queue.Full:
                ok = False
                with self._lock:
                    self._events_dropped += 1
                    first = self._events_dropped == 1
                if first:
                    log.warning("the alert queue is full: events are being dropped (counted)")
        return ok

    def _on_domain_event(self, message: DomainEvent) -> None:
        """The hub's handler: queue events, note run states; O(events), never blocks."""
        if isinstance(message, EventsDetected):
            self.submit(message.run_id, message.events, message.at)
        elif isinstance(message, RunUpdated | RunEnded):
            with self._lock:
                self._statuses[message.run_id] = message.status
                self._left.discard(message.run_id)
        elif isinstance(message, RunLeft):
            with self._lock:
                self._statuses.pop(message.run_id, None)
                self._left.add(message.run_id)

    # --- reads -------------------------------------------------------------------

    def stats(self) -> AlertStats:
        with self._lock:
            return AlertStats(
                active=len(self._active),
                events_dropped=self._events_dropped,
                sinks=tuple(
                    SinkStats(s.sink.name, s.sent, s.failures, s.discarded, len(s.pending))
                    for s in self._sinks
                ),
            )

    def active_alerts(self) -> tuple[Alert, ...]:
        """The active alerts as of the worker's last cycle."""
        with self._lock:
            return self._active

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event is processed and every sink is up to date.

        True when that happened within ``timeout``; False otherwise (a sink is
        down, or the worker has stopped).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0 and not any(s.pending for s in self._sinks):
                return True
            if not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after one last delivery attempt per sink; idempotent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # full: then the worker is not waiting anyway
            self._queue.put_nowait(None)  # wakes the worker at once
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the alert worker did not stop within %.1fs", timeout)

    # --- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._guarded_cycle(self._wait_time(), final=False)
        self._guarded_cycle(0.0, final=True)

    def _guarded_cycle(self, timeout: float, final: bool) -> None:
        try:
            self._cycle(timeout, final)
        except Exception:  # a bug here must not end alerting for good
            log.exception("alert dispatcher cycle failed")
            time.sleep(min(1.0, self.check_interval))

    def _wait_time(self) -> float:
        now = time.monotonic()
        wake = self._next_check
        for state in self._sinks:
            if state.pending:
                wake = min(wake, state.next_attempt)
            if state.sink.resends_active and self._active:
                wake = min(wake, state.resend_at)
        return max(0.0, min(wake - now, self.check_interval))

    def _cycle(self, timeout: float, final: bool) -> None:
        items = self._take(timeout)
        now, mono = time.time(), time.monotonic()
        changes: list[Alert] = []
        try:
            for run_id, event, at in items:
                changes += self._book.apply(run_id, event, at)
                self._heard[run_id] = max(self._heard.get(run_id, at), at)
        finally:
            for _ in items:
                self._queue.task_done()
        if mono >= self._next_check or final:
            self._next_check = mono + self.check_interval
            changes += self._check_runs(now)
        changes += self._book.expire(now)
        active = self._book.active()
        for state in self._sinks:
            for alert in changes:
                state.pending.pop(alert.key, None)  # re-insert: oldest first stays true
                state.pending[alert.key] = alert
            if state.sink.resends_active and mono >= state.resend_at:
                state.resend_at = mono + self.resend_interval
                for alert in active:
                    state.pending.setdefault(alert.key, alert)
            self._bound(state)
            if state.pending and (final or mono >= state.next_attempt):
                self._deliver(state, now, mono)
        with self._lock:
            self._active = tuple(active)

    def _take(self, timeout: float) -> list[tuple[str, Event, float]]:
        taken: list[tuple[str, Event, float]] = []
        try:
            item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            while True:
                if item is None:
                    self._queue.task_done()  # the wake-up from close()
                else:
                    taken.append(item)
                if len(taken) >= _MAX_DRAIN:
                    break
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return taken

    def _bound(self, state: _SinkState) -> None:
        excess = len(state.pending) - self.max_pending
        if excess <= 0:
            return
        for key in list(state.pending)[:excess]:  # the oldest changes go first
            del state.pending[key]
        with self._lock:
            state.discarded += excess
        log.warning("alert sink %s: over %d pending alerts, dropped %d", state.sink.name,
                    self.max_pending, excess)

    def _deliver(self, state: _SinkState, now: float, mono: float) -> None:
        alerts = list(state.pending.values())
        for start in range(0, len(alerts), _MAX_BATCH):
            batch = alerts[start : start + _MAX_BATCH]
            try:
                state.sink.send(batch, now)
            except SinkError as error:
                self._failed(state, batch, error, error.retryable, mono)
                if error.retryable:
                    return
            except Exception as error:  # a sink bug: count it, retry like a network error
                log.debug("alert sink %s raised", state.sink.name, exc_info=True)
                self._failed(state, batch, error, True, mono)
                return
            else:
                with self._lock:
                    state.sent += len(batch)
            for alert in batch:
                if state.pending.get(alert.key) is alert:
                    del state.pending[alert.key]
        if state.streak:
            log.info("alert sink %s delivers again after %d failed attempts", state.sink.name,
                     state.streak)
        state.streak, state.backoff, state.next_attempt = 0, 0.0, 0.0

    def _failed(
        self, state: _SinkState, batch: list[Alert], error: Exception, retryable: bool, mono: float
    ) -> None:
        with self._lock:
            state.failures += 1
            if not retryable:
                state.discarded += len(batch)
        if not retryable:
            log.error("alert sink %s rejected %d alerts, dropping them: %s", state.sink.name,
                      len(batch), error)
            return
        state.streak += 1
        state.backoff = min(self.retry_max, max(self.retry_initial, state.backoff * 2))
        # Jitter keeps the replicas of a detector from retrying in lockstep.
        state.next_attempt = mono + state.backoff * self._random.uniform(0.8, 1.0)
        level = logging.WARNING if state.streak == 1 else logging.DEBUG
        log.log(level, "alert sink %s failed (attempt %d, %d alerts pending, next try in %.1fs): %s",
                state.sink.name, state.streak, len(state.pending), state.backoff, error)

    # --- the runs' side (from the hub) -----------------------------------------------

    def _check_runs(self, now: float) -> list[Alert]:
        """Resolve the alerts of runs that ended or went quiet; forget those that left.

        O(runs with alerts + runs the hub told of)."""
        run_ids = set(self._book.run_ids())
        with self._lock:
            statuses = {r: self._statuses.get(r) for r in run_ids}
            left = self._left & run_ids
            # Runs with no alerts need no state here; a later update brings it back.
            for run_id in [r for r, s in self._statuses.items() if s.ended and r not in run_ids]:
                del self._statuses[run_id]
            self._left &= run_ids
        for run_id in [r for r in self._heard if r not in run_ids]:
            del self._heard[run_id]
        changes: list[Alert] = []
        stale_after = self.policy.stale_after
        for run_id in sorted(run_ids):
            status = statuses[run_id]
            if run_id in left:
                # Handed over to another replica: leave its alerts to expire in
                # Alertmanager rather than resolve them.
                self._book.forget_run(run_id)
                continue
            if status is not None and status.ended:
                changes += self._book.resolve_run(run_id, now, "the run ended")
                continue
            if status is None:
                continue  # a run the hub never told of: its alerts expire by time
            heard = max(self._heard.get(run_id, 0.0), status.updated_at)
            if stale_after is not None and now - heard > stale_after:
                changes += self._book.resolve_run(run_id, now, f"no data for {stale_after:g} s")
        return changes

    def _is_plateau_series(self, run_id: str, series: str) -> bool:
        roles = self.policy.plateau_roles
        with self._lock:
            status = self._statuses.get(run_id)
        # The declared role of a headline series beats the one its name suggests.
        for headline in status.series if status is not None else ():
            if headline.name == series:
                return headline.role in roles
        return infer_spec(series).role in roles
