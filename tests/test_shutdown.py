"""Graceful shutdown of a real ``phasewatch serve`` (issue 8, item 3): on
SIGTERM health goes NOT_SERVING first, open streams get the grace period to
drain, every run is checkpointed to the store, and the process exits 0."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.engine import Engine
from detector.server import SERVICE_NAME
from detector.store import open_store
from tests.test_auth import start_serve

TIMEOUT = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class OpenStream:
    """A ``Stream`` call fed from a queue, its responses collected by a thread."""

    def __init__(self, stub: pb_grpc.PhaseDetectorStub) -> None:
        self.requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self.responses: queue.Queue[pb.StreamResponse] = queue.Queue()
        self.call = stub.Stream(self._iterate(), timeout=60)
        self.error: grpc.RpcError | None = None
        self.finished = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _iterate(self) -> Iterator[pb.StreamRequest]:
        while (request := self.requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.finished.set()

    def send(self, request: pb.StreamRequest) -> pb.Ack:
        """Send one request and wait for its ack (events before it are skipped)."""
        self.requests.put(request)
        return self.next_ack()

    def next_ack(self) -> pb.Ack:
        while True:
            response = self.responses.get(timeout=TIMEOUT)
            if response.WhichOneof("msg") == "ack":
                return response.ack

    def half_close(self) -> None:
        self.requests.put(None)


def points(first: int, count: int) -> pb.StreamRequest:
    steps = list(range(first, first + count))
    return pb.StreamRequest(batch=pb.MetricBatch(series=[
        pb.Series(name="train_loss", steps=steps, values=[1.0 / (1 + s) for s in steps]),
    ]))


def test_sigterm_drains_streams_checkpoints_and_exits_0(tmp_path: Path) -> None:
    db = tmp_path / "pw.db"
    process, port, log = start_serve(tmp_path, "--store", f"sqlite:///{db}", "--grace", "3")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.PhaseDetectorStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60)
        assert next(watch).status == SERVING

        # A stream with points, and a stream that only declared its run.
        draining = OpenStream(stub)
        assert draining.send(pb.StreamRequest(start=pb.RunStart(
            run_id="draining", labels={"team": "a"}))).through_step == -1
        assert draining.send(points(0, 10)).accepted == 10
        declared = OpenStream(stub)
        declared.send(pb.StreamRequest(start=pb.RunStart(
            run_id="declared", labels={"k": "v"},
            series=[pb.SeriesSpec(name="val_acc", direction=pb.DIRECTION_MINIMIZE)])))

        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        # Health goes NOT_SERVING at once, before the grace period ends.
        assert next(watch).status == NOT_SERVING
        assert time.monotonic() - started < 2.5
        # An open stream still works during the grace period: a batch, then the
        # half-close's flush, all acknowledged.
        ack = draining.send(points(10, 10))
        assert (ack.accepted, ack.rejected) == (10, 0)
        draining.half_close()
        assert draining.next_ack().through_step == 19
        assert draining.finished.wait(TIMEOUT) and draining.error is None
        # New calls are refused while draining.
        try:
            stub.ListRuns(pb.ListRunsRequest(), timeout=2)
            refused = False
        except grpc.RpcError as error:
            refused = error.code() == grpc.StatusCode.UNAVAILABLE
        assert refused
        # The stream that never ends is cut at the end of the grace period.
        assert declared.finished.wait(TIMEOUT)
        assert declared.error is not None
        assert process.wait(timeout=TIMEOUT) == 0
        assert time.monotonic() - started >= 2.5  # it waited out the grace period
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "checkpointed" in text and "phasewatch stopped" in text, text

    store = open_store(f"sqlite:///{db}")
    try:
        checkpoint = store.load_checkpoint("draining")
        assert checkpoint is not None and checkpoint.through_step == 19  # every acknowledged step
        assert store.get_run("draining").last_step == 19
        # The run with no points was checkpointed at shutdown: a new detector
        # restores its labels and its declared series.
        assert store.load_checkpoint("declared") is not None
        engine = Engine(store=store)
        status = engine.start_run("declared")
        assert status.labels == {"k": "v"}
        assert engine._runs["declared"].detector.specs["val_acc"].direction.value == "minimize"
        # ... and takes the drained run up where it was.
        result = engine.ingest("draining", {"train_loss": (list(range(20, 30)), [0.05] * 10)})
        assert (result.accepted, result.rejected) == (10, 0)
        assert engine.status("draining").last_step == 29
    finally:
        store.close()


def test_checkpoint_all_writes_what_no_ingest_wrote(tmp_path: Path) -> None:
    from dataclasses import replace

    from detector.core.types import Direction, infer_spec

    store = open_store(f"sqlite:///{tmp_path / 'pw.db'}")
    try:
        engine = Engine(store=store)
        engine.start_run("declared", labels={"k": "v"},
                         series=[replace(infer_spec("val_acc"), direction=Direction.MINIMIZE)])
        engine.ingest("logged", {"loss": (list(range(5)), [1.0] * 5)})
        assert store.load_checkpoint("declared") is None  # a start alone writes no checkpoint
        assert engine.checkpoint_all() == 1  # "logged" was checkpointed by its ingest
        assert engine.checkpoint_all() == 0
        restored = Engine(store=store)
        assert restored.start_run("declared").labels == {"k": "v"}
        assert restored._runs["declared"].detector.specs["val_acc"].direction is Direction.MINIMIZE
        assert Engine().checkpoint_all() == 0  # no store: nothing to write
    finally:
        store.close()
