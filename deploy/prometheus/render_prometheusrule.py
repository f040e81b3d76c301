"""Write prometheusrule.yml: rules.yml wrapped as a Prometheus-Operator PrometheusRule.

    python deploy/prometheus/render_prometheusrule.py > deploy/prometheus/prometheusrule.yml

Text in, text out (no YAML library): the ``groups:`` document of rules.yml is
indented under ``spec:``, so the two files cannot drift apart unnoticed
(tests/test_deploy.py renders and compares).
"""

from __future__ import annotations

import sys
from pathlib import Path

HEADER = """\
# Generated from rules.yml by render_prometheusrule.py; edit rules.yml instead.
# For the Prometheus Operator: the label below must match your Prometheus'
# ruleSelector (kube-prometheus-stack selects release=<its release name>).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: phasewatch
  labels:
    app.kubernetes.io/name: phasewatch
    app.kubernetes.io/component: alerting-rules
    release: kube-prometheus-stack
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule document for the text of rules.yml (its comments dropped)."""
    lines = rules_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body).rstrip() + "\n"


def main() -> None:
    rules = Path(__file__).with_name("rules.yml").read_text()
    sys.stdout.write(render(rules))


if __name__ == "__main__":
    main()
