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

import gzip
import math
import platform
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from operator import attrgetter
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from detector.core.types import EventKind, Phase
from detector.engine import DETECTION_BUCKETS, Engine, EngineSnapshot, RunStatus
from detector.errors import InvalidArgument

if TYPE_CHECKING:
    from detector.alerts import AlertDispatcher
    from detector.auth import BearerTokenInterceptor

CONTENT_TYPE_OPENMETRICS = openmetrics.CONTENT_TYPE_LATEST
_EOF = b"# EOF\n"

DEFAULT_RETENTION = 600.0
DEFAULT_SERIES_RUNS = 100

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")

# Per-run families: (name, help), shared by the collector and the cached text.
_PHASE = ("phasewatch_run_phase",
          "1 for the phase each run is in, 0 for the others (all 0 before the first point).")
_LAST_STEP = ("phasewatch_run_last_step", "Greatest step received for each run.")
_INFO = ("phasewatch_run", "Labels of each run, as label_<key>.")  # exposed as phasewatch_run_info
_PLATEAU = ("phasewatch_series_plateau",
            "1 while a headline series is on a plateau (slope equivalence test), else 0.")
_TAU = ("phasewatch_series_trend_tau",
        "Kendall's tau of a headline series over its last trend window (-1 to 1).")
_P_VALUE = ("phasewatch_series_trend_p_value", "Mann-Kendall p-value of that trend.")
_LAST_VALUE = ("phasewatch_series_last_value",
               "Last value received for a headline series (NaN when non-finite).")
_SERIES_LABELS = ["run_id", "series", "role", "split"]
_UPDATED_AT = attrgetter("updated_at")
_STATUS_UPDATED_AT = attrgetter("status.updated_at")


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

    ``per_run=False`` leaves the per-run and per-series families out (what
    :class:`MetricsExposition` renders from its own cache).

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
        last_step = GaugeMetricFamily(*_LAST_STEP, labels=["run_id"])
        info = InfoMetricFamily(*_INFO, labels=["run_id"])
        for run in shown:
            for candidate in Phase:
                phase.add_metric([run.run_id, candidate.value], float(run.phase is candidate))
            if run.last_step >= 0:  # -1 means no point yet: no sample beats a fake one
                last_step.add_metric([run.run_id], float(run.last_step))
            info.add_metric([run.run_id], _info_labels(run.labels))
        yield from (phase, last_step, info)

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

    def engine_families(self, snap: EngineSnapshot) -> Iterator[Metric]:
        """The engine-wide families (and the alert sinks'): O(kinds), not O(runs)."""
        yield build_info()
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


def wants_openmetrics(accept: str) -> bool:
    """Whether an ``Accept`` header asks for OpenMetrics 1.x, as prometheus_client's
    ``choose_encoder`` reads it (the first acceptable entry; no q-value ordering).

    >>> wants_openmetrics("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    True
    >>> wants_openmetrics("text/plain;version=0.0.4"), wants_openmetrics("")
    (False, False)
    """
    for entry in (accept or "").split(","):
        kind, *params = (part.strip() for part in entry.split(";"))
        if kind == "application/openmetrics-text":
            version = next((p.partition("=")[2] for p in params if p.startswith("version=")), "")
            return not version or version.startswith("1.")
        if kind == "text/plain":
            return False
    return False


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


class _RunText:
    """One run's exposition lines, valid while the engine's status object is the same.

    Made from the run's previous entry where it can: a new status (every batch
    makes one) mostly moves the last step, so the phase lines are kept while
    the phase is, and the info line while the labels are. Each line is what
    :func:`_sample` writes, built by concatenation (a first scrape of 10 000
    runs formats 70 000 of them).
    """

    __slots__ = ("status", "phase", "last_step", "info", "_series")

    def __init__(self, status: RunStatus, previous: _RunText | None = None) -> None:
        self.status = status  # held: its identity is the cache key, so it must stay alive
        run_id = _escape(status.run_id)
        if previous is not None and previous.status.phase is status.phase:
            self.phase: str = previous.phase
        else:
            self.phase = "".join(
                f'{prefix}{run_id}"}} {"1.0" if status.phase is p else "0.0"}\n'
                for p, prefix in _PHASE_PREFIXES
            )
        self.last_step = (
            f'{_LAST_STEP[0]}{{run_id="{run_id}"}} {floatToGoString(float(status.last_step))}\n'
            if status.last_step >= 0 else ""
        )
        if previous is not None and previous.status.labels == status.labels:
            self.info: str = previous.info
        else:
            # InfoMetricFamily's labels: run_id, then the run's (prefixed, so never run_id).
            self.info = _sample(
                _INFO[0] + "_info", {"run_id": status.run_id, **_info_labels(status.labels)}, 1.0
            )
        self._series: tuple[str, str, str, str] | None = None

    def series(self) -> tuple[str, str, str, str]:
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
            self._series = ("".join(plateau), "".join(tau), "".join(p_value), "".join(value))
        return self._series


class MetricsExposition:
    """The ``/metrics`` text: per-run lines cached per :class:`RunStatus` object.

    ``render()`` costs O(runs) dictionary look-ups and one join, plus the
    formatting of the runs whose status changed since the last scrape; the
    engine-wide families (O(kinds)) and ``registry`` (process, platform and GC
    collectors by default) go through prometheus_client's ``generate_latest``.
    The cache holds the shown runs of the last scrape, nothing else. Scrapes are
    serialised (one lock), which also keeps them from formatting the same runs twice.
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
        self._lock = threading.Lock()

    def render(self, names: Collection[str] | None = None, *, open_metrics: bool = False) -> bytes:
        """The exposition (text format 0.0.4, or OpenMetrics 1.0); with ``names``,
        only those samples' families, as prometheus_client's ``name[]`` filter does."""
        with self._lock:
            snap = self.engine.snapshot()
            horizon = time.time() - self.collector.retention
            old, cache = self._cache, {}
            texts: list[_RunText] = []
            live: list[_RunText] = []
            for status in snap.runs:  # one pass: EngineCollector.shown and series_shown
                if status.ended and status.updated_at < horizon:
                    continue
                entry = old.get(status.run_id)
                if entry is None or entry.status is not status:
                    entry = _RunText(status, entry)
                cache[status.run_id] = entry
                texts.append(entry)
                if not status.ended:
                    live.append(entry)
            self._cache = cache
            live.sort(key=_STATUS_UPDATED_AT, reverse=True)  # stable, as series_shown
            in_budget = [entry.series() for entry in live[: self.collector.series_runs]]

        # In 0.0.4 an info family is a gauge named with its _info suffix; in
        # OpenMetrics it is of type info, named without it. Samples are the same.
        info = (_INFO, "info") if open_metrics else ((_INFO[0] + "_info", _INFO[1]), "gauge")
        families: list[tuple[tuple[str, str], str, str, list[str]]] = [
            (_PHASE, "gauge", _PHASE[0], [t.phase for t in texts]),
            (_LAST_STEP, "gauge", _LAST_STEP[0], [t.last_step for t in texts]),
            (info[0], info[1], _INFO[0] + "_info", [t.info for t in texts]),
        ]
        for i, family in enumerate((_PLATEAU, _TAU, _P_VALUE, _LAST_VALUE)):
            families.append((family, "gauge", family[0], [lines[i] for lines in in_budget]))
        parts: list[str] = []
        for (name, doc), kind, sample_name, lines in families:
            if names is None:
                parts.append(_header(name, doc, kind))
                parts.extend(lines)
            elif sample_name in names and (chosen := [line for line in lines if line]):
                parts.append(_header(name, doc, kind))  # as name[] does: no empty families
                parts.extend(chosen)
        body = "".join(parts).encode("utf-8")
        engine_wide = _Fixed(list(self.collector.engine_families(snap)))
        others = [engine_wide] if self.registry is None else [engine_wide, self.registry]
        for collector in others:
            if names is not None:
                collector = _Restricted(collector, names)
            body += _encode(collector, open_metrics)
        return body + _EOF if open_metrics else body


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


def make_metrics_app(
    exposition: MetricsExposition, *, auth: BearerTokenInterceptor | None = None
) -> Callable[..., list[bytes]]:
    """A WSGI app serving ``exposition``, with prometheus_client's ``make_wsgi_app``
    behaviour (any GET path, ``name[]`` filters, gzip when accepted, OPTIONS, 405,
    OpenMetrics when asked for). With ``auth``, every request needs one of its
    bearer tokens (401 otherwise)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        if auth is not None and not _authorized(auth, environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [
                ("WWW-Authenticate", 'Bearer realm="phasewatch"'),
                ("Content-Type", "text/plain; charset=utf-8"),
            ])
            return [b"a bearer token is required (Authorization: Bearer ...)\n"]
        if method == "OPTIONS":
            status, headers, output = "200 OK", [("Allow", "OPTIONS,GET")], b""
        elif method != "GET":
            status, headers = "405 Method Not Allowed", [("Allow", "OPTIONS,GET")]
            output = f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()
        elif environ.get("PATH_INFO") == "/favicon.ico":
            status, headers, output = "200 OK", [], b""
        else:
            params = parse_qs(environ.get("QUERY_STRING", ""))
            open_metrics = wants_openmetrics(environ.get("HTTP_ACCEPT", ""))
            output = exposition.render(params.get("name[]"), open_metrics=open_metrics)
            content_type = CONTENT_TYPE_OPENMETRICS if open_metrics else CONTENT_TYPE_PLAIN_0_0_4
            status, headers = "200 OK", [("Content-Type", content_type)]
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                # Level 1: a tenth of the size at a fraction of level 9's time.
                output = gzip.compress(output, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
        start_response(status, headers)
        return [output]

    return app


def _authorized(auth: BearerTokenInterceptor, header: str | None) -> bool:
    from detector.auth import bearer_token

    token = bearer_token([("authorization", header)] if header else None)
    return token is not None and auth.valid(token)


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


class _SilentHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def start_metrics_server(
    engine: Engine,
    listen: str = "127.0.0.1:9109",
    registry: CollectorRegistry | None = None,
    *,
    alerts: AlertDispatcher | None = None,
    retention: float = DEFAULT_RETENTION,
    collectors: Collection[Collector] = (),
    auth: BearerTokenInterceptor | None = None,
) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread; returns (server, port).

    Port 0 picks a free port, which is returned. The engine's families (with
    ``alerts``' counters and the ended-run ``retention``) come from a
    :class:`MetricsExposition`; ``registry`` holds the others (default: a new
    one with the process, platform and GC collectors), plus ``collectors`` (the
    gRPC server's metrics). With ``auth``, scrapes need one of its bearer
    tokens. One thread per request, as prometheus_client's own server. Stop
    with ``server.shutdown(); server.server_close()``.
    """
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # each registers itself
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    exposition = MetricsExposition(engine, alerts=alerts, retention=retention, registry=registry)
    host, port = _split_listen(listen)
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, sockaddr = info[0][0], info[0][4]

    class Server(ThreadingWSGIServer):
        address_family = family  # IPv6 listen addresses too

    server = make_server(
        str(sockaddr[0]), port, make_metrics_app(exposition, auth=auth), Server,
        handler_class=_SilentHandler
    )
    threading.Thread(target=server.serve_forever, name="phasewatch-metrics", daemon=True).start()
    return server, server.server_port
