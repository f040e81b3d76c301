"""Bearer-token authentication for the detector's gRPC server.

``phasewatch serve --auth-token-file PATH`` installs a
:class:`BearerTokenInterceptor`: every RPC must carry the metadata
``authorization: Bearer <token>`` with one of the tokens in the file, or it is
answered ``UNAUTHENTICATED`` before any handler runs, and before its request
is even parsed. That covers the PhaseDetector service, ``WatchEvents``,
server reflection and any method the server does not have (so that an
unauthenticated caller cannot tell which exist). The one exception is the
standard health service (``grpc.health.v1.Health``): Kubernetes' native gRPC
probes and the image's ``HEALTHCHECK`` cannot send a token, and health says
nothing about runs.

The token file holds one token per line (blank lines and ``#`` comments are
ignored), so that a new token can be added before clients move to it and the
old one removed afterwards. The file is re-read when it changes (checked at
most every ``reload_interval`` seconds), as a Kubernetes Secret mounted as a
volume is updated in place. Tokens are compared in constant time
(:func:`hmac.compare_digest`), against every configured token, whatever
matches first.

The token travels in metadata: use it over TLS (``--tls-cert``/``--tls-key``)
or inside a network that encrypts (a service mesh), never in the clear.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from detector.errors import InvalidArgument, Unauthenticated
from detector.status import abort

log = logging.getLogger("phasewatch.auth")

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
SCHEME = "bearer"
# Services answered without a token: health probes cannot send one.
EXEMPT_SERVICES: tuple[str, ...] = ("grpc.health.v1.Health",)


def parse_tokens(text: str, source: str = "the token file") -> tuple[bytes, ...]:
    """The tokens in a token file's text: one a line, ``#`` comments and blanks skipped.

    >>> parse_tokens("# rotated 2024-05\\nold-token\\n\\nnew-token\\n")
    (b'old-token', b'new-token')
    >>> parse_tokens("two words")
    Traceback (most recent call last):
    ...
    detector.errors.InvalidArgument: the token file line 1: a token must be printable ASCII without spaces
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
            raise InvalidArgument(
                f"{source} line {number}: a token must be printable ASCII without spaces"
            )
        tokens.append(token.encode("ascii"))
    if not tokens:
        raise InvalidArgument(f"{source} has no token")
    return tuple(tokens)


def read_token_file(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    """The tokens of a token file; raises InvalidArgument when it cannot be used."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise InvalidArgument(f"cannot read the token file {os.fspath(path)}: {reason}") from None
    return parse_tokens(text, f"the token file {os.fspath(path)}")


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        if isinstance(value, str):
            value = value.encode("utf-8", "replace")
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == SCHEME.encode() and token.strip():
            return token.strip()
    return None


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Answers ``UNAUTHENTICATED`` to every RPC without a valid bearer token.

    Give ``tokens`` (for tests and embedding) or ``token_file`` (re-read when
    its modification time changes). Methods of ``exempt_services`` pass
    without a token.
    """

    def __init__(
        self,
        tokens: Sequence[str | bytes] = (),
        *,
        token_file: str | os.PathLike[str] | None = None,
        reload_interval: float = 5.0,
        exempt_services: Sequence[str] = EXEMPT_SERVICES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (token_file is None) == (not tokens):
            raise InvalidArgument("give either tokens or a token file")
        self._file = None if token_file is None else os.fspath(token_file)
        if self._file is not None:
            self._tokens = read_token_file(self._file)
            self._mtime = _mtime(self._file)
        else:
            self._tokens = parse_tokens(
                "\n".join(t.decode() if isinstance(t, bytes) else t for t in tokens), "tokens"
            )
            self._mtime = None
        self._reload_interval = reload_interval
        self._clock = clock
        self._checked = clock()
        self._lock = threading.Lock()
        self._exempt = tuple(f"/{service}/" for service in exempt_services)
        self.denied = 0  # RPCs answered UNAUTHENTICATED

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self._valid(token):
            return continuation(handler_call_details)
        with self._lock:
            self.denied += 1
        problem = "missing bearer token" if token is None else "invalid bearer token"
        return _deny(continuation(handler_call_details), f"{problem} (authorization: Bearer …)")

    def valid(self, token: bytes) -> bool:
        """Whether ``token`` is one of the current tokens (constant time; for /metrics too)."""
        return self._valid(token)

    def _valid(self, token: bytes) -> bool:
        tokens = self._current_tokens()
        # Compare with every token, so the time taken does not say which one is close.
        matches = [hmac.compare_digest(token, known) for known in tokens]
        return any(matches)

    def _current_tokens(self) -> tuple[bytes, ...]:
        if self._file is None:
            return self._tokens
        now = self._clock()
        with self._lock:
            if now - self._checked < self._reload_interval:
                return self._tokens
            self._checked = now
            mtime = _mtime(self._file)
            if mtime is not None and mtime != self._mtime:
                try:
                    self._tokens = read_token_file(self._file)
                    log.info("re-read the token file %s", self._file)
                except InvalidArgument as error:  # keep the tokens that worked
                    log.warning("%s; keeping the previous tokens", error)
                self._mtime = mtime
            return self._tokens


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _deny(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts UNAUTHENTICATED.

    It takes the request as raw bytes: nothing from an unauthenticated caller
    is parsed.
    """

    def refuse(_request: Any, context: grpc.ServicerContext) -> None:
        abort(context, Unauthenticated(message))

    if handler is None:  # an unknown method: do not tell it apart from a known one
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def server_credentials(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    client_ca_file: str | os.PathLike[str] | None = None,
) -> grpc.ServerCredentials:
    """TLS for the server from PEM files; with ``client_ca_file``, mutual TLS.

    With a client CA, a client must present a certificate signed by it (the
    handshake fails otherwise: the client sees ``UNAVAILABLE``).
    """

    def read(path: str | os.PathLike[str], what: str) -> bytes:
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as error:
            raise InvalidArgument(
                f"cannot read the {what} {os.fspath(path)}: {error.strerror or error}"
            ) from None

    ca = None if client_ca_file is None else read(client_ca_file, "client CA")
    return grpc.ssl_server_credentials(
        [(read(key_file, "TLS key"), read(cert_file, "TLS certificate"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )
