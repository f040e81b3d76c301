"""Configurable limits: the per-run points-per-second bucket, and each limit
answered RESOURCE_EXHAUSTED by a real server (issue 8, item 2)."""

from __future__ import annotations

import grpc
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.client import ClientConfig, connect
from detector.engine import Engine, EngineConfig
from detector.errors import InvalidArgument, RateLimited, ResourceExhausted
from detector.limits import RunRateLimiter, TokenBucket
from detector.server import RETRY_AFTER_KEY

TIMEOUT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate=10, capacity=20, now=0.0)
    assert bucket.try_take(20, 0.0) == 0.0
    assert bucket.try_take(5, 0.0) == pytest.approx(0.5)  # 5 tokens at 10/s
    assert bucket.try_take(5, 0.5) == 0.0
    bucket.refill(1000.0)
    assert bucket.tokens == 20  # never above capacity


def test_a_batch_larger_than_the_burst_passes_once_and_leaves_a_debt() -> None:
    clock = Clock()
    limiter = RunRateLimiter(rate=100, burst=50, clock=clock)
    limiter.take("r", 2048)  # the SDK's batch: never refused for its size alone
    with pytest.raises(RateLimited) as info:
        limiter.take("r", 1)
    # 2048 - 50 points of debt plus 1 point, at 100 points/s.
    assert info.value.retry_after == pytest.approx((2048 - 50 + 1) / 100)
    clock.now += info.value.retry_after
    limiter.take("r", 1)


def test_the_long_run_rate_is_bounded() -> None:
    clock = Clock()
    limiter = RunRateLimiter(rate=200, burst=200, clock=clock)
    taken = 0
    for _ in range(10_000):  # a client sending as fast as it is let, 1 ms apart
        clock.now += 0.001
        try:
            limiter.take("r", 64)
            taken += 64
        except RateLimited:
            pass
    assert taken <= 200 * 10 + 200  # 10 s at 200/s plus one burst
    assert taken >= 200 * 10 - 64


def test_runs_have_their_own_buckets_and_idle_ones_are_forgotten() -> None:
    clock = Clock()
    limiter = RunRateLimiter(rate=10, burst=10, clock=clock, max_idle_buckets=3)
    limiter.take("a", 10)
    limiter.take("b", 10)  # a's bucket is empty, b's is its own
    with pytest.raises(ResourceExhausted):
        limiter.take("a", 1)
    clock.now += 10  # both refilled: forgettable
    for run in ("c", "d", "e", "f"):
        limiter.take(run, 1)
    assert len(limiter) <= 4


@pytest.mark.parametrize("rate,burst", [(0, None), (-1, None), (float("nan"), None), (10, 0.5)])
def test_bad_rate_settings_are_refused(rate: float, burst: float | None) -> None:
    with pytest.raises(InvalidArgument):
        RunRateLimiter(rate, burst)
    with pytest.raises(InvalidArgument):
        EngineConfig(max_points_per_second=rate, points_burst=burst)


def test_engine_refuses_a_batch_over_the_rate_whole() -> None:
    engine = Engine(EngineConfig(max_points_per_second=1000, points_burst=100))
    clock = Clock()
    engine._rate = RunRateLimiter(1000, 100, clock=clock)  # the same bucket, on a test clock
    engine.ingest("r", {"loss": (list(range(100)), [1.0] * 100)})
    with pytest.raises(RateLimited):
        engine.ingest("r", {"loss": (list(range(100, 150)), [1.0] * 50)})
    assert engine.status("r").last_step == 99  # nothing of the refused batch went in
    assert engine.snapshot().ingested_points == 100
    engine.ingest("other", {"loss": ([0], [1.0])})  # another run is not slowed down
    clock.now += 0.05
    assert engine.ingest("r", {"loss": (list(range(100, 150)), [1.0] * 50)}).accepted == 50


def test_bad_input_does_not_use_up_the_budget() -> None:
    engine = Engine(EngineConfig(max_points_per_second=10, points_burst=10))
    with pytest.raises(InvalidArgument):
        engine.ingest("r", {"loss": (list(range(10)), [1.0] * 9)})
    assert engine.ingest("r", {"loss": (list(range(10)), [1.0] * 10)}).accepted == 10


def test_server_answers_each_limit_resource_exhausted(make_server) -> None:
    engine, _, channel = make_server(
        # 50 points at once, then 5 a second: 8 s before another 40 fit.
        config=EngineConfig(max_series_per_run=3, max_runs=2, max_points_per_second=5,
                            points_burst=50),
        max_message_bytes=2048,
    )
    stub = pb_grpc.PhaseDetectorStub(channel)

    def log(run_id: str, names: str = "a", n: int = 1, first: int = 0) -> pb.LogResponse:
        steps = list(range(first, first + n))
        request = pb.LogRequest(run_id=run_id, batch=pb.MetricBatch(series=[
            pb.Series(name=name, steps=steps, values=[1.0] * n) for name in names
        ]))
        return stub.Log(request, timeout=TIMEOUT)

    def refused(call) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        return info.value

    assert log("r1", "abc").ack.accepted == 3
    assert "series" in refused(lambda: log("r1", "d")).details()  # series per run
    log("r2")
    assert "runs" in refused(lambda: log("r3")).details()  # runs per server
    refused(lambda: log("r2", n=300, first=10))  # message size: > 2048 bytes
    log("r2", n=40, first=1)  # within the rate
    error = refused(lambda: log("r2", n=40, first=100))  # points per second
    assert "points/s" in error.details()
    assert int(dict(error.trailing_metadata())[RETRY_AFTER_KEY]) > 0
    assert engine.status("r2").last_step == 40
    assert engine.snapshot().ingested_points == 3 + 1 + 40


def test_sdk_retries_a_rate_limited_batch_instead_of_dropping_it(make_server) -> None:
    engine, port, _ = make_server(
        config=EngineConfig(max_points_per_second=400, points_burst=100)
    )
    config = ClientConfig(batch_points=100, flush_interval=0.05, reconnect_initial_backoff=0.05,
                          reconnect_max_backoff=0.2)
    with connect(f"127.0.0.1:{port}", "limited", config=config) as run:
        for step in range(600):
            run.log(step, loss=1.0 / (1 + step))
        assert run.flush(timeout=30)
        stats = run.stats
    assert stats.rejected == 0 and stats.dropped == 0
    assert stats.acknowledged == 600
    assert stats.reconnects >= 1  # it was refused at least once, and came back
    assert engine.status("limited").last_step == 599
    assert engine.snapshot().ingested_points >= 600
