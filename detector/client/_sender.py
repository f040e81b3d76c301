"""The sender: one daemon thread per run that batches rows, keeps one stream
open, replays unacknowledged batches after a reconnect and ends the run.

:class:`_Sender` holds the sender's half of :class:`~detector.client.Run`
(``Run`` inherits it): the thread's loop, opening a stream, the reader thread
that takes ``Ack``s and events. The state both halves share is declared here
and set by ``Run._init_process_state``; every field is guarded by ``_lock``
(``_cond`` is its condition). The loop's own pacing (flush ticks, backoff) is
a :class:`_Pacing` only its thread touches, and each pass's decision is one
:class:`_Action` chosen by :meth:`_Sender._next_action`.

Over 400 lines: the loop, stream opening and the reader share one lock and
one set of fields, and splitting them would spread that invariant over files.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.client._channel import create_channel, retry_delay
from detector.client._messages import Event
from detector.client._settings import ClientConfig, logger

# Status codes after which the oldest unacknowledged batch is presumed to be
# what the detector refuses: it is dropped (counted as rejected) so that one
# bad batch cannot block the run forever. Every other failure is retried.
_POISON_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


class _Action(enum.Enum):
    """One pass of the sender loop."""

    CONNECT = "connect"  # no open stream and the backoff has passed: open one (replaying)
    SEND = "send"  # rows are due: cut them into batches and write them
    END = "end"  # closing, every batch written: send RunEnd and half-close
    ROTATE = "rotate"  # a flush whose points the detector holds back: half-close
    STOP = "stop"  # aborted, or the run end was acknowledged


@dataclass
class _Pacing:
    """The sender loop's own state (its thread only): flush ticks and backoff."""

    interval: float  # seconds between time-based sends
    next_tick: float  # monotonic time of the next one
    failures: int = 0  # streams in a row that ended badly before any Ack
    retry_at: float = 0.0  # no new stream before this monotonic time


class _Batch:
    """One columnar batch kept until acknowledged."""

    __slots__ = ("max_step", "points", "request", "sent")

    def __init__(self, request: pb.StreamRequest, points: int, max_step: int) -> None:
        self.request = request
        self.points = points
        self.max_step = max_step
        self.sent = False


class _Stream:
    """One ``Stream`` call: its request queue, the call, and how it ended."""

    __slots__ = (
        "acks",
        "call",
        "done",
        "end_sent",
        "error",
        "handled",
        "requests",
        "rotating",
        "sent",
    )

    def __init__(self) -> None:
        self.requests: queue.SimpleQueue[pb.StreamRequest | None] = queue.SimpleQueue()
        self.call: Any = None
        self.done = False  # the response stream has finished (guarded by the run's lock)
        self.error: BaseException | None = None
        self.sent = 0  # requests written (the detector answers each with one Ack)
        self.acks = 0
        self.end_sent = False
        self.rotating = False  # half-closed by a flush, to be replaced
        self.handled = False  # the sender has dealt with its end

    def answered(self) -> bool:
        """Whether every request written so far has had its ``Ack``."""
        return self.acks >= self.sent

    def iterate(self) -> Iterator[pb.StreamRequest]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def code(self) -> grpc.StatusCode | None:
        error = self.error
        if error is None:
            return grpc.StatusCode.OK
        code = getattr(error, "code", None)
        if callable(code):
            with contextlib.suppress(Exception):
                return code()  # type: ignore[no-any-return]
        return None

    def retry_later(self) -> bool:
        """Whether the detector said to retry the refused request later (a rate limit)."""
        return retry_delay(self.error) is not None

    def details(self) -> str:
        error = self.error
        details = getattr(error, "details", None)
        if callable(details):
            with contextlib.suppress(Exception):
                return str(details())
        return repr(error)



class _Sender:
    """The sender's half of a run (see the module docstring)."""

    # Settings and identity, fixed at construction.
    _run_id: str
    _target: str
    _config: ClientConfig
    _credentials: grpc.ChannelCredentials | None
    _metadata: tuple[tuple[str, str], ...]
    _start_message: pb.RunStart
    _resume: bool
    _batch_points: int
    _owner_pid: int
    _callback: Callable[[Event], object] | None
    _warned: set[str]
    # Shared with the training thread, guarded by _lock.
    _lock: threading.Lock
    _cond: threading.Condition
    _rows: list[tuple[int, dict[str, float]]]
    _queued: int  # points in _rows
    _held: int  # points in _rows plus in _inflight
    _max_step: int
    _inflight: list[_Batch]  # sent (or to replay), not yet acknowledged
    _flush_requested: bool
    _closing: bool  # deliver everything, then stop
    _abort: bool  # stop now
    _finished: bool  # the sender has stopped
    _end_delivered: bool
    _stream: _Stream | None
    _started_once: bool  # a stream was opened before: resume on the next
    _reconnecting: bool  # the last stream failed: the next one is a reconnect
    _channel: grpc.Channel | None
    _stub: pb_grpc.PhaseDetectorStub | None
    _sender: threading.Thread | None
    _threads: set[threading.Thread]
    _events: deque[Event]
    _stats: dict[str, int]

    def _warn_once(self, key: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        if key in self._warned:
            logger.debug(message, *args)
            return
        self._warned.add(key)
        logger.log(level, message, *args)

    def _start(self) -> None:
        """Start the sender thread (called with the lock held or before threads exist)."""
        if self._sender is not None or self._finished:
            return
        thread = threading.Thread(
            target=self._sender_main, name=f"phasewatch-sender-{self._run_id}", daemon=True
        )
        self._sender = thread
        self._threads.add(thread)
        thread.start()

    def _sender_main(self) -> None:
        # The channel is made and closed here, never on the training thread: in
        # a forked child a gRPC call may hang, and only this thread would wait.
        channel = None
        try:
            channel = create_channel(
                self._target, credentials=self._credentials, config=self._config
            )
            with self._cond:
                self._channel = channel
                self._stub = pb_grpc.PhaseDetectorStub(channel)
            self._sender_loop()
        except Exception:
            logger.exception("phasewatch run %r: the sender stopped on an error", self._run_id)
        finally:
            with self._cond:
                stream = self._stream
                self._finished = True
                self._channel = None
                self._cond.notify_all()
            if stream is not None:
                stream.requests.put(None)
                if not stream.done and stream.call is not None:
                    with contextlib.suppress(Exception):
                        stream.call.cancel()
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.close()

    def _sender_loop(self) -> None:
        """Batch rows, keep one stream open, end the run on close.

        Each pass decides under the lock what to do next (:meth:`_next_action`,
        waiting on the condition until there is something), claims it while
        still holding the lock, and does it outside the lock.
        """
        interval = self._config.flush_interval
        pacing = _Pacing(interval=interval, next_tick=time.monotonic() + interval)
        while True:
            rows: list[tuple[int, dict[str, float]]] = []
            with self._cond:
                action, wait = self._next_action(pacing)
                while action is None:
                    self._cond.wait(wait)
                    action, wait = self._next_action(pacing)
                if action is _Action.STOP:
                    return
                stream = self._stream
                if action is _Action.SEND:
                    rows, self._rows = self._rows, []
                    self._queued = 0
                elif action is _Action.END:
                    assert stream is not None
                    stream.end_sent = True
                elif action is _Action.ROTATE:
                    assert stream is not None
                    stream.rotating = True
            if action is _Action.CONNECT:
                self._open_stream()
            elif action is _Action.SEND:
                assert stream is not None
                self._send(stream, build_batches(rows, self._batch_points))
            elif action is _Action.END:
                assert stream is not None
                self._finish(stream)
            elif action is _Action.ROTATE:
                assert stream is not None
                stream.requests.put(None)

    def _next_action(self, pacing: _Pacing) -> tuple[_Action | None, float | None]:
        """What the sender does next (lock held): ``(action, None)``, or ``(None, wait)``
        to wait on the condition for ``wait`` seconds (None: until notified).

        In order: stop when aborted; account for a stream that has just ended
        (stop if it delivered the run end); open a stream when there is none
        and the backoff has passed; wait while the current one is being
        half-closed; send rows when a batch is full, the interval ticked, or a
        flush or the close asks; end the run once closing with nothing left to
        send; rotate the stream for a flush the detector holds points of.
        """
        if self._abort:
            return _Action.STOP, None
        now = time.monotonic()
        stream = self._stream
        ended = stream is not None and stream.done and not stream.handled
        if ended and self._stream_ended(stream, now, pacing):  # type: ignore[arg-type]
            return _Action.STOP, None
        if stream is None or stream.done:
            if now >= pacing.retry_at:
                return _Action.CONNECT, None
            return None, pacing.retry_at - now
        if stream.end_sent or stream.rotating:
            return None, None  # until the detector finishes the stream
        tick = now >= pacing.next_tick
        if tick:
            pacing.next_tick = now + pacing.interval
        if self._rows and (
            tick or self._queued >= self._batch_points or self._flush_requested or self._closing
        ):
            return _Action.SEND, None
        if self._closing:
            return _Action.END, None  # every batch is on this stream: end it now
        if self._flush_requested and self._inflight and stream.answered():
            # The detector answered everything yet holds points back (its
            # reorder buffer): a half-close makes it release and acknowledge
            # them; the next stream resumes the run.
            return _Action.ROTATE, None
        return None, max(0.0, pacing.next_tick - now)

    def _stream_ended(self, stream: _Stream, now: float, pacing: _Pacing) -> bool:
        """Account for a stream whose responses have ended (lock held); True when
        it delivered the run end and the sender is done."""
        stream.handled = True
        clean = stream.error is None
        if clean and stream.end_sent and not self._held:
            self._end_delivered = True
            return True
        if clean and stream.rotating:
            pacing.failures, pacing.retry_at = 0, now  # a flush, not a failure
            return False
        self._reconnecting = True
        pacing.failures = (0 if stream.acks else pacing.failures) + 1
        # A rate limit says how long to wait (RetryInfo): no sooner.
        pacing.retry_at = now + max(self._backoff(pacing.failures), retry_delay(stream.error) or 0.0)
        self._stream_lost(stream)
        return False

    def _backoff(self, failures: int) -> float:
        config = self._config
        delay = min(
            config.reconnect_max_backoff,
            config.reconnect_initial_backoff * 2 ** min(failures - 1, 30),
        )
        return delay * random.uniform(0.8, 1.2)

    def _stream_lost(self, stream: _Stream) -> None:
        """Account for a stream that ended without delivering the run end (lock held)."""
        code = stream.code()
        # The detector answers requests in order, so when it has accepted the
        # start, the request it refused is the oldest unacknowledged batch.
        if code in _POISON_CODES and stream.acks and self._inflight and not stream.retry_later():
            bad = self._inflight.pop(0)
            self._held -= bad.points
            self._stats["rejected"] += bad.points
            self._cond.notify_all()
            self._warn_once(
                f"refused-{code}",
                "phasewatch run %r: the detector refused a batch of %d points (%s: %s); "
                "dropping it",
                self._run_id,
                bad.points,
                getattr(code, "name", code),
                stream.details(),
                level=logging.ERROR,
            )
            return
        if code == grpc.StatusCode.CANCELLED and self._abort:
            return
        self._warn_once(
            "lost",
            "phasewatch run %r: stream to %s ended (%s: %s); buffering %d points and "
            "reconnecting",
            self._run_id,
            self._target,
            getattr(code, "name", code),
            stream.details(),
            self._held,
        )

    def _open_stream(self) -> None:
        stream = _Stream()
        start = pb.StreamRequest(start=self._start_message)
        with self._cond:
            if self._abort:
                return
            start.start.resume = self._resume or self._started_once
            if self._reconnecting:
                self._stats["reconnects"] += 1
                self._reconnecting = False
            self._started_once = True
            replay = list(self._inflight)
            for batch in replay:
                self._stats["resent" if batch.sent else "sent"] += batch.points
                batch.sent = True
            stream.sent = 1 + len(replay)
            self._stream = stream
            stub = self._stub
        stream.requests.put(start)
        for batch in replay:
            stream.requests.put(batch.request)
        if replay:
            logger.debug(
                "phasewatch run %r: replaying %d batches", self._run_id, len(replay)
            )
        try:
            assert stub is not None
            stream.call = stub.Stream(
                stream.iterate(), metadata=self._metadata, wait_for_ready=True
            )
        except Exception as exc:  # a closed channel, or a bug in grpc: retry later
            with self._cond:
                stream.error = exc
                stream.done = True
                self._cond.notify_all()
            stream.requests.put(None)
            return
        reader = threading.Thread(
            target=self._read, args=(stream,), name=f"phasewatch-reader-{self._run_id}", daemon=True
        )
        with self._cond:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(reader)
        reader.start()

    def _send(self, stream: _Stream, batches: list[_Batch]) -> None:
        with self._cond:
            self._inflight.extend(batches)
            alive = self._stream is stream and not stream.done
            if alive:
                stream.sent += len(batches)
                for batch in batches:
                    batch.sent = True
                    self._stats["sent"] += batch.points
        if alive:  # else the next stream replays them
            for batch in batches:
                stream.requests.put(batch.request)

    def _finish(self, stream: _Stream) -> None:
        """Every batch is on ``stream`` and the run is closing: end it, half-close.

        The detector answers the end with an ``Ack`` through the run's last
        step, which acknowledges whatever its reorder buffer was holding. A
        forked child only half-closes: the run is its parent's to end.
        """
        with self._cond:
            final_step = max(self._max_step, 0)
        if os.getpid() == self._owner_pid:
            stream.requests.put(pb.StreamRequest(end=pb.RunEnd(final_step=final_step)))
        stream.requests.put(None)

    def _read(self, stream: _Stream) -> None:
        error: BaseException | None = None
        try:
            for response in stream.call:
                which = response.WhichOneof("msg")
                if which == "ack":
                    self._on_ack(stream, response.ack)
                elif which == "event":
                    self._on_event(response.event)
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:
            error = exc
            logger.debug("phasewatch run %r: reader error", self._run_id, exc_info=True)
        finally:
            stream.requests.put(None)  # unblock gRPC's request consumer
            with self._cond:
                stream.error = error
                stream.done = True
                self._cond.notify_all()

    def _on_ack(self, stream: _Stream, ack: pb.Ack) -> None:
        through = ack.through_step
        with self._cond:
            stream.acks += 1
            released = 0
            keep: list[_Batch] = []
            for batch in self._inflight:
                if batch.max_step <= through:
                    released += batch.points
                else:
                    keep.append(batch)
            if released:
                self._inflight = keep
                self._held -= released
                self._stats["acknowledged"] += released
                if not self._held:
                    self._flush_requested = False
            self._stats["rejected"] += ack.rejected
            self._cond.notify_all()

    def _on_event(self, message: pb.PhaseEvent) -> None:
        event = Event.from_proto(message)
        with self._cond:
            self._stats["events"] += 1
            if len(self._events) >= self._config.max_events:
                self._events.popleft()
                self._stats["events_dropped"] += 1
            self._events.append(event)
            self._cond.notify_all()
        callback = self._callback
        if callback is not None:
            try:
                callback(event)
            except Exception:
                if "callback" not in self._warned:
                    self._warned.add("callback")
                    logger.exception("phasewatch run %r: on_event callback failed", self._run_id)


def _make_batch(
    columns: Mapping[str, tuple[list[int], list[float]]], points: int, max_step: int
) -> _Batch:
    request = pb.StreamRequest(
        batch=pb.MetricBatch(
            series=[
                pb.Series(name=name, steps=steps, values=values)
                for name, (steps, values) in columns.items()
            ]
        )
    )
    return _Batch(request, points, max_step)


def build_batches(rows: list[tuple[int, dict[str, float]]], limit: int) -> list[_Batch]:
    """Turn rows into columnar batches of at most ``limit`` points. O(points)."""
    batches: list[_Batch] = []
    columns: dict[str, tuple[list[int], list[float]]] = {}
    points = 0
    max_step = -1
    for step, metrics in rows:
        for name, value in metrics.items():
            column = columns.get(name)
            if column is None:
                column = columns[name] = ([], [])
            column[0].append(step)
            column[1].append(value)
        points += len(metrics)
        if step > max_step:
            max_step = step
        if points >= limit:
            batches.append(_make_batch(columns, points, max_step))
            columns, points, max_step = {}, 0, -1
    if points:
        batches.append(_make_batch(columns, points, max_step))
    return batches
