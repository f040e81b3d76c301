"""The /metrics text with cached per-run lines (``MetricsExposition``) says exactly
what ``EngineCollector`` through prometheus_client's ``generate_latest`` says."""

from __future__ import annotations

import gzip
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.cli import main
from detector.engine import Engine
from detector.exporter import EngineCollector, MetricsExposition, start_metrics_server
from detector.server import create_server
from tests.helpers import collapse_columns

ODD_RUN = 'we"ird\\run{id}=,é'  # run ids allow anything printable but whitespace
ODD_SERIES = 'val_acc"\\x'
CLOSING = collapse_columns(generalization=(300, 60))  # open from line 300, ended at line 420


def _families(text: str) -> dict[str, str]:
    """Family name -> its block of lines (HELP, TYPE, samples), as written."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in out, f"family {name} is not contiguous"
            out[name] = ""
        assert name is not None
        out[name] += line
    return out


def _parsed(text: str) -> dict[str, tuple[str, str, frozenset]]:
    """Family name -> (type, help, samples), NaN made comparable."""
    out = {}
    for family in text_string_to_metric_families(text):
        samples = frozenset(
            (s.name, tuple(sorted(s.labels.items())), "NaN" if math.isnan(s.value) else s.value)
            for s in family.samples
        )
        out[family.name] = (family.type, family.documentation, samples)
    return out


def _old_text(engine: Engine, **kw) -> str:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, **kw))
    return generate_latest(registry).decode()


@pytest.fixture
def engine() -> Engine:
    engine = Engine()
    engine.start_run(ODD_RUN, labels={
        "team": 'vi"sion\\', "note": "two\nlines", "data.set-v2": "c4", "data_set_v2": "other",
        "2nd": "x", "empty": "",
    })
    steps = list(range(60))
    engine.ingest(ODD_RUN, {"train_loss": (steps, [1.0 / (1 + s) for s in steps]),
                            ODD_SERIES: (steps, [0.1] * 59 + [math.inf])})
    engine.flush(ODD_RUN)
    engine.start_run("empty-run")
    for i in range(4):
        engine.ingest(f"r{i}", {"train_loss": ([0, 1, 2, 3, 10**7], [1.0, 0.5, math.nan, 0.3, 0.2]),
                                "val_loss": ([0, 1, 2, 3, 10**7], [2.0, 1.5, 1.2, 1.1, 1.0])})
        engine.flush(f"r{i}")
        time.sleep(0.002)  # distinct update times for the series budget
    engine.end_run("r0")
    # Collapses of both scopes open (the collapse gauge's 1s), and a generalisation
    # collapse that the rest of its run (CLOSING_REST) ends.
    engine.ingest(ODD_RUN + "/collapsing",
                  collapse_columns(450, generalization=(200, None), training=(400, None)))
    engine.ingest("closing", {k: (s[:340], v[:340]) for k, (s, v) in CLOSING.items()})
    for run_id in (ODD_RUN + "/collapsing", "closing"):
        engine.flush(run_id)
    engine.ingest("gone", {"loss": ([0, 1, 2], [1.0, 0.9, 0.8])})
    engine.end_run("gone")
    run = engine._runs["gone"]
    run.status = replace(run.status, updated_at=time.time() - 3600)  # past the retention
    return engine


@pytest.mark.parametrize("series_runs", [100, 2, 0])
def test_cached_text_equals_the_collectors(engine: Engine, series_runs: int) -> None:
    new = MetricsExposition(engine, series_runs=series_runs).render().decode()
    old = _old_text(engine, series_runs=series_runs)
    # Byte for byte, family by family (only the order of the families differs).
    assert _families(new) == _families(old)
    assert _parsed(new) == _parsed(old)
    parsed = _parsed(new)
    info = {dict(labels)["run_id"]: dict(labels) for _, labels, _ in parsed["phasewatch_run_info"][2]}
    assert info[ODD_RUN]["label_note"] == "two\nlines"  # escaped, and read back
    assert info[ODD_RUN]["label_team"] == 'vi"sion\\'
    assert "gone" not in info and "r0" in info  # ended: kept for the retention only
    assert "empty-run" in info
    collapse = {tuple(sorted(dict(labels).items())): value
                for _, labels, value in parsed["phasewatch_run_collapse"][2]}
    assert collapse == {(("run_id", run_id), ("scope", scope)): 1.0  # only open collapses
                        for run_id, scope in [(ODD_RUN + "/collapsing", "training"),
                                              (ODD_RUN + "/collapsing", "generalization"),
                                              ("closing", "generalization")]}


def test_lines_are_made_as_runs_change_and_a_scrape_only_looks_them_up(engine: Engine) -> None:
    exposition = MetricsExposition(engine)
    exposition.render()
    engine.ingest("r1", {"train_loss": ([10**7 + 1, 10**7 + 2], [0.1, 0.1])})
    engine.start_run("fresh-run", labels={"a": "b"})
    made = dict(exposition._fresh)  # made in the calling thread, before any scrape
    assert "fresh-run" in made
    assert made["fresh-run"].status is engine.status("fresh-run")
    text = exposition.render().decode()
    assert exposition._cache["fresh-run"] is made["fresh-run"]  # looked up, not formatted again
    assert exposition._fresh == {}
    # The same text as an exposition that made nothing ahead.
    assert _families(text) == _families(MetricsExposition(engine).render().decode())
    engine.start_run("fresh-run", labels={"a": "c"})
    assert "fresh-run" in exposition._fresh
    engine.forget("fresh-run")  # another replica took it over: nothing held for it
    assert "fresh-run" not in exposition._fresh


def test_every_render_matches_as_runs_change(engine: Engine) -> None:
    exposition = MetricsExposition(engine)
    exposition.render()
    before = dict(exposition._cache)
    engine.ingest("r1", {"train_loss": ([10**7 + 1, 10**7 + 2], [0.1, 0.1])})
    engine.flush("r1")
    engine.forget("r2")
    engine.start_run("new", labels={"a": "b"})
    # New labels and a new phase on a run already shown: its cached lines must not stay.
    engine.start_run("r3", labels={"team": "moved"})
    engine.ingest("empty-run", {"train_loss": ([0, 1, 2], [1.0, 0.9, 0.8])})
    engine.flush("empty-run")
    assert engine.status("empty-run").phase != before["empty-run"].status.phase
    engine.ingest("closing", {k: (s[340:], v[340:]) for k, (s, v) in CLOSING.items()})
    engine.flush("closing")  # its generalisation collapse ends
    engine.ingest(ODD_RUN + "/collapsing", {"train_loss": ([4500], [4.0])})
    engine.flush(ODD_RUN + "/collapsing")  # a new status, the same open collapses
    assert before["closing"].status.collapse_scopes == ("generalization",)
    assert engine.status("closing").collapse_scopes == ()
    text = exposition.render().decode()
    assert _families(text) == _families(_old_text(engine))
    cache = exposition._cache
    assert cache[ODD_RUN] is before[ODD_RUN]  # unchanged: not formatted again
    assert cache["r1"] is not before["r1"]
    assert "r2" not in cache and "new" in cache and "gone" not in cache
    assert 'phasewatch_run_last_step{run_id="r1"} 1.0000002e+07\n' in text
    assert b'label_team="moved"' in cache["r3"].info
    assert cache["empty-run"].phase != before["empty-run"].phase
    assert cache["r1"].phase is before["r1"].phase  # same phase: the lines are kept
    collapsing = ODD_RUN + "/collapsing"
    assert cache[collapsing].status is not before[collapsing].status
    assert cache[collapsing].collapse is before[collapsing].collapse  # same scopes: kept too
    assert b'run_id="closing",scope="generalization"} 1.0\n' in before["closing"].collapse
    assert cache["closing"].collapse == b""  # ended: no sample


def test_the_endpoint(engine: Engine) -> None:
    server, port = start_metrics_server(engine, "127.0.0.1:0")
    url = f"http://127.0.0.1:{port}/metrics"

    def get(path: str = "", **headers: str) -> tuple[dict[str, str], bytes]:
        request = urllib.request.Request(url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as answer:
            return dict(answer.headers), answer.read()

    try:
        # What Prometheus asks for: OpenMetrics first, and it gets OpenMetrics
        # (tests/test_metrics_conventions.py checks that text); a plain client, 0.0.4.
        accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                  "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        headers, body = get(Accept=accept, **{"Accept-Encoding": "gzip"})
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert gzip.decompress(body).endswith(b"# EOF\n")
        headers, body = get(**{"Accept-Encoding": "gzip"})
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(body).decode()
        families = _parsed(text)
        assert families["phasewatch_run_phase"] == _parsed(_old_text(engine))["phasewatch_run_phase"]
        assert "process_cpu_seconds" in families or "python_info" in families
        headers, body = get("?name[]=phasewatch_run_last_step&name[]=phasewatch_active_runs")
        assert "Content-Encoding" not in headers
        assert set(_parsed(body.decode())) == {"phasewatch_run_last_step", "phasewatch_active_runs"}
        post = urllib.request.Request(url, data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=10)
        assert refused.value.code == 405
    finally:
        server.shutdown()
        server.server_close()


def test_ten_thousand_runs_are_formatted_once_and_reused() -> None:
    # Speed is measured by benchmarks/soak.py; here: a second scrape of unchanged
    # runs formats nothing again and returns the same text.
    engine = Engine()
    for i in range(10_000):
        engine.ingest(f"run-{i}", {"train_loss": ([0, 1, 2], [1.0, 0.9, 0.8]),
                                   "val_acc": ([0, 1, 2], [0.1, 0.2, 0.3])})
    exposition = MetricsExposition(engine)
    first = exposition.render()
    texts = dict(exposition._cache)
    assert len(texts) == 10_000
    second = exposition.render()
    assert all(exposition._cache[run_id] is text for run_id, text in texts.items())
    assert first.count(b"\n") > 60_000
    assert _without_process_families(first) == _without_process_families(second)


def test_a_scrape_rebuilds_only_the_groups_of_runs_that_changed_or_expired() -> None:
    from detector.exporter.text import _GROUP

    engine = Engine()
    runs = 3 * _GROUP + 5
    for i in range(runs):
        engine.ingest(f"run-{i}", {"train_loss": ([0, 1], [1.0, 0.9])})
    exposition = MetricsExposition(engine, retention=60.0)
    exposition.render()
    first = list(exposition._groups)
    assert len(first) == 4
    engine.ingest(f"run-{_GROUP + 3}", {"train_loss": ([2], [0.8])})  # a new status in group 1
    engine.end_run(f"run-{3 * _GROUP + 1}")  # group 3: ended, shown for the retention
    text = exposition.render().decode()
    groups = list(exposition._groups)
    assert [a is b for a, b in zip(first, groups, strict=True)] == [True, False, True, False]
    assert f'phasewatch_run_last_step{{run_id="run-{_GROUP + 3}"}} 2.0' in text
    assert _families(text) == _families(_old_text(engine, retention=60.0))
    assert exposition.render() and all(a is b for a, b in zip(groups, exposition._groups, strict=True))
    # Past the retention an ended run leaves: its group is rebuilt though no status changed.
    # (A run ended just now: the renders above may take longer than a short retention on
    # a loaded machine, and the run ended first would be gone before it is looked for.)
    late = f"run-{3 * _GROUP + 3}"
    engine.end_run(late)
    short = MetricsExposition(engine, retention=2.0)
    ended = f'run_id="{late}"'
    assert ended in short.render().decode()
    kept = list(short._groups)
    time.sleep(2.1)
    text = short.render().decode()
    assert ended not in text and f'run_id="run-{3 * _GROUP + 2}"' in text
    assert [a is b for a, b in zip(kept, short._groups, strict=True)] == [True, True, True, False]
    assert _families(text) == _families(_old_text(engine, retention=2.0))


def _without_process_families(body: bytes) -> list[bytes]:
    """The exposition minus what changes between two scrapes by itself (process, GC)."""
    return [line for line in body.splitlines()
            if not line.startswith((b"process_", b"python_", b"# HELP process", b"# TYPE process",
                                    b"# HELP python", b"# TYPE python", b"phasewatch_detection",
                                    b"# HELP phasewatch_detection", b"# TYPE phasewatch_detection"))]


def test_serve_flag_sets_concurrent_rpcs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}

    def fake_serve(listen, metrics_listen, store, **options):  # noqa: ANN001
        seen.update(options)

    monkeypatch.setattr("detector.server.serve", fake_serve)  # imported by cmd_serve when it runs
    assert main(["serve", "--store", "sqlite://:memory:", "--max-concurrent-streams", "1200"]) == 0
    assert seen["max_workers"] == 1200
    seen.clear()
    assert main(["serve", "--store", "sqlite://:memory:"]) == 0
    assert "max_workers" not in seen


class _Held:
    """A Stream's requests: ``start``, then nothing until released (the stream stays open)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.released = threading.Event()

    def __iter__(self) -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(start=pb.RunStart(run_id=self.run_id))
        self.released.wait(30)


def test_max_workers_is_the_number_of_open_streams() -> None:
    server, port = create_server(Engine(), "127.0.0.1:0", max_workers=3)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.PhaseDetectorStub(channel)
    held = [_Held(f"s{i}") for i in range(3)]
    calls = [stub.Stream(iter(h)) for h in held]
    try:
        for call in calls:
            assert next(call).HasField("ack")  # open, each on its worker thread
        fourth = _Held("s3")
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Stream(iter(fourth)))
        fourth.released.set()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Unary calls and health checks have capacity of their own (issue 18).
        assert stub.GetPhase(pb.GetPhaseRequest(run_id="s0"), timeout=10).run_id == "s0"
        for h in held:
            h.released.set()
        for call in calls:
            assert all(r.HasField("ack") for r in call)  # the half-close's flush ack
        assert stub.GetPhase(pb.GetPhaseRequest(run_id="s0"), timeout=10).run_id == "s0"
    finally:
        for h in held:
            h.released.set()
        channel.close()
        server.stop(None)
