"""The stores, alone and under a restarted server: one suite, SQLite and PostgreSQL.

Tests taking the ``backend`` fixture run against both; each PostgreSQL test
gets a fresh schema on the test server (``tests/pg.py``).
"""

from __future__ import annotations

import pickle
import sqlite3
import threading
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.core.types import Direction, Event, EventKind, Phase, Role, Segment, SeriesSpec, Split
from detector.engine import Checkpoint, Engine, EngineConfig, RunStatus, Store
from detector.engine.run import decode_log_entry, op_points
from detector.errors import Aborted, FailedPrecondition, InvalidArgument, Unavailable
from detector.logfile import iter_batches, read_log
from detector.server import create_server
from detector.store import SqliteStore, default_store_url, open_store
from detector.store.sqlite import SCHEMA_VERSION
from tests.helpers import shared_dir
from tests.pg import fresh_schema, terminate_backend

TIMEOUT = 10.0


class Backend:
    """One store URL and a way to open stores on it; every store opened is closed."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.opened: list[Store] = []

    def open(self, **options: object) -> Store:
        if self.name == "sqlite":
            store: Store = SqliteStore(self.url.removeprefix("sqlite:///"), **options)
        else:
            from detector.store.postgres import PostgresStore

            store = PostgresStore(self.url, **options)
        self.opened.append(store)
        return store

    def set_schema_version(self, version: int) -> None:
        if self.name == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
                conn.execute(f"PRAGMA user_version = {version}")
        else:
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("CREATE TABLE phasewatch_schema (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO phasewatch_schema VALUES (%s)", (version,))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[Backend]:
    if request.param == "sqlite":
        backend = Backend("sqlite", f"sqlite:///{tmp_path / 'pw.db'}")
        yield backend
        for store in backend.opened:
            store.close()
        return
    with fresh_schema() as url:
        backend = Backend("postgres", url)
        yield backend
        for store in backend.opened:
            store.close()


@pytest.fixture
def postgres() -> Iterator[Backend]:
    with fresh_schema() as url:
        backend = Backend("postgres", url)
        yield backend
        for store in backend.opened:
            store.close()


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


def _fill(store: Store) -> None:
    store.upsert_run(_status("run-1"))
    store.upsert_run(_status("run-0", phase=None, last_step=-1, labels={}))
    store.add_events("run-1", EVENTS[:2])
    store.add_events("run-1", EVENTS[2:])
    store.add_events("run-0", [EVENTS[0]])
    store.replace_segments("run-1", [Segment(0, 10, Phase.COLLAPSE, 0.1)])
    store.replace_segments("run-1", SEGMENTS)  # replaces, not appends


def _check(store: Store) -> None:
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
    store.close()


def test_round_trip(backend: Backend):
    store = backend.open()
    _fill(store)
    _check(store)
    store.upsert_run(_status("run-1", ended=True, phase=Phase.COLLAPSE, last_step=120))
    updated = store.get_run("run-1")
    assert (updated.ended, updated.phase, updated.last_step) == (True, Phase.COLLAPSE, 120)


def test_round_trip_survives_reopen(backend: Backend):
    store = backend.open()
    _fill(store)
    store.close()
    _check(backend.open())


def test_sqlite_file_is_versioned_wal_and_its_directory_must_exist(tmp_path):
    path = tmp_path / "nested" / "phasewatch.db"
    # A mistyped path is an error naming the directory, not a new tree (issue 17).
    with pytest.raises(InvalidArgument, match="directory .*nested does not exist"):
        open_store(f"sqlite:///{path}")
    assert not path.parent.exists()
    path.parent.mkdir()
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_recent_events_are_the_last_ones(backend: Backend):
    store = backend.open(recent_events=2)
    store.upsert_run(_status("r"))
    store.add_events("r", EVENTS)
    assert store.get_run("r").recent_events == tuple(EVENTS[1:])


def test_newer_schema_is_refused(backend: Backend):
    backend.set_schema_version(99)
    with pytest.raises(FailedPrecondition, match="schema version 99"):
        backend.open()


def test_many_threads_write_safely(backend: Backend):
    store = backend.open()

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
        ("postgresql://user:secret@127.0.0.1/db?bogus=1", "bogus"),
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


def test_unreachable_postgres_is_unavailable_without_the_password():
    # Port 1 on loopback: refused at once, no DNS, no timeout.
    with pytest.raises(Unavailable, match="127.0.0.1") as info:
        open_store("postgresql://user:secret@127.0.0.1:1/phasewatch")
    assert "secret" not in str(info.value) and "***" in str(info.value)


def test_server_restart_on_the_same_store_keeps_runs(backend: Backend):
    def start() -> tuple[grpc.Server, grpc.Channel, Store, Engine]:
        store = backend.open()
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


# --- checkpoints ---------------------------------------------------------------


def test_checkpoint_round_trip_with_its_batch(backend: Backend):
    store = backend.open()
    assert store.load_checkpoint("run-1") is None
    store.save_checkpoint("run-1", b"state-1", 40, status=_status("run-1"), events=EVENTS[:1],
                          segments=SEGMENTS[:1])
    store.save_checkpoint("run-1", b"\x00state-2\xff", 99, events=EVENTS[1:], segments=SEGMENTS)
    store.save_checkpoint("run-0", b"other", 3)
    store.close()
    store = backend.open()
    assert store.load_checkpoint("run-1") == Checkpoint(b"\x00state-2\xff", 99)  # replaced, bytes intact
    assert store.load_checkpoint("run-0") == Checkpoint(b"other", 3)
    assert store.get_events("run-1") == EVENTS and store.get_segments("run-1") == SEGMENTS
    assert store.get_run("run-1") == _status("run-1", recent_events=tuple(EVENTS))


def test_checkpoint_log_appends_and_a_full_checkpoint_clears_it(backend: Backend):
    store = backend.open()
    with pytest.raises(FailedPrecondition, match="no checkpoint to append"):
        store.save_checkpoint("run-1", b"entry-0", 5, append=True)
    store.save_checkpoint("run-1", b"state-1", 10, status=_status("run-1"))
    store.save_checkpoint("run-1", b"entry-1", 20, events=EVENTS[:1], append=True)
    store.save_checkpoint("run-1", b"\x00entry-2\xff", 30, events=EVENTS[1:], segments=SEGMENTS,
                          append=True)
    store.save_checkpoint("run-0", b"other", 1)
    store.save_checkpoint("run-0", b"other-entry", 2, append=True)
    store.close()
    store = backend.open()
    assert store.load_checkpoint("run-1") == Checkpoint(b"state-1", 30, (b"entry-1", b"\x00entry-2\xff"))
    assert store.get_events("run-1") == EVENTS and store.get_segments("run-1") == SEGMENTS
    store.save_checkpoint("run-1", b"state-2", 40)  # a full one: its log starts again
    store.save_checkpoint("run-1", b"entry-3", 50, append=True)
    assert store.load_checkpoint("run-1") == Checkpoint(b"state-2", 50, (b"entry-3",))
    assert store.load_checkpoint("run-0") == Checkpoint(b"other", 2, (b"other-entry",))


def test_log_entries_from_before_their_step_was_kept_take_the_checkpoints(tmp_path):
    """Before schema 5 an append moved the checkpoints row's step; its entries have
    none (NULL). The step a checkpoint covers is then the row's, or the last newer
    entry's."""
    path = tmp_path / "pw.db"
    store = SqliteStore(path)
    store.save_checkpoint("run-1", b"state-1", 10)
    store.save_checkpoint("run-1", b"entry-1", 20, append=True)
    store.close()
    with sqlite3.connect(path) as conn:  # as the old code left it
        conn.execute("UPDATE checkpoint_log SET through_step = NULL")
        conn.execute("UPDATE checkpoints SET through_step = 20")
    store = SqliteStore(path)
    assert store.load_checkpoint("run-1") == Checkpoint(b"state-1", 20, (b"entry-1",))
    store.save_checkpoint("run-1", b"entry-2", 30, append=True)
    assert store.load_checkpoint("run-1") == Checkpoint(b"state-1", 30, (b"entry-1", b"entry-2"))
    store.close()


@pytest.mark.parametrize("log_points", [0, 300, 16384])
def test_a_restore_replays_the_checkpoint_log_to_the_uninterrupted_timeline(
    backend: Backend, log_points: int
):
    """Between full checkpoints the engine logs batches; a new engine restores the
    state and replays the log, and the run goes on as if never interrupted. The
    log never holds more than ``checkpoint_log_points`` points."""
    batches = _grok_batches(97)
    expected = _reference(batches)
    config = EngineConfig(checkpoint_log_points=log_points)
    store = backend.open()
    first = Engine(config, store=store)
    cut = 2 * len(batches) // 3
    for batch in batches[:cut]:
        acked = first.ingest("grok", batch).through_step
    saved = store.load_checkpoint("grok")
    state = pickle.loads(saved.state)
    entries = [state["replay"]] if "replay" in state else []  # the run's first write
    logged = [op_points(op) for entry in (*entries, *saved.log) for op in decode_log_entry(entry)]
    assert saved.through_step == acked and sum(logged) <= log_points
    assert (len(saved.log) + len(entries) > 0) == (log_points > 0)
    second = Engine(config, store=store)
    assert second.status("grok").last_step == first.status("grok").last_step
    for batch in batches[cut:]:
        assert second.ingest("grok", batch).rejected == 0
    second.end_run("grok")
    assert _timeline(second, "grok") == expected


class _FailingStore:
    """A store whose next ``save_checkpoint`` fails, as a dropped connection would."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.fail_next = False
        self.shared = inner.shared

    def save_checkpoint(self, *args, **kwargs) -> None:
        if self.fail_next:
            self.fail_next = False
            raise Unavailable("store is down")
        self.inner.save_checkpoint(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _timeline(engine: Engine, run_id: str) -> tuple:
    segments, events = engine.timeline(run_id)
    return segments, [(e.step, e.kind, e.series, e.detected_at, e.confidence, e.evidence)
                      for e in events]


def _grok_batches(size: int) -> list:
    return list(iter_batches(read_log(shared_dir("runs", "grok_add_0.jsonl")), size))


def _reference(batches: list) -> tuple:
    engine = Engine()
    for batch in batches:
        engine.ingest("ref", batch)
    engine.end_run("ref")
    return _timeline(engine, "ref")


def test_a_new_process_resumes_from_the_checkpoint(backend: Backend):
    """Replica A dies mid-run; B, on the same store, restores A's checkpoint and the
    client's replay of unacknowledged batches: the timeline is the uninterrupted one."""
    batches = _grok_batches(97)
    expected = _reference(batches)
    a = Engine(store=backend.open(), replica="A")
    claim = a.claim("grok")
    a.start_run("grok", labels={"team": "x"})
    cut = len(batches) // 2
    acked = -1
    for batch in batches[:cut]:
        acked = a.ingest("grok", batch).through_step
    assert backend.opened[0].load_checkpoint("grok")[1] == acked  # ack == checkpoint
    del a, claim  # no end, no release: a crash; closing the store ends its sessions
    backend.opened[0].close()

    b = Engine(store=backend.open(), replica="B")
    with_claim = b.claim("grok")
    status = b.start_run("grok", labels={"team": "x"}, resume=True)
    assert status.last_step >= acked and status.labels == {"team": "x"}
    # The client replays from the first batch not wholly acknowledged.
    replay_from = next(i for i, batch in enumerate(batches)
                       if max(int(np.max(s)) for s, _ in batch.values()) > acked)
    assert replay_from < cut
    results = [b.ingest("grok", batch) for batch in batches[replay_from:]]
    assert sum(r.rejected for r in results) == 0
    b.end_run("grok")
    assert _timeline(b, "grok") == expected
    with_claim.release()
    # Queries answer from the store once the run has left memory (or from memory).
    c = Engine(store=backend.open(), replica="C")
    assert _timeline(c, "grok") == expected
    assert c.status("grok").ended and c.status("grok").last_step == 416 * 10


def test_a_short_run_stores_its_changes_not_its_state_and_restores_exactly(backend: Backend):
    """A run whose changes fit the log is first checkpointed as those changes (start
    with its labels and series, batches, flush, end) replayed from an empty run:
    restored mid-run or after its end, it is the run that was never interrupted."""
    batches = _grok_batches(97)
    expected = _reference(batches)
    store = backend.open()
    first = Engine(store=store)
    first.start_run("grok", labels={"team": "x"}, series=[SeriesSpec(
        "train_loss", Role.LOSS, Split.TRAIN, Direction.MINIMIZE)])
    cut = len(batches) // 3
    for batch in batches[:cut]:
        acked = first.ingest("grok", batch).through_step
    first.flush("grok")
    state = pickle.loads(store.load_checkpoint("grok").state)
    assert set(state) == {"version", "run_id", "replay"}  # no detector state written
    kinds = [op[0] for entry in (state["replay"], *store.load_checkpoint("grok").log)
             for op in decode_log_entry(entry)]
    assert kinds == ["start", *["batch"] * cut, "flush"]
    second = Engine(store=store)
    status = second.start_run("grok", resume=True)
    assert status.labels == {"team": "x"} and status.last_step >= acked
    assert second._runs["grok"].detector.specs["train_loss"].role == Role.LOSS
    for batch in batches[cut:]:
        assert second.ingest("grok", batch).rejected == 0
    second.end_run("grok")
    assert _timeline(second, "grok") == expected
    third = Engine(store=store)  # restored after its end: ended, the same state
    ended = third.start_run("grok", resume=True)
    assert ended.last_step == second.status("grok").last_step
    restored, original = third._runs["grok"], second._runs["grok"]
    assert restored.detector.segments() == original.detector.segments()
    assert [e.step for e in restored.recent] == [e.step for e in original.recent]
    assert third.end_run("grok") == []  # already ended: nothing is localised again


def test_log_entries_written_before_the_op_log_still_replay(backend: Backend):
    """A version-2 checkpoint and its log as an older phasewatch wrote them: the
    whole state, then each batch as a pickled list of column dicts."""
    batches = _grok_batches(97)
    expected = _reference(batches)
    written = Engine()
    written.ingest("grok", batches[0])
    state = pickle.loads(written._runs["grok"].checkpoint())
    state["version"] = 2
    store = backend.open()
    store.save_checkpoint("grok", pickle.dumps(state), 0)
    for batch in batches[1:4]:
        store.save_checkpoint("grok", pickle.dumps([batch]), 0, append=True)
    engine = Engine(store=store)
    for batch in batches[4:]:
        assert engine.ingest("grok", batch).rejected == 0
    engine.end_run("grok")
    assert _timeline(engine, "grok")[0] == expected[0]  # the events of batch 0 were not stored


def test_a_failed_store_write_drops_the_run_and_the_replay_repairs_it(backend: Backend):
    batches = _grok_batches(64)
    expected = _reference(batches)
    store = _FailingStore(backend.open())
    engine = Engine(store=store)
    acked = -1
    for i, batch in enumerate(batches):
        if i == len(batches) // 3:
            store.fail_next = True
            with pytest.raises(Unavailable):
                engine.ingest("grok", batch)
            assert engine.snapshot().runs == ()  # ahead of its checkpoint: dropped
            assert store.load_checkpoint("grok")[1] == acked
            # The commit failed with the detection lock held (SQLite) or after it went
            # (PostgreSQL): either way it is free, or every later batch would hang.
            assert not engine._detecting.locked()
        result = engine.ingest("grok", batch)  # restored from the checkpoint, then resent
        assert result.rejected == 0
        acked = result.through_step
    engine.end_run("grok")
    assert _timeline(engine, "grok") == expected


def test_checkpoint_is_versioned(backend: Backend):
    store = backend.open()
    store.save_checkpoint("old", zlib.compress(pickle.dumps({"version": 0})), 5)
    with pytest.raises(FailedPrecondition, match="checkpoint version 0"):
        Engine(store=store).start_run("old")
    store.save_checkpoint("torn", b"not a checkpoint", 5)
    with pytest.raises(FailedPrecondition, match="unreadable checkpoint"):
        Engine(store=store).start_run("torn")


# --- ownership -----------------------------------------------------------------


def test_sqlite_claims_are_always_granted(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'pw.db'}")
    assert not store.shared
    first, second = store.claim_run("r", "A"), store.claim_run("r", "B")
    assert first.release() and second.release()
    store.close()


def test_postgres_ownership_is_exclusive_and_names_the_owner(postgres: Backend):
    a, b = postgres.open(), postgres.open()
    assert a.shared
    claim = a.claim_run("run-x", "replica-a:50051")
    again = a.claim_run("run-x", "replica-a:50051")  # the same process: stacked
    with pytest.raises(Aborted, match=r"owned by replica replica-a:50051 \(since "):
        b.claim_run("run-x", "replica-b:50051")
    other = b.claim_run("run-y", "replica-b:50051")  # other runs are free
    assert claim.release() is False  # one claim still open
    with pytest.raises(Aborted):
        b.claim_run("run-x", "replica-b:50051")
    assert again.release() is True and again.release() is True  # idempotent
    taken = b.claim_run("run-x", "replica-b:50051")
    assert b.owner_of("run-x")[:2] == ("replica-b:50051", 2)
    taken.release()
    other.release()


def test_postgres_a_dead_owner_session_frees_its_runs_and_is_fenced(postgres: Backend):
    a, b = postgres.open(), postgres.open()
    a.claim_run("run-x", "A")
    a.save_checkpoint("run-x", b"from-a", 10)
    with pytest.raises(Aborted):
        b.claim_run("run-x", "B")
    terminate_backend(a._lock_conn.info.backend_pid)  # A's lock session dies; A lives on
    b.claim_run("run-x", "B")  # at once: PostgreSQL released A's lock with its session
    b.save_checkpoint("run-x", b"from-b", 20)
    # A does not know yet; its next write must not overwrite B's checkpoint.
    with pytest.raises(Aborted, match="taken over by replica 'B'"):
        a.save_checkpoint("run-x", b"stale", 11)
    with pytest.raises(Aborted, match="taken over by replica 'B'"):
        a.save_checkpoint("run-x", b"stale log entry", 12, append=True)
    assert b.load_checkpoint("run-x") == Checkpoint(b"from-b", 20)


def test_postgres_store_closing_releases_claims(postgres: Backend):
    a, b = postgres.open(), postgres.open()
    a.claim_run("run-x", "A")
    a.close()
    b.claim_run("run-x", "B").release()


def test_a_stream_open_on_one_replica_is_refused_by_another(postgres: Backend):
    servers = []
    for name in ("A", "B"):
        engine = Engine(store=postgres.open(), replica=f"replica-{name}")
        server, port = create_server(engine)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel, pb_grpc.PhaseDetectorStub(channel)))
    try:
        (_, _, stub_a), (_, _, stub_b) = servers
        start = pb.StreamRequest(start=pb.RunStart(run_id="shared-run"))
        gate = threading.Event()

        def held() -> Iterator[pb.StreamRequest]:
            yield start
            gate.wait(TIMEOUT)  # keep A's stream open

        open_stream = stub_a.Stream(held(), timeout=TIMEOUT)
        assert next(open_stream).ack.through_step == -1
        with pytest.raises(grpc.RpcError) as info:
            list(stub_b.Stream(iter([start]), timeout=TIMEOUT))
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "replica-A" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub_b.Log(pb.LogRequest(run_id="shared-run"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.ABORTED
        # Queries answer from any replica.
        assert stub_b.GetPhase(pb.GetPhaseRequest(run_id="shared-run"), timeout=TIMEOUT).run_id
        gate.set()
        assert [r.WhichOneof("msg") for r in open_stream] == ["ack"]  # the half-close flush
        # A's stream has ended: B may take the run now.
        responses = list(stub_b.Stream(iter([start]), timeout=TIMEOUT))
        assert [r.WhichOneof("msg") for r in responses] == ["ack", "ack"]
    finally:
        for server, channel, _ in servers:
            channel.close()
            server.stop(None)


def test_timeline_memory_is_bounded_and_the_store_keeps_every_event(backend: Backend):
    batches = _grok_batches(97)
    config = EngineConfig(max_timeline_events=5)
    memory_only, stored = Engine(config), Engine(config, store=backend.open())
    for engine in (memory_only, stored):
        for batch in batches:
            engine.ingest("grok", batch)
        engine.end_run("grok")
    everything = _reference(batches)[1]
    assert len(everything) > 5
    assert len(memory_only._runs["grok"].events) == 5  # the newest, bounded
    assert _timeline(memory_only, "grok")[1] == everything[-5:]
    assert _timeline(stored, "grok")[1] == everything  # from the store, in full
    assert len(stored._runs["grok"].events) == 0  # nothing of it held in memory


def test_postgres_writes_of_different_streams_do_not_queue_behind_one_connection(
    postgres: Backend,
):
    """One data connection held inside an open transaction (a slow batch) does not stop
    another run's batch: the data connections are pooled."""
    store = postgres.open()
    holding, release = threading.Event(), threading.Event()

    def slow_batch() -> None:
        with store._data() as conn, conn.transaction():
            conn.execute("SELECT 1")
            holding.set()
            release.wait(30)

    slow = threading.Thread(target=slow_batch)
    slow.start()
    try:
        assert holding.wait(30)
        done = threading.Event()

        def other_batch() -> None:
            store.save_checkpoint("other-run", b"state", 5)
            done.set()

        writer = threading.Thread(target=other_batch)
        writer.start()
        writer.join(30)
        assert done.is_set(), "the second write waited for the first connection"
        assert not release.is_set()  # the first batch was still open all along
    finally:
        release.set()
        slow.join(30)
    assert store.load_checkpoint("other-run") == Checkpoint(b"state", 5)


def test_postgres_advisory_locks_live_on_their_own_session(postgres: Backend):
    store = postgres.open()
    store.claim_run("run-locked", "A")
    with store._data() as conn:
        data_pid = conn.info.backend_pid
        holders = [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = (%s::bigint & x'ffffffffffffffff'::bigint)",
            (store.lock_key("run-locked"),)).fetchall()]
    assert holders == [store._lock_conn.info.backend_pid] and data_pid not in holders
    # Recycled data connections never carry a run's lock, whatever they did before.
    store.close()
    with pytest.raises(Unavailable):
        store.get_run("run-locked")


def test_postgres_pool_settings_are_checked():
    from detector.store.postgres import PostgresStore

    with pytest.raises(InvalidArgument):
        PostgresStore("postgresql://127.0.0.1:1/x", pool_size=0)


def test_sqlite_wal_checkpoints_run_on_the_background_thread_not_in_commits(tmp_path):
    """Commits never checkpoint the WAL (that took 7-15 ms under the store lock);
    the checkpointer thread does, every ``checkpoint_seconds``, and close() last.
    The database file only grows when a checkpoint copies pages into it."""
    import os
    import time

    blob = bytes(64 * 1024)  # 16 pages a checkpoint
    path = tmp_path / "idle.db"
    store = SqliteStore(path, checkpoint_seconds=3600.0)
    assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    empty = os.path.getsize(path)
    for i in range(100):  # ~1600 pages: past SQLite's automatic checkpoint (1000)
        store.save_checkpoint(f"run-{i}", blob, i, status=_status(f"run-{i}"))
    assert os.path.getsize(path) == empty  # no commit checkpointed
    store.close()
    assert os.path.getsize(path) > 100 * len(blob)  # close() did
    reopened = SqliteStore(path)
    assert reopened.load_checkpoint("run-99") == Checkpoint(blob, 99)
    reopened.close()

    path = tmp_path / "busy.db"
    store = SqliteStore(path, checkpoint_seconds=0.05)
    for i in range(40):
        store.save_checkpoint(f"run-{i}", blob, i, status=_status(f"run-{i}"))
    deadline = time.monotonic() + 10
    while os.path.getsize(path) <= 40 * len(blob) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.getsize(path) > 40 * len(blob)  # the thread checkpointed, the store open
    store.close()
    store.close()  # idempotent


def test_the_status_a_commit_stores_is_the_status_without_recent_events() -> None:
    """The engine builds it field by field (cheaper than dataclasses.replace): a
    field added to RunStatus must be carried too."""
    import dataclasses

    from detector.engine import SeriesStatus, _without_recent

    full = {}
    for f in dataclasses.fields(RunStatus):  # every field set, none at its default
        full[f.name] = {
            "run_id": "r", "labels": {"a": "b"}, "phase": Phase.COLLAPSE, "since_step": 3,
            "confidence": 0.5, "last_step": 9, "ended": True, "recent_events": tuple(EVENTS),
            "updated_at": 2.0, "collapse_scopes": ("training",),
            "series": (SeriesStatus("loss", Role.LOSS, Split.TRAIN, True, 0.1, 0.2, 3.0),),
        }[f.name]
    status = RunStatus(**full)
    assert _without_recent(status) == dataclasses.replace(status, recent_events=())
