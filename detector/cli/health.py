"""``phasewatch health``: a gRPC health check for probes (starts fast: it runs
every few seconds)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from detector.cli._common import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    EXIT_OK,
    EXIT_RUNTIME,
    _positive_float,
    _print_json,
    env_defaults,
)

DETECTOR_SERVICE = "phasewatch.v1.PhaseDetector"


def add_parser(commands: Any) -> None:
    """Register ``health`` on the subcommands ``commands``."""
    health = commands.add_parser(
        "health", help="ask a detector's gRPC health service; exit 0 when SERVING, else 1",
        description="A gRPC health check (grpc.health.v1), for container HEALTHCHECKs and "
        "Kubernetes exec probes (the native gRPC probe cannot speak TLS). Every flag may come "
        "from the environment as PHASEWATCH_<FLAG>; without --target/$PHASEWATCH_TARGET it asks "
        "the local address of $PHASEWATCH_LISTEN, the variable `phasewatch serve` listens on.",
    )
    health.add_argument("--target", default=_local_target(os.environ.get("PHASEWATCH_LISTEN")),
                        metavar="HOST:PORT",
                        help=f"the detector's gRPC address (default: $PHASEWATCH_LISTEN's port on "
                        f"this host, else {DEFAULT_TARGET})")
    health.add_argument("--service", default=DETECTOR_SERVICE, metavar="NAME",
                        help=f"the service to ask about (default {DETECTOR_SERVICE}; '' for the "
                        "whole server)")
    health.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT,
                        metavar="SECONDS", help=f"deadline (default {DEFAULT_TIMEOUT:g})")
    health.add_argument("--token-file", metavar="PATH",
                        help="send the bearer token in this file (health needs none; a proxy may)")
    health.add_argument("--tls", action="store_true",
                        help="connect with TLS, verifying the detector against the system's roots")
    health.add_argument("--tls-ca", metavar="PATH",
                        help="connect with TLS, verifying the detector against this CA (PEM)")
    health.add_argument("--tls-client-cert", metavar="PATH",
                        help="client certificate (PEM) for a detector that requires mutual TLS")
    health.add_argument("--tls-client-key", metavar="PATH", help="private key of --tls-client-cert")
    health.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the detector's certificate must carry, when --target is "
                        "an address it is not issued for (127.0.0.1 in a pod)")
    health.add_argument("--json", action="store_true", help="print JSON instead of text")
    health.set_defaults(handler=cmd_health)
    env_defaults(health)


def _local_target(listen: str | None) -> str:
    """Where a probe in the same host or pod reaches a detector listening on ``listen``.

    >>> _local_target("0.0.0.0:50051"), _local_target("[::]:7000"), _local_target(None)
    ('127.0.0.1:50051', '[::1]:7000', '127.0.0.1:50051')
    >>> _local_target("10.0.3.7:50051")
    '10.0.3.7:50051'
    """
    if not listen:
        return DEFAULT_TARGET
    host, sep, port = listen.rpartition(":")
    if not sep:
        return DEFAULT_TARGET
    if host in ("", "0.0.0.0", "*"):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"[::1]:{port}"
    return listen


def cmd_health(args: argparse.Namespace) -> int:
    # grpcio-health-checking is a dependency of the client install too.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from detector.cli._rpc import _channel, rpc_problem

    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    with _channel(args, options) as (channel, tls):
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.NOT_FOUND:
                status = "SERVICE_UNKNOWN"  # the server does not know that service
            else:
                problem = rpc_problem(error, args.target, args.timeout, tls=tls)
                status = "UNREACHABLE"
                print(f"phasewatch: {problem.message}", file=sys.stderr)
    service = args.service or "(server)"
    if args.json:
        _print_json({"target": args.target, "service": args.service, "status": status})
    else:
        print(f"{args.target} {service}: {status}")
    return EXIT_OK if status == "SERVING" else EXIT_RUNTIME
