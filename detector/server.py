"""The gRPC adapter: validate, convert, call the engine, map errors to statuses.

Business logic lives in :mod:`detector.engine`; conversions in
:mod:`detector.convert`; errors become statuses through the one table in
:mod:`detector.status`. ``create_server`` builds a server (tests
run it on port 0); ``serve`` is the ``phasewatch serve`` process around it.

Stream acknowledgements: every request message on ``Stream`` is answered, in
order, by the events it caused followed by exactly one ``Ack`` (the client SDK
counts on this to match answers to requests):

- ``start``: ``Ack(through_step=<run's last step, -1 if none>, 0, 0)``, so a
  resuming client learns where the detector is;
- ``batch``: ``accepted``/``rejected`` count the points of *that batch*
  (per batch, not cumulative; resent duplicates count as accepted);
- ``end``: the events of the final flush, then ``Ack(through_step, 0, 0)``.

When the client half-closes without ``end``, held points are flushed and one
more ``Ack(through_step, 0, 0)`` follows the events of that flush.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import functools
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.convert import (
    batch_to_columns,
    event_to_proto,
    kind_from_proto,
    phase_from_proto,
    segment_to_proto,
    spec_from_proto,
    status_to_proto,
)
from detector.core.types import Event, EventKind, check_name
from detector.engine import Engine, EngineConfig, RunClaim, RunStatus, stop_between_blocks
from detector.errors import Aborted, FailedPrecondition, InvalidArgument
from detector.guard import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_MAX_UNARY,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    ElasticExecutor,
    Guard,
    worker_threads,
)
from detector.status import (  # noqa: F401 - the table's names, importable from here as before
    ERROR_DOMAIN,
    REASON_RATE_LIMITED,
    REASON_RUN_OWNED,
    RETRY_AFTER_KEY,
    STATUS_CODES,
    abort,
    rich_status,
    status_code,
)

log = logging.getLogger("phasewatch.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["PhaseDetector"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Open streams (Stream and WatchEvents, each holding a worker thread for its
# life); past it new streams get RESOURCE_EXHAUSTED at once. Unary calls and
# health checks have capacity of their own (detector.guard).
DEFAULT_MAX_WORKERS = DEFAULT_MAX_STREAMS
# Server keepalive: ping a client with open calls every minute, so that one that
# vanished (no FIN: a lost node, a dropped NAT entry) releases its streams within
# ~80 s; accept client pings down to every 10 s (the SDK's default is 300 s).
# Connections with no call for 30 minutes are closed (clients reconnect at once).
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_idle_ms", 30 * 60_000),
)

# Request metadata the SDK sends: one id per client (Run object), so that a
# stream opened again by the same client after a disconnect takes its run over
# from its own stale stream instead of being refused as a second writer.
WRITER_KEY = "phasewatch-writer"


F = TypeVar("F", bound=Callable[..., Any])


def _unary(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as error:  # every error becomes a status
            abort(context, error)

    return wrapper  # type: ignore[return-value]


def _streaming(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except grpc.RpcError:
            # Raised by the request iterator when the client cancelled: nobody
            # is left to tell, and the run's held points stay for a resume.
            return
        except Exception as error:  # every error becomes a status
            abort(context, error)

    return wrapper  # type: ignore[return-value]


def _check_run_id(run_id: str) -> None:
    problem = check_name("run id", run_id)
    if problem is not None:
        raise InvalidArgument(problem)


# --- event bus -----------------------------------------------------------------


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


# --- paging (AIP-158) ---------------------------------------------------------------

# (default, maximum) page sizes. Whatever the size, a page is cut before it
# exceeds PAGE_BYTES, so that it fits any client's default 4 MiB receive limit.
LIST_RUNS_PAGE = (500, 1000)
TIMELINE_PAGE = (1000, 10_000)
PAGE_BYTES = 2 * 1024 * 1024


def _page_size(asked: int, sizes: tuple[int, int]) -> int:
    if asked < 0:
        raise InvalidArgument(f"page_size must not be negative, got {asked}")
    return sizes[0] if asked == 0 else min(asked, sizes[1])


def _to_token(kind: str, scope: str, position: str) -> str:
    """An opaque page token: where the next page starts, and what it pages."""
    text = json.dumps([kind, scope, position])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _from_token(token: str, kind: str, scope: str) -> str | None:
    """The position in a token from ``_to_token``; None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        found_kind, found_scope, position = json.loads(base64.urlsafe_b64decode(padded))
        if found_kind != kind or found_scope != scope or not isinstance(position, str):
            raise ValueError
        if kind == "e" and not (position.isdigit() and len(position) < 19):
            raise ValueError
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(
            "page_token is not a next_page_token of this request (paging restarts without one)"
        ) from None
    return position


def _fill(field: Any, messages: Iterable[Any], used: int) -> int:
    """Append messages to a repeated field until the page holds PAGE_BYTES; how many.

    At least one goes in, whatever its size (label and evidence limits bound it)."""
    taken = 0
    for message in messages:
        size = message.ByteSize() + 8  # the field's tag and length
        if taken and used + size > PAGE_BYTES:
            break
        field.append(message)
        used += size
        taken += 1
    return taken


# --- servicer ----------------------------------------------------------------------


class _Writer:
    """The open stream that writes a run on this replica."""

    __slots__ = ("context", "peer", "since", "writer_id")

    def __init__(self, writer_id: str, peer: str, context: grpc.ServicerContext) -> None:
        self.writer_id = writer_id
        self.peer = peer
        self.context = context
        self.since = time.time()

    def conflict(self, run_id: str) -> Aborted:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        return Aborted(
            f"run {run_id!r} is being written by another stream, from {self.peer} "
            f"(open since {since}): one writer per run. Retry after that stream ends",
            owner=self.peer,
            run_id=run_id,
        )


def _stopped(context: grpc.ServicerContext) -> Callable[[], bool]:
    """Whether the call is over: cancelled by the client, past its deadline, or
    cancelled by ``server.stop(grace)`` once the grace is spent."""
    return lambda: not context.is_active()


def _writer_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == WRITER_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


def _ack(through_step: int, accepted: int = 0, rejected: int = 0) -> pb.StreamResponse:
    return pb.StreamResponse(
        ack=pb.Ack(through_step=through_step, accepted=accepted, rejected=rejected)
    )


class PhaseDetectorServicer(pb_grpc.PhaseDetectorServicer):
    """``phasewatch.v1.PhaseDetector`` on an :class:`Engine`; events go to ``bus``."""

    def __init__(
        self, engine: Engine, bus: EventBus | None = None, *, watch_poll_seconds: float = 1.0
    ) -> None:
        self.engine = engine
        self.bus = bus if bus is not None else EventBus()
        # A safety net only: cancellation and bus.close() wake watchers at once.
        self.watch_poll_seconds = watch_poll_seconds
        # One writer per run on this replica: the open Stream of each run.
        self._writers: dict[str, _Writer] = {}
        self._writers_lock = threading.Lock()

    def _take_run(self, run_id: str, context: grpc.ServicerContext) -> _Writer:
        """Make this stream the run's writer; Aborted naming the owner if another stream is.

        The same client (same ``phasewatch-writer`` id) opening a stream again,
        e.g. after a disconnect its old stream has not noticed yet, takes the run
        over: the old stream is cancelled.
        """
        _check_run_id(run_id)
        me = _Writer(_writer_id(context), context.peer(), context)
        replaced = None
        with self._writers_lock:
            owner = self._writers.get(run_id)
            if owner is not None and owner.context is not context:
                if not (me.writer_id and me.writer_id == owner.writer_id):
                    raise owner.conflict(run_id)
                replaced = owner
            self._writers[run_id] = me
        if replaced is not None:
            log.info("run %r: stream from %s replaced by the same client's new stream from %s",
                     run_id, replaced.peer, me.peer)
            replaced.context.cancel()
        return me

    def _give_run(self, run_id: str, writer: _Writer) -> None:
        with self._writers_lock:
            if self._writers.get(run_id) is writer:
                del self._writers[run_id]

    def _check_writer(self, run_id: str, context: grpc.ServicerContext) -> None:
        """Aborted when another client has a stream of ``run_id`` open (a Log's check)."""
        with self._writers_lock:
            owner = self._writers.get(run_id)
        if owner is not None:
            writer_id = _writer_id(context)
            if not (writer_id and writer_id == owner.writer_id):
                raise owner.conflict(run_id)

    def _start(self, start: pb.RunStart, run_id: str) -> RunStatus:
        return self.engine.start_run(
            run_id,
            labels=dict(start.labels),
            series=[spec_from_proto(s) for s in start.series],
            resume=start.resume,
            restart=start.restart,
        )

    @_streaming
    def Stream(
        self, request_iterator: Iterator[pb.StreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamResponse]:
        # The run is this replica's while its stream is open (engine.claim), and
        # given back before the stream's final status goes out.
        claims: list[RunClaim] = []
        writers: list[tuple[str, _Writer]] = []
        try:
            yield from self._stream(request_iterator, context, claims, writers)
        finally:
            for claim in claims:
                claim.release()
            for run_id, writer in writers:
                self._give_run(run_id, writer)

    def _stream(
        self, request_iterator: Iterator[pb.StreamRequest], context: grpc.ServicerContext,
        claims: list[RunClaim], writers: list[tuple[str, _Writer]],
    ) -> Iterator[pb.StreamResponse]:
        run_id: str | None = None
        ended = False
        for request in request_iterator:
            which = request.WhichOneof("msg")
            if which is None:
                raise InvalidArgument("empty StreamRequest: set start, batch or end")
            if which == "start":
                if run_id is not None and request.start.run_id != run_id:
                    raise InvalidArgument(
                        f"this stream is for run {run_id!r}; open another stream for "
                        f"{request.start.run_id!r}"
                    )
                if not claims:
                    writers.append(
                        (request.start.run_id, self._take_run(request.start.run_id, context))
                    )
                    claims.append(self.engine.claim(request.start.run_id))
                status = self._start(request.start, request.start.run_id)
                run_id, ended = status.run_id, False
                yield _ack(status.last_step)
            elif run_id is None:
                raise InvalidArgument(f"the first message of a stream must be start, not {which}")
            elif which == "batch":
                if ended:
                    raise FailedPrecondition(
                        f"run {run_id!r} was ended on this stream; send start to resume it"
                    )
                with stop_between_blocks(_stopped(context)):
                    result = self.engine.ingest(run_id, batch_to_columns(request.batch))
                for message in self.bus.publish(run_id, result.events):
                    yield pb.StreamResponse(event=message)
                yield _ack(result.through_step, result.accepted, result.rejected)
            else:
                events = self.engine.end_run(run_id, request.end.final_step)
                ended = True
                for message in self.bus.publish(run_id, events):
                    yield pb.StreamResponse(event=message)
                yield _ack(self.engine.status(run_id).last_step)
        if run_id is not None and not ended:
            # Half-closed without end (e.g. the job exited): release held points
            # so the last steps are detected, but leave the run open to resume.
            for message in self.bus.publish(run_id, self.engine.flush(run_id)):
                yield pb.StreamResponse(event=message)
            yield _ack(self.engine.status(run_id).last_step)

    @_unary
    def Log(self, request: pb.LogRequest, context: grpc.ServicerContext) -> pb.LogResponse:
        self._check_writer(request.run_id or request.start.run_id, context)
        claim = self.engine.claim(request.run_id or request.start.run_id)
        try:
            return self._log(request, context)
        finally:
            claim.release()

    def _log(self, request: pb.LogRequest, context: grpc.ServicerContext) -> pb.LogResponse:
        run_id = request.run_id
        if request.HasField("start"):
            if run_id and request.start.run_id and request.start.run_id != run_id:
                raise InvalidArgument(
                    f"run_id {run_id!r} and start.run_id {request.start.run_id!r} differ"
                )
            run_id = run_id or request.start.run_id
            self._start(request.start, run_id)
        with stop_between_blocks(_stopped(context)):
            result = self.engine.ingest(run_id, batch_to_columns(request.batch))
        return pb.LogResponse(
            ack=pb.Ack(
                through_step=result.through_step,
                accepted=result.accepted,
                rejected=result.rejected,
            ),
            events=self.bus.publish(run_id, result.events),
        )

    @_unary
    def GetPhase(
        self, request: pb.GetPhaseRequest, context: grpc.ServicerContext
    ) -> pb.RunPhase:
        _check_run_id(request.run_id)
        return status_to_proto(self.engine.status(request.run_id))

    @_unary
    def GetTimeline(
        self, request: pb.GetTimelineRequest, context: grpc.ServicerContext
    ) -> pb.Timeline:
        _check_run_id(request.run_id)
        size = _page_size(request.page_size, TIMELINE_PAGE)
        offset = int(_from_token(request.page_token, "e", request.run_id) or 0)
        # One more than the page: whether a next page exists, without a count query.
        segments, events = self.engine.timeline(request.run_id, offset, size + 1)
        page = pb.Timeline(run_id=request.run_id)
        if offset == 0:
            page.segments.extend(segment_to_proto(s) for s in segments)
        taken = _fill(page.events, (event_to_proto(request.run_id, e) for e in events[:size]),
                      page.ByteSize())
        if taken < len(events):
            page.next_page_token = _to_token("e", request.run_id, str(offset + taken))
        return page

    @_unary
    def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.ServicerContext
    ) -> pb.ListRunsResponse:
        size = _page_size(request.page_size, LIST_RUNS_PAGE)
        after = _from_token(request.page_token, "r", "")
        runs = self.engine.list_runs(
            label_selector=dict(request.label_selector), phase=phase_from_proto(request.phase)
        )  # sorted by run id
        start = bisect.bisect_right([r.run_id for r in runs], after) if after is not None else 0
        chosen = runs[start : start + size + 1]
        page = pb.ListRunsResponse()
        taken = _fill(page.runs, (status_to_proto(r) for r in chosen[:size]), 0)
        if taken < len(chosen):
            page.next_page_token = _to_token("r", "", chosen[taken - 1].run_id)
        return page

    @_streaming
    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.PhaseEvent]:
        if request.run_id:
            _check_run_id(request.run_id)
        kinds = {kind_from_proto(value) for value in request.kinds}
        if None in kinds:
            raise InvalidArgument("kinds must not contain EVENT_KIND_UNSPECIFIED")
        sub = self.bus.subscribe(request.run_id, kinds)  # type: ignore[arg-type]
        # Cancellation and server stop run the callbacks: the blocked get() wakes.
        context.add_callback(sub.close)
        try:
            # Headers tell the client it is subscribed: events published after
            # initial_metadata() returns will reach it.
            context.send_initial_metadata(())
            while not sub.closed and context.is_active():
                message = sub.get(timeout=self.watch_poll_seconds)
                if message is not None:
                    yield message
        finally:
            sub.close()
            if sub.dropped:
                log.warning("a watcher of %r dropped %d events", sub.run_id, sub.dropped)


# --- server ------------------------------------------------------------------------


def create_server(
    engine: Engine,
    listen: str = "127.0.0.1:0",
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = DEFAULT_MAX_WORKERS,
    bus: EventBus | None = None,
    health_servicer: health.HealthServicer | None = None,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    otlp: bool = False,
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
    max_unary: int = DEFAULT_MAX_UNARY,
    stream_idle_timeout: float | None = DEFAULT_STREAM_IDLE_TIMEOUT,
    guard: Guard | None = None,
    thread_idle_seconds: float = 30.0,
) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``engine`` on ``listen``; returns (server, bound port).

    ``max_workers`` open streams at once (``max_streams_per_peer`` from one
    client host), ``max_unary`` unary calls, health checks beyond both; a
    ``Stream`` silent for ``stream_idle_timeout`` seconds is closed (see
    :mod:`detector.guard`; pass ``guard`` to read its counters).

    Registers the PhaseDetector servicer (publishing to ``bus``), the stock
    health servicer (SERVING for ``""`` and ``phasewatch.v1.PhaseDetector``;
    pass ``health_servicer`` to control it at shutdown) and reflection.
    Messages over ``max_message_bytes`` get RESOURCE_EXHAUSTED from gRPC
    itself. With ``credentials`` the port is TLS. With ``otlp`` the port also
    serves OpenTelemetry metrics (:mod:`detector.otlp`).
    """
    if max_message_bytes < 1 or max_workers < 1:
        raise InvalidArgument("max_message_bytes and max_workers must be at least 1")
    if guard is None:
        guard = Guard(SERVICE_NAME, max_streams=max_workers,
                      max_streams_per_peer=max_streams_per_peer, max_unary=max_unary,
                      stream_idle_timeout=stream_idle_timeout)
    server = grpc.server(
        # Threads for every capped call plus a reserve for health checks; they
        # end when idle, so a burst of streams does not keep its threads.
        ElasticExecutor(worker_threads(guard.max_streams, guard.max_unary),
                        idle_seconds=thread_idle_seconds),
        # After the caller's (authentication first: a refused caller takes no slot).
        interceptors=[*interceptors, guard],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            # Two detectors must not silently share a port.
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
        ],
    )
    servicer = PhaseDetectorServicer(engine, bus)
    pb_grpc.add_PhaseDetectorServicer_to_server(servicer, server)
    if otlp:
        from detector.otlp import add_receiver

        add_receiver(server, servicer)
    if health_servicer is None:
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    _check_free(listen)
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as error:  # grpc >= 1.50 raises; older versions return 0
        raise OSError(f"cannot listen on {listen!r}: {error}") from error
    if port == 0:
        raise OSError(f"cannot listen on {listen!r}")
    server.start()
    return server, port


def _check_free(listen: str) -> None:
    """OSError naming the address when something listens on it already.

    gRPC would say so itself, but as a C++ log line on stderr and a bare
    RuntimeError; a test bind (closed at once) says which address, cleanly.
    """
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port_text.isdigit() or int(port_text) == 0:
        return
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return  # gRPC reports an unknown host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as error:
                raise OSError(
                    error.errno, f"cannot listen on {listen}: {error.strerror}"
                ) from None


def serve(
    listen: str = "127.0.0.1:50051",
    metrics_listen: str | None = "127.0.0.1:9109",
    store_url: str | None = None,
    *,
    config: EngineConfig | None = None,
    grace: float = 5.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
    max_unary: int = DEFAULT_MAX_UNARY,
    stream_idle_timeout: float | None = DEFAULT_STREAM_IDLE_TIMEOUT,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    auth_token_file: str | None = None,
    stop: threading.Event | None = None,
    alertmanager_url: str | None = None,
    webhook_url: str | None = None,
    alert_resend_interval: float = 60.0,
    alert_runbook_url: str | None = None,
    metrics_retention: float = 600.0,
    otlp: bool = False,
    metrics_auth_token_file: str | None = None,
) -> None:
    """Run the detector until SIGINT/SIGTERM (or until ``stop`` is set).

    Opens the store (``None``: the default SQLite file), starts gRPC on
    ``listen`` and Prometheus ``/metrics`` on ``metrics_listen`` (``None`` or
    ``""``: none), and on shutdown reports NOT_SERVING, ends watches, lets
    RPCs finish for ``grace`` seconds and closes the store.

    Alerts go to ``alertmanager_url`` (comma-separated for an Alertmanager
    cluster) and ``webhook_url`` (see :mod:`detector.alerts`), active ones
    re-sent to Alertmanager every ``alert_resend_interval`` seconds;
    ``alert_runbook_url`` is a ``{alertname}`` template for the annotation.
    Ended runs leave ``/metrics`` ``metrics_retention`` seconds after their
    last update.

    With ``auth_token_file`` every RPC but health checks needs a bearer token
    from that file (:mod:`detector.auth`); ``credentials`` make the port TLS.
    ``/metrics`` needs a token from ``metrics_auth_token_file``, by default the
    same file (``"none"``: no token, for a metrics port bound to a private
    interface). It also counts every RPC (:mod:`detector.grpc_metrics`).
    Limits (series per run, runs, points per second per run) are in
    ``config``; ``max_message_bytes`` bounds one request, ``max_workers`` the
    open streams (``--max-concurrent-streams``: an open Stream or WatchEvents
    holds a worker thread for its life, so it is also the number of training
    jobs that can stream at once), ``max_streams_per_peer`` those of one
    client host, ``max_unary`` the unary calls in flight; a Stream silent for
    ``stream_idle_timeout`` seconds is closed (see :mod:`detector.guard`).

    Shutdown, on SIGTERM/SIGINT: health goes NOT_SERVING at once (load
    balancers and probes move away), watches end, new RPCs are refused and
    open streams get ``grace`` seconds to finish; what is still open then is
    cancelled (the SDK reconnects elsewhere and replays what was not
    acknowledged). Every run in memory is then checkpointed to the store,
    which is closed, and the call returns (exit 0).

    Set ``OPENBLAS_NUM_THREADS=1`` in the environment before numpy is first
    imported (the CLI does): BLAS threads per RPC thread oversubscribe the
    cores. By the time this module runs, numpy is already loaded.
    """
    from detector.alerts import AlertDispatcher, AlertPolicy, build_sinks
    from detector.exporter import start_metrics_server
    from detector.store import open_store

    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
        )
    stop = stop or threading.Event()
    # Bad alert and auth settings fail before anything is opened.
    sinks = build_sinks(alertmanager_url, webhook_url, resend_interval=alert_resend_interval)
    interceptors = list(interceptors)
    if auth_token_file:
        from detector.auth import BearerTokenInterceptor

        interceptors.insert(0, BearerTokenInterceptor(token_file=auth_token_file))
    metrics_auth, grpc_metrics = _metrics_options(
        metrics_listen, auth_token_file, metrics_auth_token_file
    )
    if grpc_metrics is not None:
        interceptors.insert(0, grpc_metrics)  # outermost: counts what auth refuses too
    policy = AlertPolicy(runbook_url=alert_runbook_url)
    # Taken ports fail before the store is opened or anything is logged.
    _check_free(listen)
    if metrics_listen:
        try:
            _check_free(metrics_listen)
        except OSError as error:
            raise OSError(error.errno, f"cannot listen for /metrics on {metrics_listen}: "
                          f"{os.strerror(error.errno or 0)}") from None
    store = open_store(store_url)
    metrics_server = None
    dispatcher = None
    try:
        engine = Engine(config, store=store)
        bus = EventBus()
        if sinks:
            dispatcher = AlertDispatcher(
                sinks, engine=engine, policy=policy, resend_interval=alert_resend_interval
            )
            bus.add_listener(dispatcher.submit)
            log.info("phasewatch alerts to %s", ", ".join(map(repr, sinks)))
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        server, port = create_server(
            engine,
            listen,
            max_message_bytes=max_message_bytes,
            max_workers=max_workers,
            max_streams_per_peer=max_streams_per_peer,
            max_unary=max_unary,
            stream_idle_timeout=stream_idle_timeout,
            bus=bus,
            health_servicer=health_servicer,
            credentials=credentials,
            otlp=otlp,
            interceptors=interceptors,
        )
        host = listen.rpartition(":")[0]
        # Named to clients refused a run this replica owns; a pod's hostname is its name.
        engine.replica = os.environ.get("PHASEWATCH_REPLICA") or f"{socket.gethostname()}:{port}"
        log.info(
            "phasewatch gRPC listening on %s:%d (store %r%s%s)", host, port, store,
            ", TLS" if credentials is not None else "",
            ", bearer token required" if auth_token_file else "",
        )
        if metrics_listen:
            try:
                metrics_server, metrics_port = start_metrics_server(
                    engine, metrics_listen, alerts=dispatcher, retention=metrics_retention,
                    collectors=[grpc_metrics.registry] if grpc_metrics is not None else [],
                    auth=metrics_auth,
                )
            except OSError as error:
                server.stop(None)
                raise OSError(
                    error.errno,
                    f"cannot listen for /metrics on {metrics_listen}: {error.strerror or error}",
                ) from None
            log.info(
                "phasewatch metrics on http://%s:%d/metrics",
                metrics_listen.rpartition(":")[0],
                metrics_port,
            )
        previous = _install_signal_handlers(stop)
        try:
            stop.wait()
        finally:
            _restore_signal_handlers(previous)
        log.info("phasewatch shutting down (grace %.1fs)", grace)
        health_servicer.enter_graceful_shutdown()  # NOT_SERVING: balancers move away
        bus.close()  # watches end with OK instead of being cancelled
        server.stop(grace).wait()
        # Every ingest checkpointed what it acknowledged; this writes the rest
        # (e.g. a run declared with no points since), under each run's lock.
        log.info("phasewatch checkpointed %d runs", engine.checkpoint_all())
    finally:
        if dispatcher is not None:
            dispatcher.close(timeout=grace)  # one last delivery; resolves nothing
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        store.close()
    log.info("phasewatch stopped")


def _metrics_options(
    metrics_listen: str | None, auth_token_file: str | None, metrics_auth_token_file: str | None
) -> tuple[Any, Any]:
    """The /metrics token check (None: open) and the gRPC server metrics, for serve()."""
    if not metrics_listen:
        return None, None
    from detector.grpc_metrics import GrpcServerMetrics

    token_file = auth_token_file if metrics_auth_token_file is None else metrics_auth_token_file
    auth = None
    if token_file and token_file.lower() != "none":
        from detector.auth import BearerTokenInterceptor

        auth = BearerTokenInterceptor(token_file=token_file)
    return auth, GrpcServerMetrics()


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    # signal.signal only works in the main thread; elsewhere `stop` is the way out.
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda *_: stop.set())
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
