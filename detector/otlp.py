"""An OpenTelemetry (OTLP/gRPC) metrics receiver: ``phasewatch serve --otlp``.

The detector's gRPC port also serves
``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``, so an
OpenTelemetry SDK or Collector exports metrics to the detector's address
(``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=http://detector:50051``), with the
port's TLS and bearer token (``OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer
...``) like any other RPC. The message types come from ``opentelemetry-proto``
(the optional ``otlp`` extra), the protocol's own generated code.

How metrics become a run's series:

- **Run**: the resource attribute ``phasewatch.run_id``; without it,
  ``service.instance.id``. A resource with neither is not read.
- **Series**: gauges and sums (``as_double`` or ``as_int``; a sum's value is
  read as exported, cumulative or delta) named by the metric, with the data
  point's other attributes in braces when it has any:
  ``loss{split=val}``. Histograms and summaries are not read.
- **Step**: the data point's ``step`` attribute (an integer, or a string of
  one); else the value, in the same resource's export, of a gauge or sum
  named ``step``, ``global_step``, ``trainer/global_step``, ``train/global_step``
  or ``_step`` (a step counter the job exports next to its metrics).

Points that cannot be read are reported the OTLP way, in the response's
``partial_success`` (count and one message), and the rest of the export is
kept. The points go to the engine as a ``Log`` call's would (claim, ingest,
events to the bus and on to alerts). O(points) per export.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import grpc
import numpy as np

from detector.errors import PhasewatchError
from detector.logfile import STEP_KEYS

try:
    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2 as otlp_pb,
    )
    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2_grpc as otlp_grpc,
    )
except ImportError:  # the optional extra; add_receiver says what to install
    otlp_pb = otlp_grpc = None  # type: ignore[assignment]

RUN_ID_ATTRIBUTE = "phasewatch.run_id"
FALLBACK_RUN_ID_ATTRIBUTE = "service.instance.id"
STEP_ATTRIBUTE = "step"
_READ = ("gauge", "sum")


class OtlpUnavailable(RuntimeError):
    """opentelemetry-proto is not installed."""


def add_receiver(server: grpc.Server, servicer: Any) -> None:
    """Serve OTLP metrics on ``server``, into ``servicer``'s engine and bus."""
    if otlp_grpc is None:
        raise OtlpUnavailable("--otlp needs opentelemetry-proto: pip install 'phasewatch[otlp]'")
    otlp_grpc.add_MetricsServiceServicer_to_server(MetricsReceiver(servicer), server)


def _attribute(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "int_value", "double_value",
                                            "bool_value") else None


class MetricsReceiver(otlp_grpc.MetricsServiceServicer if otlp_grpc else object):  # type: ignore[misc]
    """``MetricsService`` on a :class:`~detector.server.PhaseDetectorServicer`."""

    def __init__(self, servicer: Any) -> None:
        self.engine = servicer.engine
        self.bus = servicer.bus

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's name
        rejected = 0
        problems: list[str] = []
        for resource_metrics in request.resource_metrics:
            points, run_id, dropped, problem = _resource_points(resource_metrics)
            rejected += dropped
            if problem:
                problems.append(problem)
            if run_id is None or not points:
                continue
            try:
                self._ingest(run_id, points)
            except PhasewatchError as error:
                rejected += sum(len(p) for p in points.values())
                problems.append(f"run {run_id!r}: {error}")
        response = otlp_pb.ExportMetricsServiceResponse()
        if rejected or problems:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = "; ".join(dict.fromkeys(problems))
        return response

    def _ingest(self, run_id: str, points: dict[str, dict[int, float]]) -> None:
        columns = {}
        for name, by_step in points.items():
            steps = np.array(sorted(by_step), dtype=np.int64)
            columns[name] = (steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
        claim = self.engine.claim(run_id)
        try:
            result = self.engine.ingest(run_id, columns)
        finally:
            claim.release()
        self.bus.publish(run_id, result.events)


def _resource_points(
    resource_metrics: Any,
) -> tuple[dict[str, dict[int, float]], str | None, int, str]:
    """The points of one resource by series and step, its run id, and what was not read."""
    attributes = {a.key: _attribute(a.value) for a in resource_metrics.resource.attributes}
    run_id = attributes.get(RUN_ID_ATTRIBUTE) or attributes.get(FALLBACK_RUN_ID_ATTRIBUTE)
    metrics = [m for scope in resource_metrics.scope_metrics for m in scope.metrics]
    if not isinstance(run_id, str) or not run_id:
        count = sum(_count(m) for m in metrics)
        return {}, None, count, (
            f"a resource without a {RUN_ID_ATTRIBUTE} (or {FALLBACK_RUN_ID_ATTRIBUTE}) "
            "attribute: its points are not read"
        ) if count else ""
    counter_step = _counter_step(metrics)
    points: dict[str, dict[int, float]] = defaultdict(dict)
    dropped = 0
    problem = ""
    for metric in metrics:
        kind = metric.WhichOneof("data")
        if kind not in _READ:
            dropped += _count(metric)
            problem = problem or f"{metric.name}: only gauges and sums are read, not {kind}"
            continue
        if metric.name in STEP_KEYS:
            continue
        for point in getattr(metric, kind).data_points:
            labels = {a.key: _attribute(a.value) for a in point.attributes}
            step = _step(labels.pop(STEP_ATTRIBUTE, None), counter_step)
            if step is None:
                dropped += 1
                problem = problem or (
                    f"{metric.name}: no step (give each point a {STEP_ATTRIBUTE!r} attribute, "
                    f"or export a {STEP_KEYS[0]!r} counter with the metrics)"
                )
                continue
            name = metric.name
            if labels:
                name += "{" + ",".join(f"{k}={labels[k]}" for k in sorted(labels)) + "}"
            value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
            points[name][step] = float(value)
    return dict(points), run_id, dropped, problem


def _counter_step(metrics: list[Any]) -> int | None:
    for key in STEP_KEYS:
        for metric in metrics:
            kind = metric.WhichOneof("data")
            if metric.name == key and kind in _READ:
                data_points = getattr(metric, kind).data_points
                if data_points:
                    latest = max(data_points, key=lambda p: p.time_unix_nano)
                    value = latest.as_int if latest.WhichOneof("value") == "as_int" else latest.as_double
                    return _step(value, None)
    return None


def _step(value: Any, fallback: int | None) -> int | None:
    if value is None:
        return fallback
    try:
        step = int(value)
    except (TypeError, ValueError):
        return None
    if isinstance(value, float) and value != step:
        return None
    return step if step >= 0 else None


def _count(metric: Any) -> int:
    kind = metric.WhichOneof("data")
    return len(getattr(metric, kind).data_points) if kind else 0
