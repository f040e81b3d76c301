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
  (a checkpoint per batch into a fresh SQLite file; ``--store`` to change);
- ``bare-aio`` (only when asked for in ``--servers``): the bare servicer on
  grpc.aio's server, one event loop instead of a thread a stream: what the sync
  server's thread hand-offs cost. The ratio's reference stays ``bare``;
- ``engine-aio`` and ``engine-aio-worker`` (only when asked for, real-run
  workload): the detector's engine behind grpc.aio, Stream only, detecting on
  the event loop itself or on one worker thread, the same SQLite durability,
  none of ``serve``'s guard, auth, metrics, exporter or alerts: what porting
  the Stream RPC to grpc.aio would buy (:class:`AioEngineServicer`);
- ``full-nodetect`` (only when asked for): ``phasewatch serve`` as ``full``
  with every run's detection replaced by nothing (:mod:`benchmarks.nodetect_serve`:
  the engine, store, guard and handlers as they are, no series detector or
  labeller run, no event sent): how far the service around detection alone
  is from the bare transport. Closed-loop cells only.

``--bare-events N`` makes the bare servers answer every batch with N event
messages before its ack, as the full server answers with one message an
event: what the events cost the transport alone.

Real-run workload (``--workload real``, :mod:`benchmarks.real_workload`): the
labelled runs in ``<repo>/../shared/runs`` and ``<repo>/../shared/real_runs``
(and ``benchmarks/generated/*.jsonl``), cut into batches of ``--lines`` logged
lines (32 and 256: every series' points at those lines, one columnar batch),
serialised once. ``--streams`` slots (32) stream concurrently; each streams one
run after another (start, its batches in order, end; the end goes on while the
slot starts its next run), slot ``k``'s ``j``-th run being the ``(k + j ×
streams)``-th file, cycled, under its own run id ``<file>-<k>.<j>-<cell>``. The
bare and the full server get the same messages in the same process run; the
table gives points/s for both and their ratio (wall clock, and per server
CPU-second). Then open-loop cells on the full server: each slot sends a batch
every ``streams / rate`` s on a fixed schedule whatever is in flight (``--rate``
batches a second over all slots; by default half the full server's
closed-loop batches a second at that batch size), for ``--open-seconds``;
latencies count from the scheduled send time, so a server that falls behind
shows in them. Every cell records the machine's load average at its start and
end (the machine may be shared).

The client is one asyncio process (grpc.aio) sending pre-serialised requests,
so its own cost stays small; the bare server cycles a pool of batches (it does
not look at steps), the full server gets each run's lines in order.

Usage (from the repository root; Linux, for /proc)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.ingest [--quick] [--json OUT]
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.ingest --workload real [--quick] [--json OUT]
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
from collections import deque
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
from detector.convert import batch_to_columns, event_to_proto  # noqa: E402

STREAM_METHOD = "/phasewatch.v1.PhaseDetector/Stream"
LOG_METHOD = "/phasewatch.v1.PhaseDetector/Log"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- the bare servicer ------------------------------------------------------------


class BareServicer(pb_grpc.PhaseDetectorServicer):
    """Parses each batch into numpy arrays and acknowledges it; nothing else.

    With ``events`` > 0 each batch is also answered with that many event
    messages before its ack (a ``StreamResponse`` carries one event): what the
    full server's events cost the transport alone.
    """

    def __init__(self, events: int = 0) -> None:
        self.events = events

    def _responses(self, through: int, accepted: int) -> list[pb.StreamResponse]:
        ack = pb.StreamResponse(ack=pb.Ack(through_step=through, accepted=accepted))
        if not (self.events and accepted):
            return [ack]  # the reference: nothing made that the plain ack does not need
        event = pb.StreamResponse(event=pb.PhaseEvent(
            run_id="bare", step=through, kind=pb.EVENT_KIND_CHANGE_POINT, series="val_acc",
            message="a change of level in val_acc", evidence={"cost_gain": "12.5"}))
        return [event] * self.events + [ack]

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
            yield from self._responses(through, accepted)

    def Log(self, request: pb.LogRequest, context: Any) -> pb.LogResponse:
        accepted, through = self._parse(request.batch)
        return pb.LogResponse(ack=pb.Ack(through_step=through, accepted=accepted))


class AioBareServicer(BareServicer):
    """:class:`BareServicer` on grpc.aio: one event loop instead of a thread a stream
    (``--servers bare-aio``: what the transport costs without the sync server's
    thread hand-offs; the ratio's reference stays the sync ``bare``)."""

    async def Stream(self, request_iterator: Any, context: Any) -> Any:  # type: ignore[override]
        through = -1
        async for request in request_iterator:
            accepted = 0
            if request.WhichOneof("msg") == "batch":
                accepted, last = self._parse(request.batch)
                through = max(through, last)
            for response in self._responses(through, accepted):
                yield response


class AioEngineServicer(pb_grpc.PhaseDetectorServicer):
    """The detector's :class:`~detector.engine.Engine` behind grpc.aio's server
    (``--servers engine-aio`` and ``engine-aio-worker``, real-run workload): Stream
    only, one message an event then the ack, as ``phasewatch serve`` answers. Each
    start, batch and end runs on the event loop itself (``worker`` False: no thread
    hands anything to another, and nothing else runs while a batch is detected) or
    on one worker thread (``run_in_executor``: the loop keeps serving the transport
    meanwhile, and takes the interpreter lock whenever detection lets it go). A
    measurement of what porting the Stream RPC to grpc.aio would buy, not a
    server: no guard, authentication, RPC metrics, exporter, alerts or claims
    (``phasewatch serve`` runs them all), the same default durability (a
    checkpoint a batch into SQLite)."""

    def __init__(self, store_url: str, worker: bool = False) -> None:
        from detector.engine import Engine
        from detector.store import open_store

        self.engine = Engine(store=open_store(store_url))
        self.worker = futures.ThreadPoolExecutor(max_workers=1) if worker else None

    def _batch(self, run_id: str, batch: pb.MetricBatch) -> list[pb.StreamResponse]:
        result = self.engine.ingest(run_id, batch_to_columns(batch))
        out = [pb.StreamResponse(event=event_to_proto(run_id, e)) for e in result.events]
        out.append(pb.StreamResponse(ack=pb.Ack(through_step=result.through_step, accepted=result.accepted,
                                                rejected=result.rejected)))
        return out

    def _end(self, run_id: str, final_step: int) -> list[pb.StreamResponse]:
        events = self.engine.end_run(run_id, final_step or None)
        out = [pb.StreamResponse(event=event_to_proto(run_id, e)) for e in events]
        out.append(pb.StreamResponse(ack=pb.Ack(through_step=self.engine.status(run_id).last_step)))
        return out

    def _start(self, run_id: str, labels: dict[str, str]) -> list[pb.StreamResponse]:
        status = self.engine.start_run(run_id, labels)
        return [pb.StreamResponse(ack=pb.Ack(through_step=status.last_step))]

    async def _call(self, fn: Any, *args: Any) -> list[pb.StreamResponse]:
        if self.worker is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def Stream(self, request_iterator: Any, context: Any) -> Any:  # type: ignore[override]
        run_id = ""
        async for request in request_iterator:
            which = request.WhichOneof("msg")
            if which == "start":
                run_id = request.start.run_id
                responses = await self._call(self._start, run_id, dict(request.start.labels))
            elif which == "batch":
                responses = await self._call(self._batch, run_id, request.batch)
            else:
                responses = await self._call(self._end, run_id, request.end.final_step)
            for response in responses:
                yield response


def serve_engine_aio(listen: str, store_url: str, worker: bool = False) -> None:
    """:class:`AioEngineServicer` on grpc.aio's server, after ``phasewatch serve``'s
    warm-up (the kernels loaded before the first batch)."""
    from detector.server import DEFAULT_MAX_MESSAGE_BYTES
    from detector.server.app import warm_up

    warm_up()

    async def run() -> None:
        options = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options)
        pb_grpc.add_PhaseDetectorServicer_to_server(AioEngineServicer(store_url, worker), server)
        port = server.add_insecure_port(listen)
        await server.start()
        print(f"engine (aio) listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def serve_bare(listen: str, events: int = 0, aio: bool = False) -> None:
    """The bare server, with ``phasewatch serve``'s thread pool and message options
    (``aio``: grpc.aio's server with the same message options)."""
    from detector.server import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_WORKERS

    options = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    if aio:
        async def run() -> None:
            server = grpc.aio.server(options=options)
            pb_grpc.add_PhaseDetectorServicer_to_server(AioBareServicer(events), server)
            port = server.add_insecure_port(listen)
            await server.start()
            print(f"bare servicer (aio) listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
            await server.wait_for_termination()

        asyncio.run(run())
        return
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=DEFAULT_MAX_WORKERS),
        options=options,
        maximum_concurrent_rpcs=DEFAULT_MAX_WORKERS,
    )
    pb_grpc.add_PhaseDetectorServicer_to_server(BareServicer(events), server)
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
    """A server in its own process: ``kind`` "bare", "bare-aio", "engine-aio", "full"
    (``phasewatch serve``) or "full-nodetect" (the same, detecting nothing)."""

    def __init__(self, kind: str, store: str | None = None, metrics: bool = False,
                 args: Sequence[str] = (), env: dict[str, str] | None = None,
                 profile: str | None = None, bare_events: int = 0) -> None:
        self.kind = kind
        self.tmp = tempfile.TemporaryDirectory(prefix="phasewatch-bench-")
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.metrics_port = free_port() if metrics else None
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        if kind.startswith("bare"):
            cmd = [sys.executable, "-m", "benchmarks.ingest", "--serve-bare", self.target,
                   "--bare-events", str(bare_events), *(["--serve-bare-aio"] if kind == "bare-aio" else [])]
        elif kind.startswith("engine-aio"):
            cmd = [sys.executable, "-m", "benchmarks.ingest", "--serve-engine-aio", self.target,
                   "--store", store or f"sqlite:///{self.tmp.name}/bench.db",
                   *(["--serve-engine-worker"] if kind == "engine-aio-worker" else [])]
        else:
            # profile: the same server under benchmarks.profile_serve (cProfile on every thread);
            # full-nodetect: the same server with no detection (benchmarks.nodetect_serve).
            entry = (["benchmarks.profile_serve", profile] if profile
                     else ["benchmarks.nodetect_serve"] if kind == "full-nodetect" else ["detector"])
            cmd = [sys.executable, "-m", *entry, "serve", "--listen", self.target,
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


def _load() -> list[float] | None:
    """The machine's load averages (1, 5, 15 min): the machine is shared."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


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


def _measured(server: ServerProcess, stats: Any, elapsed: float, cpu: float, reset: bool,
              load_start: list[float] | None) -> dict[str, Any]:
    """A cell's throughput, server CPU, latencies, RSS and load: the numbers every
    workload reports (``stats``: its :class:`StreamStats` or the real workload's)."""
    points = stats.points
    return {
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
        "load_start": load_start,
        "load_end": _load(),
    }


def run_cell(server: ServerProcess, runs: int, batch_points: int, seconds: float,
             window: int) -> dict[str, Any]:
    tag = f"{server.kind}-{batch_points}-{runs}-{time.time_ns()}"
    load_start = _load()
    reset = server.reset_peak_rss()
    cpu0 = server.cpu_seconds()
    stats, elapsed = asyncio.run(_run_cell(server.target, runs, batch_points, seconds, window,
                                           server.kind.startswith("bare"), tag))
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
        **_measured(server, stats, elapsed, cpu, reset, load_start),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1e3 * seconds, 2)


# --- the real-run workload -----------------------------------------------------------------


@dataclass
class RealStats(StreamStats):
    runs_started: int = 0
    runs_ended: int = 0
    lateness: list[float] = field(default_factory=list)  # open loop: write time - scheduled time


Plan = list[tuple[str, list[tuple[bytes, int]]]]  # (run name, its serialised batches and points)


async def _open_run(channel: grpc.aio.Channel, run_id: str) -> Any:
    call = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                 response_deserializer=pb.StreamResponse.FromString)()
    await call.write(start_request(run_id))
    response = await call.read()
    if response is grpc.aio.EOF or response.WhichOneof("msg") != "ack":
        raise RuntimeError(f"run {run_id}: no Ack for start ({await call.code()}: {await call.details()})")
    return call


async def _end_run(call: Any, run_id: str, stats: RealStats) -> None:
    await call.write(END_REQUEST)
    await call.done_writing()
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.WhichOneof("msg") == "event":
            stats.events += 1
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise RuntimeError(f"run {run_id} ended with {code}: {await call.details()}")
    stats.runs_ended += 1


async def _real_run(channel: grpc.aio.Channel, run_id: str, payloads: list[tuple[bytes, int]],
                    window: int, deadline: float, stats: RealStats,
                    schedule: list[float] | None, interval: float) -> Any:
    """Streams one run's batches in order and returns the call (still open, for
    :func:`_end_run`). Closed loop (``schedule`` None): ``window`` batches in
    flight, the next sent on each Ack, none after ``deadline``. Open loop: one
    batch every ``interval`` s from ``schedule[0]`` (the stream slot's clock, which
    carries over to its next run), whatever is in flight; latencies count from
    the scheduled time, so a server that falls behind is not hidden by a client
    that waits for it (coordinated omission)."""
    call = await _open_run(channel, run_id)
    stats.runs_started += 1
    sent: deque[list[Any]] = deque()  # [batch's time 0, event seen] in flight, oldest first

    async def read_one() -> None:
        response = await call.read()
        now = time.perf_counter()
        if response is grpc.aio.EOF:
            raise RuntimeError(f"run {run_id}: stream ended early "
                               f"({await call.code()}: {await call.details()})")
        if response.WhichOneof("msg") == "event":
            # The server handles a stream's batches in order and sends a batch's
            # events before its Ack: an event belongs to the oldest batch in flight.
            stats.events += 1
            if not sent[0][1]:
                stats.event_latency.append(now - sent[0][0])
                sent[0][1] = True
            return
        t0, _ = sent.popleft()
        stats.ack_latency.append(now - t0)
        stats.points += response.ack.accepted
        stats.rejected += response.ack.rejected
        stats.batches += 1

    if schedule is None:
        i = 0
        while True:
            while len(sent) < window and i < len(payloads) and time.perf_counter() < deadline:
                sent.append([time.perf_counter(), False])
                await call.write(payloads[i][0])
                i += 1
            if not sent:
                break
            await read_one()
        return call

    more = asyncio.Event()
    writing = True

    async def reader() -> None:
        while sent or writing:
            if not sent:
                more.clear()
                await more.wait()
                continue
            await read_one()

    task = asyncio.ensure_future(reader())
    try:
        for payload, _ in payloads:
            due = schedule[0]
            if due >= deadline:
                break
            schedule[0] += interval
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent.append([due, False])
            stats.lateness.append(time.perf_counter() - due)
            more.set()
            await call.write(payload)
    finally:
        writing = False
        more.set()
    await task
    return call


async def _real_slot(channel: grpc.aio.Channel, slot: int, streams: int, plan: Plan, tag: str,
                     window: int, started: float, deadline: float, stats: RealStats,
                     interval: float | None, ending: list[asyncio.Future[None]]) -> None:
    """Stream slot ``slot``: one run after another until ``deadline`` (its j-th run
    is plan entry ``slot + j × streams``, cycled), each with its own run id. A
    run's end (and the server's end-of-run work) goes on in the background
    while the slot starts its next run, as separate jobs would."""
    schedule = None if interval is None else [started + interval * slot / streams]
    j = 0
    while time.perf_counter() < deadline and (schedule is None or schedule[0] < deadline):
        name, payloads = plan[(slot + j * streams) % len(plan)]
        run_id = f"{name}-{slot}.{j}-{tag}"
        call = await _real_run(channel, run_id, payloads, window, deadline, stats, schedule,
                               interval or 0.0)
        ending.append(asyncio.ensure_future(_end_run(call, run_id, stats)))
        j += 1


async def _run_real_cell(target: str, plan: Plan, streams: int, seconds: float, window: int,
                         interval: float | None, tag: str) -> tuple[RealStats, float]:
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(streams, 4))]
    for channel in channels:
        await channel.channel_ready()
    stats = RealStats()
    ending: list[asyncio.Future[None]] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(
        _real_slot(channels[i % len(channels)], i, streams, plan, tag, window, started, deadline,
                   stats, interval, ending)
        for i in range(streams)
    ))
    await asyncio.gather(*ending)
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return stats, elapsed


def run_real_cell(server: ServerProcess, plan: Plan, lines: int, streams: int, seconds: float,
                  window: int, rate: float | None = None) -> dict[str, Any]:
    """One cell of the real-run workload: closed loop, or open loop at ``rate``
    batches a second over all streams."""
    mode = "closed" if rate is None else "open"
    tag = f"{server.kind}-{mode}-{lines}-{streams}-{time.time_ns()}"
    load_start = _load()
    reset = server.reset_peak_rss()
    cpu0 = server.cpu_seconds()
    interval = None if rate is None else streams / rate
    stats, elapsed = asyncio.run(_run_real_cell(server.target, plan, streams, seconds, window,
                                                interval, tag))
    cpu = server.cpu_seconds() - cpu0
    points = stats.points
    return {
        "workload": "real",
        "server": server.kind,
        "mode": mode,
        "lines": lines,
        "streams": streams,
        "rate_batches_per_second": rate,
        "seconds": round(elapsed, 3),
        "points": points,
        "batches": stats.batches,
        "batches_per_second": stats.batches / elapsed,
        "runs_started": stats.runs_started,
        "runs_ended": stats.runs_ended,
        "rejected": stats.rejected,
        "events": stats.events,
        **_measured(server, stats, elapsed, cpu, reset, load_start),
        "send_lateness_p99_ms": _ms(percentile(stats.lateness, 99)),
    }


def _matched_bare_cells(cells: list[dict[str, Any]], plans: dict[int, Plan], streams: int, seconds: float,
                        window: int) -> list[dict[str, Any]]:
    """``--matched-bare``: per batch size, the bare server answering each batch with as
    many event messages as the full server sent a batch on average in its closed-loop
    cell (rounded), then its ack: the transport's ceiling for the full server's
    response traffic, since the API sends one message per event."""
    out = []
    for full in [c for c in cells if c["server"] == "full" and c["mode"] == "closed"]:
        events = round(full["events"] / full["batches"]) if full["batches"] else 0
        with ServerProcess("bare", bare_events=events) as server:
            run_real_cell(server, plans[full["lines"]], full["lines"], 2, 1.0, window)
            cell = run_real_cell(server, plans[full["lines"]], full["lines"], streams, seconds, window)
        cell["server"], cell["bare_events"] = "bare-matched", events
        print(f"  bare-matched closed lines={full['lines']} runs={streams} ({events} events a batch): "
              f"{cell['points_per_second']:,.0f} points/s", file=sys.stderr, flush=True)
        out.append(cell)
    return out


def real_table(cells: list[dict[str, Any]]) -> str:
    head = (f"{'server':12} {'mode':6} {'lines':>5} {'runs':>4} {'points/s':>10} {'ratio':>6} "
            f"{'pts/cpu-s':>10} {'cpu ratio':>9} {'cpu-s/Mpt':>9} {'event p50':>9} {'p99 ms':>8} "
            f"{'ack p50':>8} {'p99 ms':>8} {'events':>6} {'peak MiB':>8}  load 1-min start->end")
    out = [head, "-" * len(head)]
    for c in cells:
        load = (f"{c['load_start'][0]:.2f} -> {c['load_end'][0]:.2f}"
                if c["load_start"] and c["load_end"] else "-")
        out.append(
            f"{c['server']:12} {c['mode']:6} {c['lines']:>5} {c['streams']:>4} "
            f"{c['points_per_second']:>10,.0f} {_fmt(c.get('ratio_wall'), '>6.3f')} "
            f"{_fmt(c['points_per_cpu_second'], '>10,.0f')} {_fmt(c.get('ratio_cpu'), '>9.3f')} "
            f"{_fmt(c['cpu_seconds_per_million_points'], '>9.2f')} "
            f"{_fmt(c['event_latency_p50_ms'], '>9.1f')} {_fmt(c['event_latency_p99_ms'], '>8.1f')} "
            f"{_fmt(c['ack_latency_p50_ms'], '>8.1f')} {_fmt(c['ack_latency_p99_ms'], '>8.1f')} "
            f"{c['events']:>6} {_fmt(c['peak_rss_mib'], '>8.1f')}  {load}"
        )
    return "\n".join(out)


def main_real(args: argparse.Namespace) -> int:
    """The real-run workload: closed-loop cells on both servers, then open-loop
    cells on the full one."""
    from benchmarks import real_workload

    repo = Path(__file__).resolve().parents[1]
    runs, notes = real_workload.load_repo(repo)
    if not runs:
        print(f"error: no real runs to stream (looked in {repo.parent / 'shared'}/{{"
              f"{','.join(real_workload.SHARED_SUBDIRS)}}} and benchmarks/generated)", file=sys.stderr)
        return 2
    seconds = args.seconds if args.seconds is not None else (4.0 if args.quick else 10.0)
    # Open-loop cells carry fewer batches a second than closed-loop ones (half the
    # rate): --quick keeps them longer than its closed-loop cells so p99 has samples.
    open_seconds = (args.open_seconds if args.open_seconds is not None
                    else 8.0 if args.quick and args.seconds is None else seconds)
    line_sizes = [int(x) for x in args.lines.split(",")]
    plans = {lines: [(r.name, real_workload.batches(r, lines)) for r in runs] for lines in line_sizes}
    print(f"real-run workload: {real_workload.describe(runs)}", file=sys.stderr, flush=True)
    cells: list[dict[str, Any]] = []
    kinds = args.servers.split(",")
    for kind in kinds:
        profile = args.profile_server if kind == "full" else None
        with ServerProcess(kind, args.store, profile=profile, bare_events=args.bare_events) as server:
            # Warm-up: imports, first allocations, the store's first writes.
            run_real_cell(server, plans[line_sizes[0]], line_sizes[0], 2, 1.0, args.window)
            for lines in line_sizes:
                cell = run_real_cell(server, plans[lines], lines, args.streams, seconds, args.window)
                cells.append(cell)
                print(f"  {kind} closed lines={lines} runs={args.streams}: "
                      f"{cell['points_per_second']:,.0f} points/s", file=sys.stderr, flush=True)
            if kind.startswith("bare") or kind == "full-nodetect" or args.no_open_loop:
                continue  # no events to time (full-nodetect sends none)
            for lines in line_sizes:
                closed = next(c for c in cells if c["server"] == kind and c["lines"] == lines)
                rate = args.rate if args.rate else 0.5 * closed["batches_per_second"]
                if rate <= 0:
                    continue
                cell = run_real_cell(server, plans[lines], lines, args.streams, open_seconds,
                                     args.window, rate=rate)
                cells.append(cell)
                print(f"  {kind} open lines={lines} runs={args.streams} at {rate:.1f} batches/s: "
                      f"event p99 {cell['event_latency_p99_ms']} ms, ack p99 {cell['ack_latency_p99_ms']} ms",
                      file=sys.stderr, flush=True)
    if args.matched_bare:
        cells += _matched_bare_cells(cells, plans, args.streams, seconds, args.window)
    bare = {c["lines"]: c for c in cells if c["server"] == "bare"}
    matched = {c["lines"]: c for c in cells if c["server"] == "bare-matched"}
    for c in cells:
        ceiling = bare.get(c["lines"])
        if not c["server"].startswith("bare") and c["mode"] == "closed" and ceiling:
            c["ratio_wall"] = c["points_per_second"] / ceiling["points_per_second"]
            if c["points_per_cpu_second"] and ceiling["points_per_cpu_second"]:
                c["ratio_cpu"] = c["points_per_cpu_second"] / ceiling["points_per_cpu_second"]
        same = matched.get(c["lines"])
        if c["server"] == "full" and c["mode"] == "closed" and same:
            c["ratio_wall_matched"] = c["points_per_second"] / same["points_per_second"]
    print(f"phasewatch ingest benchmark, real runs: {real_workload.describe(runs)}; "
          f"{seconds:g} s a closed-loop cell, {open_seconds:g} s an open-loop one, window {args.window}, "
          f"{os.cpu_count()} CPUs")
    print(real_table(cells))
    print("ratio: full / bare points per second (wall clock); cpu ratio: full / bare points per server "
          "CPU-second; open: batches sent on a fixed schedule (rate in the JSON), latencies from the "
          "scheduled time; latencies in ms (event: batch -> first event it caused; ack: batch -> its Ack)")
    for c in cells:
        if "ratio_wall_matched" in c:
            same = matched[c["lines"]]
            print(f"full / bare-matched at {c['lines']} lines (the bare server sending "
                  f"{same['bare_events']} event messages a batch, the full one's mean): "
                  f"{c['ratio_wall_matched']:.3f} of its points per second")
    if args.json:
        document = {
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count()},
            "settings": {"workload": "real", "seconds": seconds, "open_seconds": open_seconds,
                         "window": args.window, "streams": args.streams, "lines": line_sizes,
                         "runs": [str(r.path) for r in runs], "notes": notes},
            "cells": cells,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


# --- report ----------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec`` (">9.1f"), or a dash in the same width."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0].split(",")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, spec)


def table(cells: list[dict[str, Any]]) -> str:
    head = (f"{'server':8} {'batch':>5} {'runs':>4} {'points/s':>11} {'pts/cpu-s':>11} {'ratio':>6} "
            f"{'cpu-s/Mpt':>9} {'event p50':>9} {'p99 ms':>8} {'ack p50':>8} {'p99 ms':>8} "
            f"{'events':>6} {'peak MiB':>8}  load 1-min start->end")
    out = [head, "-" * len(head)]
    for c in cells:
        load = (f"{c['load_start'][0]:.2f} -> {c['load_end'][0]:.2f}"
                if c.get("load_start") and c.get("load_end") else "-")
        out.append(
            f"{c['server']:8} {c['batch_points']:>5} {c['runs']:>4} {c['points_per_second']:>11,.0f} "
            f"{_fmt(c['points_per_cpu_second'], '>11,.0f')} {_fmt(c.get('ratio'), '>6.3f')} "
            f"{_fmt(c['cpu_seconds_per_million_points'], '>9.3f')} "
            f"{_fmt(c['event_latency_p50_ms'], '>9.1f')} {_fmt(c['event_latency_p99_ms'], '>8.1f')} "
            f"{_fmt(c['ack_latency_p50_ms'], '>8.1f')} {_fmt(c['ack_latency_p99_ms'], '>8.1f')} "
            f"{c['events']:>6} {_fmt(c['peak_rss_mib'], '>8.1f')}  {load}"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="512,4096", help="points per batch, comma-separated")
    parser.add_argument("--runs", default="1,8,64", help="concurrent runs, comma-separated")
    parser.add_argument("--workload", choices=("synthetic", "real"), default="synthetic",
                        help="synthetic runs (benchmarks.workload) or the real runs in ../shared")
    parser.add_argument("--seconds", type=float,
                        help="streaming time per cell (default 8 synthetic, 10 real; --quick: 2, 4)")
    parser.add_argument("--lines", default="32,256", help="real: logged lines per batch, comma-separated")
    parser.add_argument("--streams", type=int, default=32, help="real: concurrent runs (stream slots)")
    parser.add_argument("--rate", type=float,
                        help="real, open loop: batches a second over all streams "
                             "(default: half the full server's closed-loop rate at that batch size)")
    parser.add_argument("--open-seconds", type=float,
                        help="real: open-loop cell length (default --seconds; --quick: 8)")
    parser.add_argument("--no-open-loop", action="store_true", help="real: closed-loop cells only")
    parser.add_argument("--profile-server", metavar="PATH",
                        help="run the full server under cProfile (all threads; both workloads), stats "
                             "to PATH and PATH.txt; PHASEWATCH_PROFILE_CLOCK=cpu times each thread's "
                             "CPU; the profiler slows it, so its numbers are not throughput")
    parser.add_argument("--window", type=int, default=2, help="batches in flight per stream")
    parser.add_argument("--servers", default="bare,full",
                        help="which servers: bare, full, bare-aio (the bare servicer on grpc.aio), "
                             "full-nodetect (phasewatch serve detecting nothing: the service around "
                             "detection) and, with --workload real, engine-aio and engine-aio-worker "
                             "(the engine behind grpc.aio, detecting on the loop or on one worker thread)")
    parser.add_argument("--bare-events", type=int, default=0,
                        help="event messages the bare servers send per batch before its ack "
                             "(the full server sends one per event)")
    parser.add_argument("--matched-bare", action="store_true",
                        help="real: also the bare server sending, per batch, the full server's mean "
                             "number of event messages (its ceiling for the same response traffic)")
    parser.add_argument("--store", help="store URL for the full server (default: a fresh SQLite file)")
    parser.add_argument("--quick", action="store_true", help="shorter cells (2 s synthetic, 4 s real)")
    parser.add_argument("--json", metavar="PATH", help="write the numbers here")
    parser.add_argument("--serve-bare", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare-aio", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-engine-aio", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-engine-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_engine_aio:
        serve_engine_aio(args.serve_engine_aio, args.store or "sqlite://:memory:", args.serve_engine_worker)
        return 0
    if args.serve_bare:
        serve_bare(args.serve_bare, args.bare_events, args.serve_bare_aio)
        return 0
    if args.streams < 1 or (args.rate is not None and args.rate <= 0):
        parser.error("--streams and --rate must be positive")
    if args.workload == "real":
        return main_real(args)
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 8.0)
    batches = [int(x) for x in args.batches.split(",")]
    runs = [int(x) for x in args.runs.split(",")]
    cells: list[dict[str, Any]] = []
    for kind in args.servers.split(","):
        profile = args.profile_server if kind == "full" else None
        with ServerProcess(kind, args.store, profile=profile, bare_events=args.bare_events) as server:
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
        if (c["server"].startswith("full") and ceiling and ceiling["points_per_cpu_second"]
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

