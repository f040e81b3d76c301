"""Sizing numbers for README "Operations": what one replica sustains.

``python -m benchmarks.scaleout [--store URL]`` starts ``phasewatch serve`` on
the store (default: a fresh SQLite file) and streams the bundled grokking run
(417 logged lines × 12 series) as N concurrent runs, N = 1, 4, 16, printing
points/s, and measures per-run memory and the cost of a full checkpoint
in-process.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.engine import Engine
from detector.logfile import count_points, iter_batches, read_log
from detector.replay import stream_log

RUN = Path(__file__).resolve().parents[1] / "detector" / "data" / "grok_add_0.jsonl"


def _serve(store: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "detector", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "", "--store", store],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    )
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"listening on [^:]+:(\d+)", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError("serve did not start")


def throughput(store: str, concurrency: int, batch: int) -> float:
    columns = read_log(RUN)
    points = count_points(columns)
    process, target = _serve(store)
    try:
        channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.PhaseDetectorStub(channel)
        tag = f"{concurrency}-{batch}-{time.time_ns()}"
        threads = [
            threading.Thread(target=stream_log, args=(stub, f"bench-{tag}-{i}", columns),
                             kwargs={"batch_size": batch})
            for i in range(concurrency)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        channel.close()
    finally:
        process.terminate()
        process.wait(10)
    return points * concurrency / seconds


def memory_and_checkpoint() -> tuple[float, float, float]:
    """(MiB per run held in memory, checkpoint kB, ms to make one checkpoint)."""
    columns = read_log(RUN)
    engine = Engine()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs = 100
    for i in range(runs):
        for batch in iter_batches(columns, 4096):
            engine.ingest(f"m-{i}", batch)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = engine._runs["m-0"]
    started = time.perf_counter()
    for _ in range(50):
        blob = run.checkpoint()
    pickle_ms = (time.perf_counter() - started) / 50 * 1000
    return (after - before) / 1024 / runs, len(blob) / 1000, pickle_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or f"sqlite:///{tmp}/bench.db"
        print(f"store {store.split('@')[-1]}, {os.cpu_count()} cores")
        for batch in (2048, 64):
            for concurrency in (1, 4, 16):
                rate = throughput(store, concurrency, batch)
                print(f"batch {batch:5d} points, {concurrency:2d} concurrent runs: {rate:8.0f} points/s")
    mib, kb, ms = memory_and_checkpoint()
    print(f"memory per run in memory {mib:.2f} MiB; "
          f"full checkpoint {kb:.0f} kB (written every checkpoint_log_points points) "
          f"made in {ms:.2f} ms")


if __name__ == "__main__":
    main()
