"""Ingestion throughput: the bare-transport ceiling against ``phasewatch serve``.

In one run, for each server, batch size (points per columnar batch: 512 and
4096) and number of concurrent runs (1, 8, 64), the client streams synthetic
training runs (:mod:`benchmarks.workload`: 8 series, one line every 10 steps)
over the bidirectional ``Stream`` RPC, ``--window`` batches in flight per
stream, for ``--seconds``, and reports:

- points per second acknowledged (wall clock, client and server share the machine);
- server CPU-seconds per million points and points per server CPU-second
  ("per core"), from the server process's ``/proc/PID/stat`` (all its threads);
- the ratio of the full server's points per CPU-second to the bare one's;
- batch-to-event latency p50/p99: from writing a batch to reading the first
  event it caused (events come before the batch's Ack on the stream), over
  the batches that caused one; and batch-to-ack p50/p99 over all batches;
- peak RSS of the server during the cell (``VmHWM``, reset before each cell
  through ``/proc/PID/clear_refs``).

Servers, each a separate process with ``OPENBLAS_NUM_THREADS=1``:

- ``bare``: a servicer of the same generated proto (``PhaseDetectorServicer``)
  that only parses each batch into numpy arrays and acknowledges it, on a gRPC
  server with the same options as ``phasewatch serve``;
- ``full``: ``phasewatch serve`` with full detection and its default durability
  (a checkpoint per batch into a fresh SQLite file; ``--store`` to change).

The client is one asyncio process (grpc.aio) sending pre-serialised requests,
so its own cost stays small; the bare server cycles a pool of batches (it does
not look at steps), the full server gets each run's lines in order.

Usage (from the repository root; Linux, for /proc)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.ingest [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.workload import SERIES, block  # noqa: E402
from detector._proto.phasewatch.v1 import detector_pb2 as pb  # noqa: E402
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc  # noqa: E402

STREAM_METHOD = "/phasewatch.v1.PhaseDetector/Stream"
LOG_METHOD = "/phasewatch.v1.PhaseDetector/Log"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- the bare servicer ------------------------------------------------------------


class BareServicer(pb_grpc.PhaseDetectorServicer):
    """Parses each batch into numpy arrays and acknowledges it; nothing else."""

    @staticmethod
    def _parse(batch: pb.MetricBatch) -> tuple[int, int]:
        points, through = 0, -1
        for series in batch.series:
            steps = np.asarray(series.steps, dtype=np.int64)
            values = np.asarray(series.values, dtype=np.float64)
            if len(steps) != len(values):
                raise ValueError("steps and values differ in length")
            if len(steps):
                points += len(steps)
                through = max(through, int(steps[-1]))
        return points, through

    def Stream(self, request_iterator: Iterator[pb.StreamRequest],
               context: Any) -> Iterator[pb.StreamResponse]:
        through = -1
        for request in request_iterator:
            which = request.WhichOneof("msg")
            accepted = 0
            if which == "batch":
                accepted, last = self._parse(request.batch)
                through = max(through, last)
            yield pb.StreamResponse(ack=pb.Ack(through_step=through, accepted=accepted))

    def Log(self, request: pb.LogRequest, context: Any) -> pb.LogResponse:
        accepted, through = self._parse(request.batch)
        return pb.LogResponse(ack=pb.Ack(through_step=through, accepted=accepted))


def serve_bare(listen: str) -> None:
    """The bare server, with ``phasewatch serve``'s thread pool and message options."""
    from detector.server import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_WORKERS

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=DEFAULT_MAX_WORKERS),
        options=[("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=DEFAULT_MAX_WORKERS,
    )
    pb_grpc.add_PhaseDetectorServicer_to_server(BareServicer(), server)
    port = server.add_insecure_port(listen)
    server.start()
    print(f"bare servicer listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.wait_for_termination()


# --- server processes and their resource use -------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server in its own process: ``kind`` "bare" or "full" (``phasewatch serve``)."""

    def __init__(self, kind: str, store: str | None = None, metrics: bool = False,
                 args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.tmp = tempfile.TemporaryDirectory(prefix="phasewatch-bench-")
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.metrics_port = free_port() if metrics else None
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        if kind == "bare":
            cmd = [sys.executable, "-m", "benchmarks.ingest", "--serve-bare", self.target]
        else:
            cmd = [sys.executable, "-m", "detector", "serve", "--listen", self.target,
                   "--metrics-listen",
                   f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "",
                   "--store", store or f"sqlite:///{self.tmp.name}/bench.db", *args]
        self.process = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, text=True, env=env,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        assert self.process.stderr is not None
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            if re.search(r"listening on [^:]+:(\d+)", line):
                break
        else:
            raise RuntimeError(f"{kind} server did not start:\n{''.join(self.log)}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            del self.log[:-200]

    def cpu_seconds(self) -> float:
        """User plus system CPU of the server process, all threads."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def _status(self, key: str) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
        return float("nan")

    def rss_mib(self) -> float:
        return self._status("VmRSS")

    def peak_rss_mib(self) -> float:
        return self._status("VmHWM")

    def reset_peak_rss(self) -> bool:
        try:
            with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- requests ------------------------------------------------------------------------


def batch_request(seed: int, first_line: int, lines: int) -> bytes:
    """A serialised StreamRequest holding ``lines`` lines of run ``seed``."""
    cols = block(seed, first_line, lines)
    batch = pb.MetricBatch(series=[
        pb.Series(name=name, steps=steps, values=values) for name, (steps, values) in cols.items()
    ])
    return pb.StreamRequest(batch=batch).SerializeToString()


def start_request(run_id: str) -> bytes:
    return pb.StreamRequest(start=pb.RunStart(run_id=run_id, labels={"bench": "ingest"})).SerializeToString()


END_REQUEST = pb.StreamRequest(end=pb.RunEnd()).SerializeToString()


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


# --- the client ------------------------------------------------------------------------


@dataclass
class StreamStats:
    points: int = 0
    batches: int = 0
    events: int = 0
    rejected: int = 0
    ack_latency: list[float] = field(default_factory=list)
    event_latency: list[float] = field(default_factory=list)


async def _one_stream(channel: grpc.aio.Channel, run_id: str, seed: int, lines: int, pool: list[bytes] | None,
                      window: int, deadline: float, stats: StreamStats) -> None:
    call = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                 response_deserializer=pb.StreamResponse.FromString)()
    await call.write(start_request(run_id))
    response = await call.read()
    assert response.WhichOneof("msg") == "ack", response
    sent: list[tuple[float, bool]] = []  # (send time, event seen) of batches in flight, oldest first
    next_line = 0

    async def send() -> None:
        nonlocal next_line
        payload = pool[len(sent) % len(pool)] if pool is not None else batch_request(seed, next_line, lines)
        next_line += lines
        sent.append((time.perf_counter(), False))
        await call.write(payload)

    for _ in range(window):
        await send()
    while sent:
        response = await call.read()
        now = time.perf_counter()
        if response is grpc.aio.EOF:
            raise RuntimeError(f"stream {run_id} ended early")
        if response.WhichOneof("msg") == "event":
            stats.events += 1
            t0, seen = sent[0]
            if not seen:
                stats.event_latency.append(now - t0)
                sent[0] = (t0, True)
            continue
        t0, _ = sent.pop(0)
        stats.ack_latency.append(now - t0)
        stats.points += response.ack.accepted
        stats.rejected += response.ack.rejected
        stats.batches += 1
        if now < deadline:
            await send()
    await call.write(END_REQUEST)
    await call.done_writing()
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.WhichOneof("msg") == "event":
            stats.events += 1
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise RuntimeError(f"stream {run_id} ended with {code}: {await call.details()}")


async def _run_cell(target: str, runs: int, batch_points: int, seconds: float, window: int,
                    bare: bool, tag: str) -> tuple[StreamStats, float]:
    lines = max(1, batch_points // len(SERIES))
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(runs, 4))]
    for channel in channels:
        await channel.channel_ready()
    pools = {}
    if bare:  # the bare servicer does not look at steps: a few batches per run, cycled
        pools = {i: [batch_request(i, k * lines, lines) for k in range(4)] for i in range(runs)}
    stats = StreamStats()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(
        _one_stream(channels[i % len(channels)], f"{tag}-{i}", i, lines, pools.get(i), window,
                    deadline, stats)
        for i in range(runs)
    ))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return stats, elapsed


def run_cell(server: ServerProcess, runs: int, batch_points: int, seconds: float,
             window: int) -> dict[str, Any]:
    tag = f"{server.kind}-{batch_points}-{runs}-{time.time_ns()}"
    reset = server.reset_peak_rss()
    cpu0 = server.cpu_seconds()
    stats, elapsed = asyncio.run(_run_cell(server.target, runs, batch_points, seconds, window,
                                           server.kind == "bare", tag))
    cpu = server.cpu_seconds() - cpu0
    points = stats.points
    return {
        "server": server.kind,
        "batch_points": batch_points,
        "runs": runs,
        "seconds": round(elapsed, 3),
        "points": points,
        "batches": stats.batches,
        "rejected": stats.rejected,
        "events": stats.events,
        "points_per_second": points / elapsed,
        "server_cpu_seconds": round(cpu, 3),
        "cpu_seconds_per_million_points": 1e6 * cpu / points if points else None,
        "points_per_cpu_second": points / cpu if cpu > 0 else None,
        "event_latency_p50_ms": _ms(percentile(stats.event_latency, 50)),
        "event_latency_p99_ms": _ms(percentile(stats.event_latency, 99)),
        "event_latency_samples": len(stats.event_latency),
        "ack_latency_p50_ms": _ms(percentile(stats.ack_latency, 50)),
        "ack_latency_p99_ms": _ms(percentile(stats.ack_latency, 99)),
        "peak_rss_mib": round(server.peak_rss_mib(), 1) if reset else None,
        "rss_mib": round(server.rss_mib(), 1),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1e3 * seconds, 2)


# --- report ----------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec`` (">9.1f"), or a dash in the same width."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0].split(",")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, spec)


def table(cells: list[dict[str, Any]]) -> str:
    head = (f"{'server':6} {'batch':>5} {'runs':>4} {'points/s':>11} {'pts/cpu-s':>11} {'ratio':>6} "
            f"{'cpu-s/Mpt':>9} {'event p50':>9} {'p99 ms':>8} {'ack p50':>8} {'p99 ms':>8} "
            f"{'events':>6} {'peak MiB':>8}")
    out = [head, "-" * len(head)]
    for c in cells:
        out.append(
            f"{c['server']:6} {c['batch_points']:>5} {c['runs']:>4} {c['points_per_second']:>11,.0f} "
            f"{_fmt(c['points_per_cpu_second'], '>11,.0f')} {_fmt(c.get('ratio'), '>6.3f')} "
            f"{_fmt(c['cpu_seconds_per_million_points'], '>9.3f')} "
            f"{_fmt(c['event_latency_p50_ms'], '>9.1f')} {_fmt(c['event_latency_p99_ms'], '>8.1f')} "
            f"{_fmt(c['ack_latency_p50_ms'], '>8.1f')} {_fmt(c['ack_latency_p99_ms'], '>8.1f')} "
            f"{c['events']:>6} {_fmt(c['peak_rss_mib'], '>8.1f')}"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="512,4096", help="points per batch, comma-separated")
    parser.add_argument("--runs", default="1,8,64", help="concurrent runs, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="streaming time per cell")
    parser.add_argument("--window", type=int, default=2, help="batches in flight per stream")
    parser.add_argument("--servers", default="bare,full", help="which servers: bare, full")
    parser.add_argument("--store", help="store URL for the full server (default: a fresh SQLite file)")
    parser.add_argument("--quick", action="store_true", help="2 s per cell")
    parser.add_argument("--json", metavar="PATH", help="write the numbers here")
    parser.add_argument("--serve-bare", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    seconds = 2.0 if args.quick else args.seconds
    batches = [int(x) for x in args.batches.split(",")]
    runs = [int(x) for x in args.runs.split(",")]
    cells: list[dict[str, Any]] = []
    for kind in args.servers.split(","):
        with ServerProcess(kind, args.store) as server:
            # Warm-up: imports, first allocations, the store's first writes.
            run_cell(server, 1, batches[0], 0.5, args.window)
            for batch_points in batches:
                for n in runs:
                    cell = run_cell(server, n, batch_points, seconds, args.window)
                    cells.append(cell)
                    print(f"  {kind} batch={batch_points} runs={n}: "
                          f"{cell['points_per_second']:,.0f} points/s", file=sys.stderr, flush=True)
    bare = {(c["batch_points"], c["runs"]): c for c in cells if c["server"] == "bare"}
    for c in cells:
        ceiling = bare.get((c["batch_points"], c["runs"]))
        if (c["server"] == "full" and ceiling and ceiling["points_per_cpu_second"]
                and c["points_per_cpu_second"]):
            c["ratio"] = c["points_per_cpu_second"] / ceiling["points_per_cpu_second"]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"phasewatch ingest benchmark: {seconds:g} s a cell, window {args.window}, "
          f"{len(SERIES)} series a run, {os.cpu_count()} CPUs, load average {load}")
    print(table(cells))
    print("ratio: full / bare points per server CPU-second; latencies in ms (event: batch -> first "
          "event it caused; ack: batch -> its Ack)")
    if args.json:
        document = {
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "load_average_after": load},
            "settings": {"seconds": seconds, "window": args.window, "series": list(SERIES)},
            "cells": cells,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

