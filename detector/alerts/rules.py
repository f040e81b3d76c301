"""The one table from event kinds to alerts: each alert's name, severity and summary.

====================  ===========================  ========  ==========================================
event                 alert                        severity  resolves when
====================  ===========================  ========  ==========================================
GROKKING_ONSET        ``GrokkingOnset``            info      the run changes phase away from abstraction
                                                             (grokking is confirmed when it completes,
                                                             so GROKKING_COMPLETE comes with it)
COLLAPSE_ONSET        ``TrainingCollapse``         critical  scope ``training`` (or none): COLLAPSE_END
                                                             of the run with that scope (and series),
                                                             or the run changes phase away from
                                                             collapse
COLLAPSE_ONSET        ``GeneralizationCollapse``   warning   scope ``generalization``: COLLAPSE_END of
                                                             the run with that scope (and series)
LOSS_SPIKE            ``LossSpike``                warning   ``spike_ttl`` after it was raised: a spike
                                                             is transient and has recovered when
                                                             reported
PLATEAU_START         ``TrainingPlateau``          warning   PLATEAU_END of the same series; only for
                                                             ``plateau_roles`` (loss-like series by
                                                             default: a flat learning rate or norm is
                                                             no news)
PHASE_CHANGE          ``PhaseChange``              info      the run's next PHASE_CHANGE
====================  ===========================  ========  ==========================================

A collapse's ``scope`` evidence says what broke: ``training`` (the training
loss or accuracy collapsed, or went non-finite: the run is burning compute) or
``generalization`` (a held-out metric lost what it had gained while the
training metric holds; the event's series is the held-out one). An event with
no scope (stored before scopes existed) counts as a training collapse. A
generalisation collapse need not move the run's phase, so only its
COLLAPSE_END (or the run's end) resolves it.

Besides, every alert of a run resolves when the run ends, or when the run has
sent nothing for ``stale_after`` seconds (see :mod:`detector.alerts.model`).
Other kinds (CHANGE_POINT, HIDDEN_PROGRESS, COLLAPSE_END, ...) raise no
alert: they are in the timeline, the event stream and
``phasewatch_events_total``.
"""

from __future__ import annotations

from dataclasses import dataclass

from detector.core.types import Event, EventKind

ALERT_LABELS = ("alertname", "severity", "run_id", "job", "series")


@dataclass(frozen=True)
class AlertRule:
    """What one event kind raises: the alert's name and severity, and its summary."""

    alertname: str
    severity: str
    summary: str  # str.format'ed with run_id, series, step, phase


# Values of a collapse event's ``scope`` evidence (see the module docstring).
SCOPE_KEY = "scope"
SCOPE_TRAINING = "training"
SCOPE_GENERALIZATION = "generalization"

# A collapse's alert, by scope; an unknown or missing scope is a training collapse.
COLLAPSE_RULES: dict[str, AlertRule] = {
    SCOPE_TRAINING: AlertRule(
        "TrainingCollapse", "critical", "Run {run_id} is collapsing: {series} broke at step {step}"
    ),
    SCOPE_GENERALIZATION: AlertRule(
        "GeneralizationCollapse",
        "warning",
        "Run {run_id} is losing generalisation: {series} gave back its gains at step {step}",
    ),
}

# The one table from event kinds to alerts (explicit: no registry magic).
# COLLAPSE_ONSET is listed with its training rule; :func:`alert_rule` picks the
# rule of the event's scope.
ALERT_RULES: dict[EventKind, AlertRule] = {
    EventKind.GROKKING_ONSET: AlertRule(
        "GrokkingOnset", "info", "Grokking started in run {run_id} at step {step} ({series})"
    ),
    EventKind.COLLAPSE_ONSET: COLLAPSE_RULES[SCOPE_TRAINING],
    EventKind.LOSS_SPIKE: AlertRule(
        "LossSpike", "warning", "{series} of run {run_id} spiked at step {step} and recovered"
    ),
    EventKind.PLATEAU_START: AlertRule(
        "TrainingPlateau", "warning", "{series} of run {run_id} is on a plateau since step {step}"
    ),
    EventKind.PHASE_CHANGE: AlertRule(
        "PhaseChange", "info", "Run {run_id} entered {phase} at step {step}"
    ),
}

# Every alert name the detector can raise.
ALERT_NAMES: frozenset[str] = frozenset(
    rule.alertname for rule in (*ALERT_RULES.values(), *COLLAPSE_RULES.values())
)

# Kinds that resolve alerts without raising one.
RESOLVING_KINDS = frozenset(
    {EventKind.PLATEAU_END, EventKind.COLLAPSE_END}
)


def collapse_scope(event: Event) -> str:
    """The scope of a COLLAPSE_ONSET or COLLAPSE_END: ``training`` unless it says otherwise.

    >>> collapse_scope(Event(step=9, kind=EventKind.COLLAPSE_ONSET, detected_at=9))
    'training'
    """
    scope = event.evidence.get(SCOPE_KEY, "").strip().lower()
    return SCOPE_GENERALIZATION if scope == SCOPE_GENERALIZATION else SCOPE_TRAINING


def alert_rule(event: Event) -> AlertRule | None:
    """The rule ``event`` raises its alert by, or None if it raises none."""
    if event.kind is EventKind.COLLAPSE_ONSET:
        return COLLAPSE_RULES[collapse_scope(event)]
    return ALERT_RULES.get(event.kind)
