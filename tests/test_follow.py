"""``phasewatch follow`` on a log that a real PyTorch training loop writes in
another thread, streamed into a real detector on 127.0.0.1; the follower is
killed half-way and restarted, and the run's points at the detector are
exactly the file's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.analysis import analyze_columns
from detector.logfile import read_log

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 240
PAUSES = (100, 170)  # the loop waits at these steps until the test lets it go on
WAIT = 60.0  # bound on each wait below; the test never asserts on time


class Training(threading.Thread):
    """A small MLP regression trained on CPU, logging every step, pausing at PAUSES."""

    def __init__(self, log: Callable[[int, dict[str, float]], None], flush: Callable[[], None]):
        super().__init__(daemon=True)
        self.log, self.flush = log, flush
        self.paused = {step: threading.Event() for step in PAUSES}
        self.go_on = {step: threading.Event() for step in PAUSES}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            torch.manual_seed(0)
            x = torch.randn(256, 8)
            y = (x[:, :4].sum(1, keepdim=True) > 0).float()
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            optimiser = torch.optim.SGD(model.parameters(), lr=0.2)
            loss_fn = torch.nn.BCEWithLogitsLoss()
            for step in range(STEPS):
                if step in self.paused:
                    self.flush()
                    self.paused[step].set()
                    if not self.go_on[step].wait(WAIT):
                        raise TimeoutError(f"not let go on at step {step}")
                optimiser.zero_grad()
                loss = loss_fn(model(x[:192]), y[:192])
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
                optimiser.step()
                row = {"train_loss": loss.item(), "grad_norm": float(norm)}
                if step % 10 == 9:
                    with torch.no_grad():
                        row["val_loss"] = loss_fn(model(x[192:]), y[192:]).item()
                self.log(step, row)
            self.flush()
        except BaseException as exc:  # reported by the test
            self.error = exc


def _jsonl_writer(path: Path) -> tuple[Callable[[int, dict[str, float]], None], Callable[[], None]]:
    import json

    handle = path.open("w", buffering=1)  # line-buffered: a line at a time, as jobs write

    def log(step: int, row: dict[str, float]) -> None:
        handle.write(json.dumps({"step": step, **row}) + "\n")

    return log, handle.flush


def _tensorboard_writer(path: Path) -> tuple[Callable[[int, dict[str, float]], None], Callable[[], None]]:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(path), flush_secs=1)

    def log(step: int, row: dict[str, float]) -> None:
        for name, value in row.items():
            writer.add_scalar(name, value, step)

    return log, writer.flush


def _follow(path: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "detector", "follow", str(path), "--run-id", "job",
         "--target", f"127.0.0.1:{port}", "--interval", "0.1", "--idle-exit", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("fmt", ["jsonl", "tensorboard"])
def test_follow_a_growing_log_across_a_restart(
    fmt: str, tmp_path: Path, server: tuple, request: pytest.FixtureRequest
) -> None:
    engine, port, channel = server
    received: list[dict[str, tuple[np.ndarray, np.ndarray]]] = []
    ingest = engine.ingest

    def recording(run_id: str, columns: dict) -> object:  # observes what the detector is given
        received.append({k: (np.array(s), np.array(v)) for k, (s, v) in columns.items()})
        return ingest(run_id, columns)

    engine.ingest = recording
    path = tmp_path / ("run.jsonl" if fmt == "jsonl" else "tb")
    log, flush = (_jsonl_writer if fmt == "jsonl" else _tensorboard_writer)(path)

    def top_step() -> int:
        return max((int(s.max()) for batch in received for s, _ in batch.values() if len(s)),
                   default=-1)

    training = Training(log, flush)
    training.start()
    first = _follow(path, port)
    request.addfinalizer(lambda: first.kill())
    assert training.paused[PAUSES[0]].wait(WAIT)
    _wait_for(lambda: top_step() >= PAUSES[0] - 1, "the first half at the detector")
    first.send_signal(signal.SIGKILL)  # no clean-up: the restart must find its place
    first.wait(WAIT)
    training.go_on[PAUSES[0]].set()

    assert training.paused[PAUSES[1]].wait(WAIT)
    second = _follow(path, port)
    request.addfinalizer(lambda: second.kill())
    _wait_for(lambda: top_step() >= PAUSES[1] - 1, "the restarted follower's points")
    training.go_on[PAUSES[1]].set()  # the log grows while the restarted follower reads it
    training.join(WAIT)
    assert training.error is None, training.error
    _, err = second.communicate(timeout=WAIT)
    assert second.returncode == 0, err
    resumed = int(re.search(r"from step (\d+) \(resumed\)", err).group(1))
    assert resumed == PAUSES[0] - 1

    # Every point of the file reached the detector, with its value; none is extra.
    expected = read_log(path, warn=lambda _: None)
    got: dict[tuple[str, int], list[float]] = {}
    for batch in received:
        for name, (steps, values) in batch.items():
            for step, value in zip(steps.tolist(), values.tolist(), strict=True):
                got.setdefault((name, step), []).append(value)
    want = {
        (name, step): value
        for name, (steps, values) in expected.items()
        for step, value in zip(steps.tolist(), values.tolist(), strict=True)
    }
    assert set(got) == set(want)
    assert all(values == [want[key]] * len(values) for key, values in got.items())
    # Only the row at the resume step was sent twice: acknowledged points are not resent.
    twice = {key for key, values in got.items() if len(values) > 1}
    assert twice and {step for _, step in twice} == {resumed}

    # And the detector's timeline is the offline analysis of the same file.
    stub = pb_grpc.PhaseDetectorStub(channel)
    timeline = stub.GetTimeline(pb.GetTimelineRequest(run_id="job"), timeout=10)
    _, events, _ = analyze_columns(expected, "job")
    assert timeline.events  # the loss curve has change points: the comparison says something
    assert [(e.step, e.series) for e in timeline.events] == [(e["step"], e["series"]) for e in events]
    assert stub.GetPhase(pb.GetPhaseRequest(run_id="job"), timeout=10).last_step == STEPS - 1


def test_follower_on_a_growing_csv_and_a_rewritten_trainer_state(tmp_path: Path, server: tuple) -> None:
    from detector.client import connect
    from detector.follow import Follower

    engine, port, channel = server
    stub = pb_grpc.PhaseDetectorStub(channel)
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train_loss,val_loss\n0,0,1.0,\n0,1,0.9,\n")
    state = tmp_path / "trainer_state.json"
    state.write_text('{"log_history": [{"step": 1, "loss": 2.0}]}')
    for path, more, run_id in (
        (csv_path, lambda: csv_path.open("a").write("0,1,,0.95\n0,2,0.8,\n0,3,0.7"), "csv"),
        (state, lambda: state.write_text(
            '{"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]}'
        ), "hf"),
    ):
        with connect(f"127.0.0.1:{port}", run_id) as run:
            follower = Follower(path, run)
            assert follower.look() > 0
            assert follower.look() == 0  # nothing changed: not even read
            more()
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a coarse clock
            follower.look()
        timeline_run = stub.GetPhase(pb.GetPhaseRequest(run_id=run_id), timeout=10)
        assert timeline_run.last_step == 2  # the CSV's half-written "0,3,0.7" waits for its newline
    assert follower.stats.reads == 2


def test_follow_names_the_bad_line_without_a_traceback(tmp_path: Path, server: tuple) -> None:
    _, port, _ = server
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": \n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "detector", "follow", str(path), "--target", f"127.0.0.1:{port}",
         "--interval", "0.05"],
        env=env, capture_output=True, text=True, timeout=WAIT,
    )
    assert done.returncode == 2
    assert f"phasewatch: {path}:2: not valid JSON" in done.stderr and "Traceback" not in done.stderr


def test_follow_waits_for_a_log_that_is_not_there_yet(tmp_path: Path, server: tuple) -> None:
    _, port, _ = server
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "detector", "follow", str(tmp_path / "later.jsonl"),
         "--target", f"127.0.0.1:{port}", "--interval", "0.05", "--idle-exit", "0.3"],
        env=env, capture_output=True, text=True, timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert "no log there yet; waiting for it" in done.stderr
    assert "sent 0 points" in done.stderr
