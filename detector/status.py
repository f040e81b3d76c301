"""The one table from domain errors to gRPC status codes, and the abort that uses it.

Everything on the server side that ends a call with an error status (the
servicer, the stream guard, the auth interceptor) raises or passes a
:class:`~detector.errors.PhasewatchError` through :func:`abort`, so a code is
chosen in exactly one place: :data:`STATUS_CODES`. A class not in the table
takes its nearest ancestor's code (``RateLimited`` -> ``ResourceExhausted``);
one with none is ``UNKNOWN``, and a non-domain exception is ``INTERNAL``.
O(depth of the class hierarchy) per error.

Imports grpc only (google.rpc on the first rich status), so the guard and the
auth interceptor can use it without importing the servicer or the engine.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc

from detector.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PhasewatchError,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("phasewatch.server")

# The one table from domain exceptions to gRPC status codes.
STATUS_CODES: dict[type[PhasewatchError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    # A run whose stream is open on another replica: retryable, unlike
    # FAILED_PRECONDITION, since it clears by itself when that stream ends.
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,  # the store is down: retry
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def status_code(error: PhasewatchError) -> grpc.StatusCode:
    """The status for a domain error: its nearest class in :data:`STATUS_CODES`."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.UNKNOWN


# Trailing metadata of a RESOURCE_EXHAUSTED that clears by itself (a rate limit):
# how long to wait, in whole milliseconds. Kept for clients older than the
# google.rpc.RetryInfo detail, which carries the same delay.
RETRY_AFTER_KEY = "phasewatch-retry-after-ms"
# ErrorInfo's domain and reasons (AIP-193): machine-readable causes clients can test.
ERROR_DOMAIN = "phasewatch.dev"
REASON_RUN_OWNED = "RUN_OWNED"
REASON_RATE_LIMITED = "RATE_LIMITED"


class _RichStatus(grpc.Status):
    """A status with details for ``context.abort_with_status``."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def rich_status(error: PhasewatchError) -> grpc.Status | None:
    """The google.rpc.Status (RetryInfo, ErrorInfo) for errors that carry details, else None.

    Sent as the standard ``grpc-status-details-bin`` trailer (grpcio-status), so any
    gRPC client library can read it.
    """
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    code = status_code(error)
    details: list[Any] = []
    extra: tuple[tuple[str, str | bytes], ...] = ()
    if isinstance(error, RateLimited):
        millis = max(1, round(error.retry_after * 1000))
        delay = duration_pb2.Duration(seconds=millis // 1000, nanos=(millis % 1000) * 1_000_000)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(error_details_pb2.ErrorInfo(reason=REASON_RATE_LIMITED, domain=ERROR_DOMAIN))
        extra = ((RETRY_AFTER_KEY, str(millis)),)
    elif isinstance(error, Aborted):
        metadata = {k: v for k, v in (("owner", error.owner), ("run_id", error.run_id)) if v}
        details.append(error_details_pb2.ErrorInfo(
            reason=REASON_RUN_OWNED, domain=ERROR_DOMAIN, metadata=metadata))
    else:
        return None
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    message = status_pb2.Status(code=code.value[0], message=str(error), details=packed)
    return _RichStatus(
        code, str(error), (("grpc-status-details-bin", message.SerializeToString()), *extra)
    )


def abort(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    """End the call with the status for ``error`` (raises, as ``context.abort`` does).

    A :class:`~detector.errors.PhasewatchError` gets its code from
    :data:`STATUS_CODES` and its message as the details (plus RetryInfo or
    ErrorInfo where :func:`rich_status` has some); anything else is a bug:
    logged with its traceback here, INTERNAL naming only its type to the client.
    """
    if isinstance(error, PhasewatchError):
        status = rich_status(error)
        if status is not None:
            context.abort_with_status(status)
        context.abort(status_code(error), str(error))
    # A bug, not bad input: keep the traceback here, do not leak it to the client.
    log.error("unexpected error in an RPC", exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__})")
    raise AssertionError("context.abort returned")  # grpc's abort always raises
