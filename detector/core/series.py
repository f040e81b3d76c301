"""Per-series detection: change points, plateaus and trends on one metric.

A :class:`SeriesDetector` takes ``(step, value)`` points in step order. Non-finite
values are counted and routed away before any statistic. Finite values are
mapped to a working scale chosen by the series' role (log scale for losses,
norms and ranks, whose changes are multiplicative) and feed three parts:

* :class:`~detector.core.changepoint.CusumTrigger` on every point, O(1);
* :class:`~detector.core.changepoint.WindowLocaliser` on the bounded segment
  window when the trigger alarms (a few hundred points at most);
* :class:`~detector.core.trend.PlateauTest` on the last ``patience`` points and
  a Mann–Kendall trend test on the last ``trend_window`` points every
  ``trend_every`` points.

Memory per series is O(``window``), independent of run length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from detector.core.changepoint import CusumTrigger, WindowLocaliser
from detector.core.trend import PlateauTest, TrendResult, mann_kendall
from detector.core.types import Direction, Event, EventKind, Role, SeriesSpec, Split
from detector.errors import InvalidArgument

_LOG_ROLES = frozenset({Role.LOSS, Role.NORM, Role.RANK})
_SYMLOG_EPS = 1e-10


def working_scale(role: Role, value: float) -> float:
    """Map a finite value to the scale its statistics use (symmetric log for multiplicative roles)."""
    if role in _LOG_ROLES:
        return math.copysign(math.log10(1.0 + abs(value) / _SYMLOG_EPS), value)
    return value


@dataclass(frozen=True)
class SeriesConfig:
    """Settings of one series detector. Plateau margins are on the working scale."""

    window: int = 256
    trigger: CusumTrigger = field(default_factory=CusumTrigger)
    localiser: WindowLocaliser = field(default_factory=WindowLocaliser)
    patience: int = 20
    min_delta_log: float = 0.05  # decades, for log-scale roles (abs mode)
    min_delta_accuracy: float = 0.01  # accuracy units (abs mode)
    min_delta_rel: float = 0.05  # other roles (rel mode)
    trend_window: int = 30
    trend_every: int = 5

    def __post_init__(self) -> None:
        if self.window < 2 * self.patience or self.window < self.trend_window:
            raise InvalidArgument("window must hold at least 2 × patience and trend_window points")
        if self.trend_every < 1:
            raise InvalidArgument("trend_every must be at least 1")

    def plateau_test(self, role: Role) -> PlateauTest:
        if role in _LOG_ROLES:
            return PlateauTest(self.min_delta_log, self.patience, "abs")
        if role is Role.ACCURACY:
            return PlateauTest(self.min_delta_accuracy, self.patience, "abs")
        return PlateauTest(self.min_delta_rel, self.patience, "rel")


class SeriesDetector:
    """Change points, plateaus and trends of one series, one point at a time.

    >>> import numpy as np
    >>> rng = np.random.default_rng(2)
    >>> values = np.r_[rng.normal(0, 1, 80), rng.normal(6, 1, 80)]
    >>> det = SeriesDetector(SeriesSpec("value", Role.OTHER, Split.TRAIN, Direction.MINIMIZE))
    >>> events = det.update_many(np.arange(160), values)
    >>> [e.step for e in events if e.kind is EventKind.CHANGE_POINT]
    [80]
    """

    def __init__(self, spec: SeriesSpec, config: SeriesConfig | None = None) -> None:
        self.spec = spec
        self.config = config or SeriesConfig()
        self._plateau = self.config.plateau_test(spec.role)
        self.trigger = CusumTrigger(**_trigger_settings(self.config.trigger))
        w = self.config.window
        self._steps = np.zeros(w, dtype=np.int64)
        self._values = np.zeros(w, dtype=np.float64)
        self._size = 0  # points held, oldest at index 0 (shifted on overflow)
        self._segment_start = 0  # index in the buffer where the current segment starts
        self._pending_alarm: int | None = None  # points to wait before localising
        self._alarm_statistic = 0.0
        self.n_finite = 0
        self.n_nonfinite = 0
        self.last_step: int | None = None
        self.last_value: float = math.nan  # raw, may be non-finite
        self.first_value: float = math.nan  # raw, first finite
        self.min_value: float = math.inf
        self.max_value: float = -math.inf
        self.in_plateau = False
        self.trend: TrendResult | None = None

    # --- update ---------------------------------------------------------------

    def update(self, step: int, value: float) -> list[Event]:
        """Take one point; return the events it caused (possibly located earlier)."""
        self.last_step = step
        self.last_value = value
        if not math.isfinite(value):
            self.n_nonfinite += 1
            return []
        if self.n_finite == 0:
            self.first_value = value
        self.n_finite += 1
        self.min_value = min(self.min_value, value)
        self.max_value = max(self.max_value, value)
        y = working_scale(self.spec.role, value)
        self._append(step, y)
        events: list[Event] = []
        alarm = self.trigger.update(y)
        if self._pending_alarm is None and alarm:
            self._pending_alarm = self.config.localiser.min_size
            self._alarm_statistic = self.trigger.statistic
        if self._pending_alarm is not None:
            self._pending_alarm -= 1
            if self._pending_alarm <= 0:
                self._pending_alarm = None
                events.extend(self._localise(step))
        events.extend(self._check_plateau(step))
        if self.n_finite % self.config.trend_every == 0 and self._size >= self.config.trend_window:
            self.trend = mann_kendall(self._values[self._size - self.config.trend_window : self._size])
        return events

    def update_many(self, steps: np.ndarray, values: np.ndarray) -> list[Event]:
        """Equal to calling :meth:`update` on each point in order."""
        events: list[Event] = []
        for step, value in zip(
            np.asarray(steps).tolist(), np.asarray(values, dtype=float).tolist(), strict=True
        ):
            events.extend(self.update(step, value))
        return events

    # --- readouts for the labeller ---------------------------------------------

    def recent(self, count: int) -> np.ndarray:
        """The last ``count`` finite values on the working scale (fewer early on)."""
        return self._values[max(0, self._size - count) : self._size].copy()

    # --- internals -------------------------------------------------------------

    def _append(self, step: int, y: float) -> None:
        w = self.config.window
        if self._size == w:
            # Shift by half a window at once: amortised O(1) per point.
            half = w // 2
            self._steps[: w - half] = self._steps[half:]
            self._values[: w - half] = self._values[half:]
            self._size -= half
            self._segment_start = max(0, self._segment_start - half)
        self._steps[self._size] = step
        self._values[self._size] = y
        self._size += 1

    def _localise(self, step: int) -> list[Event]:
        start = self._segment_start
        segment = self._values[start : self._size]
        split = self.config.localiser.locate(segment)
        statistic = self._alarm_statistic
        self.trigger.pos = self.trigger.neg = 0.0
        if split is None or not split.confirmed:
            return []
        index = start + split.index
        before = float(np.median(segment[: split.index][-10:]))
        after = float(np.median(segment[split.index :][:10]))
        self._segment_start = index
        # Re-warm the trigger on the new segment so it forecasts from the new regime.
        self.trigger.reset()
        for y in self._values[index : self._size].tolist():
            self.trigger.update(y)
        self.trigger.pos = self.trigger.neg = 0.0
        located = int(self._steps[index])
        return [
            Event(
                step=located,
                kind=EventKind.CHANGE_POINT,
                detected_at=step,
                series=self.spec.name,
                confidence=float(min(1.0, split.gain / (2.0 * split.penalty))),
                message=f"{self.spec.name} changed {'up' if after > before else 'down'} at step {located}",
                evidence={
                    "test": "cusum+binseg_linear",
                    "cusum_statistic": f"{statistic:.4g}",
                    "cost_gain": f"{split.gain:.4g}",
                    "penalty": f"{split.penalty:.4g}",
                    "noise": f"{split.noise:.4g}",
                    "direction": "up" if after > before else "down",
                    "detected_at_step": str(step),
                },
            )
        ]

    def _check_plateau(self, step: int) -> list[Event]:
        p = self._plateau.patience
        if self._size < p:
            return []
        result = self._plateau.test(self._values[self._size - p : self._size])
        started = not self.in_plateau and result.is_plateau
        # Hysteresis: a plateau ends only when the change is significantly beyond the margin.
        ended = self.in_plateau and (result.ci_low > result.bound or result.ci_high < -result.bound)
        if not (started or ended):
            return []
        self.in_plateau = started
        kind = EventKind.PLATEAU_START if started else EventKind.PLATEAU_END
        located = int(self._steps[self._size - p]) if started else step
        return [
            Event(
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
                    "patience": str(p),
                    "detected_at_step": str(step),
                },
            )
        ]

    # --- checkpoints -------------------------------------------------------------

    def state(self) -> dict:
        """Everything needed to resume; plain Python types and numpy arrays."""
        return {
            "spec": asdict(self.spec),
            "trigger": self.trigger.state(),
            "steps": self._steps[: self._size].copy(),
            "values": self._values[: self._size].copy(),
            "scalars": {
                k: getattr(self, k)
                for k in (
                    "_segment_start", "_pending_alarm", "_alarm_statistic", "n_finite",
                    "n_nonfinite", "last_step", "last_value", "first_value", "min_value",
                    "max_value", "in_plateau", "trend",
                )
            },
        }

    @classmethod
    def from_state(cls, state: dict, config: SeriesConfig | None = None) -> SeriesDetector:
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
        for key, value in state["scalars"].items():
            setattr(det, key, value)
        return det


def _trigger_settings(trigger: CusumTrigger) -> dict:
    return {k: getattr(trigger, k) for k in ("drift", "threshold", "alpha", "beta", "warmup", "scale_rate")}

