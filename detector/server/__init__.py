"""The gRPC adapter: validate, convert, call the engine, map errors to statuses.

Business logic lives in :mod:`detector.engine`; conversions in
:mod:`detector.convert`; errors become statuses through the one table in
:mod:`detector.status`. ``create_server`` builds a server (tests
run it on port 0); ``serve`` is the ``phasewatch serve`` process around it.

Stream acknowledgements: every request message on ``Stream`` is answered, in
order, by the events it caused followed by exactly one ``Ack`` (the client SDK
counts on this to match answers to requests):

- ``start``: ``Ack(through_step=<run's last step, -1 if none>, 0, 0)``, so a
  resuming client learns where the detector is;
- ``batch``: ``accepted``/``rejected`` count the points of *that batch*
  (per batch, not cumulative; resent duplicates count as accepted);
- ``end``: the events of the final flush, then ``Ack(through_step, 0, 0)``.

When the client half-closes without ``end``, held points are flushed and one
more ``Ack(through_step, 0, 0)`` follows the events of that flush.

Modules: :mod:`~detector.server.servicer` (the RPCs), :mod:`~detector.server.bus`
(watchers' queues), :mod:`~detector.server.paging` (page tokens),
:mod:`~detector.server.app` (``create_server``, ``serve``).
"""

from detector.server.app import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_WORKERS,
    KEEPALIVE_OPTIONS,
    SERVICE_NAME,
    create_server,
    serve,
)
from detector.server.bus import EventBus, Subscription
from detector.server.servicer import WRITER_KEY, PhaseDetectorServicer
from detector.status import (  # the table's names, importable from here as before
    ERROR_DOMAIN,
    REASON_RATE_LIMITED,
    REASON_RUN_OWNED,
    RETRY_AFTER_KEY,
    STATUS_CODES,
    abort,
    rich_status,
    status_code,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_MAX_WORKERS", "ERROR_DOMAIN", "KEEPALIVE_OPTIONS",
    "REASON_RATE_LIMITED", "REASON_RUN_OWNED", "RETRY_AFTER_KEY", "SERVICE_NAME", "STATUS_CODES",
    "WRITER_KEY", "EventBus", "PhaseDetectorServicer", "Subscription", "abort", "create_server",
    "rich_status", "serve", "status_code",
]
