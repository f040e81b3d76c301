"""Multi-resolution summaries: long horizons in constant memory.

:class:`MultiResolution` keeps, for each level ``l = 0..levels-1``, the last
``per_level`` blocks of ``base · 2**l`` points, each block summarised by its
sufficient statistics (count, Σy, Σy², min, max) and its first step. Level 0
is fed by closed base blocks, and every second closed block of a level is
merged with its predecessor into one block of the next level; each level drops
its oldest block when full, so level ``l`` covers the most recent
``per_level · base · 2**l`` points at its resolution. Memory is
O(levels × per_level) whatever the run length; the horizon grows as
``base · per_level · 2**levels``. Updates are O(1) amortised per point and done
on whole blocks with numpy: points are held until :data:`FOLD_POINTS` of them
have come (or a readout needs them) and folded in at once, so a caller's small
blocks do not pay the ~20 numpy calls of a fold each.

Readouts: :meth:`coarse` gives the block means of one level (a long, coarse
view of the series for trend tests over long horizons), :meth:`variance` the
variance over a level's horizon.

>>> mr = MultiResolution(base=4, per_level=8, levels=3)
>>> mr.update_many(np.arange(1000, dtype=float))
>>> mr.coarse(2)[-2:]  # means of the last two closed 16-point blocks
array([967.5, 983.5])
"""

from __future__ import annotations

import numpy as np

from detector.errors import InvalidArgument

_FIELDS = 5  # count, sum, sum of squares, min, max

FOLD_POINTS = 256
"""Points held before a fold: enough to share a fold's fixed cost among a few
blocks, few enough that the held values (2 kB a series) do not show as memory
growth across a thousand runs."""


class MultiResolution:
    """Dyadic block summaries of a series (see the module docstring)."""

    def __init__(self, base: int = 16, per_level: int = 64, levels: int = 8) -> None:
        if base < 1 or per_level < 2 or per_level % 2 or levels < 1:
            raise InvalidArgument("base >= 1, per_level even and >= 2, levels >= 1")
        self.base, self.per_level, self.levels = base, per_level, levels
        self.blocks = np.zeros((levels, per_level, _FIELDS))
        self.sizes = np.zeros(levels, dtype=np.int64)  # blocks held per level
        self.closed = np.zeros(levels, dtype=np.int64)  # blocks ever closed per level
        self.open = np.zeros(_FIELDS)  # the base block being filled
        self.open[3], self.open[4] = np.inf, -np.inf
        self.held: list[np.ndarray] = []  # values not folded in yet (fewer than FOLD_POINTS)
        self._held_count = 0

    def update_many(self, y: np.ndarray) -> None:
        """Add finite values in order. O(len(y)) amortised; O(levels) numpy calls a fold."""
        y = np.array(y, dtype=float).reshape(-1)
        if len(y) == 0:
            return
        self.held.append(y)
        self._held_count += len(y)
        if self._held_count >= FOLD_POINTS:
            self._fold()

    def _fold(self) -> None:
        if not self.held:
            return
        y = self.held[0] if len(self.held) == 1 else np.concatenate(self.held)
        self.held, self._held_count = [], 0
        room = self.base - int(self.open[0])
        head, rest = y[:room], y[room:]
        if len(head):
            self.open += (len(head), head.sum(), head @ head, 0.0, 0.0)
            self.open[3] = min(self.open[3], head.min())
            self.open[4] = max(self.open[4], head.max())
        if self.open[0] < self.base:
            return
        whole = len(rest) // self.base * self.base
        full = rest[:whole].reshape(-1, self.base)
        closed = np.empty((1 + len(full), _FIELDS))
        closed[0] = self.open
        if len(full):
            closed[1:, 0] = float(self.base)
            closed[1:, 1] = full.sum(axis=1)
            closed[1:, 2] = np.einsum("ij,ij->i", full, full)
            closed[1:, 3] = full.min(axis=1)
            closed[1:, 4] = full.max(axis=1)
        self._push(closed)
        tail = rest[whole:]
        self.open[:] = (len(tail), tail.sum(), tail @ tail, np.inf, -np.inf)
        if len(tail):
            self.open[3], self.open[4] = tail.min(), tail.max()

    def _push(self, blocks: np.ndarray) -> None:
        """Append closed blocks to level 0 and cascade the pairs they complete upwards."""
        for level in range(self.levels):
            if len(blocks) == 0:
                return
            before = int(self.closed[level])
            held = self.blocks[level, : self.sizes[level]]
            # A block at an even closed count (1-based) completes a pair with its predecessor.
            seq = np.concatenate([held[-1:], blocks]) if before % 2 else blocks
            merged = np.concatenate([held, blocks])[-self.per_level :]
            self.blocks[level, : len(merged)] = merged
            self.sizes[level] = len(merged)
            self.closed[level] = before + len(blocks)
            pairs = len(seq) // 2
            if pairs == 0:
                return
            a, b = seq[0 : 2 * pairs : 2], seq[1 : 2 * pairs : 2]
            blocks = np.empty((pairs, _FIELDS))
            np.add(a[:, :3], b[:, :3], out=blocks[:, :3])
            np.minimum(a[:, 3], b[:, 3], out=blocks[:, 3])
            np.maximum(a[:, 4], b[:, 4], out=blocks[:, 4])

    def coarse(self, level: int) -> np.ndarray:
        """Means of the closed blocks of ``level`` (oldest first)."""
        self._fold()
        held = self.blocks[level, : self.sizes[level]]
        return held[:, 1] / held[:, 0]

    def variance(self, level: int) -> float:
        """Variance of the points covered by ``level``'s closed blocks (NaN if none)."""
        self._fold()
        held = self.blocks[level, : self.sizes[level]]
        n = held[:, 0].sum()
        if n == 0:
            return float("nan")
        mean = held[:, 1].sum() / n
        return float(max(held[:, 2].sum() / n - mean * mean, 0.0))

    def horizon(self, level: int) -> int:
        """Points covered by ``level`` when full."""
        return self.base * self.per_level * 2**level

    def state(self) -> dict:
        held = np.concatenate(self.held) if self.held else np.zeros(0)
        return {"blocks": self.blocks.copy(), "sizes": self.sizes.copy(),
                "closed": self.closed.copy(), "open": self.open.copy(), "held": held}

    def load(self, state: dict) -> None:
        self.blocks, self.sizes = state["blocks"].copy(), state["sizes"].copy()
        self.closed, self.open = state["closed"].copy(), state["open"].copy()
        held = state.get("held")  # absent from checkpoints written before holding
        self.held = [] if held is None or len(held) == 0 else [held.copy()]
        self._held_count = sum(len(h) for h in self.held)
