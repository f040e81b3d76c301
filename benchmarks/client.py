"""Benchmark the client SDK: cost of ``log()`` on the training thread, and throughput.

What it measures, with ``--metrics`` metrics a call (10 by default):

- ``log()`` time per call (median, p99, mean, in µs), timed one call at a time
  with ``perf_counter_ns`` (the timer's own cost is reported and not
  subtracted), in four settings: no detector listening (the buffer holds
  every point, so this is the append path), no detector with the buffer full
  (the drop path), and a detector in this process, whose gRPC threads, the
  client's sender and the engine compete with the training thread for the
  GIL: once with an engine that only counts points (it keeps up with a tight
  loop, ``--calls``), once with the real engine (which detects at a few
  thousand points a second, so fewer calls, ``--e2e-calls``);
- end-to-end points per second from the first ``log()`` until ``close()``
  returns with every point acknowledged, to a real detector in this process
  and to one in a separate process (``--no-subprocess`` skips it);
- the engine alone ingesting the same points in columnar batches, the
  ceiling that the end-to-end numbers approach;
- end to end to a detector whose engine only counts points (no detection):
  the ceiling of the client, gRPC and the servicer themselves.

Usage::

    OPENBLAS_NUM_THREADS=1 python benchmarks/client.py [--calls 200000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.client import ClientConfig, connect  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric_rows(calls: int, metrics: int) -> list[dict[str, float]]:
    """Distinct rows, made before timing; names look like a training job's."""
    names = ["train_loss", "val_loss", "val_acc", "lr", "grad_norm", "rankme"]
    names += [f"probe_{i}" for i in range(max(0, metrics - len(names)))]
    names = names[:metrics]
    return [
        {name: 1.0 / (1 + step) + 0.001 * j for j, name in enumerate(names)}
        for step in range(calls)
    ]


def time_calls(run: Any, rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-call ``log(step, **row)`` times in µs: median, p99, mean, max."""
    clock = time.perf_counter_ns
    times = [0] * len(rows)
    log = run.log
    for step, row in enumerate(rows):
        started = clock()
        log(step, **row)
        times[step] = clock() - started
    times.sort()
    n = len(times)
    return {
        "median_us": times[n // 2] / 1000,
        "p99_us": times[min(n - 1, int(n * 0.99))] / 1000,
        "mean_us": statistics.fmean(times) / 1000,
        "max_us": times[-1] / 1000,
        "calls": n,
    }


def timer_overhead_us(calls: int = 100_000) -> float:
    clock = time.perf_counter_ns
    times = []
    for _ in range(calls):
        started = clock()
        times.append(clock() - started)
    times.sort()
    return times[len(times) // 2] / 1000


def bench_no_server(rows: list[dict[str, float]], metrics: int, full: bool) -> dict[str, Any]:
    capacity = 1000 if full else len(rows) * metrics + 1
    config = ClientConfig(max_buffered_points=capacity)
    run = connect(f"127.0.0.1:{free_port()}", "bench-offline", config=config)
    try:
        result = time_calls(run, rows)
        stats = run.stats
        result.update(logged_points=stats.logged, dropped_points=stats.dropped)
        return result
    finally:
        run.close(timeout=0)


def null_engine() -> Any:
    """An engine that accepts points without detecting anything."""
    from dataclasses import replace

    from detector.engine import Engine, IngestResult

    class NullEngine(Engine):
        def __init__(self) -> None:
            super().__init__()
            self.last: dict[str, int] = {}

        def ingest(self, run_id: str, columns: Any) -> IngestResult:
            points = 0
            last = self.last.get(run_id, -1)
            for steps, _ in columns.values():
                points += len(steps)
                if len(steps):
                    last = max(last, int(max(steps)))
            self.last[run_id] = last
            return IngestResult(accepted=points, rejected=0, through_step=last, events=())

        def status(self, run_id: str) -> Any:
            return replace(super().status(run_id), last_step=self.last.get(run_id, -1))

    return NullEngine()


def start_in_process_server(null: bool = False) -> tuple[Any, int, Any]:
    from detector.engine import Engine
    from detector.server import create_server

    engine = null_engine() if null else Engine()
    server, port = create_server(engine, "127.0.0.1:0")
    return server, port, engine


def bench_in_process(rows: list[dict[str, float]], null: bool) -> dict[str, Any]:
    server, port, engine = start_in_process_server(null)
    try:
        capacity = len(rows) * len(rows[0]) + 1  # time the append path, never the drop path
        run = connect(
            f"127.0.0.1:{port}", "bench-timed", config=ClientConfig(max_buffered_points=capacity)
        )
        result = time_calls(run, rows)
        closed = run.close(timeout=300)
        stats = run.stats
        result.update(all_acknowledged=closed, acknowledged_points=stats.acknowledged)
        return result
    finally:
        server.stop(None)


def end_to_end(target: str, run_id: str, rows: list[dict[str, float]]) -> dict[str, Any]:
    capacity = len(rows) * len(rows[0]) + 1  # measure throughput, not the drop policy
    run = connect(target, run_id, config=ClientConfig(max_buffered_points=capacity))
    started = time.perf_counter()
    for step, row in enumerate(rows):
        run.log(step, **row)
    logged = time.perf_counter() - started
    closed = run.close(timeout=300)
    elapsed = time.perf_counter() - started
    stats = run.stats
    return {
        "points": stats.logged,
        "all_acknowledged": closed and stats.acknowledged == stats.logged,
        "seconds": elapsed,
        "points_per_s": stats.logged / elapsed,
        "logging_seconds": logged,
        "dropped_points": stats.dropped,
    }


def bench_e2e_in_process(rows: list[dict[str, float]], null: bool = False) -> dict[str, Any]:
    server, port, _ = start_in_process_server(null)
    try:
        return end_to_end(f"127.0.0.1:{port}", "bench-e2e", rows)
    finally:
        server.stop(None)


def _serve_in_child(ports: Any, stop: Any) -> None:
    server, port, _ = start_in_process_server()
    ports.put(port)
    stop.wait()
    server.stop(None)


def bench_e2e_subprocess(rows: list[dict[str, float]]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    stop = context.Event()
    child = context.Process(target=_serve_in_child, args=(ports, stop), daemon=True)
    child.start()
    try:
        port = ports.get(timeout=60)
        return end_to_end(f"127.0.0.1:{port}", "bench-e2e-proc", rows)
    finally:
        stop.set()
        child.join(10)


def bench_engine_only(rows: list[dict[str, float]], batch_points: int) -> dict[str, Any]:
    from detector.engine import Engine

    engine = Engine()
    per_batch = max(1, batch_points // len(rows[0]))
    batches = []
    for first in range(0, len(rows), per_batch):
        columns: dict[str, tuple[list[int], list[float]]] = {}
        for step in range(first, min(len(rows), first + per_batch)):
            for name, value in rows[step].items():
                steps, values = columns.setdefault(name, ([], []))
                steps.append(step)
                values.append(value)
        batches.append(columns)
    started = time.perf_counter()
    for columns in batches:
        engine.ingest("bench-engine", columns)
    engine.end_run("bench-engine")
    elapsed = time.perf_counter() - started
    points = len(rows) * len(rows[0])
    return {"points": points, "seconds": elapsed, "points_per_s": points / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="log() calls timed")
    parser.add_argument("--metrics", type=int, default=10, help="metrics per call")
    parser.add_argument(
        "--e2e-calls",
        type=int,
        default=5_000,
        help="log() calls in the end-to-end runs with the real engine (slow: it detects)",
    )
    parser.add_argument(
        "--null-calls",
        type=int,
        default=100_000,
        help="log() calls in the end-to-end run with the counting engine",
    )
    parser.add_argument("--no-subprocess", action="store_true", help="skip the separate process")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)

    rows = metric_rows(max(args.calls, args.e2e_calls, args.null_calls), args.metrics)
    e2e_rows = rows[: args.e2e_calls]
    null_rows = rows[: args.null_calls]
    rows = rows[: args.calls]
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "metrics_per_call": args.metrics,
        "timer_overhead_us": timer_overhead_us(),
    }
    results["log_no_server"] = bench_no_server(rows, args.metrics, full=False)
    results["log_no_server_buffer_full"] = bench_no_server(rows, args.metrics, full=True)
    results["log_in_process_counting_engine"] = bench_in_process(rows, null=True)
    results["log_in_process_real_engine"] = bench_in_process(e2e_rows, null=False)
    results["e2e_in_process_server"] = bench_e2e_in_process(e2e_rows)
    if not args.no_subprocess:
        results["e2e_server_in_subprocess"] = bench_e2e_subprocess(e2e_rows)
    results["engine_only"] = bench_engine_only(e2e_rows, ClientConfig().batch_points)
    results["e2e_in_process_counting_engine"] = bench_e2e_in_process(null_rows, null=True)

    print(
        f"log() with {args.metrics} metrics, {args.calls} calls "
        f"(timer overhead {results['timer_overhead_us']:.3f} µs, included):"
    )
    for key in (
        "log_no_server",
        "log_no_server_buffer_full",
        "log_in_process_counting_engine",
        "log_in_process_real_engine",
    ):
        r = results[key]
        print(
            f"  {key:31s} median {r['median_us']:6.2f} µs  p99 {r['p99_us']:6.2f} µs  "
            f"mean {r['mean_us']:6.2f} µs  max {r['max_us'] / 1000:7.2f} ms  "
            f"({r['calls']:,} calls)"
        )
    print("end to end (first log() until close() returns, every point acknowledged):")
    for key in (
        "e2e_in_process_server",
        "e2e_server_in_subprocess",
        "engine_only",
        "e2e_in_process_counting_engine",
    ):
        if key in results:
            r = results[key]
            extra = "" if key == "engine_only" else f"  acknowledged: {r['all_acknowledged']}"
            print(
                f"  {key:31s} {r['points_per_s']:12,.0f} points/s  "
                f"({r['points']:,} points in {r['seconds']:.2f} s){extra}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
