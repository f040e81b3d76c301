"""Client SDK: stream a training run's metrics to a phasewatch detector.

Three lines in a training loop::

    from detector.client import connect

    with connect("detector:50051", run_id="exp-42", labels={"team": "nlp"}) as run:
        for step in range(steps):
            ...
            run.log(step, train_loss=loss, val_acc=acc)

``run.log()`` only validates its arguments and appends one row to a bounded,
lock-protected buffer; it never blocks on the network and never raises. A
background daemon thread (the *sender*) turns rows into columnar
``MetricBatch`` messages of up to ``batch_points`` points (or whatever has
accumulated every ``flush_interval`` seconds) and writes them to one
bidirectional ``Stream`` per run.

Delivery
--------
Every point stays in memory until the detector acknowledges it
(``Ack.through_step``: every point at or below that step is durable). When the
stream breaks, the sender opens a new one after an exponential backoff with
jitter, sends ``RunStart`` with ``resume=true`` and replays every
unacknowledged batch in order; the detector treats duplicate steps as
idempotent. Reconnecting the transport itself is left to gRPC (channel
reconnect backoff, keepalive, ``wait_for_ready``); only the replay, which needs
the buffer, is the client's own loop. Unary calls (``Log`` and the queries)
get a retry policy declared in the channel's service config, see
:func:`create_channel`.

Drop policy
-----------
The buffer is bounded in points (``ClientConfig.max_buffered_points``) and
counts both the points waiting to be sent and those sent but not yet
acknowledged. When a row does not fit, **the newest row is dropped whole**:
``log()`` returns ``False``, the points are counted in ``stats.dropped``, and
one warning goes to the ``phasewatch.client`` logger. Dropping the newest
rather than the oldest keeps what was already handed to the detector intact
(the oldest points are the unacknowledged ones a replay needs) and leaves one
gap at the end, instead of holes in the middle of the run. Malformed input (a
non-numeric value, a negative or non-integer step, an invalid series name) is
refused point by point, counted in ``stats.invalid`` and warned about once.
NaN and infinities are data and are sent as they are.

Fork safety
-----------
After ``os.fork()`` the child gets a fresh, empty buffer and no threads; its
sender starts on its first ``log()`` and resumes the same run on a new channel.
The parent's buffered points stay with the parent. A child never ends the run:
its ``close()`` flushes but does not send ``RunEnd``.

Events
------
The detector streams ``PhaseEvent`` messages back on the same stream. They
arrive as :class:`Event` values, through ``on_event=callback`` (called on the
client's reader thread: keep it short, and do not call ``close()`` from it),
through ``run.poll_events()`` (non-blocking, for the training loop) or through
the blocking iterator ``run.events()``, e.g. to stop a job whose training
collapses (a ``COLLAPSE_ONSET`` with ``scope=generalization`` is a held-out
metric falling while training holds; ``COLLAPSE_END`` says a run recovered)::

    for step in range(steps):
        run.log(step, train_loss=loss)
        if any(e.kind == "COLLAPSE_ONSET" and e.evidence.get("scope") != "generalization"
               for e in run.poll_events()):
            break

This module imports only the standard library, grpc, protobuf and the
generated code: a training job imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import operator
import os
import queue
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from detector import __version__
from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc

__all__ = [
    "ClientConfig",
    "ClientConfigError",
    "ClientStats",
    "DisabledRun",
    "Event",
    "Run",
    "SeriesSpecLike",
    "bearer_interceptor",
    "channel_options",
    "connect",
    "create_channel",
    "read_token",
    "service_config",
    "tls_credentials",
]

logger = logging.getLogger("phasewatch.client")

_SERVICE = "phasewatch.v1.PhaseDetector"
_UNARY_METHODS = ("Log", "GetPhase", "GetTimeline", "ListRuns")
MAX_NAME_LENGTH = 256  # the detector's limit on run ids and series names
_MAX_NAME_CACHE = 4096  # distinct series names remembered as valid

# Status codes after which the oldest unacknowledged batch is presumed to be
# what the detector refuses: it is dropped (counted as rejected) so that one
# bad batch cannot block the run forever. Every other failure is retried.
_POISON_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


# A token for connect() and the CLI when none is given explicitly.
TOKEN_ENV = "PHASEWATCH_TOKEN"
# The detector's address when the code gives none (as MLFLOW_TRACKING_URI), and a
# switch that turns every run into a no-op (as WANDB_MODE=disabled).
TARGET_ENV = "PHASEWATCH_TARGET"
DISABLED_ENV = "PHASEWATCH_DISABLED"
DEFAULT_TARGET = "127.0.0.1:50051"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
# Trailer of a RESOURCE_EXHAUSTED that clears by itself (the detector's
# points-per-second limit): such a batch is retried, not dropped.
_RETRY_AFTER_KEY = "phasewatch-retry-after-ms"
# Request metadata: this client's writer id (see detector.server.WRITER_KEY).
_WRITER_KEY = "phasewatch-writer"


def retry_delay(error: object) -> float | None:
    """Seconds a failed call says to wait before retrying (google.rpc.RetryInfo, or the
    detector's older ``phasewatch-retry-after-ms`` trailer); None when it says nothing."""
    trailers = getattr(error, "trailing_metadata", None)
    if not callable(trailers):
        return None
    try:
        items = tuple(trailers() or ())
    except Exception:  # a call that never started has no trailers
        return None
    for key, value in items:
        if key == "grpc-status-details-bin":
            try:
                from google.rpc import error_details_pb2, status_pb2

                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    info = error_details_pb2.RetryInfo()
                    if detail.Unpack(info):
                        return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            except Exception:  # not ours to fail on: fall back to the trailer
                pass
    for key, value in items:
        if key == _RETRY_AFTER_KEY:
            with contextlib.suppress(ValueError, TypeError):
                return int(value) / 1000
    return None


class ClientConfigError(ValueError):
    """A setting given to :func:`connect` or :class:`ClientConfig` is invalid.

    Raised only while setting up, never from ``log()``, ``flush()`` or ``close()``.
    """


@dataclass(frozen=True)
class ClientConfig:
    """Settings of the client; the defaults suit a training job.

    Parameters
    ----------
    max_buffered_points
        Points held in memory: waiting to be sent plus sent but not yet
        acknowledged. When a row does not fit, that row is dropped (counted).
    batch_points
        The sender cuts a batch once this many points are waiting; 512 to
        4096 points a batch is where columnar batches are cheapest to parse.
    flush_interval
        Seconds between time-based flushes of whatever is waiting.
    max_events
        Events kept for ``poll_events()`` / ``events()``; the oldest go first.
    reconnect_initial_backoff, reconnect_max_backoff
        Backoff between stream attempts, doubling from the first to the
        second, with ±20 % jitter. The channel's own reconnect backoff uses the
        same bounds.
    keepalive_time, keepalive_timeout
        HTTP/2 keepalive pings on an open stream (seconds); a peer that went
        away silently (no reset, e.g. a network partition) is noticed within
        about their sum. A stock gRPC server answers pings on a stream idle
        for less than 5 minutes with ``GOAWAY too_many_pings`` (the client
        then reconnects); lower ``keepalive_time`` only together with the
        server's ``grpc.http2.min_ping_interval_without_data_ms``.
    close_timeout
        Default wait of ``close()`` and of the context manager's exit.
    exit_timeout
        Wait at interpreter exit for runs that were never closed.
    """

    max_buffered_points: int = 262_144
    batch_points: int = 2048
    flush_interval: float = 0.5
    max_events: int = 10_000
    reconnect_initial_backoff: float = 0.1
    reconnect_max_backoff: float = 10.0
    keepalive_time: float = 300.0
    keepalive_timeout: float = 20.0
    close_timeout: float = 10.0
    exit_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_buffered_points", "batch_points", "max_events"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ClientConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "flush_interval",
            "reconnect_initial_backoff",
            "reconnect_max_backoff",
            "keepalive_time",
            "keepalive_timeout",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ClientConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("close_timeout", "exit_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ClientConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.reconnect_max_backoff < self.reconnect_initial_backoff:
            raise ClientConfigError(
                "reconnect_max_backoff must be at least reconnect_initial_backoff, got "
                f"{self.reconnect_max_backoff} < {self.reconnect_initial_backoff}"
            )


@dataclass(frozen=True)
class ClientStats:
    """Counters of one run's client, in points unless named otherwise.

    ``logged == acknowledged + buffered`` while the run is open (plus any
    points abandoned by a ``close()`` that timed out, or refused by the
    detector as a whole batch).

    Attributes
    ----------
    logged
        Points ``log()`` accepted into the buffer.
    sent
        Points written to a stream for the first time.
    resent
        Points written again after a reconnect (replays).
    acknowledged
        Points the detector acknowledged as durable.
    dropped
        Points refused because the buffer was full or the run was closed.
    invalid
        Points refused as malformed: non-numeric value, bad step, bad name.
    rejected
        Points the detector reported as rejected (``Ack.rejected``, e.g. too
        far out of order) plus those of any batch it refused outright.
    buffered
        Points held now: waiting to be sent or awaiting acknowledgement.
    reconnects
        Streams opened after one failed (not counting the stream a ``flush()``
        rotates, see :meth:`Run.flush`).
    events
        Events received.
    events_dropped
        Events discarded from the bounded event queue (oldest first).
    connected
        Whether a stream is open and has been acknowledged at least once.
    """

    logged: int = 0
    sent: int = 0
    resent: int = 0
    acknowledged: int = 0
    dropped: int = 0
    invalid: int = 0
    rejected: int = 0
    buffered: int = 0
    reconnects: int = 0
    events: int = 0
    events_dropped: int = 0
    connected: bool = False


@dataclass(frozen=True)
class Event:
    """A phase event from the detector, in the spelling of the CLI's JSON.

    ``kind`` is upper case without prefix (``"COLLAPSE_ONSET"``,
    ``"GROKKING_ONSET"``, …), ``phase`` lower case (``"collapse"``) or None,
    ``time`` seconds since the epoch or None.
    """

    run_id: str
    step: int
    kind: str
    phase: str | None = None
    series: str = ""
    confidence: float = 0.0
    message: str = ""
    evidence: Mapping[str, str] = field(default_factory=dict)
    time: float | None = None

    @classmethod
    def from_proto(cls, message: pb.PhaseEvent) -> Event:
        """Convert a ``PhaseEvent``; unknown enum numbers are kept as digits."""
        return cls(
            run_id=message.run_id,
            step=message.step,
            kind=_enum_name(pb.EventKind, message.kind, "EVENT_KIND_") or "UNSPECIFIED",
            phase=(_enum_name(pb.Phase, message.phase, "PHASE_") or "").lower() or None,
            series=message.series,
            confidence=message.confidence,
            message=message.message,
            evidence=dict(message.evidence),
            time=message.time.ToNanoseconds() / 1e9 if message.HasField("time") else None,
        )


def _enum_name(enum: Any, number: int, prefix: str) -> str | None:
    if number == 0:
        return None
    try:
        return str(enum.Name(number)).removeprefix(prefix)
    except ValueError:
        return str(number)


SeriesSpecLike = str | Mapping[str, Any] | pb.SeriesSpec
"""A series declaration: a name (everything inferred), a mapping such as
``{"name": "val_acc", "role": "accuracy", "split": "val", "direction":
"maximize"}``, or a ``SeriesSpec`` message."""


def _series_spec(spec: SeriesSpecLike) -> pb.SeriesSpec:
    if isinstance(spec, pb.SeriesSpec):
        message = pb.SeriesSpec()
        message.CopyFrom(spec)
    elif isinstance(spec, str):
        message = pb.SeriesSpec(name=spec)
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "role", "split", "direction"}
        if unknown:
            raise ClientConfigError(f"series spec {spec!r} has unknown keys {sorted(unknown)}")
        message = pb.SeriesSpec(name=spec.get("name", ""))
        for key, enum, prefix in (
            ("role", pb.Role, "ROLE_"),
            ("split", pb.Split, "SPLIT_"),
            ("direction", pb.Direction, "DIRECTION_"),
        ):
            value = spec.get(key)
            if value is None:
                continue
            if isinstance(value, int):
                number = value
            else:
                try:
                    number = enum.Value(prefix + str(value).upper().removeprefix(prefix))
                except ValueError:
                    raise ClientConfigError(
                        f"series {message.name!r}: unknown {key} {value!r}"
                    ) from None
            setattr(message, key, number)
    else:
        raise ClientConfigError(f"a series spec must be a name, a mapping or a SeriesSpec: {spec!r}")
    problem = _name_problem("series name", message.name)
    if problem is not None:
        raise ClientConfigError(problem)
    return message


def _name_problem(kind: str, name: object) -> str | None:
    """Why ``name`` is not a valid run id or series name: the rules of
    ``detector.core.types.check_name``, repeated so that the SDK imports neither
    the core nor numpy into a training job (tests/test_client.py checks both)."""
    if not isinstance(name, str):
        return f"{kind} {name!r} is not a string"
    if not name:
        return f"{kind} is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"{kind} is longer than {MAX_NAME_LENGTH} characters"
    if not name.isprintable() or any(c.isspace() for c in name):
        return f"{kind} {name!r} has whitespace or non-printable characters"
    return None


def service_config(config: ClientConfig | None = None) -> str:
    """The channel's service config (JSON): a retry policy for the unary calls.

    Streams are not retried by gRPC (a stream that has started cannot be); the
    client's sender replays them itself.
    """
    config = config or ClientConfig()
    policy = {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE, "method": m} for m in _UNARY_METHODS],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": f"{config.reconnect_initial_backoff:.3f}s",
                    "maxBackoff": f"{config.reconnect_max_backoff:.3f}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return json.dumps(policy)


def channel_options(config: ClientConfig | None = None) -> list[tuple[str, Any]]:
    """gRPC channel options: keepalive, reconnect backoff, retries, user agent."""
    config = config or ClientConfig()
    initial_ms = max(1, int(config.reconnect_initial_backoff * 1000))
    return [
        ("grpc.primary_user_agent", f"phasewatch-client/{__version__}"),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(config)),
        # Query pages are cut at 2 MiB; one large item may still exceed the 4 MiB default.
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.min_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", max(initial_ms, int(config.reconnect_max_backoff * 1000))),
    ]


def create_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    config: ClientConfig | None = None,
) -> grpc.Channel:
    """Open a channel to a detector with the client's options.

    Parameters
    ----------
    target
        ``HOST:PORT`` (any gRPC target string).
    credentials
        TLS credentials (``grpc.ssl_channel_credentials()``); plaintext if None.
    config
        Backoff and keepalive settings.

    >>> channel = create_channel("127.0.0.1:50051")
    >>> channel.close()
    """
    options = channel_options(config)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


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


def resolve_target(target: str | None = None) -> str:
    """``target``, else ``$PHASEWATCH_TARGET``, else ``127.0.0.1:50051``.

    >>> resolve_target("detector:50051")
    'detector:50051'
    """
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def disabled_by_env() -> bool:
    """Whether ``$PHASEWATCH_DISABLED`` turns runs off (1/true/yes/on; 0/false/no/off
    or unset: on). Any other value counts as disabled, with one warning: a switch
    meant to turn monitoring off must not be ignored for a typo."""
    value = os.environ.get(DISABLED_ENV)
    if value is None:
        return False
    word = value.strip().lower()
    if word in _FALSE_WORDS:
        return False
    if word not in _TRUE_WORDS:
        logger.warning("phasewatch: $%s=%r is not 1/true/yes/on or 0/false/no/off; "
                       "taken as disabled", DISABLED_ENV, value)
    return True


class DisabledRun:
    """The run :func:`connect` returns when disabled: every call is a no-op.

    Same interface as :class:`Run`, no thread, no connection, no validation
    cost: ``log()`` returns True and keeps nothing, there are never events.

    >>> run = DisabledRun("127.0.0.1:50051", "exp-42")
    >>> run.log(0, train_loss=1.0), run.flush(), run.poll_events(), run.stats.logged
    (True, True, [], 0)
    >>> run.close(), run.closed
    (True, True)
    """

    disabled = True

    def __init__(self, target: str, run_id: str) -> None:
        self._target, self._run_id, self._closed = target, run_id, False

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def target(self) -> str:
        return self._target

    @property
    def stats(self) -> ClientStats:
        return ClientStats()

    @property
    def closed(self) -> bool:
        return self._closed

    def log(self, step: int, values: Mapping[str, float] | None = None, /, **metrics: float) -> bool:
        return True

    def flush(self, timeout: float | None = 10.0) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        self._closed = True
        return True

    def poll_events(self) -> list[Event]:
        return []

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        return iter(())

    def __enter__(self) -> DisabledRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DisabledRun({self._run_id!r})"


def connect(
    target: str | None,
    run_id: str,
    *,
    labels: Mapping[str, str] | None = None,
    series: Iterable[SeriesSpecLike] = (),
    on_event: Callable[[Event], object] | None = None,
    resume: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    tls: bool = False,
    tls_root_ca: str | os.PathLike[str] | bytes | None = None,
    tls_client_cert: str | os.PathLike[str] | bytes | None = None,
    tls_client_key: str | os.PathLike[str] | bytes | None = None,
    config: ClientConfig | None = None,
    disabled: bool | None = None,
) -> Run | DisabledRun:
    """Start streaming a run to the detector at ``target``; returns at once.

    The connection is made in the background: ``connect`` succeeds even when
    the detector is down, and the run's points are buffered until it is up.

    Parameters
    ----------
    target
        The detector's ``HOST:PORT``; None (or empty): ``$PHASEWATCH_TARGET``,
        else ``127.0.0.1:50051``.
    run_id
        The run's id (non-empty, no whitespace, at most 256 characters).
    labels
        Labels of the run (team, model, …), used by ``ListRuns`` selectors.
    series
        Series to declare up front with their role, split and direction;
        undeclared series are declared on first use with everything inferred
        from the name.
    on_event
        Called with each :class:`Event` on the client's reader thread.
    resume
        Declare the run as resumed (a restarted job continuing a run).
    credentials
        TLS channel credentials; plaintext if None and no ``tls*`` argument is given.
    token, token_file
        Bearer token, sent as ``authorization: Bearer <token>`` metadata: the
        token itself, or a file holding it (first line that is not a ``#``
        comment); with neither, ``$PHASEWATCH_TOKEN`` if set.
    tls, tls_root_ca, tls_client_cert, tls_client_key
        TLS without building ``credentials``: ``tls=True`` verifies the
        detector against the system's roots, ``tls_root_ca`` (a PEM path or
        bytes; implies TLS) against that CA; the client certificate and key
        are for mutual TLS. See :func:`tls_credentials`.
    config
        Buffer, batching, backoff and timeout settings.
    disabled
        Return a :class:`DisabledRun` (every call a no-op, nothing sent); None:
        as ``$PHASEWATCH_DISABLED`` says (``1``/``true``: disabled), so a job
        can be run unwatched without a code change.

    Raises
    ------
    ClientConfigError
        If the run id, a label, a series spec or a setting is invalid.
    """
    target = resolve_target(target)
    if disabled_by_env() if disabled is None else disabled:
        return DisabledRun(target, run_id)
    if tls or tls_root_ca is not None or tls_client_cert is not None or tls_client_key is not None:
        if credentials is not None:
            raise ClientConfigError("give credentials or the tls* arguments, not both")
        credentials = tls_credentials(tls_root_ca, tls_client_cert, tls_client_key)
    return Run(
        target,
        run_id,
        labels=labels,
        series=series,
        on_event=on_event,
        resume=resume,
        credentials=credentials,
        token=read_token(token, token_file),
        config=config,
    )


class _Batch:
    """One columnar batch kept until acknowledged."""

    __slots__ = ("max_step", "points", "request", "sent")

    def __init__(self, request: pb.StreamRequest, points: int, max_step: int) -> None:
        self.request = request
        self.points = points
        self.max_step = max_step
        self.sent = False


class _Stream:
    """One ``Stream`` call: its request queue, the call, and how it ended."""

    __slots__ = (
        "acks",
        "call",
        "done",
        "end_sent",
        "error",
        "handled",
        "requests",
        "rotating",
        "sent",
    )

    def __init__(self) -> None:
        self.requests: queue.SimpleQueue[pb.StreamRequest | None] = queue.SimpleQueue()
        self.call: Any = None
        self.done = False  # the response stream has finished (guarded by the run's lock)
        self.error: BaseException | None = None
        self.sent = 0  # requests written (the detector answers each with one Ack)
        self.acks = 0
        self.end_sent = False
        self.rotating = False  # half-closed by a flush, to be replaced
        self.handled = False  # the sender has dealt with its end

    def answered(self) -> bool:
        """Whether every request written so far has had its ``Ack``."""
        return self.acks >= self.sent

    def iterate(self) -> Iterator[pb.StreamRequest]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def code(self) -> grpc.StatusCode | None:
        error = self.error
        if error is None:
            return grpc.StatusCode.OK
        code = getattr(error, "code", None)
        if callable(code):
            with contextlib.suppress(Exception):
                return code()  # type: ignore[no-any-return]
        return None

    def retry_later(self) -> bool:
        """Whether the detector said to retry the refused request later (a rate limit)."""
        return retry_delay(self.error) is not None

    def details(self) -> str:
        error = self.error
        details = getattr(error, "details", None)
        if callable(details):
            with contextlib.suppress(Exception):
                return str(details())
        return repr(error)


class Run:
    """One run's handle: ``log()`` points, ``flush()``, ``close()``, read events.

    Made by :func:`connect`. Thread-safe; ``log()`` may be called from any
    thread. Usable as a context manager, which closes the run on exit.

    With no detector listening, points are buffered and, once the buffer is
    full, dropped and counted; nothing blocks and nothing raises:

    >>> run = connect("127.0.0.1:1", "doc-run", config=ClientConfig(max_buffered_points=4))
    >>> run.log(0, train_loss=2.3, val_acc=0.1)
    True
    >>> run.log(1, {"train_loss": 2.1, "val_acc": 0.1, "lr": 0.1})  # 2 + 3 > 4 points
    False
    >>> run.log(1, train_loss="oops")  # not a number: refused, counted
    False
    >>> s = run.stats
    >>> s.logged, s.dropped, s.invalid, s.buffered
    (2, 3, 1, 2)
    >>> run.close(timeout=0.1)  # nothing can be acknowledged: False
    False
    """

    def __init__(
        self,
        target: str,
        run_id: str,
        *,
        labels: Mapping[str, str] | None = None,
        series: Iterable[SeriesSpecLike] = (),
        on_event: Callable[[Event], object] | None = None,
        resume: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        problem = _name_problem("run id", run_id)
        if problem is not None:
            raise ClientConfigError(problem)
        if not isinstance(target, str) or not target:
            raise ClientConfigError(f"target must be a non-empty string, got {target!r}")
        if config is not None and not isinstance(config, ClientConfig):
            raise ClientConfigError(f"config must be a ClientConfig, got {config!r}")
        labels = dict(labels or {})
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ClientConfigError(f"labels must map strings to strings: {key!r}: {value!r}")
        if on_event is not None and not callable(on_event):
            raise ClientConfigError(f"on_event must be callable, got {on_event!r}")
        self._target = target
        self._run_id = run_id
        self._config = config or ClientConfig()
        self._start_message = pb.RunStart(
            run_id=run_id, labels=labels, series=[_series_spec(s) for s in series]
        )
        self._resume = bool(resume)
        self._callback = on_event
        self._credentials = credentials
        # The writer id tells the detector that a new stream of this run is this
        # client's own (after a disconnect its old stream may still look open
        # there): it takes the run over instead of being refused as a second writer.
        self._metadata: tuple[tuple[str, str], ...] = (
            (_WRITER_KEY, uuid.uuid4().hex),
            *((("authorization", f"Bearer {token}"),) if token else ()),
        )
        self._capacity = self._config.max_buffered_points
        self._batch_points = self._config.batch_points
        self._names: set[str] = set()  # series names known to be valid
        self._owner_pid = os.getpid()
        self._warned: set[str] = set()
        self._closed = False  # no more log(); set by close()
        self._close_result: bool | None = None
        self._init_process_state()
        _register(self)
        self._start()

    # --- state that does not survive fork ------------------------------------

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._rows: list[tuple[int, dict[str, float]]] = []
        self._queued = 0  # points in _rows
        self._held = 0  # points in _rows plus in _inflight
        self._max_step = -1
        self._inflight: list[_Batch] = []
        self._flush_requested = False
        self._closing = False  # the sender should deliver everything, then stop
        self._abort = False  # the sender should stop now
        self._finished = False  # the sender has stopped
        self._end_delivered = False
        self._stream: _Stream | None = None
        self._started_once = False  # a stream was opened before: resume on the next
        self._reconnecting = False  # the last stream failed: the next one is a reconnect
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.PhaseDetectorStub | None = None
        self._sender: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._events: deque[Event] = deque()
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "logged",
                "sent",
                "resent",
                "acknowledged",
                "dropped",
                "invalid",
                "rejected",
                "reconnects",
                "events",
                "events_dropped",
            ),
            0,
        )

    def _after_fork_in_child(self) -> None:
        # Threads do not survive fork and the parent's channel, call and locks
        # must not be touched here: keep references (so no destructor runs in
        # the child) and start over. The parent keeps and sends its own points.
        _FORK_ORPHANS.append((self._channel, self._stream, self._lock))
        self._init_process_state()
        self._started_once = True  # the run exists: the child resumes it

    # --- the training thread's API -------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._run_id

    @property
    def target(self) -> str:
        """The detector's address."""
        return self._target

    def log(self, step: int, values: Mapping[str, float] | None = None, /, **metrics: float) -> bool:
        """Buffer one row of metrics at ``step``; never blocks, never raises.

        Parameters
        ----------
        step
            The training step, a non-negative integer.
        values
            Metrics as a mapping of series name to number (copied).
        **metrics
            Metrics as keywords; merged over ``values``.

        Returns
        -------
        bool
            True if every point was buffered; False if any was dropped (buffer
            full, run closed) or refused as malformed. Both are counted in
            :attr:`stats` and warned about once.
        """
        try:
            if values is not None:
                metrics = {**values, **metrics} if metrics else dict(values)
            if type(step) is not int or step < 0:
                return self._log_checked(step, metrics)
            names = self._names
            for name, value in metrics.items():
                if type(value) is not float or name not in names:
                    return self._log_checked(step, metrics)
            return self._append(step, metrics)
        except Exception:  # never into the training loop
            return self._refuse_all(metrics if isinstance(metrics, dict) else {}, "bad arguments")

    def _append(self, step: int, metrics: dict[str, float]) -> bool:
        count = len(metrics)
        if not count:
            return True
        with self._lock:
            if self._closed or self._held + count > self._capacity:
                self._stats["dropped"] += count
                full = not self._closed
            else:
                self._rows.append((step, metrics))
                self._held += count
                self._queued += count
                self._stats["logged"] += count
                if step > self._max_step:
                    self._max_step = step
                if self._queued >= self._batch_points and self._queued - count < self._batch_points:
                    self._cond.notify_all()
                if self._sender is None:
                    self._start()
                return True
        if full:
            self._warn_once(
                "full",
                "phasewatch buffer is full (%d points): dropping the newest points of run %r "
                "until the detector catches up; see Run.stats.dropped",
                self._capacity,
                self._run_id,
            )
        else:
            self._warn_once("closed", "run %r is closed: log() drops its points", self._run_id)
        return False

    def _log_checked(self, step: object, metrics: dict[str, Any]) -> bool:
        """The slow path of ``log()``: convert what can be, refuse the rest."""
        try:
            index = operator.index(step)  # type: ignore[arg-type]
        except TypeError:
            index = -1
        if isinstance(step, bool) or index < 0:
            return self._refuse_all(metrics, f"step {step!r} is not a non-negative integer")
        clean: dict[str, float] = {}
        bad: list[str] = []
        names = self._names
        for name, value in metrics.items():
            if name not in names:
                problem = _name_problem("series name", name)
                if problem is not None:
                    bad.append(problem)
                    continue
                if len(names) < _MAX_NAME_CACHE:
                    names.add(name)
            if type(value) is float:
                clean[name] = value
                continue
            if value is None or isinstance(value, (str, bytes, bytearray, complex)):
                bad.append(f"{name}={value!r} is not a number")
                continue
            try:
                clean[name] = float(value)
            except Exception:
                bad.append(f"{name}={value!r} is not a number")
        if bad:
            with self._lock:
                self._stats["invalid"] += len(bad)
            self._warn_once(
                "invalid",
                "phasewatch run %r: refusing malformed points (%s); see Run.stats.invalid",
                self._run_id,
                bad[0],
            )
        appended = self._append(index, clean)
        return appended and not bad

    def _refuse_all(self, metrics: Mapping[str, Any], why: str) -> bool:
        with self._lock:
            self._stats["invalid"] += max(1, len(metrics))
        self._warn_once(
            "invalid",
            "phasewatch run %r: refusing malformed points (%s); see Run.stats.invalid",
            self._run_id,
            why,
        )
        return False

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Send what is buffered now and wait until the detector acknowledges it.

        Returns True if nothing is left unacknowledged within ``timeout``
        seconds (None: wait as long as it takes). Never raises.

        If the detector has answered every batch but still holds the last
        points back (its reorder buffer keeps the newest steps until later
        ones arrive), the sender half-closes the stream, which makes the
        detector process and acknowledge them, and resumes the run on a new
        stream. After that, log later steps only: a point at a step the
        detector has already processed counts as rejected.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            if not self._held:
                return True
            if self._sender is None and not self._finished:
                self._start()
            self._flush_requested = True
            self._cond.notify_all()
            while self._held and not self._finished:
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._flush_requested = False
            return self._held == 0

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is buffered, end the run, and stop the background threads.

        Waits at most ``timeout`` seconds (default ``config.close_timeout``).
        Returns True if every logged point was acknowledged and the run was
        ended; False otherwise (the points left are counted in the warning).
        Idempotent; never raises. In a forked child the run is flushed but not
        ended. Calling it from an ``on_event`` callback only requests the close.
        """
        if timeout is None:
            timeout = self._config.close_timeout
        try:
            return self._close(max(0.0, timeout))
        except Exception:
            logger.exception("phasewatch run %r: error while closing", self._run_id)
            return False

    def _close(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._close_result is not None:
                return self._close_result
            self._closed = True
            self._closing = True
            self._cond.notify_all()
            sender = self._sender
            if sender is None and not self._held:
                self._finished = True  # nothing was ever sent from this process
            threads = set(self._threads)
        current = threading.current_thread()
        if current in threads:
            return False  # called from our own thread (a callback): cannot wait for it
        if sender is None and self._held:
            with self._cond:
                self._start()
                sender = self._sender
        if sender is not None:
            sender.join(max(0.0, deadline - time.monotonic()))
            if sender.is_alive():
                self._stop_now()
                sender.join(1.0)
        with self._cond:
            self._finished = True
            self._cond.notify_all()
            held = self._held
            ok = held == 0 and (self._end_delivered or os.getpid() != self._owner_pid)
            self._close_result = ok
        _unregister(self)
        if held:
            logger.warning(
                "phasewatch run %r closed with %d points not acknowledged by %s",
                self._run_id,
                held,
                self._target,
            )
        elif not ok:
            logger.warning(
                "phasewatch run %r: every point was acknowledged but the run end did not "
                "reach %s",
                self._run_id,
                self._target,
            )
        return ok

    def _stop_now(self) -> None:
        with self._cond:
            self._abort = True
            stream = self._stream
            self._cond.notify_all()
        if stream is not None and stream.call is not None:
            with contextlib.suppress(Exception):
                stream.call.cancel()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the client's counters."""
        with self._lock:
            stream = self._stream
            return ClientStats(
                **self._stats,
                buffered=self._held,
                connected=stream is not None and not stream.done and stream.acks > 0,
            )

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    # --- events ---------------------------------------------------------------

    def poll_events(self) -> list[Event]:
        """Return (and forget) the events received so far; never blocks."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            return events

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they arrive.

        Stops once the run is closed and every received event was yielded, or
        when no event arrived for ``timeout`` seconds (None: no limit).
        """
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._events and not self._finished:
                    if deadline is None:
                        self._cond.wait()
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._events:
                    return
                event = self._events.popleft()
            yield event

    # --- the sender -----------------------------------------------------------

    def _start(self) -> None:
        """Start the sender thread (called with the lock held or before threads exist)."""
        if self._sender is not None or self._finished:
            return
        thread = threading.Thread(
            target=self._sender_main, name=f"phasewatch-sender-{self._run_id}", daemon=True
        )
        self._sender = thread
        self._threads.add(thread)
        thread.start()

    def _sender_main(self) -> None:
        # The channel is made and closed here, never on the training thread: in
        # a forked child a gRPC call may hang, and only this thread would wait.
        channel = None
        try:
            channel = create_channel(
                self._target, credentials=self._credentials, config=self._config
            )
            with self._cond:
                self._channel = channel
                self._stub = pb_grpc.PhaseDetectorStub(channel)
            self._sender_loop()
        except Exception:
            logger.exception("phasewatch run %r: the sender stopped on an error", self._run_id)
        finally:
            with self._cond:
                stream = self._stream
                self._finished = True
                self._channel = None
                self._cond.notify_all()
            if stream is not None:
                stream.requests.put(None)
                if not stream.done and stream.call is not None:
                    with contextlib.suppress(Exception):
                        stream.call.cancel()
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.close()

    def _sender_loop(self) -> None:
        """Batch rows, keep one stream open, end the run on close.

        Each pass waits (under the lock) for one thing to do, then does it
        outside the lock: handle a stream that ended, (re)connect, send a
        batch, rotate the stream for a flush, or send the run end.
        """
        interval = self._config.flush_interval
        next_tick = time.monotonic() + interval
        failures = 0
        retry_at = 0.0
        while True:
            rows: list[tuple[int, dict[str, float]]] = []
            action = ""
            with self._cond:
                while not action:
                    if self._abort:
                        return
                    now = time.monotonic()
                    stream = self._stream
                    if stream is not None and stream.done and not stream.handled:
                        stream.handled = True
                        clean = stream.error is None
                        if clean and stream.end_sent and not self._held:
                            self._end_delivered = True
                            return
                        if clean and stream.rotating:
                            failures, retry_at = 0, now  # a flush, not a failure
                            continue
                        self._reconnecting = True
                        failures = (0 if stream.acks else failures) + 1
                        # A rate limit says how long to wait (RetryInfo): no sooner.
                        retry_at = now + max(self._backoff(failures), retry_delay(stream.error) or 0.0)
                        self._stream_lost(stream)
                        continue
                    if stream is None or stream.done:
                        if now >= retry_at:
                            action = "connect"
                        else:
                            self._cond.wait(retry_at - now)
                        continue
                    if stream.end_sent or stream.rotating:
                        self._cond.wait()  # until the detector finishes the stream
                        continue
                    tick = now >= next_tick
                    if tick:
                        next_tick = now + interval
                    if self._rows and (
                        tick
                        or self._queued >= self._batch_points
                        or self._flush_requested
                        or self._closing
                    ):
                        action = "send"
                    elif self._closing:
                        action = "end"  # every batch is on this stream: end it now
                    elif self._flush_requested and self._inflight and stream.answered():
                        # The detector answered everything yet holds points back
                        # (its reorder buffer): a half-close makes it release and
                        # acknowledge them; the next stream resumes the run.
                        action = "rotate"
                    else:
                        self._cond.wait(max(0.0, next_tick - now))
                if action == "send":
                    rows, self._rows = self._rows, []
                    self._queued = 0
                elif action == "end":
                    stream.end_sent = True
                elif action == "rotate":
                    stream.rotating = True
            if action == "connect":
                self._open_stream()
            elif action == "send":
                self._send(stream, self._build(rows))
            elif action == "end":
                self._finish(stream)
            elif action == "rotate":
                stream.requests.put(None)

    def _backoff(self, failures: int) -> float:
        config = self._config
        delay = min(
            config.reconnect_max_backoff,
            config.reconnect_initial_backoff * 2 ** min(failures - 1, 30),
        )
        return delay * random.uniform(0.8, 1.2)

    def _stream_lost(self, stream: _Stream) -> None:
        """Account for a stream that ended without delivering the run end (lock held)."""
        code = stream.code()
        # The detector answers requests in order, so when it has accepted the
        # start, the request it refused is the oldest unacknowledged batch.
        if code in _POISON_CODES and stream.acks and self._inflight and not stream.retry_later():
            bad = self._inflight.pop(0)
            self._held -= bad.points
            self._stats["rejected"] += bad.points
            self._cond.notify_all()
            self._warn_once(
                f"refused-{code}",
                "phasewatch run %r: the detector refused a batch of %d points (%s: %s); "
                "dropping it",
                self._run_id,
                bad.points,
                getattr(code, "name", code),
                stream.details(),
                level=logging.ERROR,
            )
            return
        if code == grpc.StatusCode.CANCELLED and self._abort:
            return
        self._warn_once(
            "lost",
            "phasewatch run %r: stream to %s ended (%s: %s); buffering %d points and "
            "reconnecting",
            self._run_id,
            self._target,
            getattr(code, "name", code),
            stream.details(),
            self._held,
        )

    def _open_stream(self) -> None:
        stream = _Stream()
        start = pb.StreamRequest(start=self._start_message)
        with self._cond:
            if self._abort:
                return
            start.start.resume = self._resume or self._started_once
            if self._reconnecting:
                self._stats["reconnects"] += 1
                self._reconnecting = False
            self._started_once = True
            replay = list(self._inflight)
            for batch in replay:
                self._stats["resent" if batch.sent else "sent"] += batch.points
                batch.sent = True
            stream.sent = 1 + len(replay)
            self._stream = stream
            stub = self._stub
        stream.requests.put(start)
        for batch in replay:
            stream.requests.put(batch.request)
        if replay:
            logger.debug(
                "phasewatch run %r: replaying %d batches", self._run_id, len(replay)
            )
        try:
            assert stub is not None
            stream.call = stub.Stream(
                stream.iterate(), metadata=self._metadata, wait_for_ready=True
            )
        except Exception as exc:  # a closed channel, or a bug in grpc: retry later
            with self._cond:
                stream.error = exc
                stream.done = True
                self._cond.notify_all()
            stream.requests.put(None)
            return
        reader = threading.Thread(
            target=self._read, args=(stream,), name=f"phasewatch-reader-{self._run_id}", daemon=True
        )
        with self._cond:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(reader)
        reader.start()

    def _build(self, rows: list[tuple[int, dict[str, float]]]) -> list[_Batch]:
        """Turn rows into columnar batches of at most ``batch_points`` points."""
        limit = self._batch_points
        batches: list[_Batch] = []
        columns: dict[str, tuple[list[int], list[float]]] = {}
        points = 0
        max_step = -1
        for step, metrics in rows:
            for name, value in metrics.items():
                column = columns.get(name)
                if column is None:
                    column = columns[name] = ([], [])
                column[0].append(step)
                column[1].append(value)
            points += len(metrics)
            if step > max_step:
                max_step = step
            if points >= limit:
                batches.append(_make_batch(columns, points, max_step))
                columns, points, max_step = {}, 0, -1
        if points:
            batches.append(_make_batch(columns, points, max_step))
        return batches

    def _send(self, stream: _Stream, batches: list[_Batch]) -> None:
        with self._cond:
            self._inflight.extend(batches)
            alive = self._stream is stream and not stream.done
            if alive:
                stream.sent += len(batches)
                for batch in batches:
                    batch.sent = True
                    self._stats["sent"] += batch.points
        if alive:  # else the next stream replays them
            for batch in batches:
                stream.requests.put(batch.request)

    def _finish(self, stream: _Stream) -> None:
        """Every batch is on ``stream`` and the run is closing: end it, half-close.

        The detector answers the end with an ``Ack`` through the run's last
        step, which acknowledges whatever its reorder buffer was holding. A
        forked child only half-closes: the run is its parent's to end.
        """
        with self._cond:
            final_step = max(self._max_step, 0)
        if os.getpid() == self._owner_pid:
            stream.requests.put(pb.StreamRequest(end=pb.RunEnd(final_step=final_step)))
        stream.requests.put(None)

    def _read(self, stream: _Stream) -> None:
        error: BaseException | None = None
        try:
            for response in stream.call:
                which = response.WhichOneof("msg")
                if which == "ack":
                    self._on_ack(stream, response.ack)
                elif which == "event":
                    self._on_event(response.event)
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:
            error = exc
            logger.debug("phasewatch run %r: reader error", self._run_id, exc_info=True)
        finally:
            stream.requests.put(None)  # unblock gRPC's request consumer
            with self._cond:
                stream.error = error
                stream.done = True
                self._cond.notify_all()

    def _on_ack(self, stream: _Stream, ack: pb.Ack) -> None:
        through = ack.through_step
        with self._cond:
            stream.acks += 1
            released = 0
            keep: list[_Batch] = []
            for batch in self._inflight:
                if batch.max_step <= through:
                    released += batch.points
                else:
                    keep.append(batch)
            if released:
                self._inflight = keep
                self._held -= released
                self._stats["acknowledged"] += released
                if not self._held:
                    self._flush_requested = False
            self._stats["rejected"] += ack.rejected
            self._cond.notify_all()

    def _on_event(self, message: pb.PhaseEvent) -> None:
        event = Event.from_proto(message)
        with self._cond:
            self._stats["events"] += 1
            if len(self._events) >= self._config.max_events:
                self._events.popleft()
                self._stats["events_dropped"] += 1
            self._events.append(event)
            self._cond.notify_all()
        callback = self._callback
        if callback is not None:
            try:
                callback(event)
            except Exception:
                if "callback" not in self._warned:
                    self._warned.add("callback")
                    logger.exception("phasewatch run %r: on_event callback failed", self._run_id)

    def _warn_once(self, key: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        if key in self._warned:
            logger.debug(message, *args)
            return
        self._warned.add(key)
        logger.log(level, message, *args)

    def __repr__(self) -> str:
        return f"Run(target={self._target!r}, run_id={self._run_id!r}, closed={self._closed})"


def _make_batch(
    columns: Mapping[str, tuple[list[int], list[float]]], points: int, max_step: int
) -> _Batch:
    request = pb.StreamRequest(
        batch=pb.MetricBatch(
            series=[
                pb.Series(name=name, steps=steps, values=values)
                for name, (steps, values) in columns.items()
            ]
        )
    )
    return _Batch(request, points, max_step)


# --- process hooks: fork and interpreter exit ----------------------------------

_LIVE: set[Run] = set()
_LIVE_LOCK = threading.Lock()
_HOOKS_INSTALLED = False
_FORK_ORPHANS: list[object] = []  # the parent's objects, kept alive in a child
_FORK_HELD: list[threading.Lock] = []


def _register(run: Run) -> None:
    global _HOOKS_INSTALLED
    with _LIVE_LOCK:
        _LIVE.add(run)
        if not _HOOKS_INSTALLED:
            _HOOKS_INSTALLED = True
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(
                    before=_before_fork,
                    after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child,
                )
            atexit.register(_close_at_exit)


def _unregister(run: Run) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(run)


def _before_fork() -> None:
    # Hold every run's lock across fork, so that no child inherits a buffer
    # half-way through an update by one of our threads.
    _LIVE_LOCK.acquire()
    for run in list(_LIVE):
        lock = run._lock
        if lock.acquire(timeout=5.0):
            _FORK_HELD.append(lock)


def _after_fork_in_parent() -> None:
    while _FORK_HELD:
        _FORK_HELD.pop().release()
    _LIVE_LOCK.release()


def _after_fork_in_child() -> None:
    global _LIVE_LOCK
    _FORK_ORPHANS.extend(_FORK_HELD)
    _FORK_HELD.clear()
    _LIVE_LOCK = threading.Lock()
    for run in list(_LIVE):
        with contextlib.suppress(Exception):
            run._after_fork_in_child()


def _close_at_exit() -> None:
    with _LIVE_LOCK:
        runs = list(_LIVE)
    for run in runs:
        with contextlib.suppress(Exception):
            run.close(timeout=run._config.exit_timeout)


# --- paged queries (AIP-158) --------------------------------------------------------


def list_runs_pages(
    stub: pb_grpc.PhaseDetectorStub, request: pb.ListRunsRequest, timeout: float | None
) -> list[pb.RunPhase]:
    """Every run ``request`` selects, following ``next_page_token`` (one call a page)."""
    runs: list[pb.RunPhase] = []
    while True:
        page = stub.ListRuns(request, timeout=timeout)
        runs.extend(page.runs)
        if not page.next_page_token:
            return runs
        request.page_token = page.next_page_token


def timeline_pages(
    stub: pb_grpc.PhaseDetectorStub, run_id: str, timeout: float | None
) -> pb.Timeline:
    """A run's whole timeline, its pages put together (one call a page)."""
    request = pb.GetTimelineRequest(run_id=run_id)
    timeline = stub.GetTimeline(request, timeout=timeout)
    while timeline.next_page_token:
        request.page_token = timeline.next_page_token
        page = stub.GetTimeline(request, timeout=timeout)
        timeline.events.extend(page.events)
        timeline.next_page_token = page.next_page_token
    return timeline
