"""Two-stage change-point detection: a cheap vectorised trigger, then a bounded localiser.

:class:`CusumTrigger` scans blocks of points with numpy in O(1) amortised time
and memory per point: a Holt (level + trend) one-step-ahead forecast written as
a linear filter (``scipy.signal.lfilter``), innovations standardised by a
log-domain EWMA scale (also a linear filter, and robust: one outlier moves it
by a bounded factor), and a two-sided CUSUM on those standardised innovations
(fast: abrupt changes); beside it a small bank of two-sided CUSUMs (one drift
per shift size) on the errors of a slowly discounted least-squares line fitted
since the last reset (slow: small shifts, which a fast forecast absorbs before
its CUSUM can see them). Every CUSUM runs on a fixed-point grid (integers), so
a block computed with ``cumsum``/``minimum.accumulate`` gives exactly the same
statistics as point by point: how points are batched never changes a result.

When it alarms, :class:`WindowLocaliser` segments a bounded recent window
(ruptures ``Binseg`` over :class:`CostPiecewiseLinear`, vectorised split
search) and confirms each break only if its cost gain beats a penalty
``penalty × scale² × log n``, with ``scale`` a spread of the recent history
that survives trends and seasonality (see :func:`history_scale`); a level
shift on a shared slope (one parameter, not a new line's two) is tested
beside it with ``shift_penalty`` times that penalty, and placed where the step
is (two free lines put a small step's break tens of points early). Slope changes
and level shifts both show as runs of same-signed innovations; a smooth decay
(a training loss) is absorbed by the forecast's trend term and, being smooth,
gains little from a break; and a break that a single parabola over its two
segments explains nearly as well is dropped (``curvature_penalty``), so a
power-law decay is not cut into lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ruptures as rpt
from ruptures.base import BaseCost
from scipy.signal import lfilter, lfiltic

from detector.errors import InvalidArgument


def _checked_linear_filter() -> Callable[..., tuple[np.ndarray, np.ndarray]] | None:
    """scipy's C filter behind ``lfilter``, if it is there and gives lfilter's exact result.

    ``lfilter``'s argument checks cost about 13 µs a call and the trigger makes six
    calls a block (a tenth of a microsecond per point at 1 024-point blocks); the
    private function it ends in is checked once here, and ``lfilter`` is used if
    it moved or disagrees.
    """
    try:
        from scipy.signal._sigtools import _linear_filter  # type: ignore[attr-defined]

        b, a, x = np.array([1.0, -2.0, 1.0]), np.array([1.0, -1.7, 0.72]), np.linspace(-1.0, 2.0, 7)
        zi = np.array([0.3, -0.2])
        ours, theirs = _linear_filter(b, a, x, -1, zi), lfilter(b, a, x, zi=zi)
        if all(np.array_equal(u, v) for u, v in zip(ours, theirs, strict=True)):
            return _linear_filter
    except Exception:  # noqa: BLE001 - any failure means: use the public function
        pass
    return None


_LINEAR_FILTER = _checked_linear_filter()


def _filter(b: np.ndarray, a: np.ndarray, x: np.ndarray, zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``lfilter(b, a, x, zi=zi)`` for float64 1-D arrays, without its argument checks."""
    if _LINEAR_FILTER is not None:
        return _LINEAR_FILTER(b, a, x, -1, zi)
    return lfilter(b, a, x, zi=zi)


_Q = 1 << 16  # fixed-point grid of the CUSUM (1/65536 of an innovation scale)
_Z_CLIP = 1e4  # |z| cap: keeps the int64 sums exact for any run length we will see
_LOG_ABS_Z_MEAN = -0.6351814227307391  # E[log |N(0,1)|] = -(γ + log 2) / 2
_TINY = 1e-300
_GATE_CLOSED = 1e9  # a gate input that keeps the slow bank closed


@dataclass
class CusumTrigger:
    """Two CUSUM triggers on one series, both O(1) amortised per point, in numpy.

    *Fast*: a two-sided CUSUM (``drift`` k, ``threshold`` h) on Holt
    (``alpha``/``beta``) one-step innovations standardised by a log-domain EWMA
    scale (rate ``scale_rate``). It follows trends and absorbs a level shift in
    a few points, so it catches abrupt changes and slope changes of trending
    series, but not small shifts.

    *Slow*: a bank of two-sided CUSUMs (drifts ``bank_drifts``, thresholds
    ``bank_thresholds``, one pair per size of shift) on the one-step errors of a
    discounted least-squares line fitted since the last reset (memory
    ``memory`` points), each error divided by its exact standard error under
    white noise (the line's extrapolation variance counts, so the first points
    of a segment are not over-weighted) and by a log-domain EWMA scale (rate
    ``bank_scale_rate``). The reference adapts slowly, so a small shift keeps
    its full size for tens of points and each CUSUM reaches its optimal delay
    (k = δ/2 for a shift δ); the line follows smooth trends. The bank watches
    from ``bank_after`` points into a segment, and only while the line's error
    scale is within ``bank_gate`` times the fast forecast's and the EWMA (rate
    ``bias_rate``) of its standardised errors stays within ±``bias_gate``, both
    taken ``gate_lag`` points back (right after a shift the line is worse because
    of the shift itself; random walks, seasonality and curves the line cannot
    follow, such as the steep start of a power-law loss, keep it worse for good).

    ``warmup`` points after a reset set the first scales before any alarm.
    :meth:`scan` takes a block and stops at the first alarm (numpy, no Python per
    point); :meth:`update` is the one-point form and gives identical results
    (the CUSUMs run on a fixed-point integer grid, the filters carry their state
    exactly).

    >>> trigger = CusumTrigger()
    >>> values = [0.0, 0.1, -0.1, 0.05] * 10 + [3.0] * 10
    >>> [i for i, v in enumerate(values) if trigger.update(v)][:1]
    [40]
    """

    drift: float = 0.5
    threshold: float = 6.0
    alpha: float = 0.2
    beta: float = 0.05
    warmup: int = 8
    scale_rate: float = 0.05
    memory: float = 400.0
    bank_drifts: tuple[float, ...] = (0.5, 1.0, 1.5)
    bank_thresholds: tuple[float, ...] = (8.0, 5.0, 3.5)
    bank_scale_rate: float = 0.02
    bank_gate: float = 1.3
    gate_lag: int = 50
    bias_rate: float = 0.02
    bias_gate: float = 0.25
    bank_after: int = 400

    def __post_init__(self) -> None:
        if not (0 < self.alpha <= 1 and 0 <= self.beta <= 1):
            raise InvalidArgument("alpha must be in (0, 1] and beta in [0, 1]")
        if self.gate_lag < 1 or not 0 < self.bias_rate < 1 or self.bias_gate <= 0:
            raise InvalidArgument("gate_lag must be at least 1, bias_rate in (0, 1), bias_gate > 0")
        if self.threshold <= 0 or self.drift < 0 or self.warmup < 2:
            raise InvalidArgument("threshold must be > 0, drift >= 0, warmup >= 2")
        if not 0 < self.scale_rate < 1 or not 0 < self.bank_scale_rate < 1:
            raise InvalidArgument("scale_rate and bank_scale_rate must be in (0, 1)")
        self.bank_drifts = tuple(float(k) for k in self.bank_drifts)
        self.bank_thresholds = tuple(float(h) for h in self.bank_thresholds)
        if (len(self.bank_drifts) != len(self.bank_thresholds) or self.memory <= 1
                or any(k < 0 for k in self.bank_drifts) or any(h <= 0 for h in self.bank_thresholds)):
            raise InvalidArgument("memory must be > 1 and bank_drifts (>= 0) and bank_thresholds (> 0) "
                                  "must have the same length")
        # Holt's innovations are an ARIMA(0,2,2) filter of the values:
        # (1 - B)² y_t = (1 - θ1 B - θ2 B²) e_t, θ1 = 2 - α - αβ, θ2 = α - 1.
        a, b = self.alpha, self.beta
        self._b = np.array([1.0, -2.0, 1.0])
        self._a = np.array([1.0, -(2.0 - a - a * b), -(a - 1.0)])
        self._sb = np.array([self.scale_rate])
        self._sa = np.array([1.0, -(1.0 - self.scale_rate)])
        self._hq = int(round(self.threshold * _Q))
        self._kq = int(round(self.drift * _Q))
        # The discounted line: S0 = Σ λ^j y_{t-j}, S1 = Σ λ^j (-j) y_{t-j}, first-order filters.
        lam = 1.0 - 1.0 / self.memory
        self._lam = lam
        self._d0 = (np.array([1.0]), np.array([1.0, -lam]))
        self._d1 = (np.array([0.0, -lam]), np.array([1.0, -lam]))
        self._bb = np.array([self.bank_scale_rate])
        self._ba = np.array([1.0, -(1.0 - self.bank_scale_rate)])
        self._table = _line_table(lam)
        self._gate = math.log(self.bank_gate) if self.bank_gate > 0 else -math.inf
        self._bias_b = np.array([self.bias_rate])
        self._bias_a = np.array([1.0, -(1.0 - self.bias_rate)])
        self._bank_hq = np.array([int(round(h * _Q)) for h in self.bank_thresholds], dtype=np.int64)[:, None]
        self._bank_kq = np.array([int(round(k * _Q)) for k in self.bank_drifts], dtype=np.int64)[:, None]
        self._all_hq = np.r_[self._hq, self._hq, self._bank_hq[:, 0], self._bank_hq[:, 0]][:, None]
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.zi = np.zeros(2)  # the innovation filter's state
        self.log_scale = 0.0  # EWMA of log |innovation|
        self.zs = np.zeros(1)  # the scale filter's state
        self.pos = 0  # CUSUM sums on the fixed-point grid
        self.neg = 0
        self.last_z = 0.0
        # The slow line: its sums after the last point, their filters' states, its error scale.
        self.s0 = self.s1 = 0.0
        self.z0, self.z1 = np.zeros(1), np.zeros(1)
        self.bank_log_scale = 0.0
        self.bz = np.zeros(1)
        # The gate's inputs of the last ``gate_lag`` points (closed until then; open
        # where negative), and the EWMA of the line's standardised errors (its bias).
        self.gate = np.full(self.gate_lag, _GATE_CLOSED)
        self.bias_zi = np.zeros(1)
        nk = len(self.bank_drifts)
        self.bank_pos = np.zeros(nk, dtype=np.int64)
        self.bank_neg = np.zeros(nk, dtype=np.int64)

    # --- readouts --------------------------------------------------------------

    @property
    def statistic(self) -> float:
        """The largest CUSUM sum, as a fraction of its threshold times the fast threshold."""
        ratios = [max(self.pos, self.neg) / self._hq]
        ratios += (np.maximum(self.bank_pos, self.bank_neg) / self._bank_hq[:, 0]).tolist()
        return max(ratios) * self.threshold

    @property
    def alarmed(self) -> bool:
        """Whether any CUSUM is above its threshold now."""
        bank = self._bank_hq[:, 0]
        return (self.pos > self._hq or self.neg > self._hq
                or bool(((self.bank_pos > bank) | (self.bank_neg > bank)).any()))

    @property
    def level(self) -> float:
        """The forecast of the next value (0 before any point)."""
        return float(-self.zi[0]) if self.n else 0.0

    @property
    def scale(self) -> float:
        """Robust scale of the innovations (σ-equivalent for Gaussian noise)."""
        return math.exp(self.log_scale - _LOG_ABS_Z_MEAN) if self.n > 1 else 0.0

    def clear(self) -> None:
        """Zero every CUSUM sum (after an alarm has been dealt with)."""
        self.pos = self.neg = 0
        self.bank_pos = np.zeros_like(self.bank_pos)
        self.bank_neg = np.zeros_like(self.bank_neg)

    # --- update ----------------------------------------------------------------

    def update(self, y: float) -> bool:
        """Take one finite value; return True when a CUSUM crosses its threshold."""
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

    def absorb(self, values: np.ndarray) -> np.ndarray:
        """Consume every value without stopping at alarms; return, per value, whether
        any CUSUM was above its threshold after it (:attr:`alarmed`). O(m) in numpy."""
        values = np.asarray(values, dtype=float)
        flags = np.zeros(len(values), dtype=bool)
        i = 0
        while i < len(values) and self.n < self.warmup:
            self._warm(values[i])  # the sums stay zero during warm-up
            i += 1
        if i < len(values):
            flags[i:] = self._scan_block(values[i:], stop=False)
        return flags

    def snapshot(self) -> dict:
        """The state as it is now, for :meth:`restore` (O(1): arrays are replaced, never
        written in place, so references suffice)."""
        return dict(self.__dict__)

    def restore(self, snapshot: dict) -> None:
        self.__dict__.update(snapshot)

    def _line_errors(self, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """Standardised one-step errors of the slow line on ``y`` and the new sums/states."""
        s0, z0 = _filter(*self._d0, y, self.z0 if self.n else np.zeros(1))
        s1, z1 = _filter(*self._d1, s0, self.z1)
        prev0 = np.empty_like(s0)
        prev1 = np.empty_like(s1)
        prev0[0], prev1[0] = self.s0, self.s1
        prev0[1:], prev1[1:] = s0[:-1], s1[:-1]
        v0, v1, sf = self._table
        lo, hi = self.n, self.n + len(y)
        if hi <= len(v0):  # slices, not gathers: the common case
            e = (y - (v0[lo:hi] * prev0 + v1[lo:hi] * prev1)) / sf[lo:hi]
        else:
            idx = np.minimum(np.arange(lo, hi), len(v0) - 1)
            e = (y - (v0[idx] * prev0 + v1[idx] * prev1)) / sf[idx]
        if self.n == 0:
            e[0] = 0.0  # no forecast for the first point of a segment
        return e, s0, s1, z0, z1

    def _warm(self, y: float) -> None:
        arr = np.array([y])
        e_line, s0, s1, z0, z1 = self._line_errors(arr)
        self.s0, self.s1, self.z0, self.z1 = float(s0[0]), float(s1[0]), z0, z1
        self.n += 1
        if self.n == 1:
            # Start flat at the first value: past inputs y, y and past innovations 0.
            self.zi = lfiltic(self._b, self._a, [0.0, 0.0], [y, y])
            return
        e, self.zi = _filter(self._b, self._a, arr, self.zi)
        log_abs = math.log(max(abs(float(e[0])), _TINY))
        # Warm-up: the mean of log |innovation| so far sets the initial scale.
        self.log_scale += (log_abs - self.log_scale) / (self.n - 1)
        line_abs = math.log(max(abs(float(e_line[0])), _TINY))
        self.bank_log_scale += (line_abs - self.bank_log_scale) / (self.n - 1)
        if self.n == self.warmup:
            self.zs = np.array([(1.0 - self.scale_rate) * self.log_scale])
            self.bz = np.array([(1.0 - self.bank_scale_rate) * self.bank_log_scale])

    def _scan_block(self, y: np.ndarray, stop: bool = True) -> int | np.ndarray | None:
        m = len(y)
        e, zi = _filter(self._b, self._a, y, self.zi)
        log_abs = np.log(np.maximum(np.abs(e), _TINY))
        log_s, zs = _filter(self._sb, self._sa, log_abs, self.zs)
        floor = _floor(y)
        lagged_fast = _lagged(log_s, self.log_scale)
        # The slow line and its bank of CUSUMs.
        el, s0, s1, z0, z1 = self._line_errors(y)
        line_abs = np.log(np.maximum(np.abs(el), _TINY))
        bank_s, bz = _filter(self._bb, self._ba, line_abs, self.bz)
        lagged_bank = _lagged(bank_s, self.bank_log_scale)
        # Both standardised error series at once: row 0 the fast one, row 1 the line's.
        z = np.stack([e, el]) / np.exp(np.maximum(np.stack([lagged_fast, lagged_bank]), floor)
                                       - _LOG_ABS_Z_MEAN)
        # The bank only watches while the slow line explains the series about as well
        # as the fast forecast: where it does not (random walks, seasonality, fast
        # curvature) its errors are structure, not shifts; nor before ``bank_after``
        # points of the segment. The comparison is taken ``gate_lag`` points late:
        # right after a shift the slow line is worse than the fast forecast because
        # of the shift itself, and the bank must keep watching long enough to see it.
        # Nor while its errors keep one sign (a mean of ``bias_gate`` σ or more over the
        # last ~1/bias_rate points): a curve the line cannot follow, such as the steep
        # start of a power-law loss, not a shift (a shift is caught before that lasts
        # ``gate_lag`` points).
        line_z = np.clip(z[1], -3.0, 3.0)  # one outlier must not close the gate for long
        bias, bias_zi = _filter(self._bias_b, self._bias_a, line_z, self.bias_zi)
        gate_in = np.maximum(lagged_bank - lagged_fast - self._gate, np.abs(bias) - self.bias_gate)
        gate_full = np.concatenate([self.gate, gate_in])
        watch = gate_full[:m] < 0.0
        watch &= np.arange(self.n, self.n + m) >= self.bank_after
        z[1, ~watch] = 0.0
        zq = np.rint(np.clip(z, -_Z_CLIP, _Z_CLIP) * _Q).astype(np.int64)
        # Every CUSUM in one pass: rows fast +, fast −, bank + (one per drift), bank −.
        nk = len(self.bank_drifts)
        steps = np.empty((2 + 2 * nk, m), dtype=np.int64)
        steps[0] = zq[0] - self._kq
        steps[1] = -zq[0] - self._kq
        steps[2 : 2 + nk] = zq[1] - self._bank_kq
        steps[2 + nk :] = -zq[1] - self._bank_kq
        sums = _lindley2(steps, np.r_[self.pos, self.neg, self.bank_pos, self.bank_neg])
        hit = (sums > self._all_hq).any(axis=0)
        over = np.flatnonzero(hit) if stop else ()
        k = m - 1 if len(over) == 0 else int(over[0])
        self.gate = gate_full[k + 1 : k + 1 + self.gate_lag].copy()
        bank = sums[2:, k]
        if k < m - 1:
            # Rerun the linear filters to the alarm so their state stops exactly there.
            _, zi = _filter(self._b, self._a, y[: k + 1], self.zi)
            _, zs = _filter(self._sb, self._sa, log_abs[: k + 1], self.zs)
            _, z0 = _filter(*self._d0, y[: k + 1], self.z0)
            _, z1 = _filter(*self._d1, s0[: k + 1], self.z1)
            _, bz = _filter(self._bb, self._ba, line_abs[: k + 1], self.bz)
            _, bias_zi = _filter(self._bias_b, self._bias_a, line_z[: k + 1], self.bias_zi)
        self.bias_zi = bias_zi
        self._commit_bank(s0[: k + 1], s1[: k + 1], z0, z1, bz, float(bank_s[k]), bank[:nk], bank[nk:])
        self._commit(k + 1, zi, zs, float(log_s[k]), int(sums[0, k]), int(sums[1, k]), float(z[0, k]))
        if len(over) == 0:
            return None if stop else hit
        return k

    def _commit(self, count: int, zi: np.ndarray, zs: np.ndarray, log_scale: float,
                pos: int, neg: int, z: float) -> None:
        self.n += count
        self.zi, self.zs, self.log_scale = zi, zs, log_scale
        self.pos, self.neg, self.last_z = pos, neg, z

    def _commit_bank(self, s0: np.ndarray, s1: np.ndarray, z0: np.ndarray, z1: np.ndarray, bz: np.ndarray,
                     log_scale: float, pos: np.ndarray, neg: np.ndarray) -> None:
        self.s0, self.s1, self.z0, self.z1 = float(s0[-1]), float(s1[-1]), z0, z1
        self.bz, self.bank_log_scale = bz, log_scale
        self.bank_pos, self.bank_neg = pos.copy(), neg.copy()

    # --- checkpoints -----------------------------------------------------------

    def state(self) -> dict:
        return {
            "n": self.n, "zi": self.zi.tolist(), "zs": self.zs.tolist(), "log_scale": self.log_scale,
            "pos": self.pos, "neg": self.neg, "last_z": self.last_z,
            "s0": self.s0, "s1": self.s1, "z0": self.z0.tolist(), "z1": self.z1.tolist(),
            "bz": self.bz.tolist(), "bank_log_scale": self.bank_log_scale,
            "bank_pos": self.bank_pos.tolist(), "bank_neg": self.bank_neg.tolist(),
            "gate_open": self.gate.tolist(), "bias_zi": self.bias_zi.tolist(),
        }

    def load(self, state: dict) -> None:
        self.n, self.log_scale = state["n"], state["log_scale"]
        self.zi, self.zs = np.array(state["zi"], dtype=float), np.array(state["zs"], dtype=float)
        self.pos, self.neg, self.last_z = state["pos"], state["neg"], state["last_z"]
        if "s0" in state:  # checkpoints from before the slow bank start it afresh
            self.s0, self.s1 = state["s0"], state["s1"]
            self.z0, self.z1 = np.array(state["z0"], dtype=float), np.array(state["z1"], dtype=float)
            self.bz, self.bank_log_scale = np.array(state["bz"], dtype=float), state["bank_log_scale"]
            self.bank_pos = np.array(state["bank_pos"], dtype=np.int64)
            self.bank_neg = np.array(state["bank_neg"], dtype=np.int64)
        if len(state.get("gate_open", ())) == self.gate_lag:  # older checkpoints: closed for a while
            self.gate = np.array(state["gate_open"], dtype=float)
            self.bias_zi = np.array(state["bias_zi"], dtype=float)


def _lagged(x: np.ndarray, first: float) -> np.ndarray:
    """``x`` shifted one place later, ``first`` in front (the value before each point)."""
    out = np.empty_like(x)
    out[0] = first
    out[1:] = x[:-1]
    return out


def _floor(y: np.ndarray) -> np.ndarray:
    """A log-scale floor of the innovation scale, relative to the values' magnitude
    (a constant series has innovations at rounding level, not zero)."""
    return np.log(1e-12 * np.maximum(1.0, np.abs(y)))


_LINE_TABLES: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _line_table(lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per number n of points fitted: the forecast weights (v0, v1) of the sums and
    the forecast error's standard deviation factor, for the discounted line.

    The forecast of the next point from a line fitted with weights λ^j to the last
    n points is ``v0 · S0 + v1 · S1``; its error has variance ``σ² (1 + v'Qv)``
    under white noise (Q the same moments with weights λ^{2j}). Beyond the table
    (λ^n below float resolution) the last entry holds. Computed once per λ.
    """
    if lam in _LINE_TABLES:
        return _LINE_TABLES[lam]
    size = int(min(200_000, max(64, math.ceil(40.0 / max(1.0 - lam, 1e-9)))))
    j = np.arange(size, dtype=float)
    out = []
    for w in (lam, lam * lam):
        pw = w**j
        out.append((np.cumsum(pw), -np.cumsum(j * pw), np.cumsum(j * j * pw)))
    (w0, w1, w2), (q0, q1, q2) = out
    # n points fitted -> index n; n = 0 has no forecast (weights 0, factor 1).
    w0, w1, w2 = np.r_[0.0, w0], np.r_[0.0, w1], np.r_[0.0, w2]
    q0, q1, q2 = np.r_[0.0, q0], np.r_[0.0, q1], np.r_[0.0, q2]
    det = w0 * w2 - w1 * w1
    line = det > 1e-9 * np.maximum(w0 * w2, _TINY)
    safe = np.where(line, det, 1.0)
    v0 = np.where(line, (w2 - w1) / safe, np.where(w0 > 0, 1.0 / np.maximum(w0, _TINY), 0.0))
    v1 = np.where(line, (w0 - w1) / safe, 0.0)
    sf = np.sqrt(1.0 + q0 * v0 * v0 + 2.0 * q1 * v0 * v1 + q2 * v1 * v1)
    _LINE_TABLES[lam] = (v0, v1, sf)
    return v0, v1, sf


def _lindley2(x: np.ndarray, start: np.ndarray) -> np.ndarray:
    """``s_t = max(0, s_{t-1} + x_t)`` along each row of ``x`` (shape (k, m)) from
    ``start`` (shape (k,)), on int64: exact, O(k m) in numpy."""
    c = np.cumsum(x, axis=1)
    return c - np.minimum(np.minimum.accumulate(c, axis=1), -start[:, None])


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
    segment at once in numpy.

    >>> y = np.r_[np.zeros(20), np.ones(10)] + 0.05 * np.arange(30)
    >>> candidates, gains = CostPiecewiseLinear().fit(y).shift_gains(0, 30, 4)
    >>> int(candidates[_last_argmax(gains)])
    20
    """

    model = "piecewise_linear"
    min_size = 3

    def fit(self, signal: np.ndarray) -> CostPiecewiseLinear:
        y = np.asarray(signal, dtype=float).reshape(-1)
        self.signal = y.reshape(-1, 1)  # ruptures' searches read the length from here
        n = len(y)
        # Values centred on the window keep the sums well conditioned; the sums of
        # 1, t and t² over the first k points are closed forms (exact in float64).
        y = y - (y.mean() if n else 0.0)
        t = np.arange(n, dtype=float)
        k = np.arange(n + 1, dtype=float)
        self._s = np.empty((6, n + 1))
        self._s[0] = k
        self._s[1] = k * (k - 1.0) / 2.0
        self._s[2] = (k - 1.0) * k * (2.0 * k - 1.0) / 6.0
        self._s[3:, 0] = 0.0
        np.cumsum(y, out=self._s[3, 1:])
        np.cumsum(t * y, out=self._s[4, 1:])
        np.cumsum(y * y, out=self._s[5, 1:])
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

    def error(self, start: int, end: int) -> float:
        return float(self._sse(self._s[:, end] - self._s[:, start]))

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


class _VectorBinseg(rpt.Binseg):
    """ruptures' binary segmentation with the split search of one segment in numpy.

    Same result as ``rpt.Binseg`` with ``jump=1`` (largest gain, ties to the later
    index) for :class:`CostPiecewiseLinear`; O(n) per segment searched.
    """

    def fit(self, signal: np.ndarray) -> _VectorBinseg:
        # As ruptures' fit, without clearing the lru_cache that this single_bkp does not use.
        self.signal = signal.reshape(-1, 1) if signal.ndim == 1 else signal
        self.n_samples = self.signal.shape[0]
        self.cost.fit(signal)
        return self

    def single_bkp(self, start: int, end: int) -> tuple[int | None, float]:
        candidates, gains = self.cost.split_gains(start, end, self.min_size)
        if len(candidates) == 0:
            return None, 0
        best = _last_argmax(gains)
        return int(candidates[best]), float(gains[best])


def _last_argmax(values: np.ndarray) -> int:
    """Index of the largest value, ties to the later one (as ruptures' Binseg). O(n)."""
    return len(values) - 1 - int(np.argmax(values[::-1]))


def _parabola_sse(y: np.ndarray) -> float:
    """Squared error of the least-squares parabola through ``y``. O(n).

    On times centred on the window, 1, t and t² − mean(t²) are orthogonal, so the
    fit is three projections (no least-squares solve).
    """
    n = len(y)
    if n <= 3:
        return 0.0
    t = np.arange(n, dtype=float) - (n - 1) / 2.0
    t /= max(1.0, (n - 1) / 2.0)
    q = t * t
    q -= q.mean()
    yc = y - y.mean()
    a, b, c = float(yc @ yc), float(yc @ t), float(yc @ q)
    return max(a - b * b / float(t @ t) - c * c / float(q @ q), 0.0)


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
        scale = max(scale, 1e-12 * max(1.0, float(np.max(np.abs(y)))), _TINY)
        penalty = (self.penalty * scale * scale + self.noise_penalty * noise * noise) * math.log(n)
        cost = CostPiecewiseLinear()
        algo = _VectorBinseg(custom_cost=cost, min_size=self.min_size, jump=1).fit(y)
        bkps: list[int] = []
        evidence = algo.single_bkp(0, n)[1] / penalty
        if evidence > 1.0:  # else Binseg would confirm nothing
            bkps = [int(b) for b in algo.predict(pen=penalty)[:-1]]
            if self.curvature_penalty is not None:
                bkps = self._not_curvature(y, bkps, cost, self.curvature_penalty * penalty)
        if self.shift_penalty is None:
            shifts: dict[int, float] = {}
        elif bkps:
            bkps, shifts = self._refine_shifts(y, bkps, cost, penalty)
        else:
            bkps, shifts, best = self._single_shift(y, cost, penalty)
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
            if index in shifts:
                splits.append(Split(index=int(index), gain=shifts[index],
                                    penalty=float(self.shift_penalty * penalty), noise=scale))
                continue
            gain = cost.error(left, right) - cost.error(left, index) - cost.error(index, right)
            splits.append(Split(index=int(index), gain=float(gain), penalty=float(penalty), noise=scale))
        return splits, evidence

    def _single_shift(self, y: np.ndarray, cost: CostPiecewiseLinear,
                      penalty: float) -> tuple[list[int], dict[int, float], float]:
        """The best level shift of the whole window, if it beats ``shift_penalty × penalty``
        (and, with ``curvature_penalty``, one parabola too), and its gain. O(n)."""
        candidates, gains = cost.shift_gains(0, len(y), self.min_size, self.shift_min_size)
        if len(gains) == 0:
            return [], {}, 0.0
        best = _last_argmax(gains)
        gain = float(gains[best])
        if gain <= self.shift_penalty * penalty:
            return [], {}, gain
        if self.curvature_penalty is not None:
            line_sse = cost.error(0, len(y))
            if _parabola_sse(y) - (line_sse - gain) <= self.curvature_penalty * penalty:
                return [], {}, gain
        index = int(candidates[best])
        return [index], {index: gain}, gain

    def _refine_shifts(self, y: np.ndarray, bkps: list[int], cost: CostPiecewiseLinear,
                       penalty: float) -> tuple[list[int], dict[int, float]]:
        """Move each break to its best level shift where that model is as good, counting
        its one parameter fewer (gain − shift penalty ≥ two-line gain − penalty). O(n)."""
        out: list[int] = []
        shifts: dict[int, float] = {}
        edges = [0, *bkps, len(y)]
        for k in range(1, len(edges) - 1):
            left = out[-1] if out else 0
            index, right = edges[k], edges[k + 1]
            lines = cost.error(left, right) - cost.error(left, index) - cost.error(index, right)
            last = self.shift_min_size if right == len(y) else self.min_size
            candidates, gains = cost.shift_gains(left, right, self.min_size, last)
            if len(gains):
                best = _last_argmax(gains)
                if gains[best] - self.shift_penalty * penalty >= lines - penalty:
                    index = int(candidates[best])
                    shifts[index] = float(gains[best])
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
        while bkps:
            edges = [0, *bkps, len(y)]
            margins = []
            for left, index, right in zip(edges, edges[1:], edges[2:], strict=False):
                lines = cost.error(left, index) + cost.error(index, right)
                margins.append(_parabola_sse(y[left:right]) - lines)
            worst = int(np.argmin(margins))
            if margins[worst] > penalty:
                return bkps
            del bkps[worst]
        return bkps
