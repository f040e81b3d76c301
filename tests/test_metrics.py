"""The exporter's issue-5 metrics: the detection histogram, ended-run retention,
per-series gauges within their budget, and the alert sinks' counters."""

from __future__ import annotations

import math
import time
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from detector.alerts import AlertDispatcher, AlertmanagerSink
from detector.core.types import Event, EventKind
from detector.engine import DETECTION_BUCKETS, Engine
from detector.exporter import EngineCollector, start_metrics_server
from tests.helpers import read_rows, rows_to_columns, shared_dir
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
