"""The labeller's settings, and why each default is what it is.

Durations are in steps or in fractions of the run's own time scale (the steps
run so far, the steps memorisation took), never in logged lines: the same run
logged every step or every 50 steps must give the same events. Where a duration
needs a floor so that one noisy line cannot decide, the floor is a number of
the *series' own* sampling intervals (``min_intervals``).
"""

from __future__ import annotations

from dataclasses import dataclass

from detector.errors import InvalidArgument


@dataclass(frozen=True)
class LabellerConfig:
    """Settings of :class:`~detector.core.labeller.PhaseLabeller`.

    Thresholds taken from the label definitions users score against
    (``../shared/runs/README.md``, ``../shared/real_runs/README.md``):

    * ``fitted_accuracy`` 0.99: memorised = training accuracy ≥ 0.99;
      without accuracy, the training loss below ``fitted_loss_fraction`` of its
      first value.
    * ``onset_rise`` 0.10: generalisation starts when held-out accuracy is
      0.10 above its early (chance) level; ``onset_headroom`` 0.25: or a quarter
      of the way from its early level to 1, where that is less (at least twice
      ``stable_tolerance``): a pre-trained model fine-tuned from 0.86 to 0.91
      has generalised further without ever rising 0.10. From an early level
      already at ``grokked_accuracy`` (a run logged from a trained model) the
      onset is holding it (within ``stable_tolerance``): it was generalised when
      the log began, and is complete there (no grokking).
    * ``grokked_accuracy`` 0.95 and ``grokking_min_delay_steps`` 500: grokking =
      held-out accuracy reaches 0.95 at least max(500 steps, the steps
      memorisation took) after memorisation.
    * ``stable_tolerance`` 0.01: stabilised = held-out accuracy within 0.01 of
      the best level it holds over the stretch.
    * ``generalisation_drop`` 0.05: generalisation collapse = held-out accuracy
      falls 0.05 below its recent level (the authors' 0.95 → 0.90), or more where
      the series' own noise asks for it.

    Evidence scaled to each series:

    * ``spike_factor`` 1.5 and ``spike_noise`` 8: a loss excursion leaves the
      band above its recent level (median of its last ``band_values`` values
      outside excursions) by at least log10(1.5) decades and ``spike_noise`` ×
      the series' own typical line-to-line change; a mini-batch loss whose lines
      jitter by 30% needs a far larger jump than a full-batch loss.
    * ``back_fraction`` 0.5: an excursion is over once the loss is back
      halfway (on the log scale) from its peak to its recent level.
      ``back_slack`` 2: once back, a line leaves only when it is more than twice
      the series' line-to-line noise above the band (about 2.3 sd: a loss that
      sits at the band's edge is not sent out again by every other draw).
    * ``recovery_fraction`` 0.1 and ``recovery_memorisation`` 10: an
      excursion still out after this horizon (0.1 × the steps run so far, at
      most 10 × the steps memorisation took, at least ``min_intervals``
      intervals of the series) is a collapse, not a spike. Spikes in the study
      of post-grokking collapse last up to 600 steps of 100 000; collapses that
      stay last thousands. ``recovery_extension`` 2 and ``recovering_fraction``
      0.75: an excursion that has come down three quarters of its height (log
      scale) by the horizon has up to twice the horizon to be back; one that stays
      up, or settles half-way (a loss that jumps 5x and stays at 2x), is a
      collapse at the horizon, as before.
    * ``collapse_factor`` 10 and ``collapse_margin`` 0.25: a slow drift up to
      10× the running minimum and its minimum + 0.25 × the first loss is an
      excursion too, whatever the recent level (the ``../shared/runs`` bound).
    * ``collapse_material`` 0.1: an excursion is a collapse only if it costs at
      least a tenth of the run's first loss (or is non-finite); a full-batch loss
      that creeps from 1e-7 to 1e-5 has not collapsed.
    * ``stable_fraction`` 0.25: a stable stretch must last a quarter of the time
      since generalisation began (before it has reached ``grokked_accuracy``, as
      long as the run took to get there and as memorisation took: a slow creep
      must stop for longer, and a dense log's plateaus of a few steps before the
      training metric has fitted are not stabilisation); a training accuracy that
      never fits (label noise) has fitted where it levelled off (it surely rose
      less than ``stable_tolerance`` over the last ``settle_fraction`` of the run,
      at least ``grokking_min_delay_steps``).
    * ``progress_*``: hidden progress = after memorisation, the held-out loss
      (or the held-out accuracy, risen above its untrained level, in decades)
      falls (rises) by ``progress_min_change`` decades from its post-memorisation peak
      with a Mann–Kendall trend at ``progress_p_value``, over at least
      ``progress_min_bins`` bins of the step history, while held-out accuracy
      is short of the onset; ``progress_min_share`` 0.25: the fall has lasted at least a
      quarter of the time since memorisation (a held-out loss that climbs for
      18 000 steps and drops back for 3 000, again and again, is oscillating).
    * ``settle_*``: a loss-only run stabilises once its headline loss fell less
      than ``settle_change`` decades (about 2%) over the last
      ``settle_fraction`` of the run; it is back in abstraction when it falls
      twice that again.
    """

    fitted_accuracy: float = 0.99
    fitted_loss_fraction: float = 0.01
    onset_rise: float = 0.10
    onset_headroom: float = 0.25
    grokked_accuracy: float = 0.95
    grokking_min_delay_steps: int = 500
    stable_tolerance: float = 0.01
    stable_fraction: float = 0.25
    generalisation_drop: float = 0.05
    spike_factor: float = 1.5
    spike_noise: float = 8.0
    band_values: int = 9
    back_fraction: float = 0.5
    back_slack: float = 2.0
    recovery_fraction: float = 0.1
    recovery_memorisation: float = 10.0
    recovery_extension: float = 2.0
    recovering_fraction: float = 0.75
    min_intervals: int = 2
    collapse_factor: float = 10.0
    collapse_margin: float = 0.25
    collapse_material: float = 0.1
    progress_p_value: float = 1e-3
    progress_min_change: float = 0.1
    progress_min_bins: int = 8
    progress_min_share: float = 0.25
    history_bins: int = 64
    settle_fraction: float = 0.5
    settle_change: float = 0.01
    max_boundaries: int = 1000

    def __post_init__(self) -> None:
        if self.min_intervals < 1 or self.band_values < 3 or self.history_bins < 8:
            raise InvalidArgument("min_intervals must be ≥ 1, band_values ≥ 3, history_bins ≥ 8")
        if self.history_bins % 2:
            raise InvalidArgument("history_bins must be even")
        for name in ("spike_factor",):
            if getattr(self, name) <= 1:
                raise InvalidArgument(f"{name} must be above 1")
        for name in ("back_fraction", "recovery_fraction", "stable_fraction", "settle_fraction",
                     "recovering_fraction", "onset_headroom"):
            if not 0 < getattr(self, name) <= 1:
                raise InvalidArgument(f"{name} must be in (0, 1]")
