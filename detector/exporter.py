"""Prometheus metrics, read from the engine's immutable snapshot.

A custom collector rather than live Gauge objects: every scrape rebuilds the
per-run series from ``Engine.snapshot()``, so forgotten runs disappear without
``remove()`` calls and a scrape never holds a run lock. Everything is
registered on an explicit :class:`CollectorRegistry`, never the global one.

Cardinality budget. Per run: ``phasewatch_run_phase`` (4 series),
``phasewatch_run_last_step`` and ``phasewatch_run_info`` (1 each). An ended
run leaves the exposition ``retention`` seconds after its last update (ten
minutes by default: long enough for a few scrapes and a ``for:`` clause).
Per series, only the run's *headline* series (training and validation
loss-like and accuracy-like series, as the labeller picked them: at most 4),
only for runs that have not ended, and only for the ``series_runs`` most
recently updated of those (100 by default): 4 gauges each, so at most
``16 × series_runs`` series. Nothing is labelled by step or value.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from detector.core.types import EventKind, Phase
from detector.engine import DETECTION_BUCKETS, Engine, RunStatus
from detector.errors import InvalidArgument

if TYPE_CHECKING:
    from detector.alerts import AlertDispatcher

DEFAULT_RETENTION = 600.0
DEFAULT_SERIES_RUNS = 100

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def label_name(key: str) -> str:
    """A run label key as a Prometheus label name, prefixed ``label_``.

    The prefix (as kube-state-metrics does) keeps user keys from colliding
    with ``run_id`` or the reserved ``__`` names and from starting with a digit.

    >>> label_name("team"), label_name("data.set-v2"), label_name("2nd")
    ('label_team', 'label_data_set_v2', 'label_2nd')
    """
    return "label_" + _INVALID_LABEL_CHARS.sub("_", key)


def _info_labels(labels: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in sorted(labels):  # sorted: which of two colliding keys wins is stable
        out.setdefault(label_name(key), labels[key])
    return out


class EngineCollector(Collector):
    """Per-run and engine-wide metrics; ``collect()`` is O(runs + kinds).

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
    ) -> None:
        if retention < 0 or series_runs < 0:
            raise InvalidArgument("retention and series_runs must not be negative")
        self.engine = engine
        self.alerts = alerts
        self.retention = retention
        self.series_runs = series_runs

    def collect(self) -> Iterator[Metric]:
        snap = self.engine.snapshot()
        now = time.time()
        # Ended runs stay for `retention`, so the last phase is scraped and rules see it.
        shown = [r for r in snap.runs if not (r.ended and now - r.updated_at > self.retention)]

        phase = GaugeMetricFamily(
            "phasewatch_run_phase",
            "1 for the phase each run is in, 0 for the others (all 0 before the first point).",
            labels=["run_id", "phase"],
        )
        last_step = GaugeMetricFamily(
            "phasewatch_run_last_step",
            "Greatest step received for each run.",
            labels=["run_id"],
        )
        info = InfoMetricFamily(
            "phasewatch_run", "Labels of each run, as label_<key>.", labels=["run_id"]
        )
        for run in shown:
            for candidate in Phase:
                phase.add_metric([run.run_id, candidate.value], float(run.phase is candidate))
            if run.last_step >= 0:  # -1 means no point yet: no sample beats a fake one
                last_step.add_metric([run.run_id], float(run.last_step))
            info.add_metric([run.run_id], _info_labels(run.labels))
        yield phase
        yield last_step
        yield info
        yield from self._series_gauges(snap.runs)

        active = GaugeMetricFamily(
            "phasewatch_active_runs", "Runs held in memory that have not ended."
        )
        active.add_metric([], float(sum(not run.ended for run in snap.runs)))
        yield active

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

    def _series_gauges(self, runs: tuple[RunStatus, ...]) -> Iterator[Metric]:
        labels = ["run_id", "series", "role", "split"]
        plateau = GaugeMetricFamily(
            "phasewatch_series_plateau",
            "1 while a headline series is on a plateau (slope equivalence test), else 0.",
            labels=labels,
        )
        tau = GaugeMetricFamily(
            "phasewatch_series_trend_tau",
            "Kendall's tau of a headline series over its last trend window (-1 to 1).",
            labels=labels,
        )
        p_value = GaugeMetricFamily(
            "phasewatch_series_trend_p_value",
            "Mann-Kendall p-value of that trend.",
            labels=labels,
        )
        value = GaugeMetricFamily(
            "phasewatch_series_last_value",
            "Last value received for a headline series (NaN when non-finite).",
            labels=labels,
        )
        live = sorted((r for r in runs if not r.ended), key=lambda r: r.updated_at, reverse=True)
        for run in live[: self.series_runs]:
            for series in run.series:
                key = [run.run_id, series.name, series.role.value, series.split.value]
                plateau.add_metric(key, float(series.in_plateau))
                if series.trend_tau is not None and series.trend_p_value is not None:
                    tau.add_metric(key, series.trend_tau)
                    p_value.add_metric(key, series.trend_p_value)
                value.add_metric(key, series.last_value if math.isfinite(series.last_value) else math.nan)
        yield from (plateau, tau, p_value, value)


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


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_metrics_server(
    engine: Engine,
    listen: str = "127.0.0.1:9109",
    registry: CollectorRegistry | None = None,
    *,
    alerts: AlertDispatcher | None = None,
    retention: float = DEFAULT_RETENTION,
) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread; returns (server, port).

    Port 0 picks a free port, which is returned. Without ``registry`` a new
    one is made with the engine collector (with ``alerts``' counters and the
    ended-run ``retention``) plus process, platform and GC metrics. Stop with
    ``server.shutdown(); server.server_close()``.
    """
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # each registers itself
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(EngineCollector(engine, alerts=alerts, retention=retention))
    host, port = _split_listen(listen)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
