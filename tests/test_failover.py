"""Failover: two ``phasewatch serve`` replicas on one PostgreSQL store.

A real run is streamed by the client SDK to replica A through a TCP proxy (the
stand-in for a Kubernetes Service). A is killed with SIGKILL mid-run and the
proxy's upstream switched to B; the client reconnects, B takes the run over
from A's checkpoint, and the client replays what A had not acknowledged.
Nothing acknowledged is lost, and the final timeline is ``phasewatch analyze``'s
on the whole log.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.client import ClientConfig, connect
from detector.report import event_view_from_proto, segment_view_from_proto
from detector.store.postgres import PostgresStore
from tests.helpers import REPO, read_rows, shared_dir
from tests.pg import fresh_database
from tests.test_online_offline import _analyze, _comparable

RUN_ID = "grok-failover"
STARTUP_SECONDS = 30.0
LISTENING = re.compile(r"gRPC listening on [^:]+:(\d+)")


class Replica:
    """One ``phasewatch serve`` subprocess; its log is kept for failure messages."""

    def __init__(self, name: str, store_url: str) -> None:
        self.name = name
        env = dict(os.environ, PHASEWATCH_REPLICA=name, OPENBLAS_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "detector", "serve", "--listen", "127.0.0.1:0",
             "--metrics-listen", "", "--store", store_url, "--grace", "1"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = LISTENING.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._listening.set()
        self._listening.set()  # exited: wait_serving reports it

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, deadline: float) -> None:
        self._listening.wait(max(0.0, deadline - time.monotonic()))
        assert self.port is not None, f"{self.name} did not start:\n{''.join(self.log)}"
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(
                health_pb2.HealthCheckRequest(service="phasewatch.v1.PhaseDetector"),
                timeout=max(0.1, deadline - time.monotonic()), wait_for_ready=True,
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Proxy:
    """A TCP proxy on loopback with a switchable upstream: the Kubernetes Service.

    Connections made after ``switch`` go to the new upstream; open ones are cut,
    as kube-proxy's are when an endpoint goes away.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def switch(self, upstream: str) -> None:
        with self._lock:
            self.upstream = upstream
            cut, self._open = self._open, set()
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopped = True
        self.switch(self.upstream)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        host, _, port = self.upstream.rpartition(":")
        try:
            server = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            client.close()  # upstream down: the client sees a reset and retries
            return
        with self._lock:
            self._open |= {client, server}
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, server)
        selector.register(server, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in selector.select(timeout=1.0):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            with self._lock:
                self._open -= {client, server}
            client.close()
            server.close()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def cluster() -> Iterator[tuple[str, Replica, Replica]]:
    """A fresh database and two replicas on it: (store url, A, B)."""
    with fresh_database() as url:
        replicas = [Replica("replica-a", url), Replica("replica-b", url)]
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            for replica in replicas:
                replica.wait_serving(deadline)
            yield url, replicas[0], replicas[1]
        finally:
            for replica in replicas:
                replica.stop()


def test_sigkill_mid_run_loses_no_acknowledged_point(cluster, capsys) -> None:
    url, a, b = cluster
    path = shared_dir("runs", "grok_add_0.jsonl")
    rows = read_rows(path)
    points = [len(row) - 1 for row in rows]  # every key but "step" is a point (null too)
    total = sum(points)
    proxy = Proxy(a.address)
    config = ClientConfig(
        batch_points=64, flush_interval=0.02, reconnect_initial_backoff=0.05,
        reconnect_max_backoff=0.5, close_timeout=30.0,
    )
    run = connect(proxy.address, RUN_ID, labels={"test": "failover"}, config=config)
    try:
        def log(rows_: list[dict]) -> None:
            for row in rows_:
                values = {k: (float("nan") if v is None else float(v))
                          for k, v in row.items() if k != "step"}
                assert run.log(row["step"], values)

        # Phase 1: a third of the run, acknowledged by A.
        third = len(rows) // 3
        log(rows[:third])
        # Acks come whole batches at a time, and the detector holds the last two steps
        # back for reordering: all but the last couple of batches get acknowledged.
        _wait(lambda: run.stats.acknowledged >= sum(points[: third - 12]), 20, "A's acks")
        # Phase 2: a burst A cannot have acknowledged when it dies.
        burst = third + len(rows) // 6
        log(rows[third:burst])
        a.kill()
        killed_at = time.monotonic()
        acknowledged_by_a = run.stats.acknowledged
        proxy.switch(b.address)
        store = PostgresStore(url)
        try:
            checkpointed = store.load_checkpoint(RUN_ID).through_step
        finally:
            store.close()
        # Every point A acknowledged is in its checkpoint (acks never run ahead of it).
        covered = sum(n for row, n in zip(rows, points, strict=True) if row["step"] <= checkpointed)
        assert 0 < acknowledged_by_a <= covered < total
        # Phase 3: the rest of the run, to B.
        log(rows[burst:])
        assert run.close(timeout=30) is True, run.stats
        failover_seconds = time.monotonic() - killed_at
    finally:
        run.close(timeout=1)
        proxy.stop()

    stats = run.stats
    lost = stats.logged - stats.acknowledged
    with capsys.disabled():
        print(
            f"\nfailover: points logged {stats.logged}, sent {stats.sent}, acknowledged "
            f"{stats.acknowledged} (by A before SIGKILL: {acknowledged_by_a}; A's checkpoint "
            f"covered {covered}), replayed {stats.resent}, lost {lost}, reconnects "
            f"{stats.reconnects}, rejected {stats.rejected}, dropped {stats.dropped}; "
            f"kill-to-close {failover_seconds:.2f}s"
        )
    assert stats.logged == total and lost == 0
    assert (stats.dropped, stats.invalid, stats.rejected, stats.buffered) == (0, 0, 0, 0)
    assert stats.reconnects >= 1 and stats.resent > 0  # the burst was replayed to B
    assert stats.sent == total

    # B has the whole run, and the timeline an uninterrupted analysis gives.
    offline = _analyze(str(path))
    with grpc.insecure_channel(b.address) as channel:
        stub = pb_grpc.PhaseDetectorStub(channel)
        phase = stub.GetPhase(pb.GetPhaseRequest(run_id=RUN_ID), timeout=10)
        timeline = stub.GetTimeline(pb.GetTimelineRequest(run_id=RUN_ID), timeout=10)
    assert phase.last_step == rows[-1]["step"] and dict(phase.labels) == {"test": "failover"}
    online = _comparable(
        [segment_view_from_proto(s) for s in timeline.segments],
        [event_view_from_proto(e) for e in timeline.events],
    )
    assert online == _comparable(offline["segments"], offline["events"])
    assert online[1], "the run should have events"
    with psycopg.connect(url) as conn:
        owner = conn.execute("SELECT owner, epoch FROM run_owner WHERE run_id = %s",
                             (RUN_ID,)).fetchone()
    assert owner == ("replica-b", 2)
