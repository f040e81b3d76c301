"""Two-stage change-point detection: a cheap vectorised trigger, then a bounded localiser.

:class:`CusumTrigger` scans blocks of points in O(1) amortised time and memory
per point (compiled loops, :mod:`detector.core._kernels`, with numpy's log and
exp between them): a Holt (level + trend) one-step-ahead forecast written as
a linear filter (``scipy.signal.lfilter``'s recurrence), innovations standardised by a
log-domain EWMA scale (also a linear filter, and robust: one outlier moves it
by a bounded factor), and a two-sided CUSUM on those standardised innovations
(fast: abrupt changes); beside it a small bank of two-sided CUSUMs (one drift
per shift size) on the errors of a slowly discounted least-squares line fitted
since the last reset (slow: small shifts, which a fast forecast absorbs before
its CUSUM can see them). Every CUSUM runs on a fixed-point grid (integers) and
every filter carries its state exactly, so a block gives exactly the same
statistics as point by point: how points are batched never changes a result.

When it alarms, :class:`WindowLocaliser` segments a bounded recent window
(ruptures' ``Binseg`` over :class:`CostPiecewiseLinear`, run as one compiled
loop with the same result) and confirms each break only if its cost gain beats a penalty
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
from dataclasses import dataclass
from typing import cast

import numpy as np
from ruptures.base import BaseCost

from detector.core import _kernels as _k
from detector.core._kernels import LOG_ABS_Z_MEAN as _LOG_ABS_Z_MEAN
from detector.core._kernels import TINY as _TINY
from detector.core._kernels import Q as _Q
from detector.errors import InvalidArgument

_GATE_CLOSED = 1e9  # a gate input that keeps the slow bank closed
_FIRST_CHUNK = 64  # points of the first chunk a scan takes (then 4 times more each time)


_SETTINGS = ("drift", "threshold", "alpha", "beta", "warmup", "scale_rate", "memory", "bank_drifts",
             "bank_thresholds", "bank_scale_rate", "bank_gate", "gate_lag", "bias_rate", "bias_gate",
             "bank_after")
_DERIVED: dict[tuple, dict] = {}  # settings -> CusumTrigger constants (a handful of settings per process)


@dataclass
class CusumTrigger:
    """Two CUSUM triggers on one series, both O(1) amortised per point, compiled.

    *Fast*: a two-sided CUSUM (``drift`` k, ``threshold`` h) on Holt
    (``alpha``/``beta``) one-step innovations standardised by a log-domain EWMA
    scale (rate ``scale_rate``), each clipped to ±3 (a winsorised CUSUM: one
    outlier, or two, cannot alarm alone; a lasting shift of any size alarms
    on its third point; real training curves are heavy-tailed, and unclipped
    single-line outliers caused a third of all alarms on real runs). It
    follows trends and absorbs a level shift in a few points, so it catches
    abrupt changes and slope changes of trending series, but not small shifts.

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
    :meth:`scan` takes a block and stops at the first alarm (compiled loops, no
    Python per point); :meth:`update` is the one-point form and gives identical results
    (the CUSUMs run on a fixed-point integer grid, the filters carry their state
    exactly).

    >>> trigger = CusumTrigger()
    >>> values = [0.0, 0.1, -0.1, 0.05] * 10 + [3.0] * 10
    >>> [i for i, v in enumerate(values) if trigger.update(v)][:1]  # the shift's third point
    [42]
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
        # Constants derived from the settings, computed once per settings (shared: never
        # written in place); a series detector per series makes a trigger per series.
        key = tuple(getattr(self, name) for name in _SETTINGS)
        derived = _DERIVED.get(key)
        if derived is None:
            derived = _DERIVED[key] = self._derive()
        self.__dict__.update(derived)
        self.reset()

    def _derive(self) -> dict:
        """The constants of these settings: filter coefficients, the fixed-point thresholds
        and drifts, the line's table, the kernels' scalar arguments."""
        before = set(self.__dict__)
        # Holt's innovations are an ARIMA(0,2,2) filter of the values:
        # (1 - B)² y_t = (1 - θ1 B - θ2 B²) e_t, θ1 = 2 - α - αβ, θ2 = α - 1.
        a, b = self.alpha, self.beta
        self._b = np.array([1.0, -2.0, 1.0])
        self._a = np.array([1.0, -(2.0 - a - a * b), -(a - 1.0)])
        self._holt = np.r_[self._b, self._a[1:]]  # b0, b1, b2, a1, a2 for the compiled filter
        self._sa = np.array([1.0, -(1.0 - self.scale_rate)])
        self._hq = int(round(self.threshold * _Q))
        self._kq = int(round(self.drift * _Q))
        lam = 1.0 - 1.0 / self.memory
        self._lam = lam
        self._ba = np.array([1.0, -(1.0 - self.bank_scale_rate)])
        self._table = _line_table(lam)
        self._gate = math.log(self.bank_gate) if self.bank_gate > 0 else -math.inf
        self._bias_a = np.array([1.0, -(1.0 - self.bias_rate)])
        self._bank_hq = np.array([int(round(h * _Q)) for h in self.bank_thresholds], dtype=np.int64)[:, None]
        self._bank_kq = np.array([int(round(k * _Q)) for k in self.bank_drifts], dtype=np.int64)[:, None]
        self._bank_hq_list = self._bank_hq[:, 0].tolist()
        self._bank_hq_flat = self._bank_hq[:, 0].copy()
        self._bank_kq_flat = self._bank_kq[:, 0].copy()
        # The kernels' constants, as the types they were compiled for.
        self._constants = (float(self.scale_rate), float(self._sa[1]), float(self.bank_scale_rate),
                           float(self._ba[1]), float(self.bias_rate), float(self._bias_a[1]),
                           float(self.bias_gate), float(self._gate), int(self.bank_after))
        return {k: v for k, v in self.__dict__.items() if k not in before}

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
        # Python ints below 2**53 divide to the same float as numpy's int64 division.
        ratios = [max(self.pos, self.neg) / self._hq]
        ratios += [max(p, n) / h for p, n, h in zip(self.bank_pos.tolist(), self.bank_neg.tolist(),
                                                     self._bank_hq_list, strict=True)]
        return max(ratios) * self.threshold

    @property
    def alarmed(self) -> bool:
        """Whether any CUSUM is above its threshold now."""
        return (self.pos > self._hq or self.neg > self._hq
                or any(p > h or n > h for p, n, h in zip(self.bank_pos.tolist(), self.bank_neg.tolist(),
                                                          self._bank_hq_list, strict=True)))

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
        self.bank_pos = np.zeros(len(self.bank_drifts), dtype=np.int64)
        self.bank_neg = np.zeros(len(self.bank_drifts), dtype=np.int64)

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
        m = len(values)
        i = self._warm_up(values)  # a few points per reset
        if i == m:
            return None
        # In growing chunks: a block's filters are computed to its end before the
        # CUSUMs stop at an alarm, so one call over the whole rest would cost
        # O(length) per alarm. The state carries over exactly between chunks.
        size = _FIRST_CHUNK
        while i < m:
            alarm = cast("int | None", self._scan_block(values[i : i + size]))  # an index or None
            if alarm is not None:
                return i + alarm
            i += size
            size *= 4
        return None

    def absorb(self, values: np.ndarray) -> np.ndarray:
        """Consume every value without stopping at alarms; return, per value, whether
        any CUSUM was above its threshold after it (:attr:`alarmed`). O(m) in numpy."""
        values = np.asarray(values, dtype=float)
        flags = np.zeros(len(values), dtype=bool)
        i = self._warm_up(values)  # the sums stay zero during warm-up
        if i < len(values):
            flags[i:] = self._scan_block(values[i:], stop=False)
        return flags

    def snapshot(self) -> dict:
        """The state as it is now, for :meth:`restore` (O(1): arrays are replaced, never
        written in place, so references suffice)."""
        return dict(self.__dict__)

    def restore(self, snapshot: dict) -> None:
        self.__dict__.update(snapshot)

    def _linear(self, y: np.ndarray) -> np.ndarray:
        """:func:`_kernels.trigger_linear` from the current state. Scalars go in as Python
        floats and ints whatever a checkpoint held (another type would compile another
        specialisation of the kernel)."""
        return _k.trigger_linear(y, int(self.n), self._holt, float(self.zi[0]), float(self.zi[1]), self._lam,
                                 float(self.s0), float(self.s1), float(self.z0[0]), float(self.z1[0]),
                                 *self._table)

    def _warm_up(self, values: np.ndarray) -> int:
        """Take the first values while fewer than ``warmup`` points are in; return how many."""
        count = min(len(values), self.warmup - self.n)
        if count <= 0:
            return 0
        start = 0
        if self.n == 0:
            self._warm(values[:1])  # the first point of a segment starts the forecast alone
            start = 1
        if start < count:
            self._warm(values[start:count])
        return count

    def _warm(self, y: np.ndarray) -> None:
        """Warm-up points in order (the first of a segment alone): the line's sums and the
        forecast's filter as in a block, the initial scales as running means of log |error|."""
        lin = self._linear(y)
        last = len(y) - 1
        self.s0, self.s1 = float(lin[_k.LIN_S0, last]), float(lin[_k.LIN_S1, last])
        self.z0, self.z1 = lin[_k.LIN_Z0, last : last + 1].copy(), lin[_k.LIN_Z1, last : last + 1].copy()
        if self.n == 0:
            # Start flat at the first value: past inputs y, y and past innovations 0.
            self.n = 1
            self.zi = self._flat_start(float(y[0]))
            return
        self.zi = lin[_k.LIN_ZI0 : _k.LIN_ZI1 + 1, last].copy()
        log_scale, bank_log_scale = self.log_scale, self.bank_log_scale
        for e, e_line in zip(lin[_k.LIN_E].tolist(), lin[_k.LIN_EL].tolist(), strict=True):
            self.n += 1
            # math's log, not numpy's, as the warm-up always took it (they differ in the last bit).
            # Warm-up: the mean of log |innovation| so far sets the initial scale.
            log_scale += (math.log(max(abs(e), _TINY)) - log_scale) / (self.n - 1)
            bank_log_scale += (math.log(max(abs(e_line), _TINY)) - bank_log_scale) / (self.n - 1)
        self.log_scale, self.bank_log_scale = log_scale, bank_log_scale
        if self.n == self.warmup:
            self.zs = np.array([(1.0 - self.scale_rate) * self.log_scale])
            self.bz = np.array([(1.0 - self.bank_scale_rate) * self.bank_log_scale])

    def _flat_start(self, y: float) -> np.ndarray:
        """``lfiltic(b, a, [0, 0], [y, y])``: the forecast's filter state after inputs y, y
        and outputs 0, 0, with lfiltic's operations in its order (its sums are numpy's:
        from 0, one term after another; tests/test_kernels.py compares)."""
        b1, b2 = float(self._b[1]), float(self._b[2])
        a1, a2 = float(self._a[1]), float(self._a[2])
        z0 = 0.0 + ((0.0 + b1 * y) + b2 * y)
        z1 = 0.0 + (0.0 + b2 * y)
        z0 -= 0.0 + ((0.0 + a1 * 0.0) + a2 * 0.0)
        z1 -= 0.0 + (0.0 + a2 * 0.0)
        return np.array([z0, z1])

    def _scan_block(self, y: np.ndarray, stop: bool = True) -> int | np.ndarray | None:
        # Three compiled loops (the linear filters; the log-EWMA scales; the
        # standardised errors, the bank's gate and the CUSUMs), with numpy's log and
        # exp over the whole block between them (numpy's, not libm's: see _kernels).
        # The gate: the bank only watches while the slow line explains the series
        # about as well as the fast forecast: where it does not (random walks,
        # seasonality, fast curvature) its errors are structure, not shifts; nor
        # before ``bank_after`` points of the segment. The comparison is taken
        # ``gate_lag`` points late: right after a shift the slow line is worse than
        # the fast forecast because of the shift itself, and the bank must keep
        # watching long enough to see it. Nor while its errors keep one sign (a mean
        # of ``bias_gate`` σ or more over the last ~1/bias_rate points): a curve the
        # line cannot follow, such as the steep start of a power-law loss, not a
        # shift (a shift is caught before that lasts ``gate_lag`` points).
        m = len(y)
        scale_rate, scale_a1, bank_rate, bank_a1, bias_rate, bias_a1, bias_gate, gate_shift, bank_after = \
            self._constants
        lin = self._linear(y)
        sc = _k.trigger_scales(np.log(lin[:3]), scale_rate, scale_a1, float(self.zs[0]),
                               float(self.log_scale), bank_rate, bank_a1, float(self.bz[0]),
                               float(self.bank_log_scale))
        nk = len(self.bank_drifts)
        sums = np.empty(2 + 2 * nk, dtype=np.int64)
        sums[0], sums[1], sums[2 : 2 + nk], sums[2 + nk :] = self.pos, self.neg, self.bank_pos, self.bank_neg
        alarm, flags, gate, state = _k.trigger_cusums(
            lin, sc, np.exp(sc[:2]), int(self.n), self.gate, gate_shift, bias_rate, bias_a1,
            float(self.bias_zi[0]), bias_gate, bank_after, sums, self._kq, self._bank_kq_flat,
            self._hq, self._bank_hq_flat, stop)
        # The state after the last point consumed; views of fresh arrays (never written in place).
        k = m - 1 if alarm < 0 else int(alarm)
        self.gate = gate
        s0, s1, _, _, _, bank_s, _, _, _, log_s, _, last_z = state.tolist()
        self.s0, self.s1, self.bank_log_scale = s0, s1, bank_s
        self.z0, self.z1 = state[_k.ST_Z0 : _k.ST_Z0 + 1], state[_k.ST_Z1 : _k.ST_Z1 + 1]
        self.bz, self.bias_zi = state[_k.ST_BZ : _k.ST_BZ + 1], state[_k.ST_BIAS : _k.ST_BIAS + 1]
        self.bank_pos, self.bank_neg = sums[2 : 2 + nk], sums[2 + nk :]
        self._commit(k + 1, state[_k.ST_ZI0 : _k.ST_ZI1 + 1], state[_k.ST_ZS : _k.ST_ZS + 1], log_s,
                     int(sums[0]), int(sums[1]), last_z)
        if alarm < 0:
            return None if stop else flags
        return k

    def _commit(self, count: int, zi: np.ndarray, zs: np.ndarray, log_scale: float,
                pos: int, neg: int, z: float) -> None:
        self.n += count
        self.zi, self.zs, self.log_scale = zi, zs, log_scale
        self.pos, self.neg, self.last_z = pos, neg, z

    # --- checkpoints -----------------------------------------------------------

    def state(self) -> dict:
        """The state as versioned plain data (numbers and lists), for :meth:`load`."""
        return {
            "version": 1,
            "n": self.n, "zi": self.zi.tolist(), "zs": self.zs.tolist(), "log_scale": self.log_scale,
            "pos": self.pos, "neg": self.neg, "last_z": self.last_z,
            "s0": self.s0, "s1": self.s1, "z0": self.z0.tolist(), "z1": self.z1.tolist(),
            "bz": self.bz.tolist(), "bank_log_scale": self.bank_log_scale,
            "bank_pos": self.bank_pos.tolist(), "bank_neg": self.bank_neg.tolist(),
            "gate_open": self.gate.tolist(), "bias_zi": self.bias_zi.tolist(),
        }

    def load(self, state: dict) -> None:
        """Resume from :meth:`state` (older states without the slow bank or the gate
        start those afresh); a newer version is refused by name."""
        if state.get("version", 1) != 1:
            raise InvalidArgument(f"trigger state version {state['version']} is not supported (this reads 1)")
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
            worst = int(np.argmin(margins))
            if margins[worst] > penalty:
                return bkps
            del bkps[worst]
        return bkps
