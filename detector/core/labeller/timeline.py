"""The run's phase timeline: boundaries only move forward, and every change is an event.

A collapse is a phase that can end: while any collapse (training or
generalisation scope) is open the phase is ``collapse``; when the last one
ends, the phase returns to what it was before. Boundaries are never moved
after they were streamed, so the streamed timeline equals the final one.
"""

from __future__ import annotations

from detector.core.types import Event, EventKind, Phase, Segment


def make_event(located: int, step: int, kind: EventKind, series: str, confidence: float,
               message: str, evidence: dict[str, str], phase: Phase | None = None) -> Event:
    """An event located at ``located`` and found at ``step`` (both in the evidence)."""
    return Event(step=located, kind=kind, detected_at=step, series=series,
                 confidence=float(confidence), message=message, phase=phase,
                 evidence={**evidence, "detected_at_step": str(step)})


class Timeline:
    """Phase boundaries ``[start_step, phase, confidence]`` and the open collapses.

    O(1) a change; at most ``max_boundaries`` boundaries are kept (the oldest
    after the first are dropped).
    """

    def __init__(self, max_boundaries: int = 1000) -> None:
        self.max_boundaries = max_boundaries
        self.boundaries: list[tuple[int, Phase, float]] = []
        self.collapses: dict[str, int] = {}  # scope -> located step
        self.before_collapse: Phase | None = None

    @property
    def phase(self) -> Phase | None:
        return self.boundaries[-1][1] if self.boundaries else None

    @property
    def collapsed(self) -> bool:
        return bool(self.collapses)

    def start(self, step: int) -> None:
        if not self.boundaries:
            self.boundaries.append((step, Phase.INSTABILITY, 0.5))

    def enter(self, phase: Phase, located: int, step: int, confidence: float, series: str) -> list[Event]:
        """Change phase at ``located`` (never before the current boundary); a PHASE_CHANGE."""
        if self.phase is phase:
            return []
        previous = self.phase
        located = max(located, self.boundaries[-1][0]) if self.boundaries else located
        if self.boundaries and self.boundaries[-1][0] == located:
            self.boundaries[-1] = (located, phase, confidence)
        else:
            self.boundaries.append((located, phase, confidence))
        if len(self.boundaries) > self.max_boundaries:
            del self.boundaries[1]
        return [make_event(
            located, step, EventKind.PHASE_CHANGE, series, confidence,
            f"phase {previous.value if previous else 'none'} -> {phase.value} at step {located}",
            {"from": previous.value if previous else "", "to": phase.value}, phase,
        )]

    def open_collapse(self, scope: str, located: int, step: int, confidence: float,
                      series: str) -> list[Event]:
        if not self.collapses:
            self.before_collapse = self.phase
        self.collapses[scope] = located
        return self.enter(Phase.COLLAPSE, located, step, confidence, series)

    def close_collapse(self, scope: str, located: int, step: int, series: str) -> list[Event]:
        self.collapses.pop(scope, None)
        if self.collapses:
            return []
        back = self.before_collapse or Phase.INSTABILITY
        self.before_collapse = None
        return self.enter(back, located, step, 0.7, series)

    def current(self) -> tuple[Phase | None, int, float]:
        if not self.boundaries:
            return None, 0, 0.0
        start, phase, confidence = self.boundaries[-1]
        return phase, start, confidence

    def segments(self, end_step: int) -> list[Segment]:
        ends = [b[0] for b in self.boundaries[1:]] + [end_step]
        return [Segment(start, end, phase, conf)
                for (start, phase, conf), end in zip(self.boundaries, ends, strict=True)]

    def state(self) -> dict:
        return {
            "max_boundaries": self.max_boundaries,
            "boundaries": [[s, p.value, c] for s, p, c in self.boundaries],
            "collapses": dict(self.collapses),
            "before_collapse": self.before_collapse.value if self.before_collapse else None,
        }

    @classmethod
    def from_state(cls, state: dict) -> Timeline:
        timeline = cls(state["max_boundaries"])
        timeline.boundaries = [(s, Phase(p), c) for s, p, c in state["boundaries"]]
        timeline.collapses = dict(state["collapses"])
        before = state["before_collapse"]
        timeline.before_collapse = Phase(before) if before else None
        return timeline
