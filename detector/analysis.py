"""Offline analysis for notebooks and scripts: ``detector.analyze(data) -> Analysis``.

The same path as ``phasewatch analyze``: the data become columns (a log file
through :func:`detector.logfile.read_log`), one :class:`~detector.engine.Engine`
runs over them as one run (:func:`analyze_columns`, which the command calls
too), and the views are those of ``analyze --json``. Nothing here starts a
server or touches the network.

``data`` may be:

- a path (``str`` or ``os.PathLike``): any log ``phasewatch analyze`` reads
  (JSON Lines, CSV, ``trainer_state.json``, TensorBoard event files, or a
  directory of them);
- a pandas ``DataFrame`` in wide form, one column per series: the step is a
  column named like a step (``step``, ``global_step``, ``_step``, ...) if there
  is one, else the index; ``epoch`` and non-numeric columns are not series.
  A NaN cell is no point (pandas has no other way to say "not logged at this
  step", as in a Lightning ``metrics.csv``); a diverged value is ``inf``;
- a mapping of series name to ``(steps, values)``, to a sequence of values
  (steps 0, 1, 2, ...) or to a pandas ``Series`` (the index is the step).
  Here NaN is a point: a diverged value, as the wire protocol has it.

The tables (``segments``, ``events``, ``change_points``) are pandas
``DataFrame`` objects when pandas is installed (the ``notebook`` extra), else
lists of dicts with the same keys; ``plot()`` returns a matplotlib ``Figure``
(the ``plot`` extra). Cost: that of the engine, O(points) with a bounded
per-series window (see :mod:`detector.engine`).

>>> from importlib import resources
>>> import detector
>>> run = resources.files("detector.data") / "grok_add_0.jsonl"  # a real grokking run
>>> analysis = detector.analyze(str(run))
>>> analysis  # doctest: +ELLIPSIS
Analysis(series=12, points=5004, segments=..., events=..., change_points=...)
>>> list(analysis.segments.columns)
['start_step', 'end_step', 'phase', 'confidence']
>>> "GROKKING_ONSET" in set(analysis.events["kind"])
True
>>> list(analysis.change_points.columns), set(analysis.change_points["series"]) <= set(analysis.columns)
(['series', 'step'], True)
>>> figure = analysis.plot()
>>> type(figure).__name__, len(figure.axes) > 0
('Figure', True)

A mapping works the same way:

>>> import numpy as np
>>> loss = np.r_[np.linspace(3.0, 2.0, 400), np.linspace(2.0, 0.1, 400)]
>>> small = detector.analyze({"train_loss": loss})
>>> small.columns["train_loss"][0][:3].tolist()
[0, 1, 2]
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.engine import Engine
from detector.events import EventHub
from detector.logfile import COUNTERS, STEP_KEYS, Columns, count_points, iter_batches, read_log
from detector.report import View, change_points, event_view, segment_view

__all__ = ["Analysis", "analyze", "analyze_columns"]

# analyze feeds the engine in big batches: the engine's output does not depend
# on batching, and fewer calls mean less per-call overhead.
ANALYZE_BATCH_POINTS = 65_536

_SEGMENT_KEYS = ("start_step", "end_step", "phase", "confidence")
_EVENT_KEYS = ("step", "kind", "series", "confidence", "message", "phase", "detected_at_step",
               "evidence")


def analyze_columns(
    columns: Columns, run_id: str = "run", *, events: EventHub | None = None
) -> tuple[list[View], list[View], Counter[str]]:
    """Run the engine over columns as one run (the path of ``phasewatch analyze``).

    Returns the segment and event views and the points the engine did not
    use, counted by reason. The engine publishes to ``events`` (see
    :mod:`detector.events`) as a server's engine does, so the same sinks
    (alerts) can subscribe.
    """
    engine = Engine(events=events)
    engine.start_run(run_id)
    rejected: Counter[str] = Counter()
    for batch in iter_batches(columns, ANALYZE_BATCH_POINTS):
        rejected.update(engine.ingest(run_id, batch).rejected_by_reason)
    engine.end_run(run_id)
    segments, found = engine.timeline(run_id)
    return [segment_view(s) for s in segments], [event_view(e) for e in found], rejected


@dataclass(frozen=True)
class Analysis:
    """Phases, events and change points of one run, from :func:`analyze`.

    ``columns`` are the series analysed (name -> (steps, values)),
    ``rejected`` the points the engine did not use, by reason.
    """

    columns: Columns
    segment_views: tuple[View, ...]
    event_views: tuple[View, ...]
    rejected: Mapping[str, int]
    title: str = ""

    @property
    def segments(self) -> Any:
        """Phase segments: ``start_step``, ``end_step`` (exclusive), ``phase``, ``confidence``."""
        return _table(self.segment_views, _SEGMENT_KEYS)

    @property
    def events(self) -> Any:
        """Events in step order: ``step``, ``kind``, ``series``, ``confidence``,
        ``message``, ``phase``, ``detected_at_step``, ``evidence``."""
        return _table(self.event_views, _EVENT_KEYS)

    @property
    def change_points(self) -> Any:
        """One row per change point: ``series``, ``step``."""
        found = change_points(self.event_views, self.columns)
        rows = [{"series": name, "step": step} for name, steps in found.items() for step in steps]
        return _table(rows, ("series", "step"))

    def plot(self, *, title: str | None = None) -> Any:
        """The series with phases shaded and events marked, as a matplotlib
        ``Figure`` (shown by a notebook; ``.savefig(path)`` writes it)."""
        from detector.plot import timeline_figure

        return timeline_figure(
            self.columns, self.segment_views, self.event_views,
            title=self.title if title is None else title,
        )

    def to_dict(self) -> View:
        """The ``phasewatch analyze --json`` document."""
        return {
            "segments": list(self.segment_views),
            "events": list(self.event_views),
            "change_points": change_points(self.event_views, self.columns),
        }

    def __repr__(self) -> str:
        found = change_points(self.event_views, self.columns)
        return (
            f"Analysis(series={len(self.columns)}, points={count_points(self.columns)}, "
            f"segments={len(self.segment_views)}, events={len(self.event_views)}, "
            f"change_points={sum(len(s) for s in found.values())})"
        )


def analyze(data: Any, *, run_id: str = "run") -> Analysis:
    """Detect phases, events and change points in a run's metrics, offline.

    ``data``: a log file path, a pandas DataFrame or a mapping (see the
    module's docstring). Raises :class:`~detector.errors.LogFileError` for a
    bad log file and ``ValueError`` for data it cannot read as series; what
    is read but not used is a ``UserWarning``.
    """
    title = ""
    if isinstance(data, (str, os.PathLike)):
        columns = read_log(data, warn=lambda message: warnings.warn(message, stacklevel=3))
        title = os.path.basename(os.fspath(data).rstrip("/"))
    elif _is_dataframe(data):
        columns = _from_dataframe(data)
    elif isinstance(data, Mapping):
        columns = {str(name): _series(str(name), value) for name, value in data.items()}
    else:
        raise TypeError(
            f"analyze() takes a path, a pandas DataFrame or a mapping, not {type(data).__name__}"
        )
    segments, events, rejected = analyze_columns(columns, run_id)
    if rejected:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items()))
        warnings.warn(f"points not used: {reasons}", stacklevel=2)
    return Analysis(columns, tuple(segments), tuple(events), dict(rejected), title)


# --- inputs ----------------------------------------------------------------


def _is_dataframe(data: Any) -> bool:
    return type(data).__name__ == "DataFrame" and hasattr(data, "columns")


def _from_dataframe(frame: Any) -> Columns:
    names = [str(c) for c in frame.columns]
    step_name = next((key for key in STEP_KEYS if key in names), None)
    if step_name is not None:
        steps_all = _steps(frame[step_name].to_numpy(), f"column {step_name!r}")
    else:
        steps_all = _steps(frame.index.to_numpy(), "the index (no step column)")
    columns: Columns = {}
    for column, name in zip(frame.columns, names, strict=True):
        if name in COUNTERS:
            continue
        raw = frame[column].to_numpy()
        if raw.dtype.kind not in "biuf":
            continue  # text, timestamps: not series
        values = raw.astype(np.float64)
        present = ~np.isnan(values)
        columns[name] = (steps_all[present], values[present])
    if not columns:
        raise ValueError("the DataFrame has no numeric columns besides the step")
    return columns


def _series(name: str, value: Any) -> tuple[np.ndarray, np.ndarray]:
    if type(value).__name__ == "Series" and hasattr(value, "index"):
        return _steps(value.index.to_numpy(), f"the index of {name!r}"), _values(name, value.to_numpy())
    if isinstance(value, tuple) and len(value) == 2:
        steps = _steps(np.asarray(value[0]), f"the steps of {name!r}")
        values = _values(name, value[1])
        if len(steps) != len(values):
            raise ValueError(f"series {name!r} has {len(steps)} steps but {len(values)} values")
        return steps, values
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        values = _values(name, value)
        return np.arange(len(values), dtype=np.int64), values
    raise ValueError(
        f"series {name!r}: expected (steps, values), a sequence of values or a pandas Series"
    )


def _steps(raw: np.ndarray, what: str) -> np.ndarray:
    if raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)):
        raw = raw.astype(np.int64)
    if raw.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer steps, got {raw.dtype}")
    if len(raw) and raw.min() < 0:
        raise ValueError(f"{what} has a negative step: {int(raw.min())}")
    return raw.astype(np.int64)


def _values(name: str, raw: Any) -> np.ndarray:
    try:
        return np.asarray(raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"series {name!r} holds values that are not numbers") from None


def _table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return [dict(row) for row in rows]
    return pd.DataFrame([{k: row.get(k) for k in keys} for row in rows], columns=list(keys))
