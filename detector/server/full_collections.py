"""Short full garbage collections for a server holding many runs.

CPython's collector runs a *full* pass (generation 2) each time the objects
promoted since the last one reach a quarter of those it kept then, and a full
pass walks every container object in the heap with every thread stopped. A
run's detector state is ~100 such objects with four series, ~300 with twelve,
so a server holding thousands of runs walks a million of them, every 10-30 s
while runs grow or statuses churn, and each pause lands in every batch's
latency and in the ``/metrics`` scrape it hits. ``python -m
benchmarks.gc_pauses`` (3 000 runs of 8 series, load 1): the longest full pass
0.99 s by default, 0.12 s with this policy; 18 % more batches a second.

Almost everything a full pass walks is alive and stays so (the runs' state),
so :class:`FullCollections` moves what survives a full pass into the
permanent generation (:func:`gc.freeze`): the next full pass walks only what
was kept since. Objects there are still freed when their reference count
drops, as always; only a *cycle* among them that becomes garbage waits. gRPC
streams and forgotten runs leave ~20 such objects each (measured: 4 069
after 200 streams, ended and forgotten), so every ``rescan_seconds`` the
permanent generation goes back into generation 2 (:func:`gc.unfreeze`), and
the next full pass walks everything once, frees those cycles, and freezes
again: one long pause per period instead of one every few dozen seconds.

Process-wide, as the collector is: install once per process (``serve`` does,
after its warm-up), uninstall at the end. O(1) a collection (the callback);
the full passes' cost is what changes.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

DEFAULT_RESCAN_SECONDS = 900.0


class FullCollections:
    """Freezes what survives each full collection; lets one in ``rescan_seconds``
    walk everything.

    >>> policy = FullCollections(rescan_seconds=60.0)
    >>> policy.install()
    >>> _ = gc.collect()
    >>> gc.get_freeze_count() > 0  # what the full pass kept is out of the next ones
    True
    >>> policy.uninstall()
    >>> gc.unfreeze()
    """

    def __init__(
        self, rescan_seconds: float = DEFAULT_RESCAN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rescan_seconds > 0:
            raise ValueError(f"rescan_seconds must be positive, not {rescan_seconds!r}")
        self.rescan_seconds = rescan_seconds
        self.clock = clock
        self._rescanned_at = clock()
        self._installed = False

    def install(self) -> None:
        """Start: from the next full collection on (idempotent)."""
        if not self._installed:
            self._rescanned_at = self.clock()
            gc.callbacks.append(self._after_collection)
            self._installed = True

    def uninstall(self) -> None:
        """Stop; what is frozen stays so (``gc.unfreeze()`` to undo that too)."""
        if self._installed:
            gc.callbacks.remove(self._after_collection)
            self._installed = False

    def _after_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector, in whichever thread allocated, with the GIL held;
        # the pass is over at "stop", so moving generations now is safe.
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self.clock()
        if now - self._rescanned_at >= self.rescan_seconds:
            # Everything frozen goes back to generation 2: the next full pass walks it all.
            self._rescanned_at = now
            gc.unfreeze()
        else:
            gc.freeze()
