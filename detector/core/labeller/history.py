"""Small, bounded summaries of one series that the labeller's rules read.

* :class:`Band`: the recent level of a series (median of its last values that
  were not part of an excursion) and its typical line-to-line change.
* :class:`StepHistory`: the series' means over bins of steps, at most a fixed
  number of bins since a start; bins lie on a grid of steps that widens as the
  run grows, the same whatever the logging cadence;
  :func:`halves` reads how far it fell over a look-back, and how surely
  (:func:`median` is the labeller's median of a few values).

Both are plain data (``state()`` / ``from_state()`` give and take dicts of
numbers and lists).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque

import numpy as np


class Band:
    """Recent level and robust noise of a series, from the values it is given.

    ``level`` is the median of the last ``size`` values; ``noise`` the smaller
    of two exponentially weighted (1/10 per value, plain mean over the first
    ten) means: of the absolute differences of consecutive values, and of the
    absolute second differences scaled to agree with them on white noise (a
    steady trend between lines is not noise). O(size) a value, O(size) memory.

    >>> band = Band(5)
    >>> for v in [1.0, 1.1, 0.9, 1.0, 1.05]:
    ...     band.add(v)
    >>> band.level, round(band.noise, 3)
    (1.0, 0.113)
    """

    def __init__(self, size: int = 9) -> None:
        self.size = size
        self.values: deque[float] = deque(maxlen=size)
        self.first_noise = 0.0
        self.second_noise = 0.0
        self.diffs = 0
        self._level = math.nan

    def add(self, value: float) -> None:
        if self.values:
            # The smaller of two estimates: mean absolute first differences, and second
            # differences scaled to match them on white noise (0.58): a steady trend
            # between lines is not noise (a decaying loss logged every 50 steps moves
            # 0.05 decades a line with almost no noise), nor is a sharp bend.
            self.diffs += 1
            self.first_noise += (abs(value - self.values[-1]) - self.first_noise) / min(self.diffs, 10)
            if len(self.values) >= 2 and self.diffs >= 2:
                second = 0.58 * abs(value - 2 * self.values[-1] + self.values[-2])
                self.second_noise += (second - self.second_noise) / min(self.diffs - 1, 10)
        self.values.append(value)
        self._level = math.nan

    def restart_noise(self) -> None:
        """Measure the noise afresh from the next value on (the level keeps its values):
        a new regime's noise, not the steps of the trend that led to it."""
        self.first_noise = self.second_noise = 0.0
        self.diffs = 0

    @property
    def noise(self) -> float:
        return min(self.first_noise, self.second_noise) if self.diffs >= 2 else self.first_noise

    @property
    def ready(self) -> bool:
        return len(self.values) >= 3

    @property
    def level(self) -> float:
        if math.isnan(self._level) and self.values:
            self._level = median(list(self.values))
        return self._level

    def level_of_last(self, count: int) -> float:
        """Median of the last ``count`` values (:attr:`level` for all of them). O(size log size).

        >>> band = Band(5)
        >>> for v in [0.2, 0.5, 0.9, 1.0]:
        ...     band.add(v)
        >>> band.level_of_last(2), band.level_of_last(9)
        (0.95, 0.7)
        """
        if count >= len(self.values):
            return self.level
        return median(list(self.values)[-count:])

    def buffer(self) -> tuple[np.ndarray, int]:
        """The values, oldest first, in an array of ``size`` (for a compiled loop) and their count."""
        out = np.empty(self.size)
        n = len(self.values)
        out[:n] = list(self.values)
        return out, n

    def take(self, values: np.ndarray, n: int, first_noise: float, second_noise: float, diffs: int) -> None:
        """The state a compiled loop left (:meth:`buffer`'s array and count, the noise sums)."""
        self.values = deque(values[:n].tolist(), maxlen=self.size)
        self.first_noise, self.second_noise, self.diffs = first_noise, second_noise, diffs
        self._level = math.nan

    @property
    def recent(self) -> float:
        """Median of the last three values: the level now, robust to one noisy line,
        lagging a trend by one line."""
        a, b, c = self.values[-3], self.values[-2], self.values[-1]
        return max(min(a, b), min(max(a, b), c))

    def scale(self, factor: float) -> None:
        """Rescale every value (an accuracy found to be in percent)."""
        self.values = deque((v * factor for v in self.values), maxlen=self.size)
        self.first_noise *= factor
        self.second_noise *= factor
        self._level = math.nan

    def state(self) -> dict:
        return {"size": self.size, "values": list(self.values), "diffs": self.diffs,
                "first_noise": self.first_noise, "second_noise": self.second_noise}

    @classmethod
    def from_state(cls, state: dict) -> Band:
        band = cls(state["size"])
        band.values.extend(state["values"])
        band.diffs = state["diffs"]
        band.first_noise, band.second_noise = state["first_noise"], state["second_noise"]
        return band


class StepHistory:
    """Means of a series over bins of steps: at most ``capacity`` bins.

    Bins lie on a grid of steps: bin k of width w holds steps [k w, (k + 1) w).
    The width starts at one step and doubles (neighbouring bins merge) whenever
    the grid from the first bin to the newest would need more than ``capacity``
    bins. So the width, and where every bin starts, depend on the steps alone:
    a series logged every step, every 10 or every 50 has the same bins (a sparse
    log leaves some empty), and opens them at the same steps to within its
    interval. O(1) amortised a value (O(capacity) per doubling, O(log steps)
    doublings a run), O(capacity) memory.

    >>> h = StepHistory(8)
    >>> for step in range(0, 100, 5):
    ...     _ = h.add(step, float(step))
    >>> len(h.starts) <= 8, h.width, h.starts[:3], round(float(h.means()[-1]), 1)
    (True, 16, [0, 16, 32], 87.5)
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self.width = 0  # 0: nothing added yet (one step from the first value on)
        self.starts: list[int] = []
        self.sums: list[float] = []
        self.counts: list[int] = []

    def add(self, step: int, value: float) -> bool:
        """Add a value; True when it opened a new bin."""
        width = max(self.width, 1)
        if self.starts and step < self.starts[-1] + width:
            self.sums[-1] += value
            self.counts[-1] += 1
            return False
        self.starts.append(step - step % width)
        self.sums.append(value)
        self.counts.append(1)
        while self.starts[-1] - self.starts[0] >= self.capacity * width:
            width *= 2
            self._regrid(width)
        self.width = width
        return True

    def _regrid(self, width: int) -> None:
        """Merge the bins that share a bin of ``width`` steps (twice the old width)."""
        starts: list[int] = []
        sums: list[float] = []
        counts: list[int] = []
        for start, total, count in zip(self.starts, self.sums, self.counts, strict=True):
            cell = start - start % width
            if starts and starts[-1] == cell:
                sums[-1] += total
                counts[-1] += count
            else:
                starts.append(cell)
                sums.append(total)
                counts.append(count)
        self.starts, self.sums, self.counts = starts, sums, counts

    def __len__(self) -> int:
        return len(self.starts)

    def means(self) -> np.ndarray:
        return np.asarray(self.sums) / np.asarray(self.counts)

    def mean_at(self, step: int) -> float:
        """The mean of the bin that holds ``step`` (the first bin before it starts)."""
        if not self.starts:
            return math.nan
        i = max(0, bisect_right(self.starts, step) - 1)
        return self.sums[i] / self.counts[i]

    def state(self) -> dict:
        return {"capacity": self.capacity, "width": self.width, "starts": list(self.starts),
                "sums": list(self.sums), "counts": list(self.counts)}

    @classmethod
    def from_state(cls, state: dict) -> StepHistory:
        history = cls(state["capacity"])
        history.width = state["width"]
        history.starts, history.sums, history.counts = (
            list(state["starts"]), list(state["sums"]), list(state["counts"]))
        return history


def halves(history: StepHistory, step: int, look_back: float) -> tuple[float, np.ndarray, float] | None:
    """Twice the difference of the medians of ``history``'s bin means over the older
    and the newer half of the ``look_back`` steps before ``step`` (its fall over the
    look-back, in the history's units: decades for a loss), the newer half's means,
    and the fall's standard error (each median's: 1.25 σ / √n, σ from the half's
    median absolute deviation); None with fewer than two bins in either half (so
    neither noise nor a spike flips the phase). O(bins)."""
    # Plain lists: a few dozen bins, where numpy's per-call cost (four medians) was
    # most of the labeller's time at a bin opening. The same floats as numpy's.
    begin, middle = step - look_back, step - look_back / 2
    old: list[float] = []
    new: list[float] = []
    for start, total, count in zip(history.starts, history.sums, history.counts, strict=True):
        if start >= middle:
            new.append(total / count)
        elif start >= begin:
            old.append(total / count)
    if len(old) < 2 or len(new) < 2:
        return None
    centre_old, centre_new = median(old), median(new)
    spread = sum((1.2533 * 1.4826 * median([abs(v - m) for v in x])) ** 2 / len(x)
                 for x, m in ((old, centre_old), (new, centre_new)))
    return 2 * (centre_old - centre_new), np.asarray(new), 2 * math.sqrt(spread)


def median(values: list[float]) -> float:
    """The median of a non-empty list, the same float as numpy's (the middle two
    halved). O(n log n)."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
