"""The labeller's rules, one class each, with a per-line ``update`` and beside it a
``quiet_run`` that takes a stretch of a block's lines while the update would
only move the rule's own state (compiled: :mod:`detector.core.labeller._kernels`),
stopping before the first line where it could act.

Each rule reads the values of the series that play its roles on one logged
line (``None``: the series has no value on this line; NaN: non-finite) and
returns events; phase changes go through the :class:`Timeline`. Every rule
is O(1) a line (a Mann–Kendall test over at most ``history_bins`` bins each
time the held-out loss opens a bin, which is O(log lines) times a run), keeps
bounded state and says its durations in steps (see
:mod:`detector.core.labeller.config`).

One module per rule family: :mod:`.excursions` (loss spikes and training
collapse), :mod:`.generalisation` (generalisation, grokking, hidden progress,
stabilisation, and generalisation collapse), :mod:`.loss_only`; what they
share in :mod:`._common`.
"""

from detector.core.labeller.rules._common import GENERALISATION, TRAINING, Interval, collapse_end
from detector.core.labeller.rules.excursions import LossExcursions
from detector.core.labeller.rules.generalisation import Generalisation, GeneralisationCollapse
from detector.core.labeller.rules.loss_only import LossOnlyPhases

__all__ = ["GENERALISATION", "TRAINING", "Generalisation", "GeneralisationCollapse", "Interval",
           "LossExcursions", "LossOnlyPhases", "collapse_end"]
