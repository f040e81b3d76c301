"""Domain events: the engine publishes what happened to a run; adapters subscribe.

A small synchronous publish/subscribe (:class:`EventHub`), so that what the
engine detects reaches the same sinks whether it runs inside ``phasewatch
serve`` or in ``phasewatch analyze`` / :func:`detector.analyze`: the alert
dispatcher (:class:`detector.alerts.AlertDispatcher`) subscribes to an
engine's hub and learns from it alone that a run took points, ended or left
this detector, so it never calls back into the engine.

Messages are plain frozen dataclasses:

- :class:`EventsDetected`: the events one call produced (``ingest``,
  ``end_run``, ``flush``), stamped with the wall time they were emitted;
- :class:`RunUpdated`: a run took points or was declared (its new status:
  last step, headline series and their roles, ``updated_at``);
- :class:`RunEnded`: a run ended (its final status);
- :class:`RunLeft`: this detector forgot a run (handed over to another
  replica); its state lives on in the store.

Delivery is synchronous, in the publisher's thread, after the engine let go
of the run's lock: a handler must return at once (queue the work, as the
dispatcher does) and must not call back into the engine. A handler that
raises is logged and skipped; it never fails the call that published.
Publishing is O(handlers).

>>> from detector.core.types import Event, EventKind
>>> hub = EventHub()
>>> seen = []
>>> unsubscribe = hub.subscribe(seen.append)
>>> hub.publish(EventsDetected("run-1", (Event(step=7, kind=EventKind.LOSS_SPIKE, detected_at=9),), 1.5))
>>> [(m.run_id, [e.step for e in m.events]) for m in seen]
[('run-1', [7])]
>>> unsubscribe()
>>> hub.publish(RunLeft("run-1", 2.0))
>>> len(seen)
1
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from detector.core.types import Event
from detector.ports import RunStatus

log = logging.getLogger("phasewatch.events")


@dataclass(frozen=True)
class EventsDetected:
    """Events of ``run_id`` emitted at ``at`` (Unix seconds)."""

    run_id: str
    events: tuple[Event, ...]
    at: float


@dataclass(frozen=True)
class RunUpdated:
    """A run took points or was declared; ``status`` is its state after."""

    status: RunStatus
    at: float

    @property
    def run_id(self) -> str:
        return self.status.run_id


@dataclass(frozen=True)
class RunEnded:
    """A run ended; ``status`` is its final state."""

    status: RunStatus
    at: float

    @property
    def run_id(self) -> str:
        return self.status.run_id


@dataclass(frozen=True)
class RunLeft:
    """This detector forgot ``run_id`` (another replica took it over)."""

    run_id: str
    at: float


DomainEvent = EventsDetected | RunUpdated | RunEnded | RunLeft
Handler = Callable[[DomainEvent], object]


class EventHub:
    """Synchronous fan-out of :data:`DomainEvent` messages to handlers.

    Thread-safe: any thread may publish or (un)subscribe. Handlers run in the
    publisher's thread, in subscription order.
    """

    def __init__(self) -> None:
        self._handlers: tuple[Handler, ...] = ()
        self._lock = threading.Lock()

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler(message)`` on every publish; returns the unsubscribe function."""
        with self._lock:
            self._handlers = (*self._handlers, handler)

        def unsubscribe() -> None:
            with self._lock:
                self._handlers = tuple(h for h in self._handlers if h is not handler)

        return unsubscribe

    @property
    def handler_count(self) -> int:
        return len(self._handlers)

    def publish(self, message: DomainEvent) -> None:
        """Hand ``message`` to every handler; a failing handler is logged, not raised."""
        for handler in self._handlers:  # a tuple: subscribing meanwhile is safe
            try:
                handler(message)
            except Exception:  # a sink's bug must not fail detection
                log.exception("a domain event handler failed on %s", type(message).__name__)
