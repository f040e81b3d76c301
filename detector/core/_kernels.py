"""Compiled loops of the detection core's hot path (numba), bit for bit the numpy code they replace.

On real training runs a series gets a few hundred points a block and an alarm
every few dozen points, so the trigger and the localiser spend their time in
the fixed cost of dozens of small numpy calls, not in arithmetic. These
kernels run the same recurrences and formulas as one sequential loop each:

* every linear filter is scipy's direct form II transposed (``lfilter``) step,
  with the same operations in the same order (``b`` zero-padded to ``a``'s
  length as scipy pads it), so each state and output is the same float;
* every reduction that numpy does pairwise (``sum``, ``mean``, ``std``) uses
  numpy's pairwise summation (blocks of 128, eight accumulators), so it is the
  same float as numpy's; medians sort and take the middle as ``np.median`` does;
* ``log``, ``exp`` and ``log10`` are never numba's (libm's): numpy's SIMD
  ``log``/``exp`` and libm's differ in the last bit on about one value in ten
  thousand (exp: one in twenty), and a CUSUM on a fixed-point grid could then
  round differently. The trigger's kernels stop where a logarithm or
  exponential is due and numpy takes the whole block in one call; the
  series detector's block kernels (the last section) call numpy's own float64
  inner loops of those ufuncs instead, through their addresses
  (:func:`numpy_loops`, checked against the ufuncs at first use);
* no fast-math: LLVM does not contract ``a * b + c`` into a fused multiply-add
  without it, so products and sums round as numpy's do.

``cache=True`` writes the compiled code next to this file (or, where the
installed package is read-only, under numba's user cache directory, or
``NUMBA_CACHE_DIR``), so the compile cost (a few seconds) is paid once per
install, not per process. Where no cache location is writable at all, the
kernels compile in every process instead of failing. The kernels keep the
interpreter lock (no ``nogil``): the engine detects one run at a time anyway,
and a kernel that let the lock go handed it to one of the server's waiting
stream threads at every call (a kernel takes microseconds; a handover costs a
context switch): the server's CPU a point on the real-run workload fell ~6 %
at 32 lines a batch without it.

Equality with the numpy code is checked by tests/test_kernels.py.

One module of about 1 100 lines on purpose: the kernels call each other
(``window_search`` runs ``cost_sums``, ``best_split`` and ``best_shift``;
``series_block`` runs the trigger's and the append's),
numba caches per module file, and every function here is the compiled twin of
a numpy one documented where it is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numba
import numpy as np
from numba.extending import intrinsic


def _jit(fn: Callable[..., Any], error_model: Literal["python", "numpy"] = "python") -> Any:
    """``numba.njit(cache=True)``, without the cache where numba has nowhere to write it."""
    try:
        return numba.njit(cache=True, nogil=False, error_model=error_model)(fn)
    except RuntimeError:  # "no locator available": a read-only install and no writable cache dir
        return numba.njit(cache=False, nogil=False, error_model=error_model)(fn)


def _jit_vector(fn: Callable[..., Any]) -> Any:
    """:func:`_jit` for a loop LLVM should vectorise: numpy's error model. Python's tests
    every divisor for zero before it divides (to raise ZeroDivisionError), and that
    branch keeps a loop scalar; with numpy's a division by zero gives IEEE's inf or
    NaN, as the numpy code does, and every other division is the same operation.
    Only for loops that never divide by zero or discard what such a division gives
    (a select after it), so that no exception was ever expected."""
    return _jit(fn, error_model="numpy")


# The trigger's constants (detector.core.trigger imports them from here).
Q = 1 << 16  # fixed-point grid of the CUSUM (1/65536 of an innovation scale)
FAST_CLIP = 3.0  # |z| cap of the fast CUSUM's standardised innovations (winsorised CUSUM)
Z_CLIP = 1e4  # |z| cap: keeps the int64 sums exact for any run length we will see
LOG_ABS_Z_MEAN = -0.6351814227307391  # E[log |N(0,1)|] = -(γ + log 2) / 2
TINY = 1e-300

# Rows of trigger_linear's output.
LIN_ABS_E, LIN_ABS_EL, LIN_FLOOR, LIN_E, LIN_EL, LIN_S0, LIN_S1, LIN_ZI0, LIN_ZI1, LIN_Z0, LIN_Z1 = range(11)
# Rows of trigger_scales' output.
SC_ARG_FAST, SC_ARG_BANK, SC_LOG_S, SC_BANK_S, SC_ZS, SC_BZ, SC_LAG_FAST, SC_LAG_BANK = range(8)
# Entries of trigger_cusums' state (ZI0 and ZI1 adjacent: the forecast filter's state).
ST_S0, ST_S1, ST_Z0, ST_Z1, ST_BZ, ST_BANK_S, ST_ZI0, ST_ZI1, ST_ZS, ST_LOG_S, ST_BIAS, ST_LAST_Z = range(12)


# --- the trigger -------------------------------------------------------------------


@_jit
def trigger_linear(y, n, holt, zi0, zi1, lam, s0, s1, z0, z1, v0, v1, sf):  # pragma: no cover - compiled
    """The trigger's linear filters over a block: Holt's innovations ``e`` (filter
    ``holt`` = b0, b1, b2, a1, a2 from state ``zi0, zi1``), the discounted line's sums
    S0, S1 (states ``z0, z1``; S0, S1 of the point before: ``s0, s1``) and its
    standardised one-step errors ``el`` (forecast weights ``v0, v1``, factors ``sf``
    by points fitted, from ``n``). Returns rows ``LIN_*``, one column per point,
    states after each point. O(m)."""
    m = len(y)
    out = np.empty((11, m))
    b0, b1, b2, a1, a2 = holt[0], holt[1], holt[2], holt[3], holt[4]
    nlam = -lam
    if n == 0:
        z0 = 0.0  # a fresh segment's first sum starts from nothing
    last = len(v0) - 1
    for i in range(m):
        x = y[i]
        # Holt: lfilter([1, -2, 1], [1, a1, a2]) as scipy's DF2T step.
        e = zi0 + b0 * x
        zi0 = zi1 + x * b1 - e * a1
        zi1 = x * b2 - e * a2
        # S0 = lfilter([1], [1, -λ]) of y, S1 = lfilter([0, -λ], [1, -λ]) of S0.
        p0, p1 = s0, s1
        s0 = z0 + 1.0 * x
        z0 = x * 0.0 - s0 * nlam
        s1 = z1 + 0.0 * s0
        z1 = s0 * nlam - s1 * nlam
        k = n + i
        if k > last:
            k = last
        el = (x - (v0[k] * p0 + v1[k] * p1)) / sf[k]
        if n == 0 and i == 0:
            el = 0.0  # no forecast for the first point of a segment
        ae = abs(e)
        out[LIN_ABS_E, i] = ae if (ae > TINY or ae != ae) else TINY
        ael = abs(el)
        out[LIN_ABS_EL, i] = ael if (ael > TINY or ael != ael) else TINY
        ay = abs(x)
        out[LIN_FLOOR, i] = 1e-12 * (ay if ay > 1.0 else 1.0)
        out[LIN_E, i] = e
        out[LIN_EL, i] = el
        out[LIN_S0, i] = s0
        out[LIN_S1, i] = s1
        out[LIN_ZI0, i] = zi0
        out[LIN_ZI1, i] = zi1
        out[LIN_Z0, i] = z0
        out[LIN_Z1, i] = z1
    return out


@_jit
def trigger_scales(logs, rate, a1, zs, log_scale, bank_rate, bank_a1, bz, bank_log_scale):  # pragma: no cover
    """The log-EWMA scales over a block: ``logs`` rows log|e|, log|el|, the floor's log
    (``np.log`` of trigger_linear's first rows). Filters ``lfilter([rate], [1, a1])``
    from states ``zs``/``bz``; ``log_scale``/``bank_log_scale``: the scales before the
    block. Returns rows ``SC_*``: the arguments of the standardising ``exp`` (lagged
    scale, floored, minus E log|N(0,1)|), the scales, the states, the lagged scales.
    O(m)."""
    m = logs.shape[1]
    out = np.empty((8, m))
    lag_fast, lag_bank = log_scale, bank_log_scale
    for i in range(m):
        x = logs[0, i]
        ls = zs + rate * x
        zs = x * 0.0 - ls * a1
        xb = logs[1, i]
        bs = bz + bank_rate * xb
        bz = xb * 0.0 - bs * bank_a1
        floor = logs[2, i]
        out[SC_ARG_FAST, i] = (lag_fast if lag_fast > floor else floor) - LOG_ABS_Z_MEAN
        out[SC_ARG_BANK, i] = (lag_bank if lag_bank > floor else floor) - LOG_ABS_Z_MEAN
        out[SC_LOG_S, i] = ls
        out[SC_BANK_S, i] = bs
        out[SC_ZS, i] = zs
        out[SC_BZ, i] = bz
        out[SC_LAG_FAST, i] = lag_fast
        out[SC_LAG_BANK, i] = lag_bank
        lag_fast, lag_bank = ls, bs
    return out


@_jit
def _rint_q(z):  # pragma: no cover - compiled
    """``np.rint(np.clip(z, -Z_CLIP, Z_CLIP) * Q)`` as an integer (round half to even)."""
    if z < -Z_CLIP:
        z = -Z_CLIP
    elif z > Z_CLIP:
        z = Z_CLIP
    return np.int64(np.rint(z * Q))


@_jit
def trigger_cusums(lin, sc, scales, n, gate, gate_shift, bias_rate, bias_a1, bias_zi, bias_gate,
                   bank_after, sums, kq, bank_kq, hq, bank_hq, stop):  # pragma: no cover - compiled
    """The trigger's standardised errors, the slow bank's gate and every CUSUM over a block.

    ``scales``: ``np.exp`` of trigger_scales' first two rows; ``gate``: the gate
    inputs of the last ``gate_lag`` points; ``sums``: the CUSUM sums before the
    block (fast +, fast −, bank + per drift, bank − per drift), updated in place
    to the sums after the last point consumed. With ``stop``, stops at the first
    point where a sum exceeds its threshold. Returns (index of that point or −1,
    per point whether any sum was above its threshold, the new gate, the state
    after the last point consumed: rows ``ST_*`` of the filters, scales, the bias
    filter and the fast standardised error).
    The sums are the Lindley recursion max(0, s + x) on integers: exact. O(m k).
    """
    m = lin.shape[1]
    lag = len(gate)
    nk = len(bank_kq)
    flags = np.zeros(m, dtype=np.bool_)
    gate_in = np.empty(m)
    alarm = -1
    last_z = 0.0
    k = m - 1
    for i in range(m):
        zf = lin[LIN_E, i] / scales[0, i]
        zl = lin[LIN_EL, i] / scales[1, i]
        line_z = zl
        if line_z < -3.0:
            line_z = -3.0
        elif line_z > 3.0:
            line_z = 3.0
        bias = bias_zi + bias_rate * line_z
        bias_zi = line_z * 0.0 - bias * bias_a1
        g1 = sc[SC_LAG_BANK, i] - sc[SC_LAG_FAST, i] - gate_shift
        g2 = abs(bias) - bias_gate
        gate_in[i] = g1 if (g1 > g2 or g1 != g1) else g2
        g = gate[i] if i < lag else gate_in[i - lag]
        if not (g < 0.0 and n + i >= bank_after):
            zl = 0.0
        zc = zf
        if zc < -FAST_CLIP:
            zc = -FAST_CLIP
        elif zc > FAST_CLIP:
            zc = FAST_CLIP
        qf = _rint_q(zc)
        ql = _rint_q(zl)
        hit = False
        s = sums[0] + qf - kq
        s = s if s > 0 else 0
        sums[0] = s
        hit |= s > hq
        s = sums[1] - qf - kq
        s = s if s > 0 else 0
        sums[1] = s
        hit |= s > hq
        for j in range(nk):
            s = sums[2 + j] + ql - bank_kq[j]
            s = s if s > 0 else 0
            sums[2 + j] = s
            hit |= s > bank_hq[j]
            s = sums[2 + nk + j] - ql - bank_kq[j]
            s = s if s > 0 else 0
            sums[2 + nk + j] = s
            hit |= s > bank_hq[j]
        flags[i] = hit
        last_z = zf
        if hit and stop:
            alarm = i
            k = i
            break
    new_gate = np.empty(lag)
    for j in range(lag):
        t = k + 1 + j
        new_gate[j] = gate[t] if t < lag else gate_in[t - lag]
    state = np.empty(12)
    state[ST_S0], state[ST_S1] = lin[LIN_S0, k], lin[LIN_S1, k]
    state[ST_Z0], state[ST_Z1] = lin[LIN_Z0, k], lin[LIN_Z1, k]
    state[ST_BZ], state[ST_BANK_S] = sc[SC_BZ, k], sc[SC_BANK_S, k]
    state[ST_ZI0], state[ST_ZI1] = lin[LIN_ZI0, k], lin[LIN_ZI1, k]
    state[ST_ZS], state[ST_LOG_S] = sc[SC_ZS, k], sc[SC_LOG_S, k]
    state[ST_BIAS], state[ST_LAST_Z] = bias_zi, last_z
    return alarm, flags, new_gate, state


@_jit
def trigger_readout(sums, hq, bank_hq):  # pragma: no cover - compiled
    """:attr:`CusumTrigger.statistic` (before the product with the threshold: the largest
    sum over its threshold, the first of equals) and :attr:`CusumTrigger.alarmed` from
    the sums (fast +, fast −, bank + per drift, bank − per drift). Each division is of
    two integers below 2**53 converted to floats, which is Python's int / int on them;
    ``ok`` is False (and nothing computed) for larger ones: Python then divides. O(k)."""
    nk = len(bank_hq)
    limit = np.int64(1) << 53
    if hq >= limit:
        return False, 0.0, False
    for j in range(len(sums)):
        if sums[j] >= limit:
            return False, 0.0, False
    for j in range(nk):
        if bank_hq[j] >= limit:
            return False, 0.0, False
    top = sums[0] if sums[0] >= sums[1] else sums[1]
    best = float(top) / float(hq)
    alarmed = sums[0] > hq or sums[1] > hq
    for j in range(nk):
        p, n = sums[2 + j], sums[2 + nk + j]
        top = p if p >= n else n
        ratio = float(top) / float(bank_hq[j])
        if ratio > best:
            best = ratio
        if p > bank_hq[j] or n > bank_hq[j]:
            alarmed = True
    return True, best, alarmed


# The trigger's state as the kernels below keep it: one float array (entries ST_*,
# the same layout as trigger_cusums' state), the CUSUM sums (int64: fast +, fast −,
# bank + per drift, bank − per drift) and the gate inputs, all updated in place, so a
# block costs three kernel calls and numpy's log and exp, not the Python that unpacked
# and repacked a dozen fields. Entries of the constants array of trigger_scales_state
# and trigger_cusums_state:
C_SCALE_RATE, C_SCALE_A1, C_BANK_RATE, C_BANK_A1, C_BIAS_RATE, C_BIAS_A1, C_BIAS_GATE, C_GATE_SHIFT = range(8)


@_jit
def trigger_linear_state(y, n, holt, lam, f, v0, v1, sf):  # pragma: no cover - compiled
    """:func:`trigger_linear` from the state array ``f`` (entries ``ST_*``). O(m)."""
    return trigger_linear(y, n, holt, f[ST_ZI0], f[ST_ZI1], lam, f[ST_S0], f[ST_S1], f[ST_Z0], f[ST_Z1],
                          v0, v1, sf)


@_jit
def trigger_scales_state(logs, c, f):  # pragma: no cover - compiled
    """:func:`trigger_scales` from the constants ``c`` (entries ``C_*``) and the state
    array ``f``. O(m)."""
    return trigger_scales(logs, c[C_SCALE_RATE], c[C_SCALE_A1], f[ST_ZS], f[ST_LOG_S], c[C_BANK_RATE],
                          c[C_BANK_A1], f[ST_BZ], f[ST_BANK_S])


@_jit
def trigger_cusums_state(lin, sc, scales, n, gate, c, bank_after, f, sums, kq, bank_kq, hq, bank_hq,
                         stop):  # pragma: no cover - compiled
    """:func:`trigger_cusums` from and into the state in place: the state array ``f``,
    the sums ``sums`` and the gate inputs ``gate`` become those after the last point
    consumed. Returns (index of the alarm or −1, per point whether any sum was above
    its threshold). O(m k)."""
    alarm, flags, new_gate, state = trigger_cusums(
        lin, sc, scales, n, gate, c[C_GATE_SHIFT], c[C_BIAS_RATE], c[C_BIAS_A1], f[ST_BIAS],
        c[C_BIAS_GATE], bank_after, sums, kq, bank_kq, hq, bank_hq, stop)
    gate[:] = new_gate
    f[:] = state
    return alarm, flags


# --- numpy's reductions, bit for bit ---------------------------------------------------


@_jit
def _pairwise_block(a, lo, n):  # pragma: no cover - compiled
    """numpy's pairwise summation of ``a[lo : lo + n]`` for n ≤ 128: eight accumulators."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    top = n - n % 8
    while i < top:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@_jit
def _pairwise(a, lo, n):  # pragma: no cover - compiled
    """numpy's pairwise summation of ``a[lo : lo + n]`` (``DOUBLE_pairwise_sum``): above 128
    values, the sum of the two halves (the first a multiple of 8 long), each summed the
    same way. An explicit stack, not recursion: numba's cache cannot reload a
    self-recursive function (the process crashes)."""
    if n <= 128:
        return _pairwise_block(a, lo, n)
    starts = np.empty(64, dtype=np.int64)
    sizes = np.empty(64, dtype=np.int64)
    waiting = np.zeros(64, dtype=np.int64)  # 0: not split yet, 1: left half pending, 2: right half
    lefts = np.empty(64)
    starts[0], sizes[0], waiting[0] = lo, n, 0
    depth = 1
    value = 0.0
    done = False  # ``value`` is the sum of the top frame's child just finished
    while True:
        top = depth - 1
        if done:
            if waiting[top] == 1:
                lefts[top] = value
                waiting[top] = 2
                half = sizes[top] // 2
                half -= half % 8
                starts[depth], sizes[depth], waiting[depth] = starts[top] + half, sizes[top] - half, 0
                depth += 1
                done = False
            else:
                value = lefts[top] + value
                depth -= 1
                if depth == 0:
                    return value
        elif sizes[top] <= 128:
            value = _pairwise_block(a, starts[top], sizes[top])
            depth -= 1
            done = True
        else:
            waiting[top] = 1
            half = sizes[top] // 2
            half -= half % 8
            starts[depth], sizes[depth], waiting[depth] = starts[top], half, 0
            depth += 1


@_jit
def np_sum(a):  # pragma: no cover - compiled
    """``np.sum`` of a 1-D float64 array (the reduction starts from its identity, 0)."""
    return 0.0 + _pairwise(a, 0, len(a))


@_jit
def np_std(a):  # pragma: no cover - compiled
    """``np.std`` of a 1-D float64 array (n ≥ 1): mean, squared deviations, their mean, sqrt."""
    n = len(a)
    mean = np_sum(a) / n
    sq = np.empty(n)
    for i in range(n):
        d = a[i] - mean
        sq[i] = d * d
    return math.sqrt(np_sum(sq) / n)


@_jit
def np_median(a):  # pragma: no cover - compiled
    """``np.median`` of a 1-D float64 array without NaN (n ≥ 1): the middle of the
    sorted values, the two middle ones averaged as ``np.mean`` averages them. A
    partition, not a sort: the same order statistics, O(n)."""
    n = len(a)
    half = n // 2
    part = np.partition(a, half)
    if n % 2:
        return (0.0 + (0.0 + part[half])) / 1.0
    below = part[0]  # the largest of the lower half: the sorted values' half − 1st
    for i in range(1, half):
        if part[i] > below:
            below = part[i]
    return (0.0 + ((0.0 + below) + part[half])) / 2.0


@_jit
def _select(a, k):  # pragma: no cover - compiled
    """Reorder ``a`` (no NaN) in place so that ``a[k]`` is its k-th smallest value,
    ``a[:k]`` at most and ``a[k + 1:]`` at least that (Hoare's quickselect, pivot the
    median of three, insertion sort below 16 values). Expected O(n)."""
    lo, hi = 0, len(a) - 1
    while hi - lo >= 16:
        mid = (lo + hi) // 2
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:  # a[lo:j + 1] ≤ pivot ≤ a[i:hi + 1], and a[j + 1:i] == pivot
            hi = j
        elif k >= i:
            lo = i
        else:
            return
    for i in range(lo + 1, hi + 1):
        v = a[i]
        j = i - 1
        while j >= lo and v < a[j]:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


@_jit
def _median_inplace(a):  # pragma: no cover - compiled
    """:func:`np_median` of ``a`` (n ≥ 1), reordering ``a``: the same order statistics
    by :func:`_select` instead of a copy and numpy's partition (twice as fast on a
    window's differences). A zero's sign may differ from numpy's where both signs are
    in ``a`` (equal values); with a NaN in ``a``, :func:`np_median`. O(n) expected."""
    n = len(a)
    for i in range(n):
        if a[i] != a[i]:
            return np_median(a)
    half = n // 2
    _select(a, half)
    if n % 2:
        return (0.0 + (0.0 + a[half])) / 1.0
    below = a[0]
    for i in range(1, half):
        if a[i] > below:
            below = a[i]
    return (0.0 + ((0.0 + below) + a[half])) / 2.0


@_jit
def point_noise(history):  # pragma: no cover - compiled
    """:func:`detector.core.localiser.point_noise`: MAD of first differences / √2.
    O(n) expected (two selections).

    The medians are :func:`_median_inplace`'s: the sign of a zero median of the
    differences cannot matter, as only the absolute deviations from it are used, and
    those have no negative zero."""
    n = len(history)
    if n < 3:
        return 0.0
    d = np.empty(n - 1)
    for i in range(n - 1):
        d[i] = history[i + 1] - history[i]
    med = _median_inplace(d)
    for i in range(n - 1):
        d[i] = abs(d[i] - med)
    return 1.4826 * _median_inplace(d) / math.sqrt(2.0)


@_jit
def history_scale(history):  # pragma: no cover - compiled
    """:func:`detector.core.localiser.history_scale`: the standard deviation. O(n)."""
    return np_std(history) if len(history) > 1 else 0.0


# --- the localiser's piecewise-linear cost -------------------------------------------------


# Σ 1, Σ t and Σ t² over the first k points and a line's Σ(t − t̄)² over L consecutive
# times, as the cost's closed forms give them, for k, L up to _TABLE_LEN - 1: each a few
# divisions a candidate split otherwise (the loops' dearest operations), and the same
# float as that expression (numpy applies each operation once, as the kernels do).
_TABLE_LEN = 4097  # a series window (1 024) and any TCPD series fit
_K = np.arange(_TABLE_LEN, dtype=np.float64)
_CLOSED = np.vstack([_K, _K * (_K - 1.0) / 2.0, (_K - 1.0) * _K * (2.0 * _K - 1.0) / 6.0])
_VTT = _K * (_K * _K - 1.0) / 12.0
_VTT_REVERSED = _VTT[::-1].copy()  # the right sides' lengths fall as the split moves on
del _K


@_jit
def cost_sums(signal):  # pragma: no cover - compiled
    """:meth:`CostPiecewiseLinear.fit`'s prefix sums (rows n, Σt, Σt², Σy, Σty, Σy² over the
    first k points, k = 0..n) of the values centred on their mean. O(n)."""
    n = len(signal)
    s = np.empty((6, n + 1))
    mean = np_sum(signal) / n if n else 0.0
    if n < _TABLE_LEN:
        s[0:3, :] = _CLOSED[:, : n + 1]
    else:
        for k in range(n + 1):
            kf = float(k)
            s[0, k] = kf
            s[1, k] = kf * (kf - 1.0) / 2.0
            s[2, k] = (kf - 1.0) * kf * (2.0 * kf - 1.0) / 6.0
    s3, s4, s5 = s[3], s[4], s[5]
    s3[0] = 0.0
    s4[0] = 0.0
    s5[0] = 0.0
    if n == 0:
        return s
    # numpy's cumsum starts from the first value, not from 0 + it
    y = signal[0] - mean
    a3, a4, a5 = y, 0.0 * y, y * y
    s3[1], s4[1], s5[1] = a3, a4, a5
    for i in range(1, n):
        y = signal[i] - mean
        a3 += y
        a4 += float(i) * y
        a5 += y * y
        s3[i + 1] = a3
        s4[i + 1] = a4
        s5[i + 1] = a5
    return s


@_jit
def segment_error(s, start, end):  # pragma: no cover - compiled
    """:meth:`CostPiecewiseLinear.error`: the line's squared error on ``[start, end)``. O(1)."""
    n = s[0, end] - s[0, start]
    st = s[1, end] - s[1, start]
    stt = s[2, end] - s[2, start]
    sy = s[3, end] - s[3, start]
    sty = s[4, end] - s[4, start]
    syy = s[5, end] - s[5, start]
    n = n if n > 1.0 else 1.0
    vtt = stt - st * st / n
    vty = sty - st * sy / n
    vyy = syy - sy * sy / n
    r = vyy - vty * vty / vtt if vtt > 0 else vyy
    return r if (r > 0.0 or r != r) else 0.0


@_jit
def _line_sse(n, mean_t, sy, sty, syy):  # pragma: no cover - compiled
    vtt = n * (n * n - 1.0) / 12.0
    vty = sty - mean_t * sy
    r = syy - sy * sy / n - vty * vty / vtt
    return r if (r > 0.0 or r != r) else 0.0


@_jit
def best_split(s, start, end, min_size):  # pragma: no cover - compiled
    """:meth:`CostPiecewiseLinear.split_gains` and its last argmax: the best split of
    ``[start, end)`` into two lines and its gain, (−1, 0.0) when none fits. O(end − start).

    Each side's Σ(t − t̄)² comes from ``_VTT`` (the same float as :func:`_line_sse`
    computes) where the segment fits the table."""
    lo, hi = start + min_size, end - min_size + 1
    if hi <= lo:
        return -1, 0.0
    if end - start >= _TABLE_LEN:
        return _best_split_direct(s, start, end, min_size)
    whole = segment_error(s, start, end)
    s3, s4, s5 = s[3], s[4], s[5]
    last = _TABLE_LEN - 1 - end
    gains = np.empty(hi - lo)
    _split_gains(s3[lo:hi], s4[lo:hi], s5[lo:hi], _VTT[min_size:min_size + hi - lo],
                 _VTT_REVERSED[last + lo:last + hi], start, end, lo, s3[start], s4[start], s5[start],
                 s3[end], s4[end], s5[end], whole, gains)
    at, gain = _last_argmax(gains)
    return lo + at, gain


@_jit_vector
def _split_gains(s3, s4, s5, vtt_left, vtt_right, start, end, lo, a3, a4, a5, e3, e4, e5, whole,
                 out):  # pragma: no cover - compiled
    """:func:`best_split`'s gain at each split ``lo + i`` into ``out[i]``: ``whole`` less
    :func:`_line_sse` of each side (rows 3-5 of the sums from ``lo``, each side's
    Σ(t − t̄)² from the tables), the same operations in the same order, in a loop
    without branches that LLVM vectorises. O(len(out))."""
    for i in range(len(out)):
        sp = float(lo + i)
        sy = s3[i] - a3
        vty = (s4[i] - a4) - (start + sp - 1.0) / 2.0 * sy
        left = (s5[i] - a5) - sy * sy / (sp - start) - vty * vty / vtt_left[i]
        left = left if (left > 0.0 or left != left) else 0.0
        sy = e3 - s3[i]
        vty = (e4 - s4[i]) - (sp + end - 1.0) / 2.0 * sy
        right = (e5 - s5[i]) - sy * sy / (end - sp) - vty * vty / vtt_right[i]
        right = right if (right > 0.0 or right != right) else 0.0
        out[i] = whole - left - right


@_jit
def _last_argmax(values):  # pragma: no cover - compiled
    """The index and value of the largest of ``values`` (n ≥ 1): the last NaN if there is
    one (np.argmax takes NaN as the largest), else the last of equal maxima (ties to the
    later index, as the localiser's ``_last_argmax`` and a running ``>=`` comparison pick
    it). The maximum in one pass without branches, then a backward search for it. O(n)."""
    top = -np.inf
    nan = False
    for i in range(len(values)):
        v = values[i]
        nan |= v != v
        top = v if v > top else top
    if nan:
        for i in range(len(values) - 1, -1, -1):
            if values[i] != values[i]:
                return i, math.nan
    for i in range(len(values) - 1, -1, -1):
        if values[i] == top:
            return i, values[i]
    return -1, 0.0  # not reached: the maximum is one of the values


@_jit
def _best_split_direct(s, start, end, min_size):  # pragma: no cover - compiled
    """:func:`best_split` of a segment longer than the tables. O(end − start)."""
    lo, hi = start + min_size, end - min_size + 1
    whole = segment_error(s, start, end)
    best, gain, nan_at = -1, 0.0, -1
    for c in range(lo, hi):
        sp = float(c)
        left = _line_sse(sp - start, (start + sp - 1.0) / 2.0, s[3, c] - s[3, start],
                         s[4, c] - s[4, start], s[5, c] - s[5, start])
        right = _line_sse(end - sp, (sp + end - 1.0) / 2.0, s[3, end] - s[3, c],
                          s[4, end] - s[4, c], s[5, end] - s[5, c])
        g = whole - left - right
        if g != g:
            nan_at = c  # np.argmax takes NaN as the largest
        elif best < 0 or g >= gain:  # ties to the later index
            best, gain = c, g
    if nan_at >= 0:
        return nan_at, math.nan
    return best, gain


@_jit
def best_shift(s, start, end, min_size, last_min_size):  # pragma: no cover - compiled
    """:meth:`CostPiecewiseLinear.shift_gains` and its last argmax: the best level
    shift on a shared slope in ``[start, end)`` and its gain, (−1, 0.0) when none
    fits. O(end − start)."""
    lo, hi = start + min_size, end - last_min_size + 1
    n = end - start
    if hi <= lo or n < 3:
        return -1, 0.0
    w1 = s[1, end] - s[1, start]
    w2 = s[2, end] - s[2, start]
    w3 = s[3, end] - s[3, start]
    w4 = s[4, end] - s[4, start]
    mean_t, mean_y = w1 / n, w3 / n
    stt = w2 - n * mean_t * mean_t
    slope = (w4 - n * mean_t * mean_y) / stt
    gains = np.empty(hi - lo)
    _shift_gains(s[0, lo:hi], s[1, lo:hi], s[3, lo:hi], s[0, end], s[1, end], s[3, end], float(n), mean_t,
                 mean_y, slope, stt, gains)
    at, gain = _last_argmax(gains)
    return lo + at, gain


@_jit_vector
def _shift_gains(s0, s1, s3, e0, e1, e3, n, mean_t, mean_y, slope, stt, out):  # pragma: no cover
    """:func:`best_shift`'s gain at each index ``lo + i`` into ``out[i]`` (rows 0, 1 and 3
    of the sums from ``lo``; ``e*`` the rows at the end; ``n`` the segment's length),
    the same operations in the same order, in a loop LLVM vectorises. O(len(out))."""
    for i in range(len(out)):
        m = e0 - s0[i]
        tail_t = (e1 - s1[i]) - m * mean_t
        tail_e = (e3 - s3[i]) - m * mean_y - slope * tail_t
        norm = m - m * m / n - tail_t * tail_t / stt
        out[i] = tail_e * tail_e / norm if norm > 1e-9 else 0.0


@_jit
def window_search(y, min_size, shift_min_size):  # pragma: no cover - compiled
    """The localiser's first look at a window: the cost's sums (:func:`cost_sums`), the
    best two-line split's gain, the best level shift (index, gain) and max |y|. O(n)."""
    s = cost_sums(y)
    n = len(y)
    split_gain = best_split(s, 0, n, min_size)[1]
    shift_index, shift_gain = best_shift(s, 0, n, min_size, shift_min_size)
    peak = 0.0
    for i in range(n):
        v = abs(y[i])
        if v > peak or v != v:
            peak = v
    return s, split_gain, shift_index, shift_gain, peak


@_jit
def localiser_look(held, start, need_noise, noise, min_size, shift_min_size, penalty_w, noise_w,
                   shift_w, log_n, weak_below):  # pragma: no cover - compiled
    """:meth:`WindowLocaliser.look`'s compiled part: a series detector's look at its
    segment ``held[start:]`` up to the point where Python is needed.

    The point noise of ``held`` (:func:`point_noise`, unless ``need_noise`` is False:
    then ``noise``), its spread (:func:`history_scale`), the segment's
    :func:`window_search`, the floored scale, the penalty ``(penalty_w · scale² +
    noise_w · noise²) · log_n`` (``log_n``: Python's ``math.log`` of the segment's
    length, so the logarithm is libm's as before) and the evidence, each with the
    operations of ``WindowLocaliser.locate_with_evidence`` in its order (Python's
    ``max`` keeps the first of equals and a NaN it starts with; so do these
    comparisons). ``shift_w``: the shift penalty's factor, negative for none.
    Returns (done, measured, noise, scale, penalty, evidence, sums, split_gain,
    shift_index, shift_gain): ``done`` when nothing can pass (no break beats the
    penalty, no level shift beats its own): the look's result is then no break and
    ``evidence``; otherwise Python confirms from the sums and gains.

    The point noise is a look's dearest part (two selections) and only raises the
    penalty. When it is to be measured and ``weak_below`` (at most 1) is positive,
    the evidence is first taken against the penalty without the noise term, which
    bounds the true evidence from above (a larger positive divisor, and IEEE
    rounding is monotone): if that is already below ``weak_below``, the look is
    done and weak whatever the noise, and the noise is not measured
    (``measured`` False, ``noise`` unchanged, ``evidence`` that bound; the caller
    ends the episode, so neither is read again). Only where the spread is below
    1e150: then no first difference overflows and the noise is finite, so the
    true penalty is at least the bound's. The same breaks and the same decisions
    as measuring it first. O(n)."""
    scale = history_scale(held)
    y = held[start:]
    n = len(y)
    if n < 2 * min_size + 1:
        if need_noise:
            noise = point_noise(held)
        return True, need_noise, noise, scale, 0.0, 0.0, np.empty((6, 0)), 0.0, -1, 0.0
    s, split_gain, shift_index, shift_gain, peak = window_search(y, min_size, shift_min_size)
    floor = 1e-12 * (peak if peak > 1.0 else 1.0)
    if floor > scale:
        scale = floor
    if scale < TINY:
        scale = TINY
    if need_noise:
        if weak_below > 0.0 and scale < 1e150:
            bound = (penalty_w * scale * scale) * log_n
            weak = split_gain / bound
            if shift_w >= 0.0 and shift_index >= 0:
                shift_weak = shift_gain / (shift_w * bound)
                if not shift_weak < weak_below:
                    weak = shift_weak  # not below: measure
                elif shift_weak > weak:
                    weak = shift_weak
            if weak < weak_below:
                return True, False, noise, scale, bound, weak, s, split_gain, shift_index, shift_gain
        noise = point_noise(held)
    penalty = (penalty_w * scale * scale + noise_w * noise * noise) * log_n
    evidence = split_gain / penalty
    if evidence > 1.0:
        return False, need_noise, noise, scale, penalty, evidence, s, split_gain, shift_index, shift_gain
    if shift_w >= 0.0:
        if shift_index < 0:
            best = 0.0 / (shift_w * penalty)
        elif shift_gain <= shift_w * penalty:
            best = shift_gain / (shift_w * penalty)
        else:
            return False, need_noise, noise, scale, penalty, evidence, s, split_gain, shift_index, shift_gain
        if best > evidence:
            evidence = best
    return True, need_noise, noise, scale, penalty, evidence, s, split_gain, shift_index, shift_gain


@_jit
def binseg(s, n, min_size, pen):  # pragma: no cover - compiled
    """ruptures' ``Binseg(jump=1).predict(pen=pen)`` on the cost with sums ``s``: the
    breaks, sorted, without ``n``. Each round splits the segment whose best split gains
    most (the first of equal gains), while that gain exceeds ``pen``. Each segment's
    best split is searched once (ruptures searches every segment every round; the
    answer is the same). O(n) per break found."""
    ends = np.empty(n + 1, dtype=np.int64)  # segment j is [ends[j - 1], ends[j]), ends[-1] = 0
    best = np.empty(n + 1, dtype=np.int64)
    gains = np.empty(n + 1)
    ends[0] = n
    best[0], gains[0] = best_split(s, 0, n, min_size)
    count = 1
    while True:
        j = 0
        for i in range(1, count):
            if gains[i] > gains[j]:
                j = i
        if best[j] < 0 or not gains[j] > pen:
            break
        # Segment j splits at best[j]: shift the later segments one place up.
        for i in range(count, j, -1):
            ends[i], best[i], gains[i] = ends[i - 1], best[i - 1], gains[i - 1]
        start = ends[j - 1] if j > 0 else 0
        cut, end = best[j], ends[j + 1]
        ends[j] = cut
        best[j], gains[j] = best_split(s, start, cut, min_size)
        best[j + 1], gains[j + 1] = best_split(s, cut, end, min_size)
        count += 1
    return ends[: count - 1].copy()  # segment ends in order; the last is n


@_jit
def parabola_basis(y):  # pragma: no cover - compiled
    """:func:`detector.core.localiser._parabola_sse`'s vectors (n > 3): rows ``y`` centred,
    ``t`` (times centred and scaled to [−1, 1]) and ``t² − mean(t²)``. The dot products
    stay numpy's (BLAS sums in its own order). O(n)."""
    n = len(y)
    out = np.empty((3, n))
    half = (n - 1) / 2.0
    scale = half if half > 1.0 else 1.0
    for i in range(n):
        t = (float(i) - half) / scale
        out[1, i] = t
        out[2, i] = t * t
    q_mean = np_sum(out[2]) / n
    y_mean = np_sum(y) / n
    for i in range(n):
        out[2, i] = out[2, i] - q_mean
        out[0, i] = y[i] - y_mean
    return out


# --- the localiser's confirm step ---------------------------------------------------------
#
# What WindowLocaliser._confirm does in Python after a look that may pass (binary
# segmentation, the curvature check, the level shifts, the last break held back),
# in the same kernel as the look, with the same operations in the same order. The
# parabola's five dot products are BLAS's ``ddot``, called through its address (an
# argument, :func:`blas_ddot`): numpy's ``a @ b`` of two vectors is that call, and a
# sum in any other order (a plain loop, numba's own ``np.dot``) differs from it in
# the last bit on most windows, which a margin compared with a penalty could see.


@intrinsic
def _call_ddot(typingctx, fn, x, y):  # pragma: no cover - compiled
    """``x @ y`` of two C-contiguous float64 vectors of the same length by the BLAS
    ``cblas_ddot`` (64-bit integers) at address ``fn``. O(n)."""
    from llvmlite import ir

    ok = all(isinstance(a, numba.types.Array) and a.ndim == 1 and a.layout == "C"
             and a.dtype == numba.types.float64 for a in (x, y))
    if not ok:
        return None
    sig = numba.types.float64(numba.types.intp, x, y)

    def codegen(context, builder, signature, llargs):  # noqa: ANN001, ANN202 - numba's API
        i64, pointer = ir.IntType(64), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.DoubleType(), [i64, pointer, i64, pointer, i64])
        target = builder.inttoptr(llargs[0], fnty.as_pointer())
        xs = context.make_array(signature.args[1])(context, builder, llargs[1])
        ys = context.make_array(signature.args[2])(context, builder, llargs[2])
        one = ir.Constant(i64, 1)
        return builder.call(target, [xs.nitems, builder.bitcast(xs.data, pointer), one,
                                     builder.bitcast(ys.data, pointer), one])

    return sig, codegen


@_jit
def blas_dot(fn, x, y):  # pragma: no cover - compiled
    """``x @ y`` (C-contiguous float64 vectors, same length) by the ``ddot`` at ``fn[0]``
    (:func:`blas_ddot`). O(n)."""
    return _call_ddot(fn[0], x, y)


@_jit
def parabola_sse(y, fn):  # pragma: no cover - compiled
    """:func:`detector.core.localiser._parabola_sse`: the least-squares parabola's squared
    error from :func:`parabola_basis`'s vectors, the dot products by BLAS (``fn``:
    :func:`blas_ddot`). O(n)."""
    n = len(y)
    if n <= 3:
        return 0.0
    basis = parabola_basis(y)
    yc, t, q = basis[0], basis[1], basis[2]
    a = _call_ddot(fn[0], yc, yc)
    b = _call_ddot(fn[0], yc, t)
    c = _call_ddot(fn[0], yc, q)
    tt = _call_ddot(fn[0], t, t)
    qq = _call_ddot(fn[0], q, q)
    r = a - b * b / tt - c * c / qq
    return 0.0 if r < 0.0 else r  # Python's max(r, 0.0): r itself when NaN or −0.0


@_jit
def _curvature_margin(y, s, left, index, right, fn):  # pragma: no cover - compiled
    """How much better the two lines of ``[left, index)`` and ``[index, right)`` fit than
    one parabola over both (``_not_curvature``'s margin). O(right − left)."""
    lines = segment_error(s, left, index) + segment_error(s, index, right)
    return parabola_sse(y[left:right], fn) - lines


@_jit
def not_curvature(y, s, bkps, pen, fn):  # pragma: no cover - compiled
    """:meth:`WindowLocaliser._not_curvature`: drop, one at a time, the break whose two
    lines beat one parabola over both its segments by least (the first of equals, the
    first NaN if any) while that margin is not above ``pen``. A margin depends on the
    break's neighbours only, so after a drop only the two breaks beside it are
    computed again (the Python code's memo). O(n) per break dropped."""
    n = len(y)
    k = len(bkps)
    b = bkps.copy()
    margins = np.empty(k)
    for i in range(k):
        left = b[i - 1] if i > 0 else 0
        right = b[i + 1] if i + 1 < k else n
        margins[i] = _curvature_margin(y, s, left, b[i], right, fn)
    while k > 0:
        worst = -1
        for i in range(k):
            if margins[i] != margins[i]:
                worst = i
                break
        if worst < 0:
            worst = 0
            for i in range(1, k):
                if margins[i] < margins[worst]:
                    worst = i
        if margins[worst] > pen:
            break
        for i in range(worst, k - 1):
            b[i] = b[i + 1]
            margins[i] = margins[i + 1]
        k -= 1
        for i in range(worst - 1, worst + 1):
            if 0 <= i < k:
                left = b[i - 1] if i > 0 else 0
                right = b[i + 1] if i + 1 < k else n
                margins[i] = _curvature_margin(y, s, left, b[i], right, fn)
    return b[:k].copy()


@_jit
def _two_lines_gain(s, left, index, right):  # pragma: no cover - compiled
    """``cost.error(left, right) - cost.error(left, index) - cost.error(index, right)``. O(1)."""
    return segment_error(s, left, right) - segment_error(s, left, index) - segment_error(s, index, right)


@_jit
def localiser_confirm(y, s, split_gain, shift_index, shift_gain, scale, penalty, final, min_size,
                      shift_min_size, curv_on, curv_w, shift_w, fn):  # pragma: no cover - compiled
    """:meth:`WindowLocaliser._confirm`: the breaks of ``y`` (cost sums ``s``) that pass
    ``penalty``, from :func:`window_search`'s gains. ``curv_on``/``curv_w``: the
    curvature check and its factor; ``shift_w``: the shift penalty's factor, negative
    for none; ``fn``: :func:`blas_ddot`. Returns (evidence, the breaks' indices, their
    gains, their penalties), the splits in order. O(n) per break found."""
    n = len(y)
    evidence = split_gain / penalty
    bkps = np.empty(0, dtype=np.int64)
    if evidence > 1.0:  # else Binseg would confirm nothing
        bkps = binseg(s, n, min_size, penalty)
        if curv_on:
            bkps = not_curvature(y, s, bkps, curv_w * penalty, fn)
    k = len(bkps)
    shifted = np.zeros(k, dtype=np.bool_)
    shift_gains = np.zeros(k)
    if shift_w < 0.0:
        pass
    elif k > 0:  # _refine_shifts
        right = n
        for j in range(k):
            left = bkps[j - 1] if j > 0 else 0  # the previous break, moved or not
            index = bkps[j]
            right = bkps[j + 1] if j + 1 < k else n
            lines = _two_lines_gain(s, left, index, right)
            last = shift_min_size if right == n else min_size
            best, gain = best_shift(s, left, right, min_size, last)
            if best >= 0 and gain - shift_w * penalty >= lines - penalty:
                bkps[j] = best
                shifted[j] = True
                shift_gains[j] = gain
    else:  # _single_shift
        best_gain = 0.0
        if shift_index >= 0:
            best_gain = shift_gain
            if not shift_gain <= shift_w * penalty:
                keep = True
                if curv_on:
                    line_sse = segment_error(s, 0, n)
                    if parabola_sse(y, fn) - (line_sse - shift_gain) <= curv_w * penalty:
                        keep = False
                if keep:
                    bkps = np.array([shift_index], dtype=np.int64)
                    shifted = np.ones(1, dtype=np.bool_)
                    shift_gains = np.array([shift_gain])
                    k = 1
        ratio = best_gain / (shift_w * penalty)
        if ratio > evidence:  # Python's max(evidence, ratio)
            evidence = ratio
    if k > 0 and not final:
        last = bkps[k - 1]
        if last >= n - (shift_min_size if shifted[k - 1] else 2 * min_size - 1):
            k -= 1
    indices = np.empty(k, dtype=np.int64)
    gains = np.empty(k)
    penalties = np.empty(k)
    for j in range(k):
        index = bkps[j]
        indices[j] = index
        if shifted[j]:
            gains[j] = shift_gains[j]
            penalties[j] = shift_w * penalty
        else:
            left = bkps[j - 1] if j > 0 else 0
            right = bkps[j + 1] if j + 1 < k else n
            gains[j] = _two_lines_gain(s, left, index, right)
            penalties[j] = penalty
    return evidence, indices, gains, penalties


@_jit
def localiser_look_confirm(held, start, need_noise, noise, min_size, shift_min_size, penalty_w, noise_w,
                           shift_w, log_n, curv_on, curv_w, final, weak_below, fn):  # pragma: no cover
    """:meth:`WindowLocaliser.look` in one call: :func:`localiser_look`, then, when a
    break may pass, :func:`localiser_confirm` on ``held[start:]``. Returns (measured,
    noise, scale, evidence, the breaks' indices, gains and penalties): ``measured``
    whether the noise was (see :func:`localiser_look`). O(n)."""
    done, measured, noise, scale, penalty, evidence, s, split_gain, shift_index, shift_gain = localiser_look(
        held, start, need_noise, noise, min_size, shift_min_size, penalty_w, noise_w, shift_w, log_n,
        weak_below)
    if done:
        return measured, noise, scale, evidence, np.empty(0, dtype=np.int64), np.empty(0), np.empty(0)
    evidence, indices, gains, penalties = localiser_confirm(
        held[start:], s, split_gain, shift_index, shift_gain, scale, penalty, final, min_size,
        shift_min_size, curv_on, curv_w, shift_w, fn)
    return measured, noise, scale, evidence, indices, gains, penalties


_BLAS_DDOT: list = []  # [array or None], filled on the first call of blas_ddot


def blas_ddot() -> np.ndarray | None:
    """The address of the ``cblas_ddot`` numpy's ``a @ b`` of two float64 vectors calls
    (an intp array of one entry), or None where it cannot be found or does not give
    exactly what ``@`` gives on a sample (the localiser then confirms in Python).

    Looked up in the OpenBLAS that numpy's wheels bundle (``numpy.libs`` on Linux,
    ``numpy/.dylibs`` on macOS), under the names of its 64-bit-integer interface.
    Once per process, a few milliseconds."""
    if _BLAS_DDOT:
        return _BLAS_DDOT[0]
    fn = None
    try:
        fn = _find_ddot()
        if fn is not None and not _ddot_agrees(fn):
            fn = None
    except Exception:  # noqa: BLE001 - an unexpected build: the Python path, not a failure
        fn = None
    _BLAS_DDOT.append(fn)
    return fn


def _find_ddot() -> np.ndarray | None:
    import ctypes
    import glob
    import os

    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    root = os.path.dirname(os.path.abspath(np.__file__))
    for path in sorted(glob.glob(os.path.join(root, os.pardir, "numpy.libs", "*openblas*"))
                       + glob.glob(os.path.join(root, ".dylibs", "*openblas*"))):
        lib = ctypes.CDLL(path)
        for name in ("scipy_cblas_ddot64_", "cblas_ddot64_"):
            address = ctypes.cast(getattr(lib, name, None) or 0, ctypes.c_void_p).value
            if address:
                return np.array([address], dtype=np.intp)
    return None


def _ddot_agrees(fn: np.ndarray) -> bool:
    """Whether ``fn`` gives numpy's ``@`` bit for bit on vectors of every length up to
    160 (the SIMD bodies and tails), a sample of longer ones up to the 1 024 points of
    a series window and a few beyond, of every scale, as :func:`parabola_basis`'s rows."""
    rng = np.random.default_rng(20261203)
    for n in [*range(1, 160), *rng.integers(160, 1100, 40).tolist(), 1023, 1024, 2047, 4096, 10007]:
        rows = parabola_basis(rng.normal(0.0, 10.0 ** rng.uniform(-8, 8), max(n, 4)))[:, :n].copy()
        for x, y in ((rows[0], rows[0]), (rows[0], rows[1]), (rows[0], rows[2]), (rows[2], rows[2])):
            if blas_dot(fn, x, y) != float(x @ y):
                return False
    return True


# --- the plateau test --------------------------------------------------------------


@_jit
def _plateau_setup(n):  # pragma: no cover - compiled
    """The constants of a window of ``n`` points: Σ t² of the centred times (pairwise,
    as numpy sums a 1-D array), the centre, the degrees of freedom, the span. O(n)."""
    half = (n - 1) / 2.0
    tt = np.empty(n)
    for j in range(n):
        t = float(j) - half
        tt[j] = t * t
    stt = np_sum(tt)  # np.sum(t * t): pairwise, as numpy sums a 1-D array
    dof = n - 2 if n - 2 > 1 else 1
    return stt, half, dof, n - 1


@_jit
def _plateau_window(y, w, n, stt, half, dof, span, q, min_delta, relative, single):  # pragma: no cover
    """The plateau test of the window of ``n`` points of ``y`` from ``w``: (is_plateau,
    slope, ci_low, ci_high, bound). ``single``: the call has one window only (its sums
    then start from the first point, as numpy's ``cumsum`` does). O(n)."""
    first = 1 if single else 0
    total = y[w] if first else 0.0
    for j in range(first, n):
        total += y[w + j]
    mean = total / n
    if first:
        d = y[w] - mean
        sty, ss = y[w] * (0.0 - half), d * d
    else:
        sty, ss = 0.0, 0.0
    for j in range(first, n):
        sty += y[w + j] * (float(j) - half)  # Σ t (y − mean) = Σ t y, as Σ t = 0
        d = y[w + j] - mean
        ss += d * d
    slope = sty / stt
    rss = ss - slope * sty  # Σ residual² = Σ (y − mean)² − slope · Σ t y
    rss = rss if rss > 0.0 else 0.0  # never −0.0 here (ss ≥ +0), so no sign to keep
    se = math.sqrt(rss / dof / stt)
    low, high = (slope - q * se) * span, (slope + q * se) * span
    bound = min_delta * (abs(mean) if relative else 1.0)
    return (-bound <= low and high <= bound), slope, low, high, bound


@_jit
def plateau_windows(y, n, q, min_delta, relative):  # pragma: no cover - compiled
    """:func:`detector.core.trend._plateau_windows` for every window of ``n`` points of
    ``y`` (``q`` the t quantile): rows is_plateau, slope, ci_low, ci_high, bound. Each
    window's sums run over its points in order from 0, as numpy reduces the rows of the
    (n, m) array of shifted copies (from the first point when there is one window, as
    numpy's ``cumsum`` does). O(n m)."""
    m = len(y) - n + 1
    out = np.empty((5, m))
    stt, half, dof, span = _plateau_setup(n)
    for w in range(m):
        is_plateau, slope, low, high, bound = _plateau_window(y, w, n, stt, half, dof, span, q, min_delta,
                                                              relative, m == 1)
        out[0, w] = 1.0 if is_plateau else 0.0
        out[1, w], out[2, w], out[3, w], out[4, w] = slope, low, high, bound
    return out


# --- the plateau test on step bins ------------------------------------------------------
#
# State of a series' bins (SeriesDetector keeps the arrays; a checkpoint stores them):
# integers PB_* and floats PF_* below, and three rings of ``patience`` closed bins
# (their mean value, mean step and first step).
# PB_FIRST: the series' first step (−1 before it); PB_START, PB_END: the open bin's
# edges; PB_COUNT: its points; PB_HEAD: the ring's next slot (its oldest once full);
# PB_IN: in a plateau; PB_BIN_FIRST, PB_BIN_LAST: the open bin's first and last step;
# PB_CLOSED: bins closed so far. PF_SUM_Y, PF_SUM_X: the open bin's sums of values and
# of steps after the first.
(PB_FIRST, PB_START, PB_END, PB_COUNT, PB_HEAD, PB_IN, PB_BIN_FIRST, PB_BIN_LAST,
 PB_CLOSED) = range(9)
PB_SIZE = 9
PF_SUM_Y, PF_SUM_X = 0, 1
PF_SIZE = 2


@_jit
def plateau_bin_width(start, first, rho):  # pragma: no cover - compiled
    """The width in steps of the bin opening at step ``start`` of a series whose first
    point is at ``first``: ``rho`` of the steps elapsed, at least one. O(1)."""
    width = int(math.floor(rho * float(start - first)))
    return width if width > 1 else 1


@_jit
def plateau_bins(steps, y, st, sf, ring_y, ring_x, ring_first, patience, q, min_delta, relative,
                 rho, recent):  # pragma: no cover - compiled
    """The plateau test on step bins: the finite working-scale points ``y`` at ``steps``
    go into bins whose edges depend on steps alone (:func:`plateau_bin_width`); when a
    point falls past the open bin, that bin closes (if it holds points) and its mean
    joins the last ``patience`` closed bins, on which the slope-equivalence test runs
    (ordinary least squares of bin means on bin mean steps; the change over the
    window's span, its ``q`` confidence interval, inside ±``min_delta``, times the
    mean level when ``relative``). A plateau starts where the interval lies inside
    the margin and ends where it lies wholly outside. The window is tested only
    once it spans at most ``recent`` of the series' steps so far (early on the
    bins are one step wide and 20 of them are the whole history: "flat so far"
    is not a plateau). The state arrays are advanced
    in place; returns the transitions, rows: index of the point that closed the bin,
    started (1) or ended (0), slope per step, change low, high, bound, located step
    (the window's first step for a start, the closed bin's last step for an end),
    the window's span in steps. The same bins and floats however the points are
    batched. O(points + patience per closed bin + log(gap) / rho per gap)."""
    m = len(y)
    out = np.empty((8, m))
    k = 0
    for i in range(m):
        s = steps[i]
        if st[PB_FIRST] < 0:
            st[PB_FIRST] = s
            st[PB_START] = s
            st[PB_END] = s + plateau_bin_width(s, s, rho)
        if s >= st[PB_END]:
            if st[PB_COUNT] > 0:
                head = st[PB_HEAD]
                ring_y[head] = sf[PF_SUM_Y] / st[PB_COUNT]
                ring_x[head] = sf[PF_SUM_X] / st[PB_COUNT]
                ring_first[head] = st[PB_BIN_FIRST]
                st[PB_HEAD] = (head + 1) % patience
                st[PB_CLOSED] += 1
                oldest = ring_first[st[PB_HEAD]]
                elapsed = float(st[PB_BIN_LAST] - st[PB_FIRST])
                if st[PB_CLOSED] >= patience and float(st[PB_BIN_LAST] - oldest) <= recent * elapsed:
                    is_plateau, slope, low, high, bound, span = _plateau_ring(
                        ring_y, ring_x, st[PB_HEAD], patience, q, min_delta, relative)
                    inside = st[PB_IN] != 0
                    if (low > bound or high < -bound) if inside else is_plateau:
                        st[PB_IN] = 0 if inside else 1
                        out[0, k] = i
                        out[1, k] = 0.0 if inside else 1.0
                        out[2, k], out[3, k], out[4, k], out[5, k] = slope, low, high, bound
                        out[6, k] = st[PB_BIN_LAST] if inside else oldest
                        out[7, k] = span
                        k += 1
            st[PB_COUNT] = 0
            sf[PF_SUM_Y] = 0.0
            sf[PF_SUM_X] = 0.0
            while s >= st[PB_END]:
                st[PB_START] = st[PB_END]
                st[PB_END] = st[PB_START] + plateau_bin_width(st[PB_START], st[PB_FIRST], rho)
        if st[PB_COUNT] == 0:
            st[PB_BIN_FIRST] = s
        st[PB_COUNT] += 1
        st[PB_BIN_LAST] = s
        sf[PF_SUM_Y] += y[i]
        sf[PF_SUM_X] += float(s - st[PB_FIRST])
    return out[:, :k]


@_jit
def _plateau_ring(ring_y, ring_x, head, n, q, min_delta, relative):  # pragma: no cover - compiled
    """The slope-equivalence test of the ``n`` bins of a full ring, oldest at ``head``:
    (is_plateau, slope per step, change low, high, bound, span in steps). O(n)."""
    mean_x = 0.0
    mean_y = 0.0
    for j in range(n):
        mean_x += ring_x[(head + j) % n]
        mean_y += ring_y[(head + j) % n]
    mean_x /= n
    mean_y /= n
    sxx = 0.0
    sxy = 0.0
    syy = 0.0
    for j in range(n):
        dx = ring_x[(head + j) % n] - mean_x
        dy = ring_y[(head + j) % n] - mean_y
        sxx += dx * dx
        sxy += dx * dy
        syy += dy * dy
    span = ring_x[(head + n - 1) % n] - ring_x[head]
    bound = min_delta * (abs(mean_y) if relative else 1.0)
    if sxx <= 0.0:
        return False, 0.0, 0.0, 0.0, bound, span
    slope = sxy / sxx
    rss = syy - slope * sxy
    rss = rss if rss > 0.0 else 0.0
    dof = n - 2 if n - 2 > 1 else 1
    se = math.sqrt(rss / dof / sxx)
    low, high = (slope - q * se) * span, (slope + q * se) * span
    return (-bound <= low and high <= bound), slope, low, high, bound, span


# --- the Mann–Kendall test -------------------------------------------------------------


@_jit
def mann_kendall_sums(y):  # pragma: no cover - compiled
    """:func:`detector.core.trend.mann_kendall`'s sums for finite ``y`` (n ≥ 3): S (pairs
    up minus pairs down), the tie term Σ t (t − 1)(2t + 5) over runs of equal values
    (numpy's pairwise sum, in sorted order; 0 without ties) and the median pairwise slope
    (one partition, as trend._median). Returns ok = False, and nothing else computed,
    when a value is not finite (the caller takes the numpy path). O(n²)."""
    n = len(y)
    for i in range(n):
        if not np.isfinite(y[i]):
            return False, 0.0, 0.0, 0.0
    count = n * (n - 1) // 2
    slopes = np.empty(count)
    up = down = 0
    p = 0
    for i in range(n):  # np.triu_indices' order (the order does not change a median)
        for j in range(i + 1, n):
            d = y[j] - y[i]
            if d > 0:
                up += 1
            elif d < 0:
                down += 1
            slopes[p] = d / float(j - i)
            p += 1
    ordered = np.sort(y)
    runs = np.empty(n)
    r = 0
    length = 1
    tied = False
    for i in range(1, n):
        if ordered[i] == ordered[i - 1]:
            length += 1
            tied = True
        else:
            runs[r] = length
            r += 1
            length = 1
    runs[r] = length
    r += 1
    tie_term = 0.0
    if tied:
        for i in range(r):
            t = runs[i]
            runs[i] = t * (t - 1.0) * (2.0 * t + 5.0)
        tie_term = np_sum(runs[:r])
    half = count // 2
    part = np.partition(slopes, half)
    if count % 2:
        slope = part[half]
    else:
        below = part[0]
        for i in range(1, half):
            if part[i] > below:
                below = part[i]
        slope = (below + part[half]) / 2.0
    return True, float(up - down), tie_term, slope


# --- numpy's own log, exp and log10 from compiled code -------------------------------------
#
# The trigger's scales and the working scale of losses take numpy's log, exp and
# log10, which may differ from libm's (and so from numba's math.log) in the last
# bit (see the module's docstring). To run a whole block in one kernel, the
# kernels below call numpy's own inner loop for float64 (the function ``np.log``
# itself runs on a contiguous array) through its address, read from the ufunc
# object (:func:`numpy_loops`), an argument of each call: no address is compiled
# in, so the cache stays valid across processes.

UF_LOG, UF_EXP, UF_LOG10 = 0, 2, 4  # entries of numpy_loops(): (loop, its data) each


@intrinsic
def _call_loop(typingctx, fn, args, dims, steps, data):  # pragma: no cover - compiled
    """Call the ufunc inner loop at address ``fn``: ``fn(args, dims, steps, data)``, every
    argument an address (numpy's ``PyUFuncGenericFunction``)."""
    from llvmlite import ir

    sig = numba.types.void(numba.types.intp, numba.types.intp, numba.types.intp, numba.types.intp,
                           numba.types.intp)

    def codegen(context, builder, signature, llargs):  # noqa: ANN001, ANN202 - numba's API
        pointer = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [pointer] * 4)
        target = builder.inttoptr(llargs[0], fnty.as_pointer())
        builder.call(target, [builder.inttoptr(x, pointer) for x in llargs[1:]])
        return context.get_dummy_value()

    return sig, codegen


@_jit
def numpy_ufunc(uf, which, src, dst, count):  # pragma: no cover - compiled
    """``dst[:count] = np.<ufunc>(src[:count])`` by numpy's own float64 loop (``uf``:
    :func:`numpy_loops`, ``which``: ``UF_*``); ``src`` and ``dst`` contiguous. O(count)."""
    if count <= 0:
        return
    buf = np.empty(5, dtype=np.intp)  # args (2 pointers), dimensions (1), strides (2)
    buf[0] = src.ctypes.data
    buf[1] = dst.ctypes.data
    buf[2] = count
    buf[3] = 8
    buf[4] = 8
    base = buf.ctypes.data
    _call_loop(uf[which], base, base + 16, base + 24, uf[which + 1])


_NUMPY_LOOPS: list = []  # [array or None], filled on the first call of numpy_loops


def numpy_loops() -> np.ndarray | None:
    """The addresses of numpy's float64 inner loops of log, exp and log10 and of their
    data (entries ``UF_*``, then +1), or None where they cannot be read or do not give
    exactly what the ufuncs give on a sample (the callers then take numpy's path).

    Read from the ufunc objects' public C struct (``PyUFuncObject``: ``functions``
    and ``data`` after the object header and four ints; ``ntypes`` and ``name``
    after them, checked), at the first ``d->d`` loop, the one numpy's loop
    selector takes. Once per process, about a millisecond."""
    if _NUMPY_LOOPS:
        return _NUMPY_LOOPS[0]
    loops = None
    try:
        loops = _read_numpy_loops()
        if not _numpy_loops_agree(loops):
            loops = None
    except Exception:  # noqa: BLE001 - an unexpected layout: numpy's path, not a failure
        loops = None
    _NUMPY_LOOPS.append(loops)
    return loops


def _read_numpy_loops() -> np.ndarray | None:
    import ctypes
    import sys

    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    out = []
    for ufunc in (np.log, np.exp, np.log10):
        types = ufunc.types
        if "d->d" not in types:
            return None
        index = types.index("d->d")
        head = object.__basicsize__  # PyObject_HEAD
        addr = id(ufunc)
        nin = ctypes.c_int.from_address(addr + head).value
        nout = ctypes.c_int.from_address(addr + head + 4).value
        functions = ctypes.c_void_p.from_address(addr + head + 16).value
        data = ctypes.c_void_p.from_address(addr + head + 24).value
        ntypes = ctypes.c_int.from_address(addr + head + 32).value
        # The counts first: only a struct laid out as expected has a string pointer
        # at ``name`` (dereferencing another layout's field could crash).
        if (nin, nout, ntypes) != (1, 1, ufunc.ntypes) or not functions:
            return None
        if ctypes.c_char_p.from_address(addr + head + 40).value != ufunc.__name__.encode():
            return None
        fn = ctypes.c_void_p.from_address(functions + 8 * index).value
        arg = ctypes.c_void_p.from_address(data + 8 * index).value if data else None
        out += [fn or 0, arg or 0]
    if not all(out[::2]):
        return None
    return np.array(out, dtype=np.intp)


def _numpy_loops_agree(loops: np.ndarray | None) -> bool:
    """Whether the loops give numpy's ufuncs' floats on a sample (every value class the
    callers feed: tiny to huge, signs, zero, inf, NaN; 2¹⁶ values of each function)."""
    if loops is None:
        return False
    rng = np.random.default_rng(20261203)
    positive = np.r_[np.exp(rng.uniform(-700.0, 700.0, 1 << 16)), 1.0 + 10.0 ** rng.uniform(-16, 30, 4096),
                     1e-300, 1.0, 0.0, np.inf, np.nan, -1.0]
    args = np.r_[rng.uniform(-745.0, 710.0, 1 << 16), rng.normal(0.0, 5.0, 4096), 0.0, -0.0, np.inf,
                 -np.inf, np.nan]
    with np.errstate(all="ignore"):
        for which, ufunc, x in ((UF_LOG, np.log, positive), (UF_EXP, np.exp, args),
                                (UF_LOG10, np.log10, positive)):
            got = np.empty_like(x)
            numpy_ufunc(loops, which, x, got, len(x))
            expected = ufunc(x)
            if not np.array_equal(got.view(np.int64), expected.view(np.int64)):
                return False
    return True


_LIBM_LOG: list[int] = []  # [address or 0], filled on the first call of libm_log


def libm_log() -> int:
    """The address of the C library's ``log``, the one ``math.log`` calls, or 0 where it
    cannot be found or does not give ``math.log``'s floats on a sample (every value
    class the warm-up takes logs of: tiny to huge, 1, inf, NaN); callers then keep
    the trigger's warm-up in Python. Once per process, about a millisecond."""
    if _LIBM_LOG:
        return _LIBM_LOG[0]
    address = 0
    try:
        address = _find_libm_log()
        if address and not _libm_log_agrees(address):
            address = 0
    except Exception:  # noqa: BLE001 - no C library log here: the Python warm-up, not a failure
        address = 0
    _LIBM_LOG.append(address)
    return address


def _find_libm_log() -> int:
    import ctypes
    import sys

    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return 0
    for name in (None, "libm.so.6"):  # the process's own symbols first: what the math module binds
        try:
            fn = ctypes.CDLL(name).log
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value or 0
    return 0


@_jit
def _math_log_many(fn, x):  # pragma: no cover - compiled
    out = np.empty(len(x))
    for i in range(len(x)):
        out[i] = math_log(fn, x[i])
    return out


def _libm_log_agrees(address: int) -> bool:
    rng = np.random.default_rng(20261204)
    x = np.r_[np.exp(rng.uniform(-690.0, 709.0, 4096)), 1.0 + 10.0 ** rng.uniform(-16, 0, 1024),
              TINY, 5e-324, 1.0, np.inf, np.nan, np.finfo(float).max]
    expected = np.array([math.log(v) for v in x.tolist()])
    return bool(np.array_equal(_math_log_many(address, x).view(np.int64), expected.view(np.int64)))


# --- a series detector's block in one call ----------------------------------------------
#
# What SeriesDetector.update_many does on a block where nothing happens, in one
# compiled call: the non-finite values counted and dropped, the minimum and
# maximum, the working scale, the trigger's scan up to its first alarm, the
# append into the held window. Python runs only when something happens (an
# alarm: the localiser), from where this call stopped; the plateau test's step
# bins are a call of their own (plateau_bins).
# The operations are those of the numpy path, in its order (the same kernels for
# the trigger, numpy's own loops for log, exp and log10).

# Entries of the integer constants of scan_append and series_block (SeriesDetector._fast_consts).
# CI_WARMUP: the trigger's warm-up points; CI_LIBM_LOG: libm's log (:func:`libm_log`), 0 for none.
(CI_BANK_AFTER, CI_KQ, CI_HQ, CI_WINDOW, CI_LOG_ROLE, CI_WARMUP, CI_LIBM_LOG) = range(7)
# Entries of the float constants: the line's discount, then Holt's filter (b0, b1, b2,
# a1, a2), then the trigger's C_* constants.
CF_LAM, CF_HOLT = 0, 1
CF_C = CF_HOLT + 5
_FIRST_CHUNK = 64  # as CusumTrigger.scan: chunks of 64 points, then 4 times more each time


@_jit
def trigger_scan(y, lo, hi, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf):  # pragma: no cover
    """:meth:`CusumTrigger.scan` of ``y[lo:hi]`` for a trigger past its warm-up (the
    state ``n``, ``f``, ``sums``, ``gate`` updated in place, ``table`` its line table
    as rows v0, v1, sf): the same chunks and kernels as ``_scan_block``, with numpy's
    own log and exp (:func:`numpy_ufunc`). Returns (index of the first alarm, relative
    to ``lo``, or −1; ``n`` after the points consumed). O(points consumed + 64)."""
    holt = cf[CF_HOLT : CF_HOLT + 5]
    c = cf[CF_C : CF_C + 8]
    i = lo
    size = _FIRST_CHUNK
    while i < hi:
        end = i + size if i + size < hi else hi
        m = end - i
        lin = trigger_linear_state(y[i:end], n, holt, cf[CF_LAM], f, table[0], table[1], table[2])
        logs = np.empty((3, m))
        numpy_ufunc(uf, UF_LOG, lin, logs, 3 * m)  # rows LIN_ABS_E, LIN_ABS_EL, LIN_FLOOR
        sc = trigger_scales_state(logs, c, f)
        scales = np.empty((2, m))
        numpy_ufunc(uf, UF_EXP, sc, scales, 2 * m)  # rows SC_ARG_FAST, SC_ARG_BANK
        alarm, _ = trigger_cusums_state(lin, sc, scales, n, gate, c, ci[CI_BANK_AFTER], f, sums, ci[CI_KQ],
                                        bank_kq, ci[CI_HQ], bank_hq, True)
        if alarm >= 0:
            return i + alarm - lo, n + alarm + 1
        n += m
        i = end
        size *= 4
    return -1, n


@_jit
def trigger_absorb(y, lo, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf):  # pragma: no cover
    """:meth:`CusumTrigger.absorb` of ``y[lo:]`` for a trigger past its warm-up: one
    ``_scan_block`` without stopping (the same kernels, numpy's own log and exp).
    Returns (per value of ``y``, whether any CUSUM was above its threshold after it,
    False before ``lo``; ``n`` after). O(len(y))."""
    m = len(y) - lo
    flags = np.zeros(len(y), dtype=np.bool_)
    if m <= 0:
        return flags, n
    holt = cf[CF_HOLT : CF_HOLT + 5]
    c = cf[CF_C : CF_C + 8]
    lin = trigger_linear_state(y[lo:], n, holt, cf[CF_LAM], f, table[0], table[1], table[2])
    logs = np.empty((3, m))
    numpy_ufunc(uf, UF_LOG, lin, logs, 3 * m)
    sc = trigger_scales_state(logs, c, f)
    scales = np.empty((2, m))
    numpy_ufunc(uf, UF_EXP, sc, scales, 2 * m)
    _, hits = trigger_cusums_state(lin, sc, scales, n, gate, c, ci[CI_BANK_AFTER], f, sums, ci[CI_KQ],
                                   bank_kq, ci[CI_HQ], bank_hq, False)
    flags[lo:] = hits
    return flags, n + m


@intrinsic
def _call_double(typingctx, fn, x):  # pragma: no cover - compiled
    """Call the C function ``double f(double)`` at address ``fn``."""
    from llvmlite import ir

    sig = numba.types.float64(numba.types.intp, numba.types.float64)

    def codegen(context, builder, signature, llargs):  # noqa: ANN001, ANN202 - numba's API
        fnty = ir.FunctionType(ir.DoubleType(), [ir.DoubleType()])
        return builder.call(builder.inttoptr(llargs[0], fnty.as_pointer()), [llargs[1]])

    return sig, codegen


@_jit
def math_log(fn, x):  # pragma: no cover - compiled
    """``math.log(x)`` for x > 0, inf or NaN (what the warm-up takes logs of): CPython's
    ``m_log`` calls libm's ``log`` (address ``fn``, :func:`libm_log`) on a finite
    positive value and returns inf and NaN as they are. O(1)."""
    if x != x or x == np.inf:
        return x
    return _call_double(fn, x)


@_jit
def _trigger_warm(y, lo, hi, n, f, holt, lam, table, c, warmup, log_fn):  # pragma: no cover - compiled
    """:meth:`CusumTrigger._warm` of ``y[lo:hi]`` (the first point of a segment alone):
    the line's sums and the forecast's filter as in a block, the initial scales as running
    means of log |error| (libm's log, as ``math.log``), the flat start as ``_flat_start``
    (the same operations in the same order). Returns ``n`` after. O(hi − lo)."""
    lin = trigger_linear_state(y[lo:hi], n, holt, lam, f, table[0], table[1], table[2])
    last = hi - lo - 1
    f[ST_S0], f[ST_S1] = lin[LIN_S0, last], lin[LIN_S1, last]
    f[ST_Z0], f[ST_Z1] = lin[LIN_Z0, last], lin[LIN_Z1, last]
    if n == 0:
        x = y[lo]
        b1, b2, a1, a2 = holt[1], holt[2], holt[3], holt[4]
        z0 = 0.0 + ((0.0 + b1 * x) + b2 * x)
        z1 = 0.0 + (0.0 + b2 * x)
        z0 -= 0.0 + ((0.0 + a1 * 0.0) + a2 * 0.0)
        z1 -= 0.0 + (0.0 + a2 * 0.0)
        f[ST_ZI0], f[ST_ZI1] = z0, z1
        return 1
    f[ST_ZI0], f[ST_ZI1] = lin[LIN_ZI0, last], lin[LIN_ZI1, last]
    log_scale, bank_log_scale = f[ST_LOG_S], f[ST_BANK_S]
    for i in range(hi - lo):
        n += 1
        ae = abs(lin[LIN_E, i])
        ael = abs(lin[LIN_EL, i])
        # max(abs(e), TINY) as Python's max takes it (the first unless the second is greater).
        log_scale += (math_log(log_fn, TINY if ae < TINY else ae) - log_scale) / (n - 1)
        bank_log_scale += (math_log(log_fn, TINY if ael < TINY else ael) - bank_log_scale) / (n - 1)
    f[ST_LOG_S], f[ST_BANK_S] = log_scale, bank_log_scale
    if n == warmup:
        f[ST_ZS] = (1.0 - c[C_SCALE_RATE]) * log_scale
        f[ST_BZ] = (1.0 - c[C_BANK_RATE]) * bank_log_scale
    return n


@_jit
def trigger_warm_up(y, lo, n, f, table, ci, cf):  # pragma: no cover - compiled
    """:meth:`CusumTrigger._warm_up` of ``y[lo:]``: the points taken while fewer than the
    warm-up's are in, the first of a segment alone. ``ci[CI_LIBM_LOG]`` must be set
    (:func:`libm_log`). Returns (points taken, ``n`` after). O(warm-up)."""
    count = min(len(y) - lo, ci[CI_WARMUP] - n)
    if count <= 0:
        return 0, n
    holt = cf[CF_HOLT : CF_HOLT + 5]
    c = cf[CF_C : CF_C + 8]
    start = lo
    if n == 0:
        n = _trigger_warm(y, lo, lo + 1, n, f, holt, cf[CF_LAM], table, c, ci[CI_WARMUP], ci[CI_LIBM_LOG])
        start = lo + 1
    if start < lo + count:
        n = _trigger_warm(y, start, lo + count, n, f, holt, cf[CF_LAM], table, c, ci[CI_WARMUP],
                          ci[CI_LIBM_LOG])
    return count, n


@_jit
def held_append(held_steps, held_values, size, total, steps, y, lo, hi, window):  # pragma: no cover
    """:meth:`SeriesDetector._append` of ``steps[lo:hi]``, ``y[lo:hi]`` to a held window
    of ``size`` points out of ``total`` finite ones: a half-window shift when full.
    Returns the new (size, total). O(hi − lo) amortised."""
    k = hi - lo
    if k <= 0:
        return size, total
    total += k
    half = window // 2
    new = total if total <= window else half + (total - window - 1) % half + 1
    keep = new - k  # old points still held
    if keep <= 0:
        for j in range(new):
            held_steps[j] = steps[hi - new + j]
            held_values[j] = y[hi - new + j]
    else:
        if size > keep:
            shift = size - keep
            for j in range(keep):
                held_steps[j] = held_steps[shift + j]
                held_values[j] = held_values[shift + j]
        for j in range(k):
            held_steps[keep + j] = steps[lo + j]
            held_values[keep + j] = y[lo + j]
    return new, total


@_jit
def scan_append(steps, y, lo, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf, held_steps,
                held_values, size, total):  # pragma: no cover - compiled
    """The trigger's scan of ``y[lo:]`` (:func:`trigger_scan`) and the append of the
    points it consumed (:func:`held_append`). Returns (alarm index relative to ``lo``
    or −1, the trigger's ``n``, the held size, the finite count). O(points consumed)."""
    hi = len(y)
    alarm, n = trigger_scan(y, lo, hi, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf)
    end = hi if alarm < 0 else lo + alarm + 1
    size, total = held_append(held_steps, held_values, size, total, steps, y, lo, end, ci[CI_WINDOW])
    return alarm, n, size, total


@_jit
def series_block(steps, values, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf, held_steps,
                 held_values, size, total, scan):  # pragma: no cover - compiled
    """:meth:`SeriesDetector.update_many`'s work on a block up to where Python is needed.

    Returns (non-finite count, finite count, their min and max, the alarm's index
    in the finite points or −1, the trigger's ``n``, the held size, the finite
    count after the points consumed, the block's finite steps and working-scale
    values). With ``scan`` (no alarm pending, the trigger past its warm-up) the
    trigger, the held window and the state arrays are advanced in place up to the
    alarm (the whole block without one); without, nothing is advanced and the
    alarm's index is −2 (Python takes the block's change points from its first
    point). O(points)."""
    m = len(values)
    good = 0
    for i in range(m):
        if np.isfinite(values[i]):
            good += 1
    finite_steps = np.empty(good, dtype=np.int64)
    y = np.empty(good)
    low, high = np.inf, -np.inf
    p = 0
    for i in range(m):
        v = values[i]
        if np.isfinite(v):
            finite_steps[p] = steps[i]
            y[p] = v
            p += 1
            if v < low:
                low = v
            if v > high:
                high = v
    if good == 0:
        return m, 0, low, high, -1, n, size, total, finite_steps, y
    if ci[CI_LOG_ROLE]:
        # working_scale_many: copysign(log10(1 + |v| / eps), v), log10 numpy's own.
        arg = np.empty(good)
        for i in range(good):
            arg[i] = 1.0 + abs(y[i]) / 1e-10
        logs = np.empty(good)
        numpy_ufunc(uf, UF_LOG10, arg, logs, good)
        for i in range(good):
            y[i] = math.copysign(logs[i], y[i])
    if not scan:
        return m - good, good, low, high, -2, n, size, total, finite_steps, y
    alarm, n, size, total = scan_append(finite_steps, y, 0, n, f, sums, gate, table, ci, cf, bank_kq,
                                        bank_hq, uf, held_steps, held_values, size, total)
    return m - good, good, low, high, alarm, n, size, total, finite_steps, y


# --- a series detector's alarm episodes in one call -----------------------------------
#
# SeriesDetector._change_points after the block's compiled scan: per trigger alarm,
# the looks at the held window (one every point or two while the evidence builds
# up), the trigger run ahead over the episode's points and restored when nothing is
# confirmed, the appends, and the scan to the next alarm. On real runs an alarm
# comes every few dozen points and most episodes end after one look, so the Python
# loop's dozen kernel calls and attribute reads an alarm cost more than the looks
# themselves. Python runs only when a look confirms a break (its events, and the
# trigger restarted on the new segment) or an alarm's statistic does not fit a float
# division (sums of 2**53 or more).

# Entries of the episode constants (SeriesDetector._episode_consts): integers, then floats.
(EI_MIN_SIZE, EI_SHIFT_MIN_SIZE, EI_CURV_ON, EI_LAG, EI_RECHECK, EI_RECHECK_LIMIT, EI_MIN_HISTORY,
 EI_AHEAD) = range(8)
EF_PENALTY, EF_NOISE_PENALTY, EF_SHIFT, EF_CURV, EF_RECHECK_EVIDENCE, EF_THRESHOLD, EF_WEAK_BELOW = range(7)
# Why series_episodes returned: the block is done, a look confirmed breaks (Python makes
# their events and restarts the trigger), or an alarm's statistic is Python's to compute.
EP_DONE, EP_FOUND, EP_ALARM = 0, 1, 2


@_jit
def _trigger_alarmed(sums, hq, bank_hq):  # pragma: no cover - compiled
    """:attr:`CusumTrigger.alarmed`: any sum above its threshold (integer comparisons,
    exact at any size). O(k)."""
    nk = len(bank_hq)
    if sums[0] > hq or sums[1] > hq:
        return True
    for j in range(nk):  # noqa: SIM110 - a loop: any() of a generator does not compile
        if sums[2 + j] > bank_hq[j] or sums[2 + nk + j] > bank_hq[j]:
            return True
    return False


@_jit
def _episode_absorb(y, lo, hi, flags, at, n, f, sums, gate, table, ci, cf, bank_kq,
                    bank_hq, uf):  # pragma: no cover - compiled
    """``SeriesDetector._absorb(y[lo:hi])`` (the warm-up first, where the trigger is in
    it), its flags written to ``flags[at:]`` when ``at`` ≥ 0. Returns ``n`` after. O(hi − lo)."""
    part = y[lo:hi]
    taken = 0
    if n < ci[CI_WARMUP]:
        taken, n = trigger_warm_up(part, 0, n, f, table, ci, cf)
    if taken == len(part):
        if at >= 0:
            for j in range(len(part)):
                flags[at + j] = False
        return n
    hits, n = trigger_absorb(part, taken, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf)
    if at >= 0:
        for j in range(len(part)):
            flags[at + j] = hits[j]
    return n


@_jit
def series_episodes(steps, y, i, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf, held_steps,
                    held_values, size, total, pending, rechecks, last_evidence, statistic, has_noise,
                    noise, segment_start, ei, ef, fn):  # pragma: no cover - compiled
    """``SeriesDetector._change_points`` on ``y[i:]`` (``steps`` their steps; the trigger's
    state ``n``, ``f``, ``sums``, ``gate`` and the held window written in place) up to
    where Python is needed: the same looks (:func:`localiser_look_confirm`, ``log n``
    libm's as ``math.log``), run-ahead absorbs, restores, appends and scans
    (:func:`scan_append`, the warm-up first where the trigger is in it) in the same
    order, so the same floats and state. ``pending`` −1 is no alarm pending;
    ``has_noise`` False is no point noise yet for this alarm. The trigger's warm-up
    must be compiled (``ci[CI_LIBM_LOG]`` set) and ``fn`` :func:`blas_ddot`'s.

    Returns (``EP_*``, ``i`` (where Python continues), ``n``, size, finite count,
    ``pending``, ``rechecks``, ``last_evidence``, ``statistic``, ``has_noise``,
    ``noise``, the looks done, and, for ``EP_FOUND``, the confirmed breaks as rows
    index, gain, penalty with the scale after them (one float array: a look's
    result boxed once), else an empty array). ``EP_FOUND``: the look after point
    ``i − 1`` confirmed them, the episode's run-ahead is dropped (Python restarts the
    trigger). ``EP_ALARM``: the trigger alarmed at point ``i − 1`` and Python reads
    its statistic. O(points + window per look)."""
    m = len(y)
    window = ci[CI_WINDOW]
    min_size, shift_min_size = ei[EI_MIN_SIZE], ei[EI_SHIFT_MIN_SIZE]
    ahead_len = ei[EI_AHEAD]
    hq = ci[CI_HQ]
    ahead_i = -1  # where the episode's run-ahead started (its snapshot's point), −1 for none
    snap_n = n
    snap_f = np.empty_like(f)
    snap_sums = np.empty_like(sums)
    snap_gate = np.empty_like(gate)
    flags = np.zeros(m, dtype=np.bool_)  # alarmed after each point absorbed ahead, from ahead_i
    nflags = 0
    looks = 0
    while True:
        if pending == 0:
            if ahead_i >= 0 and i - ahead_i > nflags:
                # The episode outlasted the points absorbed ahead: absorb the next ones.
                done = ahead_i + nflags
                hi = done + ahead_len if done + ahead_len > i else i
                hi = hi if hi < m else m
                n = _episode_absorb(y, done, hi, flags, nflags, n, f, sums, gate, table, ci, cf, bank_kq,
                                    bank_hq, uf)
                nflags += hi - done
            # SeriesDetector._localise (not final).
            evidence = 0.0
            k = 0
            found = np.empty(0)
            if size >= ei[EI_MIN_HISTORY]:
                oldest = total - size
                start = segment_start - oldest if segment_start - oldest > 0 else 0
                count = size - start
                log_n = math_log(ci[CI_LIBM_LOG], float(count)) if count >= 2 * min_size + 1 else 0.0
                measured, noise, scale, evidence, indices, gains, penalties = localiser_look_confirm(
                    held_values[:size], start, not has_noise, noise if has_noise else 0.0, min_size,
                    shift_min_size, ef[EF_PENALTY], ef[EF_NOISE_PENALTY], ef[EF_SHIFT], log_n,
                    ei[EI_CURV_ON] != 0, ef[EF_CURV], False, ef[EF_WEAK_BELOW], fn)
                has_noise = has_noise or measured
                looks += 1
                k = len(indices)
                if k:
                    found = np.empty(3 * k + 1)
                    for j in range(k):
                        found[j] = indices[j]
                        found[k + j] = gains[j]
                        found[2 * k + j] = penalties[j]
                    found[3 * k] = scale
            weak = evidence < ef[EF_RECHECK_EVIDENCE] or evidence < last_evidence
            last_evidence = evidence
            if k:
                return (EP_FOUND, i, n, size, total, -1, 0, last_evidence, statistic, has_noise, noise,
                        looks, found)
            still = False
            if rechecks <= 0 and not weak and ei[EI_RECHECK] - rechecks < ei[EI_RECHECK_LIMIT]:
                still = _trigger_alarmed(sums, hq, bank_hq) if ahead_i < 0 else flags[i - 1 - ahead_i]
            if weak or (rechecks <= 0 and not still):
                if ahead_i >= 0:
                    n = snap_n
                    f[:] = snap_f
                    sums[:] = snap_sums
                    gate[:] = snap_gate
                    n = _episode_absorb(y, ahead_i, i, flags, -1, n, f, sums, gate, table, ci, cf, bank_kq,
                                        bank_hq, uf)
                    ahead_i = -1
                sums[:] = 0
                pending = -1
                rechecks = 0
            else:
                # Every point for the first ``recheck``, then every other point.
                pending = 1 if rechecks > 0 else 2
                rechecks -= 1
        if i >= m:
            return (EP_DONE, i, n, size, total, pending, rechecks, last_evidence, statistic, has_noise, noise,
                    looks, np.empty(0))
        if pending >= 0:
            if ahead_i < 0:
                snap_n = n
                snap_f[:] = f
                snap_sums[:] = sums
                snap_gate[:] = gate
                ahead_i = i
                # Only as far as an episode usually lasts (see _change_points).
                hi = i + ahead_len if i + ahead_len < m else m
                n = _episode_absorb(y, i, hi, flags, 0, n, f, sums, gate, table, ci, cf, bank_kq, bank_hq, uf)
                nflags = hi - i
            j = i + pending if i + pending < m else m
            size, total = held_append(held_steps, held_values, size, total, steps, y, i, j, window)
            pending -= j - i
        else:
            # SeriesDetector._scan_append: the warm-up's points first, then the scan.
            warm = 0
            if n < ci[CI_WARMUP]:
                warm, n = trigger_warm_up(y, i, n, f, table, ci, cf)
                size, total = held_append(held_steps, held_values, size, total, steps, y, i, i + warm, window)
            hit = -1
            if i + warm < m:
                alarm, n, size, total = scan_append(steps, y, i + warm, n, f, sums, gate, table, ci, cf,
                                                    bank_kq, bank_hq, uf, held_steps, held_values, size,
                                                    total)
                if alarm >= 0:
                    hit = warm + alarm
            j = m if hit < 0 else i + hit + 1
            if hit >= 0:
                # SeriesDetector._alarmed, its statistic as CusumTrigger.statistic reads it.
                ok, ratio, _ = trigger_readout(sums, hq, bank_hq)
                if not ok:
                    return (EP_ALARM, j, n, size, total, pending, rechecks, last_evidence, statistic,
                            has_noise, noise, looks, np.empty(0))
                last_evidence = 0.0
                statistic = ratio * ef[EF_THRESHOLD]
                pending = ei[EI_LAG]
                rechecks = ei[EI_RECHECK]
                has_noise = False
        i = j
