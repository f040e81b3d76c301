"""Prometheus metrics from the engine snapshot, on a fresh registry."""

from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from detector.core.types import Phase
from detector.engine import Engine
from detector.errors import InvalidArgument
from detector.exporter import EngineCollector, label_name, start_metrics_server


@pytest.fixture
def engine() -> Engine:
    engine = Engine()
    engine.start_run("run-a", labels={"team": "vision", "data.set-v2": "c4", "2nd": "x"})
    steps = list(range(100))
    engine.ingest("run-a", {"train_loss": (steps, [1.0 / (1 + s) for s in steps]),
                            "val_acc": (steps, [math.nan] + [0.5] * 99)})
    engine.ingest("run-a", {"train_loss": ([-5, -6], [1.0, 1.0])})  # rejected
    engine.start_run("run-empty")
    engine.ingest("run-b", {"loss": ([0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0])})
    engine.end_run("run-b")
    return engine


@pytest.fixture
def registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    return registry


def test_run_gauges(engine, registry):
    value = registry.get_sample_value
    assert value("phasewatch_run_last_step", {"run_id": "run-a"}) == 99
    assert value("phasewatch_run_last_step", {"run_id": "run-b"}) == 3
    assert value("phasewatch_run_last_step", {"run_id": "run-empty"}) is None
    for run_id in ("run-a", "run-b", "run-empty"):
        current = engine.status(run_id).phase
        flags = {p: value("phasewatch_run_phase", {"run_id": run_id, "phase": p.value})
                 for p in Phase}
        assert flags == {p: float(p is current) for p in Phase}
    assert engine.status("run-empty").phase is None  # so all its flags are 0
    assert value("phasewatch_active_runs") == 2  # run-b ended


def test_run_info_labels_are_sanitised(registry):
    assert registry.get_sample_value(
        "phasewatch_run_info",
        {"run_id": "run-a", "label_team": "vision", "label_data_set_v2": "c4",
         "label_2nd": "x"},
    ) == 1.0
    assert registry.get_sample_value("phasewatch_run_info", {"run_id": "run-empty"}) == 1.0
    assert label_name("__name__") == "label___name__"


def test_engine_counters(engine, registry):
    value = registry.get_sample_value
    assert value("phasewatch_ingested_points_total") == 204
    assert value("phasewatch_rejected_points_total", {"reason": "negative_step"}) == 2
    snapshot = engine.snapshot()
    for kind, count in snapshot.events_by_kind.items():
        assert value("phasewatch_events_total", {"kind": kind}) == count
    assert value("phasewatch_events_total", {"kind": "GROKKING_ONSET"}) is not None
    assert value("phasewatch_detection_seconds_count") == snapshot.detection_batches
    assert value("phasewatch_detection_seconds_sum") == pytest.approx(snapshot.detection_seconds)


def test_forgotten_runs_vanish(engine, registry):
    engine.forget("run-b")
    assert registry.get_sample_value("phasewatch_run_last_step", {"run_id": "run-b"}) is None


def test_metrics_endpoint_serves_the_text_format(engine):
    server, port = start_metrics_server(engine, "127.0.0.1:0")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, s.labels.get("run_id")): s.value
               for s in families["phasewatch_run_last_step"].samples}
    assert samples[("phasewatch_run_last_step", "run-a")] == 99
    assert families["phasewatch_ingested_points"].type == "counter"
    assert "process_cpu_seconds" in families or "python_info" in families


def test_bad_listen_address():
    with pytest.raises(InvalidArgument):
        start_metrics_server(Engine(), "no-port")
