"""Alerts from events: names, severities, identity, and when each alert resolves.

Pure state, no I/O and no threads: :class:`AlertBook` turns the engine's events
into alert changes, and the dispatcher's worker thread owns one book.

Labels are identity only (``alertname``, ``severity``, ``run_id``, ``job``,
``series``); everything that varies (step, value, evidence) is an annotation,
so Alertmanager deduplicates re-sends and the replicas of one detector.

Which event raises which alert, and which event resolves it, is the table in
:mod:`detector.alerts.rules`. Besides, every alert of a run resolves when the
run ends, or when the run has sent nothing for ``stale_after`` seconds (the
dispatcher hears of runs from the engine's event hub, :mod:`detector.events`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from detector.alerts.rules import (  # the table's names, importable from here as before
    ALERT_LABELS,
    ALERT_NAMES,
    ALERT_RULES,
    COLLAPSE_RULES,
    RESOLVING_KINDS,
    SCOPE_GENERALIZATION,
    SCOPE_KEY,
    SCOPE_TRAINING,
    AlertRule,
    alert_rule,
    collapse_scope,
)
from detector.core.types import Event, EventKind, Phase, Role, infer_spec
from detector.errors import InvalidArgument

# Evidence keys that carry the quantity an alert is about, in order of preference.
_VALUE_KEYS = ("value", "peak", "rank_fraction", "slope", "to")


@dataclass(frozen=True)
class AlertPolicy:
    """How events become alerts; constructor arguments are checked at once.

    ``runbook_url``: a template such as ``"https://wiki.example/phasewatch#{alertname}"``
    (``{alertname}`` and ``{anchor}``, its lower-case form, are filled in); None
    leaves the ``runbook_url`` annotation out.
    """

    job: str = "phasewatch"
    spike_ttl: float = 600.0
    stale_after: float | None = 3600.0
    plateau_roles: frozenset[Role] = frozenset({Role.LOSS})
    runbook_url: str | None = None

    def __post_init__(self) -> None:
        if not self.job:
            raise InvalidArgument("job must not be empty")
        if not (self.spike_ttl > 0 and math.isfinite(self.spike_ttl)):
            raise InvalidArgument(f"spike_ttl must be a positive number of seconds, got {self.spike_ttl}")
        if self.stale_after is not None and not self.stale_after > 0:
            raise InvalidArgument(f"stale_after must be positive or None, got {self.stale_after}")
        if self.runbook_url is not None:
            try:
                self.runbook_url.format(alertname="X", anchor="x")
            except (KeyError, IndexError, ValueError) as error:
                raise InvalidArgument(
                    f"runbook_url {self.runbook_url!r} may only use {{alertname}} and {{anchor}}: {error}"
                ) from None


@dataclass(frozen=True)
class Alert:
    """One alert as Alertmanager sees it; times are Unix seconds.

    ``ends_at`` is None while the end is unknown; a future ``ends_at`` is a
    known end (a spike's TTL); a past one means resolved.
    """

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: float
    ends_at: float | None = None
    generator_url: str = ""

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        """The identity: the sorted label pairs."""
        return tuple(sorted(self.labels.items()))

    @property
    def run_id(self) -> str:
        return self.labels.get("run_id", "")

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    def resolved(self, now: float) -> bool:
        return self.ends_at is not None and self.ends_at <= now

    @property
    def fingerprint(self) -> str:
        """Alertmanager's fingerprint of the labels (FNV-1a 64 of the sorted pairs).

        >>> Alert(labels={"alertname": "A"}, annotations={}, starts_at=0).fingerprint
        'd2c6efc389df0927'
        """
        return label_fingerprint(self.labels)


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """The fingerprint Prometheus' ``model.LabelSet.Fingerprint`` gives, as 16 hex digits.

    Each sorted name and value is hashed followed by the separator byte 0xff.
    """
    value = 0xCBF29CE484222325  # FNV-1a 64 offset basis
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode() + b"\xff":
                value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def rfc3339(seconds: float) -> str:
    """A Unix time as RFC 3339 in UTC with milliseconds.

    >>> rfc3339(0)
    '1970-01-01T00:00:00.000Z'
    """
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


AlertKey = tuple[tuple[str, str], ...]
PlateauFilter = Callable[[str, str], bool]


class AlertBook:
    """The active alerts of every run; each method returns the alerts it changed.

    A returned alert is either firing (new, or with new annotations) or
    resolved (``ends_at`` set to when it resolved). ``at`` and ``now`` are
    Unix seconds: the dispatcher passes the time an event was published.

    >>> book = AlertBook()
    >>> onset = Event(step=1370, kind=EventKind.GROKKING_ONSET, detected_at=1390, series="val_acc")
    >>> [a.labels["alertname"] for a in book.apply("r1", onset, at=100.0)]
    ['GrokkingOnset']
    >>> [a.resolved(now=101.0) for a in book.resolve_run("r1", at=101.0, reason="the run ended")]
    [True]
    >>> book.active()
    []
    """

    def __init__(
        self, policy: AlertPolicy | None = None, *, is_plateau_series: PlateauFilter | None = None
    ) -> None:
        self.policy = policy or AlertPolicy()
        # Whether a PLATEAU_START on (run_id, series) deserves an alert; the
        # dispatcher asks the engine for the declared role, this default infers it.
        self.is_plateau_series = is_plateau_series or (
            lambda _run_id, series: infer_spec(series).role in self.policy.plateau_roles
        )
        self._runs: dict[str, dict[AlertKey, Alert]] = {}

    # --- changes ---------------------------------------------------------------

    def apply(self, run_id: str, event: Event, at: float) -> list[Alert]:
        """Take one event of ``run_id`` published at ``at``."""
        changed = self._resolutions(run_id, event, at)
        rule = alert_rule(event)
        if rule is None:
            return changed
        if event.kind is EventKind.PLATEAU_START and not self.is_plateau_series(run_id, event.series):
            return changed
        labels = {
            "alertname": rule.alertname,
            "severity": rule.severity,
            "run_id": run_id,
            "job": self.policy.job,
            "series": event.series,
        }
        alert = Alert(labels=labels, annotations=self._annotations(rule, run_id, event), starts_at=at)
        active = self._runs.setdefault(run_id, {})
        previous = active.get(alert.key)
        if previous is not None and not previous.resolved(at):
            # The same alert again (a second spike while the first is fresh):
            # Alertmanager merges it, so keep its start and refresh the rest.
            alert = replace(alert, starts_at=previous.starts_at)
        if event.kind is EventKind.LOSS_SPIKE:
            alert = replace(alert, ends_at=at + self.policy.spike_ttl)
        active[alert.key] = alert
        return [*changed, alert]

    def resolve_run(self, run_id: str, at: float, reason: str) -> list[Alert]:
        """Resolve every alert of a run (it ended, or went quiet)."""
        active = self._runs.pop(run_id, {})
        return [_resolve(alert, at, reason) for alert in active.values()]

    def forget_run(self, run_id: str) -> None:
        """Stop tracking a run's alerts without resolving them (another replica has it).

        Alertmanager resolves them itself once they are no longer re-sent.
        """
        self._runs.pop(run_id, None)

    def expire(self, now: float) -> list[Alert]:
        """Remove the alerts whose known end has passed and return them, resolved."""
        expired: list[Alert] = []
        for run_id in list(self._runs):
            active = self._runs[run_id]
            for key, alert in list(active.items()):
                if alert.resolved(now):
                    del active[key]
                    expired.append(alert)
            if not active:
                del self._runs[run_id]
        return expired

    # --- reads -----------------------------------------------------------------

    def active(self) -> list[Alert]:
        return [alert for active in self._runs.values() for alert in active.values()]

    def run_ids(self) -> list[str]:
        return list(self._runs)

    def next_expiry(self) -> float | None:
        ends = [a.ends_at for a in self.active() if a.ends_at is not None]
        return min(ends) if ends else None

    def __len__(self) -> int:
        return sum(len(active) for active in self._runs.values())

    # --- internals ---------------------------------------------------------------

    def _resolutions(self, run_id: str, event: Event, at: float) -> list[Alert]:
        active = self._runs.get(run_id)
        if not active:
            return []
        if event.kind is EventKind.PLATEAU_END:
            return self._resolve_where(
                active, at, "the plateau ended",
                lambda a: a.alertname == "TrainingPlateau" and a.labels["series"] == event.series,
            )
        if event.kind is EventKind.COLLAPSE_END:
            rule = COLLAPSE_RULES[collapse_scope(event)]
            return self._resolve_where(
                active, at, "the run recovered from the collapse",
                lambda a: a.alertname == rule.alertname
                and (not event.series or a.labels["series"] == event.series),
            )
        if event.kind is EventKind.PHASE_CHANGE:
            to = _phase_of(event)
            left = {"GrokkingOnset": Phase.ABSTRACTION, "TrainingCollapse": Phase.COLLAPSE}
            return self._resolve_where(
                active, at, f"the run entered {to.value if to else 'another phase'}",
                lambda a: a.alertname == "PhaseChange"
                or (a.alertname in left and to is not None and to is not left[a.alertname]),
            )
        return []

    def _resolve_where(
        self,
        active: dict[AlertKey, Alert],
        at: float,
        reason: str,
        matches: Callable[[Alert], bool],
    ) -> list[Alert]:
        resolved = []
        for key, alert in list(active.items()):
            if matches(alert):
                del active[key]
                resolved.append(_resolve(alert, at, reason))
        return resolved

    def _annotations(self, rule: AlertRule, run_id: str, event: Event) -> dict[str, str]:
        phase = _phase_of(event)
        annotations = {
            "summary": rule.summary.format(
                run_id=run_id,
                series=event.series or "the run",
                step=event.step,
                phase=phase.value if phase else "a new phase",
            ),
            "description": (
                f"{event.message or event.kind.value} (confidence {event.confidence:.2f}, "
                f"detected at step {event.detected_at})"
            ),
            "step": str(event.step),
            "detected_at_step": str(event.detected_at),
            "value": _value_of(event),
            "confidence": f"{event.confidence:.3g}",
            "evidence": json.dumps(event.evidence, sort_keys=True, separators=(",", ":")),
        }
        if phase is not None:
            annotations["phase"] = phase.value
        if self.policy.runbook_url is not None:
            annotations["runbook_url"] = self.policy.runbook_url.format(
                alertname=rule.alertname, anchor=rule.alertname.lower()
            )
        return annotations


def _resolve(alert: Alert, at: float, reason: str) -> Alert:
    # A spike whose TTL ends before `at` resolved then, not later.
    ends_at = at if alert.ends_at is None else min(alert.ends_at, at)
    return replace(alert, ends_at=ends_at, annotations={**alert.annotations, "resolved_because": reason})


def _phase_of(event: Event) -> Phase | None:
    if event.phase is not None:
        return event.phase
    try:
        return Phase(event.evidence.get("to", ""))
    except ValueError:
        return None


def _value_of(event: Event) -> str:
    for key in _VALUE_KEYS:
        if key in event.evidence:
            return event.evidence[key]
    return ""


def active_by_run(alerts: Iterable[Alert]) -> dict[str, list[Alert]]:
    """Alerts grouped by their ``run_id`` label, in first-seen order."""
    groups: dict[str, list[Alert]] = {}
    for alert in alerts:
        groups.setdefault(alert.run_id, []).append(alert)
    return groups


__all__ = [
    "ALERT_LABELS",
    "ALERT_NAMES",
    "ALERT_RULES",
    "COLLAPSE_RULES",
    "RESOLVING_KINDS",
    "SCOPE_GENERALIZATION",
    "SCOPE_KEY",
    "SCOPE_TRAINING",
    "Alert",
    "AlertBook",
    "AlertPolicy",
    "AlertRule",
    "active_by_run",
    "alert_rule",
    "collapse_scope",
    "label_fingerprint",
    "rfc3339",
]
