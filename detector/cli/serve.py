"""``phasewatch serve``: run the detector (gRPC, /metrics, alert sinks).

The server stack (engine, store, exporter, alerts) is imported when the
command runs, so that building the parser stays light.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.cli._common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RUNS,
    DEFAULT_MAX_SERIES_PER_RUN,
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_MAX_UNARY,
    DEFAULT_MAX_WORKERS,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    DEFAULT_TARGET,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    _positive_float,
    _positive_int,
    _resend_interval,
    _server_stack,
    env_defaults,
)

if TYPE_CHECKING:
    import grpc


# Flags whose feature lives in detector.server.serve: passed on when serve has
# a parameter of that name, refused with a clear error while it has not.
_SERVE_PASSTHROUGH = {
    "alertmanager_url": "--alertmanager-url",
    "webhook_url": "--webhook-url",
    "auth_token_file": "--auth-token-file",
    "alert_resend_interval": "--alert-resend-interval",
    "alert_runbook_url": "--alert-runbook-url",
    "metrics_retention": "--metrics-retention",
    "otlp": "--otlp",
    "metrics_auth_token_file": "--metrics-auth-token-file",
}


def add_parser(commands: Any) -> None:
    """Register ``serve`` on the subcommands ``commands``."""
    serve = commands.add_parser(
        "serve", help="run the detector (gRPC and Prometheus /metrics)",
        description="Run the detector. Every flag may also come from the environment, as "
        "PHASEWATCH_<FLAG> (--max-runs: PHASEWATCH_MAX_RUNS); a flag on the command line wins.",
    )
    serve.add_argument("--listen", default=DEFAULT_TARGET, metavar="HOST:PORT",
                       help=f"gRPC address (default {DEFAULT_TARGET})")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT", default=DEFAULT_METRICS_LISTEN,
                       help=f"Prometheus /metrics address (default {DEFAULT_METRICS_LISTEN}; "
                       "'' for none)")
    serve.add_argument("--store", metavar="URL",
                       help="sqlite:///PATH or postgresql://... (default: a SQLite file under "
                       "the user's data directory)")
    serve.add_argument("--alertmanager-url", metavar="URL",
                       help="send alerts to Alertmanager (API v2); comma-separated for a cluster")
    serve.add_argument("--webhook-url", metavar="URL",
                       help="POST alerts to this URL in Alertmanager's webhook format")
    serve.add_argument("--alert-resend-interval", type=_resend_interval, metavar="SECONDS",
                       help="re-send active alerts to Alertmanager this often (30-180, default 60)")
    serve.add_argument("--alert-runbook-url", metavar="TEMPLATE",
                       help="runbook_url annotation, e.g. https://wiki/phasewatch#{alertname}")
    serve.add_argument("--metrics-retention", type=_positive_float, metavar="SECONDS",
                       help="keep ended runs in /metrics this long (default 600)")
    serve.add_argument("--auth-token-file", metavar="PATH",
                       help="require a bearer token from this file (one a line; re-read when it "
                       "changes) on every RPC but health checks")
    serve.add_argument("--metrics-auth-token-file", metavar="PATH",
                       help="require a bearer token from this file on /metrics (default: the "
                       "--auth-token-file, if any; 'none': no token, for a metrics port bound "
                       "to a private interface)")
    serve.add_argument("--otlp", action="store_true", default=None,
                       help="also receive OpenTelemetry metrics (OTLP/gRPC) on the gRPC port: "
                       "gauges and sums of a resource with a phasewatch.run_id attribute become "
                       "that run's series (needs the otlp extra)")
    serve.add_argument("--tls-cert", metavar="PATH", help="serve TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", metavar="PATH", help="private key of --tls-cert (PEM)")
    serve.add_argument("--tls-client-ca", metavar="PATH",
                       help="require client certificates signed by this CA (PEM)")
    serve.add_argument("--max-series-per-run", type=_positive_int, metavar="N",
                       help=f"refuse a run's series past this many (RESOURCE_EXHAUSTED; default "
                       f"{DEFAULT_MAX_SERIES_PER_RUN})")
    serve.add_argument("--max-runs", type=_positive_int, metavar="N",
                       help=f"refuse new runs past this many in memory (RESOURCE_EXHAUSTED; "
                       f"default {DEFAULT_MAX_RUNS})")
    serve.add_argument("--max-message-bytes", type=_positive_int, metavar="BYTES",
                       help="refuse larger request messages (RESOURCE_EXHAUSTED; default "
                       f"{DEFAULT_MAX_MESSAGE_BYTES})")
    serve.add_argument("--max-concurrent-rpcs", "--max-concurrent-streams", type=_positive_int,
                       dest="max_concurrent_rpcs", metavar="N",
                       help="open streams at once (Stream, WatchEvents; one worker thread "
                       "each for their whole life); past it, new streams get RESOURCE_EXHAUSTED "
                       f"(default {DEFAULT_MAX_WORKERS}; allow for a few more than the training "
                       "jobs). Unary calls and health checks have capacity of their own")
    serve.add_argument("--max-streams-per-peer", type=_positive_int, metavar="N",
                       help="open streams from one client host (RESOURCE_EXHAUSTED past it; "
                       f"default {DEFAULT_MAX_STREAMS_PER_PEER}; raise it when many jobs "
                       "reach the detector through one proxy or NAT address)")
    serve.add_argument("--max-concurrent-unary", type=_positive_int, metavar="N",
                       dest="max_unary",
                       help=f"unary calls (Log, queries) at once (default {DEFAULT_MAX_UNARY})")
    serve.add_argument("--stream-idle-timeout", type=_positive_float, metavar="SECONDS",
                       help="close a Stream that sends nothing for this long (default "
                       f"{DEFAULT_STREAM_IDLE_TIMEOUT:g}; the SDK reconnects when it next logs)")
    serve.add_argument("--max-points-per-second", type=_positive_float, metavar="N",
                       help="refuse a run's batches beyond this rate (RESOURCE_EXHAUSTED, with a "
                       "retry delay; a token bucket; default: no limit)")
    serve.add_argument("--points-burst", type=_positive_float, metavar="N",
                       help="bucket size of --max-points-per-second in points (default: one "
                       "second's worth)")
    serve.add_argument("--grace", type=_positive_float, default=5.0, metavar="SECONDS",
                       help="on shutdown, let RPCs finish for this long (default 5)")
    serve.set_defaults(handler=cmd_serve)
    env_defaults(serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import inspect

    options: dict[str, Any] = {"grace": args.grace}
    if args.otlp:
        from detector.otlp import otlp_grpc

        if otlp_grpc is None:
            raise CliError("--otlp needs opentelemetry-proto: pip install 'phasewatch[otlp]'",
                           EXIT_USAGE)
    credentials = _server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    if credentials is not None:
        options["credentials"] = credentials
    limits = {
        name: getattr(args, name)
        for name in ("max_series_per_run", "max_runs", "max_points_per_second")
        if getattr(args, name) is not None
    }
    if args.points_burst is not None:
        if args.max_points_per_second is None:
            raise CliError("--points-burst needs --max-points-per-second", EXIT_USAGE)
        limits["points_burst"] = args.points_burst
    if args.max_message_bytes is not None:
        options["max_message_bytes"] = args.max_message_bytes
    if args.max_concurrent_rpcs is not None:
        options["max_workers"] = args.max_concurrent_rpcs
    with _server_stack("serve"):
        from detector.engine import EngineConfig
        from detector.server import serve
    accepted = inspect.signature(serve).parameters
    for name, flag in _SERVE_PASSTHROUGH.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in accepted:
            raise CliError(f"{flag} is not supported yet", EXIT_USAGE)
        options[name] = value
    for name in ("max_streams_per_peer", "max_unary", "stream_idle_timeout"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if limits:
        options["config"] = EngineConfig(**limits)
    try:
        serve(args.listen, args.metrics_listen or None, args.store, **options)
    except OSError as error:  # cannot listen: port taken, bad address, unknown host
        strerror = error.strerror or ""
        said = strerror if strerror.startswith("cannot") else str(error)
        message = said if said.startswith("cannot") else (
            f"cannot start the detector: {error.strerror or error}"
        )
        raise CliError(message) from None
    return EXIT_OK


def _server_credentials(
    cert: str | None, key: str | None, client_ca: str | None
) -> grpc.ServerCredentials | None:
    if cert is None and key is None:
        if client_ca is not None:
            raise CliError("--tls-client-ca needs --tls-cert and --tls-key", EXIT_USAGE)
        return None
    if cert is None or key is None:
        raise CliError("--tls-cert and --tls-key go together", EXIT_USAGE)
    import grpc

    ca = _read_bytes(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials(
        [(_read_bytes(key, "--tls-key"), _read_bytes(cert, "--tls-cert"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _read_bytes(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CliError(f"{flag} {path}: {error.strerror or error}", EXIT_USAGE) from None

