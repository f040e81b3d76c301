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

Layout
------
``_settings`` (ClientConfig, the ``PHASEWATCH_*`` environment, counters),
``_messages`` (Event, series specs, name rules), ``_channel`` (channel options
and retry policy), ``_auth`` (tokens, TLS, the bearer interceptor), ``_run``
(connect, Run, DisabledRun), ``_sender`` (the background thread), ``_fork``
(fork and exit hooks), ``_paging`` (AIP-158 queries). Import from
``detector.client``: the submodules are private.
"""


from __future__ import annotations

# Public names not in __all__ (retry_delay, the paging helpers, the environment
# variables, ...) stay importable from here, as before the split into modules.
from detector.client._auth import bearer_interceptor, read_token, tls_credentials
from detector.client._channel import (  # noqa: F401
    channel_options,
    create_channel,
    retry_delay,
    service_config,
)
from detector.client._messages import Event, SeriesSpecLike, _name_problem  # noqa: F401
from detector.client._paging import list_runs_pages, timeline_pages  # noqa: F401
from detector.client._run import DisabledRun, Run, connect
from detector.client._settings import (  # noqa: F401 - the names below, importable from here
    DEFAULT_TARGET,
    DISABLED_ENV,
    MAX_NAME_LENGTH,
    TARGET_ENV,
    TOKEN_ENV,
    ClientConfig,
    ClientConfigError,
    ClientStats,
    disabled_by_env,
    logger,
    resolve_target,
)

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
