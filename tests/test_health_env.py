"""`phasewatch health` against a real server, and PHASEWATCH_<FLAG> for every serve flag."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health, health_pb2

from detector.auth import server_credentials
from detector.cli import build_parser, env_variable, main
from detector.engine import Engine
from detector.server import create_server
from tests.tlscerts import Certs, make_certs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_health_exit_codes_follow_the_serving_status(capsys) -> None:
    servicer = health.HealthServicer()
    server, port = create_server(Engine(), "127.0.0.1:0", health_servicer=servicer)
    try:
        target = f"127.0.0.1:{port}"
        assert main(["health", "--target", target]) == 0
        assert capsys.readouterr().out == f"{target} phasewatch.v1.PhaseDetector: SERVING\n"
        servicer.set("phasewatch.v1.PhaseDetector", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert main(["health", "--target", target]) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
        assert main(["health", "--target", target, "--service", ""]) == 0  # the whole server
        assert main(["health", "--target", target, "--service", "nope"]) == 1
        assert "SERVICE_UNKNOWN" in capsys.readouterr().out
    finally:
        server.stop(None)
    assert main(["health", "--target", target, "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert "UNREACHABLE" in captured.out and f"no detector listening at {target}" in captured.err


def test_health_over_mutual_tls_from_the_environment(certs: Certs, monkeypatch, capsys) -> None:
    """As an exec probe in a pod would run it: everything from PHASEWATCH_* variables."""
    credentials = server_credentials(certs.server_cert, certs.server_key, certs.ca)
    server, port = create_server(Engine(), "127.0.0.1:0", credentials=credentials)
    try:
        monkeypatch.setenv("PHASEWATCH_LISTEN", f"0.0.0.0:{port}")  # serve's: health derives its target
        assert main(["health", "--timeout", "3"]) == 1  # plaintext to a TLS port
        monkeypatch.setenv("PHASEWATCH_TLS_CA", str(certs.ca))
        assert main(["health", "--timeout", "3"]) == 1  # no client certificate
        monkeypatch.setenv("PHASEWATCH_TLS_CLIENT_CERT", str(certs.client_cert))
        monkeypatch.setenv("PHASEWATCH_TLS_CLIENT_KEY", str(certs.client_key))
        monkeypatch.setenv("PHASEWATCH_TLS_SERVER_NAME", "localhost")
        capsys.readouterr()
        assert main(["health"]) == 0
        assert capsys.readouterr().out == f"127.0.0.1:{port} phasewatch.v1.PhaseDetector: SERVING\n"
    finally:
        server.stop(None)


def test_health_as_a_console_script_starts_without_the_server_modules() -> None:
    code = ("import sys; from detector.cli import main; rc = main(['health', '--target', "
            "'127.0.0.1:1', '--timeout', '1']); "
            "print(sorted(m for m in ('detector.engine', 'detector.server', 'numpy') if m in sys.modules)); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 1
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- PHASEWATCH_<FLAG> -------------------------------------------------------------


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def _seen_by_serve(monkeypatch, argv: list[str]) -> dict[str, Any]:
    import functools

    from detector.server import serve as real_serve

    seen: dict[str, Any] = {}

    @functools.wraps(real_serve)  # cmd_serve reads the real signature through __wrapped__
    def fake_serve(listen, metrics_listen, store, **options):  # noqa: ANN001
        seen.update(listen=listen, metrics_listen=metrics_listen, store=store, **options)

    monkeypatch.setattr("detector.server.serve", fake_serve)
    assert main(["serve", *argv]) == 0
    return seen


def test_every_serve_flag_has_a_variable(monkeypatch) -> None:
    flags = [a.option_strings[0] for a in _serve_parser()._actions
             if a.option_strings and a.option_strings[0].startswith("--") and a.dest != "help"]
    assert len(flags) >= 18
    text = "\n".join(_serve_parser().format_help().split())
    for flag in flags:
        assert f"[${env_variable(flag)}]" in text.replace("\n", " "), flag


def test_variables_set_serve_and_flags_win(monkeypatch, tmp_path: Path) -> None:
    env = {
        "PHASEWATCH_LISTEN": "127.0.0.1:7001", "PHASEWATCH_METRICS_LISTEN": "",
        "PHASEWATCH_STORE": "sqlite://:memory:", "PHASEWATCH_MAX_RUNS": "7",
        "PHASEWATCH_MAX_CONCURRENT_RPCS": "33", "PHASEWATCH_GRACE": "2.5",
        "PHASEWATCH_ALERTMANAGER_URL": "http://am:9093", "PHASEWATCH_METRICS_RETENTION": "30",
        "PHASEWATCH_MAX_POINTS_PER_SECOND": "100", "PHASEWATCH_POINTS_BURST": "50",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = _seen_by_serve(monkeypatch, [])
    assert (seen["listen"], seen["metrics_listen"], seen["store"]) == (
        "127.0.0.1:7001", None, "sqlite://:memory:")
    assert seen["config"].max_runs == 7 and seen["config"].points_burst == 50
    assert seen["max_workers"] == 33 and seen["grace"] == 2.5
    assert seen["alertmanager_url"] == "http://am:9093" and seen["metrics_retention"] == 30.0
    seen = _seen_by_serve(monkeypatch, ["--listen", "127.0.0.1:7002", "--max-runs", "9",
                                        "--grace", "1"])
    assert seen["listen"] == "127.0.0.1:7002" and seen["config"].max_runs == 9
    assert seen["grace"] == 1.0 and seen["max_workers"] == 33


@pytest.mark.parametrize(("variable", "value", "needle"), [
    ("PHASEWATCH_MAX_RUNS", "0", "--max-runs: must be at least 1, got 0 (from $PHASEWATCH_MAX_RUNS)"),
    ("PHASEWATCH_GRACE", "soon", "(from $PHASEWATCH_GRACE)"),
    ("PHASEWATCH_TLS", "maybe", "$PHASEWATCH_TLS='maybe'"),
])
def test_a_bad_variable_is_named(monkeypatch, capsys, variable: str, value: str, needle: str) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr("detector.server.serve", lambda *a, **k: pytest.fail("served"))
    assert main(["serve", "--store", "sqlite://:memory:"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_serve_in_its_own_process_from_the_environment(tmp_path: Path) -> None:
    """The real console path: the variables alone make it listen where they say."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PHASEWATCH_LISTEN": f"127.0.0.1:{port}", "PHASEWATCH_METRICS_LISTEN": "",
           "PHASEWATCH_STORE": f"sqlite:///{tmp_path}/pw.db", "PHASEWATCH_GRACE": "1"}
    serve = subprocess.Popen([sys.executable, "-m", "detector", "serve"], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        probe = [sys.executable, "-m", "detector", "health", "--timeout", "2"]
        for _ in range(60):
            if subprocess.run(probe, env=env, cwd=REPO, capture_output=True).returncode == 0:
                break
            assert serve.poll() is None, serve.stderr.read()
        else:
            pytest.fail("never healthy")
    finally:
        serve.terminate()
        assert serve.wait(30) == 0
    assert (tmp_path / "pw.db").exists()  # $PHASEWATCH_STORE was used


# --- PHASEWATCH_TARGET / PHASEWATCH_DISABLED for the SDK ------------------------------


def test_sdk_target_from_the_environment(make_server, monkeypatch) -> None:
    from detector.client import ClientConfig, Run, connect

    engine, port, _ = make_server()
    monkeypatch.setenv("PHASEWATCH_TARGET", f"127.0.0.1:{port}")
    with connect(None, "env-target", config=ClientConfig(flush_interval=0.02)) as run:
        assert isinstance(run, Run) and run.target == f"127.0.0.1:{port}"
        run.log(1, train_loss=1.0)
        assert run.flush(10)
    assert engine.status("env-target").last_step == 1
    # An explicit target wins over the variable.
    monkeypatch.setenv("PHASEWATCH_TARGET", "127.0.0.1:1")
    with connect(f"127.0.0.1:{port}", "explicit", config=ClientConfig(flush_interval=0.02)) as run:
        run.log(2, train_loss=1.0)
        assert run.flush(10)
    assert engine.status("explicit").last_step == 2


@pytest.mark.parametrize("value", ["1", "true", "YES", "typo"])
def test_sdk_disabled_sends_nothing(make_server, monkeypatch, value: str) -> None:
    from detector.client import DisabledRun, connect
    from detector.errors import NotFound

    engine, port, _ = make_server()
    monkeypatch.setenv("PHASEWATCH_DISABLED", value)
    with connect(f"127.0.0.1:{port}", "off") as run:
        assert isinstance(run, DisabledRun)
        assert run.log(1, train_loss=1.0) and run.flush() and run.poll_events() == []
        assert list(run.events(timeout=0.01)) == [] and run.stats.logged == 0
    assert run.closed
    with pytest.raises(NotFound):
        engine.status("off")
    with connect(f"127.0.0.1:{port}", "on", disabled=False) as run:  # the argument wins
        assert not isinstance(run, DisabledRun)


@pytest.mark.parametrize("value", ["0", "false", "", "off"])
def test_sdk_enabled_values(monkeypatch, value: str) -> None:
    from detector.client import disabled_by_env

    monkeypatch.setenv("PHASEWATCH_DISABLED", value)
    assert not disabled_by_env()
