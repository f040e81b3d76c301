"""The ``/metrics`` HTTP endpoint: content negotiation, the bearer token, the server."""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import ThreadingWSGIServer, gzip_accepted
from prometheus_client.registry import Collector

from detector.engine import Engine
from detector.errors import InvalidArgument
from detector.exporter.collector import CONTENT_TYPE_OPENMETRICS, DEFAULT_RETENTION
from detector.exporter.text import MetricsExposition

if TYPE_CHECKING:
    from detector.alerts import AlertDispatcher
    from detector.auth import BearerTokenInterceptor


def wants_openmetrics(accept: str) -> bool:
    """Whether an ``Accept`` header asks for OpenMetrics 1.x, as prometheus_client's
    ``choose_encoder`` reads it (the first acceptable entry; no q-value ordering).

    >>> wants_openmetrics("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    True
    >>> wants_openmetrics("text/plain;version=0.0.4"), wants_openmetrics("")
    (False, False)
    """
    for entry in (accept or "").split(","):
        kind, *params = (part.strip() for part in entry.split(";"))
        if kind == "application/openmetrics-text":
            version = next((p.partition("=")[2] for p in params if p.startswith("version=")), "")
            return not version or version.startswith("1.")
        if kind == "text/plain":
            return False
    return False


def make_metrics_app(
    exposition: MetricsExposition, *, auth: BearerTokenInterceptor | None = None
) -> Callable[..., list[bytes]]:
    """A WSGI app serving ``exposition``, with prometheus_client's ``make_wsgi_app``
    behaviour (any GET path, ``name[]`` filters, gzip when accepted, OPTIONS, 405,
    OpenMetrics when asked for). With ``auth``, every request needs one of its
    bearer tokens (401 otherwise)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        if auth is not None and not _authorized(auth, environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [
                ("WWW-Authenticate", 'Bearer realm="phasewatch"'),
                ("Content-Type", "text/plain; charset=utf-8"),
            ])
            return [b"a bearer token is required (Authorization: Bearer ...)\n"]
        if method == "OPTIONS":
            status, headers, output = "200 OK", [("Allow", "OPTIONS,GET")], b""
        elif method != "GET":
            status, headers = "405 Method Not Allowed", [("Allow", "OPTIONS,GET")]
            output = f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()
        elif environ.get("PATH_INFO") == "/favicon.ico":
            status, headers, output = "200 OK", [], b""
        else:
            params = parse_qs(environ.get("QUERY_STRING", ""))
            open_metrics = wants_openmetrics(environ.get("HTTP_ACCEPT", ""))
            output = exposition.render(params.get("name[]"), open_metrics=open_metrics)
            content_type = CONTENT_TYPE_OPENMETRICS if open_metrics else CONTENT_TYPE_PLAIN_0_0_4
            status, headers = "200 OK", [("Content-Type", content_type)]
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                # Level 1: a tenth of the size at a fraction of level 9's time.
                output = gzip.compress(output, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
        start_response(status, headers)
        return [output]

    return app


def _authorized(auth: BearerTokenInterceptor, header: str | None) -> bool:
    from detector.auth import bearer_token

    token = bearer_token([("authorization", header)] if header else None)
    return token is not None and auth.valid(token)


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _SilentHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def start_metrics_server(
    engine: Engine,
    listen: str = "127.0.0.1:9109",
    registry: CollectorRegistry | None = None,
    *,
    alerts: AlertDispatcher | None = None,
    retention: float = DEFAULT_RETENTION,
    collectors: Collection[Collector] = (),
    auth: BearerTokenInterceptor | None = None,
) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread; returns (server, port).

    Port 0 picks a free port, which is returned. The engine's families (with
    ``alerts``' counters and the ended-run ``retention``) come from a
    :class:`MetricsExposition`; ``registry`` holds the others (default: a new
    one with the process, platform and GC collectors), plus ``collectors`` (the
    gRPC server's metrics). With ``auth``, scrapes need one of its bearer
    tokens. One thread per request, as prometheus_client's own server. Stop
    with ``server.shutdown(); server.server_close()``.
    """
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # each registers itself
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    exposition = MetricsExposition(engine, alerts=alerts, retention=retention, registry=registry)
    # Once now, in both formats: what the first render imports and builds (the build
    # info's versions, the registry's collectors, OpenMetrics' encoder) is not paid by
    # the first scrape (~30-40 ms of it in process).
    exposition.render()
    exposition.render(open_metrics=True)
    host, port = _split_listen(listen)
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, sockaddr = info[0][0], info[0][4]

    class Server(ThreadingWSGIServer):
        address_family = family  # IPv6 listen addresses too

    server = make_server(
        str(sockaddr[0]), port, make_metrics_app(exposition, auth=auth), Server,
        handler_class=_SilentHandler
    )
    threading.Thread(target=server.serve_forever, name="phasewatch-metrics", daemon=True).start()
    return server, server.server_port
