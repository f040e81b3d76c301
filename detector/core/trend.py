"""Trend and plateau tests on bounded windows.

Each function takes one window (a 1-D float array, oldest first) and returns
a small immutable result with the statistic and p-value, to be used as event
evidence. Windows are capped by the caller, so cost never grows with run length.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from detector.core import _kernels as _k
from detector.errors import InvalidArgument


@dataclass(frozen=True)
class TrendResult:
    test: str
    statistic: float
    p_value: float
    slope: float  # per point: the median of pairwise slopes (Mann–Kendall's own)


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
    finite, s, tie_term, slope = _k.mann_kendall_sums(np.ascontiguousarray(y, dtype=float))
    if finite and slope != 0.0:  # the sums below, compiled (tests/test_kernels.py compares)
        # (A zero median may be +0 or −0 depending on the selection algorithm: numpy's below.)
        return _mann_kendall_result(n, s, tie_term, slope)
    i, j, gaps = _pairs(n)
    diffs = y[j] - y[i]
    s = float(np.count_nonzero(diffs > 0) - np.count_nonzero(diffs < 0))
    tie_term = 0.0
    ordered = np.sort(y)
    tied = ordered[1:] == ordered[:-1]
    if tied.any():  # rare for real-valued metrics: the tie correction only then
        edges = np.flatnonzero(~tied)
        ties = np.diff(np.concatenate(([-1], edges, [n - 1]))).astype(float)  # runs of equal values
        tie_term = float(np.sum(ties * (ties - 1) * (2 * ties + 5)))
    return _mann_kendall_result(n, s, tie_term, _median(diffs / gaps))


def _mann_kendall_result(n: int, s: float, tie_term: float, slope: float) -> TrendResult:
    var = (n * (n - 1) * (2 * n + 5) - tie_term) / 18.0
    if var <= 0:  # constant window
        return TrendResult("mann_kendall", 0.0, 1.0, 0.0)
    z = (s - math.copysign(1.0, s)) / math.sqrt(var) if s != 0 else 0.0
    p = math.erfc(abs(z) / math.sqrt(2.0))
    return TrendResult("mann_kendall", s / (n * (n - 1) / 2), p, slope)


def _median(x: np.ndarray) -> float:
    """``np.median`` of a finite array, by one partition (np.median's dispatch costs
    more than the partition on the few hundred slopes of a trend window)."""
    m = len(x)
    half = m // 2
    if m % 2:
        return float(np.partition(x, half)[half])
    low, high = np.partition(x, (half - 1, half))[half - 1 : half + 1]
    return float((low + high) / 2.0)


@functools.lru_cache(maxsize=8)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index pairs i < j of n points and their gaps j - i (as floats), built once per n."""
    i, j = np.triu_indices(n, k=1)
    return i, j, (j - i).astype(float)


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
class PlateauArrays:
    """:class:`PlateauResult` fields for many windows at once (numpy arrays)."""

    is_plateau: np.ndarray
    slope: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    bound: np.ndarray

    def __getitem__(self, i: int) -> PlateauResult:
        return PlateauResult(bool(self.is_plateau[i]), float(self.slope[i]), float(self.ci_low[i]),
                             float(self.ci_high[i]), float(self.bound[i]))


@dataclass(frozen=True)
class PlateauTest:
    """Equivalence test for a plateau: the slope's confidence interval, projected over
    the window, lies inside ±``min_delta`` (``rel``: times the window's mean level),
    the two one-sided tests (TOST) of "no change larger than ``min_delta``" at
    level ``(1 - confidence) / 2`` each. ``patience`` is the window, in points.
    O(n) for a window of n = ``patience`` points; :meth:`test_sliding` scores every
    window of a block in O(patience) numpy operations.

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
        if not 0 < self.confidence < 1:
            raise InvalidArgument("confidence must be in (0, 1)")

    def test(self, y: np.ndarray) -> PlateauResult:
        """Test one window (any length >= 3)."""
        return _plateau_windows(np.asarray(y, dtype=float), len(y), self)[0]

    def test_sliding(self, y: np.ndarray) -> PlateauArrays:
        """Test every window of ``patience`` consecutive points of ``y``.

        The result for a window depends only on its points (column-wise sums in
        a fixed order), so a block gives exactly what one window at a time gives.
        """
        return _plateau_windows(np.asarray(y, dtype=float), self.patience, self)


def _plateau_windows(y: np.ndarray, n: int, test: PlateauTest) -> PlateauArrays:
    # Compiled (detector.core._kernels.plateau_windows): each window's sums are taken
    # over its points in order, as numpy's row-after-row reduction of the (n, m)
    # array of shifted copies took them before, so a block gives exactly what one
    # window at a time gives.
    q = _t_quantile(0.5 + test.confidence / 2, max(n - 2, 1))
    rows = _k.plateau_windows(np.ascontiguousarray(y, dtype=float), n, q, test.min_delta,
                              test.threshold_mode == "rel")
    return PlateauArrays(rows[0] > 0.0, rows[1], rows[2], rows[3], rows[4])
