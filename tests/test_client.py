"""The client SDK against a real detector: gRPC server, engine and SQLite store.

Every test polls with a deadline instead of sleeping; the client runs with a
short flush interval and short backoffs so that the whole file stays fast.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.client import (
    ClientConfig,
    ClientConfigError,
    Event,
    Run,
    connect,
    create_channel,
)
from detector.core.types import Event as CoreEvent
from detector.core.types import EventKind, Phase
from detector.engine import Columns, Engine, EngineConfig, IngestResult
from detector.server import create_server
from detector.store import open_store

FAST = ClientConfig(
    batch_points=256,
    flush_interval=0.02,
    reconnect_initial_backoff=0.02,
    reconnect_max_backoff=0.2,
    close_timeout=10.0,
    exit_timeout=0.5,
)
Point = tuple[str, int, float]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(interval)
    return True


class RecordingEngine(Engine):
    """An engine that also records every point it was given, duplicates included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.points: list[Point] = []
        self.accepted = 0
        self.rejected = 0
        self.gate = threading.Event()
        self.gate.set()
        self.busy = 0  # ingest calls under way
        self._record_lock = threading.Lock()

    def ingest(self, run_id: str, columns: Columns) -> IngestResult:
        with self._record_lock:
            self.busy += 1
        try:
            self.gate.wait(30)
            result = super().ingest(run_id, columns)
        finally:
            with self._record_lock:
                self.busy -= 1
        with self._record_lock:
            for name, (steps, values) in columns.items():
                self.points.extend((name, int(s), float(v)) for s, v in zip(steps, values, strict=True))
            self.accepted += result.accepted
            self.rejected += result.rejected
        return result


class CollapseEngine(RecordingEngine):
    """A stand-in detector: streams only COLLAPSE_ONSET at each batch's first non-finite loss.

    The real detector's own events are left out, so the test does not depend on them.
    """

    def ingest(self, run_id: str, columns: Columns) -> IngestResult:
        result = super().ingest(run_id, columns)
        steps, values = columns.get("train_loss", ((), ()))
        bad = [int(s) for s, v in zip(steps, values, strict=True) if not math.isfinite(float(v))]
        if not bad:
            return IngestResult(result.accepted, result.rejected, result.through_step, ())
        event = CoreEvent(
            step=bad[0],
            kind=EventKind.COLLAPSE_ONSET,
            detected_at=bad[0],
            series="train_loss",
            confidence=0.99,
            message="train_loss is not finite",
            phase=Phase.COLLAPSE,
            evidence={"test": "non-finite"},
        )
        return IngestResult(
            accepted=result.accepted,
            rejected=result.rejected,
            through_step=result.through_step,
            events=(event,),
        )


@dataclass
class Detector:
    """A running detector: gRPC server, engine and store."""

    server: grpc.Server
    port: int
    engine: RecordingEngine
    store: Any

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """Stop at once, cancelling open streams (a crashed replica)."""
        stopped = self.server.stop(0)
        self.engine.gate.set()  # a stalled handler finishes (as a dying process might)
        stopped.wait(5)
        assert wait_for(lambda: self.engine.busy == 0)  # before another detector starts


@dataclass
class Detectors:
    """Starts detectors for a test and stops them all afterwards."""

    tmp_path: Path
    started: list[Detector] = field(default_factory=list)

    def start(
        self,
        port: int = 0,
        engine_class: type[RecordingEngine] = RecordingEngine,
        config: EngineConfig | None = None,
    ) -> Detector:
        store = open_store(f"sqlite:///{self.tmp_path / 'phasewatch.db'}")
        engine = engine_class(config, store=store)
        server, bound = create_server(engine, f"127.0.0.1:{port}")
        detector = Detector(server, bound, engine, store)
        self.started.append(detector)
        return detector

    def stop_all(self) -> None:
        for detector in self.started:
            detector.server.stop(0).wait(5)
            detector.store.close()


@pytest.fixture
def detectors(tmp_path: Path) -> Iterator[Detectors]:
    made = Detectors(tmp_path)
    yield made
    made.stop_all()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """Runs made by a test; closed (without waiting) if the test did not."""
    made: list[Run] = []
    yield made
    for run in made:
        run.close(timeout=0)


def row(step: int) -> dict[str, float]:
    """A deterministic row of three metrics; a NaN and an inf now and then are data."""
    loss = 2.0 / (1 + step / 100)
    if step % 97 == 13:
        loss = math.nan
    if step % 89 == 7:
        loss = math.inf
    return {"train_loss": loss, "val_acc": min(1.0, step / 1000), "lr": 0.1}


def expected_points(steps: range) -> dict[tuple[str, int], float]:
    return {(name, step): value for step in steps for name, value in row(step).items()}


def same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_points(recorded: list[Point], expected: Mapping[tuple[str, int], float]) -> None:
    got = {(name, step): value for name, step, value in recorded}
    assert got.keys() == expected.keys()
    bad = [k for k, v in expected.items() if not same_value(got[k], v)]
    assert not bad, bad[:5]


def offline_timeline(points: Mapping[tuple[str, int], float], run_id: str) -> tuple[Any, Any]:
    """What ``analyze`` would say: a fresh engine, one batch, then the run end."""
    columns: dict[str, tuple[list[int], list[float]]] = {}
    for (name, step), value in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        steps, values = columns.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)
    engine = Engine()
    engine.ingest(run_id, columns)
    engine.end_run(run_id)
    return engine.timeline(run_id)


@pytest.fixture
def dead_target() -> Iterator[str]:
    """An address nobody listens on: bound but not listening, so no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def client_records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "phasewatch.client" and text in r.getMessage()
    ]


# --- delivery -----------------------------------------------------------------------------


def test_every_logged_point_reaches_the_engine_once(
    detectors: Detectors, runs: list[Run]
) -> None:
    detector = detectors.start()
    run = connect(detector.target, "run-a", labels={"team": "x"}, config=FAST)
    runs.append(run)
    steps = range(1200)
    for step in steps:
        assert run.log(step, **row(step)) is True
        if step == 599:
            assert run.flush(timeout=10)
            assert run.stats.acknowledged == 1800
    assert run.close() is True

    engine = detector.engine
    status = engine.status("run-a")
    assert status.last_step == 1199
    assert status.ended
    assert status.labels == {"team": "x"}
    expected = expected_points(steps)
    assert len(engine.points) == len(expected)  # no reconnect: nothing sent twice
    assert_points(engine.points, expected)
    assert engine.accepted == len(expected) and engine.rejected == 0
    stats = run.stats
    assert stats.logged == stats.sent == stats.acknowledged == len(expected)
    assert (stats.dropped, stats.invalid, stats.rejected, stats.buffered) == (0, 0, 0, 0)
    assert (stats.resent, stats.reconnects) == (0, 0)
    # Batching over the network changes nothing: same timeline as offline analysis.
    assert engine.timeline("run-a") == offline_timeline(expected, "run-a")


def test_mapping_form_declared_series_and_unary_queries(
    detectors: Detectors, runs: list[Run]
) -> None:
    detector = detectors.start()
    run = connect(
        detector.target,
        "run-spec",
        series=["train_loss", {"name": "probe", "role": "rank", "direction": "maximize"}],
        config=FAST,
    )
    runs.append(run)
    metrics = {"train_loss": 1.0, "probe": 3.0}
    assert run.log(0, metrics)
    metrics["probe"] = 99.0  # log() copied the mapping
    assert run.log(1, {"train_loss": 0.5}, probe=2.5)  # keywords merge over the mapping
    assert run.flush(timeout=10)
    assert_points(
        detector.engine.points,
        {("train_loss", 0): 1.0, ("probe", 0): 3.0, ("train_loss", 1): 0.5, ("probe", 1): 2.5},
    )
    # The client's channel (service config with a retry policy) serves the queries.
    channel = create_channel(detector.target, config=FAST)
    try:
        phase = pb_grpc.PhaseDetectorStub(channel).GetPhase(
            pb.GetPhaseRequest(run_id="run-spec"), timeout=5
        )
    finally:
        channel.close()
    assert phase.last_step == 1
    assert run.close()


def test_restart_on_same_port_and_store_replays_unacknowledged(
    detectors: Detectors, runs: list[Run]
) -> None:
    first = detectors.start()
    run = connect(first.target, "run-r", config=FAST)
    runs.append(run)
    for step in range(0, 600):
        run.log(step, **row(step))
    assert run.flush(timeout=10)
    first.engine.gate.clear()  # the detector stalls: what follows is sent, never acknowledged
    for step in range(600, 900):
        run.log(step, **row(step))
    assert wait_for(lambda: run.stats.sent == 2700)
    first.kill()
    for step in range(900, 1200):  # logged while no detector is up: buffered
        assert run.log(step, **row(step))
    assert run.stats.buffered > 0

    second = detectors.start(port=first.port)
    for step in range(1200, 1500):
        run.log(step, **row(step))
    assert run.close() is True

    stats = run.stats
    expected = expected_points(range(1500))
    assert stats.logged == stats.acknowledged == len(expected)
    assert stats.dropped == stats.invalid == stats.rejected == 0
    assert stats.reconnects >= 1
    assert stats.resent >= 900  # steps 600-899 were replayed
    # Every logged point reached a detector; the only duplicates are replays of
    # points the first detector had taken but not yet acknowledged.
    both = first.engine.points + second.engine.points
    assert_points(both, expected)
    duplicates = sum(c - 1 for c in Counter((n, s) for n, s, _ in both).values())
    assert duplicates <= stats.resent
    assert first.engine.accepted + second.engine.accepted == len(both)
    assert first.engine.rejected == second.engine.rejected == 0
    assert second.engine.status("run-r").last_step == 1499
    assert second.engine.status("run-r").ended
    # Points acknowledged by the first detector are never sent to the second.
    first_only = {(n, s) for n, s, _ in first.engine.points if s < 600}
    assert not first_only & {(n, s) for n, s, _ in second.engine.points}
    # The second detector resumed from the first one's checkpoint (issue 7), so
    # replays and the restart leave no trace in the timeline.
    assert second.engine.timeline("run-r") == offline_timeline(expected, "run-r")


def test_restart_timeline_equals_offline_analysis(detectors: Detectors, runs: list[Run]) -> None:
    """Needs the detector's checkpoint in the store (issue 7): the restarted
    detector resumes the run's detection state, so the timeline is the one of
    an uninterrupted run."""
    first = detectors.start()
    run = connect(first.target, "run-t", config=FAST)
    runs.append(run)
    for step in range(600):
        run.log(step, **row(step))
    assert run.flush(timeout=10)
    first.kill()
    second = detectors.start(port=first.port)
    for step in range(600, 1200):
        run.log(step, **row(step))
    assert run.close() is True
    expected = expected_points(range(1200))
    assert second.engine.timeline("run-t") == offline_timeline(expected, "run-t")


# --- never block, never raise -------------------------------------------------------------


def test_without_a_detector_log_is_fast_and_drops_are_counted(
    caplog: pytest.LogCaptureFixture, runs: list[Run], dead_target: str
) -> None:
    caplog.set_level(logging.WARNING, logger="phasewatch.client")
    run = connect(
        dead_target,
        "run-offline",
        config=ClientConfig(max_buffered_points=1000, flush_interval=0.01),
    )
    runs.append(run)
    metrics = {f"m{i}": float(i) for i in range(10)}
    calls = 20_000
    results = []
    started = time.perf_counter()
    for step in range(calls):
        results.append(run.log(step, metrics))
    elapsed = time.perf_counter() - started
    assert elapsed / calls < 50e-6  # µs per call; the benchmark measures it precisely
    assert results[:100] == [True] * 100 and not any(results[100:])
    stats = run.stats
    assert (stats.logged, stats.buffered, stats.acknowledged) == (1000, 1000, 0)
    assert stats.dropped == (calls - 100) * 10
    assert len(client_records(caplog, "buffer is full")) == 1  # warned once

    started = time.monotonic()
    assert run.close(timeout=0.2) is False
    assert time.monotonic() - started < 3
    assert run.log(calls, metrics) is False  # closed: dropped, counted, no error
    assert run.stats.dropped == (calls - 100 + 1) * 10
    assert client_records(caplog, "1000 points not acknowledged")


def test_a_full_buffer_never_blocks_and_recovers(detectors: Detectors, runs: list[Run]) -> None:
    detector = detectors.start()
    detector.engine.gate.clear()  # the detector stalls inside ingest
    run = connect(
        detector.target, "run-stall", config=ClientConfig(
            max_buffered_points=600, batch_points=100, flush_interval=0.01
        )
    )
    runs.append(run)
    slowest = 0.0
    accepted = 0
    for step in range(2000):
        started = time.perf_counter()
        accepted += run.log(step, a=1.0, b=2.0, c=3.0)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 1.0  # no call waited for the stalled detector (only, under load, the GIL)
    assert accepted == 200  # 600 points / 3 a row
    assert run.stats.dropped == (2000 - 200) * 3
    assert run.flush(timeout=0.05) is False

    detector.engine.gate.set()
    assert run.flush(timeout=10)
    assert run.log(5000, a=1.0, b=2.0, c=3.0)  # room again
    assert run.close()
    assert run.stats.acknowledged == 603


def test_malformed_input_is_counted_never_raised(
    caplog: pytest.LogCaptureFixture, detectors: Detectors, runs: list[Run]
) -> None:
    caplog.set_level(logging.WARNING, logger="phasewatch.client")
    detector = detectors.start()
    run = connect(detector.target, "run-bad", config=FAST)
    runs.append(run)
    assert run.log(0, loss="0.5") is False  # a string is not a number
    assert run.log(1, loss=None, acc=0.5) is False  # the good point is kept
    assert run.log(-1, loss=1.0) is False
    assert run.log(2.0, loss=1.0) is False  # type: ignore[arg-type]
    assert run.log(True, loss=1.0) is False  # type: ignore[arg-type]
    assert run.log(3, {"bad name": 1.0, "ok": 2.0}) is False
    assert run.log(4, {7: 1.0}) is False  # type: ignore[dict-item]
    assert run.log(5, 42) is False  # type: ignore[arg-type]
    assert run.log(6, loss=complex(1, 2)) is False
    assert run.log(7, loss=3, acc=True) is True  # ints and bools convert
    assert run.log(8) is True  # nothing to log
    assert run.log(9, loss=math.nan, acc=-math.inf) is True  # non-finite values are data
    assert run.close()
    stats = run.stats
    assert stats.invalid == 9  # one a refused value, step, name or argument
    assert stats.logged == stats.acknowledged == 6
    assert len(client_records(caplog, "malformed")) == 1
    got = {(n, s): v for n, s, v in detector.engine.points}
    assert got.keys() == {("acc", 1), ("ok", 3), ("loss", 7), ("acc", 7), ("loss", 9), ("acc", 9)}
    assert got[("loss", 7)] == 3.0 and got[("acc", 7)] == 1.0
    assert math.isnan(got[("loss", 9)]) and got[("acc", 9)] == -math.inf


def test_a_batch_the_detector_refuses_is_dropped_and_counted(
    detectors: Detectors, runs: list[Run]
) -> None:
    detector = detectors.start(config=EngineConfig(max_series_per_run=2))
    run = connect(detector.target, "run-limit", config=FAST)
    runs.append(run)
    for step in range(10):
        run.log(step, a=1.0, b=2.0)
    assert run.flush(timeout=10)
    run.log(10, a=1.0, b=2.0, c=3.0)  # a third series: RESOURCE_EXHAUSTED
    assert run.flush(timeout=10)
    assert run.stats.rejected == 3
    for step in range(11, 20):
        run.log(step, a=1.0, b=2.0)
    assert run.close()
    assert detector.engine.status("run-limit").last_step == 19
    assert run.stats.acknowledged == 38


def test_bad_settings_fail_at_connect() -> None:
    with pytest.raises(ClientConfigError):
        connect("127.0.0.1:1", "has space")
    with pytest.raises(ClientConfigError):
        connect("127.0.0.1:1", "ok", series=[{"name": "x", "role": "nonsense"}])
    with pytest.raises(ClientConfigError):
        ClientConfig(max_buffered_points=0)
    with pytest.raises(ClientConfigError):
        ClientConfig(reconnect_initial_backoff=2, reconnect_max_backoff=1)


# --- events -------------------------------------------------------------------------------


def test_events_reach_callback_poll_and_iterator(detectors: Detectors, runs: list[Run]) -> None:
    detector = detectors.start(engine_class=CollapseEngine)
    received: list[Event] = []
    run = connect(detector.target, "run-c", on_event=received.append, config=FAST)
    runs.append(run)
    stopped_at = None
    for step in range(10_000):
        loss = 1.0 if step < 300 else math.inf  # the run diverges at step 300
        run.log(step, train_loss=loss)
        if any(e.kind == "COLLAPSE_ONSET" for e in run.poll_events()):
            stopped_at = step  # the job stops itself
            break
        if step >= 300:
            time.sleep(0.001)
    assert stopped_at is not None and stopped_at >= 300
    assert received
    event = received[0]
    assert (event.run_id, event.step, event.phase, event.series) == (
        "run-c",
        300,
        "collapse",
        "train_loss",
    )
    assert event.kind == "COLLAPSE_ONSET" and event.time is not None
    assert run.close()
    # The iterator yields what was not polled, then ends because the run is closed.
    remaining = list(run.events(timeout=5))
    assert run.stats.events == len(received) >= len(remaining)


def test_context_manager_closes(detectors: Detectors) -> None:
    detector = detectors.start()
    with connect(detector.target, "run-ctx", config=FAST) as run:
        run.log(0, loss=1.0)
    assert run.closed
    assert detector.engine.status("run-ctx").ended
    assert run.stats.acknowledged == 1


def test_points_are_delivered_at_exit_when_close_was_forgotten(detectors: Detectors) -> None:
    detector = detectors.start()
    script = (
        "from detector.client import connect, ClientConfig\n"
        f"run = connect({detector.target!r}, 'run-exit', config=ClientConfig(exit_timeout=10))\n"
        "for step in range(100):\n"
        "    run.log(step, loss=1.0 / (1 + step))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the client never prints
    status = detector.engine.status("run-exit")
    assert status.last_step == 99 and status.ended
    assert len(detector.engine.points) == 100


def test_client_imports_no_numpy_and_no_engine() -> None:
    """A training job imports the client: only grpc, protobuf and generated code."""
    script = (
        "import sys, detector.client\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'numpy', 'scipy', 'ruptures'}"
        " or m.startswith(('detector.core', 'detector.engine', 'detector.server'))]\n"
        "print(bad)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


# --- fork -----------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_gets_its_own_sender(detectors: Detectors, runs: list[Run]) -> None:
    detector = detectors.start()
    run = connect(detector.target, "run-f", config=FAST)
    runs.append(run)
    for step in range(100):
        run.log(step, **row(step))
    assert run.flush(timeout=10)
    for step in range(100, 110):  # queued in the parent at fork time: stays the parent's
        run.log(step, **row(step))

    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(go_write)
            fresh = run.stats.buffered == 0 and run.stats.logged == 0
            os.read(go_read, 1)  # the parent has delivered steps 100-109: go on after them
            for step in range(110, 150):
                run.log(step, **row(step))
            code = 0 if fresh and run.flush(timeout=10) and run.stats.acknowledged == 120 else 2
            run.close(timeout=5)  # a child never ends the parent's run
        finally:
            os._exit(code)
    os.close(go_read)
    assert run.flush(timeout=10)  # the parent still sends what it had queued
    os.write(go_write, b"x")
    os.close(go_write)
    deadline = time.monotonic() + 40
    status = None
    while status is None and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            status = None
            time.sleep(0.01)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0
    assert not detector.engine.status("run-f").ended

    for step in range(150, 200):
        run.log(step, **row(step))
    assert run.close() is True
    assert run.stats.acknowledged == 3 * 160  # the parent's own points
    assert_points(detector.engine.points, expected_points(range(200)))
    assert detector.engine.status("run-f").ended


@pytest.mark.parametrize("name", ["ok", "", "x" * 256, "x" * 257, "a b", "tab\there", "bell\a", "ünïcode"])
def test_client_name_rules_are_the_detectors(name: str) -> None:
    from detector.client import _name_problem
    from detector.core.types import check_name

    assert _name_problem("run id", name) == check_name("run id", name)
