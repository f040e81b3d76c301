"""Run-level detection: one :class:`SeriesDetector` per series plus the labeller.

``update(step, row)`` takes one logged line (every series' value at that step);
lines must come in increasing step order (the engine's reorder buffer sees to
that). Cost per line is O(series) plus the bounded localisation work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from detector.core.labeller import LabellerConfig, PhaseLabeller
from detector.core.series import SeriesConfig, SeriesDetector
from detector.core.types import Event, Phase, Segment, SeriesSpec, infer_spec


@dataclass(frozen=True)
class RunDetectorConfig:
    series: SeriesConfig = field(default_factory=SeriesConfig)
    labeller: LabellerConfig = field(default_factory=LabellerConfig)


class RunDetector:
    """Phases and events of one run.

    >>> det = RunDetector()
    >>> for step in range(0, 200, 10):
    ...     _ = det.update(step, {"train_loss": float("nan") if step >= 150 else 1.0 / (1 + step)})
    >>> [(e.kind.value, e.step) for e in det.events_so_far if e.kind.value == "COLLAPSE_ONSET"]
    [('COLLAPSE_ONSET', 150)]
    >>> det.current_phase()[0].value
    'collapse'
    """

    def __init__(self, config: RunDetectorConfig | None = None) -> None:
        self.config = config or RunDetectorConfig()
        self.specs: dict[str, SeriesSpec] = {}
        self.detectors: dict[str, SeriesDetector] = {}
        self.labeller = PhaseLabeller(self.config.labeller)
        self.events_so_far: list[Event] = []

    def add_series(self, spec: SeriesSpec) -> None:
        if spec.name in self.specs:
            return
        self.specs[spec.name] = spec
        self.detectors[spec.name] = SeriesDetector(spec, self.config.series)
        self.labeller.set_specs(self.specs)

    def update(self, step: int, row: Mapping[str, float]) -> list[Event]:
        """Take one line; returns the events it caused, series events first."""
        series_events: list[Event] = []
        for name in sorted(row):
            if name not in self.detectors:
                self.add_series(infer_spec(name))
            series_events += self.detectors[name].update(step, float(row[name]))
        run_events = self.labeller.update(step, row, self.detectors, series_events)
        events = series_events + run_events
        # Bounded: callers keep their own history; this is only for doctests and tools.
        self.events_so_far = (self.events_so_far + events)[-1000:]
        return events

    def state(self) -> dict:
        """Everything needed to resume this run's detection (a checkpoint)."""
        return {
            "series": {name: det.state() for name, det in self.detectors.items()},
            "labeller": self.labeller.state(),
        }

    @classmethod
    def from_state(cls, state: dict, config: RunDetectorConfig | None = None) -> RunDetector:
        det = cls(config)
        for name, series_state in state["series"].items():
            series = SeriesDetector.from_state(series_state, det.config.series)
            det.specs[name] = series.spec
            det.detectors[name] = series
        det.labeller = PhaseLabeller.from_state(state["labeller"])
        det.labeller.set_specs(det.specs)
        return det

    def current_phase(self) -> tuple[Phase | None, int, float]:
        return self.labeller.current()

    def segments(self) -> list[Segment]:
        return self.labeller.segments()

