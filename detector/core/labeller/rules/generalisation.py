"""Generalisation: memorisation, onset, grokking, hidden progress, stabilisation, and its collapse."""

from __future__ import annotations

import math

import numpy as np

from detector.core.labeller import _kernels as _k
from detector.core.labeller.config import LabellerConfig
from detector.core.labeller.history import Band, StepHistory, halves, median
from detector.core.labeller.rules._common import (
    GENERALISATION,
    Interval,
    Quiet,
    _Plain,
    collapse_end,
)
from detector.core.labeller.timeline import Timeline, make_event
from detector.core.series import working_scale
from detector.core.trend import TrendResult, mann_kendall
from detector.core.types import Event, EventKind, Phase, Role

_LOWS = _k.LOWS  # suffix minima kept for the stable stretch's start
_SQRT_PI = math.sqrt(math.pi)  # E[max(0, -(e2 - e1))] = σ / √π for white noise e of sd σ
# memorisation_quiet's history arrays where none is kept (never read by the kernel).
_NO_HISTORY = (np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros(1, dtype=np.int64), 0, 0)


def _push_suffix(entries: list[list], step: int, value: float, lowest: bool) -> int | None:
    """Push a line onto a suffix stack of minima (``lowest``) or maxima: the entries
    it supersedes go; returns the next step of the oldest entry when the stack
    outgrew ``_LOWS`` and dropped it, else None. O(1) amortised."""
    if entries:
        entries[-1][2] = step
    while entries and (entries[-1][1] >= value if lowest else entries[-1][1] <= value):
        entries.pop()
    entries.append([step, value, None])
    return entries.pop(0)[2] if len(entries) > _LOWS else None


def _stack_arrays(entries: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A suffix stack ([step, value, next step] entries) as the compiled loop's arrays."""
    count = len(entries)
    steps = np.zeros(_LOWS + 1, dtype=np.int64)
    values = np.zeros(_LOWS + 1)
    following = np.full(_LOWS + 1, -1, dtype=np.int64)
    if count:
        steps[:count] = [entry[0] for entry in entries]
        values[:count] = [entry[1] for entry in entries]
        following[:count - 1] = [entry[2] for entry in entries[:-1]]
    return steps, values, following


def _stack_list(steps: np.ndarray, values: np.ndarray, following: np.ndarray, count: int) -> list[list]:
    """:func:`_stack_arrays` back: the newest entry's next step is None."""
    entries = [[s, v, n] for s, v, n in zip(
        steps[:count].tolist(), values[:count].tolist(), following[:count].tolist(), strict=True)]
    if count:
        entries[-1][2] = None
    return entries


def _int(value: int | None) -> int:
    return 0 if value is None else value


def _float(value: float | None) -> float:
    return 0.0 if value is None else float(value)


class GeneralisationCollapse(_Plain):
    """A held-out accuracy that falls after it has generalised, while training holds.

    Once the held-out accuracy has reached ``grokked_accuracy``, a fall below
    the highest level it has held since (median of its last ``band_values``
    values, counting only those since it reached it: a sparse log's band would
    otherwise still hold the rise) by
    ``max(generalisation_drop, spike_noise × noise)`` (noise measured since it
    reached it, once two differences are in) that
    lasts ``min_intervals`` of its own intervals, while the training loss holds
    (no excursion open), is a ``COLLAPSE_ONSET`` with scope ``generalization``
    located at the first low value; it ends (``COLLAPSE_END``) once the accuracy
    is back within half that drop for as long. O(band_values) a value.
    """

    _FIELDS = ("generalised", "high", "fresh", "dip", "collapse")
    _NESTED = {"band": Band, "interval": Interval}

    def __init__(self, config: LabellerConfig) -> None:
        self.config = config
        self.generalised = False
        self.high = -math.inf
        self.fresh = 0  # band values since it generalised (at most the band's size)
        self.band = Band(config.band_values)
        self.interval = Interval()
        self.dip: dict | None = None
        self.collapse: dict | None = None

    def load(self, state: dict) -> None:
        if "fresh" not in state:  # a checkpoint from before it was kept: the whole band, as read then
            state = {**state, "fresh": state["band"]["size"] if state["generalised"] else 0}
        super().load(state)

    @property
    def quiet(self) -> bool:
        """No dip or collapse open."""
        return self.dip is None and self.collapse is None

    def scale(self, factor: float) -> None:
        self.release()
        self.band.scale(factor)
        self.high *= factor
        for open_ in (self.dip, self.collapse):
            if open_ is not None:
                open_["ref"] *= factor
                open_["thr"] *= factor

    def update(self, step: int, value: float, training_holds: bool, series: str,
               timeline: Timeline) -> list[Event]:
        if self._quiet is not None:
            self.release()
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
            self._add(value)
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
                    self._add(value)
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
        # Noise measured since it generalised (two differences at least, else the drop
        # alone): on a sparse log the band's earlier steps are the rise's, not noise.
        noise = self.band.noise if self.band.diffs >= 2 else 0.0
        thr = max(c.generalisation_drop, c.spike_noise * noise)
        if self.generalised and self.band.ready and training_holds and value < self.high - thr:
            self.dip = {"start": step, "ref": self.high, "thr": thr, "low": value}
            return []
        if training_holds:
            self._add(value)
            if self.generalised and self.band.ready:
                # The highest level since it generalised: a slow slide counts too.
                self.high = max(self.high, self.band.level_of_last(self.fresh))
        if value >= c.grokked_accuracy and not self.generalised:
            self.generalised = True
            self.fresh = 1 if training_holds else 0  # the value that reached it, if the band took it
            self.band.restart_noise()
        return []

    def _add(self, value: float) -> None:
        self.band.add(value)
        if self.generalised:
            self.fresh = min(self.fresh + 1, self.band.size)

    def quiet_run(self, steps: np.ndarray, values: np.ndarray, present: np.ndarray, holds: np.ndarray,
                  start: int, stop: int, commit: bool = True) -> int:
        """:meth:`update` on lines ``start:stop`` while no collapse opens or ends:
        with none open, each value that falls below the highest level by the drop
        once it has generalised opens a dip (reaching ``grokked_accuracy`` on the
        way is only state), and a dip goes on, or ends back in time or with
        training falling too, until it has lasted ``min_intervals`` intervals (a
        collapse); with a collapse open, while it does not end. Stops before the
        first line that would open or end a collapse; returns the lines taken
        (``commit=False``: only counts them).

        ``values``: the held-out accuracy as a fraction on every line, ``present``
        where logged, ``holds[i - start]`` whether training holds on line i.
        O(lines × band_values); the state stays the band's, the dip's and the collapse's.
        """
        if stop <= start:
            return 0
        quiet = self._quiet if self._quiet is not None else self._make_quiet()
        if self.collapse is not None:
            return quiet.run((steps, values, present), start, stop, commit)
        return quiet.run((steps, values, present, holds), start, stop, commit)

    def _make_quiet(self) -> Quiet:
        """The compiled loop's state (:class:`Quiet`): no dip or collapse open, or a
        collapse open."""
        c = self.config
        seen, last, gap = self.interval.packed()
        col = self.collapse
        if col is not None:
            back = col["back_since"]
            quiet = Quiet(
                _k.generalisation_collapse_open_quiet, (),
                (float(col["low"]), back is not None, 0 if back is None else back, seen, last, gap),
                (float(col["ref"]), float(col["thr"]), c.min_intervals), self._unpack_collapse)
        else:
            band, n = self.band.buffer()
            dip = self.dip
            dipped = (False, False, 0, 0.0, 0.0, 0.0) if dip is None else (
                True, False, dip["start"], float(dip["ref"]), float(dip["thr"]), float(dip["low"]))
            quiet = Quiet(
                _k.generalisation_collapse_quiet, (band,),
                (self.generalised, float(self.high), self.fresh, n, float(self.band.first_noise),
                 float(self.band.second_noise), self.band.diffs, seen, last, gap, *dipped),
                (self.band.size, float(c.generalisation_drop), float(c.spike_noise),
                 float(c.grokked_accuracy), c.min_intervals),
                self._unpack_quiet)
        self._quiet = quiet
        return quiet

    def _unpack_quiet(self, arrays: tuple, state: tuple) -> None:
        (self.generalised, self.high, self.fresh, n, first_noise, second_noise, diffs, seen, last, gap,
         has_dip, dip_new, dip_start, dip_ref, dip_thr, dip_low) = state
        self.band.take(arrays[0], n, first_noise, second_noise, diffs)
        self.interval.unpack(seen, last, gap)
        old = self.dip
        if not has_dip:
            self.dip = None
        elif not dip_new:  # the dip the rule held: its level and drop as they were
            assert old is not None  # the loop started with it
            self.dip = {"start": old["start"], "ref": old["ref"], "thr": old["thr"], "low": dip_low}
        else:
            # max(drop, noise) as update() takes it: the setting itself where it is not below
            drop = self.config.generalisation_drop
            self.dip = {"start": int(dip_start), "ref": dip_ref, "thr": drop if dip_thr == drop else dip_thr,
                        "low": dip_low}

    def _unpack_collapse(self, arrays: tuple, state: tuple) -> None:
        low, has_back, back, seen, last, gap = state
        col = self.collapse
        assert col is not None  # the loop ran with one open
        col["low"], col["back_since"] = low, (int(back) if has_back else None)
        self.interval.unpack(seen, last, gap)


class Generalisation(_Plain):
    """Memorisation, onset of generalisation, grokking, hidden progress and stabilisation.

    * memorised: training accuracy ≥ ``fitted_accuracy`` (with its loss, if
      logged, below half its first value: a percent accuracy's first line is not
      a fit), or without accuracy the loss below ``fitted_loss_fraction`` of its
      first value;
    * onset: held-out accuracy ``onset_rise`` (or ``onset_headroom`` of the way to 1,
      where less: a pre-trained model starts high) above its early level (median of
      its first three values, or of the three before memorisation if lower; or
      the lowest median of three consecutive values before the onset: a model
      that memorises drives it below chance) for
      ``min_intervals`` of its intervals; abstraction starts at its first line;
      from an early level already at ``grokked_accuracy`` (a run logged from a
      trained model), holding it within ``stable_tolerance`` is the onset, and
      generalisation is complete there (never grokking: the labels' delay runs
      to the first line at ``grokked_accuracy``, here the first line);
    * ``GROKKING_ONSET``: the held-out accuracy reaches ``grokked_accuracy`` at
      least max(``grokking_min_delay_steps``, the steps memorisation took) after
      memorisation (the labels' definition), located at the onset, with
      ``GROKKING_COMPLETE`` at that line;
    * ``HIDDEN_PROGRESS``: after memorisation, once as long as grokking's delay
      (max(``grokking_min_delay_steps``, the steps memorisation took)), and before
      onset, the held-out loss's step history (:class:`StepHistory`, reset at memorisation) falls
      ``progress_min_change`` decades from its peak with a Mann–Kendall trend,
      while the held-out accuracy is still short of the onset (``onset_rise``
      above its early level: a creep that has covered half of that is still the
      hidden regime, not yet the rise); or, the same test on the held-out
      accuracy's own history (in decades: -log10), its newest bin above the
      untrained model's level (its first value): a model that memorised drives
      held-out accuracy below chance and often climbs back past it, a few
      times chance, while its held-out loss still rises (real grokking runs);
      its drift back towards chance is not progress;
    * stabilisation: after onset (the stretch may start at the onset's first
      line, however many lines confirmed it), the held-out accuracy stays within
      a tolerance of the best level (three-value median) it holds in the
      stretch (``stable_tolerance``; or five of its noise's standard deviations;
      or one and a half of its resolution, the smallest change between two of
      its values, up to twice ``stable_tolerance``): a level that settles a
      little below an earlier peak is stable; the stretch starts halfway between
      the last line that breaks it and the next line (the next step on a dense
      log), and lasts
      ``stable_fraction`` of the steps since onset (before it reaches
      ``grokked_accuracy``: as long as the run took to get there, and not before
      the training metric has fitted, for as long as that took; a training
      accuracy that never fits counts as fitted where it levelled off: over the
      last ``settle_fraction`` of the run, at least ``grokking_min_delay_steps``,
      its step history surely rose less than ``stable_tolerance``); a later
      rise of twice the tolerance is abstraction again. The held-out accuracy's
      noise is measured on lines without an open loss excursion (a spike drags
      it down for a line or two: not noise).
    """

    _FIELDS = ("memorised_at", "val_first", "val_recent", "val_base", "val_low", "above_since", "onset_at",
               "complete_at", "best", "stable_since", "stable_best",
               "hidden_progress_at", "val_noise", "val_step", "val_fall", "val_window", "curv_near",
               "curv_wide", "lows", "lows_floor", "highs", "highs_floor", "train_level_at", "train_by_loss")
    _NESTED = {"val_interval": Interval, "progress": StepHistory, "acc_progress": StepHistory,
               "train_history": StepHistory}

    def __init__(self, config: LabellerConfig) -> None:
        self.config = config
        self.memorised_at: int | None = None
        self.val_first: list[float] = []
        self.val_recent: list[float] = []
        self.val_base: float | None = None
        self.val_low: float | None = None  # the early level the onset is measured from
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
        # The smallest change between two held-out values: one example of a small
        # test set (1/96 = 0.0104 is more than the tolerance). 0: none seen yet.
        self.val_step = 0.0
        # EW mean of the falls between consecutive values (rises count 0): on a level
        # stretch √π times it is the noise's sd, on a rise it is near 0 however the
        # rise bends between sparse lines (third differences read that as noise).
        self.val_fall = 0.0
        self.lows: list[list] = []  # suffix minima since onset: [step, value, next step]
        self.lows_floor: int | None = None
        # Suffix maxima of the three-value medians since onset, as ``lows``: the stable
        # stretch is where the level stays within the tolerance of its own best.
        self.highs: list[list] = []
        self.highs_floor: int | None = None
        self.curv_near = 0.0
        self.curv_wide = 0.0
        self.val_interval = Interval()
        self.progress: StepHistory | None = None
        # The held-out accuracy's step history in decades below 1 (-log10): a model
        # on its way to grokking often lifts it from below chance to a few times
        # chance while its loss still rises (confident wrong answers).
        self.acc_progress: StepHistory | None = None
        self.level_step = 0  # the step the newest three-line median stands for (set each line)
        # Before memorisation, the training metric's step history (its accuracy
        # negated, so that its rises are the history's falls, or without one its
        # loss's working scale) and where it had levelled off (the start of a
        # look-back over which it surely improved less than the bound; None while it
        # has not): a training metric that never fits (label noise, a large data set)
        # has fitted as far as it will.
        self.train_history = StepHistory(config.history_bins)
        self.train_level_at: int | None = None
        # What it holds: the training loss (working scale) where the run logs no
        # training accuracy; None until it holds anything.
        self.train_by_loss: bool | None = None

    def load(self, state: dict) -> None:
        if "val_step" not in state:  # a checkpoint from before it was kept
            state = {**state, "val_step": 0.0}
        if "highs" not in state:  # from before they were kept: the stretch starts anew
            state = {**state, "highs": [], "highs_floor": None}
        if "train_history" not in state:  # from before it was kept: it starts now
            state = {**state, "train_history": StepHistory(self.config.history_bins).state(),
                     "train_level_at": None, "train_by_loss": None}
        if "train_by_loss" not in state:  # kept before the loss could fill it: an accuracy's
            state = {**state, "train_by_loss": False if state["train_history"]["starts"] else None}
        if "val_low" not in state:  # from before it was kept: the early level as it was
            state = {**state, "val_low": state["val_base"]}
        if "val_fall" not in state:  # from before it was kept: as if it had measured the same noise
            state = {**state, "val_fall": state["val_noise"] / _SQRT_PI}
        if "acc_progress" not in state:  # from before it was kept: starts now
            fresh = StepHistory(self.config.history_bins) if state.get("progress") is not None else None
            state = {**state, "acc_progress": None if fresh is None else fresh.state()}
        super().load(state)

    def _early_level(self) -> float | None:
        """The level the onset is measured from: the lowest of the early level and
        the lowest three-value median before the onset (``val_low``)."""
        if self.val_base is None:
            return self.val_low
        return self.val_base if self.val_low is None else min(self.val_low, self.val_base)

    @property
    def progressing(self) -> bool:
        """Hidden progress is looked for: memorised, no onset and none found yet."""
        return self.progress is not None and self.onset_at is None and self.hidden_progress_at is None

    def scale(self, factor: float) -> None:
        self.release()
        self.val_first = [v * factor for v in self.val_first]
        if not self.train_by_loss:
            self.train_history.sums = [total * factor for total in self.train_history.sums]
        if self.acc_progress is not None and factor > 0:
            shift = -math.log10(factor)  # its values are -log10 of the accuracy
            self.acc_progress.sums = [total + shift * count for total, count in
                                      zip(self.acc_progress.sums, self.acc_progress.counts, strict=True)]
        self.val_recent = [v * factor for v in self.val_recent]
        if self.val_base is not None:
            self.val_base *= factor
        if self.val_low is not None:
            self.val_low *= factor
        self.best *= factor
        self.stable_best *= factor
        self.lows = [[a, v * factor, b] for a, v, b in self.lows]
        self.highs = [[a, v * factor, b] for a, v, b in self.highs]
        self.val_noise *= factor
        self.val_window = [v * factor for v in self.val_window]
        self.val_step *= factor
        self.val_fall *= factor
        self.curv_near *= factor * factor
        self.curv_wide *= factor * factor

    def memorisation(self, step: int, train_acc: float | None, train_loss: float | None,
                     first_loss: float, first_step: int = 0, by_loss: bool = False,
                     levels: bool = True) -> None:
        """One line's training metrics. ``by_loss``: the run logs no training
        accuracy, so the training loss tells where it levelled off; ``levels``
        False: nobody asks (no held-out accuracy, no stable stretch)."""
        if self.memorised_at is not None:
            return
        if self._quiet is not None:
            self.release()
        c = self.config
        value = None
        if by_loss:
            if train_loss is not None and math.isfinite(train_loss):
                value = working_scale(Role.LOSS, train_loss)
        elif train_acc is not None and math.isfinite(train_acc):
            value = -train_acc  # its rises are the history's falls, as a loss's
        if value is not None and levels:
            if self.train_by_loss is not by_loss:
                if self.train_by_loss is not None:  # a training accuracy appeared: start again on it
                    self.train_history, self.train_level_at = StepHistory(c.history_bins), None
                self.train_by_loss = by_loss
            if self.train_history.add(step, value):
                self.train_level_at = self._levelled(step, first_step)
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
            self.acc_progress = StepHistory(c.history_bins)
            if self.val_recent:
                base = median(self.val_recent)
                self.val_base = base if self.val_base is None else min(self.val_base, base)

    def memorisation_quiet(self, steps: np.ndarray, train_acc: np.ndarray, acc_present: np.ndarray,
                           train_loss: np.ndarray, loss_present: np.ndarray, first_loss: float, start: int,
                           stop: int, by_loss: bool = False, loss_ws: np.ndarray | None = None,
                           first_step: int = 0, levels: bool = True) -> int:
        """How many of lines ``start:stop`` :meth:`memorisation` takes without a change
        but to the training metric's history (:meth:`memorisation_take`): all once
        memorised, else those before the first line that fits or opens a bin of
        the history where :meth:`_levelled` tests it (the accuracy as a fraction,
        ``first_loss`` the headline loss's first value, the same on all of them;
        ``loss_ws`` the training loss's working scale, NaN where absent or not
        finite, read with ``by_loss``). Changes nothing. O(lines)."""
        if self.memorised_at is not None:
            return stop - start
        if levels and self.train_by_loss is not None and self.train_by_loss is not by_loss:
            return 0  # its history starts again on the per-line path
        c = self.config
        # Without levels no history is read: the kernel gets empty arrays.
        starts, sums, counts, n, width = self._history_arrays() if levels else _NO_HISTORY
        return _k.memorisation_quiet(train_acc, acc_present, train_loss, loss_present, start, stop,
                                     float(first_loss), float(c.fitted_accuracy),
                                     float(c.fitted_loss_fraction), steps, by_loss,
                                     train_loss if loss_ws is None else loss_ws, first_step,
                                     float(c.settle_fraction), float(c.grokking_min_delay_steps),
                                     starts, sums, counts, n, width, c.history_bins, levels)

    def memorisation_take(self, steps: np.ndarray, train_acc: np.ndarray, acc_present: np.ndarray,
                          start: int, stop: int, by_loss: bool = False,
                          loss_ws: np.ndarray | None = None, levels: bool = True) -> None:
        """Lines ``start:stop`` that :meth:`memorisation_quiet` took: their training
        metric's values (``by_loss``: ``loss_ws``, where not NaN) into the history,
        one at a time as :meth:`memorisation` adds them (no bin they open is one
        :meth:`_levelled` would test). O(lines)."""
        if self.memorised_at is not None or stop <= start or not levels:
            return
        if by_loss and self.train_by_loss is None:
            assert loss_ws is not None  # read by loss
            if np.isnan(loss_ws[start:stop]).all():
                return
            self.train_by_loss = True
        elif not by_loss and self.train_by_loss is None:
            if not (acc_present[start:stop] & np.isfinite(train_acc[start:stop])).any():
                return
            self.train_by_loss = False
        starts, sums, counts, n, width = self._history_arrays()
        values = train_acc if loss_ws is None else loss_ws  # loss_ws is read only by loss
        n, width = _k.history_take(steps, train_acc, acc_present, values, by_loss, start, stop, starts, sums,
                                   counts, n, width, self.config.history_bins)
        history = self.train_history
        history.starts, history.sums = starts[:n].tolist(), sums[:n].tolist()
        history.counts, history.width = counts[:n].tolist(), int(width)

    def _history_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """The training metric's history in arrays of ``history_bins + 1`` (a compiled loop's copy)."""
        history, size = self.train_history, self.config.history_bins + 1
        n = len(history)
        starts, sums, counts = np.zeros(size, dtype=np.int64), np.zeros(size), np.zeros(size, dtype=np.int64)
        starts[:n], sums[:n], counts[:n] = history.starts, history.sums, history.counts
        return starts, sums, counts, n, history.width

    def _levelled(self, step: int, first_step: int) -> int | None:
        """Where the training metric had levelled off, judged at ``step``: the start of
        a look-back of ``settle_fraction`` of the run (at least
        ``grokking_min_delay_steps``, the labels' shortest time scale: logged every
        step, an accuracy that jumps to 0.35 in three steps and holds for thirteen has
        not levelled off) over which its accuracy surely rose less than
        ``stable_tolerance`` (its loss fell less than ``settle_change`` decades; the
        gain plus two standard errors, :func:`halves`); None if it has not.
        O(history_bins)."""
        c = self.config
        look_back = c.settle_fraction * (step - first_step)
        if look_back < c.grokking_min_delay_steps:
            return None
        found = halves(self.train_history, step, look_back)
        if found is None:
            return None
        gain, _, error = found  # in accuracy, or in decades of the loss (settle_change)
        bound = c.settle_change if self.train_by_loss else c.stable_tolerance
        return int(step - look_back) if gain + 2 * error < bound else None

    def _onset_rise(self, low: float) -> float:
        """How far above its early level ``low`` the held-out accuracy rises at the
        onset: ``onset_rise``, or ``onset_headroom`` of the way to 1 where less (at
        least twice ``stable_tolerance``); from an early level already at
        ``grokked_accuracy`` (a model logged from a trained checkpoint), minus
        ``stable_tolerance``: holding that level is the onset."""
        return _k.onset_rise_of(low, self.config.onset_rise, self.config.onset_headroom,
                                self.config.stable_tolerance, self.config.grokked_accuracy)

    def _fitted(self, step: int, first_step: int) -> int:
        """The steps the training metric took to fit (memorise), or to level off below
        that (:meth:`_levelled`); until then the steps so far (no stretch before it
        is long enough)."""
        if self.memorised_at is not None:
            return self.memorised_at - first_step
        if self.train_level_at is not None:
            return self.train_level_at - first_step
        return step - first_step

    def update(self, step: int, val_acc: float | None, val_loss: float | None, first_step: int,
               series: str, loss_series: str | None, timeline: Timeline, steady: bool = True) -> list[Event]:
        """One line. ``steady``: no excursion of the training loss is open (a loss spike
        drags the held-out accuracy down for a line or two: not its noise, which a
        log of every 50 steps, seeing one spiked line in six, would read as 0.1 and
        call anything within 0.5 of the best stable)."""
        if self._quiet is not None:
            self.release()
        events: list[Event] = []
        if (val_loss is not None and math.isfinite(val_loss) and self.progress is not None
                and self.onset_at is None and self.hidden_progress_at is None):
            events += self._hidden_progress(step, val_loss, first_step, loss_series)
        if val_acc is None or not math.isfinite(val_acc):
            return events
        c = self.config
        previous = self.val_interval.last
        self.val_interval.see(step)
        if len(self.val_first) < 3 and self.memorised_at is None:
            # The first value is the untrained model's level whatever the cadence; the
            # median of the first three, where lower, guards against a lucky first one.
            # (Three lines of a sparse log may already be well into learning.)
            self.val_first.append(val_acc)
            first = self.val_first[0]
            self.val_base = min(first, median(self.val_first)) if len(self.val_first) == 3 else \
                first if self.val_base is None else min(self.val_base, first)
        self.val_recent = [*self.val_recent[-2:], val_acc]
        # A median of three lines is the level at the middle one: dated at the newest,
        # it would lag by a line, which is one step on a dense log and fifty on a
        # sparse one (a stretch that starts after a falling edge would start late).
        self.level_step = previous if len(self.val_recent) == 3 and previous is not None else step
        if val_acc > 0 and self.acc_progress is not None and self.progressing:
            events += self._hidden_progress_in_accuracy(step, val_acc, first_step, series)
        low = self._early_level()
        if (low is not None and self.onset_at is None and len(self.val_recent) == 3
                and (self.memorised_at is not None or len(self.val_first) == 3)):
            # The onset is measured from the lowest level held before it: a model that
            # memorises drives held-out accuracy below chance, and a sparse log whose
            # first line already memorised would otherwise keep chance as its level.
            low = min(low, median(self.val_recent))
        self.val_low = low
        if self.val_window and steady:
            change = abs(val_acc - self.val_window[-1])
            if change > 0 and (self.val_step == 0 or change < self.val_step):
                self.val_step = change
            fall = self.val_window[-1] - val_acc
            if math.isfinite(fall):
                self.val_fall += ((fall if fall > 0 else 0.0) - self.val_fall) / 10
        if steady:
            self.val_window = [*self.val_window[-6:], val_acc]
        if len(self.val_window) == 7 and steady:
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
                self.val_noise = min(math.sqrt(max(0.0, 64 * self.curv_near - self.curv_wide) / 1260),
                                     _SQRT_PI * self.val_fall)
        if self.onset_at is None:
            if self.val_low is not None and val_acc >= self.val_low + self._onset_rise(self.val_low):
                if self.above_since is None:
                    self.above_since = step
                    self.lows, self.lows_floor = [], None
                    self.highs, self.highs_floor = [], None
                if step - self.above_since >= c.min_intervals * self.val_interval.gap:
                    self.onset_at = self.above_since
                    events += timeline.enter(Phase.ABSTRACTION, self.onset_at, step, 0.8, series)
                    if self.val_low >= c.grokked_accuracy:
                        # Generalised when the log began: complete from the onset's first
                        # line, and no grokking (the labels' delay is from memorisation to
                        # the first line at grokked_accuracy, here the first line).
                        self.complete_at = self.onset_at
                else:
                    # The stable stretch may start anywhere after the onset's first line:
                    # on a sparse log the onset is confirmed lines later, the stretch not.
                    self._remember(step, val_acc, median(self.val_recent), self.level_step)
            else:
                self.above_since = None
            if self.onset_at is None:
                return events
        if self.complete_at is None and val_acc >= c.grokked_accuracy:
            events += self._grokked(step, val_acc, first_step, series)
        events += self._stability(step, val_acc, first_step, series, timeline)
        return events

    def quiet_run(self, steps: np.ndarray, acc: np.ndarray, acc_present: np.ndarray, loss_ws: np.ndarray,
                  loss_present: np.ndarray, first_step: int, stabilised: bool, start: int, stop: int,
                  commit: bool = True, steady: bool = True) -> int:
        """:meth:`update` on lines ``start:stop`` while it only moves its state: the
        held-out loss adds to the hidden-progress history (or is not read) where
        no Mann–Kendall test could find progress (a bin that opens before
        grokking's delay, or whose means fail the test's cheaper conditions), and
        each held-out accuracy, past the first three, neither completes
        the onset, nor reaches ``grokked_accuracy`` first, nor enters (leaves:
        ``stabilised``, the phase is stabilisation) a stable stretch. Stops before
        the first line that would; returns the lines taken (``commit=False``: only
        counts them).

        ``acc``: the held-out accuracy as a fraction on every line, ``loss_ws`` the
        held-out loss on the working scale (NaN where not finite), ``*_present``
        where logged. O(lines) (O(_LOWS) a line for the stable stretch's start);
        the state stays as bounded as :meth:`update` keeps it.
        """
        if stop <= start:
            return 0
        quiet = self._quiet if self._quiet is not None else self._make_quiet()
        block = (steps, acc, acc_present, loss_ws, loss_present, first_step, stabilised, steady)
        return quiet.run(block, start, stop, commit)

    def _make_quiet(self) -> Quiet:
        """The compiled loop's state (:class:`Quiet`): the hidden-progress history's
        bins in arrays of ``history_bins + 1``, the suffix minima in arrays of
        ``_LOWS + 1``."""
        c = self.config
        progress, progressing = self.progress, self.progressing
        size = c.history_bins + 1
        starts, sums, counts = np.zeros(size, dtype=np.int64), np.zeros(size), np.zeros(size, dtype=np.int64)
        a_starts, a_sums, a_counts = (np.zeros(size, dtype=np.int64), np.zeros(size),
                                      np.zeros(size, dtype=np.int64))
        bins, width, a_bins, a_width = 0, 0, 0, 0
        accuracy = self.acc_progress
        if progressing:
            assert progress is not None and accuracy is not None  # progressing: memorised
            bins, width = len(progress), progress.width
            starts[:bins], sums[:bins], counts[:bins] = progress.starts, progress.sums, progress.counts
            a_bins, a_width = len(accuracy), accuracy.width
            a_starts[:a_bins], a_sums[:a_bins], a_counts[:a_bins] = (
                accuracy.starts, accuracy.sums, accuracy.counts)
        seen, last, gap = self.val_interval.packed()
        recent = np.zeros(3)
        recent[:len(self.val_recent)] = self.val_recent
        window = np.zeros(7)
        window[:len(self.val_window)] = self.val_window
        count, (lows_step, lows_value, lows_next) = len(self.lows), _stack_arrays(self.lows)
        h_count, (highs_step, highs_value, highs_next) = len(self.highs), _stack_arrays(self.highs)
        quiet = Quiet(
            _k.generalisation_quiet,
            (starts, sums, counts, recent, window, lows_step, lows_value, lows_next, highs_step, highs_value,
             highs_next, a_starts, a_sums, a_counts),
            (bins, width, a_bins, a_width, seen, last, gap, len(self.val_recent), len(self.val_window),
             float(self.curv_near), float(self.curv_wide), float(self.val_noise), float(self.val_step),
             float(self.val_fall),
             self.above_since is not None, _int(self.above_since), float(self.best), count,
             self.lows_floor is not None, _int(self.lows_floor), h_count, self.highs_floor is not None,
             _int(self.highs_floor)),
            (len(self.val_first) < 3 and self.memorised_at is None,
             self.onset_at is not None, _int(self.onset_at), self.complete_at is not None,
             self._early_level() is not None, _float(self._early_level()), progressing,
             _int(self.memorised_at), self.memorised_at is not None,
             self.train_level_at is not None, _int(self.train_level_at),
             bool(self.val_first), float(self.val_first[0]) if self.val_first else 0.0,
             float(self.stable_best), float(c.onset_rise), float(c.onset_headroom),
             float(c.grokked_accuracy), c.min_intervals,
             float(c.stable_tolerance), float(c.stable_fraction), c.history_bins, c.grokking_min_delay_steps,
             c.progress_min_bins, float(c.progress_min_change), float(c.progress_min_share)),
            self._unpack)
        self._quiet = quiet
        return quiet

    def _unpack(self, arrays: tuple, state: tuple) -> None:
        starts, sums, counts, recent, window, lows_step, lows_value, lows_next, highs_step, highs_value, \
            highs_next, a_starts, a_sums, a_counts = arrays
        (bins, width, a_bins, a_width, seen, last, gap, recent_n, window_n, curv_near, curv_wide, noise,
         val_step, val_fall, has_above, above, best, count, has_floor, floor, h_count, has_hfloor,
         hfloor) = state
        progress = self.progress
        if self.progressing and progress is not None:
            progress.starts, progress.sums = starts[:bins].tolist(), sums[:bins].tolist()
            progress.counts, progress.width = counts[:bins].tolist(), int(width)
            accuracy = self.acc_progress
            assert accuracy is not None  # made with progress
            accuracy.starts, accuracy.sums = a_starts[:a_bins].tolist(), a_sums[:a_bins].tolist()
            accuracy.counts, accuracy.width = a_counts[:a_bins].tolist(), int(a_width)
        previous = self.val_interval.last
        self.val_interval.unpack(seen, last, gap)
        if self.val_interval.last != previous:
            # update() sets the level it measured from on every held-out line; on a
            # quiet one that is the early level (a memorisation after the onset may
            # have lowered it since).
            self.val_low = self._early_level()
        self.val_recent = recent[:recent_n].tolist()
        self.val_window = window[:window_n].tolist()
        self.curv_near, self.curv_wide, self.val_noise, self.val_step = curv_near, curv_wide, noise, val_step
        self.val_fall = val_fall
        self.above_since = int(above) if has_above else None
        self.best = best
        self.lows = _stack_list(lows_step, lows_value, lows_next, count)
        self.lows_floor = int(floor) if has_floor else None
        self.highs = _stack_list(highs_step, highs_value, highs_next, h_count)
        self.highs_floor = int(hfloor) if has_hfloor else None

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
        evidence = {"baseline": f"{_float(self.val_low):.4g}", "value": f"{value:.4g}",
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
        # test set makes it larger (the extremes of a long noisy stretch lie 5-6 sd apart),
        # or of one and a half of its resolution, up to twice the tolerance (one example
        # of a test set of 50-150 is no change of level, two are; a larger smallest
        # change so far is the rise's, not the resolution).
        tol = max(c.stable_tolerance, 5 * self.val_noise, min(1.5 * self.val_step, 2 * c.stable_tolerance))
        # Lows raw (a median of lines lags by a line, in steps by the cadence), highs
        # of medians (the best of raw noisy values would creep up).
        level = median(self.val_recent)
        self._remember(step, value, level, self.level_step)
        self.best = max(self.best, level)
        if timeline.phase is Phase.STABILIZATION:
            if self.best > self.stable_best + 2 * tol:
                self.stable_best = self.best
                return timeline.enter(Phase.ABSTRACTION, step, step, 0.6, series)
            return []
        # The stable stretch starts after the last value more than ``tol`` below the
        # best level since (the labels' rule, read online, for a level that may settle
        # below an earlier peak): where it starts does not depend on when the best
        # last crept up, nor on the logging cadence.
        since = self._stable_since(tol)
        if since is None:
            return []
        # Relative to how long generalising took: a quarter of the time since the
        # onset once it has generalised; before, as long as the run took to get
        # there (an onset read off a sparse log, or a rise that starts at once, is
        # located late: the time since the onset would be too short a yardstick).
        if self.best >= c.grokked_accuracy and self.onset_at is not None:
            span = c.stable_fraction * (since - self.onset_at)
        else:
            # ... and at least as long as memorisation took: before the training
            # metric has fitted, the time so far is no time scale (a dense log sees
            # plateaus of a few steps early on that a sparse one never shows).
            span = 4 * c.stable_fraction * max(since - first_step, self._fitted(step, first_step))
        # At least min_intervals lines in the stretch (it starts half an interval
        # before its first line).
        needed = max((c.min_intervals - 0.5) * self.val_interval.gap, span)
        if step - since >= needed:
            self.stable_since, self.stable_best = since, self.best
            return timeline.enter(Phase.STABILIZATION, since, step, 0.8, series)
        return []

    def _remember(self, step: int, value: float, level: float, level_step: int) -> None:
        """Keep the suffix minima of the values and the suffix maxima of their
        three-value medians (``level``) since onset: entries [step, value, next
        step], at most ``_LOWS`` each (the oldest dropped, its next step kept as a
        floor). O(1) amortised."""
        floor = _push_suffix(self.lows, step, value, lowest=True)
        if floor is not None:
            self.lows_floor = floor
        floor = _push_suffix(self.highs, level_step, level, lowest=False)
        if floor is not None:
            self.highs_floor = floor

    def _stable_since(self, tol: float) -> int | None:
        """The first step from which every value is within ``tol`` of the highest
        median since (halfway to the line after the last one that is not); None if
        the newest line alone is not. O(entries)."""
        lows, highs = self.lows, self.highs
        i, j = len(lows) - 1, len(highs) - 1
        top, bottom = -math.inf, math.inf
        while i >= 0 or j >= 0:
            if j < 0 or (i >= 0 and lows[i][0] >= highs[j][0]):
                at, value, following = lows[i]
                bottom = min(bottom, value)
                i -= 1
            else:
                at, value, following = highs[j]
                top = max(top, value)
                j -= 1
            if top - bottom > tol:
                # Halfway to the next line: a sparse log's stretch starts somewhere
                # between the two, and a dense log's at the very next step.
                return None if following is None else at + (following - at + 1) // 2
        low_bound = self.lows_floor if self.lows_floor is not None else lows[0][0]
        high_bound = self.highs_floor if self.highs_floor is not None else highs[0][0]
        return max(low_bound, high_bound)

    def _hidden_progress(self, step: int, val_loss: float, first_step: int,
                         series: str | None) -> list[Event]:
        assert self.progress is not None  # set at memorisation
        if not self.progress.add(step, working_scale(Role.LOSS, val_loss)):
            return []
        return self._warning(self.progress, step, first_step, series or "",
                             "{series} has fallen {change:.2f} decades since step {since} while held-out "
                             "accuracy has not risen yet: a transition may be coming", 1.0, {})

    def _hidden_progress_in_accuracy(self, step: int, val_acc: float, first_step: int,
                                     series: str) -> list[Event]:
        history = self.acc_progress
        assert history is not None  # set at memorisation
        if not history.add(step, -math.log10(val_acc)) or not self.val_first:
            return []
        # Progress is doing better than the untrained model (its first value, chance):
        # a memorising model first drives held-out accuracy below chance, and its
        # drift back up is not yet generalisation.
        if 10 ** -(history.sums[-1] / history.counts[-1]) <= self.val_first[0]:
            return []
        return self._warning(history, step, first_step, series,
                             "{series} has risen {change:.2f} decades since step {since} and is still "
                             "near its early level: a transition may be coming", -1.0,
                             {"measure": "accuracy"})

    def _warning(self, history: StepHistory, step: int, first_step: int, series: str, text: str,
                 sign: float, evidence: dict[str, str]) -> list[Event]:
        """The HIDDEN_PROGRESS event where ``history`` shows progress (see
        :meth:`_progress_trend`; ``text`` formatted with the series, the size of the
        change in decades and the step it started; the evidence's change is the
        measure's own, ``sign`` times the history's), marked found; else none."""
        found = self._progress_trend(history, step, first_step)
        if found is None:
            return []
        trend, change, since, bins = found
        self.hidden_progress_at = step
        return [make_event(
            step, step, EventKind.HIDDEN_PROGRESS, series, min(1.0, 1 - trend.p_value),
            text.format(series=series, change=-change, since=since),
            {"test": trend.test, "tau": f"{trend.statistic:.4g}", "p_value": f"{trend.p_value:.3g}",
             "change_decades": f"{sign * change:.4g}", "since_step": str(since), "bins": str(bins),
             **evidence},
        )]

    def _progress_trend(self, history: StepHistory, step: int,
                        first_step: int) -> tuple[TrendResult, float, int, int] | None:
        """(trend, change in decades, step it started, bins in it) where ``history``,
        a quantity that falls with progress, shows hidden progress at the bin that
        just opened, else None. O(bins)."""
        c = self.config
        assert self.memorised_at is not None  # histories start at memorisation
        # A warning of grokking, not of ordinary generalisation: only once a rise
        # now could still be grokking's (the labels' delay has passed).
        took = self.memorised_at - first_step
        if step - self.memorised_at < max(c.grokking_min_delay_steps, took):
            return None
        means = history.means()  # the newest bin may be partial: it is one value at least
        if len(means) < c.progress_min_bins:
            return None
        peak = int(means.argmax())
        tail = means[peak:]
        change = float(tail[-1] - tail[0])
        if len(tail) < c.progress_min_bins or change > -c.progress_min_change:
            return None
        # A fall that has lasted a small share of the time since memorisation is the
        # down-stroke of an oscillation (a loss that climbs for long and drops back),
        # not the slow progress that precedes grokking.
        if step - history.starts[peak] < c.progress_min_share * (step - self.memorised_at):
            return None
        # Still making progress: the newest bin is the tail's lowest, clearly below
        # everything before the tail's last quarter (a loss that oscillates back
        # to an old low is not progress).
        quarter = max(1, len(tail) // 4)
        if tail[-1] > tail.min() or float(tail[:-quarter].min() - tail[-1]) < c.progress_min_change / 4:
            return None
        trend = mann_kendall(tail)
        if trend.statistic >= 0 or trend.p_value >= c.progress_p_value:
            return None
        if self.val_base is not None and self.val_recent and \
                self.val_recent[-1] >= self.val_base + c.onset_rise:
            return None
        return trend, change, history.starts[peak], len(tail)
