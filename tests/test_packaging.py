"""The install's shape: a light client SDK, one version, help texts that match the server.

The sdist -> wheel build and the installs in fresh venvs are in ``.ci/run``
(they download build dependencies: too slow for a test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import detector

REPO = Path(__file__).resolve().parents[1]
SERVER_STACK = ("scipy", "ruptures", "numba", "statsmodels", "pandas", "prometheus_client")


def imported_after(statements: str, before: str = "") -> set[str]:
    """Top-level modules that ``statements`` imports, in a fresh interpreter, beyond ``before``'s."""
    code = (
        "import json, sys\n"
        f"{before}\n"
        "old = set(sys.modules)\n"
        f"{statements}\n"
        "print(json.dumps(sorted({m.partition('.')[0] for m in set(sys.modules) - old})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["detector.client", "detector.integrations._common",
                                    "detector.spectral", "detector.cli"])
def test_the_sdk_does_not_import_the_server_stack(module: str) -> None:
    new = imported_after(f"import {module}")
    assert not new & set(SERVER_STACK), f"{module} imports {sorted(new & set(SERVER_STACK))}"


def test_the_probe_does_not_import_the_server_stack() -> None:
    pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[torch]'")
    new = imported_after("import detector.probe", before="import torch")
    assert not new & set(SERVER_STACK), sorted(new & set(SERVER_STACK))


@pytest.mark.parametrize(("module", "framework"), [
    ("detector.integrations.lightning", "lightning"),
    ("detector.integrations.huggingface", "transformers"),
])
def test_the_integrations_add_nothing_of_the_server_stack(module: str, framework: str) -> None:
    """Beyond what the framework itself imports (Lightning imports scipy)."""
    pytest.importorskip(framework, reason=f"{framework} is not installed (the [lightning] and "
                        "[huggingface] extras)")
    new = imported_after(f"import {module}", before=f"import {framework}")
    assert not new & set(SERVER_STACK), sorted(new & set(SERVER_STACK))


def test_one_version_source() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "detector.__version__"' in text
    assert "\nversion =" not in text.split("[project]", 1)[1].split("\n[", 1)[0]
    from importlib.metadata import PackageNotFoundError, version

    try:  # the venv's install of this checkout, when there is one
        installed = version("phasewatch")
    except PackageNotFoundError:
        return
    assert installed == detector.__version__


def test_typed_and_the_sdist_carries_proto() -> None:
    assert (REPO / "detector" / "py.typed").exists()
    manifest = (REPO / "MANIFEST.in").read_text()
    assert "graft proto" in manifest


def test_cli_help_defaults_are_the_servers() -> None:
    from detector import cli, guard, server
    from detector.engine import EngineConfig
    from detector.replay import DEFAULT_BATCH_POINTS

    assert cli.DEFAULT_MAX_MESSAGE_BYTES == server.DEFAULT_MAX_MESSAGE_BYTES
    assert cli.DEFAULT_MAX_WORKERS == server.DEFAULT_MAX_WORKERS
    assert EngineConfig.max_series_per_run == cli.DEFAULT_MAX_SERIES_PER_RUN
    assert EngineConfig.max_runs == cli.DEFAULT_MAX_RUNS
    assert cli.DEFAULT_BATCH_POINTS == DEFAULT_BATCH_POINTS
    assert cli.DEFAULT_MAX_STREAMS_PER_PEER == guard.DEFAULT_MAX_STREAMS_PER_PEER
    assert cli.DEFAULT_MAX_UNARY == guard.DEFAULT_MAX_UNARY
    assert cli.DEFAULT_STREAM_IDLE_TIMEOUT == guard.DEFAULT_STREAM_IDLE_TIMEOUT


def test_server_commands_without_the_server_extra_say_what_to_install(tmp_path: Path) -> None:
    """A client install: the server's modules are hidden from a fresh interpreter."""
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {SERVER_STACK!r}: raise ModuleNotFoundError(name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from detector.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for args in (["serve", "--store", "sqlite://:memory:"], ["demo", "--no-progress"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
        assert out.returncode == 2, out.stderr
        assert "pip install 'phasewatch[server]'" in out.stderr and "Traceback" not in out.stderr
    # The client commands still work: health answers "nothing there", not an ImportError.
    out = subprocess.run([sys.executable, "-c", code, "health", "--target", "127.0.0.1:1",
                          "--timeout", "2"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1 and "UNREACHABLE" in out.stdout, out.stderr
