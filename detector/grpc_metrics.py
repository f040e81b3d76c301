"""gRPC server metrics for ``/metrics``: RPCs started and handled, and handling time.

The names and labels are go-grpc-prometheus's (``grpc_server_started_total``,
``grpc_server_handled_total``, ``grpc_server_handling_seconds``, labelled
``grpc_type``, ``grpc_service``, ``grpc_method`` and, for handled RPCs,
``grpc_code``), which existing dashboards and alert rules already query.

:class:`GrpcServerMetrics` is a server interceptor: put it first in the list,
so that it also counts what later interceptors answer (``UNAUTHENTICATED``).
An RPC's status code is read from its context when its handler ends (a
handler that aborts or sets a code), ``OK`` when it returned normally,
``UNKNOWN`` when it raised without one; an RPC that terminates before its
handler ended, or whose handler ended after the client left (a Stream's
request iterator raises on a cancel, and the handler returns), is
``CANCELLED`` or ``DEADLINE_EXCEEDED``.
Methods outside the server's services are counted as
``grpc_service="unknown", grpc_method="unknown"`` (their names come from
clients: unbounded label values). O(1) per RPC.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# Handling time: from sub-millisecond queries to streams that stay open for hours.
HANDLING_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 600.0, 3600.0, 86400.0)


class _Call:
    """One RPC's end, recorded once: when its handler returns or raises (before
    the client sees the status), else when the RPC terminates without the
    handler having ended (the client cancelled, or its deadline passed)."""

    __slots__ = ("metrics", "labels", "start", "context", "_lock", "_done")

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str],
                 context: grpc.ServicerContext) -> None:
        self.metrics, self.labels, self.context = metrics, labels, context
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._done = False

    def finished(self, raised: bool) -> None:
        code = _context_code(self.context)  # what the handler set, or aborted with
        if code is None and not _active(self.context):
            # The client left and the handler ended because of it (a Stream's request
            # iterator raises on a cancel): the RPC was cancelled, whichever of this
            # and the termination callback runs first.
            self.terminated()
            return
        if code is None:
            code = grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
        self._record(code)

    def terminated(self) -> None:
        remaining = _time_remaining(self.context)
        self._record(grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                     else grpc.StatusCode.CANCELLED)

    def _record(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self.metrics.handled.labels(*self.labels, code.name).inc()
        self.metrics.seconds.labels(*self.labels).observe(time.perf_counter() - self.start)


def _served_methods() -> frozenset[str]:
    """``service/Method`` of every method the detector serves (from the descriptors)."""
    from grpc_health.v1 import health_pb2

    from detector._proto.phasewatch.v1 import detector_pb2

    modules: list[Any] = [detector_pb2, health_pb2]
    try:
        from grpc_reflection.v1alpha import reflection_pb2

        modules.append(reflection_pb2)
    except ImportError:  # reflection is optional to the metrics
        pass
    return frozenset(
        f"{service.full_name}/{method.name}"
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    )


def _context_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:  # older grpcio, or a context that cannot say
        return None
    if isinstance(code, int):  # set_code with a number
        return next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return code if isinstance(code, grpc.StatusCode) else None


def _active(context: grpc.ServicerContext) -> bool:
    """Whether the RPC is still on (a handler that ends normally ends before its status
    is sent, so it is); True where the context cannot say."""
    try:
        return bool(context.is_active())
    except Exception:
        return True


def _time_remaining(context: grpc.ServicerContext) -> float | None:
    try:
        return context.time_remaining()
    except Exception:
        return None


class GrpcServerMetrics(grpc.ServerInterceptor):
    """Counts every RPC of the server it intercepts into ``registry``."""

    def __init__(
        self, registry: CollectorRegistry | None = None, known_methods: frozenset[str] | None = None
    ) -> None:
        self.known = known_methods if known_methods is not None else _served_methods()
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server.",
                               labels, registry=self.registry)
        self.handled = Counter("grpc_server_handled",
                               "RPCs completed on the server, whatever their status code.",
                               [*labels, "grpc_code"], registry=self.registry)
        self.seconds = Histogram("grpc_server_handling_seconds",
                                 "Time from an RPC's start to its end (streams: their whole life).",
                                 labels, buckets=HANDLING_BUCKETS, registry=self.registry)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED; not labelled by name
        name = (handler_call_details.method or "").lstrip("/")
        service, _, method = name.rpartition("/") if name in self.known else ("unknown", "", "unknown")
        if handler.request_streaming and handler.response_streaming:
            kind, behavior, wrap = "bidi_stream", handler.stream_stream, self._streaming
            make = grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            kind, behavior, wrap = "client_stream", handler.stream_unary, self._unary
            make = grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            kind, behavior, wrap = "server_stream", handler.unary_stream, self._streaming
            make = grpc.unary_stream_rpc_method_handler
        else:
            kind, behavior, wrap = "unary", handler.unary_unary, self._unary
            make = grpc.unary_unary_rpc_method_handler
        return make(
            wrap(behavior, (kind, service, method)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _begin(self, labels: tuple[str, str, str], context: grpc.ServicerContext) -> _Call:
        self.started.labels(*labels).inc()
        call = _Call(self, labels, context)
        if not context.add_callback(call.terminated):
            call.terminated()  # already over
        return call

    def _unary(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            call = self._begin(labels, context)
            try:
                response = behavior(request, context)
            except BaseException:
                call.finished(raised=True)
                raise
            call.finished(raised=False)
            return response

        return handle

    def _streaming(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._begin(labels, context)
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # closed by gRPC: the client left
                raise
            except BaseException:
                call.finished(raised=True)
                raise
            call.finished(raised=False)

        return handle
