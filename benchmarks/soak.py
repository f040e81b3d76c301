"""Soak test: many concurrent runs for a long time against ``phasewatch serve``.

Three phases against one ``phasewatch serve`` process (``OPENBLAS_NUM_THREADS=1``,
a fresh SQLite store, Prometheus ``/metrics`` on):

1. warm-up: each of ``--runs`` runs (1 000) sends ``--warmup-lines`` lines
   (4 200: past the detectors' 1 024-point windows and the engine's
   4 096-step released-steps memory, whose pages are only touched as they
   fill) in 4 096-point batches, so that steady state starts with every run's
   bounded state at full size (the multi-resolution summaries' higher levels
   still fill slowly: zeroed pages are touched as long horizons accumulate);
2. soak, ``--minutes`` (10): every run logs a ``--batch-points`` batch
   (512 points: 64 lines of :mod:`benchmarks.workload`'s 8 series) every
   ``--interval`` seconds (20, start times spread over the interval), through
   the unary ``Log`` RPC (a ``Stream`` holds a server worker thread for its
   life, and ``phasewatch serve`` has 256: the 1 000 runs' batches are
   interleaved on Log instead); the server's RSS is sampled every
   ``--sample`` seconds. Reported: RPC errors and rejected points (both must
   be 0), Log latency p50/p99/max, points per second, and RSS: at the end of
   warm-up, at the end, the most, and the least-squares slope over the soak
   (MiB per minute). "Flat" means the RSS at the end is within
   ``--rss-tolerance`` (5 %) of the RSS after warm-up;
3. ``/metrics`` with ``--metrics-runs`` (10 000) runs: the missing runs are
   declared with one small batch each (4 headline series, so the per-series
   gauges are exercised too), then ``/metrics`` is scraped ``--scrapes`` times;
   reported: scrape time p50 and max (target ≤ 100 ms), size and samples.

Usage (from the repository root; Linux, for /proc)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.soak [--minutes 10] [--runs 1000] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.ingest import ServerProcess, percentile  # noqa: E402
from benchmarks.workload import SERIES, block  # noqa: E402
from detector._proto.phasewatch.v1 import detector_pb2 as pb  # noqa: E402

LOG_METHOD = "/phasewatch.v1.PhaseDetector/Log"
STREAM_METHOD = "/phasewatch.v1.PhaseDetector/Stream"
HEADLINE = ("train_loss", "val_loss", "train_acc", "val_acc")


def log_request(run_id: str, seed: int, first_line: int, lines: int, series: Sequence[str] = SERIES,
                start: bool = False) -> bytes:
    cols = block(seed, first_line, lines)
    request = pb.LogRequest(run_id=run_id, batch=pb.MetricBatch(series=[
        pb.Series(name=name, steps=cols[name][0], values=cols[name][1]) for name in series
    ]))
    if start:
        request.start.run_id = run_id
        request.start.labels["bench"] = "soak"
    return request.SerializeToString()


class Counters:
    def __init__(self) -> None:
        self.points = 0
        self.rejected = 0
        self.errors: dict[str, int] = {}
        self.latency: list[float] = []

    def error(self, error: Exception) -> None:
        key = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
        self.errors[key] = self.errors.get(key, 0) + 1


async def _log(call: Any, payload: bytes, counters: Counters, timeout: float) -> None:
    started = time.perf_counter()
    try:
        response = await call(payload, timeout=timeout)
    except Exception as error:  # counted: the soak's verdict
        counters.error(error)
        return
    counters.latency.append(time.perf_counter() - started)
    counters.points += response.ack.accepted
    counters.rejected += response.ack.rejected


def _channels(target: str, count: int) -> list[grpc.aio.Channel]:
    return [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)]


def _method(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(LOG_METHOD, request_serializer=None,
                               response_deserializer=pb.LogResponse.FromString)


def stream_request(seed: int, first_line: int, lines: int) -> bytes:
    cols = block(seed, first_line, lines)
    return pb.StreamRequest(batch=pb.MetricBatch(series=[
        pb.Series(name=name, steps=cols[name][0], values=cols[name][1]) for name in SERIES
    ])).SerializeToString()


async def _next_ack(call: Any) -> pb.Ack:
    """Read a Stream's answers up to the next Ack (events come before it)."""
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            raise RuntimeError("the stream ended before its ack")
        if response.HasField("ack"):
            return response.ack


@dataclass
class SoakResult:
    warm: Counters
    warm_seconds: float
    rss_warm: float
    counters: Counters
    rss: list[tuple[float, float]]  # (seconds into the soak, MiB)
    scrapes_ms: list[float]
    cpu_seconds: float


async def soak(server: ServerProcess, runs: int, warmup_lines: int, batch_lines: int, interval: float,
               seconds: float, sample: float, scrape_every: float, warm_concurrency: int = 8,
               ) -> SoakResult:
    """Every run on its own bidi Stream, open from the warm-up to the end.

    Warm-up: each stream sends start, then its ``warmup_lines`` in 512-line
    (4 096-point) batches, ``warm_concurrency`` streams at a time (all are open).
    Soak: a ``batch_lines`` batch per stream every ``interval`` seconds (each
    answered by its events and one Ack), starts spread over the interval; at the
    end a half-close (held points flushed, the run left open). ``/metrics`` is
    scraped every ``scrape_every`` seconds, as Prometheus would.
    """
    channels = _channels(server.target, 16)
    warm, counters = Counters(), Counters()
    rss: list[tuple[float, float]] = []
    scrapes: list[float] = []
    gate = asyncio.Semaphore(warm_concurrency)
    warmed = 0
    all_warm = asyncio.Event()
    t0 = time.perf_counter()
    started = deadline = 0.0  # set when the warm-up is over

    def one_warmed() -> None:
        nonlocal warmed, started, deadline
        warmed += 1
        if warmed == runs:
            started = time.perf_counter()
            deadline = started + seconds
            all_warm.set()

    async def send(call: Any, payload: bytes, into: Counters) -> None:
        sent = time.perf_counter()
        await call.write(payload)
        ack = await _next_ack(call)
        into.latency.append(time.perf_counter() - sent)
        into.points += ack.accepted
        into.rejected += ack.rejected

    async def run(i: int) -> None:
        method = channels[i % len(channels)].stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=pb.StreamResponse.FromString)
        call = method()
        run_id, phase = f"soak-{i}", warm
        try:
            try:
                start = pb.StreamRequest(start=pb.RunStart(run_id=run_id, labels={"bench": "soak"}))
                await call.write(start.SerializeToString())
                await _next_ack(call)
                async with gate:
                    for first in range(0, warmup_lines, 512):
                        await send(call, stream_request(i, first, min(512, warmup_lines - first)), warm)
            finally:
                one_warmed()
            await all_warm.wait()
            phase = counters
            line = warmup_lines
            due = started + interval * i / runs  # spread over the interval
            while True:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if time.perf_counter() >= deadline:
                    break
                await send(call, stream_request(i, line, batch_lines), counters)
                line += batch_lines
                due += interval
            await call.done_writing()
            await _next_ack(call)  # the half-close's flush
            code = await call.code()  # and the status: OK
            if code != grpc.StatusCode.OK:
                counters.errors[code.name] = counters.errors.get(code.name, 0) + 1
        except Exception as error:  # counted: the soak's verdict
            phase.error(error)
            call.cancel()

    async def sampler() -> None:
        await all_warm.wait()
        while time.perf_counter() < deadline:
            rss.append((time.perf_counter() - started, server.rss_mib()))
            await asyncio.sleep(sample)
        rss.append((time.perf_counter() - started, server.rss_mib()))

    async def scraper() -> None:
        assert server.metrics_port is not None
        await all_warm.wait()
        while time.perf_counter() + scrape_every < deadline:
            await asyncio.sleep(scrape_every)
            try:
                result = await asyncio.to_thread(scrape, server.metrics_port, 1)
                scrapes.append(result["max_ms"])
            except Exception as error:  # counted: the soak's verdict
                counters.error(error)

    async def coordinator() -> tuple[float, float, float]:
        await all_warm.wait()
        warm_seconds, rss_warm, cpu0 = started - t0, server.rss_mib(), server.cpu_seconds()
        print(f"warm-up: {runs} streams x {warmup_lines} lines in {warm_seconds:.0f} s, errors "
              f"{warm.errors or 0}, RSS {rss_warm:.0f} MiB; soaking {seconds:.0f} s",
              file=sys.stderr, flush=True)
        return warm_seconds, rss_warm, cpu0

    task = asyncio.ensure_future(coordinator())
    await asyncio.gather(sampler(), scraper(), task, *(run(i) for i in range(runs)))
    warm_seconds, rss_warm, cpu0 = task.result()
    cpu = server.cpu_seconds() - cpu0
    for c in channels:
        await c.close()
    return SoakResult(warm, warm_seconds, rss_warm, counters, rss, scrapes, cpu)


async def declare(target: str, first: int, last: int, concurrency: int = 64) -> Counters:
    """Runs ``soak-{first}`` .. ``soak-{last - 1}``: 8 lines of the 4 headline series each."""
    channels = _channels(target, 4)
    calls = [_method(c) for c in channels]
    counters = Counters()
    todo = iter(range(first, last))

    async def worker(k: int) -> None:
        for i in todo:
            await _log(calls[k % len(calls)], log_request(f"soak-{i}", i, 0, 8, HEADLINE, start=True),
                       counters, timeout=60)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    for c in channels:
        await c.close()
    return counters


def scrape(port: int, times: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/metrics"
    durations, size, samples = [], 0, 0
    for _ in range(times):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
        durations.append(time.perf_counter() - started)
        size = len(body)
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {
        "scrapes": times,
        "p50_ms": round(1e3 * float(np.median(durations)), 1),
        "max_ms": round(1e3 * max(durations), 1),
        "min_ms": round(1e3 * min(durations), 1),
        "bytes": size,
        "samples": samples,
    }


def rss_verdict(rss: list[tuple[float, float]], settle: float, tolerance: float) -> dict[str, Any]:
    """Flatness of the soak's RSS samples (seconds into the soak, MiB).

    The first ``settle`` seconds are the allocator's and the per-stream state's
    own warm-up (one worker thread per stream, its malloc arena and caches,
    gRPC's buffers); the reference is the RSS then. Flat: the RSS at the end is
    within ``tolerance`` of it, and the least-squares slope after it would not
    take the RSS past ``tolerance`` in an hour.
    """
    times = np.array([t for t, _ in rss])
    mib = np.array([m for _, m in rss])
    after = times >= settle
    if after.sum() < 3:
        after = times >= 0
    settled = float(mib[after][0])
    slope = float(np.polyfit(times[after] / 60.0, mib[after], 1)[0])
    whole = float(np.polyfit(times / 60.0, mib, 1)[0]) if len(rss) > 2 else float("nan")
    flat = abs(mib[-1] - settled) <= tolerance * settled and slope * 60 <= tolerance * settled
    return {"rss_settled_mib": round(settled, 1), "rss_end_mib": round(float(mib[-1]), 1),
            "rss_max_mib": round(float(mib.max()), 1), "rss_slope_mib_per_minute": round(slope, 2),
            "rss_slope_whole_soak_mib_per_minute": round(whole, 2), "rss_flat": bool(flat)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="concurrent runs, one Stream each")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch-points", type=int, default=512)
    parser.add_argument("--interval", type=float, default=20.0, help="seconds between a run's batches")
    parser.add_argument("--warmup-lines", type=int, default=4200)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="seconds of the soak before the RSS reference sample")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--scrape-every", type=float, default=15.0,
                        help="seconds between /metrics scrapes during the soak")
    parser.add_argument("--max-concurrent-rpcs", type=int,
                        help="the server's --max-concurrent-rpcs (default: runs + 64)")
    parser.add_argument("--malloc-arena-max", default="",
                        help="MALLOC_ARENA_MAX for the server (default: unset, glibc's 8 arenas "
                        "per core; it made no difference here: see the README)")
    parser.add_argument("--metrics-runs", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    parser.add_argument("--json", metavar="PATH", help="write the numbers here")
    args = parser.parse_args(argv)
    batch_lines = max(1, args.batch_points // len(SERIES))
    report: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }
    env = {"MALLOC_ARENA_MAX": args.malloc_arena_max} if args.malloc_arena_max else {}
    if not args.malloc_arena_max:
        os.environ.pop("MALLOC_ARENA_MAX", None)
    rpcs = args.max_concurrent_rpcs or args.runs + 64
    loads: list[tuple[float, float, float]] = []
    # Every stream comes from this one host: the per-peer stream cap (64 by default,
    # issue 18) would refuse most of them, as it would a proxy's.
    server_args = ["--max-concurrent-rpcs", str(rpcs), "--max-streams-per-peer", str(rpcs)]
    with ServerProcess("full", args.store, metrics=True, args=server_args, env=env) as server:
        seconds = 60.0 * args.minutes
        result = asyncio.run(soak(server, args.runs, args.warmup_lines, batch_lines, args.interval,
                                  seconds, args.sample, args.scrape_every))
        loads.append(os.getloadavg())
        warm, counters = result.warm, result.counters
        errors_in_log = [line for line in server.log if "ERROR" in line or "Traceback" in line]
        report["warmup"] = {"seconds": round(result.warm_seconds, 1), "points": warm.points,
                            "errors": warm.errors, "rejected": warm.rejected,
                            "rss_mib": round(result.rss_warm, 1)}
        report["soak"] = {
            "seconds": seconds,
            "runs": args.runs,
            "streams": args.runs,
            "batches": len(counters.latency),
            "errors": counters.errors,
            "rejected": counters.rejected,
            "server_log_errors": len(errors_in_log),
            "points": counters.points,
            "points_per_second": counters.points / seconds,
            "server_cpu_seconds": round(result.cpu_seconds, 1),
            "server_cpu_fraction": round(result.cpu_seconds / seconds, 3),
            "batch_latency_p50_ms": round(1e3 * (percentile(counters.latency, 50) or 0), 1),
            "batch_latency_p99_ms": round(1e3 * (percentile(counters.latency, 99) or 0), 1),
            "batch_latency_max_ms": round(1e3 * max(counters.latency, default=0), 1),
            "scrapes": len(result.scrapes_ms),
            "scrape_p50_ms": round(float(np.median(result.scrapes_ms)), 1) if result.scrapes_ms else None,
            "scrape_max_ms": round(max(result.scrapes_ms), 1) if result.scrapes_ms else None,
            "rss_after_warmup_mib": round(result.rss_warm, 1),
            **rss_verdict(result.rss, args.settle, args.rss_tolerance),
            "rss_samples": [(round(t, 1), round(m, 1)) for t, m in result.rss],
        }
        print(f"soak done: {len(counters.latency)} batches", file=sys.stderr, flush=True)
        declared = asyncio.run(declare(server.target, args.runs, max(args.runs, args.metrics_runs)))
        assert server.metrics_port is not None
        report["metrics"] = {"runs": max(args.runs, args.metrics_runs),
                             "declare_errors": declared.errors, "rss_mib": round(server.rss_mib(), 1),
                             **scrape(server.metrics_port, args.scrapes)}
        loads.append(os.getloadavg())
    s, m = report["soak"], report["metrics"]
    report["machine"]["load_average_after_soak"], report["machine"]["load_average_at_end"] = loads
    ok = not s["errors"] and not s["rejected"] and not s["server_log_errors"] and not warm.errors
    print(f"phasewatch soak: {args.runs} runs on {args.runs} concurrent Streams, {args.minutes:g} min, "
          f"a {args.batch_points}-point batch per run every {args.interval:g} s; server "
          f"--max-concurrent-rpcs {rpcs}, MALLOC_ARENA_MAX={args.malloc_arena_max or 'unset'}; "
          f"{os.cpu_count()} CPUs, load average {tuple(round(x, 1) for x in loads[0])} after the soak")
    print(f"  warm-up          {args.warmup_lines} lines a run in {result.warm_seconds:.0f} s "
          f"({warm.points / max(result.warm_seconds, 1e-9):,.0f} points/s), errors {warm.errors or 0}")
    print(f"  batches          {s['batches']:,}   errors {s['errors'] or 0}   rejected points "
          f"{s['rejected']}   server log errors {s['server_log_errors']}   -> {'OK' if ok else 'FAILED'}")
    print(f"  points           {s['points']:,} ({s['points_per_second']:,.0f}/s), server CPU "
          f"{s['server_cpu_fraction']:.0%} of a core")
    print(f"  batch -> ack     p50 {s['batch_latency_p50_ms']} ms   p99 {s['batch_latency_p99_ms']} ms   "
          f"max {s['batch_latency_max_ms']} ms")
    print(f"  /metrics (soak)  {s['scrapes']} scrapes of {args.runs} runs: p50 {s['scrape_p50_ms']} ms, "
          f"max {s['scrape_max_ms']} ms")
    print(f"  RSS (MiB)        after warm-up {s['rss_after_warmup_mib']}   at {args.settle:g} s "
          f"{s['rss_settled_mib']}   end {s['rss_end_mib']}   max {s['rss_max_mib']}   slope after "
          f"{args.settle:g} s {s['rss_slope_mib_per_minute']} MiB/min (whole soak "
          f"{s['rss_slope_whole_soak_mib_per_minute']})   -> {'flat' if s['rss_flat'] else 'NOT flat'} "
          f"(±{args.rss_tolerance:.0%}, and < {args.rss_tolerance:.0%} an hour at that slope)")
    print(f"  /metrics         {m['runs']:,} runs: scrape p50 {m['p50_ms']} ms, max {m['max_ms']} ms "
          f"({m['bytes']:,} bytes, {m['samples']:,} samples; target <= 100 ms: "
          f"{'OK' if m['max_ms'] <= 100 else 'MISSED'}); server RSS {m['rss_mib']} MiB; load average "
          f"{tuple(round(x, 1) for x in loads[1])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
