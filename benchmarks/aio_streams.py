"""Idle streams on a thread-per-call gRPC server against a ``grpc.aio`` one (issue 18).

Should the detector's servicer move to ``grpc.aio`` so that thousands of
mostly idle streams cost little? This measures it without porting the
servicer: the same proto (``phasewatch.v1.PhaseDetector``) served by a bare
servicer (``Stream`` acks each message, ``Log`` acks its points; no engine,
no store) in three servers, each in its own process:

- ``sync``: ``grpc.server`` on :class:`detector.guard.ElasticExecutor`, as
  ``phasewatch serve`` runs (a thread per open call, ended 30 s after idle);
- ``sync-pool``: ``grpc.server`` on a ``ThreadPoolExecutor`` (grpcio's usual
  setup: its threads are never given back);
- ``aio``: ``grpc.aio.server``, one event loop thread, a coroutine per call.

For each: threads and RSS (with its breakdown, see
:func:`benchmarks.idle_streams.memory_of`) at rest, with ``--streams`` idle
streams open (each sent one ``start``), and after they closed and the server
settled; the server's CPU while the streams idle (``--idle-seconds``); and a
normal client's 3-point ``Log`` latency with the streams open.

Usage (repository root; Linux, for /proc)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.aio_streams [--streams 2000] \\
        [--kinds sync,sync-pool,aio] [--json out.json]

Measured (2 000 idle streams over 20 connections, bare servicers, grpcio
1.85.3, CPython 3.11; 2-core VM shared with other work, load 2.3-3.5)::

    server     threads rest/open/after  RSS MiB rest/open/after  KiB/stream  Log p99 ms none/open
    sync          8 / 1994 /    8        38.9 / 131.6 /  66.2       47.5        0.91 / 1.32
    sync-pool     9 / 1947 / 1948        38.8 / 130.1 / 130.8       46.7        4.58 / 0.67
    aio           8 /    8 /    8        38.6 /  81.7 /  77.6       22.1        0.84 / 0.83

The server's CPU while the streams idled 10 s: 0.02 s (sync), 0.01 s (aio).
A burst of 2 000 opens lost 14 (sync) and 61 (sync-pool) streams at the client
as ``INTERNAL`` (``Failed "execute_batch"``: the aio client reports a write
to a stream the server already ended as that, hiding the server's status;
grpc/grpc#36066), none on aio.

Conclusion: ``grpc.aio`` halves what an idle stream costs while open (22
against 47 KiB, the difference being the thread's stack and arena) and holds
no thread for it, at the same latency and idle CPU. But it does not give the
memory back when the streams close (RSS stayed 39 MiB above rest; the sync
server on the elastic executor came back to 27 MiB above, its threads
ended); the difference at the detector's default cap of 256 streams is ~6
MiB. Porting the servicer would also mean running every engine call (SQLite,
detection, all blocking) in an executor, i.e. the threads back for busy
streams. So the detector stays on the sync server with the elastic executor;
``aio`` is worth it only for replicas meant to hold tens of thousands of
mostly idle streams, which the per-peer and total caps rule out today.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from detector._proto.phasewatch.v1 import detector_pb2 as pb  # noqa: E402
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc  # noqa: E402

KINDS = ("sync", "sync-pool", "aio")


# --- the servers (run in their own process: ``--serve KIND TARGET``) -------------------


def _ack(request: pb.StreamRequest) -> pb.StreamResponse:
    steps = [s for series in request.batch.series for s in series.steps]
    return pb.StreamResponse(ack=pb.Ack(through_step=max(steps, default=-1),
                                        accepted=len(steps)))


def _log_ack(request: pb.LogRequest) -> pb.LogResponse:
    steps = [s for series in request.batch.series for s in series.steps]
    return pb.LogResponse(ack=pb.Ack(through_step=max(steps, default=-1), accepted=len(steps)))


class SyncServicer(pb_grpc.PhaseDetectorServicer):
    """Acks every stream message and every Log: the transport's cost, nothing else."""

    def Stream(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        for request in request_iterator:
            yield _ack(request)

    def Log(self, request: pb.LogRequest, context: grpc.ServicerContext) -> pb.LogResponse:
        return _log_ack(request)


class AioServicer(pb_grpc.PhaseDetectorServicer):
    """:class:`SyncServicer` as coroutines."""

    async def Stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in request_iterator:
            yield _ack(request)

    async def Log(self, request: pb.LogRequest,  # type: ignore[override]
                  context: grpc.aio.ServicerContext) -> pb.LogResponse:
        return _log_ack(request)


def serve(kind: str, target: str, max_threads: int) -> None:
    """Serve ``kind`` on ``target`` until killed; prints ``listening on TARGET`` when ready."""
    if kind == "aio":
        async def main() -> None:
            server = grpc.aio.server()
            pb_grpc.add_PhaseDetectorServicer_to_server(AioServicer(), server)
            server.add_insecure_port(target)
            await server.start()
            print(f"listening on {target}", flush=True)
            await server.wait_for_termination()

        asyncio.run(main())
        return
    if kind == "sync":
        from detector.guard import ElasticExecutor

        executor: futures.Executor = ElasticExecutor(max_threads, idle_seconds=30.0)
    else:
        executor = futures.ThreadPoolExecutor(max_threads)
    server = grpc.server(executor)
    pb_grpc.add_PhaseDetectorServicer_to_server(SyncServicer(), server)
    server.add_insecure_port(target)
    server.start()
    print(f"listening on {target}", flush=True)
    server.wait_for_termination()


# --- the measurement ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    from benchmarks.ingest import CLOCK_TICKS

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One server of ``kind``: its costs at rest, with the idle streams, and after."""
    from benchmarks.idle_streams import snapshot, threads_of
    from benchmarks.ingest import free_port, percentile

    target = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.aio_streams", "--serve", kind, target,
         "--max-threads", str(args.streams + 100)],
        stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]),
        env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert process.stdout is not None
    if "listening" not in process.stdout.readline():
        raise RuntimeError(f"the {kind} server did not start")
    pid = process.pid
    out: dict[str, Any] = {"kind": kind, "streams": args.streams}
    normal = grpc.aio.insecure_channel(target)
    stub = pb_grpc.PhaseDetectorStub(normal)

    async def log_latencies(count: int) -> list[float]:
        latencies = []
        for i in range(count):
            started = time.perf_counter()
            await stub.Log(pb.LogRequest(run_id="normal", batch=pb.MetricBatch(series=[
                pb.Series(name="train_loss", steps=[3 * i, 3 * i + 1, 3 * i + 2],
                          values=[1.0, 0.9, 0.8])])), timeout=30)
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies

    try:
        # Warm: a few streams and Logs, so "rest" is a server that has served.
        await log_latencies(50)
        for _ in range(20):
            async for _response in stub.Stream(iter([
                    pb.StreamRequest(start=pb.RunStart(run_id="warm"))]), timeout=30):
                pass
        await asyncio.sleep(args.settle if kind == "sync" else 1.0)
        out["rest"] = snapshot(pid)
        quiet = await log_latencies(args.logs)
        out["log_ms_p99_no_streams"] = round(percentile(quiet, 99) or -1, 2)

        channels = [grpc.aio.insecure_channel(target) for _ in range(args.channels)]
        gate = asyncio.Event()
        opened = Counter()

        async def idle(i: int) -> None:
            async def requests() -> Any:
                yield pb.StreamRequest(start=pb.RunStart(run_id=f"idle-{i}"))
                await gate.wait()

            call = pb_grpc.PhaseDetectorStub(channels[i % len(channels)]).Stream(requests())
            try:
                await call.read()
                opened["open"] += 1
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as error:
                opened[f"{error.code().name}"] += 1

        started = time.perf_counter()
        tasks = [asyncio.create_task(idle(i)) for i in range(args.streams)]
        while sum(opened.values()) < args.streams:
            await asyncio.sleep(0.1)
        out["open_s"] = round(time.perf_counter() - started, 2)
        out["opened"] = dict(opened)
        out["open"] = snapshot(pid)
        cpu = cpu_seconds(pid)
        await asyncio.sleep(args.idle_seconds)
        out["idle_cpu_s"] = round(cpu_seconds(pid) - cpu, 3)
        out["idle_seconds"] = args.idle_seconds
        busy = await log_latencies(args.logs)
        out["log_ms_p50"] = round(percentile(busy, 50) or -1, 2)
        out["log_ms_p99"] = round(percentile(busy, 99) or -1, 2)
        gate.set()
        await asyncio.gather(*tasks)
        for channel in channels:
            await channel.close()
        out["closed"] = snapshot(pid)
        waited = time.perf_counter()
        while (time.perf_counter() - waited < args.settle
               and threads_of(pid) > out["rest"]["threads"]):
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        out["after"] = snapshot(pid)
        out["after"]["settle_s"] = round(time.perf_counter() - waited, 1)
    finally:
        await normal.close()
        process.kill()
        process.wait(30)
    return out


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'server':<10} {'threads rest/open/after':>24} {'RSS MiB rest/open/after':>24} "
            f"{'KiB/stream':>10} {'Log p99 ms (none/open)':>23} {'idle CPU s':>10}")
    rows = [head]
    for r in results:
        per_stream = 1024 * (r["open"]["rss_mib"] - r["rest"]["rss_mib"]) / r["streams"]
        rows.append(
            f"{r['kind']:<10} "
            f"{r['rest']['threads']:>8}/{r['open']['threads']:>6}/{r['after']['threads']:>6}  "
            f"{r['rest']['rss_mib']:>9.1f}/{r['open']['rss_mib']:>6.1f}/{r['after']['rss_mib']:>6.1f} "
            f"{per_stream:>10.1f} "
            f"{r['log_ms_p99_no_streams']:>12.2f}/{r['log_ms_p99']:>9.2f} "
            f"{r['idle_cpu_s']:>10.3f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--max-threads", type=int, default=2100, help=argparse.SUPPRESS)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--logs", type=int, default=300)
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="how long the streams idle while the server's CPU is measured")
    parser.add_argument("--settle", type=float, default=45.0,
                        help="wait at most this long after the streams close")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], args.serve[1], args.max_threads)
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    results = [asyncio.run(measure(kind, args)) for kind in kinds]
    print(json.dumps(results, indent=2))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
