#!/usr/bin/env bash
# Runs the Dockerfile's steps without a Docker engine (none runs in CI):
#
# 1. the build stage: copies exactly the Dockerfile's COPY sources into an empty
#    directory (so a file missing from them fails here as it would in
#    `docker build`), and builds the wheel there in a clean venv with the same
#    command, which generates the protobuf modules;
# 2. the runtime stage: installs that wheel with the [server,postgres] extras
#    into another clean venv;
#    then replays the runtime stage's later `RUN python ...` steps (the kernels'
#    compile) with the image's ENV from a working directory outside the source
#    tree, as the image's WORKDIR is (run from the repository, `python -c` would
#    import and compile the checkout's package instead of the installed one);
# 3. runs the ENTRYPOINT with the image's ENV (ports moved to free ones, the
#    store to a temporary file) from that directory and its HEALTHCHECK command,
#    which must report SERVING within 60 s; then SIGTERM must stop it cleanly.
#
# The Dockerfile is parsed, not copied here, so the two cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/phasewatch-docker-check.XXXXXX)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

python3 - Dockerfile "$work" <<'PY'
"""Parse the Dockerfile into shell-sourceable facts for the steps below."""
import json, shlex, sys
from pathlib import Path

text = Path(sys.argv[1]).read_text()
work = Path(sys.argv[2])
lines, current = [], ""
for raw in text.splitlines():
    if raw.lstrip().startswith("#") and not current:
        continue
    current += raw.rstrip("\\").strip() + " "
    if not raw.rstrip().endswith("\\"):
        lines.append(current.strip())
        current = ""
stages, stage = [], None
for line in filter(None, lines):
    word, _, rest = line.partition(" ")
    word = word.upper()
    if word == "FROM":
        stage = {"copy": [], "run": [], "env": {}, "healthcheck": None, "entrypoint": None}
        stages.append(stage)
    elif word == "COPY" and not rest.startswith("--from"):
        stage["copy"].append(shlex.split(rest))
    elif word == "RUN":
        stage["run"].append(rest)
        if rest.startswith("python "):
            stage.setdefault("python_runs", []).append(rest)
    elif word == "ENV":
        stage["env"].update(dict(item.split("=", 1) for item in shlex.split(rest)))
    elif word == "HEALTHCHECK":
        stage["healthcheck"] = json.loads(rest[rest.index("CMD") + 3:])
    elif word == "ENTRYPOINT":
        stage["entrypoint"] = json.loads(rest)
build, runtime = stages[0], stages[-1]
assert build["run"] and "python -m build --wheel" in build["run"][-1], build["run"]
assert runtime["entrypoint"] == ["phasewatch", "serve"], runtime["entrypoint"]
assert runtime["healthcheck"], "no HEALTHCHECK"
assert not any("50051" in word for word in runtime["healthcheck"]), \
    "the HEALTHCHECK must follow PHASEWATCH_LISTEN, not a fixed address"
assert "USER 10001:10001" in text, "the runtime must run as the non-root uid 10001"
(work / "copy.txt").write_text("".join(" ".join(srcs[:-1]) + "\n" for srcs in build["copy"]))
(work / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n"
                                     for k, v in runtime["env"].items()))
(work / "healthcheck.json").write_text(json.dumps(runtime["healthcheck"]))
(work / "entrypoint.json").write_text(json.dumps(runtime["entrypoint"]))
(work / "python-runs.sh").write_text("".join(f"{cmd}\n" for cmd in runtime.get("python_runs", [])))
assert runtime.get("python_runs"), "the runtime stage compiles the kernels in a RUN python step"

print("== Dockerfile parsed:", len(stages), "stages; build context:",
      " ".join(" ".join(s[:-1]) for s in build["copy"]))
PY

echo "== build stage: wheel from the COPY sources only, in a clean venv"
mkdir -p "$work/src"
while read -r sources; do
    for source in $sources; do cp -r "$source" "$work/src/"; done
done <"$work/copy.txt"
# As .dockerignore keeps them out of the context: the build must generate the
# protobuf modules itself.
find "$work/src" \( -name __pycache__ -o -name '*.egg-info' -o -name '*_pb2*.py*' \) -prune \
    -exec rm -rf {} +
python3 -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install -q --no-cache-dir "build==1.*"
(cd "$work/src" && "$work/build-venv/bin/python" -m build -q --wheel --outdir "$work/dist" >/dev/null)
ls "$work/dist"

echo "== runtime stage: the wheel with [server,postgres] in a clean venv"
python3 -m venv "$work/runtime"
for wheel in "$work"/dist/phasewatch-*.whl; do
    "$work/runtime/bin/pip" install -q --no-cache-dir "${wheel}[server,postgres]"
done
mkdir -p "$work/home"
(cd "$work/home" && "$work/runtime/bin/python" -c "import psycopg, detector._proto.phasewatch.v1.detector_pb2")

echo "== runtime stage: its RUN python steps with the image's ENV, from its WORKDIR"
(
    # shellcheck disable=SC1091
    source "$work/env.sh"
    cd "$work/home"
    export PATH="$work/runtime/bin:$PATH"
    started=$(date +%s)
    bash -euo pipefail "$work/python-runs.sh"
    echo "compiled in $(( $(date +%s) - started )) s"
)

echo "== ENTRYPOINT with the image's ENV, then HEALTHCHECK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
metrics_port=$(free_port)
# shellcheck disable=SC1091
source "$work/env.sh"
export PHASEWATCH_LISTEN="0.0.0.0:$grpc_port" PHASEWATCH_METRICS_LISTEN="0.0.0.0:$metrics_port"
# The image creates its data directory (install -d ... /home/phasewatch/data); the
# store refuses a missing directory rather than guessing, so make it here too.
mkdir -p "$work/data"
export PHASEWATCH_STORE="sqlite:///$work/data/phasewatch.db"
mapfile -t entrypoint < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))))' "$work/entrypoint.json")
(cd "$work/home" && exec env PATH="$work/runtime/bin:$PATH" "${entrypoint[@]}") >"$work/serve.log" 2>&1 &
server_pid=$!
mapfile -t healthcheck < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))))' "$work/healthcheck.json")
healthy=""
started=$(date +%s)
for _ in $(seq 60); do
    if PATH="$work/runtime/bin:$PATH" "${healthcheck[@]}" 2>/dev/null; then
        healthy=1; echo "SERVING after $(( $(date +%s) - started )) s"; break
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 1
done
[ -n "$healthy" ] || { echo "HEALTHCHECK never passed"; cat "$work/serve.log"; exit 1; }
python3 -c "import urllib.request,sys; body=urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(); assert 'phasewatch_' in body" \
    "http://127.0.0.1:$metrics_port/metrics"
kill -TERM "$server_pid"
wait "$server_pid" || { echo "serve did not stop cleanly on SIGTERM"; cat "$work/serve.log"; exit 1; }
server_pid=""
grep -q "listening on 0.0.0.0:$grpc_port" "$work/serve.log" || { cat "$work/serve.log"; exit 1; }
echo "== docker build check ok: HEALTHCHECK SERVING, /metrics up, clean stop on SIGTERM"
