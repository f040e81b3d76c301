"""Hostile and careless clients (issue 18), each against a real server on 127.0.0.1."""

from __future__ import annotations

import grpc
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.engine import MAX_LABEL_VALUE_BYTES, MAX_LABELS, MAX_STEP
from detector.store import SqliteStore

TIMEOUT = 20.0


def stub(channel: grpc.Channel) -> pb_grpc.PhaseDetectorStub:
    return pb_grpc.PhaseDetectorStub(channel)


def log(channel: grpc.Channel, run_id: str, steps: list[int], values: list[float] | None = None,
        **start: object) -> pb.LogResponse:
    values = values if values is not None else [1.0 / (1 + i) for i in range(len(steps))]
    request = pb.LogRequest(
        run_id=run_id,
        batch=pb.MetricBatch(series=[pb.Series(name="train_loss", steps=steps, values=values)]),
    )
    if start:
        request.start.CopyFrom(pb.RunStart(run_id=run_id, **start))
    return stub(channel).Log(request, timeout=TIMEOUT)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def end(channel: grpc.Channel, run_id: str, final_step: int = 0) -> list[pb.StreamResponse]:
    requests = [pb.StreamRequest(start=pb.RunStart(run_id=run_id, resume=True)),
                pb.StreamRequest(end=pb.RunEnd(final_step=final_step))]
    return list(stub(channel).Stream(iter(requests), timeout=TIMEOUT))


# --- 1. steps near int64's end ------------------------------------------------------


@pytest.mark.parametrize("top", [2**63 - 1, MAX_STEP + 1, 2**62])
def test_a_step_beyond_the_range_is_invalid_argument_and_the_run_still_ends(
        make_server, tmp_path, top):
    engine, _, channel = make_server(store=SqliteStore(tmp_path / "pw.db"))
    code, details = code_of(lambda: log(channel, "big", [0, 1, top]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(MAX_STEP) in details
    assert log(channel, "big", [0, 1, 2]).ack.accepted == 3  # nothing of the refused batch went in
    assert end(channel, "big")[-1].ack.through_step == 2
    code, _ = code_of(lambda: end(channel, "big", final_step=2**63 - 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_largest_step_is_taken_and_its_segments_end_inside_the_run(make_server, tmp_path):
    engine, _, channel = make_server(store=SqliteStore(tmp_path / "pw.db"))
    steps = [0, 1, 2, MAX_STEP - 1, MAX_STEP]
    assert log(channel, "edge", steps).ack.accepted == len(steps)
    end(channel, "edge")
    timeline = stub(channel).GetTimeline(pb.GetTimelineRequest(run_id="edge"), timeout=TIMEOUT)
    assert timeline.segments
    # A segment's end is exclusive; the last one ends one step gap past the last
    # step (the labeller's convention): within int64, not overflowed.
    assert all(0 <= s.start_step <= MAX_STEP and s.start_step < s.end_step <= 2 * MAX_STEP + 1
               for s in timeline.segments)
    assert engine.status("edge").ended


# --- 6. label limits -----------------------------------------------------------------


def test_labels_beyond_the_limits_are_invalid_argument(server):
    _, _, channel = server
    huge = {"big": "x" * (MAX_LABEL_VALUE_BYTES + 1)}
    many = {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
    for labels in (huge, many, {"": "v"}, {"k" * 200: "v"}):
        code, _ = code_of(lambda labels=labels: log(channel, "labelled", [0], labels=labels))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    at_limit = {f"k{i}": "v" * MAX_LABEL_VALUE_BYTES for i in range(MAX_LABELS)}
    assert log(channel, "labelled", [0], labels=at_limit).ack.accepted == 1
    code, _ = code_of(lambda: log(channel, "labelled", [1], labels={"one-more": "v"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    runs = stub(channel).ListRuns(pb.ListRunsRequest(), timeout=TIMEOUT).runs
    assert len(runs[0].labels) == MAX_LABELS


# --- 2. one writer per run ---------------------------------------------------------


class OpenStream:
    """A Stream kept open from a thread: send requests one at a time, read answers."""

    def __init__(self, channel: grpc.Channel, metadata: tuple = ()) -> None:
        import queue

        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = stub(channel).Stream(iter(self.requests.get, None), metadata=metadata,
                                         timeout=TIMEOUT)

    def send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        self.requests.put(request)
        return next(self.call)

    def close(self) -> None:
        self.requests.put(None)


def error_info(error: grpc.RpcError):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def batch_of(*steps: int) -> pb.StreamRequest:
    return pb.StreamRequest(batch=pb.MetricBatch(series=[
        pb.Series(name="train_loss", steps=steps, values=[1.0] * len(steps))]))


def test_a_second_writer_of_an_open_run_is_aborted_naming_the_owner(server):
    engine, _, channel = server
    a = OpenStream(channel, metadata=(("phasewatch-writer", "client-a"),))
    assert a.send(pb.StreamRequest(start=pb.RunStart(run_id="shared"))).ack.through_step == -1
    assert a.send(batch_of(0, 1, 2, 3)).ack.accepted == 4
    for metadata in ((), (("phasewatch-writer", "client-b"),)):
        b = OpenStream(channel, metadata=metadata)
        with pytest.raises(grpc.RpcError) as info:
            b.send(pb.StreamRequest(start=pb.RunStart(run_id="shared", labels={"who": "b"})))
        assert info.value.code() == grpc.StatusCode.ABORTED
        details = error_info(info.value)
        assert details.reason == "RUN_OWNED" and details.metadata["run_id"] == "shared"
        assert details.metadata["owner"].startswith("ipv") and "127.0.0.1" in info.value.details()
    # Nor may a Log write it meanwhile.
    code, _ = code_of(lambda: log(channel, "shared", [10, 11]))
    assert code == grpc.StatusCode.ABORTED
    assert a.send(batch_of(4, 5)).ack.accepted == 2  # A goes on, its run untouched
    assert engine.status("shared").labels == {}
    a.close()
    list(a.call)
    # Its stream closed, the run is free for anyone.
    assert log(channel, "shared", [10, 11]).ack.accepted == 2


def test_the_same_client_reconnecting_takes_its_run_over(server):
    engine, _, channel = server
    me = (("phasewatch-writer", "client-a"),)
    old = OpenStream(channel, metadata=me)
    old.send(pb.StreamRequest(start=pb.RunStart(run_id="mine")))
    old.send(batch_of(0, 1, 2))
    new = OpenStream(channel, metadata=me)  # the old one looks open: a stale connection
    assert new.send(pb.StreamRequest(start=pb.RunStart(run_id="mine", resume=True))).ack
    with pytest.raises(grpc.RpcError) as info:
        list(old.call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert new.send(batch_of(3, 4)).ack.accepted == 2
    new.close()
    list(new.call)


def test_a_rate_limit_carries_retry_info(make_server):
    from detector.client import retry_delay
    from detector.engine import EngineConfig

    _, _, channel = make_server(config=EngineConfig(max_points_per_second=10, points_burst=10))
    log(channel, "slow", list(range(10)))
    with pytest.raises(grpc.RpcError) as info:
        log(channel, "slow", list(range(10, 20)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    delay = retry_delay(info.value)
    assert delay is not None and 0 < delay <= 1.0
    assert error_info(info.value).reason == "RATE_LIMITED"
