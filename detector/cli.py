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
import inspect
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
from detector.convert import kind_to_proto, phase_to_proto
from detector.core.types import EventKind, Phase, check_name
from detector.demo import run_demo
from detector.engine import Engine, EngineConfig
from detector.errors import InvalidArgument, PhasewatchError
from detector.guard import (
    DEFAULT_MAX_STREAMS_PER_PEER,
    DEFAULT_MAX_UNARY,
    DEFAULT_STREAM_IDLE_TIMEOUT,
)
from detector.logfile import Columns, count_points, iter_batches, read_log
from detector.plot import PlotUnavailable, plot_timeline
from detector.replay import DEFAULT_BATCH_POINTS, stream_log
from detector.report import (
    View,
    event_view,
    event_view_from_proto,
    format_event,
    format_run,
    format_runs,
    format_timeline,
    run_view_from_proto,
    segment_view,
    segment_view_from_proto,
    timeline_document,
)
from detector.server import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_WORKERS, serve

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9109"
DEFAULT_TIMEOUT = 5.0
# analyze feeds the engine in big batches: the engine's output does not depend
# on batching, and fewer calls mean less per-call overhead.
ANALYZE_BATCH_POINTS = 65_536


class CliError(Exception):
    """A failure to report as one line, with the exit code it deserves."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- entry point -----------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``phasewatch`` command; returns the exit code."""
    parser = build_parser()
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
    _add_status(commands, client)
    _add_runs(commands, client)
    _add_restart(commands, client)
    _add_watch(commands, client)
    _add_demo(commands)
    return parser


def _client_options() -> argparse.ArgumentParser:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the detector's gRPC address (default {DEFAULT_TARGET})",
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
}


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the detector (gRPC and Prometheus /metrics)")
    # Each default may come from the environment (PHASEWATCH_LISTEN, ...): how a
    # container image and a Kubernetes Secret set them without replacing the args.
    serve.add_argument("--listen", default=os.environ.get("PHASEWATCH_LISTEN", DEFAULT_TARGET),
                       metavar="HOST:PORT",
                       help=f"gRPC address (default $PHASEWATCH_LISTEN or {DEFAULT_TARGET})")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       default=os.environ.get("PHASEWATCH_METRICS_LISTEN", DEFAULT_METRICS_LISTEN),
                       help="Prometheus /metrics address (default $PHASEWATCH_METRICS_LISTEN or "
                       f"{DEFAULT_METRICS_LISTEN}; '' for none)")
    serve.add_argument("--store", default=os.environ.get("PHASEWATCH_STORE"), metavar="URL",
                       help="sqlite:///PATH or postgresql://... (default $PHASEWATCH_STORE, "
                       "else a SQLite file under the user's data directory)")
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
                       default=os.environ.get("PHASEWATCH_AUTH_TOKEN_FILE"),
                       help="require a bearer token from this file (one a line; re-read when it "
                       "changes) on every RPC but health checks (default "
                       "$PHASEWATCH_AUTH_TOKEN_FILE)")
    serve.add_argument("--tls-cert", metavar="PATH", help="serve TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", metavar="PATH", help="private key of --tls-cert (PEM)")
    serve.add_argument("--tls-client-ca", metavar="PATH",
                       help="require client certificates signed by this CA (PEM)")
    serve.add_argument("--max-series-per-run", type=_positive_int, metavar="N",
                       help=f"refuse a run's series past this many (RESOURCE_EXHAUSTED; default "
                       f"{EngineConfig.max_series_per_run})")
    serve.add_argument("--max-runs", type=_positive_int, metavar="N",
                       help=f"refuse new runs past this many in memory (RESOURCE_EXHAUSTED; "
                       f"default {EngineConfig.max_runs})")
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


def cmd_serve(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"grace": args.grace}
    accepted = inspect.signature(serve).parameters
    for name, flag in _SERVE_PASSTHROUGH.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name not in accepted:
            raise CliError(f"{flag} is not supported yet", EXIT_USAGE)
        options[name] = value
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
    if limits:
        options["config"] = EngineConfig(**limits)
    if args.max_message_bytes is not None:
        options["max_message_bytes"] = args.max_message_bytes
    if args.max_concurrent_rpcs is not None:
        options["max_workers"] = args.max_concurrent_rpcs
    for name in ("max_streams_per_peer", "max_unary", "stream_idle_timeout"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    try:
        serve(args.listen, args.metrics_listen or None, args.store, **options)
    except OSError as error:  # cannot listen: port taken, bad address, unknown host
        said = error.strerror if (error.strerror or "").startswith("cannot") else str(error)
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
    analyze.add_argument("file", metavar="FILE", help="run log: JSON Lines or CSV with a step column")
    analyze.add_argument("--json", action="store_true",
                         help="print one JSON document: segments, events, change_points")
    analyze.add_argument("--plot", metavar="OUT.png",
                         help="also draw the series with phases and events (needs matplotlib)")
    analyze.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
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


def analyze_columns(
    columns: Columns, run_id: str = "run"
) -> tuple[list[View], list[View], Counter[str]]:
    """Run the engine over columns as one run.

    Returns the segment and event views and the points the engine did not
    use, counted by reason.
    """
    engine = Engine()
    engine.start_run(run_id)
    rejected: Counter[str] = Counter()
    for batch in iter_batches(columns, ANALYZE_BATCH_POINTS):
        rejected.update(engine.ingest(run_id, batch).rejected_by_reason)
    engine.end_run(run_id)
    segments, events = engine.timeline(run_id)
    return [segment_view(s) for s in segments], [event_view(e) for e in events], rejected


def run_id_for(path: str) -> str:
    """A run id from a file name (``runs/grok_add_0.jsonl`` -> ``grok_add_0``)."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".csv"):
        name = name.removesuffix(suffix)
    return name if check_name("run id", name) is None else "run"


def _describe_log(path: str, columns: Columns) -> str:
    steps = [s for s, _ in columns.values() if len(s)]
    span = f", steps {min(s.min() for s in steps)}-{max(s.max() for s in steps)}" if steps else ""
    return f"{path}: {len(columns)} series, {count_points(columns)} points{span}"


def _plot(
    columns: Columns, segments: list[View], events: list[View], out: str, *, title: str
) -> None:
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
    replay.add_argument("file", metavar="FILE", help="run log: JSON Lines or CSV")
    replay.add_argument("--run-id", metavar="ID", help="run id (default: the file name)")
    replay.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_POINTS,
                        metavar="N", help=f"points per batch (default {DEFAULT_BATCH_POINTS})")
    replay.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                        help="a label of the run (repeatable)")
    replay.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
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


# --- status, runs, watch ---------------------------------------------------


def _add_status(commands: Any, client: argparse.ArgumentParser) -> None:
    status = commands.add_parser("status", parents=[client], help="the current phase of a run")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--timeline", action="store_true",
                        help="also print the run's phase segments and events")
    status.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
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
    request = pb.ListRunsRequest(
        label_selector=dict(args.label),
        phase=phase_to_proto(Phase(args.phase)) if args.phase else 0,
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
    run_demo(speed=args.speed, progress=not args.no_progress)
    return EXIT_OK


# --- talking to a detector -------------------------------------------------


@contextmanager
def _detector(args: argparse.Namespace, timeout: float | None) -> Iterator[pb_grpc.PhaseDetectorStub]:
    """A stub on a fresh channel (TLS and token from the flags); RPC failures
    become one-line CliErrors."""
    target = args.target
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
    options = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)]
    channel = (
        grpc.secure_channel(target, credentials, options=options) if credentials is not None
        else grpc.insecure_channel(target, options=options)
    )
    if token is not None:
        channel = grpc.intercept_channel(channel, bearer_interceptor(token))
    try:
        yield pb_grpc.PhaseDetectorStub(channel)
    except grpc.RpcError as error:
        raise rpc_problem(error, target, timeout, tls=tls) from None
    finally:
        channel.close()


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
