"""``phasewatch analyze``: detect phases and events in a run log, offline."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.cli._common import EXIT_OK, EXIT_USAGE, CliError, _print_json, _server_stack
from detector.core.types import check_name

if TYPE_CHECKING:
    from detector.events import EventHub
    from detector.logfile import Columns
    from detector.report import View

# How long analyze waits for its alerts to reach the sinks (retries included).
ALERT_DELIVERY_SECONDS = 10.0


def add_parser(commands: Any) -> None:
    """Register ``analyze`` on the subcommands ``commands``."""
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
    # The alert sinks of `serve`, with the same flag names: the engine's events
    # reach them the same way (detector.events), then the command waits for delivery.
    analyze.add_argument("--alertmanager-url", metavar="URL",
                         help="send the alerts the run's events raise to Alertmanager (API v2); "
                         "comma-separated for a cluster. They are sent firing, valid for 4 "
                         "minutes (a log is not a live run: nothing re-sends them, and "
                         "Alertmanager then resolves them)")
    analyze.add_argument("--webhook-url", metavar="URL",
                         help="POST the alerts to this URL in Alertmanager's webhook format")
    analyze.add_argument("--alert-runbook-url", metavar="TEMPLATE",
                         help="runbook_url annotation, e.g. https://wiki/phasewatch#{alertname}")
    analyze.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from detector.logfile import read_log
    from detector.report import format_timeline, timeline_document

    with _server_stack("analyze"):
        from detector.analysis import analyze_columns
    columns = read_log(args.file)
    with _alert_sinks(args) as hub:
        segments, events, rejected = analyze_columns(columns, run_id_for(args.file), events=hub)
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


@contextmanager
def _alert_sinks(args: argparse.Namespace) -> Iterator[EventHub | None]:
    """An event hub feeding the alert sinks of the flags (None without any); on
    the way out, waits up to ALERT_DELIVERY_SECONDS for every alert to be delivered.

    Only the detected events go to the dispatcher, not the run's end: a log is
    a finished run, and alerts resolved as soon as they are raised would notify
    no one. They go out firing, with Alertmanager's ``endsAt`` four default
    resend intervals ahead (4 minutes), and nothing re-sends them.
    """
    if not (args.alertmanager_url or args.webhook_url):
        if args.alert_runbook_url:
            raise CliError("--alert-runbook-url needs --alertmanager-url or --webhook-url",
                           EXIT_USAGE)
        yield None
        return
    from detector.alerts import AlertDispatcher, AlertPolicy, build_sinks
    from detector.events import EventHub, EventsDetected

    sinks = build_sinks(args.alertmanager_url, args.webhook_url)
    dispatcher = AlertDispatcher(sinks, policy=AlertPolicy(runbook_url=args.alert_runbook_url))
    hub = EventHub()
    hub.subscribe(lambda message: dispatcher.submit(message.run_id, message.events, message.at)
                  if isinstance(message, EventsDetected) else None)
    try:
        yield hub
        delivered = dispatcher.flush(ALERT_DELIVERY_SECONDS)
    finally:
        dispatcher.close(timeout=ALERT_DELIVERY_SECONDS)
    stats = dispatcher.stats()
    sent = ", ".join(f"{s.sent} to {s.name}" for s in stats.sinks)
    print(f"phasewatch: alerts sent: {sent}", file=sys.stderr)
    if not delivered:
        failed = ", ".join(s.name for s in stats.sinks if s.pending or s.discarded)
        raise CliError(f"not every alert was delivered within {ALERT_DELIVERY_SECONDS:g} s "
                       f"(sink {failed or 'unknown'})")


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
