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


# --- 5. damaged stores and checkpoints ----------------------------------------------


def serve_fails(*args: str) -> tuple[int, str]:
    """``phasewatch serve`` with these flags, expected to refuse at once: (status, stderr)."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "detector", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "", *args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    return result.returncode, result.stderr


def _filled_store(path) -> None:
    from detector.engine import Engine

    store = SqliteStore(path)
    engine = Engine(store=store)
    for i in range(40):
        engine.ingest(f"run-{i}", {"train_loss": (list(range(200)), [1.0 / (s + 1) for s in
                                                                      range(200)])})
    engine.checkpoint_all()
    store.close()


@pytest.mark.parametrize("damage", ["emptied", "halved", "garbage-page", "not-sqlite",
                                    "no-directory", "foreign-sqlite"])
def test_a_damaged_store_is_refused_in_one_line_naming_the_file(tmp_path, damage):
    import sqlite3

    path = tmp_path / "pw.db"
    if damage == "no-directory":
        path = tmp_path / "missing" / "pw.db"
    elif damage == "not-sqlite":
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    elif damage == "foreign-sqlite":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE accounts (id INTEGER)")
    else:
        _filled_store(path)
        data = path.read_bytes()
        assert len(data) > 5 * 4096
        if damage == "emptied":
            path.write_bytes(b"")
        elif damage == "halved":
            path.write_bytes(data[: len(data) // 2])
        else:
            path.write_bytes(data[:2 * 4096] + bytes(range(256)) * 16 + data[3 * 4096:])
    before = path.read_bytes() if path.exists() else None
    code, stderr = serve_fails("--store", f"sqlite:///{path}")
    lines = stderr.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and str(path.parent if damage == "no-directory" else path) in lines[0], stderr
    assert "Traceback" not in stderr
    assert (path.read_bytes() if path.exists() else None) == before  # nothing written


def test_a_port_in_use_is_one_line_naming_the_address(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        for flags in (["--listen", address], ["--metrics-listen", address]):
            code, stderr = serve_fails("--store", "sqlite://", *flags)
            assert code != 0
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and address in lines[0] and "in use" in lines[0], stderr


def test_a_damaged_checkpoint_is_failed_precondition_and_the_run_can_restart(make_server, tmp_path):
    import pickle
    import sqlite3

    from detector.engine import Engine

    path = tmp_path / "pw.db"
    store = SqliteStore(path)
    engine = Engine(store=store)
    engine.ingest("hurt", {"train_loss": (list(range(100)), [1.0] * 100)})
    engine.ingest("whole", {"train_loss": (list(range(100)), [1.0] * 100)})
    engine.checkpoint_all()
    events_before = store.get_events("hurt")
    store.close()
    with sqlite3.connect(path) as conn:  # unpickles, but lacks keys
        conn.execute("UPDATE checkpoints SET state = ? WHERE run_id = 'hurt'",
                     (pickle.dumps({"version": 2, "run_id": "hurt"}),))
        conn.execute("DELETE FROM checkpoint_log WHERE run_id = 'hurt'")
    _, _, channel = make_server(store=SqliteStore(path))
    code, details = code_of(lambda: log(channel, "hurt", [100]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'hurt'" in details and "damaged" in details and "restart" in details
    assert log(channel, "whole", [100]).ack.accepted == 1  # the others are not held up
    # The explicit way out: restart from the stored timeline, after the last stored step.
    answers = list(stub(channel).Stream(iter([pb.StreamRequest(
        start=pb.RunStart(run_id="hurt", resume=True, restart=True))]), timeout=TIMEOUT))
    assert answers[0].ack.through_step == 99
    response = log(channel, "hurt", [99, 100, 101])
    assert (response.ack.accepted, response.ack.rejected) == (2, 1)
    assert end(channel, "hurt")[-1].ack.through_step == 101
    timeline = stub(channel).GetTimeline(pb.GetTimelineRequest(run_id="hurt"), timeout=TIMEOUT)
    assert len(timeline.events) >= len(events_before)


# --- 4/6. responses that could grow without bound are paged -------------------------


def _stored_runs(store: SqliteStore, count: int, labels: dict[str, str] | None = None) -> None:
    from detector.engine import RunStatus

    with store._lock, store._conn:  # bulk, in one transaction: 5 000 runs in well under a second
        for i in range(count):
            store._upsert_run(RunStatus(run_id=f"run-{i:05d}", labels=labels or {"i": str(i)},
                                        phase=None, since_step=0, confidence=0.0,
                                        last_step=i, ended=False))


def cli(port: int, *args: str) -> tuple[int, str, str]:
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "detector", *args, "--target", f"127.0.0.1:{port}", "--json"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    return result.returncode, result.stdout, result.stderr


def test_five_thousand_runs_are_listed_page_by_page(make_server, tmp_path):
    import json

    store = SqliteStore(tmp_path / "pw.db")
    _stored_runs(store, 5000)
    _, port, channel = make_server(store=store)
    seen: list[str] = []
    request = pb.ListRunsRequest(page_size=700)
    pages = 0
    while True:
        page = stub(channel).ListRuns(request, timeout=TIMEOUT)
        pages += 1
        assert len(page.runs) <= 700
        seen.extend(r.run_id for r in page.runs)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert pages == 8 and seen == [f"run-{i:05d}" for i in range(5000)]
    # The default page, and a token that is not one.
    first = stub(channel).ListRuns(pb.ListRunsRequest(), timeout=TIMEOUT)
    assert len(first.runs) == 500 and first.next_page_token
    code, _ = code_of(lambda: stub(channel).ListRuns(
        pb.ListRunsRequest(page_token="not-a-token"), timeout=TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, out, err = cli(port, "runs")
    assert code == 0, err
    assert len(json.loads(out)["runs"]) == 5000


def test_runs_with_the_largest_labels_stay_under_every_client_limit(make_server, tmp_path):
    import json

    store = SqliteStore(tmp_path / "pw.db")
    biggest = {f"k{i:03d}": "v" * MAX_LABEL_VALUE_BYTES for i in range(MAX_LABELS)}
    _stored_runs(store, 150, labels=biggest)  # ~10 MB of labels in all
    _, port, channel = make_server(store=store)
    request = pb.ListRunsRequest(page_size=1000)
    total = 0
    while True:
        page = stub(channel).ListRuns(request, timeout=TIMEOUT)  # default 4 MiB client limit
        assert page.ByteSize() < 4 * 1024 * 1024
        total += len(page.runs)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert total == 150
    code, out, err = cli(port, "runs")
    assert code == 0 and len(json.loads(out)["runs"]) == 150, err
    code, out, err = cli(port, "status", "run-00007")
    assert code == 0 and json.loads(out)["labels"] == biggest, err


def test_a_long_timeline_is_paged_and_the_cli_reads_it_whole(make_server, tmp_path):
    import json

    from detector.core.types import Event, EventKind

    store = SqliteStore(tmp_path / "pw.db")
    _stored_runs(store, 1)
    events = [Event(step=i, kind=EventKind.CHANGE_POINT, detected_at=i, series="train_loss",
                    message="x" * 200) for i in range(25_000)]
    store.add_events("run-00000", events)
    _, port, channel = make_server(store=store)
    request = pb.GetTimelineRequest(run_id="run-00000")
    steps: list[int] = []
    while True:
        page = stub(channel).GetTimeline(request, timeout=TIMEOUT)
        assert len(page.events) <= 1000 and page.ByteSize() < 4 * 1024 * 1024
        steps.extend(e.step for e in page.events)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert steps == list(range(25_000))
    code, _ = code_of(lambda: stub(channel).GetTimeline(
        pb.GetTimelineRequest(run_id="run-00001", page_token=request.page_token), timeout=TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # another run's token
    code, out, err = cli(port, "status", "run-00000", "--timeline")
    assert code == 0, err
    assert len(json.loads(out)["events"]) == 25_000


# --- 3. one big request ---------------------------------------------------------------


def _curve(n: int, offset: int = 0):
    import numpy as np

    steps = np.arange(offset, offset + n, dtype=np.int64)
    rng = np.random.default_rng(offset)
    loss = 2.0 / (1 + steps / 500) + rng.normal(0, 0.01, n)
    loss[n // 2 :] += 1.0  # a change point
    return steps, loss


def _big_log(run_id: str, n: int) -> pb.LogRequest:
    steps, loss = _curve(n)
    return pb.LogRequest(run_id=run_id, batch=pb.MetricBatch(series=[
        pb.Series(name="train_loss", steps=steps.tolist(), values=loss.tolist()),
        pb.Series(name="val_loss", steps=steps.tolist(), values=(loss * 1.1).tolist()),
    ]))


def test_a_big_batch_is_detected_in_blocks_as_small_batches_would_be(make_server):
    from detector.engine import Engine, EngineConfig

    engine, _, channel = make_server(config=EngineConfig(block_points=1000))
    request = _big_log("big", 20_000)
    response = stub(channel).Log(request, timeout=60)
    assert response.ack.accepted == 40_000
    reference = Engine()
    steps, loss = _curve(20_000)
    for at in range(0, 20_000, 500):
        reference.ingest("big", {"train_loss": (steps[at:at + 500], loss[at:at + 500]),
                                 "val_loss": (steps[at:at + 500], loss[at:at + 500] * 1.1)})
    assert [e.step for e in engine.end_run("big")] == [e.step for e in reference.end_run("big")]
    assert engine.timeline("big") == reference.timeline("big")


def test_other_runs_are_answered_while_a_big_batch_is_detected(make_server):
    import concurrent.futures

    from detector.engine import EngineConfig

    _, _, channel = make_server(config=EngineConfig(block_points=512))
    big = _big_log("big", 100_000)  # ~400 blocks
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(stub(channel).Log, big, timeout=120)
        while stub(channel).ListRuns(pb.ListRunsRequest(), timeout=TIMEOUT).runs == []:
            pass  # the big batch has started (its run is declared)
        small = log(channel, "small", [0, 1, 2])
        assert small.ack.accepted == 3
        assert not pending.done()  # answered between two blocks of the big one
        assert pending.result().ack.accepted == 200_000


def test_shutdown_honours_the_grace_during_a_big_batch(tmp_path):
    import gc
    import socket
    import threading

    from detector.engine import EngineConfig
    from detector.server import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(f"127.0.0.1:{port}", None, "sqlite://"),
                              kwargs={"stop": stop, "grace": 0.5,
                                      "config": EngineConfig(block_points=256)})
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        call = stub(channel).Log.future(_big_log("big", 400_000), timeout=120)
        while stub(channel).ListRuns(pb.ListRunsRequest(), timeout=TIMEOUT).runs == []:
            pass
        stop.set()
        thread.join(timeout=30)  # the batch alone takes minutes at 256 points a block
        assert not thread.is_alive()
        # serve's collection policy is the process's: it leaves with serve.
        assert not [c for c in gc.callbacks if type(getattr(c, "__self__", None)).__name__
                    == "FullCollections"]
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        stop.set()
        channel.close()
        thread.join(timeout=30)


# --- 2. idle streams, capacity, threads -------------------------------------------------


def _health(channel: grpc.Channel) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status


def _open_idle(channel: grpc.Channel, run_id: str) -> OpenStream:
    stream = OpenStream(channel)
    assert stream.send(pb.StreamRequest(start=pb.RunStart(run_id=run_id))).HasField("ack")
    return stream


def test_an_idle_stream_is_closed_and_a_busy_one_is_not(make_server):
    import time

    from detector.guard import Guard
    from detector.server import SERVICE_NAME

    guard = Guard(SERVICE_NAME, stream_idle_timeout=1.0)
    _, _, channel = make_server(guard=guard)
    idle = _open_idle(channel, "idle")
    busy = _open_idle(channel, "busy")
    step = 0
    while guard.idle_closed == 0:  # bounded by the timeout: about one second
        busy.send(batch_of(step))
        step += 1
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as info:
        list(idle.call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert busy.send(batch_of(step)).ack.accepted == 1  # still open
    assert guard.idle_closed == 1
    busy.close()
    list(busy.call)


@pytest.mark.parametrize(("total", "per_peer", "refusal"), [
    (100, 4, "ipv4:127.0.0.1 has 4 streams open already"),
    (4, 100, "the detector has 4 streams open already"),
])
def test_streams_are_capped_and_health_and_unary_calls_still_answer(
        make_server, total, per_peer, refusal):
    from grpc_health.v1 import health_pb2

    _, _, channel = make_server(max_workers=total, max_streams_per_peer=per_peer)
    held = [_open_idle(channel, f"idle-{i}") for i in range(4)]
    with pytest.raises(grpc.RpcError) as info:
        _open_idle(channel, "one-too-many")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal in info.value.details()
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert log(channel, "normal", [0, 1, 2]).ack.accepted == 3
    for stream in held:
        stream.close()
        list(stream.call)
    assert _open_idle(channel, "after").send(batch_of(0)).ack.accepted == 1


def test_threads_are_given_back_after_streams_close(make_server):
    import threading
    import time

    _, _, channel = make_server(thread_idle_seconds=0.2, max_streams_per_peer=200)
    assert log(channel, "warm", [0]).ack.accepted == 1
    before = threading.active_count()
    held = [_open_idle(channel, f"idle-{i}") for i in range(100)]
    assert threading.active_count() >= before + 100
    for stream in held:
        stream.close()
        list(stream.call)
    deadline = time.monotonic() + 20
    while threading.active_count() > before + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= before + 5


def test_the_rpc_threads_share_two_malloc_arenas_unless_the_operator_chose(monkeypatch):
    import platform

    from detector.guard import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the operator's setting stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    glibc = platform.libc_ver()[0] == "glibc"
    assert limit_malloc_arenas() is glibc  # set where there is glibc, skipped elsewhere


# --- 7. unparseable request bodies --------------------------------------------------------


def test_unparseable_bodies_are_invalid_argument_counted_and_logged_once(make_server, caplog):
    import logging

    from detector.guard import Guard
    from detector.server import SERVICE_NAME

    guard = Guard(SERVICE_NAME)
    engine, _, channel = make_server(guard=guard)
    raw = channel.unary_unary(f"/{SERVICE_NAME}/Log")
    raw_stream = channel.stream_stream(f"/{SERVICE_NAME}/Stream")
    garbage = bytes(range(200, 256)) + b"\xff\xff\xff\x0f"
    with caplog.at_level(logging.INFO):
        for _ in range(500):
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            list(raw_stream(iter([garbage]), timeout=TIMEOUT))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert guard.unparseable == 501
    assert len([r for r in caplog.records if "unparseable" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.exc_info]
    assert log(channel, "fine", [0]).ack.accepted == 1


# --- 8. fuzz (bounded; benchmarks/fuzz.py runs 100 000) -----------------------------------


def test_fuzzed_calls_never_get_internal(make_server, tmp_path):
    import asyncio

    from benchmarks.fuzz import fuzz

    engine, port, channel = make_server(store=SqliteStore(tmp_path / "pw.db"))
    codes = asyncio.run(fuzz(f"127.0.0.1:{port}", 1500, seed=18, concurrency=8))
    assert sum(v for k, v in codes.items() if not k.startswith(("!", "?", "client"))) >= 1400
    assert codes["INTERNAL"] == 0 and codes["UNKNOWN"] == 0, codes
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0
    assert log(channel, "after-fuzz", [0, 1]).ack.accepted == 2


def test_fifteen_thousand_garbage_bodies_leave_rss_flat_and_one_log_line():
    """Issue 18's case 7 against ``phasewatch serve`` in its own process: 15 000 bodies
    of one 60-byte garbage (before: RSS 128 -> 362 MB, a traceback each). After
    3 000 (warm-up: the threads and their arenas), 12 000 more may not grow RSS
    by more than 10 % (the leak was ~16 KB a body: +190 MB)."""
    import asyncio
    import time

    from benchmarks.fuzz import garbage
    from benchmarks.ingest import ServerProcess

    server = ServerProcess("full")
    started = time.monotonic()
    try:
        codes = asyncio.run(garbage(server.target, 3000, concurrency=16))
        warm = server.rss_mib()
        codes.update(asyncio.run(garbage(server.target, 12_000, concurrency=16)))
        after = server.rss_mib()
        elapsed = time.monotonic() - started
    finally:
        server.process.terminate()
        server.process.wait(30)
    assert codes == {"INVALID_ARGUMENT": 15_000}, codes
    assert after <= warm * 1.10, (warm, after)
    text = "".join(server.log)
    assert "Traceback" not in text
    # One line when the burst starts, then a summary at most every 10 s.
    assert 1 <= text.count("unparseable request bodies") <= 2 + elapsed // 10, text[-2000:]
