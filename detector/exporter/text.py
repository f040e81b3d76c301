"""The ``/metrics`` text with each run's lines cached per immutable status; see
:mod:`detector.exporter`."""

from __future__ import annotations

import math
import operator
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import (
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from detector.core.types import Phase
from detector.engine import Engine, RunStatus
from detector.events import DomainEvent, RunEnded, RunLeft, RunUpdated
from detector.exporter.collector import (
    _COLLAPSE,
    _EOF,
    _INFO,
    _LAST_STEP,
    _LAST_VALUE,
    _P_VALUE,
    _PHASE,
    _PLATEAU,
    _TAU,
    COLLAPSE_SCOPES,
    DEFAULT_RETENTION,
    DEFAULT_SERIES_RUNS,
    EngineCollector,
    _info_labels,
    collapse_labels,
)

if TYPE_CHECKING:
    from detector.alerts import AlertDispatcher


# --- the /metrics text, with per-run lines cached ----------------------------


def _escape(value: str) -> str:
    """A label value in the text format (as prometheus_client escapes it)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample(name: str, labels: Mapping[str, str], value: float) -> str:
    """One sample line, exactly as ``generate_latest`` writes it (labels sorted by name)."""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {floatToGoString(value)}\n"


def _header(name: str, doc: str, kind: str = "gauge") -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _encode(collector: Collector, open_metrics: bool) -> bytes:
    """One collector's families in the chosen format (OpenMetrics without its ``# EOF``)."""
    if not open_metrics:
        return generate_latest(collector)
    return openmetrics.generate_latest(collector).removesuffix(_EOF)


# The phase samples' text before the run id, per phase (labels sorted: phase, run_id).
_PHASE_PREFIXES = tuple((p, f'{_PHASE[0]}{{phase="{_escape(p.value)}",run_id="') for p in Phase)
# The collapse sample's text per scope label, all but the run id (labels sorted:
# run_id, scope).
_COLLAPSE_AFFIXES = {
    scope: (f'{_COLLAPSE[0]}{{run_id="', f'",scope="{_escape(scope)}"}} 1.0\n')
    for scope in COLLAPSE_SCOPES
}


class _RunText:
    """One run's exposition lines, valid while the engine's status object is the same.

    Made from the run's previous entry where it can: a new status (every batch
    makes one) mostly moves the last step, so the phase lines are kept while
    the phase is, the collapse lines while the open collapse scopes are, and
    the info line while the labels are. Each line is what
    :func:`_sample` writes, built by concatenation (a first scrape of 10 000
    runs formats 70 000 of them), and held encoded: a scrape joins bytes once.
    """

    __slots__ = ("status", "phase", "collapse", "last_step", "info", "_series")

    def __init__(self, status: RunStatus, previous: _RunText | None = None) -> None:
        self.status = status  # held: its identity is the cache key, so it must stay alive
        run_id = _escape(status.run_id)
        if previous is not None and previous.status.phase is status.phase:
            self.phase: bytes = previous.phase
        else:
            self.phase = "".join(
                f'{prefix}{run_id}"}} {"1.0" if status.phase is p else "0.0"}\n'
                for p, prefix in _PHASE_PREFIXES
            ).encode()
        if previous is not None and previous.status.collapse_scopes == status.collapse_scopes:
            self.collapse: bytes = previous.collapse
        else:
            self.collapse = "".join(
                f"{_COLLAPSE_AFFIXES[scope][0]}{run_id}{_COLLAPSE_AFFIXES[scope][1]}"
                for scope in collapse_labels(status.collapse_scopes)
            ).encode()
        self.last_step = (
            f'{_LAST_STEP[0]}{{run_id="{run_id}"}} {floatToGoString(float(status.last_step))}\n'.encode()
            if status.last_step >= 0 else b""
        )
        if previous is not None and previous.status.labels == status.labels:
            self.info: bytes = previous.info
        else:
            # InfoMetricFamily's labels: run_id, then the run's (prefixed, so never run_id).
            self.info = _sample(
                _INFO[0] + "_info", {"run_id": status.run_id, **_info_labels(status.labels)}, 1.0
            ).encode()
        self._series: tuple[bytes, bytes, bytes, bytes] | None = None

    def series(self) -> tuple[bytes, bytes, bytes, bytes]:
        """Plateau, tau, p-value and last-value lines (made on first use: most runs
        are outside the ``series_runs`` budget)."""
        if self._series is None:
            plateau, tau, p_value, value = [], [], [], []
            for s in self.status.series:
                key = {"run_id": self.status.run_id, "series": s.name,
                       "role": s.role.value, "split": s.split.value}
                plateau.append(_sample(_PLATEAU[0], key, float(s.in_plateau)))
                if s.trend_tau is not None and s.trend_p_value is not None:
                    tau.append(_sample(_TAU[0], key, s.trend_tau))
                    p_value.append(_sample(_P_VALUE[0], key, s.trend_p_value))
                value.append(_sample(
                    _LAST_VALUE[0], key, s.last_value if math.isfinite(s.last_value) else math.nan
                ))
            self._series = ("".join(plateau).encode(), "".join(tau).encode(),
                            "".join(p_value).encode(), "".join(value).encode())
        return self._series


_GROUP = 256  # consecutive runs of a snapshot whose lines are joined and kept together


class _Group:
    """The lines of up to ``_GROUP`` consecutive runs of a snapshot, joined per
    family, with what decides whether the next scrape may reuse them: the status
    objects they were made from, and the earliest update of a shown ended run
    (the group changes when it passes the retention). O(runs in the group)."""

    __slots__ = ("statuses", "expires", "entries", "phase", "collapse", "last_step", "info", "live",
                 "updated")

    def __init__(self, statuses: tuple[RunStatus, ...], horizon: float,
                 fresh: Mapping[str, _RunText], cached: Mapping[str, _RunText]) -> None:
        self.statuses = statuses
        self.expires = math.inf
        self.entries: dict[str, _RunText] = {}
        phase, collapse, last_step, info = [], [], [], []
        self.live: list[_RunText] = []
        updated: list[float] = []  # of the live runs, read while each status is at hand
        for status in statuses:
            if status.ended:
                if status.updated_at < horizon:
                    continue
                self.expires = min(self.expires, status.updated_at)
            entry = fresh.get(status.run_id) or cached.get(status.run_id)
            if entry is None or entry.status is not status:
                entry = _RunText(status, entry)
            self.entries[status.run_id] = entry
            phase.append(entry.phase)
            collapse.append(entry.collapse)
            last_step.append(entry.last_step)
            info.append(entry.info)
            if not status.ended:
                self.live.append(entry)
                updated.append(status.updated_at)
        self.phase, self.collapse = b"".join(phase), b"".join(collapse)
        self.last_step, self.info = b"".join(last_step), b"".join(info)
        self.updated = np.asarray(updated, dtype=np.float64)


class MetricsExposition:
    """The ``/metrics`` text: per-run lines cached per :class:`RunStatus` object.

    ``render()`` costs the engine's snapshot (O(runs)), an identity comparison of
    each group of ``_GROUP`` runs with the last scrape's (in C), O(``_GROUP``)
    look-ups and a join for each group with a changed or expired run (plus the
    formatting of the runs whose status changed, where not made already), and one
    join of the groups' lines; the
    engine-wide families (O(kinds)) and ``registry`` (process, platform and GC
    collectors by default) go through prometheus_client's ``generate_latest``.
    The cache holds the shown runs of the last scrape, nothing else. Scrapes are
    serialised (one lock), which also keeps them from formatting the same runs twice.

    A run's lines are also made when the engine publishes its new status
    (``RunUpdated``, ``RunEnded`` on :attr:`Engine.events`), in the thread that
    ingested the batch, O(1) a batch: a scrape then finds them made, so the
    first scrape after 10 000 runs were declared is look-ups, not 60 000
    formatted samples. What was made since the last scrape is held until the next
    (at most one entry a run).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        alerts: AlertDispatcher | None = None,
        retention: float = DEFAULT_RETENTION,
        series_runs: int = DEFAULT_SERIES_RUNS,
        registry: Collector | None = None,
    ) -> None:
        self.collector = EngineCollector(
            engine, alerts=alerts, retention=retention, series_runs=series_runs, per_run=False
        )
        self.engine = engine
        self.registry = registry
        self._cache: dict[str, _RunText] = {}
        self._groups: list[_Group] = []  # the last scrape's, in the snapshot's order of runs
        self._lock = threading.Lock()
        self._fresh: dict[str, _RunText] = {}  # made on the engine's messages since the last scrape
        self._fresh_lock = threading.Lock()
        engine.events.subscribe(self._on_message)

    def _on_message(self, message: DomainEvent) -> None:
        if isinstance(message, RunUpdated | RunEnded):
            status = message.status
            with self._fresh_lock:
                previous = self._fresh.get(status.run_id) or self._cache.get(status.run_id)
                if previous is None or previous.status is not status:
                    self._fresh[status.run_id] = _RunText(status, previous)
        elif isinstance(message, RunLeft):
            with self._fresh_lock:
                self._fresh.pop(message.run_id, None)

    def render(self, names: Collection[str] | None = None, *, open_metrics: bool = False) -> bytes:
        """The exposition (text format 0.0.4, or OpenMetrics 1.0); with ``names``,
        only those samples' families, as prometheus_client's ``name[]`` filter does."""
        with self._lock:
            snap = self.engine.snapshot()
            horizon = time.time() - self.collector.retention
            with self._fresh_lock:
                fresh, self._fresh = self._fresh, {}
            # Groups of runs whose statuses are the same objects as at the last scrape
            # (and none of whose ended runs has since passed the retention) keep their
            # joined lines: a scrape with 10 000 runs of which a few hundred changed
            # formats and joins those groups only.
            old, groups = self._groups, []
            runs = snap.runs
            for g, first in enumerate(range(0, len(runs), _GROUP)):
                chunk = runs[first:first + _GROUP]
                prev = old[g] if g < len(old) else None
                if (prev is not None and len(prev.statuses) == len(chunk) and prev.expires >= horizon
                        and all(map(operator.is_, chunk, prev.statuses))):
                    groups.append(prev)
                else:
                    groups.append(_Group(chunk, horizon, fresh, self._cache))
            self._groups = groups
            cache: dict[str, _RunText] = {}
            for group in groups:
                cache.update(group.entries)
            self._cache = cache
            live = list(chain.from_iterable(group.live for group in groups))
            updated = np.concatenate([group.updated for group in groups]) if groups else np.empty(0)
            in_budget = [live[i].series() for i in _latest(updated, self.collector.series_runs)]

        # In 0.0.4 an info family is a gauge named with its _info suffix; in
        # OpenMetrics it is of type info, named without it. Samples are the same.
        info = (_INFO, "info") if open_metrics else ((_INFO[0] + "_info", _INFO[1]), "gauge")
        families: list[tuple[tuple[str, str], str, str, list[bytes]]] = [
            (_PHASE, "gauge", _PHASE[0], [group.phase for group in groups]),
            (_COLLAPSE, "gauge", _COLLAPSE[0], [group.collapse for group in groups]),
            (_LAST_STEP, "gauge", _LAST_STEP[0], [group.last_step for group in groups]),
            (info[0], info[1], _INFO[0] + "_info", [group.info for group in groups]),
        ]
        for i, family in enumerate((_PLATEAU, _TAU, _P_VALUE, _LAST_VALUE)):
            families.append((family, "gauge", family[0], [lines[i] for lines in in_budget]))
        parts: list[bytes] = []
        for (name, doc), kind, sample_name, lines in families:
            if names is None:
                parts.append(_header(name, doc, kind).encode())
                parts.extend(lines)
            elif sample_name in names and (chosen := [line for line in lines if line]):
                parts.append(_header(name, doc, kind).encode())  # as name[] does: no empty families
                parts.extend(chosen)
        engine_wide = _Fixed(list(self.collector.engine_families(snap, active=len(live))))
        others = [engine_wide] if self.registry is None else [engine_wide, self.registry]
        for collector in others:
            if names is not None:
                collector = _Restricted(collector, names)
            parts.append(_encode(collector, open_metrics))
        if open_metrics:
            parts.append(_EOF)
        # One join of the lines as they are held (bytes): no multi-MB str and its
        # encoding beside the body, and no copy of the body per appended part.
        return b"".join(parts)


def _latest(updated: Sequence[float] | np.ndarray, count: int) -> list[int]:
    """Indices of the ``count`` largest of ``updated``, largest first, ties in their
    order: ``sorted(range(len(updated)), key=updated.__getitem__, reverse=True)[:count]``
    (``EngineCollector.series_shown``'s order), by a stable argsort. O(n log n) in C.

    >>> _latest([3.0, 5.0, 3.0, 1.0], 3)
    [1, 0, 2]
    """
    order = np.argsort(-np.asarray(updated, dtype=np.float64), kind="stable")[:count]
    return order.tolist()


class _Fixed:
    """A collector of families already built (one scrape's engine-wide families)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


class _Restricted:
    """``name[]`` filtering: what ``CollectorRegistry.restricted_registry`` does."""

    def __init__(self, collector: Collector, names: Collection[str]) -> None:
        self.collector, self.names = collector, set(names)

    def collect(self) -> Iterator[Metric]:
        for metric in self.collector.collect():
            samples = [s for s in metric.samples if s.name in self.names]
            if samples:
                restricted = Metric(metric.name, metric.documentation, metric.type)
                restricted.samples = samples
                yield restricted
