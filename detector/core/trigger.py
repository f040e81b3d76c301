"""The change-point trigger: two CUSUMs on one series, O(1) amortised a point.

:class:`CusumTrigger` scans blocks of points (compiled loops,
:mod:`detector.core._kernels`, with numpy's log and exp between them): a Holt
(level + trend) one-step-ahead forecast written as a linear filter
(``scipy.signal.lfilter``'s recurrence), innovations standardised by a
log-domain EWMA scale (also a linear filter, and robust: one outlier moves it
by a bounded factor) and clipped, and a two-sided CUSUM on them (fast: abrupt
changes); beside it a small bank of two-sided CUSUMs (one drift per shift
size) on the errors of a slowly discounted least-squares line fitted since the
last reset (slow: small shifts, which a fast forecast absorbs before its CUSUM
can see them). Every CUSUM runs on a fixed-point grid (integers) and every
filter carries its state exactly, so a block gives exactly the same
statistics as point by point: how points are batched never changes a result.

An alarm only says "look here": :mod:`detector.core.localiser` decides whether
there is a break, and where. Kept in one class of about 350 lines, most of it
the docstring and the exact warm-up and block paths that must agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import cast

import numpy as np

from detector.core import _kernels as _k
from detector.core._kernels import LOG_ABS_Z_MEAN as _LOG_ABS_Z_MEAN
from detector.core._kernels import TINY as _TINY
from detector.core._kernels import Q as _Q
from detector.errors import InvalidArgument

_EXACT = 1 << 53  # integers below this convert to floats exactly
_GATE_CLOSED = 1e9  # a gate input that keeps the slow bank closed
_FIRST_CHUNK = 64  # points of the first chunk a scan takes (then 4 times more each time)


_SETTINGS = ("drift", "threshold", "alpha", "beta", "warmup", "scale_rate", "memory", "bank_drifts",
             "bank_thresholds", "bank_scale_rate", "bank_gate", "gate_lag", "bias_rate", "bias_gate",
             "bank_after")
_SETTING_NAMES = frozenset(_SETTINGS)  # __setattr__ runs on every state write: a set, not a tuple scan
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

    Why the defaults (an alarm only asks the localiser to look, so they trade
    looks for delay, not false change points):

    * ``drift`` 0.5, ``threshold`` 6: k = δ/2 is the optimal CUSUM drift for a
      shift of δ = 1 σ, the smallest abrupt change worth catching fast; h = 6
      puts the two-sided CUSUM's in-control run length on white noise near
      1 300 points (Siegmund's approximation), one look per 1 300 points.
    * ``alpha`` 0.2, ``beta`` 0.05: the level follows in about 5 points, so a
      step is seen once and absorbed; the trend in about 20, so a slope change
      shows as a run of same-signed innovations long enough to alarm.
    * ``warmup`` 8: the first scale is a mean of seven log |innovation|s.
    * ``scale_rate`` 0.05: a 20-point memory follows a change of noise level,
      yet a shift's own innovations (clipped at 3) cross h before they can
      raise the scale much.
    * ``memory`` 400, ``bank_drifts``/``bank_thresholds`` (0.5, 8), (1, 5),
      (1.5, 3.5): one CUSUM per shift of 1, 2 and 3 σ with k = δ/2, each
      threshold giving about the fast CUSUM's false-alarm rate;
      ``benchmarks.synthetic`` measures the delays against the CUSUM that
      knows the shift (ratios 1.31 / 1.32 / 1.42 at 0.10 false alarms per
      10 000 points).
    * ``bank_gate`` 1.3, ``gate_lag`` 50, ``bias_rate`` 0.02, ``bias_gate``
      0.25, ``bank_after`` 400: the bank watches only where the slow line
      predicts within 30 % of the fast forecast and its errors do not keep one
      sign (on random walks, seasonality and power-law starts it never does),
      judged 50 points late so that a shift's own errors do not close the gate
      first, and only after the line has its memory's worth of points.

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
        # The settings as a hashable key (the series detector's compiled constants are
        # cached by it): read once here, not rebuilt from fifteen getattrs per series.
        self.settings_key = key
        self.reset()
        self.__dict__["_settled"] = True  # the settings are read-only from here

    def __setattr__(self, name: str, value: object) -> None:
        # Settings only in the constructor (the derived constants are computed from
        # them once); the running state is assigned freely.
        if name in _SETTING_NAMES and self.__dict__.get("_settled"):
            raise dataclasses.FrozenInstanceError(f"cannot assign to setting {name!r}; make a new trigger")
        object.__setattr__(self, name, value)

    def fresh(self) -> CusumTrigger:
        """A new trigger with these settings, reset: what ``CusumTrigger(**settings)``
        makes, without checking the settings again or rebuilding the key of their
        derived constants (a series detector makes one per series; the dataclass
        constructor with its checks was ~40 us). The settings and the derived
        constants are immutable or never written in place, so they are shared. O(gate_lag)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.reset()  # every field of the running state is assigned anew
        return new

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
        # The kernels' constants (entries _kernels.C_*), as the types they were compiled for.
        self._consts = np.array([self.scale_rate, self._sa[1], self.bank_scale_rate, self._ba[1],
                                 self.bias_rate, self._bias_a[1], self.bias_gate, self._gate], dtype=float)
        self._bank_after = int(self.bank_after)
        self._closed_gate = np.full(self.gate_lag, _GATE_CLOSED)  # reset() copies it
        return {k: v for k, v in self.__dict__.items() if k not in before}

    def reset(self) -> None:
        """Start afresh: the running state (not the settings) as a new trigger has it. O(gate_lag)."""
        self.n = 0
        # Every float of the state in one array, entries _kernels.ST_*, updated in place
        # by the kernels: the innovation filter's state (ZI0, ZI1), the EWMA of
        # log |innovation| (LOG_S) and its filter's state (ZS); the slow line's sums
        # after the last point (S0, S1), their filters' states (Z0, Z1), its error scale
        # (BANK_S, BZ); the EWMA of the line's standardised errors (BIAS, its bias) and
        # the last fast standardised error (LAST_Z).
        self._f = np.zeros(12)
        # The CUSUM sums on the fixed-point grid: fast +, fast −, bank + and bank − per drift.
        self._sums = np.zeros(2 + 2 * len(self.bank_drifts), dtype=np.int64)
        # The gate's inputs of the last ``gate_lag`` points (closed until then; open
        # where negative): a copy of the settings' closed gate (np.full is a Python call).
        self.gate = self._closed_gate.copy()

    # --- the state's fields, by name (checkpoints, tests, tools) ----------------

    @property
    def log_scale(self) -> float:
        """EWMA of log |innovation|."""
        return float(self._f[_k.ST_LOG_S])

    @property
    def bank_log_scale(self) -> float:
        """EWMA of log |standardised error| of the slow line."""
        return float(self._f[_k.ST_BANK_S])

    @property
    def last_z(self) -> float:
        """The last fast standardised innovation."""
        return float(self._f[_k.ST_LAST_Z])

    @property
    def zi(self) -> np.ndarray:
        """The innovation filter's state (a copy)."""
        return self._f[_k.ST_ZI0 : _k.ST_ZI1 + 1].copy()

    @property
    def zs(self) -> np.ndarray:
        """The fast scale filter's state (a copy)."""
        return self._f[_k.ST_ZS : _k.ST_ZS + 1].copy()

    @property
    def pos(self) -> int:
        return int(self._sums[0])

    @property
    def neg(self) -> int:
        return int(self._sums[1])

    @property
    def bank_pos(self) -> np.ndarray:
        return self._sums[2 : 2 + len(self.bank_drifts)].copy()

    @property
    def bank_neg(self) -> np.ndarray:
        return self._sums[2 + len(self.bank_drifts) :].copy()

    # --- readouts --------------------------------------------------------------

    @property
    def statistic(self) -> float:
        """The largest CUSUM sum, as a fraction of its threshold times the fast threshold."""
        # Python ints below 2**53 divide to the same float as numpy's int64 division;
        # compiled for those (an alarm reads it), in Python beyond.
        if self._hq < _EXACT:
            ok, ratio, _ = _k.trigger_readout(self._sums, self._hq, self._bank_hq_flat)
            if ok:
                return ratio * self.threshold
        pos, neg, *bank = self._sums.tolist()
        nk = len(bank) // 2
        ratios = [max(pos, neg) / self._hq]
        ratios += [max(p, n) / h for p, n, h in zip(bank[:nk], bank[nk:], self._bank_hq_list, strict=True)]
        return max(ratios) * self.threshold

    @property
    def alarmed(self) -> bool:
        """Whether any CUSUM is above its threshold now."""
        if self._hq < _EXACT:
            ok, _, alarmed = _k.trigger_readout(self._sums, self._hq, self._bank_hq_flat)
            if ok:
                return bool(alarmed)
        pos, neg, *bank = self._sums.tolist()
        nk = len(bank) // 2
        return (pos > self._hq or neg > self._hq
                or any(p > h or n > h for p, n, h in zip(bank[:nk], bank[nk:], self._bank_hq_list,
                                                          strict=True)))

    @property
    def level(self) -> float:
        """The forecast of the next value (0 before any point)."""
        return float(-self._f[_k.ST_ZI0]) if self.n else 0.0

    @property
    def scale(self) -> float:
        """Robust scale of the innovations (σ-equivalent for Gaussian noise)."""
        return math.exp(self.log_scale - _LOG_ABS_Z_MEAN) if self.n > 1 else 0.0

    def clear(self) -> None:
        """Zero every CUSUM sum (after an alarm has been dealt with)."""
        self._sums.fill(0)

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
        """The state as it is now, for :meth:`restore` (copies: the kernels write the
        state's arrays in place). O(gate_lag)."""
        return {"n": self.n, "f": self._f.copy(), "sums": self._sums.copy(), "gate": self.gate.copy()}

    def restore(self, snapshot: dict) -> None:
        self.n = snapshot["n"]
        self._f, self._sums, self.gate = (snapshot["f"].copy(), snapshot["sums"].copy(),
                                          snapshot["gate"].copy())

    def _linear(self, y: np.ndarray) -> np.ndarray:
        """:func:`_kernels.trigger_linear` from the current state (``n`` is kept a Python
        int whatever a checkpoint held: another type would compile another
        specialisation of the kernel)."""
        return _k.trigger_linear_state(y, self.n, self._holt, self._lam, self._f, *self._table)

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
        f = self._f
        f[_k.ST_S0], f[_k.ST_S1] = lin[_k.LIN_S0, last], lin[_k.LIN_S1, last]
        f[_k.ST_Z0], f[_k.ST_Z1] = lin[_k.LIN_Z0, last], lin[_k.LIN_Z1, last]
        if self.n == 0:
            # Start flat at the first value: past inputs y, y and past innovations 0.
            self.n = 1
            f[_k.ST_ZI0 : _k.ST_ZI1 + 1] = self._flat_start(float(y[0]))
            return
        f[_k.ST_ZI0], f[_k.ST_ZI1] = lin[_k.LIN_ZI0, last], lin[_k.LIN_ZI1, last]
        log_scale, bank_log_scale, n = float(f[_k.ST_LOG_S]), float(f[_k.ST_BANK_S]), self.n
        for e, e_line in zip(lin[_k.LIN_E].tolist(), lin[_k.LIN_EL].tolist(), strict=True):
            n += 1
            # math's log, not numpy's, as the warm-up always took it (they differ in the last bit).
            # Warm-up: the mean of log |innovation| so far sets the initial scale.
            log_scale += (math.log(max(abs(e), _TINY)) - log_scale) / (n - 1)
            bank_log_scale += (math.log(max(abs(e_line), _TINY)) - bank_log_scale) / (n - 1)
        self.n, f[_k.ST_LOG_S], f[_k.ST_BANK_S] = n, log_scale, bank_log_scale
        if self.n == self.warmup:
            f[_k.ST_ZS] = (1.0 - self.scale_rate) * log_scale
            f[_k.ST_BZ] = (1.0 - self.bank_scale_rate) * bank_log_scale

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
        lin = self._linear(y)
        sc = _k.trigger_scales_state(np.log(lin[:3]), self._consts, self._f)
        alarm, flags = _k.trigger_cusums_state(
            lin, sc, np.exp(sc[:2]), self.n, self.gate, self._consts, self._bank_after, self._f,
            self._sums, self._kq, self._bank_kq_flat, self._hq, self._bank_hq_flat, stop)
        if alarm < 0:
            self.n += len(y)
            return None if stop else flags
        self.n += alarm + 1
        return int(alarm)

    # --- checkpoints -----------------------------------------------------------

    def state(self) -> dict:
        """The state as versioned plain data (numbers and lists), for :meth:`load`."""
        f = self._f.tolist()
        return {
            "version": 1,
            "n": self.n, "zi": f[_k.ST_ZI0 : _k.ST_ZI1 + 1], "zs": [f[_k.ST_ZS]],
            "log_scale": f[_k.ST_LOG_S], "pos": self.pos, "neg": self.neg, "last_z": f[_k.ST_LAST_Z],
            "s0": f[_k.ST_S0], "s1": f[_k.ST_S1], "z0": [f[_k.ST_Z0]], "z1": [f[_k.ST_Z1]],
            "bz": [f[_k.ST_BZ]], "bank_log_scale": f[_k.ST_BANK_S],
            "bank_pos": self.bank_pos.tolist(), "bank_neg": self.bank_neg.tolist(),
            "gate_open": self.gate.tolist(), "bias_zi": [f[_k.ST_BIAS]],
        }

    def load(self, state: dict) -> None:
        """Resume from :meth:`state` (older states without the slow bank or the gate
        start those afresh); a newer version is refused by name."""
        if state.get("version", 1) != 1:
            raise InvalidArgument(f"trigger state version {state['version']} is not supported (this reads 1)")
        f, nk = self._f, len(self.bank_drifts)
        self.n = int(state["n"])
        f[_k.ST_LOG_S] = state["log_scale"]
        f[_k.ST_ZI0 : _k.ST_ZI1 + 1] = np.array(state["zi"], dtype=float)
        f[_k.ST_ZS] = np.array(state["zs"], dtype=float)[0]
        self._sums[0], self._sums[1], f[_k.ST_LAST_Z] = state["pos"], state["neg"], state["last_z"]
        if "s0" in state:  # checkpoints from before the slow bank start it afresh
            f[_k.ST_S0], f[_k.ST_S1] = state["s0"], state["s1"]
            f[_k.ST_Z0], f[_k.ST_Z1] = state["z0"][0], state["z1"][0]
            f[_k.ST_BZ], f[_k.ST_BANK_S] = state["bz"][0], state["bank_log_scale"]
            self._sums[2 : 2 + nk] = np.array(state["bank_pos"], dtype=np.int64)
            self._sums[2 + nk :] = np.array(state["bank_neg"], dtype=np.int64)
        if len(state.get("gate_open", ())) == self.gate_lag:  # older checkpoints: closed for a while
            self.gate = np.array(state["gate_open"], dtype=float)
            f[_k.ST_BIAS] = state["bias_zi"][0]


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
