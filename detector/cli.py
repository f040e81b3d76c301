"""The ``phasewatch`` command line: serve, analyze, replay, query, watch, demo.

Exit codes: 0 success (and Ctrl-C in ``watch``); 1 a runtime failure (no
detector listening, the detector failed, cannot listen); 2 a usage or data
mistake (bad flags, a bad log file, an unknown run, a bad request); 130
interrupted. Every failure is one line on stderr, ``phasewatch: <problem>``,
never a traceback.
"""

from __future__ import annotations

import os

# Before numpy is first imported: one BLAS thread per process. With a pool per
# RPC thread the SVDs oversubscribe the cores (3x slower on 2 cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc

import detector
from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.client import (
    ClientConfigError,
    bearer_interceptor,
    list_runs_pages,
    read_token,
    timeline_pages,
    tls_credentials,
)
from detector.core.types import EventKind, Phase, check_name
from detector.errors import InvalidArgument, PhasewatchError

if TYPE_CHECKING:
    from detector.logfile import Columns
    from detector.report import View

# The detector's own modules (engine, server, store, exporter, demo) are imported
# by the commands that need them: they pull in the [server] extra (scipy,
# ruptures, numba, statsmodels, prometheus_client), which a client install lacks, and
# `phasewatch health`, run by probes every few seconds, must start fast.
# Shown in --help without importing the server (the guard is light: grpc only).
from detector.guard import (  # noqa: E402
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_MAX_UNARY,
    DEFAULT_STREAM_IDLE_TIMEOUT,
)

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9109"
DEFAULT_TIMEOUT = 5.0
DEFAULT_FOLLOW_INTERVAL = 2.0
# Shown in --help without importing the server: tests/test_packaging.py checks
# them against detector.server and EngineConfig.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_WORKERS = 256
DEFAULT_MAX_SERIES_PER_RUN = 1024
DEFAULT_MAX_RUNS = 10_000
DEFAULT_BATCH_POINTS = 2048  # detector.replay's
# Modules of the [server] extra: a command that needs one of them and finds it
# missing says which extra to install.
_SERVER_EXTRA = frozenset(
    {"scipy", "ruptures", "numba", "llvmlite", "statsmodels", "prometheus_client", "grpc_reflection",
     "platformdirs"}
)
ENV_PREFIX = "PHASEWATCH_"


class CliError(Exception):
    """A failure to report as one line, with the exit code it deserves."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


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


def _fail(message: str, code: int) -> int:
    print(f"phasewatch: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phasewatch",
        description="Phase-transition detection for ML training runs.",
    )
    parser.add_argument("--version", action="version", version=f"phasewatch {detector.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_options()
    _add_serve(commands)
    _add_analyze(commands)
    _add_replay(commands, client)
    _add_follow(commands, client)
    _add_status(commands, client)
    _add_runs(commands, client)
    _add_restart(commands, client)
    _add_watch(commands, client)
    _add_demo(commands)
    _add_health(commands)
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


# --- serve -----------------------------------------------------------------

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


def _add_serve(commands: Any) -> None:
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


# --- analyze ---------------------------------------------------------------


def _add_analyze(commands: Any) -> None:
    analyze = commands.add_parser(
        "analyze", help="detect phases and events in a run log, offline (no server)"
    )
    analyze.add_argument("file", metavar="PATH",
                         help="run log, told apart by content: JSON Lines, CSV (a Lightning "
                         "metrics.csv), a Hugging Face trainer_state.json, TensorBoard event "
                         "files, or a directory holding one of these")
    analyze.add_argument("--json", action="store_true",
                         help="print one JSON document: segments, events, change_points")
    analyze.add_argument("--plot", metavar="OUT.png",
                         help="also draw the series with phases and events (needs matplotlib)")
    analyze.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from detector.logfile import read_log
    from detector.report import format_timeline, timeline_document

    with _server_stack("analyze"):
        from detector.analysis import analyze_columns
    columns = read_log(args.file)
    segments, events, rejected = analyze_columns(columns, run_id_for(args.file))
    if rejected:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items()))
        print(f"phasewatch: warning: points not used: {reasons}", file=sys.stderr)
    if args.json:
        _print_json(timeline_document(segments, events, columns))
    else:
        print(_describe_log(args.file, columns), end="\n\n")
        print(format_timeline(segments, events, columns))
    if args.plot:
        _plot(columns, segments, events, args.plot, title=Path(args.file).name)
    return EXIT_OK


def run_id_for(path: str) -> str:
    """A run id from a file name (``runs/grok_add_0.jsonl`` -> ``grok_add_0``)."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".csv"):
        name = name.removesuffix(suffix)
    return name if check_name("run id", name) is None else "run"


def _describe_log(path: str, columns: Columns) -> str:
    from detector.logfile import count_points

    steps = [s for s, _ in columns.values() if len(s)]
    span = f", steps {min(s.min() for s in steps)}-{max(s.max() for s in steps)}" if steps else ""
    return f"{path}: {len(columns)} series, {count_points(columns)} points{span}"


def _plot(
    columns: Columns, segments: list[View], events: list[View], out: str, *, title: str
) -> None:
    from detector.plot import PlotUnavailable, plot_timeline

    try:
        plot_timeline(columns, segments, events, out, title=title)
    except PlotUnavailable as error:
        raise CliError(str(error), EXIT_USAGE) from None
    except OSError as error:
        raise CliError(f"cannot write {out}: {error.strerror or error}", EXIT_USAGE) from None
    except ValueError as error:  # an image format matplotlib does not know
        raise CliError(f"cannot write {out}: {error}", EXIT_USAGE) from None
    print(f"phasewatch: wrote {out}", file=sys.stderr)


# --- replay ----------------------------------------------------------------


def _add_replay(commands: Any, client: argparse.ArgumentParser) -> None:
    replay = commands.add_parser(
        "replay", parents=[client], help="stream a run log to a detector, as a training job would"
    )
    replay.add_argument("file", metavar="PATH", help="run log: any format analyze reads")
    replay.add_argument("--run-id", metavar="ID", help="run id (default: the file name)")
    replay.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_POINTS,
                        metavar="N", help=f"points per batch (default {DEFAULT_BATCH_POINTS})")
    replay.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                        help="a label of the run (repeatable)")
    replay.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from detector.logfile import read_log
    from detector.replay import stream_log
    from detector.report import format_event

    run_id = args.run_id or run_id_for(args.file)
    _check_run_id(run_id)
    columns = read_log(args.file)  # read it all first: a bad line sends nothing
    on_event = None if args.json else lambda view: print(format_event(view), flush=True)
    with _detector(args, None) as stub:
        result = stream_log(
            stub, run_id, columns, batch_size=args.batch_size, labels=dict(args.label),
            on_event=on_event,
        )
    if args.json:
        _print_json({**result.summary(), "events": result.events})
        return EXIT_OK
    summary = result.summary()
    print(
        f"\nsent {summary['points_sent']} points in {summary['batches']} batches to "
        f"{args.target} as run {run_id!r}: {summary['accepted']} accepted, "
        f"{summary['rejected']} rejected, {len(result.events)} events, "
        f"{summary['seconds']:.2f} s ({summary['points_per_second']:.0f} points/s)"
    )
    return EXIT_OK


# --- follow ----------------------------------------------------------------


def _add_follow(commands: Any, client: argparse.ArgumentParser) -> None:
    follow = commands.add_parser(
        "follow", parents=[client],
        help="stream a log as a training job writes it (resumes where it left off)",
    )
    follow.add_argument("file", metavar="PATH",
                        help="the log a job is writing: any format analyze reads, or a "
                        "TensorBoard directory")
    follow.add_argument("--run-id", metavar="ID", help="run id (default: the file name)")
    follow.add_argument("--interval", type=_positive_float, default=DEFAULT_FOLLOW_INTERVAL,
                        metavar="SECONDS",
                        help=f"look for changes this often (default {DEFAULT_FOLLOW_INTERVAL:g})")
    follow.add_argument("--idle-exit", type=_positive_float, metavar="SECONDS",
                        help="end the run and exit once the log has not changed for this long "
                        "(default: follow until Ctrl-C)")
    follow.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                        help="a label of the run (repeatable)")
    follow.set_defaults(handler=cmd_follow)


def cmd_follow(args: argparse.Namespace) -> int:
    from detector.client import connect
    from detector.follow import Follower, follow

    run_id = args.run_id or run_id_for(args.file)
    _check_run_id(run_id)
    resume_step = _last_step(args, run_id)
    try:
        run = connect(
            args.target, run_id, labels=dict(args.label), resume=resume_step is not None,
            token_file=args.token_file, tls=args.tls, tls_root_ca=args.tls_ca,
            tls_client_cert=args.tls_client_cert, tls_client_key=args.tls_client_key,
            on_event=None if args.json else _print_client_event,
        )
    except ClientConfigError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    where = "from the start" if resume_step is None else f"from step {resume_step} (resumed)"
    print(f"phasewatch: following {args.file} into run {run_id!r} at {args.target}, {where}",
          file=sys.stderr, flush=True)
    follower = Follower(
        args.file, run, resume_step=resume_step,
        say=lambda line: print(f"phasewatch: {line}", file=sys.stderr, flush=True),
    )
    try:
        follow(follower, interval=args.interval, idle_exit=args.idle_exit)
    except KeyboardInterrupt:
        pass  # stop following: what was read is delivered below
    finally:
        delivered = run.close()
    stats = follower.stats
    summary = {"run_id": run_id, "points_sent": stats.points, "rows": stats.rows,
               "reads": stats.reads, "resumed_from": resume_step, "delivered": delivered,
               "rejected": run.stats.rejected}
    if args.json:
        _print_json(summary)
    else:
        print(f"sent {stats.points} points in {stats.rows} rows to {args.target} as run "
              f"{run_id!r}; {run.stats.rejected} rejected", file=sys.stderr)
    if not delivered and stats.points:  # a run that never logged has nothing to deliver
        raise CliError(f"not every point reached the detector at {args.target}; "
                       "run follow again to resume")
    return EXIT_OK


def _last_step(args: argparse.Namespace, run_id: str) -> int | None:
    """The run's last step at the detector, or None if it does not know the run."""
    with _detector(args, args.timeout) as stub:
        try:
            return stub.GetPhase(pb.GetPhaseRequest(run_id=run_id), timeout=args.timeout).last_step
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


def _print_client_event(event: Any) -> None:
    series = event.series or "-"
    print(f"{event.step:>7}  {event.kind:<18} {series:<20} {event.confidence:.2f}  "
          f"{event.message}".rstrip(), flush=True)


# --- status, runs, watch ---------------------------------------------------


def _add_status(commands: Any, client: argparse.ArgumentParser) -> None:
    status = commands.add_parser("status", parents=[client], help="the current phase of a run")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--timeline", action="store_true",
                        help="also print the run's phase segments and events")
    status.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from detector.report import (
        event_view_from_proto,
        format_run,
        format_timeline,
        run_view_from_proto,
        segment_view_from_proto,
    )

    _check_run_id(args.run_id)
    with _detector(args, args.timeout) as stub:
        run = run_view_from_proto(
            stub.GetPhase(pb.GetPhaseRequest(run_id=args.run_id), timeout=args.timeout)
        )
        timeline = timeline_pages(stub, args.run_id, args.timeout) if args.timeline else None
    if timeline is not None:
        run["segments"] = [segment_view_from_proto(s) for s in timeline.segments]
        run["events"] = [event_view_from_proto(e) for e in timeline.events]
    if args.json:
        _print_json(run)
        return EXIT_OK
    print(format_run(run))
    if timeline is not None:
        print()
        print(format_timeline(run["segments"], run["events"]))
    return EXIT_OK


def _add_runs(commands: Any, client: argparse.ArgumentParser) -> None:
    runs = commands.add_parser("runs", parents=[client], help="list runs and their phases")
    runs.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                      help="only runs with this label (repeatable: all must match)")
    runs.add_argument("--phase", choices=[p.value for p in Phase], help="only runs in this phase")
    runs.set_defaults(handler=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    from detector.convert import phase_to_proto
    from detector.report import format_runs, run_view_from_proto

    request = pb.ListRunsRequest(
        label_selector=dict(args.label),
        phase=phase_to_proto(Phase(args.phase) if args.phase else None),
    )
    with _detector(args, args.timeout) as stub:
        runs = [run_view_from_proto(r) for r in list_runs_pages(stub, request, args.timeout)]
    if args.json:
        _print_json({"runs": runs})
    else:
        print(format_runs(runs))
    return EXIT_OK


def _add_restart(commands: Any, client: argparse.ArgumentParser) -> None:
    restart = commands.add_parser(
        "restart", parents=[client],
        help="restart a run whose stored checkpoint is damaged, from its stored timeline",
    )
    restart.add_argument("run_id", metavar="RUN_ID")
    restart.set_defaults(handler=cmd_restart)


def cmd_restart(args: argparse.Namespace) -> int:
    _check_run_id(args.run_id)
    start = pb.StreamRequest(start=pb.RunStart(run_id=args.run_id, resume=True, restart=True))
    with _detector(args, args.timeout) as stub:
        answers = list(stub.Stream(iter([start]), timeout=args.timeout))
    last = answers[-1].ack.through_step if answers else -1
    print(f"run {args.run_id}: detection goes on after step {last}")
    return EXIT_OK


def _add_watch(commands: Any, client: argparse.ArgumentParser) -> None:
    watch = commands.add_parser(
        "watch", parents=[client], help="print events as they are detected, until Ctrl-C"
    )
    watch.add_argument("run_id", nargs="?", default="", metavar="RUN_ID",
                       help="the run to watch (default: every run)")
    watch.add_argument("--kind", type=_event_kind, action="append", default=[], metavar="K",
                       help="only events of this kind, e.g. GROKKING_ONSET (repeatable)")
    watch.set_defaults(handler=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    from detector.convert import kind_to_proto

    if args.run_id:
        _check_run_id(args.run_id)
    request = pb.WatchEventsRequest(
        run_id=args.run_id, kinds=[kind_to_proto(kind) for kind in args.kind]
    )
    with _detector(args, None) as stub:
        call = stub.WatchEvents(request, wait_for_ready=False)
        try:
            _print_watch(call, args)
        except KeyboardInterrupt:
            call.cancel()
            return EXIT_OK
    print("phasewatch: the detector ended the watch", file=sys.stderr)
    return EXIT_OK


def _print_watch(call: Any, args: argparse.Namespace) -> None:
    from detector.report import event_view_from_proto, format_event

    # Headers arrive once the detector has subscribed us: from then on no
    # event is missed. A call that could not connect is already over.
    call.initial_metadata()
    if call.done():
        for _ in call:  # raises the call's error (UNAVAILABLE: nothing listening)
            pass
        return
    what = f"run {args.run_id!r}" if args.run_id else "every run"
    print(f"phasewatch: watching {what} at {args.target} (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    try:
        for message in call:
            view = event_view_from_proto(message)
            print(json.dumps(view) if args.json else format_event(view, with_run=True),
                  flush=True)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            raise CliError(f"lost the connection to the detector at {args.target}") from None
        raise


# --- demo ------------------------------------------------------------------


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="replay a bundled real training run through an in-process detector"
    )
    demo.add_argument("--speed", type=_positive_float, default=1.0, metavar="X",
                      help="replay speed factor (default 1: about 5 s of streaming; "
                      "'inf' for no pacing)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    with _server_stack("demo"):
        from detector.demo import run_demo
    run_demo(speed=args.speed, progress=not args.no_progress)
    return EXIT_OK


# --- health ----------------------------------------------------------------

DETECTOR_SERVICE = "phasewatch.v1.PhaseDetector"


def _add_health(commands: Any) -> None:
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
    from grpc_health.v1 import health_pb2, health_pb2_grpc

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


# --- the environment ---------------------------------------------------------


class _FromEnv(str):
    """A default read from an environment variable: a bad one is reported by name."""

    variable: str


def env_variable(flag: str) -> str:
    """The variable of a long flag: ``--max-runs`` -> ``PHASEWATCH_MAX_RUNS``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def env_defaults(parser: argparse.ArgumentParser, environ: Any = None) -> None:
    """Let ``PHASEWATCH_<FLAG>`` give each long flag of ``parser`` its default.

    One rule for every flag, so that an image or a Kubernetes ConfigMap/Secret
    can set any of them without replacing the container's args. A flag given on
    the command line wins (the variable is only the default). Values go through
    the flag's own type, so ``PHASEWATCH_MAX_RUNS=0`` is refused as ``--max-runs
    0`` would be, naming the variable; switches take 1/true/yes/on or
    0/false/no/off/empty. O(flags).
    """
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or isinstance(action, argparse._HelpAction):
            continue
        variable = env_variable(flags[0])
        if action.help is not None and action.help is not argparse.SUPPRESS:
            action.help += f" [${variable}]"
        value = environ.get(variable)
        if value is None:
            continue
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            word = value.strip().lower()
            if word not in _TRUE | _FALSE:
                raise CliError(f"${variable}={value!r}: expected 1/true/yes/on or "
                               "0/false/no/off", EXIT_USAGE)
            action.default = action.const if word in _TRUE else not action.const
        elif isinstance(action, argparse._StoreAction):
            default = _FromEnv(value)
            default.variable = variable
            action.default = default
            # Our parser's types are callables (no FileType, no registered names).
            action.type = _env_checked(cast("Callable[[str], Any] | None", action.type), variable)
            action.required = False


def _env_checked(parse: Callable[[str], Any] | None, variable: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if parse is None:
            return str(text)
        try:
            return parse(text)
        except (argparse.ArgumentTypeError, ValueError) as error:
            if isinstance(text, _FromEnv):
                raise argparse.ArgumentTypeError(f"{error} (from ${variable})") from None
            raise

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


# --- talking to a detector -------------------------------------------------


@contextmanager
def _server_stack(command: str) -> Iterator[None]:
    """Imports of the detector's own modules: a missing [server] dependency is the
    user's install to fix, said in one line."""
    try:
        yield
    except ModuleNotFoundError as error:
        root = (error.name or "").partition(".")[0]
        if root not in _SERVER_EXTRA:
            raise
        raise CliError(
            f"phasewatch {command} needs the detector's dependencies ({root} is not installed): "
            "pip install 'phasewatch[server]'",
            EXIT_USAGE,
        ) from None


@contextmanager
def _channel(
    args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()
) -> Iterator[tuple[grpc.Channel, bool]]:
    """A fresh channel to ``args.target`` with the TLS and token of the flags,
    and whether it is TLS."""
    tls = bool(args.tls or args.tls_ca or args.tls_client_cert or args.tls_client_key)
    try:
        token = read_token(token_file=args.token_file)
        credentials = (
            tls_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key) if tls else None
        )
    except ClientConfigError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    # Pages are cut at 2 MiB, but a single RunPhase or event may be larger than
    # that: allow what the server can send (its own default request limit).
    options = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES), *options]
    channel = (
        grpc.secure_channel(args.target, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(args.target, options=options)
    )
    closable = channel
    if token is not None:
        channel = grpc.intercept_channel(channel, bearer_interceptor(token))
    try:
        yield channel, tls
    finally:
        closable.close()


@contextmanager
def _detector(args: argparse.Namespace, timeout: float | None) -> Iterator[pb_grpc.PhaseDetectorStub]:
    """A stub on a fresh channel (TLS and token from the flags); RPC failures
    become one-line CliErrors."""
    with _channel(args) as (channel, tls):
        try:
            yield pb_grpc.PhaseDetectorStub(channel)
        except grpc.RpcError as error:
            raise rpc_problem(error, args.target, timeout, tls=tls) from None


def rpc_problem(
    error: grpc.RpcError, target: str, timeout: float | None = None, *, tls: bool = False
) -> CliError:
    """The one-line message and exit code for a failed RPC."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if tls:  # a refused handshake looks like nothing listening: say both
            return CliError(
                f"no detector listening at {target}, or the TLS handshake failed ({details})"
            )
        return CliError(f"no detector listening at {target}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CliError(f"the detector at {target} refused the request: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g} s" if timeout is not None else " in time"
        return CliError(f"no answer from the detector at {target}{within}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        return CliError(details or code.name.lower(), EXIT_USAGE)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"the detector at {target} refused the request: {details}", EXIT_USAGE)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(f"{target} does not implement this call (is it a phasewatch detector?)")
    return CliError(f"the detector at {target} failed: {code.name}: {details}")


# --- small helpers ---------------------------------------------------------


def _print_json(document: Any) -> None:
    # allow_nan=False: the views already turn NaN into null; this keeps it so.
    print(json.dumps(document, indent=2, allow_nan=False))


def _check_run_id(run_id: str) -> None:
    problem = check_name("run id", run_id)
    if problem is not None:
        raise InvalidArgument(problem)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser so that ValueError becomes argparse's usage error (exit 2)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__.lstrip("_")
    return convert


@_argument_type
def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {text}")
    return value


@_argument_type
def _resend_interval(text: str) -> float:
    # Alertmanager asks its clients to re-send every 30 s to 3 min.
    value = float(text)
    if not 30 <= value <= 180:
        raise ValueError(f"must be between 30 and 180 seconds, got {text}")
    return value


@_argument_type
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {text}")
    return value


@_argument_type
def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


@_argument_type
def _event_kind(text: str) -> EventKind:
    name = text.strip().upper().removeprefix("EVENT_KIND_")
    try:
        return EventKind(name)
    except ValueError:
        choices = ", ".join(kind.value for kind in EventKind)
        raise ValueError(f"unknown event kind {text!r}; one of {choices}") from None


if __name__ == "__main__":
    sys.exit(main())
