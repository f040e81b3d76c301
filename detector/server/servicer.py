"""The PhaseDetector servicer: validate, convert, call the engine, publish events.

Every error becomes a status through :func:`detector.status.abort` (the one table).
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

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
from detector.core.types import check_name
from detector.engine import Engine, RunClaim, RunStatus, stop_between_blocks
from detector.errors import Aborted, FailedPrecondition, InvalidArgument
from detector.server.bus import EventBus
from detector.server.paging import LIST_RUNS_PAGE, TIMELINE_PAGE, _fill, _from_token, _page_size, _to_token
from detector.status import abort

log = logging.getLogger("phasewatch.server")

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
