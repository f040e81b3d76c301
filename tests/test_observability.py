"""Integration: a real detector (``serve``) with real Prometheus and Alertmanager.

The detector runs in-process (``serve`` in a thread: the same code as
``phasewatch serve``), with the Alertmanager sink, a webhook sink and a 2 s
resend interval; Alertmanager runs the shipped deploy/alertmanager config and
Prometheus the shipped rules, scraping and evaluating every second. Runs go in
over gRPC. Everything listens on free loopback ports and is stopped after.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.alerts import AlertBook, AlertmanagerSink
from detector.alerts.model import label_fingerprint
from detector.core.types import Event, EventKind
from detector.replay import columns_to_batch
from detector.server import serve
from tests.helpers import collapse_columns, read_rows, rows_to_columns, shared_dir
from tests.observability import Alertmanager, Prometheus, Receiver, free_port, wait_for
from tests.test_deploy import ALERTMANAGER, RULES, dashboard_queries

RESEND = 2.0  # seconds; `phasewatch serve` allows 30-180, the library any positive value
PHASE_NAMES = ("instability", "abstraction", "stabilization", "collapse")


@dataclass
class Detector:
    stub: pb_grpc.PhaseDetectorStub
    metrics_url: str
    metrics_target: str

    def metric(self, name: str, **labels: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("observability")


@pytest.fixture(scope="module")
def alertmanager(workdir: Path) -> Iterator[Alertmanager]:
    am = Alertmanager(workdir, ALERTMANAGER)
    am.start()
    yield am
    am.stop()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def detector(workdir: Path, alertmanager: Alertmanager, webhook: Receiver) -> Iterator[Detector]:
    grpc_port, metrics_port = free_port(), free_port()
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve(
                f"127.0.0.1:{grpc_port}",
                f"127.0.0.1:{metrics_port}",
                f"sqlite:///{workdir / 'phasewatch.db'}",
                alertmanager_url=alertmanager.url,
                webhook_url=webhook.url + "/hook",
                alert_resend_interval=RESEND,
                alert_runbook_url="https://runbooks.example/phasewatch#{anchor}",
                grace=1.0,
                stop=stop,
            )
        except BaseException as error:  # reported by the readiness wait
            failure.append(error)

    thread = threading.Thread(target=run, name="phasewatch-serve", daemon=True)
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        pytest.fail(f"the detector did not start: {failure}")
    detector = Detector(
        stub=pb_grpc.PhaseDetectorStub(channel),
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        metrics_target=f"127.0.0.1:{metrics_port}",
    )
    wait_for(lambda: detector.metric("phasewatch_active_runs") is not None, 30, "/metrics")
    yield detector
    channel.close()
    stop.set()
    thread.join(30)
    assert not thread.is_alive(), "serve() did not stop"
    assert not failure, failure


@pytest.fixture(scope="module")
def prometheus(workdir: Path, detector: Detector, alertmanager: Alertmanager) -> Iterator[Prometheus]:
    prom = Prometheus(
        workdir,
        targets=[detector.metrics_target],
        rule_files=[RULES],
        alertmanager=alertmanager.url.removeprefix("http://"),
    )
    prom.start()
    yield prom
    prom.stop()


def rows(name: str) -> list[dict[str, Any]]:
    return read_rows(shared_dir("runs", f"{name}.jsonl"))


def with_flat_loss(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``lines`` with a regularisation loss that sits on one level from the start
    (``train_reg_loss``: loss-like, on a plateau that never ends), for tests that need
    a ``TrainingPlateau`` alert to stay active: the runs' own losses keep falling on
    the log scale or end their plateaus early. Sorted after ``train_loss``, so the
    labeller's training loss stays ``train_loss``."""
    rng = np.random.default_rng(0)
    return [{**r, "train_reg_loss": 0.05 * float(np.exp(rng.normal(0, 0.01)))} for r in lines]


def log_rows(stub: pb_grpc.PhaseDetectorStub, run_id: str, lines: list[dict[str, Any]]) -> None:
    """Send log lines over the unary Log RPC, 40 lines a batch (the run stays open)."""
    for start in range(0, len(lines), 40):
        batch = columns_to_batch(rows_to_columns(lines[start : start + 40]))
        stub.Log(pb.LogRequest(run_id=run_id, batch=batch), timeout=30)


def end_run(stub: pb_grpc.PhaseDetectorStub, run_id: str) -> None:
    requests = [pb.StreamRequest(start=pb.RunStart(run_id=run_id, resume=True)),
                pb.StreamRequest(end=pb.RunEnd())]
    answers = list(stub.Stream(iter(requests), timeout=30))
    assert answers[-1].WhichOneof("msg") == "ack"


def alerts_by_name(am: Alertmanager, run_id: str) -> dict[str, dict[str, Any]]:
    return {a["labels"]["alertname"]: a for a in am.alerts(run_id=run_id)}


def plateau_start(am: Alertmanager, run_id: str, series: str) -> str | None:
    """``startsAt`` of the run's TrainingPlateau alert on ``series`` (None: there is none)."""
    return next((a["startsAt"] for a in am.alerts(run_id=run_id, alertname="TrainingPlateau")
                 if a["labels"]["series"] == series), None)


def test_grokking_run_raises_grokking_onset_in_alertmanager(
    detector: Detector, alertmanager: Alertmanager, webhook: Receiver
):
    lines = rows("grok_add_0")
    run_id = "grok-am"
    # Grokking is confirmed when test accuracy reaches 0.95 (step 2660), located at the onset.
    log_rows(detector.stub, run_id, [r for r in lines if r["step"] < 2800])

    found = wait_for(lambda: alerts_by_name(alertmanager, run_id).get("GrokkingOnset"), 20,
                     "GrokkingOnset in Alertmanager")
    assert found["labels"] == {"alertname": "GrokkingOnset", "severity": "info",
                               "run_id": run_id, "job": "phasewatch", "series": "test_acc"}
    notes = found["annotations"]
    assert notes["step"] == "1370"
    assert notes["summary"] == f"Grokking started in run {run_id} at step 1370 (test_acc)"
    assert notes["runbook_url"] == "https://runbooks.example/phasewatch#grokkingonset"
    assert float(notes["value"]) >= 0.95 and json.loads(notes["evidence"])["test"] == "delayed_generalisation"
    assert found["status"]["state"] == "active"
    assert [r["name"] for r in found["receivers"]] == ["ml-team"]  # routed by the shipped config
    assert found["fingerprint"] == label_fingerprint(found["labels"])  # we compute AM's identity
    # The webhook got Alertmanager's payload shape for the same alert.
    message = wait_for(
        lambda: next((m for m in webhook.bodies() if m["groupLabels"] == {"run_id": run_id}
                      and any(a["labels"]["alertname"] == "GrokkingOnset" for a in m["alerts"])),
                     None), 10, "the webhook notification")
    assert message["version"] == "4" and message["status"] == "firing"

    # The rest of the run: grokking completes, the run ends, everything resolves.
    log_rows(detector.stub, run_id, [r for r in lines if r["step"] >= 2800])
    end_run(detector.stub, run_id)
    wait_for(lambda: alertmanager.alerts(run_id=run_id) == [], 20,
             f"every alert of {run_id} to resolve in Alertmanager")
    resolved = wait_for(
        lambda: [a for m in webhook.bodies() for a in m["alerts"]
                 if a["labels"]["run_id"] == run_id and a["labels"]["alertname"] == "GrokkingOnset"
                 and a["status"] == "resolved"], 10, "the resolved webhook notification")
    assert resolved[-1]["annotations"]["resolved_because"] == "the run entered stabilization"


def test_analyze_sends_its_alerts_to_the_same_sinks_as_serve(
    alertmanager: Alertmanager, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """`phasewatch analyze` with serve's sink flags: the offline engine's events go
    through the same event hub and dispatcher to a real Alertmanager and a webhook."""
    from detector.cli import main

    run_id = "grok-analyze"
    log = tmp_path / f"{run_id}.jsonl"  # the run id is the file's name
    # Up to step 2800: grokking has started (onset at step 1370), not yet stabilised.
    log.write_text("".join(json.dumps(r) + "\n" for r in rows("grok_add_0") if r["step"] < 2800))
    with Receiver() as hook:
        assert main(["analyze", str(log), "--json", "--alertmanager-url", alertmanager.url,
                     "--webhook-url", hook.url + "/analyze",
                     "--alert-runbook-url", "https://runbooks.example/phasewatch#{anchor}"]) == 0
        bodies = hook.bodies()  # delivered before main returned: it waits for delivery
    out, err = capsys.readouterr()
    assert any(e["kind"] == "GROKKING_ONSET" for e in json.loads(out)["events"])
    assert "alerts sent:" in err and "to alertmanager" in err

    found = wait_for(lambda: alerts_by_name(alertmanager, run_id).get("GrokkingOnset"), 20,
                     "GrokkingOnset from analyze in Alertmanager")
    assert found["labels"] == {"alertname": "GrokkingOnset", "severity": "info",
                               "run_id": run_id, "job": "phasewatch", "series": "test_acc"}
    assert found["annotations"]["step"] == "1370"
    assert found["annotations"]["runbook_url"] == "https://runbooks.example/phasewatch#grokkingonset"
    assert found["status"]["state"] == "active"  # sent firing: the log's end resolves nothing
    hooked = [a for body in bodies for a in body["alerts"] if a["labels"]["run_id"] == run_id]
    assert "GrokkingOnset" in {a["labels"]["alertname"] for a in hooked}


def test_analyze_says_when_an_alert_sink_is_unreachable(tmp_path: Path, capsys):
    from detector.cli import main

    log = tmp_path / "grok-unreachable.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows("grok_add_0") if r["step"] < 2800))
    assert main(["analyze", str(log), "--webhook-url", f"http://127.0.0.1:{free_port()}/"]) == 1
    assert "not every alert was delivered" in capsys.readouterr().err


def test_prometheus_scrapes_the_detector_and_reads_phases(
    detector: Detector, prometheus: Prometheus
):
    run_id = "grok-prom"
    log_rows(detector.stub, run_id, rows("grok_add_0"))
    end_run(detector.stub, run_id)

    targets = wait_for(
        lambda: [t for t in prometheus.api("targets")["activeTargets"] if t["health"] == "up"],
        30, "the phasewatch target to be up")
    assert targets[0]["labels"]["job"] == "phasewatch"
    assert targets[0]["scrapeUrl"] == detector.metrics_url

    result = wait_for(
        lambda: prometheus.query(f'phasewatch_run_phase{{run_id="{run_id}"}} == 1'), 30,
        f"the phase of {run_id} in Prometheus")
    [sample] = result
    assert sample["metric"]["phase"] == "stabilization"  # where the grokking run ends
    assert sample["metric"]["job"] == "phasewatch"
    last = prometheus.query(f'phasewatch_run_last_step{{run_id="{run_id}"}}')
    assert last[0]["value"][1] == "4160"
    # Every dashboard query is valid PromQL against real data.
    for expr in dashboard_queries():
        prometheus.query(expr)


def test_shipped_collapse_rule_fires_for_a_collapsing_run(
    detector: Detector, prometheus: Prometheus, alertmanager: Alertmanager
):
    run_id = "collapse-prom"
    log_rows(detector.stub, run_id, with_flat_loss(rows("collapse_lr_0")))  # left open: still collapsing

    def firing() -> list[dict[str, Any]]:
        return [a for a in prometheus.api("alerts")["alerts"]
                if a["labels"].get("alertname") == "PhasewatchRunCollapsed"
                and a["labels"].get("run_id") == run_id and a["state"] == "firing"]

    [rule_alert] = wait_for(firing, 30, "PhasewatchRunCollapsed to fire in Prometheus")
    assert rule_alert["labels"] == {"alertname": "PhasewatchRunCollapsed", "run_id": run_id,
                                    "severity": "critical"}
    # In Alertmanager: the detector's own TrainingCollapse is active; by the shipped
    # inhibitions it suppresses the run's plateau alerts and the rule's duplicate.
    def inhibited() -> dict[str, dict[str, Any]] | None:
        alerts = alerts_by_name(alertmanager, run_id)
        needed = {"TrainingCollapse", "TrainingPlateau", "PhasewatchRunCollapsed"}
        return alerts if needed <= set(alerts) else None

    alerts = wait_for(inhibited, 30, "the collapse, plateau and rule alerts in Alertmanager")
    collapse = alerts["TrainingCollapse"]
    assert collapse["status"]["state"] == "active"
    assert collapse["labels"]["severity"] == "critical"
    assert [r["name"] for r in collapse["receivers"]] == ["ml-oncall"]
    for name in ("TrainingPlateau", "PhasewatchRunCollapsed"):
        status = alertmanager.alerts(run_id=run_id, alertname=name)[0]["status"]
        assert status["state"] == "suppressed", (name, status)
        assert status["inhibitedBy"] == [collapse["fingerprint"]]


def test_shipped_rules_warn_on_a_generalisation_collapse_and_do_not_page(
    detector: Detector, prometheus: Prometheus, alertmanager: Alertmanager
):
    """A held-out collapse puts the run in the collapse phase like any collapse, but
    only PhasewatchGeneralizationCollapsed (a warning) fires, and the detector's own
    GeneralizationCollapse inhibits it; the collapse's end resolves both."""
    run_id = "gen-collapse-prom"
    columns = collapse_columns(generalization=(300, 60))  # open at step 3000, ended at 3600

    def send(lines: slice) -> None:
        part = {name: (steps[lines], values[lines]) for name, (steps, values) in columns.items()}
        detector.stub.Log(pb.LogRequest(run_id=run_id, batch=columns_to_batch(part)), timeout=30)

    def rule_alerts() -> dict[str, dict[str, Any]]:
        return {a["labels"]["alertname"]: a for a in prometheus.api("alerts")["alerts"]
                if a["labels"].get("run_id") == run_id}

    send(slice(0, 340))
    [warning] = wait_for(
        lambda: [a for name, a in rule_alerts().items()
                 if name == "PhasewatchGeneralizationCollapsed" and a["state"] == "firing"],
        30, "PhasewatchGeneralizationCollapsed to fire in Prometheus")
    assert warning["labels"] == {"alertname": "PhasewatchGeneralizationCollapsed",
                                 "run_id": run_id, "severity": "warning"}
    # The phase gauge says "collapse" (what the critical rule used to fire on) ...
    [phase] = prometheus.query(f'phasewatch_run_phase{{run_id="{run_id}"}} == 1')
    assert phase["metric"]["phase"] == "collapse"
    # ... yet the critical rule never was pending or firing for this run: the
    # ALERTS series Prometheus keeps of every rule evaluation has no sample of it.
    time.sleep(3)  # a few more evaluations (every 1 s) with the collapse open
    assert prometheus.query(
        f'ALERTS{{alertname="PhasewatchRunCollapsed",run_id="{run_id}"}}[10m]') == []
    assert "PhasewatchRunCollapsed" not in rule_alerts()

    def inhibited() -> dict[str, dict[str, Any]] | None:
        alerts = alerts_by_name(alertmanager, run_id)
        needed = {"GeneralizationCollapse", "PhasewatchGeneralizationCollapsed"}
        return alerts if needed <= set(alerts) else None

    alerts = wait_for(inhibited, 30, "the detector's and the rule's alerts in Alertmanager")
    assert not {"TrainingCollapse", "PhasewatchRunCollapsed"} & set(alerts)
    own = alerts["GeneralizationCollapse"]
    assert own["status"]["state"] == "active" and own["labels"]["severity"] == "warning"
    assert [r["name"] for r in own["receivers"]] == ["ml-team"]  # not the pager
    duplicate = alerts["PhasewatchGeneralizationCollapsed"]["status"]
    assert duplicate["state"] == "suppressed" and duplicate["inhibitedBy"] == [own["fingerprint"]]

    send(slice(340, None))  # back at 0.99 from step 3600: COLLAPSE_END
    wait_for(lambda: "PhasewatchGeneralizationCollapsed" not in rule_alerts(), 30,
             "the rule's alert to resolve in Prometheus")
    wait_for(lambda: "GeneralizationCollapse" not in alerts_by_name(alertmanager, run_id), 30,
             "the detector's alert to resolve in Alertmanager")
    assert prometheus.query(f'phasewatch_run_collapse{{run_id="{run_id}"}}') == []  # stale
    end_run(detector.stub, run_id)


def test_collapse_scopes_route_and_inhibit_in_alertmanager(alertmanager: Alertmanager):
    """A generalisation collapse is a warning for the ML team; a training collapse of
    the same run suppresses it; its COLLAPSE_END resolves it."""
    book, sink = AlertBook(), AlertmanagerSink(alertmanager.url)
    general = {"scope": "generalization"}
    both, alone = "scopes-both", "scopes-alone"
    for run_id in (both, alone):
        sink.send(book.apply(run_id, Event(step=300, kind=EventKind.COLLAPSE_ONSET, detected_at=320,
                                           series="val_acc", evidence=general), at=time.time()),
                  time.time())
    sink.send(book.apply(both, Event(step=400, kind=EventKind.COLLAPSE_ONSET, detected_at=410,
                                     series="train_loss", evidence={"scope": "training"}),
                         at=time.time()), time.time())

    def arrived() -> dict[str, dict[str, Any]] | None:
        alerts = alerts_by_name(alertmanager, both)
        ready = {"TrainingCollapse", "GeneralizationCollapse"} <= set(alerts)
        return alerts if ready and alerts_by_name(alertmanager, alone) else None

    alerts = wait_for(arrived, 20, "the collapse alerts in Alertmanager")
    [lone] = alertmanager.alerts(run_id=alone, alertname="GeneralizationCollapse")
    assert lone["status"]["state"] == "active" and lone["labels"]["severity"] == "warning"
    assert [r["name"] for r in lone["receivers"]] == ["ml-team"]
    suppressed = alerts["GeneralizationCollapse"]["status"]
    assert suppressed["state"] == "suppressed"
    assert suppressed["inhibitedBy"] == [alerts["TrainingCollapse"]["fingerprint"]]

    sink.send(book.apply(alone, Event(step=900, kind=EventKind.COLLAPSE_END, detected_at=950,
                                      series="val_acc", evidence=general), at=time.time()),
              time.time())
    wait_for(lambda: not alertmanager.alerts(run_id=alone), 20, "the recovered run's alert to resolve")
    assert {a["labels"]["alertname"] for a in alertmanager.alerts(run_id=both)} == {
        "TrainingCollapse", "GeneralizationCollapse"}


def test_alertmanager_outage_loses_no_alert(detector: Detector, alertmanager: Alertmanager):
    lines = with_flat_loss(rows("grok_add_0"))
    run_id = "grok-outage"
    log_rows(detector.stub, run_id, [r for r in lines if r["step"] < 1800])
    before = wait_for(
        lambda: (a := alerts_by_name(alertmanager, run_id))
        and {"PhaseChange", "TrainingPlateau"} <= set(a)
        and plateau_start(alertmanager, run_id, "train_reg_loss") is not None and a,
        20, "the first alerts in Alertmanager")
    assert before["PhaseChange"]["annotations"]["phase"] == "abstraction"
    before_plateau = plateau_start(alertmanager, run_id, "train_reg_loss")  # one per loss series
    failures = detector.metric("phasewatch_alert_failures_total", sink="alertmanager") or 0.0

    alertmanager.stop()  # Alertmanager keeps alerts in memory only: they are gone
    # Grokking is confirmed at 2660 and the run stabilises at 3400, both during the outage.
    log_rows(detector.stub, run_id, [r for r in lines if 1800 <= r["step"] < 3500])
    wait_for(lambda: detector.metric("phasewatch_alert_failures_total", sink="alertmanager")
             > failures, 20, "a failed delivery while Alertmanager is down")
    assert detector.metric("phasewatch_alerts_pending", sink="alertmanager") > 0
    alertmanager.start()

    def caught_up() -> dict[str, dict[str, Any]] | None:
        alerts = alerts_by_name(alertmanager, run_id)
        changed = alerts.get("PhaseChange", {}).get("annotations", {}).get("phase")
        return alerts if changed == "stabilization" and "TrainingPlateau" in alerts else None

    after = wait_for(caught_up, 45, "Alertmanager to get the run's alerts back")
    # What changed during the outage arrived (grokking raised and resolved;
    # the run moved to stabilization), and what was sent before it came back.
    assert "GrokkingOnset" not in after
    assert "train_reg_loss" in {a["labels"]["series"] for a in alertmanager.alerts(
        run_id=run_id, alertname="TrainingPlateau")}
    assert plateau_start(alertmanager, run_id, "train_reg_loss") == before_plateau  # re-sent as it was
    wait_for(lambda: detector.metric("phasewatch_alerts_pending", sink="alertmanager") == 0, 20,
             "nothing pending")
    end_run(detector.stub, run_id)
    wait_for(lambda: alertmanager.alerts(run_id=run_id) == [], 20, "the ended run's alerts to resolve")
