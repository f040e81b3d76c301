"""Cutting a batch into blocks of points, and stopping between blocks (a stopping
server, a cancelled call)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import numpy as np

from detector.engine.run import Columns, as_arrays

_STOPPING: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "phasewatch_stopping", default=None
)


@contextlib.contextmanager
def stop_between_blocks(stopping: Callable[[], bool]) -> Iterator[None]:
    """``Engine.ingest`` calls made inside stop between blocks once ``stopping()``.

    The server's way to pass a call's cancellation to the engine, also through
    engines that override ``ingest`` with the plain signature.
    """
    token = _STOPPING.set(stopping)
    try:
        yield
    finally:
        _STOPPING.reset(token)


def _blocks(columns: Columns, size: int) -> list[Columns]:
    """``columns`` cut by step into blocks of about ``size`` points, in step order.

    Block ``i`` holds every point whose step is in (cut[i-1], cut[i]], in its
    batch order, so the blocks ingested in turn amount to the batch (an
    ordered log gives the same events however it is cut). A series with no
    points goes in the first block (it declares the series). O(points log points).
    """
    arrays = as_arrays(columns)
    total = sum(len(steps) for steps, _ in arrays.values())
    if total <= size:
        return [arrays]
    ordered = np.sort(np.concatenate([steps for steps, _ in arrays.values()]))
    cuts = np.unique(ordered[size - 1 :: size])
    blocks: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(len(cuts) + 1)]
    for name, (steps, values) in arrays.items():
        if len(steps) == 0:
            blocks[0][name] = (steps, values)
            continue
        where = np.searchsorted(cuts, steps, side="left")
        order = np.argsort(where, kind="stable")
        bounds = np.searchsorted(where[order], np.arange(len(cuts) + 2))
        for i in range(len(cuts) + 1):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                part = order[lo:hi]
                blocks[i][name] = (steps[part], values[part])
    return [block for block in blocks if block]
