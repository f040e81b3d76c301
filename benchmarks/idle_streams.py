"""Idle streams against ``phasewatch serve``: what they cost, and whether others still get served.

Opens ``--streams`` (2 000) ``Stream`` calls that send ``start`` and nothing
else (spread over ``--channels`` connections), then, while they are open, a
normal client sends ``--logs`` 3-point ``Log`` calls one after another and
``--health`` health checks. Reported: how many idle streams were accepted and
refused, the normal client's Log latency p50/p99/max and errors, health
answers, and the server's threads and RSS before, with the streams open, and
``--settle`` seconds after they closed (the elastic executor ends idle threads
after 30 s).

Usage (repository root; Linux, for /proc)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.idle_streams [--streams 2000] \\
        [--server-args "--max-concurrent-streams 2100 --max-streams-per-peer 2100"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from detector._proto.phasewatch.v1 import detector_pb2 as pb  # noqa: E402
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc  # noqa: E402


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ingest import ServerProcess, percentile

    server = ServerProcess("full", args=args.server_args.split())
    out: dict[str, Any] = {"streams": args.streams}
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(args.channels)]
    normal = grpc.aio.insecure_channel(server.target)
    stub = pb_grpc.PhaseDetectorStub(normal)
    health = health_pb2_grpc.HealthStub(normal)
    try:
        # The idle streams' runs exist before "before": what is measured is the
        # streams' cost, not that of 2 000 declared runs (which stay, as they should).
        for i in ["warm", *(f"idle-{i}" for i in range(args.streams))]:
            await stub.Log(pb.LogRequest(run_id=i, batch=pb.MetricBatch(series=[
                pb.Series(name="train_loss", steps=[0], values=[1.0])])), timeout=30)
        out["before"] = {"threads": threads_of(server.process.pid),
                         "rss_mib": round(server.rss_mib(), 1)}
        gate = asyncio.Event()
        accepted = refused = 0
        why: Counter = Counter()

        async def idle(i: int) -> None:
            nonlocal accepted, refused

            async def requests():
                yield pb.StreamRequest(start=pb.RunStart(run_id=f"idle-{i}"))
                await gate.wait()

            call = pb_grpc.PhaseDetectorStub(channels[i % len(channels)]).Stream(requests())
            try:
                await call.read()
                accepted += 1
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as error:
                refused += 1
                why[f"{error.code().name}: {error.details()}"[:120]] += 1

        tasks = [asyncio.create_task(idle(i)) for i in range(args.streams)]
        while accepted + refused < args.streams:
            await asyncio.sleep(0.2)
        out["accepted"], out["refused"] = accepted, refused
        out["refusals"] = dict(why)
        out["open"] = {"threads": threads_of(server.process.pid),
                       "rss_mib": round(server.rss_mib(), 1)}
        latencies, errors = [], 0
        for i in range(args.logs):
            started = time.perf_counter()
            try:
                await stub.Log(pb.LogRequest(run_id="normal", batch=pb.MetricBatch(series=[
                    pb.Series(name="train_loss", steps=[3 * i, 3 * i + 1, 3 * i + 2],
                              values=[1.0, 0.9, 0.8])])), timeout=30)
                latencies.append((time.perf_counter() - started) * 1000)
            except grpc.aio.AioRpcError:
                errors += 1
        serving = 0
        health_ms = []
        for _ in range(args.health):
            started = time.perf_counter()
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                serving += answer.status == health_pb2.HealthCheckResponse.SERVING
                health_ms.append((time.perf_counter() - started) * 1000)
            except grpc.aio.AioRpcError:
                pass
        out["normal_client"] = {
            "logs": args.logs, "errors": errors,
            "ack_ms_p50": round(percentile(latencies, 50) or -1, 2),
            "ack_ms_p99": round(percentile(latencies, 99) or -1, 2),
            "ack_ms_max": round(max(latencies, default=-1), 2),
            "health_serving": f"{serving}/{args.health}",
            "health_ms_p99": round(percentile(health_ms, 99) or -1, 2),
        }
        gate.set()
        await asyncio.gather(*tasks)
        for channel in channels:
            await channel.close()
        await asyncio.sleep(args.settle)
        out["after_close"] = {"threads": threads_of(server.process.pid),
                              "rss_mib": round(server.rss_mib(), 1),
                              "settle_s": args.settle}
    finally:
        await normal.close()
        server.process.terminate()
        server.process.wait(30)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--logs", type=int, default=300)
    parser.add_argument("--health", type=int, default=50)
    parser.add_argument("--settle", type=float, default=40.0)
    parser.add_argument("--server-args", default="--max-concurrent-streams 2100 "
                        "--max-streams-per-peer 2100")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
