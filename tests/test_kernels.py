"""The compiled kernels give, bit for bit, what the numpy/scipy/ruptures code they replace gives.

Each kernel is checked against its reference on seeded inputs of many lengths and
scales: exact float equality (``==`` on every value), not closeness, because the
detector's results (a CUSUM on a fixed-point grid, argmaxes over near-equal gains)
must not move when the implementation does.
"""

from __future__ import annotations

import numpy as np
import pytest
import ruptures as rpt
from scipy.signal import lfilter

from detector.core import _kernels as k
from detector.core.changepoint import CostPiecewiseLinear, CusumTrigger, WindowLocaliser, _last_argmax


def _arrays(seed: int, count: int, longest: int = 1500):
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(1, longest))
        kind = i % 4
        if kind == 0:
            y = rng.normal(rng.normal() * 10, 10 ** rng.uniform(-3, 3), n)
        elif kind == 1:
            y = np.cumsum(rng.normal(size=n)) * 10 ** rng.uniform(-6, 6)
        elif kind == 2:
            y = np.round(rng.normal(size=n), 1)  # ties for the medians and argmaxes
        else:
            y = 3.0 * (10.0 + np.arange(n)) ** -0.3 * np.exp(rng.normal(0, 0.01, n))
        yield y


def test_sum_std_and_median_equal_numpys() -> None:
    for y in _arrays(0, 600):
        assert k.np_sum(y) == np.sum(y)
        assert k.np_std(y) == np.std(y)
        assert k.np_median(y) == np.median(y)
    # Past 128 values numpy sums the halves; the explicit stack must split the same way.
    y = np.random.default_rng(1).normal(size=100_000) * 1e6
    assert k.np_sum(y) == np.sum(y) and k.np_sum(y[3:70_001]) == np.sum(y[3:70_001])


def _old_point_noise(history: np.ndarray) -> float:
    if len(history) < 3:
        return 0.0
    d = np.diff(history)
    return 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0)


def test_point_noise_and_history_scale_equal_the_numpy_formulas() -> None:
    for y in _arrays(2, 300):
        assert k.point_noise(y) == _old_point_noise(y)
        assert k.history_scale(y) == (float(np.std(y)) if len(y) > 1 else 0.0)


def test_trigger_filters_equal_scipys_lfilter() -> None:
    trigger = CusumTrigger()
    lam = trigger._lam
    rng = np.random.default_rng(3)
    for y in _arrays(4, 60, longest=600):
        zi = rng.normal(size=2)
        z0, z1, s0, s1 = rng.normal(size=4)
        n = int(rng.integers(1, 3000))
        lin = k.trigger_linear(y, n, trigger._holt, zi[0], zi[1], lam, s0, s1, z0, z1, *trigger._table)
        e, zf = lfilter(trigger._b, trigger._a, y, zi=zi)
        assert np.array_equal(lin[k.LIN_E], e) and np.array_equal(lin[k.LIN_ZI0:k.LIN_ZI1 + 1, -1], zf)
        sums0, z0f = lfilter([1.0], [1.0, -lam], y, zi=[z0])
        sums1, z1f = lfilter([0.0, -lam], [1.0, -lam], sums0, zi=[z1])
        assert np.array_equal(lin[k.LIN_S0], sums0) and np.array_equal(lin[k.LIN_S1], sums1)
        assert lin[k.LIN_Z0, -1] == z0f[0] and lin[k.LIN_Z1, -1] == z1f[0]
        logs = np.log(lin[:3])
        sc = k.trigger_scales(logs, trigger.scale_rate, trigger._sa[1], 0.25, -0.5,
                              trigger.bank_scale_rate, trigger._ba[1], 0.125, 0.75)
        log_s, zs = lfilter([trigger.scale_rate], trigger._sa, logs[0], zi=[0.25])
        bank_s, bz = lfilter([trigger.bank_scale_rate], trigger._ba, logs[1], zi=[0.125])
        assert np.array_equal(sc[k.SC_LOG_S], log_s) and sc[k.SC_ZS, -1] == zs[0]
        assert np.array_equal(sc[k.SC_BANK_S], bank_s) and sc[k.SC_BZ, -1] == bz[0]


def test_cusums_are_the_lindley_recursion_on_the_grid() -> None:
    rng = np.random.default_rng(5)
    m = 500
    lin = np.zeros((11, m))
    lin[k.LIN_E] = rng.normal(size=m) + 0.3
    lin[k.LIN_EL] = rng.normal(size=m) - 0.2
    sc = np.zeros((8, m))
    sc[k.SC_LAG_BANK] = -1.0  # the gate open
    scales = np.exp(rng.normal(0, 0.1, (2, m)))
    sums = np.array([5, 0, 1, 2, 3, 0, 0, 7], dtype=np.int64)
    start = sums.copy()
    kq, bank_kq = 1 << 15, np.array([1 << 15, 1 << 16, 3 << 15], dtype=np.int64)
    huge = np.int64(1) << 60
    alarm, flags, _, state = k.trigger_cusums(lin, sc, scales, 1000, np.full(50, -1.0), 0.0, 0.02, -0.98, 0.0,
                                             1e9, 0, sums, kq, bank_kq, huge, np.full(3, huge), True)
    assert alarm == -1 and not flags.any()
    assert state[k.ST_LAST_Z] == lin[k.LIN_E, -1] / scales[0, -1]
    zq = np.rint(np.clip(lin[[k.LIN_E, k.LIN_EL]] / scales, -1e4, 1e4) * 65536).astype(np.int64)
    steps = np.r_[[zq[0] - kq], [-zq[0] - kq], zq[1] - bank_kq[:, None], -zq[1] - bank_kq[:, None]]
    expected = start.copy()
    for t in range(m):
        expected = np.maximum(expected + steps[:, t], 0)
    assert np.array_equal(sums, expected)


class _NumpyBinseg(rpt.Binseg):
    """The localiser's search before the kernels: ruptures' Binseg with the split search in numpy."""

    def fit(self, signal: np.ndarray) -> _NumpyBinseg:
        self.signal = signal.reshape(-1, 1)
        self.n_samples = len(signal)
        self.cost.fit(signal)
        return self

    def single_bkp(self, start: int, end: int) -> tuple[int | None, float]:
        candidates, gains = self.cost.split_gains(start, end, self.min_size)
        if len(candidates) == 0:
            return None, 0
        best = _last_argmax(gains)
        return int(candidates[best]), float(gains[best])


def _numpy_fit_sums(y: np.ndarray) -> np.ndarray:
    n = len(y)
    y = y - (y.mean() if n else 0.0)
    t = np.arange(n, dtype=float)
    kk = np.arange(n + 1, dtype=float)
    s = np.empty((6, n + 1))
    s[0], s[1], s[2] = kk, kk * (kk - 1.0) / 2.0, (kk - 1.0) * kk * (2.0 * kk - 1.0) / 6.0
    s[3:, 0] = 0.0
    np.cumsum(y, out=s[3, 1:])
    np.cumsum(t * y, out=s[4, 1:])
    np.cumsum(y * y, out=s[5, 1:])
    return s


def test_cost_sums_and_best_split_past_the_tables_equal_the_numpy_code() -> None:
    # Windows up to k._TABLE_LEN - 1 points read their closed forms from tables; a longer
    # one (a whole TCPD series, locate() on any array) computes them: both the same floats.
    rng = np.random.default_rng(11)
    for n in (k._TABLE_LEN - 2, k._TABLE_LEN - 1, k._TABLE_LEN, k._TABLE_LEN + 37):
        y = np.cumsum(rng.normal(size=n))
        cost = CostPiecewiseLinear().fit(y)
        assert np.array_equal(cost._s, _numpy_fit_sums(y))
        for start, end in ((0, n), (n - k._TABLE_LEN + 1, n), (5, n - 3)):
            candidates, gains = cost.split_gains(start, end, 4)
            at = _last_argmax(gains)
            assert k.best_split(cost._s, start, end, 4) == (int(candidates[at]), float(gains[at]))


def test_cost_search_and_binseg_equal_the_numpy_and_ruptures_code() -> None:
    rng = np.random.default_rng(6)
    found = 0
    for y in _arrays(7, 200, longest=1100):
        n = len(y)
        if n < 9:
            continue
        y = y + np.where(np.arange(n) >= n // 2, rng.normal() * np.std(y) * 3, 0.0)
        cost = CostPiecewiseLinear().fit(y)
        assert np.array_equal(cost._s, _numpy_fit_sums(y))
        for start, end in ((0, n), (n // 3, n), (0, 2 * n // 3)):
            assert cost.error(start, end) == float(cost._sse(cost._s[:, end] - cost._s[:, start]))
            candidates, gains = cost.split_gains(start, end, 4)
            expected = (int(candidates[_last_argmax(gains)]), float(gains[_last_argmax(gains)])) \
                if len(gains) else (-1, 0.0)
            assert k.best_split(cost._s, start, end, 4) == expected
            candidates, gains = cost.shift_gains(start, end, 4, 2)
            expected = (int(candidates[_last_argmax(gains)]), float(gains[_last_argmax(gains)])) \
                if len(gains) else (-1, 0.0)
            assert k.best_shift(cost._s, start, end, 4, 2) == expected
        pen = float(np.var(y)) * np.log(n) * rng.uniform(0.5, 20)
        reference = _NumpyBinseg(custom_cost=CostPiecewiseLinear(), min_size=4, jump=1).fit(y)
        bkps = reference.predict(pen=pen)[:-1]
        assert k.binseg(cost._s, n, 4, pen).tolist() == bkps
        found += len(bkps) > 1
    assert found > 10  # the comparison covered multi-break segmentations


def test_localiser_results_do_not_depend_on_the_window_buffer() -> None:
    """A window handed over as a slice of a bigger buffer gives what a copy gives."""
    rng = np.random.default_rng(8)
    buffer = np.r_[rng.normal(0, 1, 300), rng.normal(4, 1, 300)]
    window = buffer[100:500]
    loc = WindowLocaliser()
    assert loc.locate_with_evidence(window) == loc.locate_with_evidence(window.copy())
    assert loc.locate(window)[0].index == 200


def test_kernels_compile_without_a_cache_location() -> None:
    """Where numba has nowhere to write its cache (here: code with no source file), the
    kernels are compiled per process instead of failing at import."""
    namespace: dict = {}
    exec("def twice(x):\n    return 2 * x\n", namespace)  # noqa: S102 - a function with no file
    with pytest.raises(RuntimeError):
        import numba

        numba.njit(cache=True)(namespace["twice"])
    assert k._jit(namespace["twice"])(21) == 42


def test_flat_start_equals_lfiltic() -> None:
    from scipy.signal import lfiltic

    trigger = CusumTrigger()
    rng = np.random.default_rng(9)
    for y in [0.0, -0.0, 1.0, -3.5, 1e300, -1e-300, *rng.normal(size=200) * 10 ** rng.uniform(-9, 9, 200)]:
        expected = lfiltic(trigger._b, trigger._a, [0.0, 0.0], [y, y])
        got = trigger._flat_start(float(y))
        assert got.tolist() == expected.tolist()
        assert np.array_equal(np.signbit(got), np.signbit(expected))


def test_parabola_basis_equals_the_numpy_vectors() -> None:
    for y in _arrays(10, 300, longest=1100):
        n = len(y)
        if n <= 3:
            continue
        t = np.arange(n, dtype=float) - (n - 1) / 2.0
        t /= max(1.0, (n - 1) / 2.0)
        q = t * t
        q -= q.mean()
        yc, tk, qk = k.parabola_basis(y)
        assert np.array_equal(yc, y - y.mean()) and np.array_equal(tk, t) and np.array_equal(qk, q)


def test_window_search_is_the_first_look_of_the_localiser() -> None:
    for y in _arrays(11, 100, longest=1100):
        if len(y) < 9:
            continue
        sums, split_gain, shift_index, shift_gain, peak = k.window_search(y, 4, 2)
        assert np.array_equal(sums, _numpy_fit_sums(y)) and peak == float(np.max(np.abs(y)))
        assert split_gain == k.best_split(sums, 0, len(y), 4)[1]
        assert (shift_index, shift_gain) == k.best_shift(sums, 0, len(y), 4, 2)


def _numpy_plateau_windows(y: np.ndarray, n: int, q: float, min_delta: float, relative: bool):
    """trend._plateau_windows as it was in numpy (rows summed one after another)."""
    t = np.arange(n, dtype=float) - (n - 1) / 2.0
    stt = float(np.sum(t * t))
    m = len(y) - n + 1
    shifted = np.lib.stride_tricks.sliding_window_view(y, m).copy()

    def rows(a: np.ndarray) -> np.ndarray:
        return np.cumsum(a, axis=0)[-1] if a.shape[1] == 1 else a.sum(axis=0)

    mean = rows(shifted) / n
    sty = rows(shifted * t[:, None])
    slope = sty / stt
    d = shifted - mean
    rss = np.maximum(rows(d * d) - slope * sty, 0.0)
    se = np.sqrt(rss / max(n - 2, 1) / stt)
    low, high = (slope - q * se) * (n - 1), (slope + q * se) * (n - 1)
    bound = min_delta * (np.abs(mean) if relative else np.ones_like(mean))
    return (-bound <= low) & (high <= bound), slope, low, high, bound


def test_plateau_windows_equal_the_numpy_row_sums() -> None:
    rng = np.random.default_rng(12)
    for i, y in enumerate(_arrays(13, 300, longest=400)):
        n = int(rng.choice([3, 20, 30]))
        if i % 7 == 0:
            y = np.r_[np.full(n, -0.0), y]  # signed zeros keep their sign through the sums
        if len(y) < n:
            continue
        relative = bool(i % 2)
        got = k.plateau_windows(y, n, 2.1, 0.05, relative)
        for row, expected in zip(got, _numpy_plateau_windows(y, n, 2.1, 0.05, relative), strict=True):
            expected = expected.astype(float)
            assert np.array_equal(row, expected) and np.array_equal(np.signbit(row), np.signbit(expected))


def test_mann_kendall_sums_equal_the_numpy_ones() -> None:
    from detector.core.trend import _median, _pairs

    for y in _arrays(14, 400, longest=80):
        n = len(y)
        if n < 3:
            continue
        i, j, gaps = _pairs(n)
        diffs = y[j] - y[i]
        ordered = np.sort(y)
        tied = ordered[1:] == ordered[:-1]
        tie_term = 0.0
        if tied.any():
            ties = np.diff(np.concatenate(([-1], np.flatnonzero(~tied), [n - 1]))).astype(float)
            tie_term = float(np.sum(ties * (ties - 1) * (2 * ties + 5)))
        s = float(np.count_nonzero(diffs > 0) - np.count_nonzero(diffs < 0))
        assert k.mann_kendall_sums(y) == (True, s, tie_term, _median(diffs / gaps))
    assert not k.mann_kendall_sums(np.array([1.0, np.nan, 2.0]))[0]


def test_localiser_look_is_locate_with_evidence_on_the_held_window() -> None:
    """A series detector's compiled look gives what the Python localiser gives on its
    segment with the held window's spread and point noise, confirmed or not."""
    from detector.core.localiser import history_scale, point_noise

    rng = np.random.default_rng(12)
    localisers = [WindowLocaliser(), WindowLocaliser(shift_penalty=None),
                  WindowLocaliser(curvature_penalty=None, min_size=5)]
    looks = confirmed = 0
    for i, y in enumerate(_arrays(13, 240, longest=1100)):
        if i % 3 == 0:  # a shift at a random place, for looks that confirm
            y = y + (np.arange(len(y)) >= rng.integers(0, len(y) + 1)) * 5 * float(np.std(y) + 1e-3)
        loc = localisers[i % len(localisers)]
        for start in {0, int(rng.integers(0, len(y))), max(0, len(y) - 9), max(0, len(y) - 8)}:
            for final in (True, False):
                noise = None if final else float(rng.uniform(0, 2))
                expected_noise = point_noise(y) if noise is None else noise
                expected = loc.locate_with_evidence(y[start:], history_scale(y), expected_noise, final)
                splits, evidence, used = loc.look(y, start, noise, final)
                assert (splits, evidence, used) == (*expected, expected_noise)
                looks += 1
                confirmed += bool(splits)
    assert looks > 1000 and confirmed > 100


def test_trigger_state_kernels_are_the_kernels_on_the_unpacked_state() -> None:
    """The in-place state kernels give what the kernels give on the fields one by one,
    and leave in the state array, the sums and the gate what those return."""
    trigger = CusumTrigger()
    rng = np.random.default_rng(14)
    for m in (1, 7, 64, 300):
        f = rng.normal(size=12)
        y = rng.normal(size=m)
        n = int(rng.integers(0, 2000))
        lin = k.trigger_linear(y, n, trigger._holt, f[k.ST_ZI0], f[k.ST_ZI1], trigger._lam, f[k.ST_S0],
                               f[k.ST_S1], f[k.ST_Z0], f[k.ST_Z1], *trigger._table)
        got = k.trigger_linear_state(y, n, trigger._holt, trigger._lam, f, *trigger._table)
        assert np.array_equal(got, lin)
        logs = np.log(lin[:3])
        c = trigger._consts
        sc = k.trigger_scales(logs, trigger.scale_rate, trigger._sa[1], f[k.ST_ZS], f[k.ST_LOG_S],
                              trigger.bank_scale_rate, trigger._ba[1], f[k.ST_BZ], f[k.ST_BANK_S])
        assert np.array_equal(k.trigger_scales_state(logs, c, f), sc)
        gate = rng.normal(size=trigger.gate_lag)
        sums = rng.integers(0, 1 << 20, size=8)
        for stop in (True, False):
            g, s, state = gate.copy(), sums.copy(), f.copy()
            alarm, flags, new_gate, new_state = k.trigger_cusums(
                lin, sc, np.exp(sc[:2]), n, gate, trigger._gate, trigger.bias_rate, trigger._bias_a[1],
                f[k.ST_BIAS], trigger.bias_gate, 0, sums.copy(), trigger._kq, trigger._bank_kq_flat,
                1 << 19, trigger._bank_hq_flat, stop)
            got_alarm, got_flags = k.trigger_cusums_state(
                lin, sc, np.exp(sc[:2]), n, g, c, 0, state, s, trigger._kq, trigger._bank_kq_flat,
                1 << 19, trigger._bank_hq_flat, stop)
            assert got_alarm == alarm and np.array_equal(got_flags, flags)
            assert np.array_equal(g, new_gate) and np.array_equal(state, new_state)


def test_trigger_snapshot_is_not_changed_by_later_points() -> None:
    """The kernels write the trigger's state in place; a snapshot must not follow."""
    rng = np.random.default_rng(15)
    trigger = CusumTrigger()
    trigger.absorb(rng.normal(size=200))
    saved, before = trigger.snapshot(), trigger.state()
    later = rng.normal(3, 1, 100)
    flags = trigger.absorb(later)
    after = trigger.state()
    trigger.restore(saved)
    assert trigger.state() == before
    assert np.array_equal(trigger.absorb(later), flags) and trigger.state() == after
    trigger.restore(saved)
    assert trigger.state() == before


def test_numpy_loops_are_numpys_log_exp_and_log10() -> None:
    """The kernels call numpy's own float64 loops (read from the ufunc objects): the same
    floats as the ufuncs, bit for bit, on every length (SIMD bodies and tails) and
    every value class, including where libm's may differ in the last bit."""
    loops = k.numpy_loops()
    assert loops is not None  # CPython on 64 bits: the compiled block is taken
    rng = np.random.default_rng(16)
    with np.errstate(all="ignore"):
        for m in [*range(0, 40), 63, 64, 65, 127, 128, 129, 1000, 4099]:
            positive = np.exp(rng.uniform(-700, 700, m))
            positive[rng.random(m) < 0.05] = 1.0 + 10.0 ** rng.uniform(-17, 0)
            anything = rng.normal(0, 30, m)
            for which, ufunc, x in ((k.UF_LOG, np.log, positive), (k.UF_EXP, np.exp, anything),
                                    (k.UF_LOG10, np.log10, positive), (k.UF_LOG, np.log, anything)):
                got = np.full(m + 1, 7.0)  # one past the end: must stay
                k.numpy_ufunc(loops, which, x, got, m)
                assert np.array_equal(got[:m].view(np.int64), ufunc(x).view(np.int64)) and got[m] == 7.0


def test_compiled_trigger_scan_and_absorb_are_the_triggers() -> None:
    """trigger_scan and trigger_absorb (numpy's loops inside) leave the state and give
    the alarms and flags of CusumTrigger.scan and .absorb, past the warm-up."""
    from detector.core.series import SeriesConfig, SeriesDetector
    from detector.core.types import Direction, Role, SeriesSpec, Split

    det = SeriesDetector(SeriesSpec("v", Role.OTHER, Split.TRAIN, Direction.MINIMIZE), SeriesConfig())
    ci, cf, table, uf = det._consts
    rng = np.random.default_rng(17)
    for case in range(60):
        y = np.r_[rng.normal(0, 1, int(rng.integers(10, 600))), rng.normal(rng.uniform(-4, 4), 1, 300)]
        reference, compiled = CusumTrigger(), CusumTrigger()
        warm = int(rng.integers(8, 500))
        reference.absorb(y[:warm])
        compiled.absorb(y[:warm])
        rest = y[warm:]
        t = compiled
        if case % 2:
            expected = reference.scan(rest)
            alarm, t.n = k.trigger_scan(rest, 0, len(rest), t.n, t._f, t._sums, t.gate, table, ci, cf,
                                        t._bank_kq_flat, t._bank_hq_flat, uf)
            assert (None if alarm < 0 else alarm) == expected
        else:
            expected_flags = reference.absorb(rest)
            flags, t.n = k.trigger_absorb(rest, 0, t.n, t._f, t._sums, t.gate, table, ci, cf, t._bank_kq_flat,
                                          t._bank_hq_flat, uf)
            assert np.array_equal(flags, expected_flags)
        assert compiled.state() == reference.state()


def test_compiled_block_is_the_numpy_path() -> None:
    """A series detector's compiled block (series_block and the compiled scans, absorbs
    and appends around alarms) gives the events and the state of its numpy path, on
    every role's scale, with non-finite values, signed zeros, alarms, breaks and
    plateaus, in blocks of any size."""
    from detector.core.series import SeriesDetector
    from detector.core.types import Direction, Role, SeriesSpec, Split

    rng = np.random.default_rng(18)
    loss = 3.0 * (10.0 + np.arange(3000)) ** -0.3 * np.exp(rng.normal(0, 0.05, 3000))
    loss[1500:] *= 0.5
    loss[rng.random(3000) < 0.03] = np.nan
    shifts = np.r_[rng.normal(0, 1, 700), rng.normal(3, 1, 500), rng.normal(0, 2, 600)]
    zeros = rng.normal(size=900)
    zeros[::5], zeros[1::5], zeros[300:310] = 0.0, -0.0, np.inf
    accuracy = np.clip(np.cumsum(rng.normal(0.002, 0.01, 1500)), 0.0, 1.0)
    cases = [(Role.LOSS, loss), (Role.OTHER, shifts), (Role.OTHER, zeros), (Role.ACCURACY, accuracy),
             (Role.NORM, np.abs(shifts) + 1e-3)]

    def run(role: Role, y: np.ndarray, compiled: bool, seed: int) -> tuple[list, dict]:
        det = SeriesDetector(SeriesSpec("s", role, Split.TRAIN, Direction.MINIMIZE))
        if not compiled:
            det._consts = None  # numpy's path
        blocks = np.random.default_rng(seed).choice([1, 2, 7, 8, 32, 64, 300], size=len(y))
        events, i = [], 0
        for b in blocks:
            if i >= len(y):
                break
            events += det.update_many(np.arange(i, min(i + b, len(y))), y[i : i + b])
            i += b
        return events + det.finish(), det.state()

    def same(a: object, b: object) -> bool:
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[x], b[x]) for x in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, z) for x, z in zip(a, b, strict=True))
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and np.array_equal(a.view(np.int64) if a.dtype == float else a,
                                                          b.view(np.int64) if b.dtype == float else b)
        if isinstance(a, float):
            return np.array_equal(np.array(a).view(np.int64), np.array(b).view(np.int64))
        return a == b and type(a) is type(b)

    found = 0
    for seed, (role, y) in enumerate(cases):
        compiled, reference = run(role, y, True, seed), run(role, y, False, seed)
        assert same(compiled, reference), role
        found += len(compiled[0])
    assert found > 10


def test_compiled_episodes_are_the_python_loop() -> None:
    """A series detector's alarm episodes in one compiled call (series_episodes: the
    looks, the run-ahead absorbs and restores, the appends and scans) give the events
    and the state of the Python loop over the same kernels, with every role's scale,
    alarms, rechecks and breaks, in blocks of any size, under other episode settings
    (a lag, no rechecks) and with an alarm statistic Python computes (a bank threshold
    past 2**53 on the CUSUM's grid: series_episodes hands the alarm back)."""
    from detector.core.series import SeriesConfig, SeriesDetector
    from detector.core.types import Direction, Role, SeriesSpec, Split

    rng = np.random.default_rng(19)
    loss = 3.0 * (10.0 + np.arange(2500)) ** -0.3 * np.exp(rng.normal(0, 0.05, 2500))
    loss[1200:] *= 0.5
    loss[rng.random(2500) < 0.02] = np.nan
    shifts = np.r_[rng.normal(0, 1, 500), rng.normal(3, 1, 300), rng.normal(0, 2, 400),
                   rng.normal(-1, 1, 300)]
    drift = np.cumsum(rng.normal(0, 1, 1500)) + np.repeat(rng.normal(0, 5, 15), 100)
    cases = [(Role.LOSS, loss), (Role.OTHER, shifts), (Role.OTHER, drift), (Role.NORM, np.abs(shifts) + 1e-3)]
    configs = [SeriesConfig(), SeriesConfig(lag=3), SeriesConfig(recheck=0, recheck_limit=3),
               SeriesConfig(trigger=CusumTrigger(bank_thresholds=(8.0, 5.0, 2.0**40)))]

    def run(role: Role, y: np.ndarray, config: SeriesConfig, compiled: bool, seed: int) -> tuple[list, dict]:
        det = SeriesDetector(SeriesSpec("s", role, Split.TRAIN, Direction.MINIMIZE), config)
        assert det._episode is not None
        if not compiled:
            det._episode = None  # the Python loop
        blocks = np.random.default_rng(seed).choice([1, 3, 8, 64, 300, 5000], size=len(y))
        events, i = [], 0
        for b in blocks:
            if i >= len(y):
                break
            events += det.update_many(np.arange(i, min(i + b, len(y))), y[i : i + b])
            i += b
        return events + det.finish(), det.state()

    def same(a: object, b: object) -> bool:
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[x], b[x]) for x in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, z) for x, z in zip(a, b, strict=True))
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and np.array_equal(a.view(np.int64) if a.dtype == float else a,
                                                          b.view(np.int64) if b.dtype == float else b)
        if isinstance(a, float):
            return np.array_equal(np.array(a).view(np.int64), np.array(b).view(np.int64))
        return a == b and type(a) is type(b)

    found = 0
    for c, config in enumerate(configs):
        for seed, (role, y) in enumerate(cases):
            compiled, reference = run(role, y, config, True, seed + c), run(role, y, config, False, seed + c)
            assert same(compiled, reference), (c, role)
            found += sum(e.kind.name == "CHANGE_POINT" for e in compiled[0])
    assert found > 20


def test_trigger_readout_is_the_python_statistic_and_alarm() -> None:
    """CusumTrigger.statistic and .alarmed, compiled (trigger_readout), are the Python
    formulas on the sums: int / int, the first largest ratio, any sum above its
    threshold; Python's division beyond 2**53."""
    rng = np.random.default_rng(19)
    trigger = CusumTrigger()
    nk = len(trigger.bank_drifts)

    def python(sums: list[int]) -> tuple[float, bool]:
        pos, neg, *bank = sums
        ratios = [max(pos, neg) / trigger._hq]
        ratios += [max(p, n) / h for p, n, h in zip(bank[:nk], bank[nk:], trigger._bank_hq_list, strict=True)]
        alarmed = (pos > trigger._hq or neg > trigger._hq
                   or any(p > h or n > h for p, n, h in zip(bank[:nk], bank[nk:], trigger._bank_hq_list,
                                                             strict=True)))
        return max(ratios) * trigger.threshold, alarmed

    for case in range(3000):
        top = [1 << 20, 1 << 40, (1 << 53) + 5, (1 << 62)][case % 4]
        sums = rng.integers(0, top, size=2 + 2 * nk)
        if case % 7 == 0:
            sums[rng.integers(0, len(sums))] = trigger._hq + int(rng.integers(-1, 2))
        trigger._sums[:] = sums
        statistic, alarmed = python(sums.tolist())
        assert trigger.statistic == statistic and trigger.alarmed is alarmed


def test_libm_log_is_math_log() -> None:
    """The warm-up's compiled log calls the C library's log as math.log does: the same
    floats, bit for bit, on every value class it takes (tiny to huge, inf, NaN)."""
    import math

    address = k.libm_log()
    assert address  # CPython on Linux: the compiled warm-up is taken
    rng = np.random.default_rng(21)
    x = np.r_[np.exp(rng.uniform(-745.0, 709.7, 1 << 15)), 10.0 ** rng.uniform(-320, 308, 4096),
              1.0 + 10.0 ** rng.uniform(-17, 1, 4096), np.inf, np.nan, k.TINY]
    expected = np.array([math.log(v) for v in x.tolist()])
    assert np.array_equal(k._math_log_many(address, x).view(np.int64), expected.view(np.int64))


def test_compiled_warm_up_is_the_triggers() -> None:
    """trigger_warm_up leaves the state and takes the points of CusumTrigger._warm_up, from
    a fresh trigger and from part-way through the warm-up, with non-finite, zero, tiny
    and huge values."""
    from detector.core.series import SeriesConfig, SeriesDetector
    from detector.core.types import Direction, Role, SeriesSpec, Split

    det = SeriesDetector(SeriesSpec("v", Role.OTHER, Split.TRAIN, Direction.MINIMIZE), SeriesConfig())
    ci, cf, table, _ = det._consts
    assert ci[k.CI_LIBM_LOG] and det._compiled_warm_up
    rng = np.random.default_rng(22)
    specials = np.array([0.0, -0.0, 1e-300, 1e-310, 1e300, -1e300, np.inf, -np.inf, np.nan])
    for case in range(300):
        y = rng.normal(rng.uniform(-5, 5), 10.0 ** rng.uniform(-12, 3), int(rng.integers(1, 20)))
        if case % 3 == 0:
            y[rng.random(len(y)) < 0.3] = rng.choice(specials)
        if case % 5 == 0:
            y[:] = y[0]  # constant: zero innovations
        reference, compiled = CusumTrigger(), CusumTrigger()
        head = int(rng.integers(0, 8))
        first = rng.normal(size=head)
        reference._warm_up(first)
        compiled._warm_up(first)
        lo = int(rng.integers(0, len(y)))
        expected = reference._warm_up(y[lo:])
        taken, compiled.n = k.trigger_warm_up(y, lo, compiled.n, compiled._f, table, ci, cf)
        assert taken == expected and type(compiled.n) is int
        assert np.array_equal(compiled._f.view(np.int64), reference._f.view(np.int64)), case
        assert compiled.state() == reference.state() or np.isnan(reference._f).any()


def test_blas_ddot_is_numpys_vector_product() -> None:
    """The localiser's compiled confirm calls the ``ddot`` that numpy's ``a @ b`` calls:
    the same floats on every length and scale, where a plain loop's sum differs."""
    fn = k.blas_ddot()
    assert fn is not None  # numpy's wheels bundle OpenBLAS: the compiled confirm is taken
    rng = np.random.default_rng(17)
    loop_differs = 0
    for n in [*range(1, 200), *rng.integers(200, 5000, 50).tolist()]:
        x, y = rng.normal(0, 10.0 ** rng.uniform(-6, 6), (2, n))
        got = k.blas_dot(fn, x, y)
        assert got == float(x @ y)
        total = 0.0
        for a, b in zip(x.tolist(), y.tolist(), strict=True):
            total += a * b
        loop_differs += total != got
    assert loop_differs > 100  # why the address: a loop in any other order is not numpy's


def test_compiled_parabola_sse_is_the_numpy_one() -> None:
    from detector.core.localiser import _parabola_sse

    fn = k.blas_ddot()
    for y in _arrays(18, 300, longest=1100):
        assert k.parabola_sse(y, fn) == _parabola_sse(y)
        assert k.parabola_sse(y[3:-2], fn) == _parabola_sse(y[3:-2])  # a slice, as the kernel takes them


def _confirm_cases(seed: int, count: int):
    """Windows that reach the confirm step: steps, kinks and smooth decays (which binary
    segmentation cuts and the curvature check joins again), some with little noise."""
    rng = np.random.default_rng(seed)
    for i, y in enumerate(_arrays(seed + 1, count, longest=1100)):
        n = len(y)
        if n < 9:
            continue
        spread = float(np.std(y)) + 1e-3
        t = np.arange(n)
        kind = i % 5
        if kind == 0:  # one or two level shifts
            for _ in range(1 + i % 2):
                y = y + (t >= rng.integers(0, n + 1)) * rng.normal(0, 5) * spread
        elif kind == 1:  # a kink
            y = y + np.maximum(t - rng.integers(0, n), 0) * rng.normal(0, 0.2) * spread
        elif kind == 2:  # a smooth bend with small noise
            y = np.exp(-t / rng.uniform(5, n)) + rng.normal(0, 10 ** rng.uniform(-5, -2), n)
        elif kind == 3:  # a power-law loss with a drop
            y = (10.0 + t) ** -0.5 + (t >= rng.integers(n // 2, n + 1)) * -0.02 + rng.normal(0, 1e-3, n)
        yield y


def test_compiled_confirm_is_the_python_confirm() -> None:
    """The compiled confirm step (binary segmentation, the curvature check, the level
    shifts, the last break held back) finds the same splits, gains, penalties and
    evidence as the Python reference, with every option set and unset."""
    from detector.core.localiser import _splits, history_scale, point_noise

    fn = k.blas_ddot()
    rng = np.random.default_rng(19)
    localisers = [WindowLocaliser(), WindowLocaliser(shift_penalty=None),
                  WindowLocaliser(curvature_penalty=None, min_size=5), WindowLocaliser(curvature_penalty=2.0),
                  WindowLocaliser(penalty=0.3, curvature_penalty=0.05, shift_penalty=2.0)]
    calls = found = dropped = shifted = 0
    for i, y in enumerate(_confirm_cases(20, 600)):
        loc = localisers[i % len(localisers)]
        n = len(y)
        scale = max(history_scale(y), 1e-12 * max(1.0, float(np.max(np.abs(y)))), 1e-300)
        sums, split_gain, shift_index, shift_gain, _ = k.window_search(y, loc.min_size, loc.shift_min_size)
        for factor in (1.0, rng.uniform(0.05, 1.0)):  # a smaller penalty: more breaks to check
            noise = point_noise(y)
            penalty = (loc.penalty * scale * scale + loc.noise_penalty * noise * noise) * np.log(n) * factor
            for final in (True, False):
                expected = loc._confirm(y, sums, split_gain, shift_index, shift_gain, scale, penalty, final)
                evidence, indices, gains, penalties = k.localiser_confirm(
                    y, sums, split_gain, shift_index, shift_gain, scale, penalty, final, loc.min_size,
                    loc.shift_min_size, loc.curvature_penalty is not None, loc.curvature_penalty or 0.0,
                    -1.0 if loc.shift_penalty is None else loc.shift_penalty, fn)
                assert (_splits(indices, gains, penalties, scale), evidence) == expected
                calls += 1
                found += bool(expected[0])
                shifted += any(s.penalty != penalty for s in expected[0])
                if split_gain / penalty > 1.0 and loc.curvature_penalty is not None:
                    dropped += len(k.binseg(sums, n, loc.min_size, penalty)) > len(expected[0])
    assert calls > 2000 and found > 500 and dropped > 100 and shifted > 100


def test_look_without_blas_takes_the_python_confirm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where BLAS's ``ddot`` is not found, a look confirms in Python, with the same result."""
    rng = np.random.default_rng(21)
    loc = WindowLocaliser()
    cases = list(_confirm_cases(22, 150))
    starts = [int(rng.integers(0, max(1, len(y) - 8))) for y in cases]

    def looks() -> list:
        pairs = enumerate(zip(cases, starts, strict=True))
        return [loc.look(y, start, None, i % 2 == 0) for i, (y, start) in pairs]

    compiled = looks()
    monkeypatch.setattr(k, "blas_ddot", lambda: None)
    calls = []
    original = WindowLocaliser._confirm
    monkeypatch.setattr(WindowLocaliser, "_confirm", lambda self, *a: calls.append(1) or original(self, *a))
    reference = looks()
    assert reference == compiled and len(calls) > 20 and sum(bool(c[0]) for c in compiled) > 20


def _partition_point_noise(y: np.ndarray) -> float:
    """point_noise as it was compiled: numba's np.partition (k.np_median) on copies."""
    if len(y) < 3:
        return 0.0
    d = np.diff(y)
    return 1.4826 * k.np_median(np.abs(d - k.np_median(d))) / np.sqrt(2.0)


def test_point_noise_selection_is_the_partition_median() -> None:
    """point_noise's in-place selection gives the medians the partition gave (numpy's,
    without NaN): on ties, signed zeros, sorted runs, every length, and where
    differences overflow (a NaN after the median: the partition's path is taken)."""
    rng = np.random.default_rng(23)
    cases = list(_arrays(24, 400))
    for n in [*range(1, 70), 127, 128, 129, 1023, 1024]:
        cases += [rng.normal(size=n), np.round(rng.normal(size=n)), rng.integers(0, 3, n).astype(float),
                  np.where(rng.random(n) < 0.5, 0.0, -0.0), np.sort(rng.normal(size=n)),
                  np.sort(rng.normal(size=n))[::-1].copy(), np.zeros(n)]
        y = rng.normal(size=n)
        y[rng.random(n) < 0.1] = rng.choice([1e308, -1e308])
        cases.append(y)
    with np.errstate(invalid="ignore", over="ignore"):
        for y in cases:
            noise, expected_noise = k.point_noise(y), _partition_point_noise(y)
            assert noise == expected_noise or (np.isnan(noise) and np.isnan(expected_noise))
            if np.all(np.isfinite(np.diff(y))):
                assert noise == _old_point_noise(y)
            d = np.diff(y)
            if len(d) == 0:
                continue
            expected = k.np_median(d)
            got = k._median_inplace(d)
            assert got == expected or (np.isnan(got) and np.isnan(expected))
            assert np.array_equal(np.sort(d), np.sort(np.diff(y)), equal_nan=True)  # reordered only


@pytest.mark.parametrize("blas", [True, False])
def test_a_look_skips_the_noise_only_where_it_is_weak_whatever_the_noise(
        monkeypatch: pytest.MonkeyPatch, blas: bool) -> None:
    """With ``weak_below``, a look that does not measure the point noise finds no break
    and says so with an evidence bound at or above the true evidence, below
    ``weak_below``; every other look is the look that measures it first."""
    if not blas:
        monkeypatch.setattr(k, "blas_ddot", lambda: None)
    rng = np.random.default_rng(23)
    loc = WindowLocaliser()
    looks = skipped = confirmed = 0
    for i, y in enumerate(_arrays(24, 200, longest=1100)):
        if i % 3 == 0:  # a shift, for looks that confirm
            y = y + (np.arange(len(y)) >= rng.integers(0, len(y) + 1)) * 5 * float(np.std(y) + 1e-3)
        if i % 4 == 1:  # a smooth trend, for looks whose spread dwarfs their gains
            y = y + 50.0 * float(np.std(y) + 1e-3) * np.linspace(0.0, 1.0, len(y))
        for start in {0, int(rng.integers(0, len(y))), max(0, len(y) - 9)}:
            for weak_below in (0.5, 1.0):
                final = bool(rng.integers(0, 2))
                full = loc.look(y, start, None, final)
                splits, evidence, noise = loc.look(y, start, None, final, weak_below)
                looks += 1
                if noise is None:
                    skipped += 1
                    assert splits == full[0] == [] and full[1] <= evidence < weak_below
                else:
                    assert (splits, evidence, noise) == full
                    confirmed += bool(splits)
                # A noise given is never skipped, and weak_below 0 never skips.
                assert loc.look(y, start, 0.5, final, weak_below) == loc.look(y, start, 0.5, final)
                assert loc.look(y, start, None, final, 0.0) == full
    assert looks > 800 and skipped > 100 and confirmed > 50 and looks - skipped > 300
