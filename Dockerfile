# syntax=docker/dockerfile:1
# phasewatch detector image. deploy/docker-build-check.sh replays these steps in
# clean venvs in CI (no Docker engine there) and hadolint lints this file.

# --- build: the wheel, with the protobuf modules generated from proto/ by the build.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY detector ./detector
RUN pip install --no-cache-dir "build==1.*" \
    && python -m build --wheel --outdir /dist

# --- runtime: slim, non-root, the wheel with the detector's stack and its PostgreSQL driver.
FROM python:3.11-slim
# One BLAS thread per process (many RPC threads share the cores); logs unbuffered;
# listen on every interface of the container; the store comes from
# PHASEWATCH_STORE (a Secret in Kubernetes) or --store, else a SQLite file. Every
# `phasewatch serve` flag may be set as PHASEWATCH_<FLAG> the same way.
ENV OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PHASEWATCH_LISTEN=0.0.0.0:50051 \
    PHASEWATCH_METRICS_LISTEN=0.0.0.0:9109 \
    PHASEWATCH_STORE=sqlite:////home/phasewatch/data/phasewatch.db
COPY --from=build /dist /dist
# A shell loop, not a glob in quotes: pip needs the wheel's real name with the extras
# ([server]: the detector's dependencies; the default install is the client SDK).
# DL3013 (pin versions) does not apply: it is our own wheel, built above, and its
# dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN for wheel in /dist/phasewatch-*.whl; do pip install --no-cache-dir "${wheel}[server,postgres]"; done \
    && rm -rf /dist \
    && useradd --create-home --uid 10001 --user-group phasewatch \
    && install -d -o phasewatch -g phasewatch /home/phasewatch/data
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/phasewatch
# Compile the detection core's kernels (numba) into the image, as the user that runs
# them (numba caches them under ~/.cache/numba): a start (whose warm-up runs every
# kernel before it reports SERVING) then loads them in about a second instead of
# compiling for about a minute. On another CPU model than the build's they compile once more.
RUN python -c "import detector; from importlib import resources; \
detector.analyze(str(resources.files('detector.data') / 'grok_add_0.jsonl'))"
VOLUME ["/home/phasewatch/data"]
EXPOSE 50051 9109
# The standard grpc.health.v1 service, as Kubernetes' native gRPC probes ask it.
# `phasewatch health` asks the local address of PHASEWATCH_LISTEN (a changed port
# follows), and takes TLS from PHASEWATCH_TLS_CA, PHASEWATCH_TLS_CLIENT_CERT/KEY and
# PHASEWATCH_TLS_SERVER_NAME when the detector serves TLS; it imports no
# detection code (about 0.3 s of CPU a check).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["phasewatch", "health", "--timeout", "4"]
ENTRYPOINT ["phasewatch", "serve"]
