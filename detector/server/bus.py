"""Live events to gRPC watchers (``WatchEvents``): one bounded queue per watcher."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector.convert import event_to_proto
from detector.core.types import Event, EventKind
from detector.errors import InvalidArgument

log = logging.getLogger("phasewatch.server")


class Subscription:
    """One watcher's bounded queue of events; filled by :class:`EventBus`."""

    def __init__(
        self, bus: EventBus, run_id: str, kinds: Collection[EventKind], maxsize: int
    ) -> None:
        self.run_id = run_id
        self.kinds = frozenset(kinds)
        self.dropped = 0  # written under the bus lock
        self.closed = False
        self._bus = bus
        self._queue: queue.Queue[pb.PhaseEvent | None] = queue.Queue(maxsize)

    def wants(self, run_id: str, kind: EventKind) -> bool:
        return (not self.run_id or self.run_id == run_id) and (
            not self.kinds or kind in self.kinds
        )

    def get(self, timeout: float | None = None) -> pb.PhaseEvent | None:
        """The next event, or None on timeout or once closed."""
        if self.closed:
            return None
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Unsubscribe and wake a blocked ``get``; idempotent, any thread."""
        if self.closed:
            return
        self.closed = True
        self._bus._remove(self)
        # Wakes a blocked get(); a full queue means get() is not blocked anyway.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)


class EventBus:
    """In-process fan-out of live events to watchers.

    ``publish`` never blocks: a watcher whose queue is full loses the event,
    and the loss is counted (``Subscription.dropped``, ``EventBus.dropped``).
    Publishing is O(subscribers × events); events are rare next to points.
    Listeners (``add_listener``; the alert dispatcher) get every published
    batch as domain events, and must not block either.

    >>> from detector.core.types import Event, EventKind
    >>> bus = EventBus()
    >>> sub = bus.subscribe("run-1", kinds={EventKind.LOSS_SPIKE})
    >>> _ = bus.publish("run-1", [Event(step=7, kind=EventKind.LOSS_SPIKE, detected_at=9)])
    >>> sub.get(timeout=1).step
    7
    """

    def __init__(self, maxsize: int = 1024) -> None:
        if maxsize < 1:
            raise InvalidArgument(f"maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self.dropped = 0
        self._subscribers: list[Subscription] = []
        self._listeners: list[Callable[[str, Sequence[Event], float], object]] = []
        self._lock = threading.Lock()
        self._closed = False

    def add_listener(self, listener: Callable[[str, Sequence[Event], float], object]) -> None:
        """Call ``listener(run_id, events, at)`` on every publish; it must return at once."""
        with self._lock:
            self._listeners.append(listener)

    def subscribe(self, run_id: str = "", kinds: Collection[EventKind] = ()) -> Subscription:
        """Watch one run (all when ``run_id`` is empty), only ``kinds`` if given."""
        sub = Subscription(self, run_id, kinds, self.maxsize)
        with self._lock:
            if not self._closed:
                self._subscribers.append(sub)
                return sub
        sub.close()  # the bus is shutting down: the watch ends at once
        return sub

    def publish(
        self, run_id: str, events: Sequence[Event], at: float | None = None
    ) -> list[pb.PhaseEvent]:
        """Convert ``events`` (stamped ``at``, default now) and offer them to watchers.

        Returns the converted messages, so callers send the same ones.
        """
        stamp = time.time() if at is None else at
        messages = [event_to_proto(run_id, e, stamp) for e in events]
        if not messages:
            return messages
        with self._lock:
            for event, message in zip(events, messages, strict=True):
                for sub in self._subscribers:
                    if not sub.wants(run_id, event.kind):
                        continue
                    try:
                        sub._queue.put_nowait(message)
                    except queue.Full:
                        if sub.dropped == 0:
                            log.warning("a slow watcher of %r is dropping events", sub.run_id)
                        sub.dropped += 1
                        self.dropped += 1
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(run_id, events, stamp)
            except Exception:  # a listener's bug must not fail the RPC that published
                log.exception("an event listener failed")
        return messages

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def close(self) -> None:
        """End every watch (the server is stopping); later subscriptions end at once."""
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.close()

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
