"""Run-level detection: per-series detectors plus the phase labeller.

(Interface in place; detection internals are being written.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from detector.core.types import Event, Phase, Segment, SeriesSpec


@dataclass(frozen=True)
class RunDetectorConfig:
    pass


class RunDetector:
    def __init__(self, config: RunDetectorConfig | None = None) -> None:
        self.config = config or RunDetectorConfig()
        self.specs: dict[str, SeriesSpec] = {}
        self._first_step: int | None = None
        self._last_step: int | None = None

    def add_series(self, spec: SeriesSpec) -> None:
        self.specs[spec.name] = spec

    def update(self, step: int, row: Mapping[str, float]) -> list[Event]:
        if self._first_step is None:
            self._first_step = step
        self._last_step = step
        return []

    def current_phase(self) -> tuple[Phase | None, int, float]:
        if self._first_step is None:
            return None, 0, 0.0
        return Phase.INSTABILITY, self._first_step, 0.5

    def segments(self) -> list[Segment]:
        if self._first_step is None:
            return []
        return [Segment(self._first_step, self._last_step + 1, Phase.INSTABILITY, 0.5)]
