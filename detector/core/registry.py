"""The core's streaming detectors, by name: what the conformance suite runs over.

An explicit table, not a walk over subclasses: a detector added to the core is
added here, and ``tests/core/test_conformance.py`` then holds it to the
contract every streaming detector of the core keeps:

- *online equals batch*: the one-point form (``update``) and the block form
  (``update_many``, ``scan``, ``update_block``) give the same output for any
  split of the same input;
- *state round trip*: saving (``state()``) mid-stream and restoring into a
  fresh detector gives identical later output;
- *bounded state*: the saved state does not grow with the run's length;
- a docstring with an example, and settings that cannot be changed in place.

The detectors' own APIs differ (a trigger takes bare values and says whether it
alarmed; a series detector takes (step, value) points; the run detector and the
labeller take lines of several series), so each :class:`Streaming` entry adapts
them to one input, a run as lines ``step -> {series: value}``, using only the
detector's public methods. O(1) to import: it builds nothing until asked.

>>> sorted(STREAMING)
['cusum_trigger', 'phase_labeller', 'run_detector', 'series_detector']
>>> entry = STREAMING["series_detector"]
>>> detector = entry.make()
>>> entry.feed_line(detector, 0, {"train_loss": 1.0})
[]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.core.labeller import PhaseLabeller
from detector.core.run import RunDetector
from detector.core.series import SeriesDetector
from detector.core.trigger import CusumTrigger
from detector.core.types import infer_spec

# The series the adapters read: a run's four role series, by their usual names.
RUN_SERIES = ("train_loss", "val_loss", "train_acc", "val_acc")
# The one series of the single-series detectors.
SINGLE_SERIES = "train_loss"

Line = Mapping[str, float]
# A block of lines: the steps, and per series its values on every line (NaN where absent).
Block = tuple[np.ndarray, Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Streaming:
    """How to drive one streaming detector of the core.

    ``make()`` builds it with default settings; ``feed_line`` gives it one line
    and returns what it reported (events, or alarm steps for a trigger);
    ``feed_block`` gives it a block of lines through its block form;
    ``save``/``load`` are its state round trip; ``settings`` is its settings
    object (the one its defaults live in).
    """

    cls: type
    series: tuple[str, ...]
    make: Callable[[], Any]
    feed_line: Callable[[Any, int, Line], list[Any]]
    feed_block: Callable[[Any, Block], list[Any]]
    save: Callable[[Any], dict]
    load: Callable[[dict], Any]
    settings: Callable[[Any], Any]


# --- the trigger: bare values in, alarm positions out ------------------------------------


def _trigger_line(trigger: CusumTrigger, step: int, line: Line) -> list[Any]:
    value = line.get(SINGLE_SERIES)
    if value is None or not math.isfinite(value):
        return []
    return [step] if trigger.update(value) else []


def _trigger_block(trigger: CusumTrigger, block: Block) -> list[Any]:
    steps, columns = block
    values = columns[SINGLE_SERIES]
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    alarms: list[Any] = []
    start = 0
    while start < len(values):  # scan stops at each alarm; go on after it
        found = trigger.scan(values[start:])
        if found is None:
            break
        alarms.append(int(steps[start + found]))
        start += found + 1
    return alarms


def _trigger_load(state: dict) -> CusumTrigger:
    trigger = CusumTrigger()
    trigger.load(state)
    return trigger


# --- the series detector: (step, value) points ----------------------------------------


def _series_make() -> SeriesDetector:
    return SeriesDetector(infer_spec(SINGLE_SERIES))


def _series_line(detector: SeriesDetector, step: int, line: Line) -> list[Any]:
    value = line.get(SINGLE_SERIES)
    return [] if value is None else detector.update(step, value)


def _series_block(detector: SeriesDetector, block: Block) -> list[Any]:
    steps, columns = block
    values = columns[SINGLE_SERIES]
    present = ~np.isnan(values)  # NaN marks "absent" in a block
    return detector.update_many(steps[present], values[present])


# --- the run detector: lines of several series -------------------------------------------


def _run_block(detector: RunDetector, block: Block) -> list[Any]:
    steps, columns = block
    parts = {}
    for name, values in columns.items():
        present = ~np.isnan(values)
        if present.any():
            parts[name] = (steps[present], values[present])
    return detector.update_many(parts)


# --- the labeller: role columns, line by line or as a block ---------------------------


def _labeller_make() -> PhaseLabeller:
    labeller = PhaseLabeller()
    labeller.set_specs({name: infer_spec(name) for name in RUN_SERIES})
    return labeller


def _labeller_load(state: dict) -> PhaseLabeller:
    labeller = PhaseLabeller.from_state(state)
    labeller.set_specs({name: infer_spec(name) for name in RUN_SERIES})
    return labeller


class _Lines:
    """A block as :class:`~detector.core.labeller.LineBlock` (values, and where present)."""

    def __init__(self, steps: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        self.steps = steps
        self._columns = columns

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        values = self._columns.get(name)
        return None if values is None else (values, ~np.isnan(values))


def _labeller_block(labeller: PhaseLabeller, block: Block) -> list[Any]:
    steps, columns = block
    return labeller.update_block(steps, _Lines(steps, columns), {})


STREAMING: dict[str, Streaming] = {
    "cusum_trigger": Streaming(
        cls=CusumTrigger, series=(SINGLE_SERIES,), make=CusumTrigger,
        feed_line=_trigger_line, feed_block=_trigger_block,
        save=lambda t: t.state(), load=_trigger_load, settings=lambda t: t,
    ),
    "series_detector": Streaming(
        cls=SeriesDetector, series=(SINGLE_SERIES,), make=_series_make,
        feed_line=_series_line, feed_block=_series_block,
        save=lambda d: d.state(), load=SeriesDetector.from_state, settings=lambda d: d.config,
    ),
    "run_detector": Streaming(
        cls=RunDetector, series=RUN_SERIES, make=RunDetector,
        feed_line=lambda d, step, line: d.update(step, line), feed_block=_run_block,
        save=lambda d: d.state(), load=RunDetector.from_state, settings=lambda d: d.config,
    ),
    "phase_labeller": Streaming(
        cls=PhaseLabeller, series=RUN_SERIES, make=_labeller_make,
        feed_line=lambda lab, step, line: lab.update(step, line), feed_block=_labeller_block,
        save=lambda lab: lab.state(), load=_labeller_load, settings=lambda lab: lab.config,
    ),
}


def block_of(lines: Sequence[tuple[int, Line]], series: Sequence[str]) -> Block:
    """Lines as a block: their steps and, per series, values with NaN where absent. O(lines)."""
    steps = np.array([step for step, _ in lines], dtype=np.int64)
    columns = {
        name: np.array([line.get(name, math.nan) for _, line in lines], dtype=float)
        for name in series
    }
    return steps, columns


__all__ = ["RUN_SERIES", "SINGLE_SERIES", "STREAMING", "Streaming", "block_of"]
