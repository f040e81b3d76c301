"""The client's settings: :class:`ClientConfig`, the ``PHASEWATCH_*`` environment, counters."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("phasewatch.client")

MAX_NAME_LENGTH = 256  # the detector's limit on run ids and series names

# A token for connect() and the CLI when none is given explicitly.
TOKEN_ENV = "PHASEWATCH_TOKEN"
# The detector's address when the code gives none (as MLFLOW_TRACKING_URI), and a
# switch that turns every run into a no-op (as WANDB_MODE=disabled).
TARGET_ENV = "PHASEWATCH_TARGET"
DISABLED_ENV = "PHASEWATCH_DISABLED"
DEFAULT_TARGET = "127.0.0.1:50051"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


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
