"""Throw-away certificates for real TLS handshakes on loopback.

Made with the ``openssl`` binary (the ``cryptography`` package is not a
dependency; ``.ci/run`` installs openssl when missing). In CI its absence is a
failure, elsewhere a skip. EC P-256 keys: fast to make.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for ``localhost`` and ``127.0.0.1``,
    a client certificate from the same CA, and one from an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("openssl") is None:
        why = "the openssl binary is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=60)

    def ca(name: str) -> None:
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=phasewatch test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(name: str, issuer: str, usage: str, san: str) -> None:
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(
            f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\nsubjectAltName={san}\n"
        )
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.pem", "-CAkey", f"{issuer}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")

    ca("ca")
    ca("rogue-ca")
    leaf("server", "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    leaf("client", "ca", "clientAuth", "DNS:client")
    leaf("rogue-client", "rogue-ca", "clientAuth", "DNS:client")
    return _certs(folder)


def _certs(folder: Path) -> Certs:
    return Certs(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        rogue_ca=folder / "rogue-ca.pem",
        rogue_client_cert=folder / "rogue-client.pem",
        rogue_client_key=folder / "rogue-client.key",
    )
