"""Two-stage change-point detection: a cheap trigger, then a bounded localiser.

:class:`CusumTrigger` runs on every point in O(1): a Holt (level + trend)
one-step-ahead forecast, robustly standardised innovations, and a two-sided
CUSUM on them. When it alarms, :class:`WindowLocaliser` fits a piecewise-linear
model with one break to a bounded recent window using ruptures, and confirms
the break only if its cost gain beats a penalty scaled by a robust noise
estimate. Slope changes and level shifts both show as runs of same-signed
innovations; a smooth decay (a training loss) is absorbed by the trend term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ruptures as rpt
from ruptures.base import BaseCost

from detector.errors import InvalidArgument


@dataclass
class CusumTrigger:
    """Two-sided CUSUM on standardised Holt innovations. O(1) time and memory per point.

    ``drift`` (k) and ``threshold`` (h) are in units of the innovation scale;
    ``alpha``/``beta`` smooth level and trend; ``warmup`` points set the scale
    before any alarm.

    >>> trigger = CusumTrigger()
    >>> values = [0.0, 0.1, -0.1, 0.05] * 10 + [3.0] * 10
    >>> [i for i, v in enumerate(values) if trigger.update(v)][:1]
    [40]
    """

    drift: float = 0.5
    threshold: float = 5.0
    alpha: float = 0.3
    beta: float = 0.05
    warmup: int = 8
    scale_rate: float = 0.05

    def __post_init__(self) -> None:
        if not (0 < self.alpha <= 1 and 0 <= self.beta <= 1):
            raise InvalidArgument("alpha must be in (0, 1] and beta in [0, 1]")
        if self.threshold <= 0 or self.drift < 0 or self.warmup < 2:
            raise InvalidArgument("threshold must be > 0, drift >= 0, warmup >= 2")
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.level = 0.0
        self.trend = 0.0
        self.scale = 0.0
        self.pos = 0.0
        self.neg = 0.0
        self.last_z = 0.0

    @property
    def statistic(self) -> float:
        return max(self.pos, self.neg)

    def update(self, y: float) -> bool:
        """Take one finite value; return True when the CUSUM crosses its threshold."""
        self.n += 1
        if self.n == 1:
            self.level = y
            return False
        forecast = self.level + self.trend
        innovation = y - forecast
        if self.n <= self.warmup:
            # Mean absolute innovation over the warm-up sets the initial scale.
            self.scale += (abs(innovation) - self.scale) / (self.n - 1)
            self._smooth(y, forecast)
            return False
        scale = max(self.scale, 1e-12 * max(1.0, abs(self.level)), 1e-300)
        z = innovation / (1.2533 * scale)  # mean |N(0,1)| = 0.7979 = 1/1.2533
        self.last_z = z
        self.pos = max(0.0, self.pos + z - self.drift)
        self.neg = max(0.0, self.neg - z - self.drift)
        # Clipped updates keep one outlier from inflating the scale or the level.
        clipped = max(-3.0, min(3.0, z)) * 1.2533 * scale
        self.scale += self.scale_rate * (min(abs(innovation), 3.0 * 1.2533 * scale) - self.scale)
        self._smooth(forecast + clipped, forecast)
        return self.statistic > self.threshold

    def _smooth(self, y: float, forecast: float) -> None:
        level = self.alpha * y + (1 - self.alpha) * forecast
        self.trend = self.beta * (level - self.level) + (1 - self.beta) * self.trend
        self.level = level

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("n", "level", "trend", "scale", "pos", "neg", "last_z")}

    def load(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class Split:
    """A confirmed or rejected break in a window: ``index`` starts the new segment."""

    index: int
    gain: float
    penalty: float
    noise: float

    @property
    def confirmed(self) -> bool:
        return self.gain > self.penalty


class CostPiecewiseLinear(BaseCost):
    """Squared error of a straight-line fit on a segment, O(1) per segment from prefix sums.

    The same cost as ruptures' ``CostLinear`` with regressors ``[1, t]``, without a
    least-squares solve per candidate: fit is O(n), each ``error`` O(1).
    """

    model = "piecewise_linear"
    min_size = 3

    def fit(self, signal: np.ndarray) -> CostPiecewiseLinear:
        y = np.asarray(signal, dtype=float).reshape(-1)
        self.signal = y.reshape(-1, 1)  # ruptures' searches read the length from here
        t = np.arange(len(y), dtype=float)
        zero = np.zeros(1)
        self._s = [np.r_[zero, np.cumsum(v)] for v in (np.ones_like(y), t, t * t, y, t * y, y * y)]
        return self

    def error(self, start: int, end: int) -> float:
        n, st, stt, sy, sty, syy = (v[end] - v[start] for v in self._s)
        # Centre on the segment so the 2x2 solve stays well conditioned.
        mean_t, mean_y = st / n, sy / n
        vtt = stt - n * mean_t * mean_t
        vty = sty - n * mean_t * mean_y
        vyy = syy - n * mean_y * mean_y
        if vtt <= 0:
            return float(max(vyy, 0.0))
        return float(max(vyy - vty * vty / vtt, 0.0))


@dataclass(frozen=True)
class WindowLocaliser:
    """Locate one break in a bounded window with ruptures' piecewise-linear cost.

    Cost O(n) for the window's n points with ``Binseg`` (one break) over
    :class:`CostPiecewiseLinear` (n is capped by the caller, a few hundred
    points), independent of run length.
    The penalty is ``penalty * noise² * log(n)`` where ``noise`` is a robust
    (MAD) scale of the residuals of the two-piece fit, so trends and level do
    not inflate it.

    >>> loc = WindowLocaliser()
    >>> rng = np.random.default_rng(0)
    >>> y = np.r_[rng.normal(0, 1, 60), rng.normal(5, 1, 40)]
    >>> split = loc.locate(y)
    >>> split.index, split.confirmed
    (60, True)
    """

    penalty: float = 12.0
    min_size: int = 4

    def locate(self, y: np.ndarray) -> Split | None:
        n = len(y)
        if n < 2 * self.min_size + 1:
            return None
        cost = CostPiecewiseLinear()
        algo = rpt.Binseg(custom_cost=cost, min_size=self.min_size, jump=1).fit(y)
        index = algo.predict(n_bkps=1)[0]
        if index <= 0 or index >= n:
            return None
        gain = cost.error(0, n) - cost.error(0, index) - cost.error(index, n)
        residuals = np.r_[_linear_residuals(y[:index]), _linear_residuals(y[index:])]
        noise = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
        noise = max(noise, float(np.std(residuals)) * 0.1, 1e-12 * max(1.0, float(np.max(np.abs(y)))))
        penalty = self.penalty * noise * noise * math.log(n)
        return Split(index=index, gain=float(gain), penalty=float(penalty), noise=noise)


def _linear_residuals(y: np.ndarray) -> np.ndarray:
    if len(y) < 3:
        return y - y.mean()
    t = np.arange(len(y), dtype=float)
    slope, intercept = np.polyfit(t, y, 1)
    return y - (slope * t + intercept)
