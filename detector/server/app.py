"""The server process: ``create_server`` (a started gRPC server around an engine)
and ``serve`` (``phasewatch serve``: store, alerts, /metrics, signals, shutdown)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.engine import Engine, EngineConfig
from detector.errors import InvalidArgument
from detector.guard import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_MAX_UNARY,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    ElasticExecutor,
    Guard,
    worker_threads,
)
from detector.server.bus import EventBus
from detector.server.full_collections import FullCollections
from detector.server.servicer import PhaseDetectorServicer

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


def warm_up(config: EngineConfig | None = None) -> int:
    """Run the bundled example run (``detector/data``) through a throwaway engine
    with ``config``'s detector settings (default limits, no store, no
    subscribers), so that the detector's compiled
    kernels are loaded before the first client's batch; returns its points.

    numba loads each kernel from its cache on the first call (~0.5 s of CPU for
    all of them, more on a cold cache). Without this the first runs after a
    start pay it, under the detection lock every stream waits on. A failure is
    logged and ignored: the kernels then load on first use, as before.
    """
    from importlib import resources

    from detector.logfile import read_log

    try:
        with resources.as_file(resources.files("detector.data") / "grok_add_0.jsonl") as path:
            columns = read_log(path)
        engine = Engine(EngineConfig(detector=(config or EngineConfig()).detector))
        engine.ingest("phasewatch-warm-up", columns)
        engine.end_run("phasewatch-warm-up")
        return sum(len(steps) for steps, _ in columns.values())
    except Exception:  # a warm-up must never keep the server from starting
        log.warning("detector warm-up failed; kernels load on first use", exc_info=True)
        return 0


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
    store = open_store(store_url)  # a bad store fails first, with one line
    metrics_server = None
    dispatcher = None
    full_collections = FullCollections()
    try:
        started = time.perf_counter()
        points = warm_up(config)
        log.info("phasewatch detector warmed up (%d points in %.2f s)", points,
                 time.perf_counter() - started)
        # What is loaded by now (modules, compiled kernels: most of the heap's objects)
        # lives as long as the process: out of the collector's full passes, which
        # otherwise stop every thread for 30-120 ms with it in the heap.
        gc.collect()
        gc.freeze()
        # And what runs keep from now on, likewise (see full_collections).
        full_collections.install()
        engine = Engine(config, store=store)
        bus = EventBus()
        if sinks:
            dispatcher = AlertDispatcher(
                sinks, events=engine.events, policy=policy, resend_interval=alert_resend_interval
            )
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
        full_collections.uninstall()
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
