"""Where alerts go: Alertmanager's API v2 and a generic webhook.

A sink makes one delivery attempt per :meth:`AlertSink.send` and raises
:class:`SinkError` when it fails; retries, backoff and counting are the
dispatcher's. HTTP is the standard library's ``urllib``: two JSON POSTs do not
justify a dependency, and urllib's blocking calls suit a worker thread.
"""

from __future__ import annotations

import abc
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from detector.alerts.model import Alert, active_by_run, rfc3339
from detector.errors import InvalidArgument

DEFAULT_TIMEOUT = 5.0
# What Alertmanager's webhook shows as the end of an alert still firing (Go's zero time).
ZERO_TIME = "0001-01-01T00:00:00Z"
# Client errors that a later attempt may not repeat.
_RETRYABLE_STATUS = frozenset({408, 425, 429})


class SinkError(Exception):
    """A failed delivery. ``retryable`` is False when resending the same alerts cannot
    succeed (the receiver rejected them as malformed): the dispatcher drops them."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class AlertSink(abc.ABC):
    """One destination of alerts.

    ``name`` labels the sink's metrics. ``resends_active``: whether the
    dispatcher re-sends every active alert periodically (Alertmanager expects
    that; a notification webhook wants only changes).
    """

    name: str = "sink"
    resends_active: bool = False

    @abc.abstractmethod
    def send(self, alerts: Sequence[Alert], now: float) -> None:
        """Deliver ``alerts`` (firing and resolved) in one attempt; raise SinkError if not."""


class AlertmanagerSink(AlertSink):
    """``POST /api/v2/alerts`` to an Alertmanager.

    Firing alerts are posted with ``endsAt`` = now + ``valid_for`` (or their
    known end, if sooner), as Prometheus does with four resend intervals: if
    this detector dies, Alertmanager resolves them itself instead of keeping
    them forever. Resolved alerts carry the time they resolved.

    >>> sink = AlertmanagerSink("http://127.0.0.1:9093/", valid_for=240)
    >>> sink.endpoint
    'http://127.0.0.1:9093/api/v2/alerts'
    """

    resends_active = True

    def __init__(
        self,
        url: str,
        *,
        name: str = "alertmanager",
        valid_for: float = 240.0,
        timeout: float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not valid_for > 0 or not timeout > 0:
            raise InvalidArgument("valid_for and timeout must be positive")
        self.url = url
        self.name = name
        bare, auth = _split_auth(url)
        # A path prefix (Alertmanager's --web.route-prefix, a proxy) is kept.
        self.endpoint = bare.rstrip("/") + "/api/v2/alerts"
        self.valid_for = valid_for
        self.timeout = timeout
        self.headers = {**auth, **(headers or {})}

    def payload(self, alerts: Sequence[Alert], now: float) -> list[dict[str, Any]]:
        """The ``postableAlerts`` body."""
        body = []
        for alert in alerts:
            # resolved() means ends_at is set; mypy cannot see that through the call.
            ends_at = alert.ends_at if alert.resolved(now) and alert.ends_at is not None else min(
                now + self.valid_for, alert.ends_at if alert.ends_at is not None else float("inf")
            )
            item: dict[str, Any] = {
                "labels": dict(alert.labels),
                "annotations": dict(alert.annotations),
                "startsAt": rfc3339(alert.starts_at),
                "endsAt": rfc3339(ends_at),
            }
            if alert.generator_url:
                item["generatorURL"] = alert.generator_url
            body.append(item)
        return body

    def send(self, alerts: Sequence[Alert], now: float) -> None:
        if alerts:
            post_json(self.endpoint, self.payload(alerts, now), self.timeout, self.headers)

    def __repr__(self) -> str:
        return f"AlertmanagerSink({_redact(self.url)!r})"


class WebhookSink(AlertSink):
    """POSTs Alertmanager's webhook payload (version 4), so existing receivers work.

    Alerts are grouped by run: one POST per run with changes, holding every
    alert of that run that is firing or just resolved, with
    ``groupLabels = {"run_id": ...}`` and ``groupKey`` shaped like
    Alertmanager's (``{}:{run_id="..."}``). Firing alerts with no known end
    show Alertmanager's zero time as ``endsAt``. Delivery is at least once: a
    retry after a partial failure repeats the runs already posted.
    """

    resends_active = False

    def __init__(
        self,
        url: str,
        *,
        name: str = "webhook",
        receiver: str = "phasewatch",
        external_url: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not timeout > 0:
            raise InvalidArgument("timeout must be positive")
        self.url = url
        self.name = name
        self.endpoint, auth = _split_auth(url)
        self.receiver = receiver
        self.external_url = external_url
        self.timeout = timeout
        self.headers = {**auth, **(headers or {})}

    def payloads(self, alerts: Sequence[Alert], now: float) -> list[dict[str, Any]]:
        """One webhook message per run, in the order the runs first appear."""
        return [self._message(run_id, group, now) for run_id, group in active_by_run(alerts).items()]

    def _message(self, run_id: str, alerts: list[Alert], now: float) -> dict[str, Any]:
        common_labels = dict(alerts[0].labels)
        common_annotations = dict(alerts[0].annotations)
        for alert in alerts[1:]:
            common_labels = {k: v for k, v in common_labels.items() if alert.labels.get(k) == v}
            common_annotations = {
                k: v for k, v in common_annotations.items() if alert.annotations.get(k) == v
            }
        firing = any(not a.resolved(now) for a in alerts)
        return {
            "version": "4",
            # Alertmanager's shape: route matchers, then the group labels, Go-quoted.
            "groupKey": "{}:{run_id=" + json.dumps(run_id, ensure_ascii=False) + "}",
            "truncatedAlerts": 0,
            "status": "firing" if firing else "resolved",
            "receiver": self.receiver,
            "groupLabels": {"run_id": run_id},
            "commonLabels": common_labels,
            "commonAnnotations": common_annotations,
            "externalURL": self.external_url,
            "alerts": [self._alert(a, now) for a in alerts],
        }

    @staticmethod
    def _alert(alert: Alert, now: float) -> dict[str, Any]:
        resolved = alert.resolved(now)
        return {
            "status": "resolved" if resolved else "firing",
            "labels": dict(alert.labels),
            "annotations": dict(alert.annotations),
            "startsAt": rfc3339(alert.starts_at),
            "endsAt": rfc3339(alert.ends_at) if alert.ends_at is not None else ZERO_TIME,
            "generatorURL": alert.generator_url,
            "fingerprint": alert.fingerprint,
        }

    def send(self, alerts: Sequence[Alert], now: float) -> None:
        for message in self.payloads(alerts, now):
            post_json(self.endpoint, message, self.timeout, self.headers)

    def __repr__(self) -> str:
        return f"WebhookSink({_redact(self.url)!r})"


def post_json(url: str, body: Any, timeout: float, headers: Mapping[str, str] | None = None) -> None:
    """POST ``body`` as JSON; any answer but 2xx raises :class:`SinkError`."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "phasewatch", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as error:
        detail = error.read(300).decode(errors="replace").strip()
        error.close()
        retryable = error.code >= 500 or error.code in _RETRYABLE_STATUS
        raise SinkError(
            f"{_redact(url)} answered HTTP {error.code}: {detail}", retryable=retryable
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise SinkError(f"cannot reach {_redact(url)}: {reason}") from None


def _split_auth(url: str) -> tuple[str, dict[str, str]]:
    """Check an alert URL; move ``user:password@`` into a basic Authorization header
    (urllib does not read credentials from the URL)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidArgument(f"alert URL {_redact(url)!r} is not an http(s)://HOST[:PORT] URL")
    if parsed.username is None:
        return url, {}
    userinfo = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
    netloc = parsed.netloc.rpartition("@")[2]
    bare = urllib.parse.urlunsplit(parsed._replace(netloc=netloc))
    return bare, {"Authorization": "Basic " + base64.b64encode(userinfo.encode()).decode()}


def _redact(url: str) -> str:
    """The URL without a password, for logs and errors."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))
