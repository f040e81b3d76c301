"""What keeps one client from denying service to the others (issue 18).

:class:`Guard` is a server interceptor on the ``PhaseDetector`` methods:

- **Capacity.** Open streams (``Stream``, ``WatchEvents``) are capped in all
  (``max_streams``) and per client address (``max_streams_per_peer``); unary
  calls have their own cap (``max_unary``). Past a cap the call gets
  ``RESOURCE_EXHAUSTED`` at once. Health checks and reflection are not
  counted: with the worker threads sized as caps plus a reserve
  (:func:`worker_threads`), a health check always finds a thread however many
  streams are open.
- **Idle streams.** A ``Stream`` that sends nothing for ``stream_idle_timeout``
  seconds is cancelled (the client sees ``CANCELLED``; the SDK reconnects when
  it next has points). Without this, streams that send ``start`` and nothing
  else held their slot forever.
- **Unparseable bodies.** Requests reach the servicer as bytes and are parsed
  here: a body that is not a valid message is ``INVALID_ARGUMENT``, counted
  (``Guard.unparseable``) and logged once per burst, without the traceback
  grpcio's own deserialisation failure path writes for each one.

:class:`ElasticExecutor` runs the RPCs: threads are started when needed up to
a maximum and end after ``idle_seconds`` without work, so the threads (and
their stacks) of 2 000 streams are given back once the streams close, which a
``ThreadPoolExecutor`` never does; the heap they freed is trimmed every 64
ends, and they share two malloc arenas (:func:`limit_malloc_arenas`) so that RSS under
sustained mixed load stays flat.

Costs: O(1) per call and per stream message under one lock; the idle
watchdog is one thread scanning the open streams once a second, O(streams).

About 450 lines on purpose: the caps, the idle watchdog and the executor
share one lock and one count of open streams, and splitting them would put
that invariant across modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from detector.errors import InvalidArgument, ResourceExhausted
from detector.status import abort

log = logging.getLogger("phasewatch.server")

DEFAULT_MAX_STREAMS = 256
DEFAULT_MAX_STREAMS_PER_PEER = 64
DEFAULT_MAX_UNARY = 64
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0
# Threads beyond the caps: health checks, reflection and quick refusals.
RESERVE_THREADS = 16
# glibc malloc arenas the RPC threads share (limit_malloc_arenas).
MALLOC_ARENAS = 2
# A burst of unparseable bodies is logged once, then summarised at most this often.
_BAD_BODY_LOG_INTERVAL = 10.0


def worker_threads(max_streams: int, max_unary: int) -> int:
    """Worker threads for these caps: every capped call and the reserve at once."""
    return max_streams + max_unary + RESERVE_THREADS


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.5:41234`` -> ``ipv4:10.0.0.5``: one client host, whatever its port."""
    head, sep, port = peer.rpartition(":")
    return head if sep and port.isdigit() else peer


class ElasticExecutor(futures.Executor):
    """Up to ``max_threads`` threads, started on demand, ending after ``idle_seconds`` idle.

    >>> pool = ElasticExecutor(4, idle_seconds=0.05)
    >>> pool.submit(sum, [1, 2]).result()
    3
    >>> pool.shutdown()
    """

    def __init__(self, max_threads: int, *, idle_seconds: float = 30.0,
                 thread_name_prefix: str = "phasewatch-rpc",
                 malloc_arenas: int | None = MALLOC_ARENAS) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        if malloc_arenas is not None:
            # Before the threads exist: they share these arenas (see limit_malloc_arenas).
            limit_malloc_arenas(malloc_arenas)
        self.max_threads = max_threads
        self.idle_seconds = idle_seconds
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[tuple[futures.Future, Callable, tuple, dict] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for work that no submit has counted on yet
        self._serial = 0
        self._ended = 0
        self._shutdown = False

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._work.put((future, fn, args, kwargs))
            if self._idle:
                self._idle -= 1  # that waiting thread takes it
                return future
            if self._threads >= self.max_threads:
                return future  # queued until a thread is free
            self._threads += 1
            self._serial += 1
            name = f"{self._prefix}_{self._serial}"
        threading.Thread(target=self._worker, name=name, daemon=True).start()
        return future

    def _worker(self) -> None:
        while True:
            try:
                item = self._work.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # nobody counted on this thread: end it
                        self._idle -= 1
                        self._threads -= 1
                        ended = self._ended = self._ended + 1
                    else:
                        continue  # a submit counted on it: its work is on the way
                if ended % _TRIM_EVERY == 0:
                    _trim_heap()
                return
            if item is None:
                with self._lock:
                    self._threads -= 1
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as error:  # handed to whoever waits on the future
                    future.set_exception(error)
            del item, future, fn, args, kwargs  # nothing of the call kept while idle
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = self._threads
        for _ in range(threads):
            self._work.put(None)


# After this many idle threads have ended, give freed heap back to the system.
_TRIM_EVERY = 64


def _libc() -> Any:
    """glibc, or None where there is none (musl, macOS): the heap tuning is then skipped."""
    global _libc_handle
    if _libc_handle is None:
        try:
            import ctypes

            handle = ctypes.CDLL("libc.so.6")
            _libc_handle = handle if hasattr(handle, "malloc_trim") else False
        except OSError:
            _libc_handle = False
    return _libc_handle or None


_libc_handle: Any = None


def _trim_heap() -> None:
    """glibc's malloc_trim(0): each thread that served a stream left freed memory
    in its malloc arena, which glibc keeps; 2 000 streams left ~80 MB of it. A
    no-op where there is no glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_M_ARENA_MAX = -8  # mallopt's parameter number


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let this process's threads share at most ``arenas`` glibc malloc arenas.

    By default glibc gives threads up to 8 arenas a core, and each arena keeps
    the high-water mark of what its threads allocated at once: under a fuzz of
    mixed calls (checkpoints, label sets, timelines of growing runs) the server's
    RSS kept rising by the peak of each arena, 279 -> 324 MiB (max 349) from the
    20 000th to the 100 000th call; with two arenas it stayed within 267-286 MiB
    (``benchmarks/fuzz.py``; issue 18). The GIL serialises the threads' Python
    work anyway, so fewer arenas cost no measurable throughput (660 vs 720
    calls/s, same run). Takes effect for arenas created from now on; an operator's
    ``MALLOC_ARENA_MAX`` wins. Returns whether the limit was set.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, arenas))


class _OpenStream:
    __slots__ = ("context", "last", "method", "peer", "timed_out")

    def __init__(self, context: grpc.ServicerContext, method: str, peer: str) -> None:
        self.context = context
        self.method = method
        self.peer = peer
        self.last = time.monotonic()
        self.timed_out = False


class Guard(grpc.ServerInterceptor):
    """Caps, idle timeout and request parsing for the methods of ``service`` (see module)."""

    def __init__(
        self,
        service: str,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
        max_unary: int = DEFAULT_MAX_UNARY,
        stream_idle_timeout: float | None = DEFAULT_STREAM_IDLE_TIMEOUT,
    ) -> None:
        for name, value in (("max_streams", max_streams), ("max_unary", max_unary),
                            ("max_streams_per_peer", max_streams_per_peer)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if stream_idle_timeout is not None and stream_idle_timeout <= 0:
            raise ValueError(f"stream_idle_timeout must be positive, got {stream_idle_timeout}")
        self._prefix = f"/{service}/"
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self.max_unary = max_unary
        self.stream_idle_timeout = stream_idle_timeout
        self._lock = threading.Lock()
        self._streams: dict[int, _OpenStream] = {}
        self._per_peer: dict[str, int] = {}
        self._unary = 0
        self.refused = 0  # calls answered RESOURCE_EXHAUSTED by a cap
        self.idle_closed = 0
        self.unparseable = 0
        self._bad_logged_at = -_BAD_BODY_LOG_INTERVAL
        self._bad_since_log = 0
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        """Stop the idle watchdog (the server is stopping)."""
        self._closed.set()

    # --- the interceptor ------------------------------------------------------

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self._prefix):
            return handler
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        name = method[len(self._prefix):]
        if handler.request_streaming and handler.response_streaming:
            behaviour = handler.stream_stream

            def stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                with self._stream_slot(context, name) as stream:
                    yield from behaviour(self._parsed(requests, parse, stream, context), context)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=None, response_serializer=serialize)
        if handler.response_streaming:
            behaviour = handler.unary_stream

            def unary_stream(request: bytes, context: grpc.ServicerContext) -> Any:
                message = self._parse(request, parse, context, name)
                with self._stream_slot(context, name, idle=False):
                    yield from behaviour(message, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=None, response_serializer=serialize)
        if handler.request_streaming:  # no such method in the service today
            return handler
        behaviour = handler.unary_unary

        def unary_unary(request: bytes, context: grpc.ServicerContext) -> Any:
            message = self._parse(request, parse, context, name)
            with self._unary_slot(context, name):
                return behaviour(message, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=None, response_serializer=serialize)

    # --- capacity -------------------------------------------------------------

    @contextlib.contextmanager
    def _unary_slot(self, context: grpc.ServicerContext, name: str) -> Iterator[None]:
        with self._lock:
            full = self._unary >= self.max_unary
            if not full:
                self._unary += 1
            else:
                self.refused += 1
        if full:
            abort(context, ResourceExhausted(
                f"the detector is serving {self.max_unary} calls already; retry"))
        try:
            yield
        finally:
            with self._lock:
                self._unary -= 1

    @contextlib.contextmanager
    def _stream_slot(self, context: grpc.ServicerContext, name: str,
                     idle: bool = True) -> Iterator[_OpenStream]:
        peer = peer_host(context.peer() or "")
        stream = _OpenStream(context, name, peer)
        problem = None
        with self._lock:
            if len(self._streams) >= self.max_streams:
                problem = (f"the detector has {self.max_streams} streams open already "
                           "(--max-concurrent-streams); retry later")
            elif self._per_peer.get(peer, 0) >= self.max_streams_per_peer:
                problem = (f"{peer} has {self.max_streams_per_peer} streams open already "
                           "(--max-streams-per-peer); close some")
            if problem is None:
                self._streams[id(stream)] = stream
                self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
                if not idle:
                    stream.last = float("inf")  # a watch waits for events: never idle
            else:
                self.refused += 1
        if problem is not None:
            abort(context, ResourceExhausted(problem))
        if idle:
            self._start_watchdog()
        try:
            yield stream
        finally:
            with self._lock:
                del self._streams[id(stream)]
                left = self._per_peer[peer] - 1
                if left:
                    self._per_peer[peer] = left
                else:
                    del self._per_peer[peer]

    # --- idle streams ---------------------------------------------------------

    def _start_watchdog(self) -> None:
        """Run the idle watchdog while streams are open (it ends when none are)."""
        if self.stream_idle_timeout is None:
            return
        with self._lock:
            if self._watchdog is not None:
                return
            watchdog = self._watchdog = threading.Thread(
                target=self._watch_idle, name="phasewatch-idle-streams", daemon=True)
        watchdog.start()

    def _watch_idle(self) -> None:
        timeout = self.stream_idle_timeout
        assert timeout is not None
        period = min(1.0, timeout / 4)
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._lock:
                if not self._streams:
                    self._watchdog = None
                    return
                idle = [s for s in self._streams.values()
                        if not s.timed_out and now - s.last > timeout]
                for stream in idle:
                    stream.timed_out = True
                self.idle_closed += len(idle)
            for stream in idle:
                log.info("closing a %s stream from %s: nothing received for %.0f s",
                         stream.method, stream.peer, timeout)
                stream.context.cancel()

    # --- parsing --------------------------------------------------------------

    def _parsed(self, requests: Iterator[bytes], parse: Callable[[bytes], Any] | None,
                stream: _OpenStream, context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            stream.last = time.monotonic()
            if parse is None:
                yield request
                continue
            try:
                message = parse(request)
            except (DecodeError, ValueError, TypeError, RuntimeError) as error:
                self._bad_body(stream.method, stream.peer, error)
                # Raised inside the servicer's loop: its error table makes it the status.
                raise InvalidArgument(
                    f"a {stream.method} message is not a valid message ({len(request)} bytes)"
                ) from None
            yield message

    def _parse(self, request: bytes, parse: Callable[[bytes], Any] | None,
               context: grpc.ServicerContext, name: str) -> Any:
        if parse is None:
            return request
        try:
            return parse(request)
        except (DecodeError, ValueError, TypeError, RuntimeError) as error:
            self._bad_body(name, context.peer() or "?", error)
            abort(context, InvalidArgument(
                f"the {name} request is not a valid message ({len(request)} bytes)"))
            raise  # not reached: abort raises

    def _bad_body(self, name: str, peer: str, error: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self.unparseable += 1
            self._bad_since_log += 1
            if now - self._bad_logged_at < _BAD_BODY_LOG_INTERVAL:
                return
            count, self._bad_since_log = self._bad_since_log, 0
            self._bad_logged_at = now
        log.warning("%d unparseable request bodies since the last report (%d in all; last: "
                    "%s from %s: %s); each answered INVALID_ARGUMENT", count, self.unparseable,
                    name, peer, error)
