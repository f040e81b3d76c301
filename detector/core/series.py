"""Per-series detection: change points, plateaus and trends on one metric.

A :class:`SeriesDetector` takes ``(step, value)`` points in step order, one at a
time (``update``) or in blocks (``update_many``, vectorised; the same events and
state whatever the batching). Non-finite values are counted and routed away
before any statistic. Finite values are mapped to a working scale chosen by the
series' role (log scale for losses, norms and ranks, whose changes are
multiplicative) and feed:

* :class:`~detector.core.trigger.CusumTrigger` on every point, O(1)
  amortised, scanned over whole blocks in one compiled call with the rest of
  the block's work (:func:`~detector.core._kernels.series_block`);
* :class:`~detector.core.localiser.WindowLocaliser` on the current segment
  (at most ``window`` points) ``lag`` points after an alarm, and again on the
  next points while nothing is confirmed (at most ``recheck_limit``), O(window)
  each, and once more by :meth:`SeriesDetector.finish` when the run ends (the
  points after the last alarm);
* the slope-equivalence plateau test (:class:`~detector.core.trend.PlateauTest`'s)
  on the last ``patience`` step bins each time a bin closes, the bins
  ``plateau_bin_fraction`` of the steps elapsed wide (a window of about the
  last half of the series' steps whatever the logging cadence), compiled
  (:func:`~detector.core._kernels.plateau_bins`), O(1) amortised; and a
  Mann–Kendall trend test on the same bins' means, when read.

Memory per series is O(``window``), independent of run length.

About 700 lines, one class: change points and plateaus read the same block in
one pass (the trend reads the plateau test's bins), and the state's format and
its one converter sit beside the fields they save.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np

from detector.core import _kernels as _k
from detector.core._kernels import np_median
from detector.core.localiser import Split as Break  # a localiser's break (types.Split is a data split)
from detector.core.localiser import WindowLocaliser
from detector.core.trend import PlateauResult, PlateauTest, TrendResult, _t_quantile, mann_kendall
from detector.core.trigger import CusumTrigger
from detector.core.types import Direction, Event, EventKind, Role, SeriesSpec, Split
from detector.errors import InvalidArgument

_LOG_ROLES = frozenset({Role.LOSS, Role.NORM, Role.RANK})
_SYMLOG_EPS = 1e-10


def working_scale(role: Role, value: float) -> float:
    """Map a finite value to the scale its statistics use (symmetric log for multiplicative roles).

    :func:`working_scale_many` for one value, with the math module (the labeller
    calls it on every line; its values are only compared with each other, so
    libm's last-digit rounding, which may differ from numpy's, does not matter).
    """
    if role in _LOG_ROLES:
        return math.copysign(math.log10(1.0 + abs(value) / _SYMLOG_EPS), value)
    return float(value)


def working_scale_list(role: Role, values: list[float]) -> list[float]:
    """:func:`working_scale` of each of a list of finite values, the same libm calls
    in the same order (so the same floats), without a call and a role lookup each
    (the labeller's bulk path reads a block's losses this way)."""
    if role in _LOG_ROLES:
        copysign, log10 = math.copysign, math.log10
        return [copysign(log10(1.0 + abs(v) / _SYMLOG_EPS), v) for v in values]
    return [float(v) for v in values]


def raw_scale(role: Role, y: float) -> float:
    """The inverse of :func:`working_scale`: a working-scale value in the series' units."""
    if role in _LOG_ROLES:
        return math.copysign((10.0 ** min(abs(y), 300.0) - 1.0) * _SYMLOG_EPS, y)
    return float(y)


def working_scale_many(role: Role, values: np.ndarray) -> np.ndarray:
    """:func:`working_scale` of an array of finite values, in numpy."""
    if role in _LOG_ROLES:
        return np.copysign(np.log10(1.0 + np.abs(values) / _SYMLOG_EPS), values)
    return np.asarray(values, dtype=float)


@dataclass(frozen=True)
class SeriesConfig:
    """Settings of one series detector. Plateau margins are on the working scale.

    ``window`` points are kept for localisation (and for the penalty's scale);
    ``lag`` points after a trigger alarm are waited for before localising, and
    when nothing is confirmed the window is localised again on each of the next
    ``recheck`` points (a forecast that adapts to a shift would not alarm twice),
    then on every other point while the trigger stays above its threshold, up to
    ``recheck_limit`` points after the alarm (a small shift keeps adding
    evidence), stopping as soon as the window's best break gains less than
    ``recheck_evidence`` of its penalty (nothing is building up: on noise most
    alarms end after one look); nothing is confirmed online before
    ``min_history`` finite points are held (the penalty's scale and noise
    estimates need them; the end of a run localises whatever is held).

    Why the defaults: ``window`` 1024 bounds memory and each look at O(window)
    while holding a few hundred lines of a typical run; ``lag`` 0 looks at
    once (the localiser itself leaves a break at the window's very end for
    later); ``recheck`` 6 and ``recheck_limit`` 16 follow a small shift that
    keeps adding evidence for about as long as the slow bank needs to see it,
    and ``recheck_evidence`` 0.5 ends the looks at once on noise (most alarms);
    ``min_history`` 100 points make the penalty's spread meaningful;
    ``patience`` 20 step bins, each ``plateau_bin_fraction`` 1/32 of the steps
    elapsed wide (the window spans the last ~46 % of the series' steps, whatever
    the cadence; a line-counted window called every slow fall logged each step a
    plateau and kept a plateau open through a 1-nat drop), and the plateau
    margins (0.05 decades for losses and norms, 0.01 of accuracy, 5 % otherwise)
    call a plateau what a reader of the plot would: no change beyond the margin
    over the recent half of the run. The headline gauges' Mann–Kendall trend is
    read from the same bins (their direction over that window).
    """

    window: int = 1024
    trigger: CusumTrigger = field(default_factory=CusumTrigger)
    localiser: WindowLocaliser = field(default_factory=WindowLocaliser)
    lag: int = 0
    recheck: int = 6
    recheck_limit: int = 16
    recheck_evidence: float = 0.5
    min_history: int = 100
    patience: int = 20
    plateau_bin_fraction: float = 1 / 32
    min_delta_log: float = 0.05  # decades, for log-scale roles (abs mode)
    min_delta_accuracy: float = 0.01  # accuracy units (abs mode)
    min_delta_rel: float = 0.05  # other roles (rel mode)

    def __post_init__(self) -> None:
        # Half the window is what is held after a shift (the plateau test keeps bins of its own).
        needed = 2 * self.localiser.min_size + 1 + self.lag
        if self.window < 2 * needed or self.window % 2:
            raise InvalidArgument("window must be even and hold at least 2 × (2 × min_size + 1 + lag)")
        if not 0 < self.plateau_bin_fraction < 1:
            raise InvalidArgument("plateau_bin_fraction must be in (0, 1)")
        if self.patience < 3:
            raise InvalidArgument("patience must be at least 3 bins")
        if self.lag < 0 or self.recheck < 0:
            raise InvalidArgument("lag and recheck must be at least 0")
        if self.recheck_limit < self.recheck or self.min_history < 0 or self.recheck_evidence < 0:
            raise InvalidArgument("recheck_limit must be at least recheck, min_history and "
                                  "recheck_evidence at least 0")

    def plateau_test(self, role: Role) -> PlateauTest:
        if role in _LOG_ROLES:
            return PlateauTest(self.min_delta_log, self.patience, "abs")
        if role is Role.ACCURACY:
            return PlateauTest(self.min_delta_accuracy, self.patience, "abs")
        return PlateauTest(self.min_delta_rel, self.patience, "rel")


_CP, _PLATEAU = 0, 1  # event order within one point: change points, then plateaus
# The plateau window is tested once it is at most this share of the series' steps so
# far (at least a third of the history before it): 20 bins are ~46 % of it once the
# bins are as wide as the run's time scale, but early on, one step each at a dense
# cadence, they are all of it, and a warm-up's first 20 steps look flat.
_PLATEAU_RECENT = 2 / 3
_NO_FLAGS = np.zeros(0, dtype=bool)  # an episode's alarm flags before any were absorbed (never written)


class SeriesDetector:
    """Change points, plateaus and trends of one series, in blocks of points.

    ``update_many`` takes a block: non-finite values are counted and dropped
    first; the trigger scans the block and the block is appended to the held
    window in one compiled call, the plateau test's step bins take it in
    another; an alarm's looks (localisation) run in a third compiled call up to
    a confirmed break, and Python runs only for the events of confirmed breaks
    and of plateau transitions; the trend is computed when read.
    (Where numpy's loops cannot be called from compiled code, the same steps run
    in numpy, with the same results.)
    ``update`` is the one-point form and gives the same events and state.
    Cost: O(1) amortised per point plus O(window) per alarm; memory O(window),
    independent of run length.

    >>> import numpy as np
    >>> rng = np.random.default_rng(2)
    >>> values = np.r_[rng.normal(0, 1, 150), rng.normal(6, 1, 80)]
    >>> det = SeriesDetector(SeriesSpec("value", Role.OTHER, Split.TRAIN, Direction.MINIMIZE))
    >>> events = det.update_many(np.arange(230), values)
    >>> [(e.step, e.detected_at) for e in events if e.kind is EventKind.CHANGE_POINT]
    [(150, 152)]
    """

    def __init__(self, spec: SeriesSpec, config: SeriesConfig | None = None) -> None:
        self.spec = spec
        self.config = config or SeriesConfig()
        c = self.config
        self._plateau = c.plateau_test(spec.role)
        self.trigger = c.trigger.fresh()  # a new trigger with the config's settings
        self._ahead = c.lag + 2 * c.recheck_limit + 2  # points absorbed ahead at an alarm
        self._steps = np.zeros(c.window, dtype=np.int64)
        self._values = np.zeros(c.window, dtype=np.float64)
        self._size = 0  # points held, oldest at index 0
        self._segment_start = 0  # finite-point index where the current segment starts
        self._pending_alarm: int | None = None  # points to wait before localising
        self._alarm_statistic = 0.0
        self._rechecks = 0  # localisations left after an unconfirmed one
        self._alarm_noise: float | None = None  # point noise at this alarm (for the penalty)
        self._evidence = 0.0  # the last localisation's best gain / its penalty (transient)
        self._last_evidence = 0.0  # the look before's, during an alarm's episode
        self.n_finite = 0
        self.n_nonfinite = 0
        self.last_step: int | None = None
        self.last_value: float = math.nan  # raw, may be non-finite
        self.first_value: float = math.nan  # raw, first finite
        self.min_value: float = math.inf
        self.max_value: float = -math.inf
        # The plateau test's step bins (:func:`_kernels.plateau_bins`): their integer and
        # float state, and the last ``patience`` closed bins' means, mean steps, first steps.
        self._bins_i = np.zeros(_k.PB_SIZE, dtype=np.int64)
        self._bins_i[_k.PB_FIRST] = -1
        self._bins_f = np.zeros(_k.PF_SIZE)
        p = self._plateau.patience
        self._ring_y, self._ring_x = np.zeros(p), np.zeros(p)
        self._ring_first = np.zeros(p, dtype=np.int64)
        self._plateau_q = _t_quantile(0.5 + self._plateau.confidence / 2, max(p - 2, 1))
        self._trend_read: tuple[int, TrendResult | None] = (-1, None)  # (bins closed, trend) of the last read
        self._window_read: tuple[int, np.ndarray | None] = (-1, None)  # (bins closed, the trend window)
        # The compiled block's constants (integers, floats, the trigger's line table,
        # numpy's loops), or None where numpy's loops cannot be called (numpy's path).
        self._consts = _fast_consts(self.trigger, c.window, spec.role in _LOG_ROLES)
        # The trigger's warm-up compiled too, where libm's log (math.log's) was found.
        self._compiled_warm_up = self._consts is not None and bool(self._consts[0][_k.CI_LIBM_LOG])
        # The alarm episodes compiled too (:func:`_kernels.series_episodes`), where the
        # warm-up is and BLAS's ddot was found (the look's confirm step calls it): the
        # episode constants and ddot's address, or None (the Python loop).
        self._episode = _episode_consts(c) if self._compiled_warm_up else None

    # --- update ---------------------------------------------------------------

    def update(self, step: int, value: float) -> list[Event]:
        """Take one point; return the events it caused (possibly located earlier)."""
        return self.update_many(np.array([step], dtype=np.int64), np.array([value], dtype=float))

    def update_many(self, steps: np.ndarray, values: np.ndarray) -> list[Event]:
        """Take a block of points in step order; equal to :meth:`update` on each in turn."""
        steps = np.ascontiguousarray(steps, dtype=np.int64).reshape(-1)  # contiguous: one kernel type
        values = np.ascontiguousarray(values, dtype=float).reshape(-1)
        if len(steps) != len(values):
            raise InvalidArgument("steps and values must have the same length")
        if len(values) == 0:
            return []
        self.last_step = int(steps[-1])
        self.last_value = float(values[-1])
        if self._consts is not None:
            return self._fast_block(steps, values)
        finite = np.isfinite(values)
        self.n_nonfinite += int(len(values) - np.count_nonzero(finite))
        if not finite.all():
            steps, values = steps[finite], values[finite]
        if len(values) == 0:
            return []
        if self.n_finite == 0:
            self.first_value = float(values[0])
        self.min_value = min(self.min_value, float(values.min()))
        self.max_value = max(self.max_value, float(values.max()))
        y = working_scale_many(self.spec.role, values)
        n_before = self.n_finite

        plateaus = self._plateaus(steps, y, n_before)
        tagged = self._change_points(steps, y, n_before, 0)
        tagged += plateaus
        tagged.sort(key=lambda item: (item[0], item[1]))
        return [event for _, _, event in tagged]

    def _fast_block(self, steps: np.ndarray, values: np.ndarray) -> list[Event]:
        """The rest of :meth:`update_many`, compiled: one call (:func:`_kernels.series_block`)
        filters and scales, and, when no alarm is pending and the trigger is past its
        warm-up (most blocks), scans and appends up to the trigger's first alarm; one
        more (:meth:`_plateaus`) feeds the plateau test's step bins; Python continues
        from the alarm (or the block's start) and makes events only when there are
        some. The same operations as the numpy path, so the same floats and events.
        O(points) plus O(window) per alarm."""
        scan = self._pending_alarm is None and self.trigger.n >= self.trigger.warmup
        (bad, good, low, high, alarm, self.trigger.n, size, total, finite_steps,
         y) = self._block(steps, values, scan)
        if bad:
            self.n_nonfinite += bad
            if not good:
                return []
        if low == 0.0 or high == 0.0:  # a tie of +0 and −0 may be taken either way: numpy's
            finite = values[np.isfinite(values)]
            low, high = float(finite.min()), float(finite.max())
        n_before = self.n_finite
        if n_before == 0:
            first = float(values[0])  # nearly always finite: no mask of the whole block
            self.first_value = first if math.isfinite(first) else float(values[np.isfinite(values)][0])
        self.min_value = min(self.min_value, low)
        self.max_value = max(self.max_value, high)
        self._size, self.n_finite = size, total
        plateaus = self._plateaus(finite_steps, y, n_before)
        if alarm == -1 and not plateaus:
            return []
        tagged: list[tuple[int, int, Event]] = []
        if alarm != -1:
            if alarm >= 0:
                self._alarmed()
            tagged = self._change_points(finite_steps, y, n_before, max(alarm + 1, 0))
        tagged += plateaus
        tagged.sort(key=lambda item: (item[0], item[1]))
        return [event for _, _, event in tagged]

    # --- readouts for the labeller ---------------------------------------------

    def recent(self, count: int) -> np.ndarray:
        """The last ``count`` finite values on the working scale (fewer early on)."""
        return self._values[max(0, self._size - count) : self._size].copy()

    # --- end of a run -------------------------------------------------------------

    def finish(self) -> list[Event]:
        """Localise the current segment once more at the end of a run; return what it confirms.

        Points after the last trigger alarm are otherwise never localised: a
        change late in a run, or one the trigger saw too faintly, would go
        unreported. Call it once, when the run ends (after the last point); the
        events it returns are located earlier, and ``detected_at`` is the last
        step. O(window). A pending alarm's localisation is done here too.
        """
        if self._size == 0 or self.last_step is None:
            return []
        c = self.config
        if self.n_finite - self._segment_start < 2 * c.localiser.min_size + 1:
            return []
        self._alarm_statistic = self.trigger.statistic
        self._alarm_noise = None
        self._pending_alarm = None
        self._rechecks = 0
        return self._localise(int(self._steps[self._size - 1]), final=True)

    # --- change points -----------------------------------------------------------

    def _change_points(self, steps: np.ndarray, y: np.ndarray, base: int,
                       i: int) -> list[tuple[int, int, Event]]:
        """Scan with the trigger; after an alarm, localise on each point of the episode.

        ``y[:i]`` are taken already (``base``: the finite count before the block).
        :meth:`_change_points_loop`'s steps, compiled (:meth:`_episodes`) where the
        episode constants are (nearly everywhere); Python runs only when a look confirms
        breaks (their events, the trigger restarted on the new segment) and for an
        alarm whose statistic is Python's. The same state and events. O(points) plus
        O(window) per look.
        """
        if self._episode is None or self._consts is None:
            return self._change_points_loop(steps, y, base, i)
        tagged: list[tuple[int, int, Event]] = []
        m = len(y)
        while True:
            code, i, found, _ = self._episodes(steps, y, i)
            if code == _k.EP_DONE:
                return tagged
            if code == _k.EP_ALARM:
                self._alarmed()
                continue
            # The look after point i - 1 confirmed breaks: rows index, gain, penalty, then the scale.
            k = (len(found) - 1) // 3
            values = found.tolist()
            scale = values[-1]
            splits = [Break(index=int(values[j]), gain=values[k + j], penalty=values[2 * k + j], noise=scale)
                      for j in range(k)]
            start = max(0, self._segment_start - (self.n_finite - self._size))
            tagged += [(base + i - 1, _CP, e) for e in self._confirmed(int(steps[i - 1]), start, splits)]
            if i >= m:
                return tagged

    def _episodes(self, steps: np.ndarray, y: np.ndarray, i: int) -> tuple[int, int, np.ndarray, int]:
        """:func:`_kernels.series_episodes` on this detector's state from ``y[i:]``, the
        state written back; returns (``EP_*``, where to continue, the confirmed breaks,
        the looks done) (a method of its own: benchmarks.cost times it and counts its
        looks). O(points + window per look)."""
        trigger = self.trigger
        ci, cf, table, uf = cast("_FastConsts", self._consts)
        ei, ef, dot = cast("_EpisodeConsts", self._episode)
        noise = self._alarm_noise
        pending = self._pending_alarm
        (code, i, trigger.n, self._size, self.n_finite, pending, self._rechecks, self._last_evidence,
         self._alarm_statistic, has_noise, noise, looks, found) = _k.series_episodes(
            steps, y, i, trigger.n, trigger._f, trigger._sums, trigger.gate, table, ci, cf,
            trigger._bank_kq_flat, trigger._bank_hq_flat, uf, self._steps, self._values, self._size,
            self.n_finite, -1 if pending is None else pending, self._rechecks, self._last_evidence,
            self._alarm_statistic, noise is not None, 0.0 if noise is None else noise, self._segment_start,
            ei, ef, dot)
        self._pending_alarm = None if pending < 0 else pending
        self._alarm_noise = noise if has_noise else None
        return code, i, found, looks

    def _change_points_loop(self, steps: np.ndarray, y: np.ndarray, base: int,
                            i: int) -> list[tuple[int, int, Event]]:
        """:meth:`_change_points` in Python (where numpy's loops, libm's log or BLAS's
        ddot cannot be called from compiled code).

        ``y[:i]`` are taken already (``base``: the finite count before the block).
        During an episode the trigger absorbs the rest of the block at once
        (``ahead``: its state before, and where that was); if the episode ends
        without a confirmed break, the trigger is restored and advanced to the
        episode's last point, so the result is that of point-by-point updates.
        """
        tagged: list[tuple[int, int, Event]] = []
        m = len(y)
        ahead: tuple[dict, int] | None = None
        flags = _NO_FLAGS
        c = self.config
        while True:
            if self._pending_alarm == 0:
                if ahead is not None and i - ahead[1] > len(flags):
                    # The episode outlasted the points absorbed ahead: absorb the next ones.
                    done = ahead[1] + len(flags)
                    flags = np.concatenate([flags, self._absorb(y[done : max(i, done + self._ahead)])])
                found = self._localise(int(steps[i - 1]))
                # Nothing building up: too little evidence, or less than at the last look
                # (a transient's evidence fades as points come after it).
                weak = self._evidence < c.recheck_evidence or self._evidence < self._last_evidence
                self._last_evidence = self._evidence
                if found:
                    tagged += [(base + i - 1, _CP, e) for e in found]
                    ahead = None  # the trigger was restarted on the new segment, up to here
                    self._pending_alarm = None
                    self._rechecks = 0
                elif weak or (self._rechecks <= 0 and not self._still_alarmed(ahead, flags, i)):
                    if ahead is not None:
                        self.trigger.restore(ahead[0])
                        self._absorb(y[ahead[1] : i])
                        ahead = None
                    self.trigger.clear()
                    self._pending_alarm = None
                    self._rechecks = 0
                else:
                    # Every point for the first ``recheck``, then every other point.
                    self._pending_alarm = 1 if self._rechecks > 0 else 2
                    self._rechecks -= 1
            if i >= m:
                return tagged
            if self._pending_alarm is not None:
                if ahead is None:
                    ahead = (self.trigger.snapshot(), i)
                    # Only as far as an episode usually lasts: absorbing the whole rest of
                    # the block at every alarm made a block cost O(length × alarms).
                    flags = self._absorb(y[i : i + self._ahead])
                j = min(m, i + self._pending_alarm)
                self._append(steps[i:j], y[i:j])
                self._pending_alarm -= j - i
            else:
                hit = self._scan_append(steps, y, i)
                j = m if hit is None else i + hit + 1
                if hit is not None:
                    self._alarmed()
            i = j

    def _still_alarmed(self, ahead: tuple[dict, int] | None, flags: np.ndarray, i: int) -> bool:
        """Whether the trigger alarms after point ``i - 1`` (read now, or from the flags
        of the points absorbed ahead) and fewer than ``recheck_limit`` looks were done:
        keep looking while the window shows evidence building up and either the first
        ``recheck`` looks are not done or the trigger still alarms (a small shift keeps
        adding evidence; clearing the CUSUM would make it start over). Read only when
        it decides (a look that found nothing leaves the trigger as it was). O(1)."""
        if self.config.recheck - self._rechecks >= self.config.recheck_limit:  # rechecks done so far
            return False
        return self.trigger.alarmed if ahead is None else bool(flags[i - 1 - ahead[1]])

    def _block(self, steps: np.ndarray, values: np.ndarray, scan: bool) -> tuple:
        """:func:`_kernels.series_block` on this detector's state (a method of its own:
        benchmarks.cost times it as a stage)."""
        trigger = self.trigger
        ci, cf, table, uf = cast("_FastConsts", self._consts)
        return _k.series_block(
            steps, values, trigger.n, trigger._f, trigger._sums,
            trigger.gate, table, ci, cf, trigger._bank_kq_flat, trigger._bank_hq_flat, uf, self._steps,
            self._values, self._size, self.n_finite, scan)

    def _alarmed(self) -> None:
        """Start an alarm's episode (the trigger has just alarmed)."""
        self._last_evidence = 0.0
        self._alarm_statistic = self.trigger.statistic
        self._pending_alarm = self.config.lag
        self._rechecks = self.config.recheck
        self._alarm_noise = None

    def _scan_append(self, steps: np.ndarray, y: np.ndarray, i: int) -> int | None:
        """Scan ``y[i:]`` with the trigger up to its first alarm and append what it took;
        return the alarm's index relative to ``i``, or None. Compiled in one call
        (:func:`_kernels.scan_append`) past the trigger's warm-up; the warm-up's few
        points (a new series, a reset trigger) first, as :meth:`CusumTrigger.scan`
        takes them, then the compiled call for the rest (not ``scan``'s chunks in
        Python: a series' first block went through a dozen numpy calls a chunk).
        The scan's chunks and the append's pieces do not change a float: the
        trigger's state carries over exactly and the held window depends only on
        the points taken. O(points taken)."""
        trigger = self.trigger
        if self._consts is None:
            hit = trigger.scan(y[i:])
            j = len(y) if hit is None else i + hit + 1
            self._append(steps[i:j], y[i:j])
            return hit
        warm = 0
        if trigger.n < trigger.warmup:  # no alarm during the warm-up: the sums stay zero
            warm = self._warm_up(y, i)
            self._append(steps[i : i + warm], y[i : i + warm])
            if i + warm == len(y):
                return None
        ci, cf, table, uf = self._consts
        alarm, trigger.n, self._size, self.n_finite = _k.scan_append(
            steps, y, i + warm, trigger.n, trigger._f, trigger._sums, trigger.gate, table, ci, cf,
            trigger._bank_kq_flat, trigger._bank_hq_flat, uf, self._steps, self._values, self._size,
            self.n_finite)
        return None if alarm < 0 else warm + int(alarm)

    def _absorb(self, y: np.ndarray) -> np.ndarray:
        """:meth:`CusumTrigger.absorb`, past the warm-up in one compiled call
        (:func:`_kernels.trigger_absorb`). O(len(y))."""
        trigger = self.trigger
        if self._consts is None:
            return trigger.absorb(y)
        y = np.ascontiguousarray(y, dtype=float)
        i = self._warm_up(y, 0) if trigger.n < trigger.warmup else 0  # the sums stay zero during warm-up
        if i == len(y):
            return np.zeros(len(y), dtype=bool)
        ci, cf, table, uf = self._consts
        flags, trigger.n = _k.trigger_absorb(y, i, trigger.n, trigger._f, trigger._sums, trigger.gate, table,
                                             ci, cf, trigger._bank_kq_flat, trigger._bank_hq_flat, uf)
        return flags

    def _warm_up(self, y: np.ndarray, lo: int) -> int:
        """:meth:`CusumTrigger._warm_up` of ``y[lo:]`` (compiled path only; ``y`` contiguous
        float64): one compiled call (:func:`_kernels.trigger_warm_up`, libm's log as
        ``math.log``) where libm's log was found, else the trigger's Python. Returns the
        points taken. A reset trigger warms up after every confirmed break: this was
        ~25 us of small numpy and Python calls. O(warm-up)."""
        trigger = self.trigger
        if not self._compiled_warm_up:
            return trigger._warm_up(y[lo:])
        ci, cf, table, _ = cast("_FastConsts", self._consts)
        taken, trigger.n = _k.trigger_warm_up(y, lo, trigger.n, trigger._f, table, ci, cf)
        return int(taken)

    def _append(self, steps: np.ndarray, y: np.ndarray) -> None:
        """Append like one point at a time with a half-window shift when full (amortised O(1))."""
        k = len(y)
        if k == 0:
            return
        if self._consts is not None:  # compiled: the same copies
            self._size, self.n_finite = _k.held_append(self._steps, self._values, self._size, self.n_finite,
                                                       steps, y, 0, k, self.config.window)
            return
        w = self.config.window
        total = self.n_finite + k
        size = total if total <= w else w // 2 + (total - w - 1) % (w // 2) + 1
        keep = size - k  # old points still held
        if keep <= 0:
            self._steps[:size] = steps[k - size :]
            self._values[:size] = y[k - size :]
        else:
            if self._size > keep:
                self._steps[:keep] = self._steps[self._size - keep : self._size]
                self._values[:keep] = self._values[self._size - keep : self._size]
            self._steps[keep:size] = steps
            self._values[keep:size] = y
        self._size = size
        self.n_finite = total

    def _localise(self, step: int, final: bool = False) -> list[Event]:
        if self._size < self.config.min_history and not final:
            self._evidence = 0.0
            return []  # too little history for the penalty's scale to mean anything
        oldest = self.n_finite - self._size
        start = max(0, self._segment_start - oldest)
        # The point noise once per alarm (a median; rechecks reuse it), the spread on every look.
        splits, self._evidence, self._alarm_noise = self.config.localiser.look(
            self._values[: self._size], start, self._alarm_noise, final, _weak_below(self.config))
        if not splits:
            return []
        return self._confirmed(step, start, splits)

    def _confirmed(self, step: int, start: int, splits: list[Break]) -> list[Event]:
        """The events of the breaks a look at ``held[start:]`` confirmed (``step``: the
        point it looked after), and the trigger restarted on the new segment. O(window)."""
        oldest = self.n_finite - self._size
        segment = self._values[start : self._size]
        statistic = self._alarm_statistic
        events = []
        edges = [0, *(s.index for s in splits), len(segment)]
        for k, split in enumerate(splits):
            before = _median(segment[edges[k] : split.index][-10:])
            after = _median(segment[split.index : edges[k + 2]][:10])
            direction = "up" if after > before else "down"
            located = int(self._steps[start + split.index])
            events.append(Event(
                step=located,
                kind=EventKind.CHANGE_POINT,
                detected_at=step,
                series=self.spec.name,
                confidence=float(min(1.0, split.gain / (2.0 * split.penalty))),
                message=f"{self.spec.name} changed {direction} at step {located}",
                evidence={
                    "test": "cusum+binseg_linear",
                    "cusum_statistic": f"{statistic:.4g}",
                    "cost_gain": f"{split.gain:.4g}",
                    "penalty": f"{split.penalty:.4g}",
                    "noise": f"{split.noise:.4g}",
                    "direction": direction,
                    "before": f"{raw_scale(self.spec.role, before):.6g}",  # in the series' units
                    "after": f"{raw_scale(self.spec.role, after):.6g}",
                    "detected_at_step": str(step),
                },
            ))
        index = start + splits[-1].index
        self._segment_start = oldest + index
        # Re-warm the trigger on the new segment so it forecasts from the new regime.
        self.trigger.reset()
        self._absorb(self._values[index : self._size])
        self.trigger.clear()
        return events

    # --- plateaus and trends -------------------------------------------------------

    def _plateaus(self, steps: np.ndarray, y: np.ndarray, n_before: int) -> list[tuple[int, int, Event]]:
        """The plateau events of a block of finite working-scale points: the test on the
        last ``patience`` step bins each time a bin closes (:func:`_kernels.plateau_bins`,
        one compiled call). A bin opening at step b is ``plateau_bin_fraction`` of the
        steps elapsed since the series' first point wide (at least one step), so the
        window of ``patience`` bins spans about the last half of the series' steps (1 −
        e^(−patience × fraction) of them) whatever the logging cadence: a loss that
        falls 10 % per 200 steps is not on a plateau because it is logged every step,
        and a plateau ends when its level moves, however slowly it is logged. Each bin
        is its points' mean. O(points + patience per closed bin)."""
        p = self._plateau
        found = _k.plateau_bins(steps, y, self._bins_i, self._bins_f, self._ring_y, self._ring_x,
                                self._ring_first, p.patience, self._plateau_q, p.min_delta,
                                p.threshold_mode == "rel", self.config.plateau_bin_fraction,
                                _PLATEAU_RECENT)
        if not found.shape[1]:
            return []
        tagged: list[tuple[int, int, Event]] = []
        for i, started, slope, low, high, bound, located, span in found.T.tolist():
            result = PlateauResult(started > 0.0, slope, low, high, bound)
            event = self._plateau_event(result, started > 0.0, int(located), int(steps[int(i)]), span)
            tagged.append((n_before + int(i), _PLATEAU, event))
        return tagged

    def _plateau_event(self, result: PlateauResult, started: bool, located: int, step: int,
                       span: float) -> Event:
        kind = EventKind.PLATEAU_START if started else EventKind.PLATEAU_END
        return Event(
            step=located,
            kind=kind,
            detected_at=step,
            series=self.spec.name,
            confidence=0.95,
            message=f"{self.spec.name} {'reached a plateau' if started else 'left its plateau'}",
            evidence={
                "test": "slope_equivalence",
                "slope": f"{result.slope:.4g}",
                "change_ci_low": f"{result.ci_low:.4g}",
                "change_ci_high": f"{result.ci_high:.4g}",
                "min_delta": f"{result.bound:.4g}",
                "threshold_mode": self._plateau.threshold_mode,
                "patience": str(self._plateau.patience),
                "window_steps": f"{span:.0f}",
                "detected_at_step": str(step),
            },
        )

    @property
    def in_plateau(self) -> bool:
        """Whether the series is on a plateau (the step bins' state)."""
        return bool(self._bins_i[_k.PB_IN])

    @property
    def trend(self) -> TrendResult | None:
        """Mann–Kendall on the means of the plateau test's last ``patience`` step bins
        (about the last half of the series' steps; None before that many bins have
        closed). Computed when read (O(patience²), once per closed bin): only the
        headline series' trends are ever read."""
        closed = int(self._bins_i[_k.PB_CLOSED])
        if closed < self._plateau.patience:
            return None
        if self._trend_read[0] != closed:
            window = self.trend_window()
            assert window is not None
            self._trend_read = (closed, mann_kendall(window))
        return self._trend_read[1]

    def trend_window(self) -> np.ndarray | None:
        """A copy of the bin means :attr:`trend` tests now, oldest first, or None
        before ``patience`` bins have closed (a status holds it to test later). O(patience)."""
        closed = int(self._bins_i[_k.PB_CLOSED])
        if closed < self._plateau.patience:
            return None
        if self._window_read[0] != closed:
            # The ring is written only when a bin closes: one copy per closed bin, shared
            # read-only by every status made until the next (a status a batch made a copy
            # each, ~20 us a headline series).
            head = int(self._bins_i[_k.PB_HEAD])
            window = np.concatenate((self._ring_y[head:], self._ring_y[:head]))
            window.flags.writeable = False
            self._window_read = (closed, window)
        return self._window_read[1]

    # --- checkpoints -------------------------------------------------------------

    _SCALARS = ("segment_start", "pending_alarm", "alarm_statistic", "rechecks", "alarm_noise",
                "last_evidence")
    _READOUTS = ("n_finite", "n_nonfinite", "last_step", "last_value", "first_value", "min_value",
                 "max_value", "in_plateau")

    def state(self) -> dict:
        """Everything needed to resume, as versioned plain data (dicts, lists, numbers and
        two numpy arrays): field names are part of the format, not attribute names. A
        state without ``plateau_bins`` (written before the step bins) resumes with
        empty bins."""
        return {
            "version": STATE_VERSION,
            "spec": asdict(self.spec),
            "trigger": self.trigger.state(),
            "steps": self._steps[: self._size].copy(),
            "values": self._values[: self._size].copy(),
            **{name: getattr(self, "_" + name) for name in self._SCALARS},
            **{name: getattr(self, name) for name in self._READOUTS},
            "plateau_bins": {"ints": self._bins_i.tolist(), "floats": self._bins_f.tolist(),
                             "means": self._ring_y.tolist(), "mean_steps": self._ring_x.tolist(),
                             "first_steps": self._ring_first.tolist()},
        }

    @classmethod
    def from_state(cls, state: dict, config: SeriesConfig | None = None) -> SeriesDetector:
        """A detector resumed from :meth:`state` (or from the unversioned format before
        it, converted by :func:`_from_version_1`); a newer version is refused by name."""
        version = state.get("version", 1)
        if version == 1:
            state = _from_version_1(state)
        elif version != STATE_VERSION:
            raise InvalidArgument(f"series detector state version {version} is not supported "
                                  f"(this version reads 1 and {STATE_VERSION})")
        spec = state["spec"]
        det = cls(
            SeriesSpec(spec["name"], Role(spec["role"]), Split(spec["split"]),
                       Direction(spec["direction"])),
            config,
        )
        det.trigger.load(state["trigger"])
        size = len(state["steps"])
        det._steps[:size] = state["steps"]
        det._values[:size] = state["values"]
        det._size = size
        det._segment_start = int(state["segment_start"])
        det._pending_alarm = None if state["pending_alarm"] is None else int(state["pending_alarm"])
        det._alarm_statistic = float(state["alarm_statistic"])
        det._rechecks = int(state["rechecks"])
        det._alarm_noise = None if state["alarm_noise"] is None else float(state["alarm_noise"])
        det._last_evidence = float(state["last_evidence"])
        det.n_finite, det.n_nonfinite = int(state["n_finite"]), int(state["n_nonfinite"])
        det.last_step = None if state["last_step"] is None else int(state["last_step"])
        det.last_value, det.first_value = float(state["last_value"]), float(state["first_value"])
        det.min_value, det.max_value = float(state["min_value"]), float(state["max_value"])
        bins = state.get("plateau_bins")
        if bins is not None and len(bins["means"]) == len(det._ring_y) and len(bins["ints"]) == _k.PB_SIZE:
            det._bins_i[:] = bins["ints"]
            det._bins_f[:] = bins["floats"]
            det._ring_y[:], det._ring_x[:] = bins["means"], bins["mean_steps"]
            det._ring_first[:] = bins["first_steps"]
        else:  # a checkpoint from before the step bins (or another patience): bins start afresh
            det._bins_i[_k.PB_IN] = int(bool(state["in_plateau"]))
        return det


STATE_VERSION = 2  # of SeriesDetector.state(); 1 was unversioned with private names under "scalars"


def _from_version_1(state: dict) -> dict:
    """Convert a version-1 state (private attribute names under ``scalars``, a
    stored trend, multi-resolution summaries) to version 2: the one converter of
    old series checkpoints (the trend is now computed from the held values when
    read, the summaries are gone). O(1) besides copying references."""
    scalars = state["scalars"]
    out = {"version": STATE_VERSION, "spec": state["spec"], "trigger": state["trigger"],
           "steps": state["steps"], "values": state["values"]}
    for name in SeriesDetector._SCALARS:
        out[name] = scalars.get("_" + name, 0.0 if name == "last_evidence" else None)
    for name in SeriesDetector._READOUTS:
        out[name] = scalars[name]
    return out


_FastConsts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_EpisodeConsts = tuple[np.ndarray, np.ndarray, np.ndarray]
# Per config object (kept in the entry, so its id is not reused): the engine shares one.
_EPISODE_CONSTS: dict[int, tuple[SeriesConfig, _EpisodeConsts | None]] = {}


def _episode_consts(config: SeriesConfig) -> _EpisodeConsts | None:
    """The constants of :func:`_kernels.series_episodes` for ``config`` (entries ``EI_*``,
    ``EF_*``, and :func:`_kernels.blas_ddot`'s address; shared, never written), or None
    where BLAS's ddot cannot be called from compiled code (the look's confirm step is
    then Python's). O(1) after the first call per config."""
    entry = _EPISODE_CONSTS.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    dot = _k.blas_ddot()
    consts = None
    if dot is not None:
        loc, c = config.localiser, config
        ahead = c.lag + 2 * c.recheck_limit + 2  # as SeriesDetector._ahead
        ei = np.array([loc.min_size, loc.shift_min_size, loc.curvature_penalty is not None, c.lag, c.recheck,
                       c.recheck_limit, c.min_history, ahead], dtype=np.int64)
        ef = np.array([loc.penalty, loc.noise_penalty,
                       -1.0 if loc.shift_penalty is None else loc.shift_penalty,
                       0.0 if loc.curvature_penalty is None else loc.curvature_penalty,
                       c.recheck_evidence, c.trigger.threshold, _weak_below(c)], dtype=float)
        consts = (ei, ef, dot)
    if len(_EPISODE_CONSTS) > 64:  # configs made and dropped (tests): forget them
        _EPISODE_CONSTS.clear()
    _EPISODE_CONSTS[id(config)] = (config, consts)
    return consts
_FAST_CONSTS: dict[tuple, _FastConsts] = {}  # per settings: a handful per process


def _fast_consts(trigger: CusumTrigger, window: int, log_role: bool) -> _FastConsts | None:
    """The constants of :func:`_kernels.series_block` and :func:`_kernels.scan_append` for
    these settings (entries ``CI_*``, ``CF_*``; shared, never written), or None where
    numpy's loops cannot be called from compiled code (:func:`_kernels.numpy_loops`)."""
    uf = _k.numpy_loops()
    if uf is None:
        return None
    key = (trigger.settings_key, window, log_role)
    consts = _FAST_CONSTS.get(key)
    if consts is None:
        ci = np.array([trigger._bank_after, trigger._kq, trigger._hq, window, log_role, trigger.warmup,
                       _k.libm_log()], dtype=np.int64)
        cf = np.r_[trigger._lam, trigger._holt, trigger._consts].astype(float)
        table = np.ascontiguousarray(np.vstack(trigger._table))
        consts = _FAST_CONSTS[key] = (ci, cf, table, uf)
    return consts


def _weak_below(config: SeriesConfig) -> float:
    """The evidence below which a look ends its alarm's episode whatever the point noise
    (so a first look may skip measuring it, :func:`_kernels.localiser_look`): the
    recheck evidence, at most 1 (above 1 a break might still pass)."""
    return min(config.recheck_evidence, 1.0)


def _median(values: np.ndarray) -> float:
    """``np.median``, compiled; numpy's own when the median is zero (a +0/−0 tie may be
    selected either way, and the sign shows in the event's evidence)."""
    median = np_median(values)
    return median if median != 0.0 else float(np.median(values))

