"""The labeller's rules, one class each, with a per-line ``update``.

Each rule reads the values of the series that play its roles on one logged
line (``None``: the series has no value on this line; NaN: non-finite) and
returns events; phase changes go through the :class:`Timeline`. Every rule
is O(1) a line (a Mann–Kendall test over at most ``history_bins`` bins each
time the held-out loss opens a bin, which is O(log lines) times a run), keeps
bounded state and says its durations in steps (see
:mod:`detector.core.labeller.config`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from detector.core.labeller.config import LabellerConfig
from detector.core.labeller.history import Band, StepHistory
from detector.core.labeller.timeline import Timeline, make_event
from detector.core.series import raw_scale, working_scale
from detector.core.trend import mann_kendall
from detector.core.types import Event, EventKind, Phase, Role

TRAINING, GENERALISATION = "training", "generalization"


class _Plain:
    """State as plain data: ``_FIELDS`` are numbers, strings, None, lists or dicts of
    those; ``_NESTED`` are objects with ``state()`` / ``from_state()``."""

    _FIELDS: tuple[str, ...] = ()
    _NESTED: dict[str, Any] = {}  # name -> a class with from_state()

    def state(self) -> dict:
        out = {name: _copy(getattr(self, name)) for name in self._FIELDS}
        for name in self._NESTED:
            value = getattr(self, name)
            out[name] = None if value is None else value.state()
        return out

    def load(self, state: dict) -> None:
        for name in self._FIELDS:
            setattr(self, name, _copy(state[name]))
        for name, kind in self._NESTED.items():
            value = state[name]
            setattr(self, name, None if value is None else kind.from_state(value))


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


_LOWS = 64  # suffix minima kept for the stable stretch's start


class Interval(_Plain):
    """The sampling interval of one series, in steps (its last gap)."""

    _FIELDS = ("last", "gap")

    def __init__(self) -> None:
        self.last: int | None = None
        self.gap = 1

    @classmethod
    def from_state(cls, state: dict) -> Interval:
        interval = cls()
        interval.load(state)
        return interval

    def see(self, step: int) -> None:
        if self.last is not None and step > self.last:
            self.gap = step - self.last
        self.last = step


class LossExcursions(_Plain):
    """Loss spikes and training collapse on the headline training loss.

    A line is *out* when the loss is non-finite, above its band (the recent
    level, on the log scale, plus ``max(log10 spike_factor, spike_noise ×
    noise)``), or above the slow-drift bound (``collapse_factor`` × its
    running minimum and its minimum + ``collapse_margin`` × its first value).
    An excursion that is back (halfway from its peak to the level, and under
    the drift bound) before the recovery horizon is a ``LOSS_SPIKE`` located
    at its first line, with the peak, the factor over the level and the
    duration in steps; one still out at the horizon is a ``COLLAPSE_ONSET``
    (scope ``training``), ended by ``COLLAPSE_END`` once the loss is back the
    same way and stays back for the same horizon. An excursion is only over once
    it has stayed back for a quarter of the horizon without jumping up again: a
    loss that bounces between 1e-2 and 1 after a jump from 1e-6 is still out.
    O(band_values) a line.
    """

    _FIELDS = ("first", "run_min", "excursion", "collapse", "last_start")
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
        c = self.config
        horizon = c.recovery_fraction * (start - first_step)
        if memorised_steps is not None and memorised_steps > 0:
            horizon = min(horizon, c.recovery_memorisation * memorised_steps)
        return max(int(math.ceil(horizon)), c.min_intervals * self.interval.gap)

    def _back(self, value: float, y: float, ex: dict) -> bool:
        """Back in the band, or back ``back_fraction`` of the way from the peak to the
        level in loss units, counting a peak above the run's first loss as that loss
        (a loss at 0.03 after a jump from 1e-7 to 0.1 is back; one at 10^9 after 10^10
        is not)."""
        if not math.isfinite(value) or value > ex["bound"]:
            return False
        if y <= ex["ref"] + ex["thr"]:
            return True
        peak = ex["peak_value"] if math.isfinite(ex["peak_value"]) else math.inf
        top = min(peak, max(abs(self.first), ex["ref_value"]))
        return top > ex["ref_value"] and value <= ex["ref_value"] + self.config.back_fraction * (
            top - ex["ref_value"])

    def _material(self, ex: dict) -> bool:
        """An excursion costs at least ``collapse_material`` of the first loss (or is
        non-finite): a loss that creeps from 1e-7 to 1e-5 and stays is not a collapse."""
        if not math.isfinite(ex["peak_value"]):
            return True
        return ex["peak_value"] - ex["ref_value"] >= self.config.collapse_material * abs(self.first)

    def update(self, step: int, value: float, series: str, first_step: int,
               memorised_steps: int | None, timeline: Timeline) -> list[Event]:
        self.interval.see(step)
        finite = math.isfinite(value)
        y = working_scale(Role.LOSS, value) if finite else math.inf
        if finite and math.isnan(self.first):
            self.first = value
        if self.collapse is not None:
            return self._in_collapse(step, value, y, series, timeline)
        if self.excursion is not None:
            return self._in_excursion(step, value, y, series, first_step, memorised_steps, timeline)
        # Out of the band only by a jump from the line before: the decaying tail of
        # an excursion that is over, or a slow creep, is not a new spike.
        thr = self._threshold()
        out = not finite or value > self._drift_bound() or (
            self.band.ready and y > self.band.level + thr and y > self.band.values[-1] + thr)
        if out:
            ref = self.band.level if self.band.ready else (y if finite else math.nan)
            horizon = self._horizon(step, first_step, memorised_steps)
            self.last_start = step
            self.excursion = {
                "start": step, "ref": ref, "ref_value": raw_scale(Role.LOSS, ref), "thr": thr, "peak": y,
                "peak_value": value, "bound": self._drift_bound(), "last_y": y,
                "horizon": horizon, "back_at": None,
                "settle": horizon // 4,
            }
            return []
        self.band.add(y)
        self.run_min = min(self.run_min, value)
        return []

    def _in_excursion(self, step: int, value: float, y: float, series: str, first_step: int,
                      memorised_steps: int | None, timeline: Timeline) -> list[Event]:
        ex = self.excursion
        assert ex is not None  # called only inside an excursion
        jumped = not math.isfinite(value) or y > ex["last_y"] + ex["thr"]
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
            if jumped or not self._back(value, y, ex):
                ex["back_at"] = None
            elif step - ex["back_at"] >= ex["settle"]:
                return self._spike(step, y, series)
            else:
                return []
        elif not math.isnan(ref) and self._back(value, y, ex):
            ex["back_at"] = step
            if ex["settle"] <= 0:
                return self._spike(step, y, series)
            return []
        if ex["back_at"] is not None or step - ex["start"] < ex["horizon"]:
            return []
        self.excursion = None
        if not self._material(ex):
            # A small lasting shift: the band starts again from here.
            self.band = Band(self.config.band_values)
            self.band.add(y)
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
        ex, last = self.excursion, self.interval.last
        if ex is None or ex["back_at"] is None or last is None:
            return []
        return self._spike(last, ex["last_y"], series)

    def _spike(self, step: int, y: float, series: str) -> list[Event]:
        ex = self.excursion
        assert ex is not None and ex["back_at"] is not None  # called once it is back
        self.excursion = None
        self.band.add(y)
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
        if math.isnan(ref) or not self._back(value, y, col):
            col["back_since"] = None
            return []
        if col["back_since"] is None:
            col["back_since"] = step
        if step - col["back_since"] < col["horizon"]:
            return []
        self.collapse = None
        self.band.add(y)
        located = col["back_since"]
        return collapse_end(
            timeline, TRAINING, col["start"], located, step, series,
            f"{series} is back near its level before the collapse of step {col['start']} "
            f"since step {located}", value, raw_scale(Role.LOSS, ref))


def collapse_end(timeline: Timeline, scope: str, began: int, located: int, step: int, series: str,
                 message: str, value: float, level: float) -> list[Event]:
    """``COLLAPSE_END`` of the ``scope`` collapse that began at ``began``, and the
    phase change back to what the run was before (if no other collapse is open)."""
    event = make_event(
        located, step, EventKind.COLLAPSE_END, series, 0.8, message,
        {"test": "recovered", "scope": scope, "collapse_step": str(began),
         "value": f"{value:.4g}", "level": f"{level:.4g}"},
    )
    return [event, *timeline.close_collapse(scope, located, step, series)]


class GeneralisationCollapse(_Plain):
    """A held-out accuracy that falls after it has generalised, while training holds.

    Once the held-out accuracy has reached ``grokked_accuracy``, a fall below
    the highest level it has held since (median of ``band_values`` values) by
    ``max(generalisation_drop, spike_noise × noise)`` that
    lasts ``min_intervals`` of its own intervals, while the training loss holds
    (no excursion open), is a ``COLLAPSE_ONSET`` with scope ``generalization``
    located at the first low value; it ends (``COLLAPSE_END``) once the accuracy
    is back within half that drop for as long. O(band_values) a value.
    """

    _FIELDS = ("generalised", "high", "dip", "collapse")
    _NESTED = {"band": Band, "interval": Interval}

    def __init__(self, config: LabellerConfig) -> None:
        self.config = config
        self.generalised = False
        self.high = -math.inf
        self.band = Band(config.band_values)
        self.interval = Interval()
        self.dip: dict | None = None
        self.collapse: dict | None = None

    def scale(self, factor: float) -> None:
        self.band.scale(factor)
        self.high *= factor
        for open_ in (self.dip, self.collapse):
            if open_ is not None:
                open_["ref"] *= factor
                open_["thr"] *= factor

    def update(self, step: int, value: float, training_holds: bool, series: str,
               timeline: Timeline) -> list[Event]:
        if not math.isfinite(value):
            return []
        self.interval.see(step)
        c = self.config
        hold = c.min_intervals * self.interval.gap
        if self.collapse is not None:
            col = self.collapse
            if value < col["ref"] - col["thr"] / 2:
                col["back_since"] = None
                col["low"] = min(col["low"], value)
                return []
            if col["back_since"] is None:
                col["back_since"] = step
            if step - col["back_since"] < hold:
                return []
            self.collapse = None
            located = col["back_since"]
            self.band.add(value)
            self.high = -math.inf
            return collapse_end(
                timeline, GENERALISATION, col["start"], located, step, series,
                f"{series} is back to {value:.3f} (level {col['ref']:.3f} before the fall of step "
                f"{col['start']}) since step {located}", value, col["ref"])
        if self.dip is not None:
            dip = self.dip
            if value >= dip["ref"] - dip["thr"] / 2 or not training_holds:
                self.dip = None  # back in time, or training fell too: not this rule's collapse
                if training_holds:
                    self.band.add(value)
                return []
            dip["low"] = min(dip["low"], value)
            if step - dip["start"] < hold:
                return []
            self.dip = None
            self.collapse = {**dip, "back_since": None}
            event = make_event(
                dip["start"], step, EventKind.COLLAPSE_ONSET, series, 0.8,
                f"{series} fell from {dip['ref']:.3f} to {dip['low']:.3f} from step {dip['start']} "
                "while training holds: generalisation collapse",
                {"test": "held_out_fall", "scope": GENERALISATION, "level": f"{dip['ref']:.4g}",
                 "value": f"{dip['low']:.4g}", "drop": f"{dip['thr']:.4g}"},
                Phase.COLLAPSE,
            )
            return [event, *timeline.open_collapse(GENERALISATION, dip["start"], step, 0.8, series)]
        thr = max(c.generalisation_drop, c.spike_noise * self.band.noise)
        if self.generalised and self.band.ready and training_holds and value < self.high - thr:
            self.dip = {"start": step, "ref": self.high, "thr": thr, "low": value}
            return []
        if training_holds:
            self.band.add(value)
            if self.generalised and self.band.ready:
                # The highest level since it generalised: a slow slide counts too.
                self.high = max(self.high, self.band.level)
        if value >= c.grokked_accuracy:
            self.generalised = True
        return []


class Generalisation(_Plain):
    """Memorisation, onset of generalisation, grokking, hidden progress and stabilisation.

    * memorised: training accuracy ≥ ``fitted_accuracy`` (with its loss, if
      logged, below half its first value: a percent accuracy's first line is not
      a fit), or without accuracy the loss below ``fitted_loss_fraction`` of its
      first value;
    * onset: held-out accuracy ``onset_rise`` above its early level (median of
      its first three values, or of the three before memorisation if lower) for
      ``min_intervals`` of its intervals; abstraction starts at its first line;
    * ``GROKKING_ONSET``: the held-out accuracy reaches ``grokked_accuracy`` at
      least max(``grokking_min_delay_steps``, the steps memorisation took) after
      memorisation (the labels' definition), located at the onset, with
      ``GROKKING_COMPLETE`` at that line;
    * ``HIDDEN_PROGRESS``: after memorisation, once as long as grokking's delay
      (max(``grokking_min_delay_steps``, the steps memorisation took)), and before
      onset, the held-out loss's step history (:class:`StepHistory`, reset at memorisation) falls
      ``progress_min_change`` decades from its peak with a Mann–Kendall trend,
      while the held-out accuracy is flat;
    * stabilisation: after onset, the held-out accuracy stays within
      ``stable_tolerance`` of its best, which rises no more than that, for
      ``stable_fraction`` of the steps since onset (before it reaches
      ``grokked_accuracy``: as many steps as it took from the onset, and a
      quarter of the run so far); a later
      rise of twice the tolerance is abstraction again.
    """

    _FIELDS = ("memorised_at", "val_first", "val_recent", "val_base", "above_since", "onset_at",
               "complete_at", "best", "stable_since", "stable_best",
               "hidden_progress_at", "val_noise", "val_window", "curv_near", "curv_wide", "lows",
               "lows_floor")
    _NESTED = {"val_interval": Interval, "progress": StepHistory}

    def __init__(self, config: LabellerConfig) -> None:
        self.config = config
        self.memorised_at: int | None = None
        self.val_first: list[float] = []
        self.val_recent: list[float] = []
        self.val_base: float | None = None
        self.above_since: int | None = None
        self.onset_at: int | None = None
        self.complete_at: int | None = None
        self.best = -math.inf
        self.stable_since: int | None = None
        self.stable_best = -math.inf
        self.hidden_progress_at: int | None = None
        self.val_noise = 0.0  # typical change between held-out values from noise alone
        # The last seven values and EW means of squared third differences over one
        # and over two logging intervals: noise adds the same to both, a curve's
        # change of bend 64 times as much to the wider one (cadence-free noise).
        self.val_window: list[float] = []
        self.lows: list[list] = []  # suffix minima since onset: [step, value, next step]
        self.lows_floor: int | None = None
        self.curv_near = 0.0
        self.curv_wide = 0.0
        self.val_interval = Interval()
        self.progress: StepHistory | None = None

    def scale(self, factor: float) -> None:
        self.val_first = [v * factor for v in self.val_first]
        self.val_recent = [v * factor for v in self.val_recent]
        if self.val_base is not None:
            self.val_base *= factor
        self.best *= factor
        self.stable_best *= factor
        self.lows = [[a, v * factor, b] for a, v, b in self.lows]
        self.val_noise *= factor
        self.val_window = [v * factor for v in self.val_window]
        self.curv_near *= factor * factor
        self.curv_wide *= factor * factor

    def memorisation(self, step: int, train_acc: float | None, train_loss: float | None,
                     first_loss: float) -> None:
        if self.memorised_at is not None:
            return
        c = self.config
        if train_acc is not None:
            loss_ok = (train_loss is None or not math.isfinite(train_loss) or math.isnan(first_loss)
                       or train_loss <= 0.5 * first_loss)
            fitted = math.isfinite(train_acc) and train_acc >= c.fitted_accuracy and loss_ok
        else:
            fitted = (train_loss is not None and math.isfinite(train_loss) and math.isfinite(first_loss)
                      and train_loss <= c.fitted_loss_fraction * first_loss)
        if fitted:
            self.memorised_at = step
            self.progress = StepHistory(c.history_bins)
            if self.val_recent:
                base = _median(self.val_recent)
                self.val_base = base if self.val_base is None else min(self.val_base, base)

    def update(self, step: int, val_acc: float | None, val_loss: float | None, first_step: int,
               series: str, loss_series: str | None, timeline: Timeline) -> list[Event]:
        events: list[Event] = []
        if (val_loss is not None and math.isfinite(val_loss) and self.progress is not None
                and self.onset_at is None and self.hidden_progress_at is None):
            events += self._hidden_progress(step, val_loss, first_step, loss_series)
        if val_acc is None or not math.isfinite(val_acc):
            return events
        c = self.config
        self.val_interval.see(step)
        if len(self.val_first) < 3 and self.memorised_at is None:
            # The first value is the untrained model's level whatever the cadence; the
            # median of the first three, where lower, guards against a lucky first one.
            # (Three lines of a sparse log may already be well into learning.)
            self.val_first.append(val_acc)
            first = self.val_first[0]
            self.val_base = min(first, _median(self.val_first)) if len(self.val_first) == 3 else \
                first if self.val_base is None else min(self.val_base, first)
        self.val_recent = [*self.val_recent[-2:], val_acc]
        self.val_window = [*self.val_window[-6:], val_acc]
        if len(self.val_window) == 7:
            # Third differences ignore a steady rise and a steady bend. Over one
            # interval g they hold 20 σ² of noise plus (f''' g³)² of the curve's change
            # of bend; over 2 g the same noise and 64 times that: (64 near - wide) /
            # 1260 is σ² alone, whatever the logging cadence. (Second differences read
            # the S-curve of a rise logged every 10 steps as noise, 0.010 against 0.002
            # logged every step, and called a falling accuracy stable.)
            v0, _, v2, v3, v4, v5, v6 = self.val_window
            near, wide = v6 - 3 * v5 + 3 * v4 - v3, v6 - 3 * v4 + 3 * v2 - v0
            if math.isfinite(near * near + wide * wide):  # absurd values must not poison the sums
                self.curv_near += (near * near - self.curv_near) / 10
                self.curv_wide += (wide * wide - self.curv_wide) / 10
                self.val_noise = math.sqrt(max(0.0, 64 * self.curv_near - self.curv_wide) / 1260)
        if self.onset_at is None:
            if self.val_base is not None and val_acc >= self.val_base + c.onset_rise:
                if self.above_since is None:
                    self.above_since = step
                if step - self.above_since >= c.min_intervals * self.val_interval.gap:
                    self.onset_at = self.above_since
                    events += timeline.enter(Phase.ABSTRACTION, self.onset_at, step, 0.8, series)
            else:
                self.above_since = None
            if self.onset_at is None:
                return events
        if self.complete_at is None and val_acc >= c.grokked_accuracy:
            events += self._grokked(step, val_acc, first_step, series)
        events += self._stability(step, val_acc, first_step, series, timeline)
        return events

    def _grokked(self, step: int, value: float, first_step: int, series: str) -> list[Event]:
        c = self.config
        self.complete_at = step
        if self.memorised_at is None:
            return []
        took = self.memorised_at - first_step
        waited = step - self.memorised_at
        if waited < max(c.grokking_min_delay_steps, took):
            return []
        located = self.onset_at if self.onset_at is not None else step
        evidence = {"baseline": f"{self.val_base:.4g}", "value": f"{value:.4g}",
                    "memorised_at_step": str(self.memorised_at), "grokked_at_step": str(step),
                    "delay_steps": str(waited), "memorisation_steps": str(took)}
        return [
            make_event(located, step, EventKind.GROKKING_ONSET, series, 0.9,
                       f"grokking: {series} began rising at step {located} and reached {value:.3f} "
                       f"{waited} steps after memorisation (which took {took})",
                       {"test": "delayed_generalisation", **evidence}, Phase.ABSTRACTION),
            make_event(step, step, EventKind.GROKKING_COMPLETE, series, 0.9,
                       f"{series} reached {value:.3f}: grokking complete",
                       {"test": "threshold", **evidence}),
        ]

    def _stability(self, step: int, value: float, first_step: int, series: str,
                   timeline: Timeline) -> list[Event]:
        c = self.config
        # Within the tolerance of its best, or of the series' own noise where a small
        # test set makes it larger (the extremes of a long noisy stretch lie 5-6 sd apart).
        tol = max(c.stable_tolerance, 5 * self.val_noise)
        self._remember_low(step, value)  # raw: a median of lines lags by a line, in steps by the cadence
        self.best = max(self.best, _median(self.val_recent))  # the best of raw noisy values would creep up
        if timeline.phase is Phase.STABILIZATION:
            if self.best > self.stable_best + 2 * tol:
                self.stable_best = self.best
                return timeline.enter(Phase.ABSTRACTION, step, step, 0.6, series)
            return []
        # The stable stretch starts after the last value more than ``tol`` below the
        # best so far (the labels' rule, read online): where it starts does not
        # depend on when the best last crept up, nor on the logging cadence.
        since = self._stable_since(self.best - tol)
        if since is None:
            return []
        # Relative to how long generalising took: a quarter of the time since the
        # onset once it has generalised; before, as long as the run took to get
        # there (an onset read off a sparse log, or a rise that starts at once, is
        # located late: the time since the onset would be too short a yardstick).
        if self.best >= c.grokked_accuracy and self.onset_at is not None:
            span = c.stable_fraction * (since - self.onset_at)
        else:
            span = 4 * c.stable_fraction * (since - first_step)
        needed = max(c.min_intervals * self.val_interval.gap, span)
        if step - since >= needed:
            self.stable_since, self.stable_best = since, self.best
            return timeline.enter(Phase.STABILIZATION, since, step, 0.8, series)
        return []

    def _remember_low(self, step: int, value: float) -> None:
        """Keep the suffix minima of the values since onset: entries [step, value,
        next step] with values rising from the bottom, at most ``_LOWS`` (the
        oldest, lowest dropped, their next step kept as a floor). O(1) amortised."""
        lows = self.lows
        if lows:
            lows[-1][2] = step
        while lows and lows[-1][1] >= value:
            lows.pop()
        lows.append([step, value, None])
        if len(lows) > _LOWS:
            self.lows_floor = lows.pop(0)[2]

    def _stable_since(self, threshold: float) -> int | None:
        """The first step from which every value is at least ``threshold``; None if the
        newest is below it. O(entries)."""
        for _, entry_value, next_step in reversed(self.lows):
            if entry_value < threshold:
                return next_step
        return self.lows_floor if self.lows_floor is not None else self.lows[0][0]

    def _hidden_progress(self, step: int, val_loss: float, first_step: int,
                         series: str | None) -> list[Event]:
        c = self.config
        assert self.progress is not None and self.memorised_at is not None  # set at memorisation
        if not self.progress.add(step, working_scale(Role.LOSS, val_loss)):
            return []
        # A warning of grokking, not of ordinary generalisation: only once a rise
        # now could still be grokking's (the labels' delay has passed).
        took = self.memorised_at - first_step
        if step - self.memorised_at < max(c.grokking_min_delay_steps, took):
            return []
        means = self.progress.means()  # the newest bin may be partial: it is one value at least
        if len(means) < c.progress_min_bins:
            return []
        peak = int(means.argmax())
        tail = means[peak:]
        change = float(tail[-1] - tail[0])
        if len(tail) < c.progress_min_bins or change > -c.progress_min_change:
            return []
        # A fall that has lasted a small share of the time since memorisation is the
        # down-stroke of an oscillation (a loss that climbs for long and drops back),
        # not the slow progress that precedes grokking.
        if step - self.progress.starts[peak] < c.progress_min_share * (step - self.memorised_at):
            return []
        # Still making progress: the newest bin is the tail's lowest, clearly below
        # everything before the tail's last quarter (a loss that oscillates back
        # to an old low is not progress).
        quarter = max(1, len(tail) // 4)
        if tail[-1] > tail.min() or float(tail[:-quarter].min() - tail[-1]) < c.progress_min_change / 4:
            return []
        trend = mann_kendall(tail)
        if trend.statistic >= 0 or trend.p_value >= c.progress_p_value:
            return []
        if self.val_base is not None and self.val_recent and \
                self.val_recent[-1] >= self.val_base + c.onset_rise / 2:
            return []
        self.hidden_progress_at = step
        return [make_event(
            step, step, EventKind.HIDDEN_PROGRESS, series or "", min(1.0, 1 - trend.p_value),
            f"{series} has fallen {-change:.2f} decades since step {self.progress.starts[peak]} while "
            "held-out accuracy is flat: a transition may be coming",
            {"test": trend.test, "tau": f"{trend.statistic:.4g}", "p_value": f"{trend.p_value:.3g}",
             "change_decades": f"{change:.4g}", "since_step": str(self.progress.starts[peak]),
             "bins": str(len(tail))},
        )]


class LossOnlyPhases(_Plain):
    """Phases of a run without held-out accuracy, from its headline loss.

    Abstraction once the loss's step-history mean is ``settle_change`` × 5
    decades below its first bin (it is learning); stabilisation once it fell
    less than ``settle_change`` decades over the last ``settle_fraction`` of
    the steps run (estimated from the medians of the look-back's two halves);
    abstraction again when it falls three times that, all decided when a step
    bin opens. Located where found, never moved. O(1) amortised a line.
    """

    _FIELDS = ("first_mean",)
    _NESTED = {"history": StepHistory, "interval": Interval}

    def __init__(self, config: LabellerConfig) -> None:
        self.config = config
        self.history = StepHistory(config.history_bins)
        self.interval = Interval()
        self.first_mean = math.nan

    def update(self, step: int, loss: float, first_step: int, series: str,
               timeline: Timeline, disturbed_at: int | None = None) -> list[Event]:
        """``disturbed_at``: where the last loss excursion began; a look-back that
        holds it compares a setback with its recovery, so it decides nothing."""
        if not math.isfinite(loss):
            return []
        c = self.config
        self.interval.see(step)
        # Decided when a bin opens (O(history_bins), O(log lines) times a run):
        # bins span equal steps, so that is cadence-free too.
        if not self.history.add(step, working_scale(Role.LOSS, loss)) or len(self.history) < 2:
            return []
        if math.isnan(self.first_mean):
            self.first_mean = self.history.sums[0] / self.history.counts[0]
        now = self.history.sums[-1] / self.history.counts[-1]
        phase = timeline.phase
        if phase is Phase.INSTABILITY:
            if now <= self.first_mean - 5 * c.settle_change:
                return timeline.enter(Phase.ABSTRACTION, step, step, 0.6, series)
            return []
        look_back = c.settle_fraction * (step - first_step)
        if look_back < 2 * c.min_intervals * self.interval.gap:
            return []
        if disturbed_at is not None and disturbed_at >= step - look_back:
            return []
        # The fall over the look-back, from the medians of its two halves' bins
        # (many bins each, so neither noise nor a spike flips the phase): twice
        # their difference.
        starts = np.asarray(self.history.starts)
        means = self.history.means()
        older = (starts >= step - look_back) & (starts < step - look_back / 2)
        newer = starts >= step - look_back / 2
        if older.sum() < 2 or newer.sum() < 2:
            return []
        fall = 2 * float(np.median(means[older]) - np.median(means[newer]))
        # Settled: it has stopped falling and its newest half is flat too (a
        # setback and its recovery, below the spike threshold, is not settling).
        newest = means[newer]
        if (phase is Phase.ABSTRACTION and fall < c.settle_change
                and float(newest.max() - newest.min()) <= 2 * c.settle_change):
            return timeline.enter(Phase.STABILIZATION, step, step, 0.6, series)
        if phase is Phase.STABILIZATION and fall > 3 * c.settle_change:
            return timeline.enter(Phase.ABSTRACTION, step, step, 0.6, series)
        return []


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
