"""The ``phasewatch`` command line: serve, analyze, replay, query, watch, demo.

Exit codes: 0 success (and Ctrl-C in ``watch``); 1 a runtime failure (no
detector listening, the detector failed, cannot listen); 2 a usage or data
mistake (bad flags, a bad log file, an unknown run, a bad request); 130
interrupted. Every failure is one line on stderr, ``phasewatch: <problem>``,
never a traceback.

One module per command (``serve``, ``analyze``, ``stream``: replay and follow,
``query``: status, runs, restart and watch, ``health``, ``demo``), each with
its parser and its handler. Building the parser imports only them and
:mod:`detector.cli._common` (stdlib and the core's plain types); grpc, the SDK,
the engine and the server are imported by the handler that runs, so
``phasewatch --help``, ``status`` and ``runs`` start fast and a client install
(no [server] extra) can run the client commands.
"""

from __future__ import annotations

import os

# Before numpy is first imported: one BLAS thread per process. With a pool per
# RPC thread the SVDs oversubscribe the cores (3x slower on 2 cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import detector
from detector.cli import analyze, demo, health, query, serve, stream
from detector.cli._common import (
    DEFAULT_BATCH_POINTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RUNS,
    DEFAULT_MAX_SERIES_PER_RUN,
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_MAX_UNARY,
    DEFAULT_MAX_WORKERS,
    DEFAULT_STREAM_IDLE_TIMEOUT,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    ENV_PREFIX,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    CliError,
    _event_kind,
    _fail,
    _positive_float,
    env_defaults,
    env_variable,
)
from detector.cli.analyze import run_id_for
from detector.errors import PhasewatchError

if TYPE_CHECKING:
    import grpc

__all__ = [
    "DEFAULT_BATCH_POINTS", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_MAX_RUNS",
    "DEFAULT_MAX_SERIES_PER_RUN", "DEFAULT_MAX_STREAMS_PER_PEER", "DEFAULT_MAX_UNARY",
    "DEFAULT_MAX_WORKERS", "DEFAULT_STREAM_IDLE_TIMEOUT", "DEFAULT_TARGET", "ENV_PREFIX",
    "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "CliError", "_event_kind",
    "build_parser", "env_defaults", "env_variable", "main", "rpc_problem", "run_id_for",
]


def rpc_problem(
    error: grpc.RpcError, target: str, timeout: float | None = None, *, tls: bool = False
) -> CliError:
    """The one-line message and exit code for a failed RPC (see :mod:`detector.cli._rpc`;
    imported on call, so that importing the CLI does not import grpc)."""
    from detector.cli._rpc import rpc_problem as problem

    return problem(error, target, timeout, tls=tls)


# --- entry point -----------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``phasewatch`` command; returns the exit code."""
    try:
        parser = build_parser()
    except CliError as error:  # a bad PHASEWATCH_<FLAG> switch
        return _fail(error.message, error.code)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors (already printed)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except CliError as error:
        return _fail(error.message, error.code)
    except PhasewatchError as error:  # LogFileError, InvalidArgument, ...: the user's to fix
        return _fail(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error. Point stdout at devnull
        # so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; O(flags), imports no command's dependencies."""
    parser = argparse.ArgumentParser(
        prog="phasewatch",
        description="Phase-transition detection for ML training runs.",
    )
    parser.add_argument("--version", action="version", version=f"phasewatch {detector.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_options()
    serve.add_parser(commands)
    analyze.add_parser(commands)
    stream.add_replay(commands, client)
    stream.add_follow(commands, client)
    query.add_status(commands, client)
    query.add_runs(commands, client)
    query.add_restart(commands, client)
    query.add_watch(commands, client)
    demo.add_parser(commands)
    health.add_parser(commands)
    return parser


def _client_options() -> argparse.ArgumentParser:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--target",
        default=os.environ.get("PHASEWATCH_TARGET") or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the detector's gRPC address (default $PHASEWATCH_TARGET, else {DEFAULT_TARGET})",
    )
    client.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of a query (default {DEFAULT_TIMEOUT:g})",
    )
    client.add_argument("--json", action="store_true", help="print JSON instead of text")
    client.add_argument("--token-file", metavar="PATH",
                        default=os.environ.get("PHASEWATCH_TOKEN_FILE"),
                        help="send the bearer token in this file (default $PHASEWATCH_TOKEN_FILE, "
                        "else the token in $PHASEWATCH_TOKEN, if set)")
    client.add_argument("--tls", action="store_true",
                        help="connect with TLS, verifying the detector against the system's roots")
    client.add_argument("--tls-ca", metavar="PATH",
                        help="connect with TLS, verifying the detector against this CA (PEM)")
    client.add_argument("--tls-client-cert", metavar="PATH",
                        help="client certificate (PEM) for a detector that requires mutual TLS")
    client.add_argument("--tls-client-key", metavar="PATH", help="private key of --tls-client-cert")
    return client


if __name__ == "__main__":
    sys.exit(main())
