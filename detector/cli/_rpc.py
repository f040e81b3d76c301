"""Talking to a detector: a channel with the flags' TLS and token, a stub, and
one line for each way an RPC can fail. Imported by the client commands when
they run (grpc is not needed to build the parser)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.cli._common import DEFAULT_MAX_MESSAGE_BYTES, EXIT_USAGE, CliError
from detector.client import ClientConfigError, bearer_interceptor, read_token, tls_credentials


@contextmanager
def _channel(
    args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()
) -> Iterator[tuple[grpc.Channel, bool]]:
    """A fresh channel to ``args.target`` with the TLS and token of the flags,
    and whether it is TLS."""
    tls = bool(args.tls or args.tls_ca or args.tls_client_cert or args.tls_client_key)
    try:
        token = read_token(token_file=args.token_file)
        credentials = (
            tls_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key) if tls else None
        )
    except ClientConfigError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    # Pages are cut at 2 MiB, but a single RunPhase or event may be larger than
    # that: allow what the server can send (its own default request limit).
    options = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES), *options]
    channel = (
        grpc.secure_channel(args.target, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(args.target, options=options)
    )
    closable = channel
    if token is not None:
        channel = grpc.intercept_channel(channel, bearer_interceptor(token))
    try:
        yield channel, tls
    finally:
        closable.close()


@contextmanager
def _detector(args: argparse.Namespace, timeout: float | None) -> Iterator[pb_grpc.PhaseDetectorStub]:
    """A stub on a fresh channel (TLS and token from the flags); RPC failures
    become one-line CliErrors."""
    with _channel(args) as (channel, tls):
        try:
            yield pb_grpc.PhaseDetectorStub(channel)
        except grpc.RpcError as error:
            raise rpc_problem(error, args.target, timeout, tls=tls) from None


def rpc_problem(
    error: grpc.RpcError, target: str, timeout: float | None = None, *, tls: bool = False
) -> CliError:
    """The one-line message and exit code for a failed RPC."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if tls:  # a refused handshake looks like nothing listening: say both
            return CliError(
                f"no detector listening at {target}, or the TLS handshake failed ({details})"
            )
        return CliError(f"no detector listening at {target}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CliError(f"the detector at {target} refused the request: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g} s" if timeout is not None else " in time"
        return CliError(f"no answer from the detector at {target}{within}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        return CliError(details or code.name.lower(), EXIT_USAGE)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"the detector at {target} refused the request: {details}", EXIT_USAGE)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(f"{target} does not implement this call (is it a phasewatch detector?)")
    return CliError(f"the detector at {target} failed: {code.name}: {details}")
