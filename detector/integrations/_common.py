"""What the framework callbacks share: a run that is opened, fed and closed without raising.

:class:`TrainingSession` wraps :func:`detector.client.connect` for a
callback: it connects when training starts, turns a framework's logged
metrics (tensors, numpy scalars, numbers, other things) into finite-or-not
floats under valid series names, runs an optional :class:`SpectralProbe`,
remembers whether the detector reported a training collapse (so the callback
can stop the trainer), and closes at the end. Every method catches its own
errors: a failure is logged once on the ``phasewatch.integrations`` logger and
training goes on.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from detector.client import (
    ClientConfig,
    DisabledRun,
    Event,
    Run,
    SeriesSpecLike,
    connect,
    disabled_by_env,
)
from detector.core.types import check_name

logger = logging.getLogger("phasewatch.integrations")

F = TypeVar("F", bound=Callable[..., Any])

STOP_EVENTS = frozenset({"COLLAPSE_ONSET"})
# The collapse scope that stops training. A ``COLLAPSE_ONSET`` with evidence
# ``scope=generalization`` (a held-out metric lost its gains while the training
# metric holds) does not: training still works, it may recover (COLLAPSE_END),
# and whether to stop, roll back or keep the best checkpoint is the user's call
# (``on_event`` sees it). An onset without a scope is a training collapse.
STOP_SCOPE = "training"


def stops_training(event: Event) -> bool:
    """Whether ``event`` is a collapse of training itself (the only one that stops a run).

    >>> onset = Event(run_id="r", step=9, kind="COLLAPSE_ONSET")
    >>> stops_training(onset)
    True
    >>> stops_training(Event(run_id="r", step=9, kind="COLLAPSE_ONSET",
    ...                      evidence={"scope": "generalization"}))
    False
    """
    if event.kind not in STOP_EVENTS:
        return False
    scope = str(event.evidence.get("scope", "") or STOP_SCOPE).strip().lower()
    return scope != "generalization"


def default_run_id(prefix: str) -> str:
    """``<prefix>-YYYYmmdd-HHMMSS-<pid>``: unique enough for one machine."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def series_name(key: object) -> str | None:
    """A framework's metric key as a series name (whitespace → ``_``), or None if unusable."""
    if not isinstance(key, str):
        return None
    name = "_".join(key.split())
    return name if check_name("series name", name) is None else None


def scalar(value: Any) -> float | None:
    """A logged value as a float (NaN and infinities kept), or None if it is not one number.

    Accepts Python and numpy numbers and one-element tensors or arrays; refuses
    booleans, strings and anything with more than one element.

    >>> scalar(3), scalar(float("nan")) != scalar(float("nan")), scalar("x"), scalar(True)
    (3.0, True, None, None)
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    numel = getattr(value, "numel", None)
    size = numel() if callable(numel) else getattr(value, "size", 1)
    if size != 1:
        return None
    item = getattr(value, "item", None)
    if callable(item):
        value = item()
        if isinstance(value, bool):
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class TrainingSession:
    """One training run streamed to a detector by a callback; no method raises.

    Parameters mirror the callbacks'. ``probe_factory`` builds the
    :class:`~detector.probe.SpectralProbe` from the trainer's model once it is
    known (or None).
    """

    def __init__(
        self,
        target: str | None,
        run_id: str | None,
        *,
        default_prefix: str,
        labels: Mapping[str, str] | None = None,
        series: Iterable[SeriesSpecLike] = (),
        on_event: Callable[[Event], object] | None = None,
        stop_on_collapse: bool = False,
        token: str | None = None,
        credentials: Any = None,
        config: ClientConfig | None = None,
        close_timeout: float = 5.0,
        exclude: Iterable[str] = (),
        dedupe: bool = False,
    ) -> None:
        self.explicit_run_id = run_id is not None
        run_id = run_id or default_run_id(default_prefix)
        problem = check_name("run id", run_id)
        if problem is not None:
            raise ValueError(problem)  # at construction, before training starts
        self.target = target
        self.run_id = run_id
        self.resume = False  # set by restore(): a resumed job continues its run
        self.closed_once = False  # a closed run is not reopened (the logger's finalize)
        self.labels = dict(labels or {})
        self.series = list(series)
        self.user_on_event = on_event
        self.stop_on_collapse = stop_on_collapse
        self.token = token
        self.credentials = credentials
        self.config = config
        self.close_timeout = close_timeout
        self.exclude = frozenset(exclude)
        self.dedupe = dedupe
        self.run: Run | DisabledRun | None = None
        self.probe: Any = None
        self.stop_event: Event | None = None
        self._stop = threading.Event()
        self._last: dict[str, float] = {}
        self._warned: set[str] = set()

    # --- lifecycle -------------------------------------------------------------------

    def start(self, model: Any = None, probe_factory: Callable[[Any], Any] | None = None) -> None:
        """Connect (returns at once, even with no detector) and build the probe."""
        if self.run is not None:
            return
        if disabled_by_env():
            self.warn_once("disabled", "phasewatch: $PHASEWATCH_DISABLED is set; run %r is not "
                           "watched", self.run_id, level=logging.INFO)
            return
        try:
            if probe_factory is not None and self.probe is None and model is not None:
                self.probe = probe_factory(model)
        except Exception:
            self.warn_once("probe-setup", "phasewatch: could not set up the spectral probe")
        series = list(self.series)
        if self.probe is not None:
            declared = {s if isinstance(s, str) else getattr(s, "name", None) for s in series}
            declared |= {s.get("name") for s in series if isinstance(s, Mapping)}
            series += [s for s in self.probe.series_specs() if s["name"] not in declared]
        try:
            self.run = connect(
                self.target,
                self.run_id,
                labels=self.labels,
                series=series,
                on_event=self._on_event,
                token=self.token,
                credentials=self.credentials,
                config=self.config,
                resume=self.resume,
                disabled=False,  # checked above, before building the probe
            )
        except Exception:
            self.warn_once("connect", "phasewatch: could not start run %r; training goes on unwatched",
                           self.run_id)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed job continues the same run."""
        return {"run_id": self.run_id}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue the checkpoint's run: its id, unless one was given explicitly
        (then only a matching id resumes); before :meth:`start`."""
        saved = state.get("run_id")
        if not isinstance(saved, str) or check_name("run id", saved) is not None:
            return
        if not self.explicit_run_id:
            self.run_id = saved
        self.resume = self.run_id == saved

    def close(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        self.closed_once = True
        try:
            run.close(timeout=self.close_timeout)
        except Exception:  # close() does not raise; belt and braces
            self.warn_once("close", "phasewatch: error while closing run %r", self.run_id)

    # --- data ------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log the numeric entries of ``metrics`` at ``step``; returns what was logged."""
        run = self.run
        if run is None or not metrics:
            return {}
        try:
            row: dict[str, float] = {}
            for key, raw in metrics.items():
                if key in self.exclude:
                    continue
                name = series_name(key)
                value = scalar(raw)
                if name is None or value is None:
                    continue
                if self.dedupe:
                    last = self._last.get(name)
                    if last is not None and (last == value or (math.isnan(last) and math.isnan(value))):
                        continue
                    self._last[name] = value
                row[name] = value
            if row:
                run.log(int(step), row)
            return row
        except Exception:
            self.warn_once("log", "phasewatch: could not log metrics at step %s", step)
            return {}

    def probe_step(self, step: int) -> None:
        if self.probe is not None and self.run is not None:
            self.probe.log(self.run, int(step))  # never raises

    # --- events ----------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if self.stop_event is None and stops_training(event):
            self.stop_event = event
            self._stop.set()
            if self.stop_on_collapse:
                logger.warning(
                    "phasewatch: %s in run %r at step %d (%s): stopping training",
                    event.kind, event.run_id, event.step, event.message,
                )
        if self.user_on_event is not None:
            self.user_on_event(event)  # the client catches and reports its errors

    def should_stop(self) -> bool:
        """True once a training collapse was reported and ``stop_on_collapse`` is set.

        A generalisation collapse (``scope=generalization``) never stops training.
        """
        return self.stop_on_collapse and self._stop.is_set()

    def warn_once(self, key: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        if key in self._warned:
            logger.debug(message, *args, exc_info=True)
            return
        self._warned.add(key)
        logger.log(level, message, *args, exc_info=level >= logging.WARNING)


class SessionView:
    """What both callbacks expose of their :class:`TrainingSession` (``self.session``)."""

    session: TrainingSession

    @property
    def run(self) -> Any:
        """The :class:`detector.client.Run` while training, else None."""
        return self.session.run

    @property
    def run_id(self) -> str:
        return self.session.run_id

    @property
    def probe(self) -> Any:
        return self.session.probe

    @property
    def stop_event(self) -> Event | None:
        """The training-scope ``COLLAPSE_ONSET`` event received, if any.

        Generalisation collapses are not kept here (they do not stop training);
        ``on_event`` sees them.
        """
        return self.session.stop_event


def guarded(method: F) -> F:
    """Run a callback hook, and log (once per hook) instead of raising into the trainer."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            session = getattr(self, "session", None)
            if session is not None:
                session.warn_once(f"hook-{method.__name__}", "phasewatch: %s failed; training goes on",
                                  method.__name__)
            return None

    return wrapper  # type: ignore[return-value]


def probe_factory(
    probe: Any,
    layers: Any,
    batch: Any,
    every: int,
    probe_kwargs: Mapping[str, Any] | None,
) -> Callable[[Any], Any] | None:
    """A function building a SpectralProbe from the trainer's model, or None when not asked."""
    if probe is not None:
        return lambda _model: probe
    if layers is None or batch is None:
        return None

    def build(model: Any) -> Any:
        from detector.probe import SpectralProbe

        return SpectralProbe(model, layers, batch, every=every, **dict(probe_kwargs or {}))

    return build
