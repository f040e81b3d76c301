"""Credentials: bearer tokens (argument, file, ``$PHASEWATCH_TOKEN``), TLS, the token interceptor."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc

from detector.client._settings import TOKEN_ENV, ClientConfigError


def read_token(token: str | None = None, token_file: str | os.PathLike[str] | None = None) -> str | None:
    """The bearer token to send: ``token``, else the first token in ``token_file``,
    else ``$PHASEWATCH_TOKEN``, else None (no token).

    A token file is the detector's format: one token a line, ``#`` comments.
    """
    if token:
        _check_token(token, "token")
        return token
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ClientConfigError(f"cannot read the token file {os.fspath(token_file)}: {reason}") from None
        for line in lines:
            if line.strip() and not line.strip().startswith("#"):
                _check_token(line.strip(), f"the token in {os.fspath(token_file)}")
                return line.strip()
        raise ClientConfigError(f"the token file {os.fspath(token_file)} has no token")
    return os.environ.get(TOKEN_ENV) or None


def _check_token(token: str, what: str) -> None:
    if not isinstance(token, str) or not token.isascii() or not token.isprintable() or (
        any(c.isspace() for c in token)
    ):
        raise ClientConfigError(f"{what} must be printable ASCII without spaces")


def tls_credentials(
    root_ca: str | os.PathLike[str] | bytes | None = None,
    client_cert: str | os.PathLike[str] | bytes | None = None,
    client_key: str | os.PathLike[str] | bytes | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files (paths) or PEM bytes.

    ``root_ca`` verifies the detector's certificate (None: the system's
    roots); ``client_cert`` and ``client_key`` (together) are for a detector
    that requires mutual TLS (``phasewatch serve --tls-client-ca``).
    """
    if (client_cert is None) != (client_key is None):
        raise ClientConfigError("client_cert and client_key go together")

    def pem(source: str | os.PathLike[str] | bytes | None, what: str) -> bytes | None:
        if source is None or isinstance(source, bytes):
            return source
        try:
            with open(source, "rb") as file:
                return file.read()
        except OSError as error:
            raise ClientConfigError(
                f"cannot read the {what} {os.fspath(source)}: {error.strerror or error}"
            ) from None

    return grpc.ssl_channel_credentials(
        root_certificates=pem(root_ca, "root CA"),
        private_key=pem(client_key, "client key"),
        certificate_chain=pem(client_cert, "client certificate"),
    )


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        return _CallDetails(
            details.method, details.timeout, [*metadata, self._entry], details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def bearer_interceptor(token: str) -> grpc.UnaryUnaryClientInterceptor:
    """A client interceptor sending ``token`` with every call, for ``grpc.intercept_channel``.

    >>> import grpc
    >>> channel = grpc.intercept_channel(grpc.insecure_channel("127.0.0.1:1"), bearer_interceptor("t"))
    >>> channel.close()
    """
    _check_token(token, "token")
    return _BearerToken(token)
