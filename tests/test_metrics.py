"""The exporter's issue-5 metrics: the detection histogram, ended-run retention,
per-series gauges within their budget, the alert sinks' counters, and which
collapse scopes are open per run."""

from __future__ import annotations

import math
import time
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from detector.alerts import AlertDispatcher, AlertmanagerSink
from detector.alerts.rules import SCOPE_GENERALIZATION, SCOPE_TRAINING
from detector.core.labeller.rules._common import GENERALISATION, TRAINING
from detector.core.types import Event, EventKind
from detector.engine import DETECTION_BUCKETS, Engine, SeriesStatus
from detector.exporter import EngineCollector, MetricsExposition, start_metrics_server
from detector.exporter.collector import COLLAPSE_SCOPES
from detector.store import SqliteStore
from tests.helpers import collapse_columns, read_rows, rows_to_columns, shared_dir
from tests.observability import Receiver


def _registry(engine: Engine, **kw) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, **kw))
    return registry


def test_detection_seconds_is_a_histogram_with_consistent_buckets():
    engine = Engine()
    for i in range(30):
        engine.ingest("r", {"loss": ([i], [1.0 / (i + 1)])})
    engine.end_run("r")
    value = _registry(engine).get_sample_value
    snap = engine.snapshot()
    assert sum(snap.detection_buckets) == snap.detection_batches == 31
    counts = [value("phasewatch_detection_seconds_bucket", {"le": repr(b)}) for b in DETECTION_BUCKETS]
    counts.append(value("phasewatch_detection_seconds_bucket", {"le": "+Inf"}))
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == value("phasewatch_detection_seconds_count") == 31
    assert value("phasewatch_detection_seconds_sum") == pytest.approx(snap.detection_seconds)
    assert counts[0] >= 1  # the end_run flush of nothing takes well under 0.5 ms


def test_ended_runs_leave_after_the_retention():
    engine = Engine()
    engine.ingest("live", {"loss": ([0, 1, 2], [1.0, 0.9, 0.8])})
    engine.ingest("done", {"loss": ([0, 1, 2], [1.0, 0.9, 0.8])})
    engine.end_run("done")
    value = _registry(engine, retention=60).get_sample_value
    assert value("phasewatch_run_last_step", {"run_id": "done"}) == 2  # just ended: kept
    # Pretend it ended two minutes ago.
    run = engine._runs["done"]
    run.status = replace(run.status, updated_at=time.time() - 120)
    assert value("phasewatch_run_last_step", {"run_id": "done"}) is None
    assert value("phasewatch_run_phase", {"run_id": "done", "phase": "instability"}) is None
    assert value("phasewatch_run_info", {"run_id": "done"}) is None
    assert value("phasewatch_run_last_step", {"run_id": "live"}) == 2


def test_series_gauges_cover_headline_series_only():
    engine = Engine()
    rows = read_rows(shared_dir("runs", "grok_add_0.jsonl"))
    engine.ingest("g", rows_to_columns(rows[:200]))
    engine.flush("g")  # release the reorder buffer's last steps
    registry = _registry(engine)
    families = {f.name: f for f in registry.collect()}
    plateau = families["phasewatch_series_plateau"].samples
    names = {s.labels["series"] for s in plateau}
    # 12 series are logged; the gauges keep the 4 the labeller reads.
    assert names == {"train_loss", "test_loss", "train_acc", "test_acc"}
    labels = {s.labels["series"]: s.labels for s in plateau}
    assert labels["test_acc"] == {"run_id": "g", "series": "test_acc", "role": "accuracy",
                                  "split": "test"}
    status = {s.name: s for s in engine.status("g").series}
    for sample in plateau:
        assert sample.value == float(status[sample.labels["series"]].in_plateau)
    taus = {s.labels["series"]: s.value for s in families["phasewatch_series_trend_tau"].samples}
    assert all(-1 <= t <= 1 for t in taus.values()) and taus
    last = {s.labels["series"]: s.value for s in families["phasewatch_series_last_value"].samples}
    assert last["train_loss"] == pytest.approx(rows[199]["train_loss"])


def test_headline_trends_read_later_are_those_of_their_status():
    """A status's trends are computed when read, from a copy of the window its
    series tested then: equal to SeriesDetector.trend at that point, whatever
    the run took since."""
    engine = Engine()
    rows = read_rows(shared_dir("runs", "grok_add_0.jsonl"))
    taken = []
    for lo in range(0, 240, 7):  # batches of 7 lines: the trend's due count moves each time
        engine.ingest("g", rows_to_columns(rows[lo:lo + 7]))
        run = engine._runs["g"]
        expected = {}
        for s in run.status.series:
            trend = run.detector.detectors[s.name].trend
            expected[s.name] = None if trend is None else (trend.statistic, trend.p_value)
        taken.append((run.status, expected))
    assert any(t is not None for _, e in taken for t in e.values())
    for status, expected in taken:
        for s in status.series:
            got = None if s.trend_tau is None else (s.trend_tau, s.trend_p_value)
            assert got == expected[s.name]
            plain = SeriesStatus(s.name, s.role, s.split, s.in_plateau, s.trend_tau,
                                 s.trend_p_value, s.last_value)
            assert s == plain and plain == s and hash(s) == hash(plain) and repr(s) == repr(plain)


def test_series_gauges_budget_keeps_the_most_recent_live_runs():
    engine = Engine()
    for i in range(5):
        engine.ingest(f"r{i}", {"train_loss": ([0, 1, 2, 3], [1.0, 0.5, 0.4, 0.3])})
        time.sleep(0.002)  # distinct update times
    engine.end_run("r4")
    value = _registry(engine, series_runs=2).get_sample_value

    def has_series(run_id: str) -> bool:
        labels = {"run_id": run_id, "series": "train_loss", "role": "loss", "split": "train"}
        return value("phasewatch_series_plateau", labels) is not None

    # r4 ended; of the live ones, r3 and r2 were updated last.
    assert [has_series(f"r{i}") for i in range(5)] == [False, False, True, True, False]


def test_nonfinite_last_value_is_exported_as_nan():
    engine = Engine()
    engine.ingest("r", {"train_loss": ([0, 1, 2, 3], [1.0, 0.5, 0.4, math.inf])})
    engine.flush("r")
    value = _registry(engine).get_sample_value(
        "phasewatch_series_last_value",
        {"run_id": "r", "series": "train_loss", "role": "loss", "split": "train"},
    )
    assert math.isnan(value)


def test_alert_counters_on_the_metrics_endpoint():
    engine = Engine()
    with Receiver() as am:
        am.statuses.append(503)
        dispatcher = AlertDispatcher([AlertmanagerSink(am.url)], retry_initial=0.05,
                                     retry_max=0.1)
        server, port = start_metrics_server(engine, "127.0.0.1:0", alerts=dispatcher)
        try:
            dispatcher.submit("r", [Event(step=1, kind=EventKind.COLLAPSE_ONSET, detected_at=1)])
            assert dispatcher.flush(5)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
        finally:
            server.shutdown()
            server.server_close()
            dispatcher.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    sink = (("sink", "alertmanager"),)
    assert samples[("phasewatch_alerts_sent_total", sink)] == 1
    assert samples[("phasewatch_alert_failures_total", sink)] == 1
    assert samples[("phasewatch_alerts_pending", sink)] == 0
    assert samples[("phasewatch_alerts_discarded_total", sink)] == 0
    assert samples[("phasewatch_alerts_active", ())] == 1
    assert samples[("phasewatch_alert_events_dropped_total", ())] == 0


def test_no_alert_metrics_without_a_dispatcher():
    registry = _registry(Engine())
    assert registry.get_sample_value("phasewatch_alerts_active") is None
    assert registry.get_sample_value("phasewatch_active_runs") == 0


def _collapse_flags(engine: Engine, run_id: str) -> dict[str, tuple[float | None, float | None]]:
    """``phasewatch_run_collapse`` (training, generalization) of a run, by both paths
    (None: no sample, as for a scope with no collapse open)."""
    registry = _registry(engine)
    text = MetricsExposition(engine).render().decode()
    samples = {(s.labels["run_id"], s.labels["scope"]): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "phasewatch_run_collapse"}
    return {
        "collector": tuple(registry.get_sample_value("phasewatch_run_collapse",
                                                     {"run_id": run_id, "scope": scope})
                           for scope in ("training", "generalization")),
        "text": tuple(samples.get((run_id, scope)) for scope in ("training", "generalization")),
    }


def test_collapse_gauge_says_which_scope_is_open():
    engine = Engine()
    runs = {
        "general": collapse_columns(generalization=(300, None)),
        "training": collapse_columns(training=(300, None)),
        "both": collapse_columns(generalization=(200, None), training=(400, None)),
        "healthy": collapse_columns(),
    }
    for run_id, columns in runs.items():
        engine.ingest(run_id, columns)
        engine.flush(run_id)
    onsets = {run_id: [(e.step, e.evidence["scope"]) for e in engine.timeline(run_id)[1]
                       if e.kind is EventKind.COLLAPSE_ONSET] for run_id in runs}
    assert onsets == {"general": [(3000, "generalization")], "training": [(3000, "training")],
                      "both": [(2000, "generalization"), (4000, "training")], "healthy": []}
    expected = {"general": (None, 1.0), "training": (1.0, None), "both": (1.0, 1.0),
                "healthy": (None, None)}
    for run_id, flags in expected.items():
        assert _collapse_flags(engine, run_id) == {"collector": flags, "text": flags}, run_id
    # The phase alone cannot tell a generalisation collapse from a training one.
    value = _registry(engine).get_sample_value
    assert value("phasewatch_run_phase", {"run_id": "general", "phase": "collapse"}) == 1
    assert value("phasewatch_run_phase", {"run_id": "training", "phase": "collapse"}) == 1
    assert value("phasewatch_run_phase", {"run_id": "healthy", "phase": "collapse"}) == 0


def test_collapse_gauge_leaves_when_the_collapse_ends():
    columns = collapse_columns(generalization=(300, 60))  # back at line 360, ended at 420
    engine = Engine()
    engine.ingest("r", {k: (steps[:340], values[:340]) for k, (steps, values) in columns.items()})
    engine.flush("r")
    assert _collapse_flags(engine, "r") == {"collector": (None, 1.0), "text": (None, 1.0)}
    engine.ingest("r", {k: (steps[340:], values[340:]) for k, (steps, values) in columns.items()})
    engine.flush("r")
    ends = [(e.step, e.evidence["scope"]) for e in engine.timeline("r")[1]
            if e.kind is EventKind.COLLAPSE_END]
    assert ends == [(3600, "generalization")]
    assert _collapse_flags(engine, "r") == {"collector": (None, None), "text": (None, None)}


def test_a_restored_run_exports_its_open_collapse(tmp_path):
    columns = collapse_columns(generalization=(300, None))
    store = SqliteStore(tmp_path / "pw.db")
    try:
        first = Engine(store=store)
        first.ingest("r", columns)
        first.flush("r")
        first.checkpoint_all()
        # Another engine (a restart, or the replica that takes the run over) loads
        # the run's checkpoint on its next batch: the open collapse comes with it.
        second = Engine(store=store)
        second.ingest("r", {name: ([6000], [values[-1]]) for name, (_, values) in columns.items()})
        assert second.status("r").collapse_scopes == ("generalization",)
        assert _collapse_flags(second, "r") == {"collector": (None, 1.0), "text": (None, 1.0)}
    finally:
        store.close()


def test_a_collapse_scope_the_exporter_does_not_know_pages_as_training():
    # The scope names are the labeller's and the alert rules'.
    assert COLLAPSE_SCOPES == (TRAINING, GENERALISATION) == (SCOPE_TRAINING, SCOPE_GENERALIZATION)
    engine = Engine()
    engine.ingest("r", collapse_columns(n=50))
    run = engine._runs["r"]
    run.status = replace(run.status, collapse_scopes=("generalization", "optimizer"))
    assert _collapse_flags(engine, "r") == {"collector": (1.0, 1.0), "text": (1.0, 1.0)}
