"""Alerts: engine events become Alertmanager alerts and webhook notifications.

- :mod:`detector.alerts.model`: which event raises which alert, its identity
  labels and annotations, and when it resolves (pure, no I/O);
- :mod:`detector.alerts.sinks`: one :class:`AlertSink` interface, with
  :class:`AlertmanagerSink` (``POST /api/v2/alerts``) and :class:`WebhookSink`
  (Alertmanager's webhook payload, version 4);
- :mod:`detector.alerts.dispatcher`: :class:`AlertDispatcher`, the bounded
  queue and worker thread between the engine and the sinks.

``phasewatch serve --alertmanager-url URL --webhook-url URL`` wires them up
with :func:`build_sinks`.
"""

from __future__ import annotations

from detector.alerts.dispatcher import AlertDispatcher, AlertStats, SinkStats
from detector.alerts.model import (
    ALERT_NAMES,
    ALERT_RULES,
    Alert,
    AlertBook,
    AlertPolicy,
    AlertRule,
)
from detector.alerts.sinks import AlertmanagerSink, AlertSink, SinkError, WebhookSink
from detector.errors import InvalidArgument

DEFAULT_RESEND_INTERVAL = 60.0
# Alertmanager's advice to its clients: re-send active alerts every 30 s to 3 min.
RESEND_INTERVAL_RANGE = (30.0, 180.0)
# Firing alerts are valid for this many resend intervals (Prometheus uses 4):
# Alertmanager resolves them itself if the detector stops re-sending.
VALID_FOR_RESENDS = 4


def build_sinks(
    alertmanager_url: str | None = None,
    webhook_url: str | None = None,
    *,
    resend_interval: float = DEFAULT_RESEND_INTERVAL,
) -> list[AlertSink]:
    """The sinks for the ``serve`` flags.

    ``alertmanager_url`` may list several Alertmanagers, comma-separated: the
    members of an Alertmanager cluster each need every alert (they share
    silences and notifications, not alerts). They are named ``alertmanager``,
    or ``alertmanager-1``, ``alertmanager-2``, ... when there are several.

    >>> [s.name for s in build_sinks("http://a:9093,http://b:9093", "http://hook:5001/")]
    ['alertmanager-1', 'alertmanager-2', 'webhook']
    """
    sinks: list[AlertSink] = []
    urls = [u.strip() for u in (alertmanager_url or "").split(",") if u.strip()]
    if alertmanager_url is not None and not urls:
        raise InvalidArgument("--alertmanager-url is empty")
    for index, url in enumerate(urls, start=1):
        name = "alertmanager" if len(urls) == 1 else f"alertmanager-{index}"
        sinks.append(
            AlertmanagerSink(url, name=name, valid_for=VALID_FOR_RESENDS * resend_interval)
        )
    if webhook_url is not None:
        sinks.append(WebhookSink(webhook_url.strip()))
    return sinks


__all__ = [
    "ALERT_NAMES",
    "ALERT_RULES",
    "DEFAULT_RESEND_INTERVAL",
    "RESEND_INTERVAL_RANGE",
    "Alert",
    "AlertBook",
    "AlertDispatcher",
    "AlertPolicy",
    "AlertRule",
    "AlertSink",
    "AlertStats",
    "AlertmanagerSink",
    "SinkError",
    "SinkStats",
    "WebhookSink",
    "build_sinks",
]
