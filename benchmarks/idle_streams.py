"""Idle streams against ``phasewatch serve``: what they cost, and whether others still get served.

First every run the idle streams will name is written once by a stream that
then half-closes (so the runs, and the detection kernels' code, are in memory
before anything is measured), and the server is left until the threads that
did it have ended: "before". Then ``--streams`` (2 000) ``Stream`` calls send
``start`` and nothing else (spread over ``--channels`` connections); while
they are open a normal client sends ``--logs`` 3-point ``Log`` calls one after
another and ``--health`` health checks; then the streams are closed (``--close
half``: half-closed, as a job that exits; ``cancel``) and the server is left
until its threads have ended (at most ``--settle`` s). ``--rounds`` repeats
the streams: a leak grows with every round, a high-water mark does not.

Reported: idle streams accepted and refused (and why), the normal client's
Log latency p50/p99/max and errors, health answers, and the server's threads,
RSS and RSS by kind of mapping (:func:`memory_of`) before, with the streams
open, just after they closed and settled; ``summary`` compares before with the
last round's end.

Measured (2 000 streams, half-close; 2-core VM shared with other work, load
1.3-2.6): before 8 threads and 329.5 MiB; open 1 856 threads, 426.6 MiB;
after 8 threads and 356.6 MiB (+8.2 %). With ``--rounds 2`` the second round
ended where the first did (357.0 / 357.3 MiB): pymalloc's arenas keep ~21 MiB
of high-water, the rest goes back. The normal client's p99 ack 6.0 ms (max
15.5), health 50/50.

Before the runs were prepared by a stream the comparison took in their first
flush and the kernels' loading (libllvmlite alone: +28 MiB), +22 % to +67 %.
About 5 % of the 2 000 opens fail at this client as ``INTERNAL`` (``Failed
"execute_batch"``), on a bare sync server too and never on an aio one: see
:mod:`benchmarks.aio_streams`.

Usage (repository root; Linux, for /proc)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.idle_streams [--streams 2000] [--rounds 2] \\
        [--json out.json] \\
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


def memory_of(pid: int) -> dict[str, float]:
    """The server's resident memory by kind of mapping (MiB), from /proc/PID/smaps.

    ``heap``: the main malloc arena (brk); ``malloc_arenas``: glibc's other
    arenas (anonymous read-write mappings starting on a 64 MiB boundary, one
    per group of threads that malloc'd at once); ``python_arenas``: pymalloc's
    1 MiB arenas (small Python objects); ``thread_stacks``: resident pages of
    8 MiB mappings (stacks at the default ulimit); ``other_anon``: the rest
    (large blocks malloc mmaps on its own, numpy arrays); ``files``: code and
    mapped files. O(mappings)."""
    kinds = dict.fromkeys(("heap", "malloc_arenas", "python_arenas", "thread_stacks",
                           "other_anon", "files"), 0)
    low = size = 0
    path = perms = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head[0].endswith(":"):  # a mapping's first line: range perms ... [path]
                low, high = (int(x, 16) for x in head[0].split("-"))
                size, perms = (high - low) // 1024, head[1]
                path = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                rss = int(head[1])
                if path == "[heap]":
                    kind = "heap"
                elif path:
                    kind = "files"
                elif perms != "rw-p":
                    kind = "other_anon"
                elif low % (64 << 20) == 0 and size <= 65536:
                    kind = "malloc_arenas"
                elif size == 1024:
                    kind = "python_arenas"
                elif size == 8192:
                    kind = "thread_stacks"
                else:
                    kind = "other_anon"
                kinds[kind] += rss
    return {k: round(v / 1024, 1) for k, v in kinds.items()}


def snapshot(pid: int) -> dict[str, Any]:
    """Threads, RSS and its breakdown (:func:`memory_of`) of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"threads": threads_of(pid), "rss_mib": round(rss / 1024, 1), "by_kind": memory_of(pid)}


# The threads of an idle server: main, gRPC's pollers and timers, the store's.
RESTING_THREADS = 12


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


async def _settle(pid: int, limit: float) -> float:
    """Wait until the server is back to its resting threads (at most ``limit`` s): seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit and threads_of(pid) > RESTING_THREADS:
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)  # the last threads' exit and the heap trim after them
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.ingest import ServerProcess

    env = dict(item.split("=", 1) for item in args.server_env)
    server = ServerProcess("full", args=args.server_args.split(), env=env)
    out: dict[str, Any] = {"streams": args.streams, "close": args.close,
                           "server_env": args.server_env, "rounds": []}
    normal = grpc.aio.insecure_channel(server.target)
    stub = pb_grpc.PhaseDetectorStub(normal)
    health = health_pb2_grpc.HealthStub(normal)
    try:
        # The idle streams' runs exist before "before", each written once by a
        # stream that then half-closed (so its point was detected and nothing is
        # held): what is measured is the idle streams' cost, not that of 2 000
        # runs (which stay, as they should), nor the one-time loading of the
        # detection kernels. ``--prep-concurrency`` streams at a time.
        pending = iter(["warm", *(f"idle-{i}" for i in range(args.streams))])

        async def prepare() -> None:
            for run_id in pending:
                call = stub.Stream(iter([
                    pb.StreamRequest(start=pb.RunStart(run_id=run_id)),
                    pb.StreamRequest(batch=pb.MetricBatch(series=[
                        pb.Series(name="train_loss", steps=[0], values=[1.0])]))]), timeout=30)
                async for _ in call:
                    pass

        await asyncio.gather(*(prepare() for _ in range(args.prep_concurrency)))
        out["prepared"] = snapshot(server.process.pid)
        # Until the threads the preparation started have ended (idle 30 s).
        await _settle(server.process.pid, args.settle)
        out["before"] = snapshot(server.process.pid)
        for _ in range(args.rounds):
            out["rounds"].append(await _round(args, server, stub, health))
        first, last = out["rounds"][0], out["rounds"][-1]
        before, after = out["before"], last["after_close"]
        out["summary"] = {
            "accepted": first["accepted"], "refused": first["refused"],
            "ack_ms_p99": first["normal_client"]["ack_ms_p99"],
            "health_serving": first["normal_client"]["health_serving"],
            "threads_before": before["threads"], "threads_open": first["open"]["threads"],
            "threads_after": after["threads"],
            "rss_mib_before": before["rss_mib"], "rss_mib_open": first["open"]["rss_mib"],
            "rss_mib_after": after["rss_mib"],
            "rss_change_pct": round(100 * (after["rss_mib"] - before["rss_mib"])
                                    / before["rss_mib"], 1),
            "threads_change_pct": round(100 * (after["threads"] - before["threads"])
                                        / before["threads"], 1),
        }
    finally:
        out["server_log_tail"] = [line.rstrip() for line in server.log[-5:]]
        await normal.close()
        server.process.terminate()
        server.process.wait(30)
    return out


async def _round(args: argparse.Namespace, server: Any, stub: pb_grpc.PhaseDetectorStub,
                 health: health_pb2_grpc.HealthStub) -> dict[str, Any]:
    """Open the idle streams, serve the normal client meanwhile, close them, let the server settle."""
    from benchmarks.ingest import percentile

    pid = server.process.pid
    out: dict[str, Any] = {}
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(args.channels)]
    gate = asyncio.Event()
    accepted = refused = 0
    why: Counter = Counter()

    async def idle(i: int) -> None:
        nonlocal accepted, refused

        async def requests() -> Any:
            yield pb.StreamRequest(start=pb.RunStart(run_id=f"idle-{i}"))
            await gate.wait()

        call = pb_grpc.PhaseDetectorStub(channels[i % len(channels)]).Stream(requests())
        try:
            await call.read()
            accepted += 1
            if args.close == "cancel":
                await gate.wait()
                call.cancel()
                return
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            refused += 1
            why[f"{error.code().name}: {error.details()}"[:120]] += 1
            if error.code() == grpc.StatusCode.INTERNAL:  # the client's core's, or the server's?
                why["debug: " + (error.debug_error_string() or "")[:40]] += 1

    tasks = [asyncio.create_task(idle(i)) for i in range(args.streams)]
    while accepted + refused < args.streams:
        await asyncio.sleep(0.2)
    out["accepted"], out["refused"] = accepted, refused
    out["refusals"] = dict(why)
    out["open"] = snapshot(pid)
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
    out["closed"] = snapshot(pid)
    waited = await _settle(pid, args.settle)
    out["after_close"] = snapshot(pid)
    out["after_close"]["settle_s"] = round(waited, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--logs", type=int, default=300)
    parser.add_argument("--health", type=int, default=50)
    parser.add_argument("--settle", type=float, default=60.0,
                        help="wait at most this long for the server's threads to end")
    parser.add_argument("--prep-concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1,
                        help="open and close the idle streams this many times (a leak grows "
                        "with each round; fragmentation does not)")
    parser.add_argument("--close", choices=("half", "cancel"), default="half",
                        help="end each idle stream by half-closing it (the server then "
                        "flushes its run) or by cancelling it")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the server (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--json", metavar="OUT", help="also write the result here")
    parser.add_argument("--server-args", default="--max-concurrent-streams 2100 "
                        "--max-streams-per-peer 2100")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

