"""``phasewatch status``, ``runs``, ``restart`` and ``watch``: ask a running
detector. grpc and the generated messages are imported when a command runs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from detector.cli._common import (
    EXIT_OK,
    CliError,
    _check_run_id,
    _event_kind,
    _label,
    _print_json,
)
from detector.core.types import Phase


def add_status(commands: Any, client: argparse.ArgumentParser) -> None:
    status = commands.add_parser("status", parents=[client], help="the current phase of a run")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--timeline", action="store_true",
                        help="also print the run's phase segments and events")
    status.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from detector._proto.phasewatch.v1 import detector_pb2 as pb
    from detector.cli._rpc import _detector
    from detector.client import timeline_pages
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


def add_runs(commands: Any, client: argparse.ArgumentParser) -> None:
    runs = commands.add_parser("runs", parents=[client], help="list runs and their phases")
    runs.add_argument("--label", type=_label, action="append", default=[], metavar="K=V",
                      help="only runs with this label (repeatable: all must match)")
    runs.add_argument("--phase", choices=[p.value for p in Phase], help="only runs in this phase")
    runs.set_defaults(handler=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    from detector._proto.phasewatch.v1 import detector_pb2 as pb
    from detector.cli._rpc import _detector
    from detector.client import list_runs_pages
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


def add_restart(commands: Any, client: argparse.ArgumentParser) -> None:
    restart = commands.add_parser(
        "restart", parents=[client],
        help="restart a run whose stored checkpoint is damaged, from its stored timeline",
    )
    restart.add_argument("run_id", metavar="RUN_ID")
    restart.set_defaults(handler=cmd_restart)


def cmd_restart(args: argparse.Namespace) -> int:
    from detector._proto.phasewatch.v1 import detector_pb2 as pb
    from detector.cli._rpc import _detector

    _check_run_id(args.run_id)
    start = pb.StreamRequest(start=pb.RunStart(run_id=args.run_id, resume=True, restart=True))
    with _detector(args, args.timeout) as stub:
        answers = list(stub.Stream(iter([start]), timeout=args.timeout))
    last = answers[-1].ack.through_step if answers else -1
    print(f"run {args.run_id}: detection goes on after step {last}")
    return EXIT_OK


def add_watch(commands: Any, client: argparse.ArgumentParser) -> None:
    watch = commands.add_parser(
        "watch", parents=[client], help="print events as they are detected, until Ctrl-C"
    )
    watch.add_argument("run_id", nargs="?", default="", metavar="RUN_ID",
                       help="the run to watch (default: every run)")
    watch.add_argument("--kind", type=_event_kind, action="append", default=[], metavar="K",
                       help="only events of this kind, e.g. GROKKING_ONSET (repeatable)")
    watch.set_defaults(handler=cmd_watch)


def cmd_watch(args: argparse.Namespace) -> int:
    from detector._proto.phasewatch.v1 import detector_pb2 as pb
    from detector.cli._rpc import _detector
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
    import grpc

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
