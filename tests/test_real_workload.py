"""The real-run workload of ``benchmarks.ingest``: finding the runs and cutting them
into batches of logged lines (no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import real_workload
from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector.logfile import write_jsonl


def _decode(payload: bytes) -> dict[str, tuple[list[int], list[float]]]:
    request = pb.StreamRequest.FromString(payload)
    assert request.WhichOneof("msg") == "batch"
    return {s.name: (list(s.steps), list(s.values)) for s in request.batch.series}


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    return repo


def test_batches_hold_every_point_once_lines_at_a_time(tmp_path):
    # Sparse rows (validation every third line), a null value, and lines out of
    # step order in the file: every point lands in exactly one batch, in step
    # order, and a batch spans at most `lines` logged lines.
    records = [{"step": s, "loss": 1.0 / (1 + s)} for s in range(0, 200, 10)]
    for r in records[::3]:
        r["val"] = None if r["step"] == 30 else r["step"] * 0.5
    records[4], records[5] = records[5], records[4]
    path = tmp_path / "run.jsonl"
    write_jsonl(path, records)
    (run,) = real_workload.load([path])
    assert run.name == "run" and run.steps.tolist() == list(range(0, 200, 10))
    out = real_workload.batches(run, 7)
    assert len(out) == 3
    got: dict[str, tuple[list[int], list[float]]] = {"loss": ([], []), "val": ([], [])}
    for payload, points in out:
        cols = _decode(payload)
        assert points == sum(len(s) for s, _ in cols.values())
        assert len(set().union(*(s for s, _ in cols.values()))) <= 7
        for name, (steps, values) in cols.items():
            got[name][0].extend(steps)
            got[name][1].extend(values)
    assert got["loss"][0] == list(range(0, 200, 10))
    assert got["loss"][1] == [1.0 / (1 + s) for s in range(0, 200, 10)]
    assert got["val"][0] == list(range(0, 200, 30))
    assert math.isnan(got["val"][1][1]) and got["val"][1][2] == 30.0
    assert sum(p for _, p in out) == run.points == 20 + 7
    with pytest.raises(ValueError, match="lines"):
        real_workload.batches(run, 0)


def test_run_paths_needs_labels_and_says_what_is_missing(tmp_path):
    repo = _repo(tmp_path)
    shared = tmp_path / "shared" / "runs"
    shared.mkdir(parents=True)
    write_jsonl(shared / "a.jsonl", [{"step": 0, "x": 1.0}])
    write_jsonl(shared / "b.jsonl", [{"step": 0, "x": 1.0}])  # no labels: not a labelled run
    (shared / "a.labels.json").write_text("{}")
    paths, notes = real_workload.run_paths(repo)
    assert [p.name for p in paths] == ["a.jsonl"]
    assert any("real_runs" in n and "absent" in n for n in notes)
    assert any("generated" in n for n in notes)
    generated = repo / "benchmarks" / "generated"
    generated.mkdir()
    write_jsonl(generated / "g.jsonl", [{"step": 0, "x": 1.0}])
    paths, _ = real_workload.run_paths(repo)
    assert [p.name for p in paths] == ["a.jsonl", "g.jsonl"]
    assert np.array_equal(real_workload.load(paths)[1].steps, [0])


@pytest.mark.parametrize("kind", ["engine-aio", "engine-aio-worker"])
def test_the_engine_behind_grpc_aio_answers_as_the_engine_does(kind):
    # The benchmark's aio prototype (a process of its own on loopback) streams a
    # run's events, one message each, then the ack: the events an in-process engine
    # finds on the same batches, and through_step as it reports it.
    import grpc

    from benchmarks.ingest import ServerProcess
    from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
    from detector.engine import Engine
    from detector.replay import columns_to_batch
    from tests.helpers import rows_to_columns

    rng = np.random.default_rng(4)
    steps = np.arange(0, 3000, 10)
    loss = np.where(steps < 1500, 2.0, 0.5) * np.exp(rng.normal(0, 0.02, len(steps)))
    rows = [{"step": int(s), "train_loss": float(v)} for s, v in zip(steps, loss, strict=True)]
    chunks = [rows_to_columns(rows[i : i + 64]) for i in range(0, len(rows), 64)]
    engine = Engine()
    engine.start_run("r")
    expected = [e for c in chunks for e in engine.ingest("r", c).events] + engine.end_run("r")
    requests = ([pb.StreamRequest(start=pb.RunStart(run_id="r"))]
                + [pb.StreamRequest(batch=columns_to_batch(c)) for c in chunks]
                + [pb.StreamRequest(end=pb.RunEnd())])
    with ServerProcess(kind) as server, grpc.insecure_channel(server.target) as channel:
        responses = list(pb_grpc.PhaseDetectorStub(channel).Stream(iter(requests), timeout=60))
    events = [r.event for r in responses if r.WhichOneof("msg") == "event"]
    acks = [r.ack for r in responses if r.WhichOneof("msg") == "ack"]
    assert [(e.kind, e.step, e.series) for e in events] == [
        (pb.EventKind.Value(f"EVENT_KIND_{e.kind.value}"), e.step, e.series) for e in expected]
    assert any(e.kind == pb.EVENT_KIND_CHANGE_POINT and abs(e.step - 1500) <= 20 for e in events)
    assert len(acks) == len(requests) and acks[-1].through_step == 2990
    assert sum(a.accepted for a in acks) == len(rows)


def test_matched_bare_cell_sends_the_full_servers_mean_events_a_batch(tmp_path):
    # --matched-bare: a bare server started to answer every batch with the full
    # server's mean number of event messages (7 over 2 batches: 4, Python's round),
    # measured on the same plan; the client receives that many before each ack.
    from benchmarks.ingest import _matched_bare_cells

    path = tmp_path / "run.jsonl"
    write_jsonl(path, [{"step": s, "loss": 1.0 / (1 + s), "acc": s / 400} for s in range(400)])
    runs = real_workload.load([path])
    plans = {16: [(r.name, real_workload.batches(r, 16)) for r in runs]}
    full = {"server": "full", "mode": "closed", "lines": 16, "events": 7, "batches": 2}
    (cell,) = _matched_bare_cells([full], plans, streams=2, seconds=0.5, window=1)
    assert cell["server"] == "bare-matched" and cell["bare_events"] == 4 and cell["lines"] == 16
    # Each acknowledged batch came after its 4 events; a stream's last batch may be cut off.
    assert cell["batches"] > 0 and cell["events"] >= 4 * cell["batches"] - 4 * 2


def test_the_server_without_detection_acks_every_point_and_finds_nothing():
    # full-nodetect: phasewatch serve whose runs detect nothing (benchmarks.nodetect_serve):
    # every batch is taken and acknowledged through its last step, the run is
    # stored and ended, and not one event is sent, where the real server finds the shift.
    import grpc

    from benchmarks.ingest import ServerProcess
    from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
    from detector.replay import columns_to_batch
    from tests.helpers import rows_to_columns

    steps = np.arange(0, 3000, 10)
    loss = np.where(steps < 1500, 2.0, 0.5) * np.exp(np.random.default_rng(5).normal(0, 0.02, len(steps)))
    rows = [{"step": int(s), "train_loss": float(v)} for s, v in zip(steps, loss, strict=True)]
    chunks = [rows_to_columns(rows[i : i + 64]) for i in range(0, len(rows), 64)]
    requests = ([pb.StreamRequest(start=pb.RunStart(run_id="r"))]
                + [pb.StreamRequest(batch=columns_to_batch(c)) for c in chunks]
                + [pb.StreamRequest(end=pb.RunEnd())])
    answers = {}
    for kind in ("full-nodetect", "full"):
        with ServerProcess(kind) as server, grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.PhaseDetectorStub(channel)
            responses = list(stub.Stream(iter(requests), timeout=60))
            status = stub.GetPhase(pb.GetPhaseRequest(run_id="r"), timeout=10)
        acks = [r.ack for r in responses if r.WhichOneof("msg") == "ack"]
        assert len(acks) == len(requests) and acks[-1].through_step == 2990 == status.last_step
        assert sum(a.accepted for a in acks) == len(rows)
        answers[kind] = [r.event for r in responses if r.WhichOneof("msg") == "event"]
    assert answers["full-nodetect"] == []
    assert any(e.kind == pb.EVENT_KIND_CHANGE_POINT for e in answers["full"])
