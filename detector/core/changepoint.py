"""Two-stage change-point detection: a cheap trigger, then a bounded localiser.

The trigger (:class:`~detector.core.trigger.CusumTrigger`, O(1) amortised a
point) says where to look; the localiser
(:class:`~detector.core.localiser.WindowLocaliser` over
:class:`~detector.core.localiser.CostPiecewiseLinear`, O(window) a look)
decides whether there is a break and where. A series detector
(:mod:`detector.core.series`) composes them. This module keeps the names
importable from one place.
"""

from detector.core.localiser import (
    CostPiecewiseLinear,
    Split,
    WindowLocaliser,
    _last_argmax,
    _parabola_sse,
    history_scale,
    point_noise,
)
from detector.core.trigger import CusumTrigger

__all__ = ["CostPiecewiseLinear", "CusumTrigger", "Split", "WindowLocaliser", "_last_argmax",
           "_parabola_sse", "history_scale", "point_noise"]
