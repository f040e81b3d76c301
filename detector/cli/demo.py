"""``phasewatch demo``: a bundled real run through an in-process detector."""

from __future__ import annotations

import argparse
from typing import Any

from detector.cli._common import EXIT_OK, _positive_float, _server_stack


def add_parser(commands: Any) -> None:
    """Register ``demo`` on the subcommands ``commands``."""
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
