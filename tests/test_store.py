"""The SQLite store, alone and under a restarted server."""

from __future__ import annotations

import sqlite3
import threading

import grpc
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.core.types import Event, EventKind, Phase, Segment
from detector.engine import Engine, RunStatus
from detector.errors import FailedPrecondition, InvalidArgument
from detector.server import create_server
from detector.store import SqliteStore, default_store_url, open_store
from detector.store.sqlite import SCHEMA_VERSION

TIMEOUT = 10.0


def _status(run_id: str, **changes) -> RunStatus:
    fields = dict(
        run_id=run_id,
        labels={"team": "a", "lr": "3e-4"},
        phase=Phase.ABSTRACTION,
        since_step=40,
        confidence=0.75,
        last_step=99,
        ended=False,
        updated_at=1_700_000_000.25,
    )
    fields.update(changes)
    return RunStatus(**fields)


EVENTS = [
    Event(step=50, kind=EventKind.CHANGE_POINT, detected_at=60, series="val_acc",
          confidence=0.9, message="val_acc changed up", evidence={"test": "cusum", "p": "0.01"}),
    Event(step=20, kind=EventKind.PLATEAU_START, detected_at=61, phase=Phase.INSTABILITY),
    Event(step=70, kind=EventKind.GROKKING_ONSET, detected_at=80, phase=Phase.ABSTRACTION),
]
SEGMENTS = [Segment(0, 40, Phase.INSTABILITY, 0.5), Segment(40, 100, Phase.ABSTRACTION, 0.75)]


def _fill(store: SqliteStore) -> None:
    store.upsert_run(_status("run-1"))
    store.upsert_run(_status("run-0", phase=None, last_step=-1, labels={}))
    store.add_events("run-1", EVENTS[:2])
    store.add_events("run-1", EVENTS[2:])
    store.add_events("run-0", [EVENTS[0]])
    store.replace_segments("run-1", [Segment(0, 10, Phase.COLLAPSE, 0.1)])
    store.replace_segments("run-1", SEGMENTS)  # replaces, not appends


def _check(store: SqliteStore) -> None:
    run = store.get_run("run-1")
    assert run == _status("run-1", recent_events=tuple(EVENTS))
    assert [r.run_id for r in store.list_runs()] == ["run-0", "run-1"]
    assert store.list_runs()[0].phase is None and store.list_runs()[0].last_step == -1
    assert store.get_events("run-1") == EVENTS  # insertion order, not step order
    assert store.get_segments("run-1") == SEGMENTS
    assert store.get_run("missing") is None
    assert store.get_events("missing") == [] and store.get_segments("missing") == []


def test_round_trip_in_memory():
    store = SqliteStore(":memory:")
    _fill(store)
    _check(store)
    store.upsert_run(_status("run-1", ended=True, phase=Phase.COLLAPSE, last_step=120))
    updated = store.get_run("run-1")
    assert (updated.ended, updated.phase, updated.last_step) == (True, Phase.COLLAPSE, 120)
    store.close()


def test_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "nested" / "phasewatch.db"
    store = open_store(f"sqlite:///{path}")
    _fill(store)
    store.close()
    reopened = open_store(f"sqlite:///{path}")
    _check(reopened)
    reopened.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_recent_events_are_the_last_ones():
    store = SqliteStore(":memory:", recent_events=2)
    store.upsert_run(_status("r"))
    store.add_events("r", EVENTS)
    assert store.get_run("r").recent_events == tuple(EVENTS[1:])


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(FailedPrecondition, match="schema version"):
        SqliteStore(path)


def test_many_threads_write_safely():
    store = SqliteStore(":memory:")

    def writer(i: int) -> None:
        for j in range(20):
            store.add_events(f"run-{i}", [Event(step=j, kind=EventKind.CHANGE_POINT,
                                                detected_at=j)])
            store.upsert_run(_status(f"run-{i}", last_step=j))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list_runs()) == 8
    for i in range(8):
        assert [e.step for e in store.get_events(f"run-{i}")] == list(range(20))
        assert store.get_run(f"run-{i}").last_step == 19


@pytest.mark.parametrize("url", ["sqlite://", "sqlite://:memory:", "sqlite:///:memory:"])
def test_memory_urls(url):
    store = open_store(url)
    assert isinstance(store, SqliteStore) and store.path == ":memory:"
    store.close()


@pytest.mark.parametrize(
    "url, match",
    [
        ("postgresql://user:secret@db/phasewatch", "PostgreSQL"),
        ("postgres://db/phasewatch", "postgres"),
        ("mysql://db", "unsupported"),
        ("/tmp/x.db", "unsupported"),
    ],
)
def test_unsupported_urls(url, match):
    with pytest.raises(InvalidArgument, match=match) as info:
        open_store(url)
    assert "secret" not in str(info.value)


def test_default_url_is_a_file_under_the_user_data_dir(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_data_dir", lambda app: str(tmp_path / app))
    assert default_store_url() == f"sqlite:///{tmp_path}/phasewatch/phasewatch.db"
    store = open_store(None)
    assert store.path == f"{tmp_path}/phasewatch/phasewatch.db"
    store.close()


def test_server_restart_on_the_same_file_keeps_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'pw.db'}"

    def start() -> tuple[grpc.Server, grpc.Channel, SqliteStore, Engine]:
        store = open_store(url)
        engine = Engine(store=store)
        server, port = create_server(engine)
        return server, grpc.insecure_channel(f"127.0.0.1:{port}"), store, engine

    server, channel, store, engine = start()
    stub = pb_grpc.PhaseDetectorStub(channel)
    steps = list(range(300))
    stub.Log(
        pb.LogRequest(
            start=pb.RunStart(run_id="before", labels={"team": "a"}),
            batch=pb.MetricBatch(series=[pb.Series(
                name="train_loss", steps=steps,
                values=[1.0 if s < 150 else 5.0 for s in steps],
            )]),
        ),
        timeout=TIMEOUT,
    )
    engine.end_run("before")
    before_phase = stub.GetPhase(pb.GetPhaseRequest(run_id="before"), timeout=TIMEOUT)
    before_timeline = stub.GetTimeline(pb.GetTimelineRequest(run_id="before"), timeout=TIMEOUT)
    channel.close()
    server.stop(None)
    store.close()

    server, channel, store, engine = start()
    try:
        assert engine.snapshot().runs == ()  # nothing in memory: answers come from the file
        stub = pb_grpc.PhaseDetectorStub(channel)
        phase = stub.GetPhase(pb.GetPhaseRequest(run_id="before"), timeout=TIMEOUT)
        assert (phase.last_step, dict(phase.labels)) == (299, {"team": "a"})
        assert (phase.phase, phase.since_step) == (before_phase.phase, before_phase.since_step)
        assert [(e.step, e.kind) for e in phase.recent_events] == [
            (e.step, e.kind) for e in before_phase.recent_events
        ]
        timeline = stub.GetTimeline(pb.GetTimelineRequest(run_id="before"), timeout=TIMEOUT)
        assert list(timeline.segments) == list(before_timeline.segments)
        assert [(e.step, e.kind, e.series) for e in timeline.events] == [
            (e.step, e.kind, e.series) for e in before_timeline.events
        ]
        runs = stub.ListRuns(pb.ListRunsRequest(label_selector={"team": "a"}), timeout=TIMEOUT)
        assert [r.run_id for r in runs.runs] == ["before"]
        with pytest.raises(grpc.RpcError) as info:
            stub.GetPhase(pb.GetPhaseRequest(run_id="never"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
        server.stop(None)
        store.close()
