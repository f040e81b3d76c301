"""Test helpers for alerting and metrics: a recording HTTP receiver, and real
Prometheus / Alertmanager processes on free loopback ports.

The binaries are Debian's ``prometheus`` and ``prometheus-alertmanager``
packages (``.ci/run`` installs them). Without them a test is skipped with the
reason, except in CI (``CI=true``), where their absence is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except (OSError, urllib.error.URLError, ValueError) as error:  # not up yet
            last = error
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}"[:2000])
        time.sleep(interval)


def free_port() -> int:
    """A port free on 127.0.0.1 now (the usual small race is acceptable in tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def binary(*names: str) -> str:
    """The first of ``names`` on PATH; skip (fail in CI) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    reason = (f"{names[0]} is not installed (apt-get install prometheus "
              "prometheus-alertmanager; .ci/run does)")
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# --- a recording HTTP receiver -------------------------------------------------------


class Receiver:
    """A stdlib HTTP server on 127.0.0.1 that records POSTed JSON bodies.

    ``statuses`` is a script of answers: each request pops the next status
    (200 once it is empty). Use as a context manager.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: deque[int] = deque()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                    receiver.requests.append({
                        "path": self.path,
                        "headers": dict(self.headers),
                        "json": json.loads(body) if body else None,
                        "status": status,
                        "time": time.time(),
                    })
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, ok_only: bool = True) -> list[Any]:
        with self._lock:
            return [r["json"] for r in self.requests if not ok_only or r["status"] < 300]


# --- real Prometheus and Alertmanager ---------------------------------------------


class _Process:
    """A server process with a readiness URL; restartable on the same port."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n"
                            f"{self.log.read_text()[-3000:]}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200

        wait_for(ready, timeout, f"{self.name} on {self.url} to be ready")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class Alertmanager(_Process):
    """``prometheus-alertmanager`` with a config file, no clustering, in ``workdir``."""

    def __init__(self, workdir: Path, config: Path) -> None:
        super().__init__("alertmanager", workdir)
        self.binary = binary("prometheus-alertmanager", "alertmanager")
        self.config = config

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.path={self.workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip: one instance
            "--log.level=warn",
        ]

    def alerts(self, **matchers: str) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts`` (active, silenced and inhibited; not resolved)."""
        query = urllib.parse.urlencode(
            [("filter", f'{k}="{v}"') for k, v in matchers.items()], doseq=True
        )
        return get_json(f"{self.url}/api/v2/alerts?{query}")


class Prometheus(_Process):
    """``prometheus`` with a generated config, evaluating every ``interval``."""

    def __init__(
        self,
        workdir: Path,
        *,
        targets: list[str],
        rule_files: list[Path],
        alertmanager: str | None = None,
        interval: str = "1s",
    ) -> None:
        super().__init__("prometheus", workdir)
        self.binary = binary("prometheus")
        self.config = workdir / "prometheus.yml"
        lines = [
            "global:",
            f"  scrape_interval: {interval}",
            f"  evaluation_interval: {interval}",
            "rule_files:",
            *[f"  - {json.dumps(str(path))}" for path in rule_files],
            "scrape_configs:",
            "  - job_name: phasewatch",
            "    static_configs:",
            f"      - targets: {json.dumps(targets)}",
        ]
        if alertmanager:
            lines += [
                "alerting:",
                "  alertmanagers:",
                "    - static_configs:",
                f"        - targets: [{json.dumps(alertmanager)}]",
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; fails the test on a PromQL error."""
        answer = get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def api(self, path: str) -> Any:
        answer = get_json(f"{self.url}/api/v1/{path}")
        assert answer["status"] == "success", answer
        return answer["data"]


@contextlib.contextmanager
def running(process: _Process) -> Iterator[_Process]:
    process.start()
    try:
        yield process
    finally:
        process.stop()
