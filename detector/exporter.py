"""Prometheus metrics, read from the engine's immutable snapshot.

A custom collector rather than live Gauge objects: every scrape rebuilds the
per-run series from ``Engine.snapshot()``, so forgotten runs disappear without
``remove()`` calls and a scrape never holds a run lock. Everything is
registered on an explicit :class:`CollectorRegistry`, never the global one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
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
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from detector.core.types import EventKind, Phase
from detector.engine import Engine
from detector.errors import InvalidArgument

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

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        snap = self.engine.snapshot()

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
        for run in snap.runs:
            for candidate in Phase:
                phase.add_metric([run.run_id, candidate.value], float(run.phase is candidate))
            if run.last_step >= 0:  # -1 means no point yet: no sample beats a fake one
                last_step.add_metric([run.run_id], float(run.last_step))
            info.add_metric([run.run_id], _info_labels(run.labels))
        yield phase
        yield last_step
        yield info

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

        yield SummaryMetricFamily(
            "phasewatch_detection_seconds",
            "Time spent in detection per engine call (ingest, flush, end).",
            count_value=snap.detection_batches,
            sum_value=snap.detection_seconds,
        )


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_metrics_server(
    engine: Engine, listen: str = "127.0.0.1:9109", registry: CollectorRegistry | None = None
) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread; returns (server, port).

    Port 0 picks a free port, which is returned. Without ``registry`` a new
    one is made with the engine collector plus process, platform and GC
    metrics. Stop with ``server.shutdown(); server.server_close()``.
    """
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # each registers itself
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(EngineCollector(engine))
    host, port = _split_listen(listen)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
