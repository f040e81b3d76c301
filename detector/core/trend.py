"""Trend and plateau tests on bounded windows.

Each function takes one window (a 1-D float array, oldest first) and returns
a small immutable result with the statistic and p-value, to be used as event
evidence. Windows are capped by the caller, so cost never grows with run length.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from detector.errors import InvalidArgument


@dataclass(frozen=True)
class TrendResult:
    test: str
    statistic: float
    p_value: float
    slope: float  # per point, Theil–Sen where available


def mann_kendall(y: np.ndarray) -> TrendResult:
    """Mann–Kendall trend test: S over all pairs, tie-corrected variance, normal
    approximation with continuity correction. O(n²) in numpy for the small
    windows used here (n ≤ a few hundred); the statistic reported is Kendall's tau-a.

    >>> mann_kendall(np.arange(20.0)).p_value < 1e-6
    True
    """
    n = len(y)
    if n < 3:
        return TrendResult("mann_kendall", 0.0, 1.0, 0.0)
    i, j = np.triu_indices(n, k=1)
    s = float(np.sign(y[j] - y[i]).sum())
    _, ties = np.unique(y, return_counts=True)
    var = (n * (n - 1) * (2 * n + 5) - float(np.sum(ties * (ties - 1) * (2 * ties + 5)))) / 18.0
    if var <= 0:  # constant window
        return TrendResult("mann_kendall", 0.0, 1.0, 0.0)
    z = (s - math.copysign(1.0, s)) / math.sqrt(var) if s != 0 else 0.0
    p = math.erfc(abs(z) / math.sqrt(2.0))
    slopes = (y[j] - y[i]) / (j - i)
    return TrendResult("mann_kendall", s / (n * (n - 1) / 2), p, float(np.median(slopes)))


def _theil_sen_slope(y: np.ndarray) -> float:
    """Median of pairwise slopes. O(n²): windows here are at most a few hundred points."""
    n = len(y)
    i, j = np.triu_indices(n, k=1)
    return float(np.median((y[j] - y[i]) / (j - i)))


def adf(y: np.ndarray, lags: int = 1) -> TrendResult:
    """Augmented Dickey–Fuller with a fixed lag (the automatic lag search is slow). O(n)."""
    from statsmodels.tsa.stattools import adfuller

    stat, p, *_ = adfuller(y, maxlag=lags, autolag=None)
    return TrendResult("adf", float(stat), float(p), 0.0)


def kpss(y: np.ndarray, lags: int = 4) -> TrendResult:
    """KPSS level-stationarity test; small p rejects stationarity. O(n)."""
    from statsmodels.tsa.stattools import kpss as _kpss

    with warnings.catch_warnings():
        # KPSS warns when p is outside its table; the clipped p is still usable.
        warnings.simplefilter("ignore")
        stat, p, *_ = _kpss(y, regression="c", nlags=lags)
    return TrendResult("kpss", float(stat), float(p), 0.0)


@functools.lru_cache(maxsize=256)
def _t_quantile(p: float, dof: int) -> float:
    # scipy's ppf costs tens of µs; the window length, hence dof, rarely changes.
    return float(stats.t.ppf(p, dof))


@dataclass(frozen=True)
class PlateauResult:
    is_plateau: bool
    slope: float  # per point
    ci_low: float  # total change over the window, lower confidence bound
    ci_high: float
    bound: float  # the ± equivalence margin


@dataclass(frozen=True)
class PlateauTest:
    """Equivalence test for a plateau: the slope's confidence interval, projected over
    the window, lies inside ±``min_delta`` (``rel``: times the window's mean level).
    O(n) for a window of n = ``patience`` points.

    >>> PlateauTest(min_delta=0.01, patience=10).test(np.full(10, 2.0) + 1e-4 * np.arange(10)).is_plateau
    True
    >>> PlateauTest(min_delta=0.01, patience=10).test(np.linspace(2.0, 1.0, 10)).is_plateau
    False
    """  # noqa: E501

    min_delta: float = 0.05
    patience: int = 20
    threshold_mode: str = "rel"
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.threshold_mode not in ("rel", "abs"):
            raise InvalidArgument(f"threshold_mode must be 'rel' or 'abs', got {self.threshold_mode!r}")
        if self.patience < 3 or self.min_delta < 0:
            raise InvalidArgument("patience must be >= 3 and min_delta >= 0")

    def test(self, y: np.ndarray) -> PlateauResult:
        n = len(y)
        t = np.arange(n, dtype=float)
        t -= t.mean()
        stt = float(t @ t)
        mean = float(y.mean())
        slope = float(t @ (y - mean)) / stt
        resid = y - mean - slope * t
        se = math.sqrt(max(float(resid @ resid), 0.0) / max(n - 2, 1) / stt)
        q = _t_quantile(0.5 + self.confidence / 2, max(n - 2, 1))
        span = n - 1
        low, high = (slope - q * se) * span, (slope + q * se) * span
        bound = self.min_delta * (abs(mean) if self.threshold_mode == "rel" else 1.0)
        return PlateauResult(
            is_plateau=bool(-bound <= low and high <= bound),
            slope=slope,
            ci_low=low,
            ci_high=high,
            bound=bound,
        )
