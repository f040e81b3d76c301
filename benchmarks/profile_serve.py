"""``phasewatch serve`` under cProfile on every thread, for finding where a
benchmark's server time goes (``benchmarks.ingest --profile-server PATH``).

cProfile follows one thread; the server's work runs on its gRPC pool threads.
So every thread started after this module patches ``threading.Thread.run``
gets its own profiler, and on exit (SIGTERM: the server's own graceful
shutdown) the main thread's and all the threads' stats are merged into
``PATH`` (pstats format) and the top functions printed to ``PATH.txt``. The
profiler slows the server several-fold: profile runs measure where time goes,
never throughput.

With ``PHASEWATCH_PROFILE_CLOCK=cpu`` in the environment every profiler times
its own thread's CPU (``time.thread_time``) instead of the wall clock: a thread
blocked on a lock, a queue or the interpreter lock then costs nothing, so the
merged stats add up to the server's CPU time and the waits (which dominate a
wall-clock profile of 32 streams taking turns at detection) drop out.

Usage: ``python -m benchmarks.profile_serve PATH serve --listen ... [serve args]``
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import sys
import threading
import time
from collections.abc import Sequence

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _profiler() -> cProfile.Profile:
    """A profiler on the wall clock, or on this thread's CPU time (see the module doc)."""
    if os.environ.get("PHASEWATCH_PROFILE_CLOCK", "wall") == "cpu":
        return cProfile.Profile(time.thread_time)
    return cProfile.Profile()


def _patch_threads() -> None:
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = _profiler()
        with _lock:
            _profiles.append(profile)
        profile.enable()
        try:
            run(self)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    out, cli_args = args[0], args[1:]
    _patch_threads()
    from detector.cli import main as cli_main

    profile = _profiler()
    profile.enable()
    try:
        return int(cli_main(cli_args) or 0)
    finally:
        profile.disable()
        stats = pstats.Stats(profile)
        with _lock:
            for other in _profiles:
                # A thread that never ran Python code has no stats to add.
                with contextlib.suppress(TypeError, ValueError):
                    stats.add(other)
        stats.dump_stats(out)
        text = io.StringIO()
        stats.stream = text  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        with open(out + ".txt", "w") as f:
            f.write(text.getvalue())


if __name__ == "__main__":
    sys.exit(main())
