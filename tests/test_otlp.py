"""The OTLP metrics receiver: the OpenTelemetry SDK's OTLP/gRPC exporter pushes a
real training run's metrics to a detector on 127.0.0.1, and its phases come out."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

pytest.importorskip("opentelemetry.proto")
pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")

import opentelemetry.sdk.metrics as otel_metrics
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.analysis import analyze_columns
from detector.logfile import read_log

# The synchronous gauge's SDK class (still underscored in opentelemetry-sdk 1.4x).
SyncGauge = getattr(otel_metrics, "Gauge", None) or otel_metrics._Gauge
RUN = str(resources.files("detector.data") / "grok_add_0.jsonl")


def _recording(engine: object) -> list[dict]:
    received: list[dict] = []
    ingest = engine.ingest

    def recording(run_id: str, columns: dict) -> object:  # observes what the detector is given
        received.append({k: (np.array(s), np.array(v)) for k, (s, v) in columns.items()})
        return ingest(run_id, columns)

    engine.ingest = recording
    return received


def test_the_sdk_exporter_pushes_a_run_and_its_phases_come_out(make_server) -> None:
    engine, port, channel = make_server(otlp=True)
    received = _recording(engine)
    # The OpenTelemetry SDK drops non-finite measurements ("not finite ... ignoring"):
    # the run is sent, and compared, without its NaN points.
    columns = {
        name: (steps[np.isfinite(values)], values[np.isfinite(values)])
        for name, (steps, values) in read_log(RUN, warn=lambda _: None).items()
    }
    exporter = OTLPMetricExporter(
        endpoint=f"127.0.0.1:{port}", insecure=True,
        preferred_temporality={SyncGauge: AggregationTemporality.DELTA},  # each step sent once
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        resource=Resource.create({"phasewatch.run_id": "otel-run", "service.name": "trainer"}),
        metric_readers=[reader],
    )
    meter = provider.get_meter("training")
    gauges = {name: meter.create_gauge(name) for name in columns}
    rows: dict[int, dict[str, float]] = {}
    for name, (steps, values) in columns.items():
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            rows.setdefault(step, {})[name] = value
    for i, step in enumerate(sorted(rows)):
        for name, value in rows[step].items():
            gauges[name].set(value, {"step": step})
        if i % 25 == 24:
            assert provider.force_flush(10_000)
    assert provider.force_flush(10_000)
    provider.shutdown()

    got: dict[tuple[str, int], float] = {}
    for batch in received:
        for name, (steps, values) in batch.items():
            got.update(zip(((name, s) for s in steps.tolist()), values.tolist(), strict=True))
    want = {
        (name, step): value
        for name, (steps, values) in columns.items()
        for step, value in zip(steps.tolist(), values.tolist(), strict=True)
    }
    assert set(got) == set(want)
    assert all(got[k] == want[k] for k in want)

    # The phases: the detector's events are the offline analysis's (it holds the
    # last steps back for reordering, as the run has not ended).
    stub = pb_grpc.PhaseDetectorStub(channel)
    timeline = stub.GetTimeline(pb.GetTimelineRequest(run_id="otel-run"), timeout=10)
    served = [(e.step, pb.EventKind.Name(e.kind).removeprefix("EVENT_KIND_"), e.series)
              for e in timeline.events]
    _, offline, _ = analyze_columns(columns, "otel-run")
    assert ("GROKKING_ONSET" in {kind for _, kind, _ in served})
    assert served == [(e["step"], e["kind"], e["series"]) for e in offline][: len(served)]
    assert len(timeline.segments) >= 2


def _gauge(name: str, points: list[tuple[float, dict]]) -> metrics_pb2.Metric:
    return metrics_pb2.Metric(name=name, gauge=metrics_pb2.Gauge(data_points=[
        metrics_pb2.NumberDataPoint(
            as_double=value, time_unix_nano=i + 1,
            attributes=[common_pb2.KeyValue(key=k, value=_any(v)) for k, v in attrs.items()],
        )
        for i, (value, attrs) in enumerate(points)
    ]))


def _any(value: object) -> common_pb2.AnyValue:
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value)
    return common_pb2.AnyValue(string_value=str(value))


def _resource(attrs: dict, metrics: list[metrics_pb2.Metric]) -> metrics_pb2.ResourceMetrics:
    from opentelemetry.proto.resource.v1 import resource_pb2

    return metrics_pb2.ResourceMetrics(
        resource=resource_pb2.Resource(
            attributes=[common_pb2.KeyValue(key=k, value=_any(v)) for k, v in attrs.items()]
        ),
        scope_metrics=[metrics_pb2.ScopeMetrics(metrics=metrics)],
    )


def test_step_counter_labels_and_what_is_not_read(make_server) -> None:
    engine, port, channel = make_server(otlp=True)
    received = _recording(engine)
    stub = otlp_grpc.MetricsServiceStub(channel)
    histogram = metrics_pb2.Metric(
        name="latency", histogram=metrics_pb2.Histogram(data_points=[metrics_pb2.HistogramDataPoint()])
    )
    request = otlp_pb.ExportMetricsServiceRequest(resource_metrics=[
        # A step counter next to the metrics; attributes other than step name the series.
        _resource({"service.instance.id": "counted"}, [
            _gauge("global_step", [(7.0, {})]),
            _gauge("loss", [(0.5, {"split": "val"}), (0.7, {"split": "train"})]),
            histogram,
        ]),
        _resource({"service.name": "no-run-id"}, [_gauge("loss", [(1.0, {"step": 1})])]),
        _resource({"phasewatch.run_id": "no-step"}, [_gauge("loss", [(1.0, {})])]),
    ])
    response = stub.Export(request, timeout=10)
    assert response.partial_success.rejected_data_points == 3
    message = response.partial_success.error_message
    assert "only gauges and sums" in message and "phasewatch.run_id" in message
    assert "no step" in message
    assert len(received) == 1 and {
        name: (s.tolist(), v.tolist()) for name, (s, v) in received[0].items()
    } == {"loss{split=train}": ([7], [0.7]), "loss{split=val}": ([7], [0.5])}
    # The run was declared by its first export (its one step is still held for reordering).
    status = pb_grpc.PhaseDetectorStub(channel).GetPhase(
        pb.GetPhaseRequest(run_id="counted"), timeout=10
    )
    assert status.run_id == "counted"


def test_serve_otlp_flag_wires_the_receiver(tmp_path) -> None:
    import socket
    import threading

    import grpc

    from detector.cli import build_parser
    from detector.server import serve

    assert build_parser().parse_args(["serve", "--otlp"]).otlp is True
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = threading.Event()
    thread = threading.Thread(target=serve, kwargs=dict(
        listen=f"127.0.0.1:{port}", metrics_listen=None, store_url=f"sqlite:///{tmp_path}/s.db",
        stop=stop, grace=0.5, otlp=True,
    ), daemon=True)
    thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = otlp_pb.ExportMetricsServiceRequest(resource_metrics=[
                _resource({"phasewatch.run_id": "served"}, [_gauge("loss", [(0.5, {"step": 3})])])
            ])
            response = otlp_grpc.MetricsServiceStub(channel).Export(
                request, timeout=30, wait_for_ready=True
            )
            assert response.partial_success.rejected_data_points == 0
            stub = pb_grpc.PhaseDetectorStub(channel)
            assert stub.GetPhase(pb.GetPhaseRequest(run_id="served"), timeout=10).run_id == "served"
    finally:
        stop.set()
        thread.join(30)
