"""``phasewatch serve`` under cProfile on every thread, for finding where a
benchmark's server time goes (``benchmarks.ingest --profile-server PATH``).

cProfile follows one thread; the server's work runs on its gRPC pool threads.
So every thread started after this module patches ``threading.Thread.run``
gets its own profiler, and on exit (SIGTERM: the server's own graceful
shutdown) the main thread's and all the threads' stats are merged into
``PATH`` (pstats format) and the top functions printed to ``PATH.txt``. The
profiler slows the server several-fold: profile runs measure where time goes,
never throughput.

Usage: ``python -m benchmarks.profile_serve PATH serve --listen ... [serve args]``
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import sys
import threading
from collections.abc import Sequence

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _patch_threads() -> None:
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = cProfile.Profile()
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

    profile = cProfile.Profile()
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
