"""Alerts: the event-to-alert rules, the sinks' payloads against a local HTTP
server, and the dispatcher's queue, retries, re-sends and resolutions."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from detector.alerts import (
    ALERT_RULES,
    AlertBook,
    AlertDispatcher,
    AlertmanagerSink,
    AlertPolicy,
    AlertSink,
    SinkError,
    WebhookSink,
    build_sinks,
)
from detector.alerts.model import Alert, label_fingerprint, rfc3339
from detector.core.types import Event, EventKind, Phase
from detector.engine import Engine
from detector.errors import InvalidArgument
from detector.server import EventBus
from tests.helpers import read_rows, rows_to_columns, shared_dir
from tests.observability import Receiver, free_port, wait_for

IDENTITY = {"alertname", "severity", "run_id", "job", "series"}


def ev(kind: EventKind, step: int, series: str = "train_loss", **kw: Any) -> Event:
    return Event(step=step, kind=kind, detected_at=kw.pop("detected_at", step), series=series, **kw)


# --- the rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "alertname", "severity"),
    [
        (EventKind.GROKKING_ONSET, "GrokkingOnset", "info"),
        (EventKind.COLLAPSE_ONSET, "TrainingCollapse", "critical"),
        (EventKind.LOSS_SPIKE, "LossSpike", "warning"),
        (EventKind.PLATEAU_START, "TrainingPlateau", "warning"),
        (EventKind.PHASE_CHANGE, "PhaseChange", "info"),
    ],
)
def test_each_kind_raises_its_alert_with_identity_labels_only(kind, alertname, severity):
    book = AlertBook(AlertPolicy(job="pw", runbook_url="https://runbooks.example/pw#{anchor}"))
    event = ev(kind, 1370, "val_loss", detected_at=1390, confidence=0.875,
               message="something happened", evidence={"value": "0.42", "test": "t"},
               phase=Phase.ABSTRACTION if kind is EventKind.PHASE_CHANGE else None)
    [alert] = book.apply("run-7", event, at=1000.0)
    assert alert.labels == {"alertname": alertname, "severity": severity, "run_id": "run-7",
                            "job": "pw", "series": "val_loss"}
    notes = alert.annotations
    assert {"summary", "description", "step", "value", "evidence", "runbook_url"} <= set(notes)
    assert notes["step"] == "1370" and notes["detected_at_step"] == "1390"
    assert notes["value"] == "0.42"
    assert json.loads(notes["evidence"]) == {"value": "0.42", "test": "t"}
    assert "run-7" in notes["summary"] and "something happened" in notes["description"]
    assert notes["runbook_url"] == f"https://runbooks.example/pw#{alertname.lower()}"
    assert alert.starts_at == 1000.0
    # Only a spike knows its end in advance (its TTL); the others fire until resolved.
    assert alert.ends_at == (1600.0 if kind is EventKind.LOSS_SPIKE else None)


def test_kinds_without_alerts_raise_none():
    book = AlertBook()
    for kind in set(EventKind) - set(ALERT_RULES):
        assert book.apply("r", ev(kind, 5), at=1.0) == []
    assert book.active() == []


def test_plateaus_alert_only_for_loss_like_series():
    book = AlertBook()
    assert book.apply("r", ev(EventKind.PLATEAU_START, 0, "lr"), at=1.0) == []
    assert book.apply("r", ev(EventKind.PLATEAU_START, 0, "weight_norm"), at=1.0) == []
    assert len(book.apply("r", ev(EventKind.PLATEAU_START, 50, "test_loss"), at=1.0)) == 1


def test_plateau_resolves_by_the_end_of_the_same_series():
    book = AlertBook()
    book.apply("r", ev(EventKind.PLATEAU_START, 50, "train_loss"), at=1.0)
    book.apply("r", ev(EventKind.PLATEAU_START, 60, "val_loss"), at=2.0)
    [resolved] = book.apply("r", ev(EventKind.PLATEAU_END, 90, "val_loss"), at=3.0)
    assert resolved.labels["series"] == "val_loss" and resolved.ends_at == 3.0
    assert resolved.annotations["resolved_because"] == "the plateau ended"
    assert [a.labels["series"] for a in book.active()] == ["train_loss"]
    assert book.apply("other-run", ev(EventKind.PLATEAU_END, 90, "train_loss"), at=4.0) == []


def test_grokking_resolves_when_the_run_leaves_abstraction_not_when_complete():
    book = AlertBook()
    book.apply("b", ev(EventKind.GROKKING_ONSET, 10, "val_acc"), at=1.0)
    # Grokking is confirmed when it completes: both come on one line.
    assert book.apply("b", ev(EventKind.GROKKING_COMPLETE, 20, "val_acc"), at=2.0) == []
    changes = book.apply("b", ev(EventKind.PHASE_CHANGE, 30, "val_acc", phase=Phase.STABILIZATION,
                                 evidence={"from": "abstraction", "to": "stabilization"}), at=3.0)
    assert [(a.labels["alertname"], a.resolved(3.0)) for a in changes] == [
        ("GrokkingOnset", True), ("PhaseChange", False)]


def test_phase_change_replaces_the_previous_one_and_collapse_stays():
    book = AlertBook()
    book.apply("r", ev(EventKind.PHASE_CHANGE, 10, "val_acc", phase=Phase.ABSTRACTION), at=1.0)
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 20, "train_loss", phase=Phase.COLLAPSE), at=2.0)
    changes = book.apply("r", ev(EventKind.PHASE_CHANGE, 20, "train_loss", phase=Phase.COLLAPSE),
                         at=2.0)
    assert [(a.labels["alertname"], a.labels["series"], a.resolved(2.0)) for a in changes] == [
        ("PhaseChange", "val_acc", True), ("PhaseChange", "train_loss", False)]
    assert sorted(a.labels["alertname"] for a in book.active()) == ["PhaseChange",
                                                                    "TrainingCollapse"]
    assert changes[1].annotations["phase"] == "collapse"


TRAINING = {"scope": "training"}
GENERALIZATION = {"scope": "generalization"}


def test_collapse_alert_depends_on_its_scope():
    book = AlertBook()
    [training] = book.apply("r", ev(EventKind.COLLAPSE_ONSET, 20, "train_loss", evidence=TRAINING),
                            at=1.0)
    [held_out] = book.apply("r", ev(EventKind.COLLAPSE_ONSET, 30, "val_acc",
                                    evidence=GENERALIZATION), at=2.0)
    [no_scope] = book.apply("old", ev(EventKind.COLLAPSE_ONSET, 20, "train_loss"), at=3.0)
    assert (training.labels["alertname"], training.labels["severity"]) == ("TrainingCollapse",
                                                                           "critical")
    assert (held_out.labels["alertname"], held_out.labels["severity"]) == (
        "GeneralizationCollapse", "warning")
    assert held_out.labels["series"] == "val_acc"
    assert "val_acc" in held_out.annotations["summary"]
    assert json.loads(held_out.annotations["evidence"]) == GENERALIZATION
    # Stored events from before scopes existed are training collapses.
    assert (no_scope.labels["alertname"], no_scope.labels["severity"]) == ("TrainingCollapse",
                                                                           "critical")


def test_a_generalization_collapse_raises_no_training_collapse():
    book = AlertBook()
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 30, "val_loss", evidence=GENERALIZATION), at=1.0)
    assert [(a.labels["alertname"], a.labels["severity"]) for a in book.active()] == [
        ("GeneralizationCollapse", "warning")]


def test_collapse_end_resolves_the_collapse_of_its_scope_only():
    book = AlertBook()
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 20, "train_loss", evidence=TRAINING), at=1.0)
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 30, "val_acc", evidence=GENERALIZATION), at=2.0)
    book.apply("other", ev(EventKind.COLLAPSE_ONSET, 30, "val_acc", evidence=GENERALIZATION),
               at=2.0)
    # A generalisation collapse ending does not resolve the training collapse, nor
    # another run's generalisation collapse; COLLAPSE_END itself raises nothing.
    [ended] = book.apply("r", ev(EventKind.COLLAPSE_END, 80, "val_acc", evidence=GENERALIZATION),
                         at=3.0)
    assert ended.labels["alertname"] == "GeneralizationCollapse" and ended.resolved(3.0)
    assert ended.annotations["resolved_because"] == "the run recovered from the collapse"
    assert sorted((a.run_id, a.labels["alertname"]) for a in book.active()) == [
        ("other", "GeneralizationCollapse"), ("r", "TrainingCollapse")]
    # A training COLLAPSE_END of another series leaves it; the same series resolves it.
    assert book.apply("r", ev(EventKind.COLLAPSE_END, 90, "train_acc", evidence=TRAINING),
                      at=4.0) == []
    [recovered] = book.apply("r", ev(EventKind.COLLAPSE_END, 90, "train_loss", evidence=TRAINING),
                             at=5.0)
    assert recovered.labels["alertname"] == "TrainingCollapse" and recovered.resolved(5.0)
    assert [(a.run_id, a.labels["alertname"]) for a in book.active()] == [
        ("other", "GeneralizationCollapse")]


def test_a_training_collapse_end_leaves_a_generalization_collapse_firing():
    book = AlertBook()
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 30, "val_acc", evidence=GENERALIZATION), at=1.0)
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 40, "train_loss"), at=2.0)  # no scope: training
    [ended] = book.apply("r", ev(EventKind.COLLAPSE_END, 90, "train_loss"), at=3.0)
    assert ended.labels["alertname"] == "TrainingCollapse"
    assert [a.labels["alertname"] for a in book.active()] == ["GeneralizationCollapse"]
    # A COLLAPSE_END without a series ends every collapse of its scope in the run.
    [ended] = book.apply("r", ev(EventKind.COLLAPSE_END, 95, "", evidence=GENERALIZATION), at=4.0)
    assert ended.labels["alertname"] == "GeneralizationCollapse" and book.active() == []


def test_leaving_the_collapse_phase_resolves_only_the_training_collapse():
    book = AlertBook()
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 20, "train_loss", evidence=TRAINING), at=1.0)
    book.apply("r", ev(EventKind.COLLAPSE_ONSET, 30, "val_acc", evidence=GENERALIZATION), at=1.0)
    changes = book.apply("r", ev(EventKind.PHASE_CHANGE, 90, "train_loss",
                                 phase=Phase.STABILIZATION), at=2.0)
    assert [(a.labels["alertname"], a.resolved(2.0)) for a in changes] == [
        ("TrainingCollapse", True), ("PhaseChange", False)]
    assert sorted(a.labels["alertname"] for a in book.active()) == ["GeneralizationCollapse",
                                                                    "PhaseChange"]


def test_spike_alerts_expire_after_their_ttl():
    book = AlertBook(AlertPolicy(spike_ttl=60.0))
    [spike] = book.apply("r", ev(EventKind.LOSS_SPIKE, 9, evidence={"peak": "7.1"}), at=100.0)
    assert spike.ends_at == 160.0 and spike.annotations["value"] == "7.1"
    assert book.next_expiry() == 160.0
    # A second spike of the same series while the first is fresh: one alert, extended.
    [again] = book.apply("r", ev(EventKind.LOSS_SPIKE, 19), at=130.0)
    assert again.starts_at == 100.0 and again.ends_at == 190.0 and len(book) == 1
    assert book.expire(now=189.0) == []
    [gone] = book.expire(now=190.0)
    assert gone.resolved(190.0) and len(book) == 0


def test_resolve_run_resolves_every_alert_of_that_run_only():
    book = AlertBook()
    book.apply("a", ev(EventKind.COLLAPSE_ONSET, 5), at=1.0)
    book.apply("a", ev(EventKind.PLATEAU_START, 6), at=1.0)
    book.apply("b", ev(EventKind.COLLAPSE_ONSET, 5), at=1.0)
    resolved = book.resolve_run("a", at=9.0, reason="the run ended")
    assert len(resolved) == 2 and all(a.ends_at == 9.0 for a in resolved)
    assert all(a.annotations["resolved_because"] == "the run ended" for a in resolved)
    assert book.run_ids() == ["b"]


def test_policy_checks_its_settings():
    for bad in ({"job": ""}, {"spike_ttl": 0}, {"stale_after": -1},
                {"runbook_url": "https://x/{nope}"}):
        with pytest.raises(InvalidArgument):
            AlertPolicy(**bad)


def test_fingerprint_and_time_format():
    # The value Alertmanager computes for these labels (checked against a real
    # one in test_observability.py).
    assert label_fingerprint({"alertname": "A"}) == "d2c6efc389df0927"
    assert label_fingerprint({"b": "2", "a": "1"}) == label_fingerprint({"a": "1", "b": "2"})
    assert label_fingerprint({"a": "12"}) != label_fingerprint({"a1": "2"})  # separators count
    assert rfc3339(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


def _engine_events(name: str) -> tuple[Engine, list[Event]]:
    engine = Engine()
    engine.start_run(name)
    result = engine.ingest(name, rows_to_columns(read_rows(shared_dir("runs", f"{name}.jsonl"))))
    return engine, [*result.events, *engine.end_run(name)]


def test_a_grokking_run_raises_and_resolves_grokking_onset():
    _, events = _engine_events("grok_add_0")
    book = AlertBook()
    history: list[tuple[str, str, bool]] = []
    for event in events:
        for alert in book.apply("g", event, at=float(event.detected_at)):
            history.append((alert.labels["alertname"], alert.labels["series"],
                            alert.resolved(float(event.detected_at))))
    assert ("GrokkingOnset", "test_acc", False) in history
    assert ("GrokkingOnset", "test_acc", True) in history  # the run stabilised
    assert ("TrainingCollapse", "train_loss", False) not in history
    # Plateaus of lr, norms and ranks raise nothing.
    assert {s for name, s, _ in history if name == "TrainingPlateau"} <= {"train_loss", "test_loss"}


def test_a_collapsing_run_keeps_its_collapse_alert_firing():
    _, events = _engine_events("collapse_lr_0")
    book = AlertBook()
    for event in events:
        book.apply("c", event, at=float(event.detected_at))
    active = {a.labels["alertname"] for a in book.active()}
    assert "TrainingCollapse" in active


# --- sinks against a local HTTP server ---------------------------------------------------


def _alert(name: str = "GrokkingOnset", run_id: str = "r1", ends_at: float | None = None,
           **notes: str) -> Alert:
    labels = {"alertname": name, "severity": "info", "run_id": run_id, "job": "phasewatch",
              "series": "val_acc"}
    return Alert(labels=labels, annotations={"summary": f"{name} in {run_id}", **notes},
                 starts_at=1_700_000_000.0, ends_at=ends_at)


def test_alertmanager_sink_posts_postable_alerts():
    with Receiver() as receiver:
        sink = AlertmanagerSink(receiver.url + "/am/", valid_for=240.0)
        now = 1_700_000_100.0
        sink.send([_alert(), _alert("TrainingCollapse", ends_at=now - 5)], now)
        [request] = receiver.requests
    assert request["path"] == "/am/api/v2/alerts"
    assert request["headers"]["Content-Type"] == "application/json"
    firing, resolved = request["json"]
    assert set(firing) == {"labels", "annotations", "startsAt", "endsAt"}
    assert set(firing["labels"]) == IDENTITY
    assert firing["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert firing["endsAt"] == rfc3339(now + 240.0)  # valid for four resends
    assert resolved["endsAt"] == rfc3339(now - 5)


def test_alertmanager_sink_sends_basic_auth_from_the_url():
    with Receiver() as receiver:
        url = receiver.url.replace("http://", "http://ops:s%40cret@")
        sink = AlertmanagerSink(url)
        assert "s%40cret" not in repr(sink) and "***" in repr(sink)
        sink.send([_alert()], time.time())
        [request] = receiver.requests
    assert request["headers"]["Authorization"] == "Basic b3BzOnNAY3JldA=="  # ops:s@cret


def test_webhook_sink_posts_alertmanager_webhook_payload_per_run():
    with Receiver() as receiver:
        sink = WebhookSink(receiver.url + "/hook", receiver="ml", external_url="http://pw:9109")
        now = 1_700_000_100.0
        sink.send([
            _alert(run_id="r1", description="same"),
            _alert("TrainingPlateau", run_id="r1", description="same", ends_at=now - 1),
            _alert(run_id="r2"),
        ], now)
        first, second = receiver.bodies()
    assert set(first) == {"version", "groupKey", "truncatedAlerts", "status", "receiver",
                          "groupLabels", "commonLabels", "commonAnnotations", "externalURL",
                          "alerts"}
    assert first["version"] == "4" and first["truncatedAlerts"] == 0
    assert first["groupKey"] == '{}:{run_id="r1"}' and first["groupLabels"] == {"run_id": "r1"}
    assert first["receiver"] == "ml" and first["externalURL"] == "http://pw:9109"
    assert first["status"] == "firing"  # one of its alerts still fires
    assert first["commonLabels"] == {"severity": "info", "run_id": "r1", "job": "phasewatch",
                                     "series": "val_acc"}
    assert first["commonAnnotations"] == {"description": "same"}
    onset, plateau = first["alerts"]
    assert onset["status"] == "firing" and onset["endsAt"] == "0001-01-01T00:00:00Z"
    assert plateau["status"] == "resolved" and plateau["endsAt"] == rfc3339(now - 1)
    assert onset["fingerprint"] == label_fingerprint(onset["labels"])
    assert set(onset) == {"status", "labels", "annotations", "startsAt", "endsAt",
                          "generatorURL", "fingerprint"}
    assert second["groupLabels"] == {"run_id": "r2"} and len(second["alerts"]) == 1


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True),
                                                   (400, False), (404, False)])
def test_sink_errors_say_whether_a_retry_can_help(status, retryable):
    with Receiver() as receiver:
        receiver.statuses.append(status)
        with pytest.raises(SinkError) as caught:
            AlertmanagerSink(receiver.url).send([_alert()], time.time())
    assert caught.value.retryable is retryable and str(status) in str(caught.value)


def test_unreachable_sink_is_a_retryable_error():
    with pytest.raises(SinkError) as caught:
        WebhookSink(f"http://127.0.0.1:{free_port()}/", timeout=2).send([_alert()], time.time())
    assert caught.value.retryable and "cannot reach" in str(caught.value)


def test_sink_urls_are_checked():
    for url in ("ftp://x", "127.0.0.1:9093", "http://"):
        with pytest.raises(InvalidArgument):
            AlertmanagerSink(url)
    with pytest.raises(InvalidArgument):
        build_sinks(alertmanager_url=" , ")
    assert build_sinks() == []
    [am] = build_sinks("http://am:9093", resend_interval=30)
    assert am.name == "alertmanager" and am.valid_for == 120


# --- the dispatcher -------------------------------------------------------------------------


def _dispatcher(*sinks: AlertSink, **kw: Any) -> AlertDispatcher:
    kw.setdefault("retry_initial", 0.05)
    kw.setdefault("retry_max", 0.2)
    kw.setdefault("check_interval", 0.05)
    return AlertDispatcher(list(sinks), **kw)


def _names(body: list[dict]) -> list[str]:
    return [a["labels"]["alertname"] for a in body]


def test_dispatcher_delivers_new_alerts_to_every_sink():
    with Receiver() as am, Receiver() as hook:
        dispatcher = _dispatcher(AlertmanagerSink(am.url), WebhookSink(hook.url))
        try:
            assert dispatcher.submit("r1", [ev(EventKind.CHANGE_POINT, 3),
                                            ev(EventKind.GROKKING_ONSET, 5, "val_acc")])
            assert dispatcher.flush(5)
            [body] = am.bodies()
            assert _names(body) == ["GrokkingOnset"]
            [message] = hook.bodies()
            assert message["status"] == "firing" and len(message["alerts"]) == 1
            stats = dispatcher.stats()
            assert stats.active == 1
            assert [(s.name, s.sent, s.failures, s.pending) for s in stats.sinks] == [
                ("alertmanager", 1, 0, 0), ("webhook", 1, 0, 0)]
        finally:
            dispatcher.close()


def test_dispatcher_retries_with_backoff_and_loses_nothing():
    with Receiver() as am:
        am.statuses.extend([503, 503, 503])
        dispatcher = _dispatcher(AlertmanagerSink(am.url), retry_initial=0.1, retry_max=0.8)
        try:
            dispatcher.submit("r1", [ev(EventKind.GROKKING_ONSET, 5, "val_acc")])
            time.sleep(0.02)
            dispatcher.submit("r1", [ev(EventKind.PLATEAU_START, 6, "train_loss")])
            assert dispatcher.flush(10)
        finally:
            dispatcher.close()
        attempts = am.requests
    assert [r["status"] for r in attempts] == [503, 503, 503, 200]
    gaps = [b["time"] - a["time"] for a, b in zip(attempts, attempts[1:], strict=False)]
    # The waits double (less up to 20 % jitter): 0.1, 0.2, 0.4 s.
    assert gaps[1] > gaps[0] * 1.3 and gaps[2] > gaps[1] * 1.3
    # The last, successful attempt carries everything that changed meanwhile.
    assert sorted(_names(attempts[-1]["json"])) == ["GrokkingOnset", "TrainingPlateau"]
    [sink] = dispatcher.stats().sinks
    assert (sink.failures, sink.sent, sink.pending) == (3, 2, 0)


def test_dispatcher_drops_what_the_receiver_rejects():
    with Receiver() as am:
        am.statuses.append(400)
        dispatcher = _dispatcher(AlertmanagerSink(am.url))
        try:
            dispatcher.submit("r1", [ev(EventKind.GROKKING_ONSET, 5, "val_acc")])
            assert dispatcher.flush(5)
            assert len(am.requests) == 1  # no retry of a bad request
            [sink] = dispatcher.stats().sinks
            assert (sink.failures, sink.discarded, sink.pending) == (1, 1, 0)
        finally:
            dispatcher.close()


def test_dispatcher_resends_active_alerts_to_alertmanager_only():
    with Receiver() as am, Receiver() as hook:
        dispatcher = _dispatcher(AlertmanagerSink(am.url), WebhookSink(hook.url),
                                 resend_interval=0.2)
        try:
            dispatcher.submit("r1", [ev(EventKind.COLLAPSE_ONSET, 5)])
            wait_for(lambda: len(am.requests) >= 4, 5, "three re-sends")
            assert all(_names(body) == ["TrainingCollapse"] for body in am.bodies())
            assert len(hook.requests) == 1  # a webhook hears of changes only
        finally:
            dispatcher.close()


def test_dispatcher_resolves_a_generalization_collapse_by_its_end():
    with Receiver() as hook:
        dispatcher = _dispatcher(WebhookSink(hook.url))
        try:
            dispatcher.submit("r1", [ev(EventKind.COLLAPSE_ONSET, 30, "val_acc",
                                        evidence=GENERALIZATION)])
            assert dispatcher.flush(5)
            dispatcher.submit("r1", [ev(EventKind.COLLAPSE_END, 90, "val_acc",
                                        evidence=GENERALIZATION)])
            assert dispatcher.flush(5)
            assert dispatcher.active_alerts() == ()
        finally:
            dispatcher.close()
    messages = hook.bodies()
    assert [m["status"] for m in messages] == ["firing", "resolved"]
    assert [_names(m["alerts"]) for m in messages] == [["GeneralizationCollapse"]] * 2
    assert messages[0]["alerts"][0]["labels"]["severity"] == "warning"


class _Stuck(AlertSink):
    """A sink that blocks until released: detection must not notice."""

    name = "stuck"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, alerts, now):
        self.entered.set()
        self.release.wait(10)


def test_a_stuck_sink_never_blocks_submit_and_drops_are_counted():
    sink = _Stuck()
    dispatcher = _dispatcher(sink, queue_size=5)
    try:
        dispatcher.submit("r", [ev(EventKind.COLLAPSE_ONSET, 0)])
        assert sink.entered.wait(5)  # the worker is now inside send()
        started = time.monotonic()
        results = [dispatcher.submit("r", [ev(EventKind.LOSS_SPIKE, i)]) for i in range(50)]
        assert time.monotonic() - started < 0.5
        assert results[:5] == [True] * 5 and not any(results[5:])
        assert dispatcher.stats().events_dropped == 45
    finally:
        sink.release.set()
        dispatcher.close()


class _Broken(AlertSink):
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def send(self, alerts, now):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in a sink")


def test_a_sink_bug_is_counted_and_retried_not_fatal():
    sink = _Broken()
    dispatcher = _dispatcher(sink)
    try:
        dispatcher.submit("r", [ev(EventKind.COLLAPSE_ONSET, 0)])
        assert dispatcher.flush(5)
        assert sink.calls == 2 and dispatcher.stats().sinks[0].failures == 1
    finally:
        dispatcher.close()


def test_alerts_resolve_when_the_run_ends_in_the_engine():
    from detector.events import EventHub, EventsDetected

    engine = Engine()
    # The engine's run news without its detections (whose phase change at the end
    # would resolve the collapse by event): the dispatcher hears that the run
    # ended from the hub, and never asks the engine.
    runs_only = EventHub()
    engine.events.subscribe(
        lambda m: None if isinstance(m, EventsDetected) else runs_only.publish(m))
    with Receiver() as am:
        dispatcher = _dispatcher(AlertmanagerSink(am.url), events=runs_only)
        try:
            engine.start_run("r")
            engine.ingest("r", {"train_loss": ([0, 1, 2], [1.0, 0.9, 0.8])})
            dispatcher.submit("r", [ev(EventKind.COLLAPSE_ONSET, 2)])
            assert dispatcher.flush(5)
            assert dispatcher.stats().active == 1
            engine.end_run("r")
            wait_for(lambda: len(am.requests) >= 2, 5, "the resolution")
            [resolved] = am.bodies()[-1]
            assert resolved["labels"]["alertname"] == "TrainingCollapse"
            assert resolved["annotations"]["resolved_because"] == "the run ended"
            assert resolved["endsAt"] <= rfc3339(time.time())
            assert dispatcher.stats().active == 0
        finally:
            dispatcher.close()


def test_alerts_of_a_run_another_replica_took_are_forgotten_not_resolved():
    engine = Engine()
    with Receiver() as am:
        dispatcher = _dispatcher(AlertmanagerSink(am.url), events=engine.events)
        try:
            engine.ingest("r", {"train_loss": ([0, 1, 2], [1.0, 0.9, 0.8])})
            dispatcher.submit("r", [ev(EventKind.COLLAPSE_ONSET, 2)])
            assert dispatcher.flush(5)
            assert dispatcher.stats().active == 1
            engine.forget("r")  # what a released claim on a shared store does: RunLeft
            wait_for(lambda: dispatcher.stats().active == 0, 5, "the alert to be forgotten")
            assert dispatcher.flush(5)
            assert len(am.requests) == 1  # no resolution sent: it expires in Alertmanager
        finally:
            dispatcher.close()


def test_quiet_runs_resolve_after_stale_after():
    engine = Engine()
    with Receiver() as am:
        dispatcher = _dispatcher(AlertmanagerSink(am.url), events=engine.events,
                                 policy=AlertPolicy(stale_after=0.3))
        try:
            engine.ingest("r", {"train_loss": ([0], [1.0])})
            dispatcher.submit("r", [ev(EventKind.COLLAPSE_ONSET, 0)])
            wait_for(lambda: dispatcher.stats().active == 0 and len(am.requests) >= 2, 5,
                     "the stale run's alert to resolve")
            assert am.bodies()[-1][0]["annotations"]["resolved_because"] == "no data for 0.3 s"
        finally:
            dispatcher.close()


def test_declared_roles_decide_plateau_alerts():
    from detector.core.types import Direction, Role, SeriesSpec, Split

    engine = Engine()
    with Receiver() as am:
        dispatcher = _dispatcher(AlertmanagerSink(am.url), events=engine.events)
        try:
            # "objective" says nothing by name; declared as the training loss it is one.
            engine.start_run("r", series=[SeriesSpec("objective", Role.LOSS, Split.TRAIN,
                                                     Direction.MINIMIZE)])
            engine.ingest("r", {"objective": ([0, 1, 2, 3], [1.0, 0.9, 0.8, 0.7])})
            dispatcher.submit("r", [ev(EventKind.PLATEAU_START, 3, "objective")])
            assert dispatcher.flush(5)
            assert _names(am.bodies()[0]) == ["TrainingPlateau"]
        finally:
            dispatcher.close()


def test_event_bus_listener_feeds_the_dispatcher():
    with Receiver() as am:
        dispatcher = _dispatcher(AlertmanagerSink(am.url))
        bus = EventBus()
        bus.add_listener(dispatcher.submit)
        bus.add_listener(lambda *_: 1 / 0)  # a broken listener is logged, not raised
        try:
            messages = bus.publish("r", [ev(EventKind.GROKKING_ONSET, 5, "val_acc")], at=1234.5)
            assert len(messages) == 1
            assert dispatcher.flush(5)
            [alert] = am.bodies()[0]
            assert alert["startsAt"] == rfc3339(1234.5)  # the publish time
        finally:
            dispatcher.close()


def test_close_makes_one_last_attempt():
    with Receiver() as am:
        am.statuses.extend([503])
        dispatcher = _dispatcher(AlertmanagerSink(am.url), retry_initial=30, retry_max=30)
        dispatcher.submit("r", [ev(EventKind.GROKKING_ONSET, 5, "val_acc")])
        wait_for(lambda: am.requests, 5, "the first attempt")
        dispatcher.close(timeout=5)  # does not wait 30 s for the backoff
        assert [r["status"] for r in am.requests] == [503, 200]


def test_dispatcher_checks_its_settings():
    sink = WebhookSink("http://127.0.0.1:1/")
    for bad in ({"resend_interval": 0}, {"retry_initial": 2, "retry_max": 1}, {"queue_size": 0}):
        with pytest.raises(InvalidArgument):
            AlertDispatcher([sink], **bad)
    with pytest.raises(InvalidArgument):
        AlertDispatcher([])
    with pytest.raises(InvalidArgument):
        AlertDispatcher([sink, WebhookSink("http://127.0.0.1:2/")])  # two named "webhook"


# --- the command line ----------------------------------------------------------------------


def test_serve_flags_reach_serve(monkeypatch: pytest.MonkeyPatch):
    import functools

    import detector.cli as cli
    from detector.server import serve as real_serve

    seen: dict[str, Any] = {}

    @functools.wraps(real_serve)  # cmd_serve reads the real signature through __wrapped__
    def fake_serve(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)

    # cmd_serve imports serve when it runs (the CLI's client commands stay light).
    monkeypatch.setattr("detector.server.serve", fake_serve)
    assert cli.main(["serve", "--metrics-listen", "", "--alertmanager-url", "http://am:9093",
                     "--webhook-url", "http://hooks:5001/", "--alert-resend-interval", "45",
                     "--alert-runbook-url", "https://wiki/pw#{alertname}",
                     "--metrics-retention", "30"]) == 0
    assert {k: seen[k] for k in ("alertmanager_url", "webhook_url", "alert_resend_interval",
                                 "alert_runbook_url", "metrics_retention")} == {
        "alertmanager_url": "http://am:9093", "webhook_url": "http://hooks:5001/",
        "alert_resend_interval": 45.0, "alert_runbook_url": "https://wiki/pw#{alertname}",
        "metrics_retention": 30.0}


@pytest.mark.parametrize("seconds", ["10", "181", "nan"])
def test_resend_interval_outside_alertmanagers_advice_is_refused(capsys, seconds):
    from detector.cli import main

    assert main(["serve", "--alertmanager-url", "http://am:9093",
                 "--alert-resend-interval", seconds]) == 2
    assert "--alert-resend-interval" in capsys.readouterr().err


def test_console_script_serve_sends_alerts(tmp_path):
    """``phasewatch serve --alertmanager-url`` in its own process, fed by ``phasewatch replay``."""
    import re
    import subprocess
    import sys

    from detector.cli import main

    with Receiver() as am:
        log = tmp_path / "serve.err"
        serve = subprocess.Popen(
            [sys.executable, "-m", "detector", "serve", "--listen", "127.0.0.1:0",
             "--metrics-listen", "", "--store", "sqlite://:memory:", "--alertmanager-url", am.url],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), stdin=subprocess.DEVNULL,
        )
        try:
            found = wait_for(lambda: re.search(r"listening on [\d.]+:(\d+)", log.read_text()), 30,
                             "the server to start")
            run = shared_dir("runs", "grok_add_0.jsonl")
            assert main(["replay", str(run), "--run-id", "cli-grok", "--json",
                         "--target", f"127.0.0.1:{found.group(1)}"]) == 0
            bodies = wait_for(
                lambda: [a for body in am.bodies() for a in body
                         if a["labels"]["alertname"] == "GrokkingOnset"], 10, "GrokkingOnset")
            assert bodies[0]["labels"]["run_id"] == "cli-grok"
            assert "phasewatch alerts to AlertmanagerSink" in log.read_text()
        finally:
            serve.terminate()
            assert serve.wait(timeout=20) == 0


def test_alerts_need_neither_grpc_nor_prometheus_client():
    import subprocess
    import sys

    code = ("import sys, detector.alerts\n"
            "bad = [m for m in ('grpc', 'prometheus_client', 'numpy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
