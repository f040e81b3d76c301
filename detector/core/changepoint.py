"""Two-stage change-point detection: a cheap vectorised trigger, then a bounded localiser.

:class:`CusumTrigger` scans blocks of points with numpy in O(1) amortised time
and memory per point: a Holt (level + trend) one-step-ahead forecast written as
a linear filter (``scipy.signal.lfilter``), innovations standardised by a
log-domain EWMA scale (also a linear filter, and robust: one outlier moves it
by a bounded factor), and a two-sided CUSUM on those standardised innovations.
The CUSUM runs on a fixed-point grid (integers), so a block computed with
``cumsum``/``minimum.accumulate`` gives exactly the same statistics as point by
point: how points are batched never changes a result.

When it alarms, :class:`WindowLocaliser` segments a bounded recent window
(ruptures ``Binseg`` over :class:`CostPiecewiseLinear`, vectorised split
search) and confirms each break only if its cost gain beats a penalty
``penalty × scale² × log n``, with ``scale`` a spread of the recent history
that survives trends and seasonality (see :func:`history_scale`). Slope changes
and level shifts both show as runs of same-signed innovations; a smooth decay
(a training loss) is absorbed by the forecast's trend term and, being smooth,
gains little from a break.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ruptures as rpt
from ruptures.base import BaseCost
from scipy.signal import lfilter, lfiltic

from detector.errors import InvalidArgument

_Q = 1 << 16  # fixed-point grid of the CUSUM (1/65536 of an innovation scale)
_Z_CLIP = 1e4  # |z| cap: keeps the int64 sums exact for any run length we will see
_LOG_ABS_Z_MEAN = -0.6351814227307391  # E[log |N(0,1)|] = -(γ + log 2) / 2
_TINY = 1e-300


@dataclass
class CusumTrigger:
    """Two-sided CUSUM on standardised Holt innovations. O(1) amortised per point.

    ``drift`` (k) and ``threshold`` (h) are in units of the innovation scale;
    ``alpha``/``beta`` smooth level and trend; ``scale_rate`` is the EWMA rate of
    ``log |innovation|``; ``warmup`` points set the first scale before any alarm.
    :meth:`scan` takes a block and stops at the first alarm (numpy, no Python per
    point); :meth:`update` is the one-point form and gives identical results.

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
        if not 0 < self.scale_rate < 1:
            raise InvalidArgument("scale_rate must be in (0, 1)")
        # Holt's innovations are an ARIMA(0,2,2) filter of the values:
        # (1 - B)² y_t = (1 - θ1 B - θ2 B²) e_t, θ1 = 2 - α - αβ, θ2 = α - 1.
        a, b = self.alpha, self.beta
        self._b = np.array([1.0, -2.0, 1.0])
        self._a = np.array([1.0, -(2.0 - a - a * b), -(a - 1.0)])
        self._sb = np.array([self.scale_rate])
        self._sa = np.array([1.0, -(1.0 - self.scale_rate)])
        self._hq = int(round(self.threshold * _Q))
        self._kq = int(round(self.drift * _Q))
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.zi = np.zeros(2)  # the innovation filter's state
        self.log_scale = 0.0  # EWMA of log |innovation|
        self.zs = np.zeros(1)  # the scale filter's state
        self.pos = 0  # CUSUM sums on the fixed-point grid
        self.neg = 0
        self.last_z = 0.0

    # --- readouts --------------------------------------------------------------

    @property
    def statistic(self) -> float:
        return max(self.pos, self.neg) / _Q

    @property
    def level(self) -> float:
        """The forecast of the next value (0 before any point)."""
        return float(-self.zi[0]) if self.n else 0.0

    @property
    def scale(self) -> float:
        """Robust scale of the innovations (σ-equivalent for Gaussian noise)."""
        return math.exp(self.log_scale - _LOG_ABS_Z_MEAN) if self.n > 1 else 0.0

    def clear(self) -> None:
        """Zero both CUSUM sums (after an alarm has been dealt with)."""
        self.pos = self.neg = 0

    # --- update ----------------------------------------------------------------

    def update(self, y: float) -> bool:
        """Take one finite value; return True when the CUSUM crosses its threshold."""
        return self.scan(np.array([y], dtype=float)) == 0

    def scan(self, values: np.ndarray) -> int | None:
        """Consume ``values`` up to and including the first alarm; return its index.

        Returns ``None`` (every value consumed) when no alarm occurs. O(m) for m
        values, in numpy; the state afterwards is the same as after ``update``
        on each consumed value.
        """
        values = np.asarray(values, dtype=float)
        i = 0
        m = len(values)
        while i < m and self.n < self.warmup:  # a few points per reset, one at a time
            self._warm(values[i])
            i += 1
        if i == m:
            return None
        block = values[i:]
        alarm = self._scan_block(block)
        return None if alarm is None else i + alarm

    def absorb(self, values: np.ndarray) -> None:
        """Consume every value without stopping at alarms. O(m) in numpy."""
        values = np.asarray(values, dtype=float)
        i = 0
        while i < len(values) and self.n < self.warmup:
            self._warm(values[i])
            i += 1
        if i < len(values):
            self._scan_block(values[i:], stop=False)

    def _warm(self, y: float) -> None:
        self.n += 1
        if self.n == 1:
            # Start flat at the first value: past inputs y, y and past innovations 0.
            self.zi = lfiltic(self._b, self._a, [0.0, 0.0], [y, y])
            return
        e, self.zi = lfilter(self._b, self._a, np.array([y]), zi=self.zi)
        log_abs = math.log(max(abs(float(e[0])), _TINY))
        # Warm-up: the mean of log |innovation| so far sets the initial scale.
        self.log_scale += (log_abs - self.log_scale) / (self.n - 1)
        if self.n == self.warmup:
            self.zs = np.array([(1.0 - self.scale_rate) * self.log_scale])

    def _scan_block(self, y: np.ndarray, stop: bool = True) -> int | None:
        e, zi = lfilter(self._b, self._a, y, zi=self.zi)
        log_abs = np.log(np.maximum(np.abs(e), _TINY))
        log_s, zs = lfilter(self._sb, self._sa, log_abs, zi=self.zs)
        lagged = np.empty_like(log_s)
        lagged[0] = self.log_scale
        lagged[1:] = log_s[:-1]
        forecast = y - e
        floor = np.log(np.maximum(1e-12 * np.maximum(1.0, np.abs(forecast)), _TINY))
        z = e / np.exp(np.maximum(lagged, floor) - _LOG_ABS_Z_MEAN)
        zq = np.rint(np.clip(z, -_Z_CLIP, _Z_CLIP) * _Q).astype(np.int64)
        pos = _lindley(zq - self._kq, self.pos)
        neg = _lindley(-zq - self._kq, self.neg)
        over = np.flatnonzero((pos > self._hq) | (neg > self._hq)) if stop else ()
        if len(over) == 0:
            self._commit(len(y), zi, zs, float(log_s[-1]), int(pos[-1]), int(neg[-1]), float(z[-1]))
            return None
        k = int(over[0])
        # Rerun the linear filters to the alarm so their state stops exactly there.
        _, zi = lfilter(self._b, self._a, y[: k + 1], zi=self.zi)
        _, zs = lfilter(self._sb, self._sa, log_abs[: k + 1], zi=self.zs)
        self._commit(k + 1, zi, zs, float(log_s[k]), int(pos[k]), int(neg[k]), float(z[k]))
        return k

    def _commit(self, count: int, zi: np.ndarray, zs: np.ndarray, log_scale: float,
                pos: int, neg: int, z: float) -> None:
        self.n += count
        self.zi, self.zs, self.log_scale = zi, zs, log_scale
        self.pos, self.neg, self.last_z = pos, neg, z

    # --- checkpoints -----------------------------------------------------------

    def state(self) -> dict:
        return {
            "n": self.n, "zi": self.zi.tolist(), "zs": self.zs.tolist(), "log_scale": self.log_scale,
            "pos": self.pos, "neg": self.neg, "last_z": self.last_z,
        }

    def load(self, state: dict) -> None:
        self.n, self.log_scale = state["n"], state["log_scale"]
        self.zi, self.zs = np.array(state["zi"], dtype=float), np.array(state["zs"], dtype=float)
        self.pos, self.neg, self.last_z = state["pos"], state["neg"], state["last_z"]


def _lindley(x: np.ndarray, start: int) -> np.ndarray:
    """``s_t = max(0, s_{t-1} + x_t)`` from ``s_0 = start``, on int64: exact, O(m) in numpy."""
    c = np.cumsum(x)
    return c - np.minimum(np.minimum.accumulate(c), -start)


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
    least-squares solve per candidate: fit is O(n), each ``error`` O(1), and
    :meth:`errors` scores many segments at once in numpy.
    """

    model = "piecewise_linear"
    min_size = 3

    def fit(self, signal: np.ndarray) -> CostPiecewiseLinear:
        y = np.asarray(signal, dtype=float).reshape(-1)
        self.signal = y.reshape(-1, 1)  # ruptures' searches read the length from here
        # Centre values and times on the window so the sums stay well conditioned.
        n = len(y)
        y = y - (y.mean() if n else 0.0)
        t = np.arange(n, dtype=float) - (n - 1) / 2.0
        terms = np.empty((6, n))
        terms[0], terms[1], terms[2], terms[3], terms[4], terms[5] = 1.0, t, t * t, y, t * y, y * y
        self._s = np.zeros((6, n + 1))
        np.cumsum(terms, axis=1, out=self._s[:, 1:])
        return self

    def errors(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        n, st, stt, sy, sty, syy = self._s[:, ends] - self._s[:, starts]
        mean_t, mean_y = st / n, sy / n
        vtt = stt - n * mean_t * mean_t
        vty = sty - n * mean_t * mean_y
        vyy = syy - n * mean_y * mean_y
        safe = np.where(vtt > 0, vtt, 1.0)
        return np.maximum(np.where(vtt > 0, vyy - vty * vty / safe, vyy), 0.0)

    def error(self, start: int, end: int) -> float:
        return float(self.errors(np.array([start]), np.array([end]))[0])


class _VectorBinseg(rpt.Binseg):
    """ruptures' binary segmentation with the split search of one segment in numpy.

    Same result as ``rpt.Binseg`` with ``jump=1`` (largest gain, ties to the later
    index) for a cost with a vectorised ``errors``; O(n) per segment searched.
    """

    def fit(self, signal: np.ndarray) -> _VectorBinseg:
        # As ruptures' fit, without clearing the lru_cache that this single_bkp does not use.
        self.signal = signal.reshape(-1, 1) if signal.ndim == 1 else signal
        self.n_samples = self.signal.shape[0]
        self.cost.fit(signal)
        return self

    def single_bkp(self, start: int, end: int) -> tuple[int | None, float]:
        candidates = np.arange(start + self.min_size, end - self.min_size + 1)
        if len(candidates) == 0:
            return None, 0
        whole = self.cost.errors(np.array([start]), np.array([end]))[0]
        gains = (whole - self.cost.errors(np.full_like(candidates, start), candidates)
                 - self.cost.errors(candidates, np.full_like(candidates, end)))
        best = len(gains) - 1 - int(np.argmax(gains[::-1]))
        return int(candidates[best]), float(gains[best])


def history_scale(history: np.ndarray) -> float:
    """Spread of the recent history used to scale the penalty: its standard deviation. O(n).

    Level shifts, trends, seasonality and recurring patterns of the last
    ``window`` points all count as variation, so only breaks that stand out
    against what the series normally does are confirmed, and a smooth or
    seasonal series is not cut at every wiggle. (A MAD of first differences, by
    contrast, sees only the point-to-point noise of a smooth series: with it a
    BIC penalty scores below "no change points" on TCPD; so did the MAD of
    residuals around local lines, which we measured too.)
    """
    return float(np.std(history)) if len(history) > 1 else 0.0


def point_noise(history: np.ndarray) -> float:
    """Point-to-point noise: MAD of first differences / √2 (σ for white noise). O(n).

    Blind to level shifts and trends, and too small alone for smooth series,
    so it only sets a floor under the penalty on noisy, structureless data.
    """
    if len(history) < 3:
        return 0.0
    d = np.diff(history)
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)


@dataclass(frozen=True)
class WindowLocaliser:
    """Find and confirm breaks in a bounded window with ruptures' binary segmentation.

    Binary segmentation over :class:`CostPiecewiseLinear` with the penalty
    ``(penalty × scale² + noise_penalty × noise²) × log n`` for the window's n
    points: ``scale`` from :func:`history_scale` (the spread of the caller's
    recent history: structure counts as variation) and ``noise`` from
    :func:`point_noise` (a floor for structureless noise, where the spread alone
    would let the maximum over split points through too often). O(n) per break found,
    n capped by the caller (the series window), independent of run length.

    >>> loc = WindowLocaliser()
    >>> rng = np.random.default_rng(0)
    >>> y = np.r_[rng.normal(0, 1, 60), rng.normal(5, 1, 40)]
    >>> [(s.index, s.confirmed) for s in loc.locate(y, scale=1.0, noise=1.0)]
    [(60, True)]
    """

    penalty: float = 2.0
    noise_penalty: float = 4.0
    min_size: int = 4

    def __post_init__(self) -> None:
        if self.penalty <= 0 or self.noise_penalty < 0 or self.min_size < 3:
            raise InvalidArgument("penalty must be > 0, noise_penalty >= 0 and min_size >= 3")

    def locate(self, y: np.ndarray, scale: float | None = None, noise: float | None = None) -> list[Split]:
        """Confirmed breaks of ``y`` in order (empty when none beats the penalty)."""
        n = len(y)
        if n < 2 * self.min_size + 1:
            return []
        if scale is None:
            scale = history_scale(y)
        if noise is None:
            noise = point_noise(y)
        scale = max(scale, 1e-12 * max(1.0, float(np.max(np.abs(y)))), _TINY)
        penalty = (self.penalty * scale * scale + self.noise_penalty * noise * noise) * math.log(n)
        cost = CostPiecewiseLinear()
        algo = _VectorBinseg(custom_cost=cost, min_size=self.min_size, jump=1).fit(y)
        if algo.single_bkp(0, n)[1] <= penalty:
            return []  # Binseg's first split is the best single one: nothing would be confirmed
        bkps = algo.predict(pen=penalty)[:-1]
        splits = []
        edges = [0, *bkps, n]
        for left, index, right in zip(edges, edges[1:], edges[2:], strict=False):
            gain = cost.error(left, right) - cost.error(left, index) - cost.error(index, right)
            splits.append(Split(index=int(index), gain=float(gain), penalty=float(penalty), noise=scale))
        return splits
