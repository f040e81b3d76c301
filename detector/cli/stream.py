"""``phasewatch replay`` and ``follow``: send a run log to a detector, whole or
as a training job writes it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from detector.cli._common import (
    DEFAULT_BATCH_POINTS,
    DEFAULT_FOLLOW_INTERVAL,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    _check_run_id,
    _label,
    _positive_float,
    _positive_int,
    _print_json,
)
from detector.cli.analyze import run_id_for


def add_replay(commands: Any, client: argparse.ArgumentParser) -> None:
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
    from detector.cli._rpc import _detector
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


def add_follow(commands: Any, client: argparse.ArgumentParser) -> None:
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
    from detector.client import ClientConfigError, connect
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
    import grpc

    from detector._proto.phasewatch.v1 import detector_pb2 as pb
    from detector.cli._rpc import _detector

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
