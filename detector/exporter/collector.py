"""The Prometheus collector: every family built from the engine's immutable snapshot
(and the alert dispatcher's counters) at scrape time; see :mod:`detector.exporter`."""

from __future__ import annotations

import math
import platform
import re
import time
from collections.abc import Iterator, Mapping
from operator import attrgetter
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from detector.core.types import EventKind, Phase
from detector.engine import DETECTION_BUCKETS, Engine, EngineSnapshot, RunStatus
from detector.errors import InvalidArgument

if TYPE_CHECKING:
    from detector.alerts import AlertDispatcher


CONTENT_TYPE_OPENMETRICS = openmetrics.CONTENT_TYPE_LATEST
_EOF = b"# EOF\n"

DEFAULT_RETENTION = 600.0
DEFAULT_SERIES_RUNS = 100

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")

# Per-run families: (name, help), shared by the collector and the cached text.
_PHASE = ("phasewatch_run_phase",
          "1 for the phase each run is in, 0 for the others (all 0 before the first point).")
_COLLAPSE = ("phasewatch_run_collapse",
             "1 for each scope (training, generalization) of a collapse open in each run; "
             "no sample for a scope with none open.")
_LAST_STEP = ("phasewatch_run_last_step", "Greatest step received for each run.")
_INFO = ("phasewatch_run", "Labels of each run, as label_<key>.")  # exposed as phasewatch_run_info
_PLATEAU = ("phasewatch_series_plateau",
            "1 while a headline series is on a plateau (slope equivalence test), else 0.")
_TAU = ("phasewatch_series_trend_tau",
        "Kendall's tau of a headline series over its last 20 step bins "
        "(about the last half of its steps; -1 to 1).")
_P_VALUE = ("phasewatch_series_trend_p_value", "Mann-Kendall p-value of that trend.")
_LAST_VALUE = ("phasewatch_series_last_value",
               "Last value received for a headline series (NaN when non-finite).")
_SERIES_LABELS = ["run_id", "series", "role", "split"]

# The values of phasewatch_run_collapse's scope label: the labeller's collapse
# scopes (a COLLAPSE_ONSET's ``scope`` evidence). Only open collapses have a
# sample (value 1): the phase gauge already says whether a run is collapsing,
# so a 0 would add nothing but 2 series to every run (+33% of the per-run
# series, +38% of the exposition's bytes at 10 000 runs) for the few that
# collapse. A collapse that ends leaves the exposition, and Prometheus marks
# its series stale at the next scrape, which resolves its alert. The rules
# tell an older detector (no such family) from "no collapse open" by the
# phase: a run in the collapse phase always has a sample here.
SCOPE_TRAINING = "training"
SCOPE_GENERALIZATION = "generalization"
COLLAPSE_SCOPES = (SCOPE_TRAINING, SCOPE_GENERALIZATION)

_UPDATED_AT = attrgetter("updated_at")


def label_name(key: str) -> str:
    """A run label key as a Prometheus label name, prefixed ``label_``.

    The prefix (as kube-state-metrics does) keeps user keys from colliding
    with ``run_id`` or the reserved ``__`` names and from starting with a digit.

    >>> label_name("team"), label_name("data.set-v2"), label_name("2nd")
    ('label_team', 'label_data_set_v2', 'label_2nd')
    """
    return "label_" + _INVALID_LABEL_CHARS.sub("_", key)


def collapse_labels(scopes: tuple[str, ...]) -> tuple[str, ...]:
    """The ``scope`` labels of ``phasewatch_run_collapse`` for a run's open
    collapses, in :data:`COLLAPSE_SCOPES` order. O(scopes).

    A scope other than ``generalization`` counts as a training collapse, as
    :func:`detector.alerts.rules.collapse_scope` counts it: a collapse the
    exporter does not know by name still pages, and the label takes only
    the two values.

    >>> collapse_labels(()), collapse_labels(("generalization", "training")), collapse_labels(("x",))
    ((), ('training', 'generalization'), ('training',))
    """
    training = any(scope != SCOPE_GENERALIZATION for scope in scopes)
    return tuple(scope for scope, is_open in zip(
        COLLAPSE_SCOPES, (training, SCOPE_GENERALIZATION in scopes), strict=True) if is_open)


def _info_labels(labels: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in sorted(labels):  # sorted: which of two colliding keys wins is stable
        out.setdefault(label_name(key), labels[key])
    return out


class EngineCollector(Collector):
    """Per-run and engine-wide metrics; ``collect()`` is O(runs + kinds).

    ``per_run=False`` leaves the per-run and per-series families out (what
    :class:`MetricsExposition` renders from its own cache).

    >>> from prometheus_client import CollectorRegistry
    >>> engine = Engine()
    >>> _ = engine.ingest("r", {"loss": ([0, 1, 2, 3], [1.0, 0.9, 0.8, 0.7])})
    >>> registry = CollectorRegistry()
    >>> registry.register(EngineCollector(engine))
    >>> registry.get_sample_value("phasewatch_ingested_points_total")
    4.0
    """

    def __init__(
        self,
        engine: Engine,
        *,
        alerts: AlertDispatcher | None = None,
        retention: float = DEFAULT_RETENTION,
        series_runs: int = DEFAULT_SERIES_RUNS,
        per_run: bool = True,
    ) -> None:
        if retention < 0 or series_runs < 0:
            raise InvalidArgument("retention and series_runs must not be negative")
        self.engine = engine
        self.alerts = alerts
        self.retention = retention
        self.series_runs = series_runs
        self.per_run = per_run

    def collect(self) -> Iterator[Metric]:
        snap = self.engine.snapshot()
        if self.per_run:
            yield from self._run_families(self.shown(snap.runs, time.time()))
            yield from self._series_gauges(snap.runs)
        yield from self.engine_families(snap)

    def shown(self, runs: tuple[RunStatus, ...], now: float) -> list[RunStatus]:
        """The runs in the per-run families: ended ones only for ``retention`` seconds."""
        # Ended runs stay for `retention`, so the last phase is scraped and rules see it.
        return [r for r in runs if not (r.ended and now - r.updated_at > self.retention)]

    def series_shown(self, runs: tuple[RunStatus, ...]) -> list[RunStatus]:
        """The runs with per-series gauges: the ``series_runs`` live ones updated last."""
        live = [r for r in runs if not r.ended]
        live.sort(key=_UPDATED_AT, reverse=True)  # stable: ties keep the engine's order
        return live[: self.series_runs]

    def _run_families(self, shown: list[RunStatus]) -> Iterator[Metric]:
        phase = GaugeMetricFamily(*_PHASE, labels=["run_id", "phase"])
        collapse = GaugeMetricFamily(*_COLLAPSE, labels=["run_id", "scope"])
        last_step = GaugeMetricFamily(*_LAST_STEP, labels=["run_id"])
        info = InfoMetricFamily(*_INFO, labels=["run_id"])
        for run in shown:
            for candidate in Phase:
                phase.add_metric([run.run_id, candidate.value], float(run.phase is candidate))
            for scope in collapse_labels(run.collapse_scopes):
                collapse.add_metric([run.run_id, scope], 1.0)
            if run.last_step >= 0:  # -1 means no point yet: no sample beats a fake one
                last_step.add_metric([run.run_id], float(run.last_step))
            info.add_metric([run.run_id], _info_labels(run.labels))
        yield from (phase, collapse, last_step, info)

    def _series_gauges(self, runs: tuple[RunStatus, ...]) -> Iterator[Metric]:
        plateau = GaugeMetricFamily(*_PLATEAU, labels=_SERIES_LABELS)
        tau = GaugeMetricFamily(*_TAU, labels=_SERIES_LABELS)
        p_value = GaugeMetricFamily(*_P_VALUE, labels=_SERIES_LABELS)
        value = GaugeMetricFamily(*_LAST_VALUE, labels=_SERIES_LABELS)
        for run in self.series_shown(runs):
            for series in run.series:
                key = [run.run_id, series.name, series.role.value, series.split.value]
                plateau.add_metric(key, float(series.in_plateau))
                if series.trend_tau is not None and series.trend_p_value is not None:
                    tau.add_metric(key, series.trend_tau)
                    p_value.add_metric(key, series.trend_p_value)
                value.add_metric(key, series.last_value if math.isfinite(series.last_value) else math.nan)
        yield from (plateau, tau, p_value, value)

    def engine_families(self, snap: EngineSnapshot, *, active: int | None = None) -> Iterator[Metric]:
        """The engine-wide families (and the alert sinks'): O(kinds), plus O(runs) to
        count the active runs unless ``active`` (their count) is given."""
        yield build_info()
        if active is None:
            active = sum(not run.ended for run in snap.runs)
        family = GaugeMetricFamily(
            "phasewatch_active_runs", "Runs held in memory that have not ended."
        )
        family.add_metric([], float(active))
        yield family

        events = CounterMetricFamily(
            "phasewatch_events", "Events emitted, by kind.", labels=["kind"]
        )
        for kind in EventKind:  # every kind, zeros included, so rate() works from the start
            events.add_metric([kind.value], float(snap.events_by_kind.get(kind.value, 0)))
        yield events

        yield CounterMetricFamily(
            "phasewatch_ingested_points",
            "Points accepted (resent duplicates included).",
            value=float(snap.ingested_points),
        )
        rejected = CounterMetricFamily(
            "phasewatch_rejected_points", "Points rejected, by reason.", labels=["reason"]
        )
        for reason, count in sorted(snap.rejected_by_reason.items()):
            rejected.add_metric([reason], float(count))
        yield rejected

        # Bucket counts come from the engine (one per call), cumulated here.
        buckets, total = [], 0
        for bound, count in zip((*DETECTION_BUCKETS, math.inf), snap.detection_buckets, strict=False):
            total += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(total)))
        yield HistogramMetricFamily(
            "phasewatch_detection_seconds",
            "Time spent in detection per engine call (ingest, flush, end).",
            buckets=buckets or [("+Inf", float(snap.detection_batches))],
            sum_value=snap.detection_seconds,
        )
        if self.alerts is not None:
            yield from _alert_metrics(self.alerts)


def build_info() -> InfoMetricFamily:
    """``phasewatch_build_info``: the version, and the Python and grpcio it runs on."""
    import grpc

    from detector import __version__

    info = InfoMetricFamily(
        "phasewatch_build", "phasewatch's version and the Python and grpcio it runs on.",
        labels=["version", "python", "grpcio"],
    )
    info.add_metric([__version__, platform.python_version(), grpc.__version__], {})
    return info


def _alert_metrics(alerts: AlertDispatcher) -> Iterator[Metric]:
    stats = alerts.stats()
    sent = CounterMetricFamily(
        "phasewatch_alerts_sent", "Alerts delivered, by sink (re-sends included).", labels=["sink"]
    )
    failures = CounterMetricFamily(
        "phasewatch_alert_failures", "Failed alert delivery attempts, by sink.", labels=["sink"]
    )
    discarded = CounterMetricFamily(
        "phasewatch_alerts_discarded",
        "Alerts given up: rejected by the receiver, or over the pending limit.",
        labels=["sink"],
    )
    pending = GaugeMetricFamily(
        "phasewatch_alerts_pending", "Alert changes waiting for delivery, by sink.", labels=["sink"]
    )
    for sink in stats.sinks:
        sent.add_metric([sink.name], float(sink.sent))
        failures.add_metric([sink.name], float(sink.failures))
        discarded.add_metric([sink.name], float(sink.discarded))
        pending.add_metric([sink.name], float(sink.pending))
    yield from (sent, failures, discarded, pending)
    active = GaugeMetricFamily("phasewatch_alerts_active", "Alerts firing now.")
    active.add_metric([], float(stats.active))
    yield active
    yield CounterMetricFamily(
        "phasewatch_alert_events_dropped",
        "Events lost before alerting because the alert queue was full.",
        value=float(stats.events_dropped),
    )
