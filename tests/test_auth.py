"""Auth and transport (issue 8, item 3): bearer tokens checked by an
interceptor, TLS and mutual TLS with real handshakes on loopback, the SDK and
the CLI on both, and ``phasewatch serve`` with every new flag."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import detector.auth
from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.auth import BearerTokenInterceptor, parse_tokens, read_token_file, server_credentials
from detector.cli import main
from detector.client import ClientConfig, ClientConfigError, connect, read_token, tls_credentials
from detector.errors import InvalidArgument
from detector.logfile import write_jsonl
from detector.server import RETRY_AFTER_KEY, SERVICE_NAME
from tests.tlscerts import Certs, make_certs

TIMEOUT = 10.0
TOKEN = "s3cret-token"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"# the detector's token\n{TOKEN}\n")
    return path


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def health_status(channel: grpc.Channel, metadata=None) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT,
                      metadata=metadata).status


def every_rpc(channel: grpc.Channel, metadata) -> dict[str, Callable[[], object]]:
    """One call of each RPC the server has, plus reflection and a method it has not."""
    stub = pb_grpc.PhaseDetectorStub(channel)
    batch = pb.MetricBatch(series=[pb.Series(name="loss", steps=[1], values=[1.0])])
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    unknown = channel.unary_unary(f"/{SERVICE_NAME}/NoSuchMethod")
    kw = {"timeout": TIMEOUT, "metadata": metadata}
    return {
        "Log": lambda: stub.Log(pb.LogRequest(run_id="r", batch=batch), **kw),
        "Stream": lambda: list(stub.Stream(iter([pb.StreamRequest(
            start=pb.RunStart(run_id="s"))]), **kw)),
        "GetPhase": lambda: stub.GetPhase(pb.GetPhaseRequest(run_id="r"), **kw),
        "GetTimeline": lambda: stub.GetTimeline(pb.GetTimelineRequest(run_id="r"), **kw),
        "ListRuns": lambda: stub.ListRuns(pb.ListRunsRequest(), **kw),
        "WatchEvents": lambda: next(stub.WatchEvents(pb.WatchEventsRequest(), **kw)),
        "reflection": lambda: list(reflection.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]), **kw)),
        "unknown-method": lambda: unknown(b"", **kw),
    }


# --- the bearer token ------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-token"),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", TOKEN),),
        (("authorization", "Bearer "),),
        (("x-token", TOKEN),),
    ],
    ids=["none", "wrong", "longer", "other-scheme", "no-scheme", "empty", "other-header"],
)
def test_every_rpc_without_the_token_is_unauthenticated(make_server, metadata) -> None:
    interceptor = BearerTokenInterceptor([TOKEN])
    engine, _, channel = make_server(interceptors=[interceptor])
    calls = every_rpc(channel, metadata)
    for name, call in calls.items():
        assert code_of(call) == UNAUTHENTICATED, name
    assert interceptor.denied == len(calls)
    assert engine.list_runs() == []  # nothing reached the engine
    # Health answers without a token: probes cannot send one.
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_right_token_passes(make_server) -> None:
    engine, _, channel = make_server(interceptors=[BearerTokenInterceptor([TOKEN])])
    for scheme in ("Bearer", "bearer"):
        calls = every_rpc(channel, (("authorization", f"{scheme} {TOKEN}"),))
        response = calls["Log"]()
        assert response.ack.accepted in (0, 1)  # the second time, a resent point
        calls["ListRuns"]()
        calls["GetPhase"]()
        calls["GetTimeline"]()
        calls["Stream"]()
        calls["reflection"]()
        assert code_of(calls["unknown-method"]) == grpc.StatusCode.UNIMPLEMENTED
    assert [r.run_id for r in engine.list_runs()] == ["r", "s"]


def test_tokens_are_compared_in_constant_time_against_each(monkeypatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = detector.auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(detector.auth.hmac, "compare_digest", spy)
    interceptor = BearerTokenInterceptor(["first", "second"])
    assert interceptor._valid(b"first")
    assert compared == [(b"first", b"first"), (b"first", b"second")]  # no early exit


def test_token_file_rotation_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("old\n")
    clock = [0.0]
    interceptor = BearerTokenInterceptor(token_file=path, reload_interval=1.0,
                                         clock=lambda: clock[0])
    assert interceptor._valid(b"old") and not interceptor._valid(b"new")
    path.write_text("old\nnew\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not interceptor._valid(b"new")  # not re-read before the interval
    clock[0] = 2.0
    assert interceptor._valid(b"new") and interceptor._valid(b"old")
    path.write_text("")  # a broken update keeps the tokens that worked
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    clock[0] = 4.0
    assert interceptor._valid(b"new")


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "two words\n", "caf\u00e9\n"])
def test_unusable_token_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(InvalidArgument):
        read_token_file(path)
    with pytest.raises(InvalidArgument):
        BearerTokenInterceptor(token_file=path)
    with pytest.raises(InvalidArgument):
        read_token_file(tmp_path / "missing")
    assert parse_tokens(" padded \n") == (b"padded",)


def test_client_token_sources(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "token"
    path.write_text("# comment\nfrom-file\nsecond\n")
    monkeypatch.setenv("PHASEWATCH_TOKEN", "from-env")
    assert read_token("explicit", path) == "explicit"
    assert read_token(None, path) == "from-file"
    assert read_token() == "from-env"
    monkeypatch.delenv("PHASEWATCH_TOKEN")
    assert read_token() is None
    with pytest.raises(ClientConfigError):
        read_token(None, tmp_path / "missing")
    with pytest.raises(ClientConfigError):
        read_token("has space")


# --- TLS and mutual TLS ------------------------------------------------------------


def _log_over(channel: grpc.Channel, run_id: str = "tls-run", metadata=None) -> pb.LogResponse:
    request = pb.LogRequest(run_id=run_id, batch=pb.MetricBatch(
        series=[pb.Series(name="loss", steps=[1, 2, 3, 4], values=[1.0, 0.5, 0.4, 0.3])]))
    return pb_grpc.PhaseDetectorStub(channel).Log(request, timeout=TIMEOUT, metadata=metadata)


@pytest.fixture
def channels() -> Iterator[Callable[..., grpc.Channel]]:
    opened: list[grpc.Channel] = []

    def open_channel(port: int, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        target = f"localhost:{port}"
        channel = (grpc.insecure_channel(target) if credentials is None
                   else grpc.secure_channel(target, credentials))
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


def test_tls_handshake(make_server, certs: Certs, channels) -> None:
    _, port, _ = make_server(credentials=server_credentials(certs.server_cert, certs.server_key))
    assert _log_over(channels(port, tls_credentials(certs.ca))).ack.accepted == 4
    # Plaintext to a TLS port, or a server the client's CA did not sign: no connection.
    assert code_of(lambda: _log_over(channels(port))) == grpc.StatusCode.UNAVAILABLE
    rogue = channels(port, tls_credentials(certs.rogue_ca))
    assert code_of(lambda: _log_over(rogue)) == grpc.StatusCode.UNAVAILABLE
    assert _log_over(channels(port, tls_credentials(certs.ca.read_bytes()))).ack.accepted == 4


def test_mutual_tls(make_server, certs: Certs, channels) -> None:
    credentials = server_credentials(certs.server_cert, certs.server_key, certs.ca)
    engine, port, _ = make_server(credentials=credentials)
    without = channels(port, tls_credentials(certs.ca))
    assert code_of(lambda: _log_over(without)) == grpc.StatusCode.UNAVAILABLE
    untrusted = channels(port, tls_credentials(certs.ca, certs.rogue_client_cert,
                                               certs.rogue_client_key))
    assert code_of(lambda: _log_over(untrusted)) == grpc.StatusCode.UNAVAILABLE
    trusted = channels(port, tls_credentials(certs.ca, certs.client_cert, certs.client_key))
    assert _log_over(trusted).ack.accepted == 4
    assert engine.status("tls-run").last_step == 4
    with pytest.raises(ClientConfigError):
        tls_credentials(certs.ca, certs.client_cert)  # a certificate needs its key


def test_sdk_over_mutual_tls_with_a_token(make_server, certs: Certs, token_file: Path) -> None:
    engine, port, _ = make_server(
        credentials=server_credentials(certs.server_cert, certs.server_key, certs.ca),
        interceptors=[BearerTokenInterceptor(token_file=token_file)],
    )
    tls = {"tls_root_ca": certs.ca, "tls_client_cert": certs.client_cert,
           "tls_client_key": certs.client_key}
    with connect(f"localhost:{port}", "sdk-run", token_file=token_file, **tls) as run:
        for step in range(50):
            run.log(step, train_loss=1.0 / (1 + step))
        assert run.flush(timeout=TIMEOUT)
    assert run.stats.acknowledged == 50
    assert engine.status("sdk-run").last_step == 49
    # A wrong token: nothing is acknowledged, and nothing reaches the detector.
    config = ClientConfig(reconnect_initial_backoff=0.05, reconnect_max_backoff=0.1)
    refused = connect(f"localhost:{port}", "refused-run", token="wrong", config=config, **tls)
    refused.log(0, train_loss=1.0)
    assert not refused.flush(timeout=1.0)
    refused.close(timeout=0.1)
    assert refused.stats.acknowledged == 0
    assert [r.run_id for r in engine.list_runs()] == ["sdk-run"]
    with pytest.raises(ClientConfigError):
        connect(f"localhost:{port}", "x", tls=True, credentials=tls_credentials(certs.ca))


def test_cli_clients_with_tls_and_a_token(make_server, certs: Certs, token_file: Path,
                                          tmp_path: Path, capsys, monkeypatch) -> None:
    engine, port, _ = make_server(
        credentials=server_credentials(certs.server_cert, certs.server_key, certs.ca),
        interceptors=[BearerTokenInterceptor(token_file=token_file)],
    )
    monkeypatch.delenv("PHASEWATCH_TOKEN", raising=False)
    monkeypatch.delenv("PHASEWATCH_TOKEN_FILE", raising=False)
    log = tmp_path / "run.jsonl"
    write_jsonl(log, [{"step": s, "train_loss": 1.0 / (1 + s)} for s in range(30)])
    tls = ["--target", f"localhost:{port}", "--tls-ca", str(certs.ca),
           "--tls-client-cert", str(certs.client_cert), "--tls-client-key", str(certs.client_key)]
    assert main(["replay", str(log), "--run-id", "cli-run", *tls,
                 "--token-file", str(token_file), "--json"]) == 0
    assert engine.status("cli-run").last_step == 29
    capsys.readouterr()
    assert main(["status", "cli-run", *tls, "--token-file", str(token_file), "--json"]) == 0
    assert '"last_step": 29' in capsys.readouterr().out
    # Without the token: a one-line refusal, exit 2; for every client command.
    for argv in (["status", "cli-run"], ["runs"], ["watch"], ["replay", str(log)]):
        assert main([*argv, *tls]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("phasewatch: ") and "refused the request" in err, err
        assert "missing bearer token" in err
    monkeypatch.setenv("PHASEWATCH_TOKEN", TOKEN)  # the environment's token
    assert main(["runs", *tls, "--json"]) == 0
    assert "cli-run" in capsys.readouterr().out
    # Without the client certificate the handshake fails: said in one line, exit 1.
    assert main(["runs", "--target", f"localhost:{port}", "--tls-ca", str(certs.ca)]) == 1
    assert "TLS handshake" in capsys.readouterr().err


# --- phasewatch serve with the new flags --------------------------------------------


def _script() -> str:
    script = Path(sys.executable).with_name("phasewatch")
    if not script.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"console script {script} is not installed")
        pytest.skip(f"console script {script} is not installed (pip install -e '.[dev]')")
    return str(script)


def start_serve(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, int, Path]:
    """``phasewatch serve`` on a free port; returns the process, the port and its log."""
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [_script(), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "", *flags],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (found := re.search(r"listening on [\d.]+:(\d+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"serve did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return process, int(found.group(1)), log


def test_serve_with_auth_tls_and_limits(tmp_path: Path, certs: Certs, token_file: Path) -> None:
    process, port, log = start_serve(
        tmp_path, "--store", f"sqlite:///{tmp_path / 'pw.db'}",
        "--auth-token-file", str(token_file),
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-client-ca", str(certs.ca),
        "--max-series-per-run", "2", "--max-runs", "2", "--max-message-bytes", "4096",
        # 100 points at once, then 20 a second: 5 s before another 100 fit.
        "--max-points-per-second", "20", "--points-burst", "100", "--grace", "1",
    )
    channel = grpc.secure_channel(
        f"localhost:{port}", tls_credentials(certs.ca, certs.client_cert, certs.client_key)
    )
    try:
        auth = (("authorization", f"Bearer {TOKEN}"),)
        stub = pb_grpc.PhaseDetectorStub(channel)

        def log_points(run_id: str, names: str, n: int, metadata=auth) -> pb.LogResponse:
            batch = pb.MetricBatch(series=[
                pb.Series(name=name, steps=list(range(n)), values=[1.0] * n) for name in names
            ])
            return stub.Log(pb.LogRequest(run_id=run_id, batch=batch), timeout=TIMEOUT,
                            metadata=metadata)

        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING  # no token
        assert code_of(lambda: log_points("a", "x", 1, metadata=None)) == UNAUTHENTICATED
        assert log_points("a", "xy", 10).ack.accepted == 20
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(lambda: log_points("a", "xyz", 1)) == exhausted  # series per run
        assert code_of(lambda: log_points("b", "x", 500)) == exhausted  # message size
        assert log_points("b", "x", 1).ack.accepted == 1
        assert code_of(lambda: log_points("c", "x", 1)) == exhausted  # runs
        log_points("b", "x", 99)  # the rest of b's first second
        with pytest.raises(grpc.RpcError) as info:
            log_points("b", "x", 100)  # points per second
        assert info.value.code() == exhausted
        assert RETRY_AFTER_KEY in dict(info.value.trailing_metadata())
    finally:
        channel.close()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, log.read_text()
    assert "TLS, bearer token required" in log.read_text()


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--auth-token-file", "{tmp}/missing"], "cannot read the token file"),
        (["--auth-token-file", "{tmp}/empty"], "has no token"),
        (["--max-runs", "0"], "at least 1"),
        (["--max-points-per-second", "-3"], "greater than 0"),
        (["--points-burst", "10"], "--points-burst needs --max-points-per-second"),
    ],
)
def test_serve_refuses_bad_flags(tmp_path: Path, capsys, flags: list[str], needle: str) -> None:
    (tmp_path / "empty").write_text("\n")
    argv = ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--store", "sqlite://:memory:", *(f.format(tmp=tmp_path) for f in flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_the_kubernetes_settings_are_serve_flags(monkeypatch) -> None:
    """deploy/k8s sets serve's flags as PHASEWATCH_<FLAG> in its ConfigMap (the token
    file at the Secret's mount): they must parse as those flags."""
    from detector.cli import build_parser

    k8s = Path(__file__).resolve().parents[1] / "deploy/k8s"
    deployment = (k8s / "deployment.yaml").read_text()
    assert "args:" not in deployment
    assert "mountPath: /etc/phasewatch/auth" in deployment and "path: auth-token" in deployment
    settings = dict(re.findall(r'^  (PHASEWATCH_\w+): "(.*)"$', (k8s / "configmap.yaml").read_text(),
                               flags=re.MULTILINE))
    assert settings["PHASEWATCH_AUTH_TOKEN_FILE"] == "/etc/phasewatch/auth/auth-token"
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    parsed = build_parser().parse_args(["serve"])
    assert parsed.auth_token_file == "/etc/phasewatch/auth/auth-token"
    assert parsed.alertmanager_url.startswith("http://alertmanager")
    assert parsed.grace == 5.0 and parsed.listen == "0.0.0.0:50051"
