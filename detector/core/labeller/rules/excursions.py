"""Loss spikes and training collapse on the headline training loss (:class:`LossExcursions`)."""

from __future__ import annotations

import math

import numpy as np

from detector.core.labeller import _kernels as _k
from detector.core.labeller.config import LabellerConfig
from detector.core.labeller.history import Band
from detector.core.labeller.rules._common import TRAINING, Interval, Quiet, _Plain, collapse_end
from detector.core.labeller.timeline import Timeline, make_event
from detector.core.series import raw_scale, working_scale
from detector.core.types import Event, EventKind, Phase, Role


class LossExcursions(_Plain):
    """Loss spikes and training collapse on the headline training loss.

    A line is *out* when the loss is non-finite, above its band (on the log
    scale, ``max(log10 spike_factor, spike_noise × noise)`` above the line
    before, or as far above the line the run's own time scale back —
    ``recovery_fraction`` of the steps so far — by a rise of ``collapse_material``
    of the first loss), or above the slow-drift bound (``collapse_factor`` × its
    running minimum and its minimum + ``collapse_margin`` × its first value).
    An excursion that is back (halfway from its peak to the level, and under
    the drift bound) before the recovery horizon is a ``LOSS_SPIKE`` located
    at its first line, with the peak, the factor over the level and the
    duration in steps; one still out at the horizon is a ``COLLAPSE_ONSET``
    (scope ``training``), unless it has come down ``recovering_fraction`` of its
    height by then (it then has up to ``recovery_extension`` × the horizon to be
    back), ended by ``COLLAPSE_END`` once the loss is back the same way and stays
    back for the same horizon. An excursion is only over once it has stayed back
    for a quarter of the horizon without bouncing (``thr`` and ``collapse_material``
    of the first loss above the lowest it came back to; a line already back
    leaves only ``back_slack`` × the noise above the band): a loss that bounces
    between 1e-2 and 1 after a jump from 1e-6 is still out. The level it left is
    the smaller of the band's median and the median of its last three lines.
    O(band_values) a line.
    """

    _FIELDS = ("first", "run_min", "excursion", "collapse", "last_start", "calm")
    _NESTED = {"band": Band, "interval": Interval}

    def __init__(self, config: LabellerConfig) -> None:
        self.config = config
        self.first = math.nan
        self.run_min = math.inf
        self.band = Band(config.band_values)
        self.interval = Interval()
        self.excursion: dict | None = None
        self.collapse: dict | None = None
        self.last_start: int | None = None  # where the last excursion began
        self.calm = 0  # the band's values added since the last excursion ended (its newest ones)
        self._quiet_memorised: int | None = None  # memorised_steps the cached quiet loop was made for

    @property
    def quiet(self) -> bool:
        """No excursion or collapse open: training holds."""
        return self.excursion is None and self.collapse is None

    def _threshold(self) -> float:
        c = self.config
        return max(math.log10(c.spike_factor), c.spike_noise * self.band.noise)

    def _drift_bound(self) -> float:
        if not math.isfinite(self.run_min) or self.run_min < 0 or math.isnan(self.first):
            return math.inf
        c = self.config
        return max(c.collapse_factor * self.run_min, self.run_min + c.collapse_margin * abs(self.first))

    def _horizon(self, start: int, first_step: int, memorised_steps: int | None) -> int:
        return max(self._time_scale(start, first_step, memorised_steps),
                   self.config.min_intervals * self.interval.gap)

    def _time_scale(self, step: int, first_step: int, memorised_steps: int | None) -> int:
        """The run's own time scale at ``step``: ``recovery_fraction`` of the steps so far,
        at most ``recovery_memorisation`` × the steps memorisation took; the recovery
        horizon before its floor of ``min_intervals`` lines."""
        c = self.config
        scale = c.recovery_fraction * (step - first_step)
        if memorised_steps is not None and memorised_steps > 0:
            scale = min(scale, c.recovery_memorisation * memorised_steps)
        return int(math.ceil(scale))

    def _risen(self, value: float, y: float, thr: float, step: int, first_step: int,
               memorised_steps: int | None) -> bool:
        """Out of the band by a rise: ``thr`` above the line before (a jump) or above the
        line the run's own time scale back (a creep: a loss logged every step that
        climbs 5x in 80 steps moves less than ``thr`` from one line to the next, yet
        logged every 10 steps it jumps); a creep must also cost ``collapse_material`` of
        the first loss (Adam's slingshot precursors creep 3e-8 -> 6e-8, a rise of nothing
        that the jump then reports). Only the band's values since the last
        excursion count: the decaying tail of an excursion that is over stays above
        the level before it and is not a new one. O(1)."""
        values = self.band.values
        if y > values[-1] + thr:
            return True
        scale = self._time_scale(step, first_step, memorised_steps)
        back = min(len(values), self.calm, scale // self.interval.gap)
        if back < 2 or y <= values[-back] + thr:
            return False
        return value - raw_scale(Role.LOSS, values[-back]) >= self.config.collapse_material * abs(self.first)

    def _back(self, value: float, y: float, ex: dict, staying: bool = False) -> bool:
        """Back in the band, or back ``back_fraction`` of the way from the peak to the
        level in loss units, counting a peak above the run's first loss as that loss
        (a loss at 0.03 after a jump from 1e-7 to 0.1 is back; one at 10^9 after 10^10
        is not). ``staying``: a loss already back is still back up to ``back_slack`` ×
        the series' own line-to-line noise above the band: logged every step, a
        mini-batch loss that comes home to the band's edge crosses it with its noise
        every few lines, logged every 50 steps once, and a recovery must not wait
        for a run of lucky draws (nor become a collapse for want of one)."""
        if not math.isfinite(value) or value > ex["bound"]:
            return False
        if y <= ex["ref"] + ex["thr"] + (ex.get("slack", 0.0) if staying else 0.0):
            return True
        peak = ex["peak_value"] if math.isfinite(ex["peak_value"]) else math.inf
        top = min(peak, max(abs(self.first), ex["ref_value"]))
        return top > ex["ref_value"] and value <= ex["ref_value"] + self.config.back_fraction * (
            top - ex["ref_value"])

    def _recovering(self, y: float, ex: dict) -> bool:
        """Come down ``recovering_fraction`` of its height (on the log scale, from the
        peak to the band's top) by the horizon: an excursion on its way back, whose end
        falls near the horizon, is judged by where it ends (the same whatever the
        cadence), not by which side of the horizon a line happens to be logged. A loss
        that stays up, settles at a worse level (half-way down), or is non-finite, is
        not recovering."""
        top = ex["ref"] + ex["thr"]
        peak = ex["peak"]
        left = 1.0 - self.config.recovering_fraction
        return math.isfinite(y) and math.isfinite(peak) and peak > top and y <= top + left * (peak - top)

    def _back_since(self, step: int) -> int:
        """Where a loss first seen back at ``step`` came back: halfway from the line
        before (the step itself on a dense log). Dated at the line, it would settle
        half an interval late, five steps on a log of every 10 and 25 on one of 50, and a
        recovered spike followed by a relapse would be a spike on one log and a
        collapse on the other."""
        return step - self.interval.gap // 2

    def _bounced(self, value: float, y: float, ex: dict) -> bool:
        """Settling, the loss rose again: ``thr`` above the lowest it came back to (not the
        line before, so a rise logged every step is the jump it is logged every 10), by
        ``collapse_material`` of the first loss (a loss back at 0.1 after 1.5e-6 -> 3.7
        that bounces to 0.7 has not recovered; one at 1e-6 that wobbles to 5e-6 has)."""
        low = ex.get("low_y", y)
        return y > low + ex["thr"] and \
            value - raw_scale(Role.LOSS, low) >= self.config.collapse_material * abs(self.first)

    def _material(self, ex: dict) -> bool:
        """An excursion costs at least ``collapse_material`` of the first loss (or is
        non-finite): a loss that creeps from 1e-7 to 1e-5 and stays is not a collapse."""
        if not math.isfinite(ex["peak_value"]):
            return True
        return ex["peak_value"] - ex["ref_value"] >= self.config.collapse_material * abs(self.first)

    def update(self, step: int, value: float, series: str, first_step: int,
               memorised_steps: int | None, timeline: Timeline) -> list[Event]:
        if self._quiet is not None:
            self.release()
        self.interval.see(step)
        finite = math.isfinite(value)
        y = working_scale(Role.LOSS, value) if finite else math.inf
        if finite and math.isnan(self.first):
            self.first = value
        if self.collapse is not None:
            return self._in_collapse(step, value, y, series, timeline)
        if self.excursion is not None:
            return self._in_excursion(step, value, y, series, first_step, memorised_steps, timeline)
        thr = self._threshold()
        out = not finite or value > self._drift_bound() or (
            self.band.ready and self._risen(value, y, thr, step, first_step, memorised_steps))
        if out:
            # The level it left: on a falling loss the median of the last three lines,
            # not the band's median, which lags a decay by half the band (9 lines: 9
            # steps logged every step, 90 logged every 10, so the recovery would depend
            # on the cadence), nor the line before alone, one noisy low line of a
            # mini-batch loss (0.8x the level) that no recovery would get back to.
            ref = min(self.band.level, self.band.recent) if self.band.ready else (
                y if finite else math.nan)
            horizon = self._horizon(step, first_step, memorised_steps)
            self.last_start = step
            self.excursion = {
                "start": step, "ref": ref, "ref_value": raw_scale(Role.LOSS, ref), "thr": thr, "peak": y,
                "peak_value": value, "bound": self._drift_bound(), "last_y": y, "low_y": y,
                "horizon": horizon, "back_at": None,
                "settle": horizon // 4, "slack": self.config.back_slack * self.band.noise,
            }
            return []
        self.band.add(y)
        self.calm += 1
        self.run_min = min(self.run_min, value)
        return []

    def quiet_run(self, steps: np.ndarray, values: np.ndarray, ys: np.ndarray, present: np.ndarray,
                  start: int, stop: int, first_step: int, memorised_steps: int | None,
                  commit: bool = True) -> int:
        """:meth:`update` on lines ``start:stop`` while nothing can happen: with nothing
        open, each present loss finite, not the run's first, and inside its band
        (neither out of it nor above the drift bound); with an excursion open, it
        neither ends (back for the settling time, or out at the horizon and not on its way back)
        nor learns the level it left; with a collapse open, it is not back for
        the horizon. Stops before the first line that is not; returns the lines
        taken (``commit=False``: only counts them, the state is left as it was).

        ``values``: the loss on every line of the block, ``ys`` its working-scale
        values (:func:`working_scale`, where finite), ``present`` where it is
        logged; ``first_step`` and ``memorised_steps`` as :meth:`update` takes
        them. O(lines × band_values); the state stays the band's and the open
        excursion's.
        """
        if stop <= start:
            return 0
        if self._quiet is not None and self.quiet and memorised_steps != self._quiet_memorised:
            self.release()  # the time scale's constants changed
        quiet = self._quiet if self._quiet is not None else self._make_quiet(first_step, memorised_steps)
        return quiet.run((steps, values, ys, present), start, stop, commit)

    def _make_quiet(self, first_step: int, memorised_steps: int | None) -> Quiet:
        """The compiled loop's state (:class:`Quiet`): with nothing open, or with an
        excursion or a collapse open (what no quiet line changes stays in the fields)."""
        c = self.config
        if self.quiet:
            band, n = self.band.buffer()
            seen, last, gap = self.interval.packed()
            self._quiet_memorised = memorised_steps
            quiet = Quiet(
                _k.excursions_quiet, (band,),
                (float(self.run_min), n, float(self.band.first_noise), float(self.band.second_noise),
                 self.band.diffs, seen, last, gap, self.calm),
                (float(self.first), self.band.size, math.log10(c.spike_factor), float(c.spike_noise),
                 float(c.collapse_factor), float(c.collapse_margin), float(c.collapse_material), first_step,
                 -1 if memorised_steps is None else memorised_steps, float(c.recovery_fraction),
                 float(c.recovery_memorisation)),
                self._unpack_quiet)
        else:
            ex = self.collapse if self.collapse is not None else self.excursion
            assert ex is not None  # not quiet: one is open
            back = ex["back_since"] if self.collapse is not None else ex["back_at"]
            seen, last, gap = self.interval.packed()
            quiet = Quiet(
                _k.excursions_open_quiet, (),
                (float(ex["peak"]), float(ex["peak_value"]), float(ex["last_y"]),
                 float(ex.setdefault("low_y", ex["last_y"])), back is not None,
                 0 if back is None else back, seen, last, gap),
                (float(self.first), self.collapse is not None, ex["start"], float(ex["ref"]),
                 float(ex["ref_value"]), float(ex["thr"]), float(ex["bound"]), ex["horizon"], ex["settle"],
                 float(c.back_fraction), float(ex.get("slack", 0.0)), 1.0 - c.recovering_fraction,
                 float(c.recovery_extension), float(c.collapse_material)),
                self._unpack_open)
        self._quiet = quiet
        return quiet

    def _unpack_quiet(self, arrays: tuple, state: tuple) -> None:
        self.run_min, n, first_noise, second_noise, diffs, seen, last, gap, calm = state
        self.calm = int(calm)
        self.band.take(arrays[0], n, first_noise, second_noise, diffs)
        self.interval.unpack(seen, last, gap)

    def _unpack_open(self, arrays: tuple, state: tuple) -> None:
        peak, peak_value, last_y, low_y, has_back, back, seen, last, gap = state
        self.interval.unpack(seen, last, gap)
        if self.collapse is not None:
            self.collapse["back_since"] = int(back) if has_back else None
            return
        ex = self.excursion
        assert ex is not None  # the loop ran with one open
        ex["peak"], ex["peak_value"], ex["last_y"] = peak, peak_value, last_y
        ex["back_at"] = int(back) if has_back else None
        ex["low_y"] = low_y

    def _in_excursion(self, step: int, value: float, y: float, series: str, first_step: int,
                      memorised_steps: int | None, timeline: Timeline) -> list[Event]:
        ex = self.excursion
        assert ex is not None  # called only inside an excursion
        jumped = not math.isfinite(value) or (ex["back_at"] is not None and self._bounced(value, y, ex))
        ex["last_y"] = y
        if y > ex["peak"] or not math.isfinite(value):
            ex["peak"] = max(ex["peak"], y)
            ex["peak_value"] = value if not math.isfinite(ex["peak_value"]) or not math.isfinite(value) \
                else max(ex["peak_value"], value)
        ref = ex["ref"]
        if math.isnan(ref) and math.isfinite(y):
            ref = ex["ref"] = y
            ex["ref_value"] = raw_scale(Role.LOSS, y)
        if ex["back_at"] is not None:
            # Settling: back, unless it jumps again before the settling time is up
            # (a loss that bounces back up has not recovered).
            if jumped or not self._back(value, y, ex, staying=True):
                ex["back_at"] = None
            elif step - ex["back_at"] >= ex["settle"]:
                return self._spike(step, y, series)
            else:
                ex["low_y"] = min(ex.get("low_y", y), y)
                return []
        elif not math.isnan(ref) and self._back(value, y, ex):
            ex["back_at"] = self._back_since(step)
            ex["low_y"] = y
            if ex["settle"] <= 0:
                return self._spike(step, y, series)
            return []
        if ex["back_at"] is not None or step - ex["start"] < ex["horizon"]:
            return []
        if self._recovering(y, ex) and step - ex["start"] < self.config.recovery_extension * ex["horizon"]:
            return []
        self.excursion = None
        if not self._material(ex):
            # A small lasting shift: the band starts again from here.
            self.band = Band(self.config.band_values)
            self.band.add(y)
            self.calm = 1
            self.run_min = value
            return []
        self.collapse = {**ex, "back_since": None}
        nonfinite = not math.isfinite(ex["peak"])
        what = "became non-finite" if nonfinite else f"rose to {ex['peak_value']:.4g}"
        event = make_event(
            ex["start"], step, EventKind.COLLAPSE_ONSET, series, 0.9,
            f"{series} {what} at step {ex['start']} and has not come back in {step - ex['start']} steps",
            {"test": "non_finite" if nonfinite else "excursion", "scope": TRAINING,
             "peak": f"{ex['peak_value']:.4g}",
             "level": f"{raw_scale(Role.LOSS, ref):.4g}" if math.isfinite(ref) else "nan",
             "horizon_steps": str(ex["horizon"])},
            Phase.COLLAPSE,
        )
        return [event, *timeline.open_collapse(TRAINING, ex["start"], step, 0.9, series)]

    def finish(self, series: str) -> list[Event]:
        """The run ended: an excursion back and settling is reported as a spike."""
        self.release()
        ex, last = self.excursion, self.interval.last
        if ex is None or ex["back_at"] is None or last is None:
            return []
        return self._spike(last, ex["last_y"], series)

    def _spike(self, step: int, y: float, series: str) -> list[Event]:
        ex = self.excursion
        assert ex is not None and ex["back_at"] is not None  # called once it is back
        self.excursion = None
        self.band.add(y)
        self.calm = 1
        self.run_min = min(self.run_min, raw_scale(Role.LOSS, y))
        ref = ex["ref"]
        factor = 10 ** min(ex["peak"] - ref, 300) if math.isfinite(ex["peak"]) else math.inf
        back = ex["back_at"]
        return [make_event(
            ex["start"], step, EventKind.LOSS_SPIKE, series, min(1.0, 0.5 + 0.1 * math.log10(max(factor, 1))),
            f"{series} spiked to {ex['peak_value']:.4g} ({factor:.3g}x its recent level) at step "
            f"{ex['start']} and was back after {back - ex['start']} steps",
            {"test": "excursion", "peak": f"{ex['peak_value']:.4g}", "factor": f"{factor:.4g}",
             "duration_steps": str(back - ex["start"]), "level": f"{ex['ref_value']:.4g}",
             "horizon_steps": str(ex["horizon"])},
        )]

    def _in_collapse(self, step: int, value: float, y: float, series: str,
                     timeline: Timeline) -> list[Event]:
        col = self.collapse
        assert col is not None  # called only inside a collapse
        ref = col["ref"]
        if math.isnan(ref) or not self._back(value, y, col, staying=col["back_since"] is not None):
            col["back_since"] = None
            return []
        if col["back_since"] is None:
            col["back_since"] = self._back_since(step)
        if step - col["back_since"] < col["horizon"]:
            return []
        self.collapse = None
        self.band.add(y)
        self.calm = 1
        located = col["back_since"]
        return collapse_end(
            timeline, TRAINING, col["start"], located, step, series,
            f"{series} is back near its level before the collapse of step {col['start']} "
            f"since step {located}", value, raw_scale(Role.LOSS, ref))
