"""Run-level detection: one :class:`SeriesDetector` per series plus the labeller.

``update(step, row)`` takes one logged line (every series' value at that step);
``update_many(columns)`` takes a block of lines as columns and gives the same
events and state. Lines must come in increasing step order (the engine's
reorder buffer sees to that). Cost per line is O(series) plus the bounded
localisation work; in blocks, the series detectors run vectorised and the
labeller (``PhaseLabeller.update_block``) reads its role columns once and runs
its O(1) rules on each line; the event economy then decides which series
events are reported (counted in lines, so whatever the batching).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from detector.core.economy import EventEconomy
from detector.core.labeller import LabellerConfig, PhaseLabeller
from detector.core.series import SeriesConfig, SeriesDetector
from detector.core.types import Event, Phase, Segment, SeriesSpec, infer_spec
from detector.errors import InvalidArgument

BlockColumns = Mapping[str, tuple[np.ndarray, np.ndarray]]
_INT64 = np.dtype(np.int64)
_FLOAT64 = np.dtype(np.float64)


def distinct_steps(steps: np.ndarray) -> np.ndarray:
    """``np.unique(steps)`` (sorted distinct values) by a sort and one comparison of
    neighbours: numpy 2's ``np.unique`` took 4 to 6 times as long on the sizes of a
    batch's steps (hundreds to tens of thousands), per batch on the engine's path.
    O(n log n)."""
    ordered = np.sort(steps)
    keep = np.empty(len(ordered), dtype=bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


STATE_VERSION = 1  # of RunDetector.state(); the series, labeller and economy states carry their own


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

    def __init__(self, config: RunDetectorConfig | None = None, keep_events: int = 1000) -> None:
        self.config = config or RunDetectorConfig()
        self.specs: dict[str, SeriesSpec] = {}
        self.detectors: dict[str, SeriesDetector] = {}
        self.labeller = PhaseLabeller(self.config.labeller)
        self.economy = EventEconomy()
        self.lines = 0  # lines taken (the economy's clock)
        # The newest events, for doctests and tools (callers keep their own history;
        # the engine keeps none here: ``keep_events=0``).
        self.events_so_far: deque[Event] = deque(maxlen=keep_events)

    def add_series(self, spec: SeriesSpec) -> None:
        self.add_series_many((spec,))

    def add_series_many(self, specs: Iterable[SeriesSpec]) -> None:
        """``add_series`` for each spec in turn (one already here is skipped); the
        labeller's roles, a function of all the specs, are resolved once at the
        end: O(series), not O(series²) for a run declaring its series together."""
        added = False
        try:
            for spec in specs:
                if spec.name not in self.specs:
                    self.specs[spec.name] = spec
                    self.detectors[spec.name] = SeriesDetector(spec, self.config.series)
                    added = True
        finally:  # also after a spec that failed: the roles of what was added
            if added:
                self.labeller.set_specs(self.specs)

    def update(self, step: int, row: Mapping[str, float]) -> list[Event]:
        """Take one line; returns the events it caused, series events first."""
        series_events: list[Event] = []
        for name in sorted(row):
            if name not in self.detectors:
                self.add_series(infer_spec(name))
            series_events += self.detectors[name].update(step, float(row[name]))
        run_events = self.labeller.update(step, row)
        self.lines += 1
        events = series_events + run_events
        events = self.economy.filter(events, [self.lines] * len(events), self.specs)
        self.events_so_far.extend(events)
        return events

    def update_many(self, columns: BlockColumns, lines: np.ndarray | None = None) -> list[Event]:
        """Take a block of lines as columns: name -> (steps, values), each series'
        steps strictly increasing and above every step taken before. Equal to
        :meth:`update` on each line in step order (a line: the step's values of
        the series that have one), events in the same order.

        ``lines`` is the sorted union of the steps, if the caller has it. Each
        series detector takes its points in blocks (``update_many``); then the
        labeller runs over the block line by line on its role columns, each
        line's series events (found by their ``detected_at``, series in name
        order) first. Blocks are cut where a series not seen before starts
        (roles change there in the per-line path too). O(points) in numpy plus
        O(1) Python per line; no Python object per point.
        """
        cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (steps, values) in columns.items():
            # Taken as they are when already flat int64 / float64 arrays (the engine's
            # blocks): two numpy calls a series a block saved.
            if not (type(steps) is np.ndarray and steps.dtype == _INT64 and steps.ndim == 1):
                steps = np.asarray(steps, dtype=np.int64).reshape(-1)
            if not (type(values) is np.ndarray and values.dtype == _FLOAT64 and values.ndim == 1):
                values = np.asarray(values, dtype=np.float64).reshape(-1)
            if len(steps) != len(values):
                raise InvalidArgument(f"series {name!r}: steps and values differ in length")
            if len(steps):
                cols[name] = (steps, values)
        if not cols:
            return []
        if lines is None:
            lines = distinct_steps(np.concatenate([steps for steps, _ in cols.values()]))
        # Series not seen before join at their first step, in name order, as update() adds them.
        joins: dict[int, list[str]] = {}
        for name in sorted(cols):
            if name not in self.detectors:
                joins.setdefault(int(cols[name][0][0]), []).append(name)
        cuts = sorted(int(np.searchsorted(lines, step)) for step in joins)
        events: list[Event] = []
        lo = 0
        for hi in [*cuts, len(lines)]:
            if hi > lo:
                events += self._update_chunk(lines[lo:hi], cols)
            if hi < len(lines):
                for name in joins[int(lines[hi])]:
                    self.add_series(infer_spec(name))
            lo = hi
        if not events:
            self.lines += len(lines)
            return events
        # Each event's line: the economy counts in lines, whatever the batching.
        at = (self.lines + 1 + np.searchsorted(lines, [e.detected_at for e in events])).tolist()
        self.lines += len(lines)
        events = self.economy.filter(events, at, self.specs)
        self.events_so_far.extend(events)
        return events

    def _update_chunk(self, lines: np.ndarray, cols: BlockColumns) -> list[Event]:
        """Lines ``lines`` (a chunk of a block): the series' points in them, then the labeller."""
        first, last = int(lines[0]), int(lines[-1])
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        detectors = self.detectors
        for name in sorted(cols):
            if name not in detectors:
                continue
            steps, values = cols[name]
            if first <= steps[0] and steps[-1] <= last:  # all in the chunk (a block of one chunk)
                parts[name] = (steps, values)
                continue
            lo, hi = np.searchsorted(steps, (first, last + 1))
            if hi > lo:
                parts[name] = (steps[lo:hi], values[lo:hi])
        if not parts:
            return []
        at_line: dict[int, list[Event]] = {}
        for name, (steps, values) in parts.items():
            for event in self.detectors[name].update_many(steps, values):
                # A series event is found at the point it is stamped detected_at.
                at_line.setdefault(event.detected_at, []).append(event)
        events = self.labeller.update_block(lines, _BlockColumns(lines, parts), at_line)
        if at_line:  # cannot happen: every event is stamped with one of its points' steps
            raise AssertionError(f"series events at steps outside the block: {sorted(at_line)}")
        return events

    def finish(self) -> list[Event]:
        """The run has ended: localise every series' last segment once more.

        Change points after the last trigger alarm are otherwise never
        reported. Events are located earlier and ``detected_at`` is each
        series' last step; the labeller sees them as it sees any series event.
        Call once, after the last point. O(series × window).
        """
        series_events: list[Event] = []
        for name in sorted(self.detectors):
            series_events += self.detectors[name].finish()
        if self.labeller.last_step is None:
            return series_events
        events = series_events + self.labeller.finish()
        events = self.economy.filter(events, [self.lines] * len(events), self.specs)
        self.events_so_far.extend(events)
        return events

    def state(self) -> dict:
        """Everything needed to resume this run's detection (a checkpoint)."""
        return {
            "version": STATE_VERSION,
            "series": {name: det.state() for name, det in self.detectors.items()},
            "labeller": self.labeller.state(),
            "economy": self.economy.state(),
            "lines": self.lines,
        }

    @classmethod
    def from_state(cls, state: dict, config: RunDetectorConfig | None = None,
                   keep_events: int = 1000) -> RunDetector:
        version = state.get("version", 1)  # unversioned states are version 1, the same fields
        if version != STATE_VERSION:
            raise InvalidArgument(f"run detector state version {version} is not supported "
                                  f"(this version reads {STATE_VERSION})")
        det = cls(config, keep_events)
        for name, series_state in state["series"].items():
            series = SeriesDetector.from_state(series_state, det.config.series)
            det.specs[name] = series.spec
            det.detectors[name] = series
        det.labeller = PhaseLabeller.from_state(state["labeller"])
        if "economy" in state:  # checkpoints before the economy have none: a fresh one
            det.economy = EventEconomy.from_state(state["economy"])
            det.lines = state["lines"]
        det.labeller.set_specs(det.specs)
        return det

    def current_phase(self) -> tuple[Phase | None, int, float]:
        return self.labeller.current()

    def collapse_scopes(self) -> tuple[str, ...]:
        """The scopes of the collapses open now, sorted (see :class:`PhaseLabeller`).

        The phase is ``collapse`` while any is open, whatever its scope: this says
        which, so that a training collapse and a generalisation one can be told apart.
        """
        return self.labeller.collapse_scopes()

    def segments(self) -> list[Segment]:
        return self.labeller.segments()



class _BlockColumns:
    """A block's columns as the labeller reads them: per series, its values on
    every line of the block (NaN where absent) and where it is present. Built only
    for the series asked for (the labeller's roles), O(points) each."""

    __slots__ = ("_all", "_parts", "steps")

    def __init__(self, lines: np.ndarray, parts: BlockColumns) -> None:
        self.steps = lines
        self._parts = parts
        self._all: np.ndarray | None = None  # "present on every line", shared by the columns asked for

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        part = self._parts.get(name)
        if part is None:
            return None
        steps, values = part
        if len(steps) == len(self.steps):
            if self._all is None:
                self._all = np.ones(len(values), dtype=bool)
            return values, self._all
        rows = np.searchsorted(self.steps, steps)
        full = np.full(len(self.steps), np.nan)
        present = np.zeros(len(self.steps), dtype=bool)
        full[rows] = values
        present[rows] = True
        return full, present
