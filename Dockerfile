# syntax=docker/dockerfile:1
# Build stage: the wheel, with the protobuf modules generated from proto/ during the build.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY detector ./detector
RUN pip install --no-cache-dir build && python -m build --wheel --outdir /dist

# Runtime stage: slim, non-root.
FROM python:3.11-slim
ENV OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist \
    && useradd --create-home --uid 10001 phasewatch
USER phasewatch
EXPOSE 50051 9109
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:50051'); r=g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2); sys.exit(r.status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["phasewatch", "serve", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9109", "--store", "sqlite:////home/phasewatch/phasewatch.db"]
