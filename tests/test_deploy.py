"""The deploy/ artefacts: Prometheus rules (promtool), the PrometheusRule, the
Alertmanager example (amtool) and the Grafana dashboard."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from detector.alerts import ALERT_NAMES, AlertDispatcher, WebhookSink
from detector.engine import Engine
from detector.exporter import EngineCollector
from tests.helpers import REPO, collapse_columns
from tests.observability import binary

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "phasewatch.json"


def run(*argv: str | Path, stdout_only: bool = False) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout if stdout_only else done.stdout + done.stderr


def test_promtool_checks_the_rules():
    output = run(binary("promtool"), "check", "rules", RULES)
    assert "SUCCESS: 7 rules found" in output


def test_promtool_rule_unit_tests_pass():
    output = run(binary("promtool"), "test", "rules", DEPLOY / "prometheus" / "rules_test.yml")
    assert "SUCCESS" in output


def _render_module():
    spec = importlib.util.spec_from_file_location(
        "render_prometheusrule", DEPLOY / "prometheus" / "render_prometheusrule.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_rules_yml_wrapped(tmp_path: Path):
    expected = _render_module().render(RULES.read_text())
    shipped = (DEPLOY / "prometheus" / "prometheusrule.yml").read_text()
    assert shipped == expected, (
        "prometheusrule.yml is stale: python deploy/prometheus/render_prometheusrule.py "
        "> deploy/prometheus/prometheusrule.yml"
    )
    assert "kind: PrometheusRule" in shipped and "apiVersion: monitoring.coreos.com/v1" in shipped
    # Its spec is a valid rule file on its own.
    spec = shipped.split("\nspec:\n", 1)[1]
    unwrapped = tmp_path / "spec.yml"
    unwrapped.write_text("\n".join(line[2:] for line in spec.splitlines()) + "\n")
    assert "SUCCESS: 7 rules found" in run(binary("promtool"), "check", "rules", unwrapped)


def test_amtool_checks_the_alertmanager_config():
    output = run(binary("amtool"), "check-config", ALERTMANAGER)
    assert "SUCCESS" in output and "5 inhibit rules" in output


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=TrainingCollapse", "severity=critical", "run_id=r"], "ml-oncall"),
        (["alertname=GrokkingOnset", "severity=info", "run_id=r"], "ml-team"),
        (["alertname=GeneralizationCollapse", "severity=warning", "run_id=r"], "ml-team"),
        (["alertname=PhasewatchRunCollapsed", "severity=critical", "run_id=r"], "ml-oncall"),
        (["alertname=PhasewatchGeneralizationCollapsed", "severity=warning", "run_id=r"], "ml-team"),
        (["alertname=TrainingPlateau", "severity=warning", "run_id=r"], "ml-team"),
        (["alertname=PhaseChange", "severity=info", "run_id=r"], "blackhole"),
        (["alertname=PhasewatchDetectorDown", "severity=warning"], "platform"),
    ],
)
def test_alertmanager_routes(labels: list[str], receiver: str):
    output = run(binary("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                 *labels, stdout_only=True)
    assert output.strip() == receiver


def test_the_config_inhibits_plateaus_of_a_collapsing_run():
    text = ALERTMANAGER.read_text()
    rule = re.search(r'source_matchers:\s*- alertname="TrainingCollapse"\s*target_matchers:\s*'
                     r'- alertname="TrainingPlateau"\s*equal: \[run_id\]', text)
    assert rule, "the collapse -> plateau inhibition is missing"
    # The routes only speak of alert names the detector and the rules raise.
    raised = set(ALERT_NAMES)
    raised |= set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    named = set(re.findall(r'alertname=~?"([\w|]+)"', text))
    assert {n for group in named for n in group.split("|")} <= raised


def _exported_names() -> set[str]:
    """Every sample name the collector can export (with an alert dispatcher)."""
    engine = Engine()
    steps = list(range(40))  # enough for a trend window
    engine.ingest("r", {"train_loss": (steps, [1.0 / (1 + s) for s in steps])})
    engine.ingest("r", {"train_loss": ([-1], [1.0])})  # a rejected point
    engine.ingest("collapsing", collapse_columns(350, training=(300, None)))  # an open collapse
    dispatcher = AlertDispatcher([WebhookSink("http://127.0.0.1:1/")])
    try:
        registry = CollectorRegistry()
        registry.register(EngineCollector(engine, alerts=dispatcher))
        names = {s.name for family in registry.collect() for s in family.samples}
    finally:
        dispatcher.close(timeout=1)
    return names


def test_rules_and_dashboard_use_only_exported_metrics():
    exported = _exported_names()
    for path in (RULES, DASHBOARD):
        used = set(re.findall(r"\bphasewatch_[a-z_]+\b", path.read_text()))
        assert used, path
        assert used <= exported, f"{path.name} uses metrics phasewatch does not export: {used - exported}"


def test_dashboard_has_the_promised_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Phase timeline per run", "Events by kind", "Ingest rate", "Rejected points"} <= titles
    timeline = next(p for p in dashboard["panels"] if p["title"] == "Phase timeline per run")
    assert timeline["type"] == "state-timeline"
    mapped = timeline["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {v["text"] for v in mapped.values()} == {"instability", "abstraction", "stabilization",
                                                   "collapse"}
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "run"}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"]


def dashboard_queries() -> list[str]:
    """The dashboard's PromQL with its variables filled in (for a real Prometheus)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return [e.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$run", ".*")
            for e in exprs]
