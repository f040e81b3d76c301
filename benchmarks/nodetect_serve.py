"""``phasewatch serve`` with no detection: what the service costs around it
(``benchmarks.ingest --servers full-nodetect``).

The same server, store, guard, metrics, exporter and gRPC handlers as
``phasewatch serve``, and the same engine (runs declared and restored, the
reorder buffer, a checkpoint and a status a batch, the end of each run), but
every run's :class:`~detector.core.run.RunDetector` takes its lines and finds
nothing (``update_many`` and ``finish`` return no events): the series detectors
and the labeller never run, so no event is sent. Its points per server
CPU-second against the bare servicer's say how much of the distance to the bare
transport is detection and how much is the service around it; a benchmark
server only, never a mode of ``serve``.

Usage: ``python -m benchmarks.nodetect_serve serve --listen ... [serve args]``
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import numpy as np


@contextlib.contextmanager
def no_detection() -> Iterator[None]:
    """While active, RunDetector detects nothing: it counts the lines it is given (the
    economy's clock, as the real one does) and finds no event (``benchmarks.cost``'s
    engine cell uses it in-process too)."""
    from detector.core.run import RunDetector, distinct_steps

    def update_many(self: RunDetector, columns, lines: np.ndarray | None = None) -> list:  # noqa: ANN001
        steps = [s for s, _ in columns.values() if len(s)]
        if steps:
            self.lines += len(lines) if lines is not None else len(distinct_steps(np.concatenate(steps)))
        return []

    saved = RunDetector.update_many, RunDetector.finish
    RunDetector.update_many = update_many  # type: ignore[method-assign]
    RunDetector.finish = lambda self: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        RunDetector.update_many, RunDetector.finish = saved  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    patch = no_detection()
    patch.__enter__()  # for the server's whole life (held here: a dropped one would undo itself)
    from detector.cli import main as cli_main

    try:
        return int(cli_main(list(sys.argv[1:] if argv is None else argv)) or 0)
    finally:
        patch.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
