"""The ``phasewatch`` command line, in-process (``main``) and as the console script."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detector.cli import main, run_id_for
from detector.core.types import EventKind, Phase
from detector.logfile import count_points, read_log, write_jsonl
from tests.helpers import shared_dir

PHASES = {p.value for p in Phase}
KINDS = {k.value for k in EventKind}
SEGMENT_KEYS = {"start_step", "end_step", "phase", "confidence"}
EVENT_KEYS = {"step", "kind", "series", "confidence", "message"}


# --- helpers -------------------------------------------------------------------


def _script() -> list[str]:
    """The installed console script, beside this interpreter."""
    script = Path(sys.executable).with_name("phasewatch")
    if not script.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"console script {script} is not installed")
        pytest.skip(f"console script {script} is not installed (pip install -e '.[dev]')")
    return [str(script)]


def _run(*args: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_script(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,  # type: ignore[arg-type]
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never speaks gRPC."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("phasewatch: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def grok_run() -> Path:
    return shared_dir("runs", "grok_add_0.jsonl")


# --- analyze -------------------------------------------------------------------


def test_analyze_json_matches_the_contract_on_every_shared_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = sorted(shared_dir("runs").glob("*.jsonl"))
    assert runs
    for path in runs:
        assert main(["analyze", str(path), "--json"]) == 0
        document = json.loads(capsys.readouterr().out)  # exactly one JSON document
        assert set(document) == {"segments", "events", "change_points"}
        for segment in document["segments"]:
            assert set(segment) >= SEGMENT_KEYS
            assert segment["phase"] in PHASES
            assert segment["start_step"] < segment["end_step"]
        for event in document["events"]:
            assert set(event) >= EVENT_KEYS
            assert event["kind"] in KINDS
            assert isinstance(event["step"], int) and isinstance(event["message"], str)
        # Every series of the file is a key, with the steps of its CHANGE_POINT events.
        assert list(document["change_points"]) == list(read_log(path))
        for series, steps in document["change_points"].items():
            expected = {
                e["step"]
                for e in document["events"]
                if e["kind"] == "CHANGE_POINT" and e["series"] == series
            }
            assert steps == sorted(expected)


def test_analyze_text(capsys: pytest.CaptureFixture[str], grok_run: Path) -> None:
    assert main(["analyze", str(grok_run)]) == 0
    out = capsys.readouterr().out
    assert "phases" in out and "change points" in out
    assert "12 series" in out


def test_analyze_csv_equals_jsonl(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  grok_run: Path) -> None:
    columns = read_log(grok_run)
    names = list(columns)
    rows: dict[int, dict[str, float]] = {}
    for name, (steps, values) in columns.items():
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            rows.setdefault(step, {})[name] = value
    lines = ["step," + ",".join(names)]
    for step, row in rows.items():
        lines.append(f"{step}," + ",".join(repr(row[n]) if n in row else "" for n in names))
    csv_path = tmp_path / "grok.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    assert main(["analyze", str(grok_run), "--json"]) == 0
    from_jsonl = capsys.readouterr().out
    assert main(["analyze", str(csv_path), "--json"]) == 0
    assert capsys.readouterr().out == from_jsonl


def test_analyze_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   grok_run: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install -e '.[dev]'")
    out = tmp_path / "grok.png"
    assert main(["analyze", str(grok_run), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_plot_without_matplotlib_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    log = tmp_path / "run.jsonl"
    write_jsonl(log, [{"step": i, "loss": 1.0 / (i + 1)} for i in range(20)])
    assert main(["analyze", str(log), "--plot", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys.readouterr().err, "matplotlib", "phasewatch[plot]")


# --- user mistakes: one line on stderr, the right exit code ----------------------


def _bad_line_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.jsonl"
    path.write_text('{"step": 0, "val_acc": 0.1}\n' * 16 + '{"step": 17, "val_acc": "high"}\n')
    return path


@pytest.mark.parametrize(
    ("argv", "code", "needles"),
    [
        (["analyze", "{tmp}/missing.jsonl"], 2, ["missing.jsonl", "no such file"]),
        (["analyze", "{bad}"], 2, ["x.jsonl:17:", 'value of "val_acc" is not a number']),
        (["replay", "{bad}", "--target", "127.0.0.1:{closed}"], 2, ["x.jsonl:17:"]),
        (["status", "run-1", "--target", "127.0.0.1:{closed}"], 1,
         ["no detector listening at 127.0.0.1:"]),
        (["runs", "--target", "127.0.0.1:{closed}"], 1, ["no detector listening"]),
        (["watch", "--target", "127.0.0.1:{closed}"], 1, ["no detector listening"]),
        (["replay", "{good}", "--target", "127.0.0.1:{closed}"], 1, ["no detector listening"]),
        (["status", "bad id", "--target", "127.0.0.1:{closed}"], 2, ["run id"]),
        (["serve", "--webhook-url", "ftp://example.invalid"], 2, ["alert URL",
                                                                  "not an http(s)"]),
        (["serve", "--tls-cert", "cert.pem"], 2, ["--tls-key"]),
        (["serve", "--tls-cert", "{tmp}/nope.pem", "--tls-key", "{tmp}/nope.key"], 2,
         ["nope"]),
    ],
)
def test_user_mistakes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], code: int,
    needles: list[str],
) -> None:
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"step": 0, "loss": 1.0}])
    values = {"tmp": tmp_path, "bad": _bad_line_file(tmp_path), "good": good,
              "closed": _closed_port()}
    started = time.monotonic()
    assert main([a.format(**values) for a in argv]) == code
    assert time.monotonic() - started < 5  # nothing listening fails fast
    _one_line_error(capsys.readouterr().err, *needles)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["demo", "--speed", "0"]) == 2
    assert main(["watch", "--kind", "NOT_A_KIND"]) == 2
    assert main(["runs", "--label", "no-equals-sign"]) == 2
    assert main(["replay", "f.jsonl", "--batch-size", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_collapse_end_is_a_kind_to_filter_and_show() -> None:
    from detector.cli import _event_kind
    from detector.convert import event_to_proto
    from detector.core.types import Event
    from detector.report import ALERT_KINDS, event_view_from_proto, format_event, format_timeline

    assert _event_kind("collapse_end") is EventKind.COLLAPSE_END
    assert _event_kind("EVENT_KIND_COLLAPSE_END") is EventKind.COLLAPSE_END
    assert "COLLAPSE_END" in ALERT_KINDS  # a recovery is news, as the onset was
    onset = Event(step=300, kind=EventKind.COLLAPSE_ONSET, detected_at=320, series="val_acc",
                  confidence=0.9, message="held-out accuracy fell",
                  evidence={"scope": "generalization"})
    end = Event(step=900, kind=EventKind.COLLAPSE_END, detected_at=950, series="val_acc",
                confidence=0.8, message="recovered", evidence={"scope": "generalization"})
    views = [event_view_from_proto(event_to_proto("r", e)) for e in (onset, end)]
    lines = [format_event(v) for v in views]
    assert "COLLAPSE_ONSET" in lines[0] and lines[0].endswith("[generalization]")
    assert "COLLAPSE_END" in lines[1] and lines[1].endswith("[generalization]")
    timeline = format_timeline([], views, kinds=ALERT_KINDS)
    assert "COLLAPSE_END" in timeline and "not listed" not in timeline


def test_no_answer_within_the_deadline(capsys: pytest.CaptureFixture[str],
                                       silent_port: int) -> None:
    started = time.monotonic()
    code = main(["status", "run-1", "--target", f"127.0.0.1:{silent_port}", "--timeout", "1"])
    assert code == 1
    assert time.monotonic() - started < 5
    _one_line_error(capsys.readouterr().err, f"127.0.0.1:{silent_port}")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import detector

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"phasewatch {detector.__version__}"


def test_run_id_for() -> None:
    assert run_id_for("runs/grok_add_0.jsonl") == "grok_add_0"
    assert run_id_for("a/b.csv.gz") == "b"
    assert run_id_for("my run.jsonl") == "run"  # not a valid run id: a neutral one


# --- against a real detector ------------------------------------------------------


def test_replay_then_query(capsys: pytest.CaptureFixture[str], server: tuple,
                           grok_run: Path) -> None:
    engine, port, _ = server
    target = f"127.0.0.1:{port}"
    argv = ["replay", str(grok_run), "--run-id", "r1", "--target", target, "--json",
            "--batch-size", "100", "--label", "team=a"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    points = count_points(read_log(grok_run))
    assert summary["points_sent"] == summary["accepted"] == points
    assert summary["rejected"] == 0
    assert 40 <= summary["batches"] <= 60  # ~100 points each
    assert summary["through_step"] == 4160
    # It printed what it was told: the engine's events for the run, in order.
    _, events = engine.timeline("r1")
    assert [(e["step"], e["kind"]) for e in summary["events"]] == [
        (e.step, e.kind.value) for e in events
    ]

    assert main(["status", "r1", "--target", target, "--json", "--timeline"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["run_id"] == "r1" and status["last_step"] == 4160
    assert status["labels"] == {"team": "a"}
    assert len(status["events"]) == len(events)

    assert main(["status", "r1", "--target", target]) == 0
    assert "last step  4160" in capsys.readouterr().out

    assert main(["runs", "--target", target, "--label", "team=a", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["r1"]
    assert main(["runs", "--target", target, "--label", "team=b"]) == 0
    assert capsys.readouterr().out.strip() == "no runs"
    phase = status["phase"]
    assert main(["runs", "--target", target, "--phase", phase]) == 0
    assert "r1" in capsys.readouterr().out

    assert main(["status", "nope", "--target", target]) == 2
    _one_line_error(capsys.readouterr().err, "unknown run 'nope'")


def test_replay_text_output(capsys: pytest.CaptureFixture[str], server: tuple,
                            tmp_path: Path) -> None:
    _, port, _ = server
    log = tmp_path / "small.jsonl"
    write_jsonl(log, [{"step": i * 10, "train_loss": 2.0 / (i + 1)} for i in range(30)])
    assert main(["replay", str(log), "--target", f"127.0.0.1:{port}"]) == 0
    out = capsys.readouterr().out
    assert "sent 30 points in 1 batches" in out
    assert "30 accepted, 0 rejected" in out
    assert "as run 'small'" in out


def test_watch_prints_events_until_ctrl_c(tmp_path: Path, server: tuple,
                                          grok_run: Path) -> None:
    _, port, _ = server
    target = f"127.0.0.1:{port}"
    out_path, err_path = tmp_path / "watch.out", tmp_path / "watch.err"
    kinds = ["CHANGE_POINT", "phase_change"]
    with out_path.open("w") as out, err_path.open("w") as err:
        watch = subprocess.Popen(
            [*_script(), "watch", "--target", target, "--json",
             *(f"--kind={k}" for k in kinds)],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for(lambda: "watching" in err_path.read_text(), 30, "the watch to start")
        summary_path = tmp_path / "replay.json"
        with summary_path.open("w") as summary_out:
            replay = subprocess.run(
                [*_script(), "replay", str(grok_run), "--target", target, "--json"],
                stdout=summary_out, timeout=60, check=True,
            )
        assert replay.returncode == 0
        told = json.loads(summary_path.read_text())["events"]
        wanted = [e for e in told if e["kind"] in {"CHANGE_POINT", "PHASE_CHANGE"}]
        _wait_for(lambda: len(out_path.read_text().splitlines()) >= len(wanted), 30,
                  f"{len(wanted)} watched events")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=20) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
    seen = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(e["step"], e["kind"]) for e in seen] == [(e["step"], e["kind"]) for e in wanted]
    assert all(e["run_id"] == "grok_add_0" for e in seen)
    assert "Traceback" not in err_path.read_text()


# --- the console script ------------------------------------------------------------


def test_console_script_analyze(grok_run: Path, tmp_path: Path) -> None:
    done = _run("analyze", str(grok_run), "--json")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"segments", "events", "change_points"}
    bad = _run("analyze", str(_bad_line_file(tmp_path)))
    assert bad.returncode == 2
    _one_line_error(bad.stderr, "x.jsonl:17:")


def test_console_script_closed_pipe(grok_run: Path) -> None:
    # `phasewatch analyze ... | head -1`: the reader leaves early; no traceback.
    proc = subprocess.Popen(
        [*_script(), "analyze", str(grok_run), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err


def test_console_script_serve_until_sigterm(tmp_path: Path) -> None:
    serve = subprocess.Popen(
        [*_script(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "",
         "--store", "sqlite://:memory:"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.err").open("w"),
        stdin=subprocess.DEVNULL,
    )
    try:
        log = tmp_path / "serve.err"
        _wait_for(lambda: "listening on" in log.read_text(), 30, "the server to start")
        port = re.search(r"listening on [\d.]+:(\d+)", log.read_text()).group(1)  # type: ignore[union-attr]
        status = _run("status", "nope", "--target", f"127.0.0.1:{port}")
        assert status.returncode == 2
        _one_line_error(status.stderr, "unknown run 'nope'")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
    finally:
        if serve.poll() is None:
            serve.kill()


def test_serve_port_taken_is_one_line(capsys: pytest.CaptureFixture[str],
                                      server: tuple) -> None:
    _, port, _ = server
    code = main(["serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", "",
                 "--store", "sqlite://:memory:"])
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("phasewatch:")]
    assert len(err) == 1 and "listen" in err[0]


# --- demo ------------------------------------------------------------------------


def test_demo_runs_non_interactively() -> None:
    started = time.monotonic()
    done = _run("demo", timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "Final timeline" in done.stdout and "phases" in done.stdout
    assert "Ground truth" in done.stdout
    assert "progress 100%" in done.stderr  # not a TTY: plain progress lines
    assert "Traceback" not in done.stderr
    assert elapsed < 30, f"demo took {elapsed:.1f} s"


def test_demo_in_process_fast(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--speed", "inf", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "Streamed 5004 points" in captured.out
    assert "5004 accepted, 0 rejected" in captured.out
    assert captured.err == ""
