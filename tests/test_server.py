"""The gRPC server, end to end: a real server on port 0 and a real channel."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.convert import event_to_proto, phase_to_proto, segment_to_proto
from detector.core.types import Event, EventKind, Phase
from detector.engine import Engine, EngineConfig
from detector.errors import InvalidArgument, NotFound, PhasewatchError
from detector.server import SERVICE_NAME, EventBus, create_server, status_code

TIMEOUT = 10.0


def stub(channel: grpc.Channel) -> pb_grpc.PhaseDetectorStub:
    return pb_grpc.PhaseDetectorStub(channel)


def batch(**columns: tuple[list[int], list[float]]) -> pb.MetricBatch:
    return pb.MetricBatch(
        series=[pb.Series(name=n, steps=s, values=v) for n, (s, v) in columns.items()]
    )


def log(channel: grpc.Channel, run_id: str, **columns) -> pb.LogResponse:
    return stub(channel).Log(pb.LogRequest(run_id=run_id, batch=batch(**columns)), timeout=TIMEOUT)


def status_of(call) -> grpc.StatusCode:
    """The status code a unary or streaming call failed with."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def assert_still_serves(channel: grpc.Channel) -> None:
    response = log(channel, "healthy-run", loss=([1, 2], [0.5, 0.4]))
    assert response.ack.accepted == 2


def stream(channel: grpc.Channel, *requests: pb.StreamRequest) -> list[pb.StreamResponse]:
    return list(stub(channel).Stream(iter(requests), timeout=TIMEOUT))


def start(run_id: str, **kwargs) -> pb.StreamRequest:
    return pb.StreamRequest(start=pb.RunStart(run_id=run_id, **kwargs))


def send(**columns) -> pb.StreamRequest:
    return pb.StreamRequest(batch=batch(**columns))


def end(final_step: int = 0) -> pb.StreamRequest:
    return pb.StreamRequest(end=pb.RunEnd(final_step=final_step))


def acks(responses: list[pb.StreamResponse]) -> list[pb.Ack]:
    return [r.ack for r in responses if r.WhichOneof("msg") == "ack"]


# --- the happy paths --------------------------------------------------------------


def test_log_then_queries_answer(server):
    engine, _, channel = server
    steps = list(range(10))
    response = stub(channel).Log(
        pb.LogRequest(
            run_id="run-a",
            start=pb.RunStart(
                labels={"team": "vision"},
                series=[pb.SeriesSpec(name="val_acc", direction=pb.DIRECTION_MINIMIZE)],
            ),
            batch=batch(train_loss=(steps, [1.0 / (1 + s) for s in steps]),
                        val_acc=(steps, [0.1] * 10)),
        ),
        timeout=TIMEOUT,
    )
    # Steps 8 and 9 are held in the reorder window (2 steps), so the detector has
    # processed through step 7.
    assert (response.ack.accepted, response.ack.rejected, response.ack.through_step) == (20, 0, 7)
    # The spec declared in start wins over the name's inference.
    assert engine._runs["run-a"].detector.specs["val_acc"].direction.value == "minimize"

    phase = stub(channel).GetPhase(pb.GetPhaseRequest(run_id="run-a"), timeout=TIMEOUT)
    status = engine.status("run-a")
    assert phase.run_id == "run-a"
    assert phase.last_step == 9
    assert dict(phase.labels) == {"team": "vision"}
    assert phase.phase == phase_to_proto(status.phase)
    assert phase.since_step == status.since_step

    timeline = stub(channel).GetTimeline(pb.GetTimelineRequest(run_id="run-a"), timeout=TIMEOUT)
    segments, events = engine.timeline("run-a")
    assert timeline.run_id == "run-a"
    assert list(timeline.segments) == [segment_to_proto(s) for s in segments]
    assert [(e.step, e.kind) for e in timeline.events] == [
        (e.step, event_to_proto("run-a", e).kind) for e in events
    ]

    log(channel, "run-b", train_loss=([0], [1.0]))
    runs = stub(channel).ListRuns(pb.ListRunsRequest(), timeout=TIMEOUT).runs
    assert [r.run_id for r in runs] == ["run-a", "run-b"]
    selected = stub(channel).ListRuns(
        pb.ListRunsRequest(label_selector={"team": "vision"}), timeout=TIMEOUT
    ).runs
    assert [r.run_id for r in selected] == ["run-a"]
    assert stub(channel).ListRuns(
        pb.ListRunsRequest(label_selector={"team": "nlp"}), timeout=TIMEOUT
    ).runs == []


def test_list_runs_filters_by_phase(server):
    engine, _, channel = server
    log(channel, "with-points", loss=(list(range(50)), [1.0 / (1 + s) for s in range(50)]))
    stub(channel).Log(pb.LogRequest(start=pb.RunStart(run_id="no-points")), timeout=TIMEOUT)
    assert engine.status("no-points").phase is None

    def listed(phase: int) -> list[str]:
        runs = stub(channel).ListRuns(pb.ListRunsRequest(phase=phase), timeout=TIMEOUT).runs
        return [r.run_id for r in runs]

    assert listed(pb.PHASE_UNSPECIFIED) == ["no-points", "with-points"]
    # Whatever phase the detector says the run is in, the filter agrees with it;
    # a run without a phase is never listed under one.
    for phase in Phase:
        expected = ["with-points"] if engine.status("with-points").phase is phase else []
        assert listed(phase_to_proto(phase)) == expected


def test_stream_start_batch_end_acks_each_message(server):
    engine, _, channel = server
    responses = stream(
        channel,
        start("run-s", labels={"k": "v"}),
        send(loss=(list(range(5)), [1.0, 0.9, 0.8, 0.7, 0.6])),
        # -1 is rejected; the acks count per batch, not cumulatively.
        send(loss=([5, 6, 7, -1], [0.5, 0.4, 0.3, 0.2])),
        end(final_step=7),
    )
    got = acks(responses)
    assert [(a.accepted, a.rejected) for a in got] == [(0, 0), (5, 0), (3, 1), (0, 0)]
    through = [a.through_step for a in got]
    # Before any point the run is at -1; afterwards the step only grows, and
    # the end acknowledges everything the reorder buffer held.
    assert through[0] == -1 and through == sorted(through) and through[-1] == 7
    assert responses[-1].WhichOneof("msg") == "ack"  # events come before their ack
    assert all(r.event.run_id == "run-s" for r in responses if r.WhichOneof("msg") == "event")
    status = engine.status("run-s")
    assert status.ended and status.last_step == 7 and status.labels == {"k": "v"}


def test_stream_half_close_without_end_flushes_and_leaves_run_open(server):
    engine, _, channel = server
    responses = stream(channel, start("run-h"), send(loss=(list(range(6)), [1.0] * 6)))
    got = acks(responses)
    assert len(got) == 3  # start, batch, and the flush after the half-close
    assert got[-1].through_step == 5
    assert not engine.status("run-h").ended
    # Nothing is held back any more: the detector has seen every step.
    assert engine._runs["run-h"].pending == {}


def test_stream_second_start_same_run_is_a_resume(server):
    _, _, channel = server
    responses = stream(
        channel, start("run-r"), send(x=([1], [1.0])), start("run-r", resume=True),
        send(x=([1, 2], [1.0, 2.0])), end(),
    )
    got = acks(responses)
    assert [(a.accepted, a.rejected) for a in got] == [(0, 0), (1, 0), (0, 0), (2, 0), (0, 0)]
    assert got[-1].through_step == 2


def test_empty_stream_ends_cleanly(server):
    _, _, channel = server
    assert stream(channel) == []


# --- bad input gets a status, and the server keeps serving ------------------------


@pytest.mark.parametrize(
    "run_id", ["", " run", "run one", "run\tone", "run\x00one", "run\none", "é\u200b", "r" * 300]
)
def test_log_bad_run_id_is_invalid_argument(server, run_id):
    _, _, channel = server
    assert status_of(lambda: log(channel, run_id, loss=([1], [1.0]))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert_still_serves(channel)


@pytest.mark.parametrize("name", ["", "train loss", "loss\x01"])
def test_log_bad_series_name_is_invalid_argument(server, name):
    _, _, channel = server
    request = pb.LogRequest(run_id="r", batch=pb.MetricBatch(
        series=[pb.Series(name=name, steps=[1], values=[1.0])]
    ))
    assert status_of(lambda: stub(channel).Log(request, timeout=TIMEOUT)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert_still_serves(channel)


def test_log_length_mismatch_is_invalid_argument(server):
    engine, _, channel = server
    code = status_of(lambda: log(channel, "r", loss=([1, 2, 3], [1.0, 2.0])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert engine.snapshot().ingested_points == 0  # nothing of the batch went in
    assert_still_serves(channel)


def test_log_start_with_other_run_id_is_invalid_argument(server):
    _, _, channel = server
    request = pb.LogRequest(run_id="a", start=pb.RunStart(run_id="b"))
    assert status_of(lambda: stub(channel).Log(request, timeout=TIMEOUT)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


@pytest.mark.parametrize(
    "requests",
    [
        [send(loss=([1], [1.0]))],
        [end()],
        [pb.StreamRequest()],
        [start("")],
        [start("bad id")],
        [start("a"), start("b")],
        [start("a"), send(loss=([1, 2], [1.0]))],
        [start("a"), send(**{"": ([1], [1.0])})],
    ],
    ids=[
        "batch-first",
        "end-first",
        "empty-message",
        "empty-run-id",
        "malformed-run-id",
        "second-start-other-run",
        "length-mismatch",
        "empty-series-name",
    ],
)
def test_stream_bad_input_is_invalid_argument(server, requests):
    _, _, channel = server
    assert status_of(lambda: stream(channel, *requests)) == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serves(channel)


def test_stream_batch_after_end_is_failed_precondition(server):
    _, _, channel = server
    requests = [start("a"), end(), send(loss=([1], [1.0]))]
    assert status_of(lambda: stream(channel, *requests)) == grpc.StatusCode.FAILED_PRECONDITION


def test_too_many_series_is_resource_exhausted(make_server):
    engine, _, channel = make_server(config=EngineConfig(max_series_per_run=2))
    one = ([1], [1.0])
    assert status_of(lambda: log(channel, "r", a=one, b=one, c=one)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert log(channel, "r", a=one, b=one).ack.accepted == 2
    assert status_of(lambda: log(channel, "r", c=one)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    requests = [start("s"), send(a=one, b=one), send(c=one)]
    assert status_of(lambda: stream(channel, *requests)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(engine._runs["r"].detector.specs) == ["a", "b"]
    assert_still_serves(channel)


def test_message_too_large_is_resource_exhausted(make_server):
    _, _, channel = make_server(max_message_bytes=1024)
    steps = list(range(1000))
    assert status_of(lambda: log(channel, "r", loss=(steps, [1.0] * 1000))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    requests = [start("s"), send(loss=(steps, [1.0] * 1000))]
    assert status_of(lambda: stream(channel, *requests)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serves(channel)


@pytest.mark.parametrize("method", ["GetPhase", "GetTimeline"])
def test_query_unknown_run_is_not_found(server, method):
    _, _, channel = server
    request = pb.GetPhaseRequest if method == "GetPhase" else pb.GetTimelineRequest
    call = getattr(stub(channel), method)
    assert status_of(lambda: call(request(run_id="nope"), timeout=TIMEOUT)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert status_of(lambda: call(request(run_id=""), timeout=TIMEOUT)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert_still_serves(channel)


def test_non_finite_values_are_accepted_as_data(server):
    engine, _, channel = server
    values = [1.0, math.nan, math.inf, -math.inf, 0.5]
    response = log(channel, "r", loss=([1, 2, 3, 4, 5], values))
    assert (response.ack.accepted, response.ack.rejected) == (5, 0)
    responses = stream(channel, start("s"), send(loss=([1, 2, 3], [math.nan] * 3)), end())
    assert [(a.accepted, a.rejected) for a in acks(responses)] == [(0, 0), (3, 0), (0, 0)]
    assert engine.snapshot().ingested_points == 8


def test_status_table_maps_subclasses():
    class BadRunId(InvalidArgument):
        pass

    assert status_code(BadRunId("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code(PhasewatchError("x")) == grpc.StatusCode.UNKNOWN


# --- health and reflection ---------------------------------------------------------


def test_health_reports_serving(server):
    _, _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    code = status_of(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(server):
    _, _, channel = server
    database = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE_NAME == "phasewatch.v1.PhaseDetector"
    assert SERVICE_NAME in database.get_services()
    assert "grpc.health.v1.Health" in database.get_services()
    found = database.FindFileContainingSymbol(SERVICE_NAME)
    assert found.package == "phasewatch.v1"


# --- WatchEvents and the event bus --------------------------------------------------


def _event(step: int, kind: EventKind = EventKind.CHANGE_POINT) -> Event:
    return Event(step=step, kind=kind, detected_at=step + 3, series="val_acc", confidence=0.9)


def _wait_for(predicate, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_watch_opens_and_ends_cleanly_on_cancel(make_server):
    bus = EventBus()
    _, _, channel = make_server(bus=bus)
    call = stub(channel).WatchEvents(pb.WatchEventsRequest(run_id="r"), timeout=TIMEOUT)
    call.initial_metadata()  # returns once the server has subscribed
    assert bus.subscriber_count == 1
    call.cancel()
    _wait_for(lambda: bus.subscriber_count == 0)
    assert call.code() == grpc.StatusCode.CANCELLED
    assert_still_serves(channel)


def test_watch_receives_published_events_filtered(make_server):
    bus = EventBus()
    _, _, channel = make_server(bus=bus)
    one = stub(channel).WatchEvents(
        pb.WatchEventsRequest(run_id="r", kinds=[pb.EVENT_KIND_GROKKING_ONSET]), timeout=TIMEOUT
    )
    every = stub(channel).WatchEvents(pb.WatchEventsRequest(), timeout=TIMEOUT)
    one.initial_metadata()
    every.initial_metadata()
    bus.publish("r", [_event(10), _event(20, EventKind.GROKKING_ONSET)])
    bus.publish("other", [_event(30, EventKind.GROKKING_ONSET)])

    first = next(one)
    assert (first.run_id, first.step, first.kind) == ("r", 20, pb.EVENT_KIND_GROKKING_ONSET)
    assert first.evidence["detected_at_step"] == "23"
    assert first.time.seconds > 0
    assert [(e.run_id, e.step) for e in (next(every) for _ in range(3))] == [
        ("r", 10), ("r", 20), ("other", 30),
    ]
    bus.close()  # what serve() does on shutdown: watches end with OK
    assert list(one) == [] and list(every) == []
    assert one.code() == every.code() == grpc.StatusCode.OK


def test_watch_bad_request_is_invalid_argument(server):
    _, _, channel = server
    for request in (
        pb.WatchEventsRequest(kinds=[pb.EVENT_KIND_UNSPECIFIED]),
        pb.WatchEventsRequest(kinds=[999]),
        pb.WatchEventsRequest(run_id="bad id"),
    ):
        call = stub(channel).WatchEvents(request, timeout=TIMEOUT)
        assert status_of(lambda call=call: list(call)) == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_ends_when_server_stops():
    bus = EventBus()
    server, port = create_server(Engine(), bus=bus)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = stub(channel).WatchEvents(pb.WatchEventsRequest(), timeout=TIMEOUT)
        call.initial_metadata()
        started = time.monotonic()
        server.stop(None)  # cancels every RPC: the watch must end now, not at its deadline
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        _wait_for(lambda: bus.subscriber_count == 0, timeout=2.0)
        assert time.monotonic() - started < 2.0
    finally:
        channel.close()
        server.stop(None)


def test_log_events_reach_watchers(make_server):
    bus = EventBus()
    engine, _, channel = make_server(bus=bus)
    watch = stub(channel).WatchEvents(pb.WatchEventsRequest(run_id="r"), timeout=TIMEOUT)
    watch.initial_metadata()
    steps = list(range(400))
    values = [1.0 if s < 200 else 10.0 for s in steps]  # an unmistakable level shift
    response = log(channel, "r", train_loss=(steps, values))
    if not response.events:
        pytest.skip("the detector emits no event for a level shift yet")
    received = [next(watch) for _ in response.events]
    assert [(e.step, e.kind) for e in received] == [(e.step, e.kind) for e in response.events]
    watch.cancel()


def test_bus_filters_by_run_and_kind():
    bus = EventBus()
    one = bus.subscribe("r", kinds={EventKind.LOSS_SPIKE})
    every = bus.subscribe()
    messages = bus.publish("r", [_event(1), _event(2, EventKind.LOSS_SPIKE)], at=1_700_000_000.5)
    bus.publish("q", [_event(3, EventKind.LOSS_SPIKE)])
    assert [m.step for m in messages] == [1, 2]
    assert messages[0].time.seconds == 1_700_000_000 and messages[0].time.nanos == 500_000_000
    assert [one.get(0).step, one.get(0)] == [2, None]
    assert [every.get(0).step for _ in range(3)] == [1, 2, 3]


def test_bus_slow_watcher_drops_and_counts_without_blocking():
    bus = EventBus(maxsize=2)
    slow = bus.subscribe()
    started = time.monotonic()
    bus.publish("r", [_event(i) for i in range(5)])
    assert time.monotonic() - started < 1.0
    assert (slow.dropped, bus.dropped) == (3, 3)
    assert [slow.get(0).step, slow.get(0).step, slow.get(0)] == [0, 1, None]


def test_bus_close_wakes_a_blocked_watcher_and_refuses_new_ones():
    bus = EventBus()
    sub = bus.subscribe("r")
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(sub.get(timeout=TIMEOUT)))
    waiter.start()
    time.sleep(0.05)
    bus.close()
    waiter.join(timeout=2)
    assert not waiter.is_alive() and got == [None]
    assert bus.subscriber_count == 0
    late = bus.subscribe()
    assert late.closed and late.get(timeout=0) is None
    assert bus.publish("r", [_event(1)])[0].step == 1  # publishing still converts


def test_bus_rejects_zero_size():
    with pytest.raises(InvalidArgument):
        EventBus(maxsize=0)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_runs_until_stopped(tmp_path):
    import urllib.request

    from detector.server import serve

    grpc_port, metrics_port = _free_port(), _free_port()
    stop = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{metrics_port}",
              f"sqlite:///{tmp_path / 'pw.db'}"),
        kwargs={"stop": stop, "grace": 0.5},
    )
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert log(channel, "served", loss=([1, 2, 3], [1.0, 0.5, 0.2])).ack.accepted == 3
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            assert 'phasewatch_run_last_step{run_id="served"} 3.0' in response.read().decode()
    finally:
        channel.close()
        stop.set()
        thread.join(timeout=TIMEOUT)
    assert not thread.is_alive()
    from detector.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'pw.db'}")  # the run was persisted
    assert store.get_run("served").last_step == 3
    store.close()


def test_warm_up_loads_the_detection_kernels_before_the_first_batch():
    """serve() calls warm_up before it listens: the kernels the first real run
    needs are loaded then, not under the detection lock of its first batch."""
    import subprocess
    import sys

    code = (
        "from detector.core import _kernels as k\n"
        "names = ('series_block', 'scan_append', 'trigger_warm_up', 'trigger_absorb',\n"
        "         'series_episodes', 'localiser_look_confirm', 'mann_kendall_sums',\n"
        "         'plateau_windows', 'plateau_bins', 'blas_dot')\n"
        "def loaded():\n"
        "    return sorted(n for n in names if getattr(k, n).signatures)\n"
        "print(loaded())\n"
        "from detector.server.app import warm_up\n"
        "print(warm_up() > 0)\n"
        "print(loaded())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == "True"
    # The kernels the series detector calls from Python (the trigger's filters and
    # CUSUMs run inside series_block, the warm-up and the absorb; an alarm's looks
    # and the scan to the next alarm run inside series_episodes (scan_append is only
    # called from compiled code now), the end of a run's look is one call, whose
    # parabola fits call blas_dot; a block's plateau events are plateau_bins'
    # (plateau_windows is PlateauTest.test's and test_sliding's only).
    assert out[2] == str(sorted(("series_block", "trigger_warm_up", "trigger_absorb",
                                 "series_episodes", "localiser_look_confirm", "mann_kendall_sums",
                                 "plateau_bins", "blas_dot")))
