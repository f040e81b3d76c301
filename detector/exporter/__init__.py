"""Prometheus metrics, read from the engine's immutable snapshot.

A custom collector rather than live Gauge objects: every scrape rebuilds the
per-run series from ``Engine.snapshot()``, so forgotten runs disappear without
``remove()`` calls and a scrape never holds a run lock. Everything is
registered on an explicit :class:`CollectorRegistry`, never the global one.

The ``/metrics`` endpoint (:func:`start_metrics_server`) does not go through
that collector's per-run families, though: with 10 000 runs they are ~60 000
samples, and prometheus_client formats a sample in ~13 µs (0.8 s a scrape).
:class:`MetricsExposition` keeps each run's exposition lines, rendered once per
immutable :class:`RunStatus` object (the engine replaces a run's status when,
and only when, the run changes), and a scrape concatenates them under one
``# HELP``/``# TYPE`` header per family, then appends ``generate_latest()`` of
the engine-wide families and of the process/platform/GC collectors. The text
is the one ``EngineCollector`` gives through ``generate_latest()`` (the tests
compare the two family by family). A scraper that asks for OpenMetrics
(``Accept: application/openmetrics-text``, as Prometheus does by default) gets
OpenMetrics 1.0 from the same cached lines (gauge and info samples are written
alike in both formats; only the info family's header and the ``# EOF`` differ)
and prometheus_client's OpenMetrics encoder for the rest; anyone else gets the
text format 0.0.4.

``/metrics`` can require a bearer token (``auth``: a
:class:`~detector.auth.BearerTokenInterceptor`, whose token file is re-read
when it changes): without a valid ``Authorization: Bearer`` header the answer
is 401, since the exposition names runs, their labels and series.

Cardinality budget. Per run: ``phasewatch_run_phase`` (4 series),
``phasewatch_run_last_step`` and ``phasewatch_run_info`` (1 each), and
``phasewatch_run_collapse`` only while a collapse is open: 1 series per open
scope (``training``, ``generalization``), so at most 2 (the phase is
``collapse`` for either; the alert rules read this gauge to page only on a
training collapse, and a 0 for every other run would cost 2 series a run for
nothing the phase does not say). An ended run leaves the exposition
``retention`` seconds after its last update (ten minutes by default: long
enough for a few scrapes and a ``for:`` clause).
Per series, only the run's *headline* series (training and validation
loss-like and accuracy-like series, as the labeller picked them: at most 4),
only for runs that have not ended, and only for the ``series_runs`` most
recently updated of those (100 by default): 4 gauges each, so at most
``16 × series_runs`` series. Nothing is labelled by step or value.

Modules: :mod:`~detector.exporter.collector` (the families),
:mod:`~detector.exporter.text` (the cached exposition),
:mod:`~detector.exporter.http` (the endpoint).
"""

from detector.exporter.collector import (
    CONTENT_TYPE_OPENMETRICS,
    DEFAULT_RETENTION,
    DEFAULT_SERIES_RUNS,
    EngineCollector,
    build_info,
    label_name,
)
from detector.exporter.http import make_metrics_app, start_metrics_server, wants_openmetrics
from detector.exporter.text import MetricsExposition

__all__ = [
    "CONTENT_TYPE_OPENMETRICS", "DEFAULT_RETENTION", "DEFAULT_SERIES_RUNS", "EngineCollector",
    "MetricsExposition", "build_info", "label_name", "make_metrics_app", "start_metrics_server",
    "wants_openmetrics",
]
