"""Phases of a run that logs losses only (:class:`LossOnlyPhases`)."""

from __future__ import annotations

import math

import numpy as np

from detector.core.labeller import _kernels as _k
from detector.core.labeller.config import LabellerConfig
from detector.core.labeller.history import StepHistory
from detector.core.labeller.history import halves as history_halves  # `halves` names a local below
from detector.core.labeller.rules._common import Interval, Quiet, _Plain
from detector.core.labeller.timeline import Timeline
from detector.core.series import working_scale
from detector.core.types import Event, Phase, Role


class LossOnlyPhases(_Plain):
    """Phases of a run without held-out accuracy, from its headline loss.

    Abstraction once the loss's step-history mean is ``settle_change`` × 5
    decades below its first bin (it is learning); stabilisation once it fell
    less than ``settle_change`` decades over the last ``settle_fraction`` of
    the steps run (estimated from the medians of the look-back's two halves),
    and, where the headline is a validation loss, the training loss too (a
    fine-tuning run whose validation loss bottoms out and turns up while its
    training loss still falls is overfitting, not settled); abstraction again
    when either falls three times that, all decided when a step bin of the
    headline opens. Located where found, never moved. O(1) amortised a line.
    """

    _FIELDS = ("first_mean",)
    _NESTED = {"history": StepHistory, "interval": Interval, "training": StepHistory}

    def __init__(self, config: LabellerConfig) -> None:
        self.config = config
        self.history = StepHistory(config.history_bins)
        self.interval = Interval()
        self.first_mean = math.nan
        # The training loss's step history, where the headline is the validation loss.
        self.training = StepHistory(config.history_bins)

    def load(self, state: dict) -> None:
        if "training" not in state:  # a checkpoint from before it was kept: it starts now
            state = {**state, "training": StepHistory(self.config.history_bins).state()}
        super().load(state)

    def update(self, step: int, loss: float | None, first_step: int, series: str,
               timeline: Timeline, disturbed_at: int | None = None,
               train_loss: float | None = None) -> list[Event]:
        """``disturbed_at``: where the last loss excursion began; a look-back that
        holds it compares a setback with its recovery, so it decides nothing.
        ``train_loss``: the training loss where ``loss`` is the validation loss."""
        if self._quiet is not None:
            self.release()
        if train_loss is not None and math.isfinite(train_loss):
            self.training.add(step, working_scale(Role.LOSS, train_loss))
        if loss is None or not math.isfinite(loss):
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
        halves = history_halves(self.history, step, look_back)
        if halves is None:
            return []
        fall, newest, _ = halves
        # The training loss alongside: settled only where its fall is surely small (its
        # fall plus two standard errors: a minibatch loss is noisy, and a look-back of
        # a few noisy bins proves nothing), falling again only where surely large
        # (less two standard errors); no say with too few bins.
        training = history_halves(self.training, step, look_back) if self.training.starts else None
        train_low = train_high = 0.0
        if training is not None:
            train_low, train_high = training[0] - 2 * training[2], training[0] + 2 * training[2]
        # Settled: it has stopped falling and its newest half is flat too (a
        # setback and its recovery, below the spike threshold, is not settling).
        if (phase is Phase.ABSTRACTION and fall < c.settle_change and train_high < c.settle_change
                and float(newest.max() - newest.min()) <= 2 * c.settle_change):
            return timeline.enter(Phase.STABILIZATION, step, step, 0.6, series)
        if phase is Phase.STABILIZATION and max(fall, train_low) > 3 * c.settle_change:
            return timeline.enter(Phase.ABSTRACTION, step, step, 0.6, series)
        return []

    def quiet_run(self, steps: np.ndarray, values: np.ndarray, ys: np.ndarray, present: np.ndarray,
                  start: int, stop: int, commit: bool = True, train_ys: np.ndarray | None = None) -> int:
        """:meth:`update` on lines ``start:stop`` while the loss opens no step bin (the
        phase is decided only when one opens): it adds to the newest bin, or is not
        finite and not read. Stops before the first line that opens a bin; returns
        the lines taken (``commit=False``: only counts them).

        ``values``: the headline loss on every line, ``ys`` its working-scale values
        (:func:`working_scale`, where finite), ``present`` where logged;
        ``train_ys`` the training loss's working-scale values (NaN where absent or
        not finite) where the headline is the validation loss, else None. O(lines);
        the state stays the step histories'.
        """
        if stop <= start:
            return 0
        quiet = self._quiet if self._quiet is not None else self._make_quiet()
        # Without a training loss the kernel reads no train_ys: ys stands in for it.
        train = (ys, False) if train_ys is None else (train_ys, True)
        return quiet.run((steps, values, ys, present, *train), start, stop, commit)

    def _make_quiet(self) -> Quiet:
        """The compiled loop's state (:class:`Quiet`): the newest bin's sum and count
        (no quiet line opens a bin), and the training loss's history in arrays of
        ``history_bins + 1``."""
        history, training = self.history, self.training
        bins = len(history)
        bin_start, width = (history.starts[-1], history.width) if bins else (0, 0)
        bin_sum, bin_count = (float(history.sums[-1]), history.counts[-1]) if bins else (0.0, 0)
        seen, last, gap = self.interval.packed()
        size = self.config.history_bins + 1
        t_bins = len(training)
        t_starts, t_sums, t_counts = (np.zeros(size, dtype=np.int64), np.zeros(size),
                                      np.zeros(size, dtype=np.int64))
        t_starts[:t_bins], t_sums[:t_bins] = training.starts, training.sums
        t_counts[:t_bins] = training.counts
        quiet = Quiet(_k.loss_only_quiet, (t_starts, t_sums, t_counts),
                      (bin_sum, bin_count, seen, last, gap, t_bins, training.width),
                      (bins, bin_start, width, self.config.history_bins), self._unpack)
        self._quiet = quiet
        return quiet

    def _unpack(self, arrays: tuple, state: tuple) -> None:
        bin_sum, bin_count, seen, last, gap, t_bins, t_width = state
        if self.history.starts:
            self.history.sums[-1], self.history.counts[-1] = bin_sum, bin_count
        self.interval.unpack(seen, last, gap)
        t_starts, t_sums, t_counts = arrays
        training = self.training
        training.starts, training.sums = t_starts[:t_bins].tolist(), t_sums[:t_bins].tolist()
        training.counts, training.width = t_counts[:t_bins].tolist(), int(t_width)
