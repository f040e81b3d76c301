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

import sys
from collections.abc import Sequence

import numpy as np


def _no_detection() -> None:
    """RunDetector without detection: it counts the lines it is given (the
    economy's clock, as the real one does), and finds nothing."""
    from detector.core.run import RunDetector, distinct_steps

    def update_many(self: RunDetector, columns, lines: np.ndarray | None = None) -> list:  # noqa: ANN001
        steps = [s for s, _ in columns.values() if len(s)]
        if steps:
            self.lines += len(lines) if lines is not None else len(distinct_steps(np.concatenate(steps)))
        return []

    RunDetector.update_many = update_many  # type: ignore[method-assign]
    RunDetector.finish = lambda self: []  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    _no_detection()
    from detector.cli import main as cli_main

    return int(cli_main(list(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
