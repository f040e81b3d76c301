"""``phasewatch analyze``: detect phases and events in a run log, offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.cli._common import EXIT_OK, EXIT_USAGE, CliError, _print_json, _server_stack
from detector.core.types import check_name

if TYPE_CHECKING:
    from detector.logfile import Columns
    from detector.report import View


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
