"""/metrics conventions: OpenMetrics negotiation, build info, gRPC server metrics and
a bearer token on /metrics, ending with a real Prometheus scraping a real serve()."""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

import detector
from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.auth import BearerTokenInterceptor
from detector.engine import Engine
from detector.exporter import EngineCollector, MetricsExposition, start_metrics_server
from detector.grpc_metrics import GrpcServerMetrics
from detector.server import create_server, serve
from tests.observability import Prometheus, free_port, wait_for
from tests.test_exposition import engine  # noqa: F401 (the fixture: odd run ids and labels)

TOKEN = "metrics-secret-token"


def _blocks(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line == "# EOF\n":
            break
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in out, f"family {name} is not contiguous"
            out[name] = ""
        assert name is not None
        out[name] += line
    return out


def test_openmetrics_text_is_the_encoders(engine: Engine) -> None:  # noqa: F811
    """The cached lines under OpenMetrics headers say exactly what prometheus_client's
    OpenMetrics encoder says over the full collector, and parse strictly."""
    ours = MetricsExposition(engine).render(open_metrics=True).decode()
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    theirs = openmetrics.generate_latest(registry).decode()
    assert ours.endswith("# EOF\n") and ours.count("# EOF") == 1
    assert _blocks(ours) == _blocks(theirs)
    families = {f.name: f for f in parse_openmetrics(ours)}  # strict: raises on any flaw
    assert families["phasewatch_run"].type == "info"
    assert families["phasewatch_ingested_points"].type == "counter"
    build = families["phasewatch_build"].samples[0]
    assert build.name == "phasewatch_build_info" and build.labels["version"] == detector.__version__
    filtered = MetricsExposition(engine).render(["phasewatch_run_info"], open_metrics=True).decode()
    assert set(_blocks(filtered)) == {"phasewatch_run"}


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_the_endpoint_negotiates_and_checks_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    small = Engine()
    small.ingest("r", {"loss": ([0, 1, 2], [1.0, 0.9, 0.8])})
    auth = BearerTokenInterceptor(token_file=token_file)
    server, port = start_metrics_server(small, "127.0.0.1:0", auth=auth)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            status, answer, body = _get(url, **headers)
            assert status == 401 and answer["WWW-Authenticate"].startswith("Bearer")
            assert b"phasewatch_run" not in body
        auth_header = {"Authorization": f"Bearer {TOKEN}"}
        status, answer, body = _get(url, Accept="application/openmetrics-text; version=1.0.0",
                                    **auth_header)
        assert status == 200 and answer["Content-Type"] == openmetrics.CONTENT_TYPE_LATEST
        assert {f.name for f in parse_openmetrics(body.decode())} >= {
            "phasewatch_run_phase", "phasewatch_build", "process_cpu_seconds"}
        status, answer, body = _get(url, Accept="text/plain", **auth_header)
        assert status == 200 and answer["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"# EOF" not in body and b"phasewatch_build_info{" in body
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def counted() -> Iterator[tuple[GrpcServerMetrics, grpc.Channel]]:
    metrics = GrpcServerMetrics()
    auth = BearerTokenInterceptor([TOKEN])
    server, port = create_server(Engine(), "127.0.0.1:0", interceptors=[metrics, auth])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield metrics, channel
    channel.close()
    server.stop(None)


def test_grpc_server_metrics_count_every_outcome(counted) -> None:
    metrics, channel = counted
    stub = pb_grpc.PhaseDetectorStub(channel)
    md = (("authorization", f"Bearer {TOKEN}"),)
    batch = pb.MetricBatch(series=[pb.Series(name="loss", steps=[1, 2], values=[1.0, 0.5])])
    stub.Log(pb.LogRequest(run_id="r", batch=batch), metadata=md, timeout=10)
    stub.ListRuns(pb.ListRunsRequest(), metadata=md, timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.GetPhase(pb.GetPhaseRequest(run_id="nope"), metadata=md, timeout=10)  # NOT_FOUND
    with pytest.raises(grpc.RpcError):
        stub.ListRuns(pb.ListRunsRequest(), timeout=10)  # no token
    with pytest.raises(grpc.RpcError):  # unknown, with the token: UNIMPLEMENTED, not counted
        channel.unary_unary("/phasewatch.v1.PhaseDetector/Nope1")(b"", metadata=md, timeout=10)
    with pytest.raises(grpc.RpcError):  # unknown, without: refused by auth, counted as unknown
        channel.unary_unary("/phasewatch.v1.PhaseDetector/Nope2")(b"", timeout=10)
    acks = list(stub.Stream(iter([pb.StreamRequest(start=pb.RunStart(run_id="s")),
                                  pb.StreamRequest(batch=batch)]), metadata=md, timeout=10))
    assert acks
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)

    def handled(kind: str, service: str, method: str, code: str) -> float | None:
        labels = {"grpc_type": kind, "grpc_service": service, "grpc_method": method,
                  "grpc_code": code}
        return metrics.registry.get_sample_value("grpc_server_handled_total", labels)

    service = "phasewatch.v1.PhaseDetector"
    # Stream's end is recorded when the RPC terminates, just after the client saw it.
    wait_for(lambda: handled("bidi_stream", service, "Stream", "OK"), 5, "the stream counted")
    assert handled("unary", service, "Log", "OK") == 1
    assert handled("unary", service, "ListRuns", "OK") == 1
    assert handled("unary", service, "ListRuns", "UNAUTHENTICATED") == 1
    assert handled("unary", service, "GetPhase", "NOT_FOUND") == 1
    assert handled("bidi_stream", "unknown", "unknown", "UNAUTHENTICATED") == 1
    from prometheus_client import generate_latest

    assert b"Nope" not in generate_latest(metrics.registry)  # no label value from a client
    assert handled("unary", "grpc.health.v1.Health", "Check", "OK") == 1
    started = metrics.registry.get_sample_value(
        "grpc_server_started_total", {"grpc_type": "unary", "grpc_service": service,
                                      "grpc_method": "ListRuns"})
    assert started == 2
    count = metrics.registry.get_sample_value(
        "grpc_server_handling_seconds_count", {"grpc_type": "unary", "grpc_service": service,
                                               "grpc_method": "Log"})
    assert count == 1


def test_a_cancelled_stream_is_counted_cancelled(counted) -> None:
    metrics, channel = counted
    stub = pb_grpc.PhaseDetectorStub(channel)
    release = threading.Event()

    def requests() -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(start=pb.RunStart(run_id="c"))
        release.wait(10)

    call = stub.Stream(requests(), metadata=(("authorization", f"Bearer {TOKEN}"),))
    next(call)  # the start's ack: the stream is open on the server
    call.cancel()
    release.set()
    labels = {"grpc_type": "bidi_stream", "grpc_service": "phasewatch.v1.PhaseDetector",
              "grpc_method": "Stream", "grpc_code": "CANCELLED"}
    wait_for(lambda: metrics.registry.get_sample_value("grpc_server_handled_total", labels), 10,
             "the cancelled stream counted")


# --- a real Prometheus scraping a real serve() ------------------------------------------


class ScrapingPrometheus(Prometheus):
    """Two jobs on the same /metrics: one sends the bearer token, one does not."""

    def __init__(self, workdir: Path, target: str, token_file: Path) -> None:
        super().__init__(workdir, targets=[target], rule_files=[])
        self.config.write_text("\n".join([
            "global:",
            "  scrape_interval: 1s",
            "scrape_configs:",
            "  - job_name: with-token",
            "    authorization:",
            f"      credentials_file: {json.dumps(str(token_file))}",
            "    static_configs:",
            f"      - targets: {json.dumps([target])}",
            "  - job_name: without-token",
            "    static_configs:",
            f"      - targets: {json.dumps([target])}",
        ]) + "\n")


def test_prometheus_scrapes_openmetrics_with_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    grpc_port, metrics_port = free_port(), free_port()
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{metrics_port}", "sqlite://:memory:",
                  auth_token_file=str(token_file), grace=1.0, stop=stop)
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=run, name="phasewatch-serve", daemon=True)
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    prometheus = None
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.PhaseDetectorStub(channel)
        md = (("authorization", f"Bearer {TOKEN}"),)
        batch = pb.MetricBatch(series=[pb.Series(name="loss", steps=[1, 2], values=[1.0, 0.5])])
        stub.Log(pb.LogRequest(run_id="scraped", batch=batch), metadata=md, timeout=10)
        prometheus = ScrapingPrometheus(tmp_path, f"127.0.0.1:{metrics_port}", token_file)
        prometheus.start()

        def up(job: str) -> float | None:
            result = prometheus.query(f'up{{job="{job}"}}')
            return float(result[0]["value"][1]) if result else None

        wait_for(lambda: up("with-token") == 1 and up("without-token") is not None, 30, "scrapes")
        assert up("without-token") == 0  # 401: no data for a scraper without the token
        handled = wait_for(lambda: prometheus.query(
            'grpc_server_handled_total{job="with-token",grpc_method="Log",grpc_code="OK"}'), 30,
            "gRPC server metrics in Prometheus")
        assert float(handled[0]["value"][1]) == 1
        build = prometheus.query('phasewatch_build_info{job="with-token"}')
        assert build and build[0]["metric"]["version"] == detector.__version__
        phase = prometheus.query('phasewatch_run_phase{job="with-token",run_id="scraped"}')
        assert len(phase) == 4
        assert not prometheus.query('phasewatch_run_phase{job="without-token"}')
        # Prometheus negotiated OpenMetrics (its default Accept) and read it.
        targets = prometheus.api("targets")["activeTargets"]
        assert {t["labels"]["job"]: t["health"] for t in targets} == {
            "with-token": "up", "without-token": "down"}
        assert all(not math.isnan(float(p["value"][1])) for p in phase)
    finally:
        if prometheus is not None:
            prometheus.stop()
        channel.close()
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and not failure, failure
