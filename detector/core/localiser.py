"""The change-point localiser: where a break is, and whether it is one.

When the trigger (:mod:`detector.core.trigger`) alarms, :class:`WindowLocaliser`
segments a bounded recent window (ruptures' ``Binseg`` over
:class:`CostPiecewiseLinear`, run as one compiled loop with the same result)
and confirms each break only if its cost gain beats a penalty ``penalty ×
scale² × log n``, with ``scale`` a spread of the recent history that survives
trends and seasonality (see :func:`history_scale`); a level shift on a shared
slope (one parameter, not a new line's two) is tested beside it with
``shift_penalty`` times that penalty, and placed where the step is (two free
lines put a small step's break tens of points early). A smooth decay (a
training loss) gains little from a break, and a break that a single parabola
over its two segments explains nearly as well is dropped
(``curvature_penalty``), so a power-law decay is not cut into lines. As in
ruptures, the cost and the search are separate classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
from ruptures.base import BaseCost

from detector.core import _kernels as _k
from detector.core._kernels import TINY as _TINY
from detector.errors import InvalidArgument


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
    :meth:`split_gains` and :meth:`shift_gains` score every split point of a
    segment at once in numpy. The localiser takes the best of each from the
    compiled :func:`_kernels.best_split` and :func:`_kernels.best_shift`, which
    compute the same gains in the same order (tests/test_kernels.py compares).

    >>> y = np.r_[np.zeros(20), np.ones(10)] + 0.05 * np.arange(30)
    >>> candidates, gains = CostPiecewiseLinear().fit(y).shift_gains(0, 30, 4)
    >>> int(candidates[_last_argmax(gains)])
    20
    """

    model = "piecewise_linear"
    min_size = 3

    def fit(self, signal: np.ndarray) -> CostPiecewiseLinear:
        y = np.ascontiguousarray(signal, dtype=float).reshape(-1)
        self.signal = y.reshape(-1, 1)  # ruptures' searches read the length from here
        # Values centred on the window keep the sums well conditioned; the sums of
        # 1, t and t² over the first k points are closed forms (exact in float64).
        self._s = _k.cost_sums(y)
        return self

    @staticmethod
    def _sse(sums: np.ndarray) -> np.ndarray:
        """Squared error of the least-squares line from its sums (rows n, Σt, Σt², Σy, Σty, Σy²)."""
        n, st, stt, sy, sty, syy = sums
        n = np.maximum(n, 1.0)
        vtt = stt - st * st / n
        vty = sty - st * sy / n
        vyy = syy - sy * sy / n
        safe = np.where(vtt > 0, vtt, 1.0)
        return np.maximum(np.where(vtt > 0, vyy - vty * vty / safe, vyy), 0.0)

    @classmethod
    def _from_sums(cls, y: np.ndarray, sums: np.ndarray) -> CostPiecewiseLinear:
        """The cost fitted to ``y`` whose sums (:func:`_kernels.cost_sums`) are already known."""
        cost = cls()
        cost.signal, cost._s = y.reshape(-1, 1), sums
        return cost

    def error(self, start: int, end: int) -> float:
        return _k.segment_error(self._s, start, end)

    def split_gains(self, start: int, end: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Gain of one line → two lines at every split of ``[start, end)``, each side at
        least ``min_size`` points: ``(candidates, gains)``. O(end − start), slices only."""
        lo, hi = start + min_size, end - min_size + 1
        if hi <= lo:
            return np.arange(0), np.zeros(0)
        whole = self._sse(self._s[:, end] - self._s[:, start])
        # Σ(t − t̄)² of consecutive times depends on the length only: L (L² − 1) / 12.
        sy, sty, syy = self._s[3:, lo:hi]
        candidates = np.arange(lo, hi)
        splits = candidates.astype(float)
        left = self._line_sse(splits - start, (start + splits - 1.0) / 2.0,
                              sy - self._s[3, start], sty - self._s[4, start], syy - self._s[5, start])
        right = self._line_sse(end - splits, (splits + end - 1.0) / 2.0,
                               self._s[3, end] - sy, self._s[4, end] - sty, self._s[5, end] - syy)
        return candidates, whole - left - right

    @staticmethod
    def _line_sse(n: np.ndarray, mean_t: np.ndarray, sy: np.ndarray, sty: np.ndarray,
                  syy: np.ndarray) -> np.ndarray:
        """:meth:`_sse` of segments of consecutive times (n ≥ 2 points, mean time ``mean_t``)."""
        vtt = n * (n * n - 1.0) / 12.0
        vty = sty - mean_t * sy
        return np.maximum(syy - sy * sy / n - vty * vty / vtt, 0.0)

    def shift_gains(self, start: int, end: int, min_size: int,
                    last_min_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Gain of one line → one line plus a level step at every index of ``[start, end)``.

        The slope is shared, so a mean shift of a trending series costs one
        parameter, not the two of a new line, and is placed where it happened
        (two free lines put the break of a small shift tens of points early,
        letting the new line's slope take up the step). The gain is
        ``(Σ_{t≥τ} e_t)² / ‖u⊥‖²`` with ``e`` the residuals of the single line and
        ``u⊥`` the step indicator orthogonal to ``[1, t]``. ``last_min_size``
        (default ``min_size``) lets the new segment be shorter than the first,
        so a shift near the end is seen early. O(end − start), slices only.
        """
        last = min_size if last_min_size is None else last_min_size
        lo, hi = start + min_size, end - last + 1
        n = end - start
        if hi <= lo or n < 3:
            return np.arange(0), np.zeros(0)
        whole = self._s[:, end] - self._s[:, start]
        tail = self._s[:, end : end + 1] - self._s[:, lo:hi]  # sums over [τ, end)
        mean_t, mean_y = whole[1] / n, whole[3] / n
        stt = whole[2] - n * mean_t * mean_t
        slope = (whole[4] - n * mean_t * mean_y) / stt
        m = tail[0]
        tail_t = tail[1] - m * mean_t  # Σ_{t≥τ} (t − t̄)
        tail_e = tail[3] - m * mean_y - slope * tail_t
        norm = m - m * m / n - tail_t * tail_t / stt
        gains = np.where(norm > 1e-9, tail_e * tail_e / np.maximum(norm, 1e-9), 0.0)
        return np.arange(lo, hi), gains


def _noise_used(given: float | None, measured: bool, noise: float) -> float | None:
    """The point noise a look used: the one given, the one it measured, or None."""
    return given if given is not None else (noise if measured else None)


def _last_argmax(values: np.ndarray) -> int:
    """Index of the largest value, ties to the later one (as ruptures' Binseg). O(n)."""
    return len(values) - 1 - int(np.argmax(values[::-1]))


def _splits(indices: np.ndarray, gains: np.ndarray, penalties: np.ndarray, scale: float) -> list[Split]:
    """The :class:`Split` of each break of :func:`_kernels.localiser_confirm`'s result. O(breaks)."""
    return [Split(index=int(i), gain=float(g), penalty=float(p), noise=scale)
            for i, g, p in zip(indices.tolist(), gains.tolist(), penalties.tolist(), strict=True)]


def _parabola_sse(y: np.ndarray) -> float:
    """Squared error of the least-squares parabola through ``y``. O(n).

    On times centred on the window, 1, t and t² − mean(t²) are orthogonal, so the
    fit is three projections (no least-squares solve).
    """
    n = len(y)
    if n <= 3:
        return 0.0
    yc, t, q = _k.parabola_basis(np.ascontiguousarray(y, dtype=float))
    a, b, c = float(yc @ yc), float(yc @ t), float(yc @ q)
    tt, qq = _basis_norms(n, t, q)
    return max(a - b * b / tt - c * c / qq, 0.0)


_BASIS_NORMS: dict[int, tuple[float, float]] = {}


def _basis_norms(n: int, t: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """``t @ t`` and ``q @ q`` of :func:`_parabola_sse`'s basis, once per window length
    (the same values give the same BLAS sums)."""
    norms = _BASIS_NORMS.get(n)
    if norms is None:
        if len(_BASIS_NORMS) >= 4096:  # windows are capped by the caller; this only bounds odd uses
            _BASIS_NORMS.clear()
        norms = _BASIS_NORMS[n] = (float(t @ t), float(q @ q))
    return norms


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
    return _k.history_scale(np.ascontiguousarray(history, dtype=float))  # np.std, compiled


def point_noise(history: np.ndarray) -> float:
    """Point-to-point noise: MAD of first differences / √2 (σ for white noise). O(n).

    Blind to level shifts and trends, and too small alone for smooth series,
    so it only sets a floor under the penalty on noisy, structureless data.
    """
    return _k.point_noise(np.ascontiguousarray(history, dtype=float))  # the medians, compiled


@dataclass(frozen=True)
class WindowLocaliser:
    """Find and confirm breaks in a bounded window with ruptures' binary segmentation.

    Binary segmentation over :class:`CostPiecewiseLinear` with the penalty
    ``(penalty × scale² + noise_penalty × noise²) × log n`` for the window's n
    points: ``scale`` from :func:`history_scale` (the spread of the caller's
    recent history: structure counts as variation) and ``noise`` from
    :func:`point_noise` (a floor for structureless noise, where the spread alone
    would let the maximum over split points through too often). With
    ``curvature_penalty`` c set, a break is kept only if its two lines also beat
    one parabola over its two segments by c times that penalty (a smooth curve
    such as a power-law decay is not a change; ``None`` turns the check off).
    With ``shift_penalty`` s set, each break moves to its best level shift on a
    shared slope where that model does as well counting its one parameter
    fewer, and when no two-line break passes, the best level shift of the
    window is confirmed if it beats s times the penalty (and the parabola);
    the new segment of a shift may be as short as ``shift_min_size`` points.
    O(n) per break found, n capped by the caller (the series window),
    independent of run length.

    Why the defaults (set once on TCPD's F1/Cover and on the noise of
    ``benchmarks.synthetic``, one configuration for every series):

    * ``penalty`` 2, ``noise_penalty`` 4: a BIC-like ``log n`` penalty of
      about two parameters of a new line, on the spread of the recent history;
      the point-noise term keeps the maximum over split points of pure noise
      from passing.
    * ``min_size`` 4: each side of a break holds enough points to fit its line.
    * ``curvature_penalty`` 0.25: a power-law or exponential decay is curved
      everywhere; a break must beat one parabola over its two segments by a
      quarter of the penalty, or it is the curve, not a change.
    * ``shift_penalty`` 0.6: a level shift on a shared slope has one
      parameter, not a new line's two.
    * ``shift_min_size`` 2: a step is placed on its second point after, which
      is what lets a shift be confirmed a few points after it happened.

    >>> loc = WindowLocaliser()
    >>> rng = np.random.default_rng(0)
    >>> y = np.r_[rng.normal(0, 1, 60), rng.normal(5, 1, 40)]
    >>> [(s.index, s.confirmed) for s in loc.locate(y, scale=1.0, noise=1.0)]
    [(60, True)]
    """

    penalty: float = 2.0
    noise_penalty: float = 4.0
    min_size: int = 4
    curvature_penalty: float | None = 0.25
    shift_penalty: float | None = 0.6
    shift_min_size: int = 2

    def __post_init__(self) -> None:
        if self.penalty <= 0 or self.noise_penalty < 0 or self.min_size < 3:
            raise InvalidArgument("penalty must be > 0, noise_penalty >= 0 and min_size >= 3")
        if (self.shift_penalty is not None and self.shift_penalty <= 0) or self.shift_min_size < 2:
            raise InvalidArgument("shift_penalty must be > 0 (or None) and shift_min_size >= 2")

    def locate(self, y: np.ndarray, scale: float | None = None, noise: float | None = None,
               final: bool = True) -> list[Split]:
        """Confirmed breaks of ``y`` in order (empty when none beats the penalty).

        With ``final`` False (more points will come), a last break at the latest
        index its model allows is left for the next call: the new segment may be
        cut short there, and a big shift seen on its first points would be placed
        a point or two early.
        """
        return self.locate_with_evidence(y, scale, noise, final)[0]

    def locate_with_evidence(self, y: np.ndarray, scale: float | None = None, noise: float | None = None,
                             final: bool = True) -> tuple[list[Split], float]:
        """:meth:`locate`, and the best single break's gain as a fraction of what it
        needed (≥ 1 when one passed its penalty): how close the window came."""
        n = len(y)
        if n < 2 * self.min_size + 1:
            return [], 0.0
        if scale is None:
            scale = history_scale(y)
        if noise is None:
            noise = point_noise(y)
        y = np.ascontiguousarray(y, dtype=float)
        sums, split_gain, shift_index, shift_gain, peak = _k.window_search(y, self.min_size,
                                                                         self.shift_min_size)
        scale = max(scale, 1e-12 * max(1.0, peak), _TINY)
        penalty = (self.penalty * scale * scale + self.noise_penalty * noise * noise) * math.log(n)
        dot = _k.blas_ddot()
        if dot is not None:
            curvature = self.curvature_penalty
            evidence, indices, gains, penalties = _k.localiser_confirm(
                y, sums, split_gain, shift_index, shift_gain, scale, penalty, final, self.min_size,
                self.shift_min_size, curvature is not None, 0.0 if curvature is None else float(curvature),
                -1.0 if self.shift_penalty is None else float(self.shift_penalty), dot)
            return _splits(indices, gains, penalties, scale), evidence
        return self._confirm(y, sums, split_gain, shift_index, shift_gain, scale, penalty, final)

    def look(self, held: np.ndarray, start: int, noise: float | None, final: bool,
             weak_below: float = 0.0) -> tuple[list[Split], float, float | None]:
        """A series detector's look at its current segment: ``locate_with_evidence(held[start:],
        history_scale(held), noise, final)``, ``noise`` being ``point_noise(held)`` when
        None; returns the splits, the evidence and the noise used.

        With ``weak_below`` (in (0, 1]) and no ``noise`` given, a look whose evidence
        is below ``weak_below`` even without the noise's term in the penalty does not
        measure the noise: it returns no splits, that evidence (an upper bound of
        the true one) and None for the noise (:func:`_kernels.localiser_look`). A
        caller that ends the alarm's episode below ``weak_below`` makes the same
        decisions either way; on real runs most first looks end so.

        The same result as that call, in one compiled call
        (:func:`_kernels.localiser_look_confirm`: the look, then the confirm step
        when a break may pass), which is what a look costs on real runs. Where
        BLAS's ``ddot`` cannot be called from compiled code (:func:`_kernels.blas_ddot`
        is None), a candidate break goes on to :meth:`_confirm` in Python instead.
        O(n) for the n points held (``held`` is float64 and contiguous).
        """
        n = len(held) - start
        log_n = math.log(n) if n >= 2 * self.min_size + 1 else 0.0
        shift_w = -1.0 if self.shift_penalty is None else float(self.shift_penalty)
        weak_below = min(float(weak_below), 1.0)
        dot = _k.blas_ddot()
        if dot is not None:
            curvature = self.curvature_penalty
            measured, used, scale, evidence, indices, gains, penalties = _k.localiser_look_confirm(
                held, start, noise is None, 0.0 if noise is None else float(noise), self.min_size,
                self.shift_min_size, float(self.penalty), float(self.noise_penalty), shift_w, log_n,
                curvature is not None, 0.0 if curvature is None else float(curvature), final, weak_below,
                dot)
            return _splits(indices, gains, penalties, scale), evidence, _noise_used(noise, measured, used)
        done, measured, used, scale, penalty, evidence, sums, split_gain, shift_index, shift_gain = \
            _k.localiser_look(held, start, noise is None, 0.0 if noise is None else float(noise),
                              self.min_size, self.shift_min_size, float(self.penalty),
                              float(self.noise_penalty), shift_w, log_n, weak_below)
        noise = _noise_used(noise, measured, used)
        if done:
            return [], evidence, noise
        splits, evidence = self._confirm(held[start:], sums, split_gain, shift_index, shift_gain, scale,
                                         penalty, final)
        return splits, evidence, noise

    def _confirm(self, y: np.ndarray, sums: np.ndarray, split_gain: float, shift_index: int,
                 shift_gain: float, scale: float, penalty: float,
                 final: bool) -> tuple[list[Split], float]:
        """The breaks of ``y`` that pass ``penalty`` (binary segmentation, the curvature
        check, level shifts), from :func:`_kernels.window_search`'s results, and the
        evidence. O(n) per break found.

        The reference of :func:`_kernels.localiser_confirm`, which :meth:`look` and
        :meth:`locate_with_evidence` call instead wherever :func:`_kernels.blas_ddot`
        is found (tests/test_kernels.py compares the two)."""
        n = len(y)
        cost = CostPiecewiseLinear._from_sums(y, sums)
        bkps: list[int] = []
        evidence = split_gain / penalty
        if evidence > 1.0:  # else Binseg would confirm nothing
            # ruptures' Binseg(jump=1).predict(pen=penalty) on this cost, compiled.
            bkps = _k.binseg(cost._s, n, self.min_size, penalty).tolist()
            if self.curvature_penalty is not None:
                bkps = self._not_curvature(y, bkps, cost, self.curvature_penalty * penalty)
        if self.shift_penalty is None:
            shifts: dict[int, float] = {}
        elif bkps:
            bkps, shifts = self._refine_shifts(y, bkps, cost, penalty)
        else:
            bkps, shifts, best = self._single_shift(y, cost, penalty, shift_index, shift_gain)
            evidence = max(evidence, best / (self.shift_penalty * penalty))
        if bkps and not final:
            # A shift at the last index allowed, or a new line on fewer than 2 ×
            # min_size points, may be the first points of something else (a step
            # seen on its first two points looks like a steep line).
            last = bkps[-1]
            if last >= n - (self.shift_min_size if last in shifts else 2 * self.min_size - 1):
                bkps = bkps[:-1]
        splits = []
        edges = [0, *bkps, n]
        for left, index, right in zip(edges, edges[1:], edges[2:], strict=False):
            if index in shifts:  # only with shift_penalty set
                splits.append(Split(index=int(index), gain=shifts[index],
                                    penalty=float(cast(float, self.shift_penalty) * penalty), noise=scale))
                continue
            gain = cost.error(left, right) - cost.error(left, index) - cost.error(index, right)
            splits.append(Split(index=int(index), gain=float(gain), penalty=float(penalty), noise=scale))
        return splits, evidence

    def _single_shift(self, y: np.ndarray, cost: CostPiecewiseLinear, penalty: float, index: int,
                      gain: float) -> tuple[list[int], dict[int, float], float]:
        """The best level shift of the whole window (``index``, ``gain``: -1 when none fits),
        if it beats ``shift_penalty × penalty`` (and, with ``curvature_penalty``, one
        parabola too), and its gain. O(n)."""
        if index < 0 or self.shift_penalty is None:
            return [], {}, 0.0
        if gain <= self.shift_penalty * penalty:
            return [], {}, gain
        if self.curvature_penalty is not None:
            line_sse = cost.error(0, len(y))
            if _parabola_sse(y) - (line_sse - gain) <= self.curvature_penalty * penalty:
                return [], {}, gain
        return [index], {index: gain}, gain

    def _refine_shifts(self, y: np.ndarray, bkps: list[int], cost: CostPiecewiseLinear,
                       penalty: float) -> tuple[list[int], dict[int, float]]:
        """Move each break to its best level shift where that model is as good, counting
        its one parameter fewer (gain − shift penalty ≥ two-line gain − penalty). O(n)."""
        out: list[int] = []
        shifts: dict[int, float] = {}
        if self.shift_penalty is None:
            return list(bkps), shifts
        edges = [0, *bkps, len(y)]
        for k in range(1, len(edges) - 1):
            left = out[-1] if out else 0
            index, right = edges[k], edges[k + 1]
            lines = cost.error(left, right) - cost.error(left, index) - cost.error(index, right)
            last = self.shift_min_size if right == len(y) else self.min_size
            best, gain = _k.best_shift(cost._s, left, right, self.min_size, last)
            if best >= 0 and gain - self.shift_penalty * penalty >= lines - penalty:
                index = best
                shifts[index] = gain
            out.append(index)
        return out, shifts

    @staticmethod
    def _not_curvature(y: np.ndarray, bkps: list[int], cost: CostPiecewiseLinear,
                       penalty: float) -> list[int]:
        """Drop breaks that one smooth curve explains: each kept break's two lines must
        beat a single parabola over both its segments by ``penalty``. O(n) per pass.

        A power-law or exponential decay is curved everywhere; binary segmentation
        cuts it into lines wherever the noise is small against the curvature. A
        real break (a level shift, a plateau that ends in a drop, a kink seen from
        both sides) is not a parabola either, so it survives.
        """
        known: dict[tuple[int, int, int], float] = {}  # a break's margin depends on its neighbours only
        while bkps:
            edges = [0, *bkps, len(y)]
            margins = []
            for left, index, right in zip(edges, edges[1:], edges[2:], strict=False):
                margin = known.get((left, index, right))
                if margin is None:
                    lines = cost.error(left, index) + cost.error(index, right)
                    margin = known[left, index, right] = _parabola_sse(y[left:right]) - lines
                margins.append(margin)
            # np.argmin's answer (the first minimum; the first NaN if any) without turning the
            # list into an array on every pass.
            nan = next((i for i, m in enumerate(margins) if m != m), None)
            worst = margins.index(min(margins)) if nan is None else nan
            if margins[worst] > penalty:
                return bkps
            del bkps[worst]
        return bkps
