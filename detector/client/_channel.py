"""The channel to a detector: options, the unary calls' retry policy, retry hints of errors."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import grpc

from detector import __version__
from detector.client._settings import ClientConfig

_SERVICE = "phasewatch.v1.PhaseDetector"
_UNARY_METHODS = ("Log", "GetPhase", "GetTimeline", "ListRuns")
# Trailer of a RESOURCE_EXHAUSTED that clears by itself (the detector's
# points-per-second limit): such a batch is retried, not dropped.
_RETRY_AFTER_KEY = "phasewatch-retry-after-ms"


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
