"""Full garbage-collection pauses of an engine holding many runs, with and without
``serve``'s policy (:class:`detector.server.full_collections.FullCollections`).

Each mode runs in its own process (the collector is process-wide): what is
loaded is frozen first, as ``serve`` does after its warm-up; ``--runs`` runs of
8 random-walk series are declared and fed ``--warm-lines`` lines each (growth),
then batches of 64 lines go to random runs for ``--seconds`` (steady state). The
collector's callbacks time every full pass (generation 2). Reported per phase:
full passes, their longest and median pause, and in the steady phase batches
a second and the slowest batch (a pause lands in the batch that triggered it).
``--rescan-seconds`` shortens the policy's period (900 s in ``serve``) so that
its walk of everything shows within the steady phase.

Usage (from the repository root)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.gc_pauses [--runs 3000] [--warm-lines 1100]
        [--seconds 60] [--rescan-seconds 900] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SERIES = ("train_loss", "val_loss", "train_acc", "val_acc", "weight_norm", "grad_norm", "lr", "rank")


def measure(runs: int, warm_lines: int, seconds: float, policy: bool, rescan_seconds: float,
            seed: int = 0) -> dict[str, Any]:
    """One mode, in this process."""
    import numpy as np

    from detector.engine import Engine
    from detector.server.full_collections import FullCollections

    pauses: list[float] = []
    started: list[float] = [0.0]

    def timer(phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    gc.collect()
    gc.freeze()
    gc.callbacks.append(timer)
    if policy:
        FullCollections(rescan_seconds=rescan_seconds).install()
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    engine = Engine()
    next_step = [0] * runs

    def batch(i: int, lines: int) -> dict[str, tuple[Any, Any]]:
        steps = np.arange(next_step[i], next_step[i] + lines, dtype=np.int64)
        next_step[i] += lines
        return {name: (steps, np.cumsum(rng.standard_normal(lines))) for name in SERIES}

    t0 = time.perf_counter()
    for i in range(runs):
        engine.ingest(f"run-{i}", batch(i, warm_lines))
    growth = {"seconds": time.perf_counter() - t0, **_pauses(pauses)}
    pauses.clear()
    slowest, batches = 0.0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        i = pick.randrange(runs)
        t = time.perf_counter()
        engine.ingest(f"run-{i}", batch(i, 64))
        slowest = max(slowest, time.perf_counter() - t)
        batches += 1
    elapsed = time.perf_counter() - t0
    steady = {"seconds": elapsed, "batches_per_second": batches / elapsed,
              "slowest_batch_ms": 1e3 * slowest, **_pauses(pauses)}
    return {"policy": policy, "growth": growth, "steady": steady,
            "tracked_objects": len(gc.get_objects()) + gc.get_freeze_count()}


def _pauses(pauses: list[float]) -> dict[str, Any]:
    ms = sorted(1e3 * p for p in pauses)
    return {"full_passes": len(ms), "max_pause_ms": ms[-1] if ms else 0.0,
            "median_pause_ms": ms[len(ms) // 2] if ms else 0.0,
            "pauses_ms": [round(1e3 * p, 1) for p in pauses]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--warm-lines", type=int, default=1100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rescan-seconds", type=float, default=900.0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.runs, args.warm_lines, args.seconds, args.one == "on",
                                 args.rescan_seconds)))
        return 0
    results = []
    for mode in ("off", "on"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.gc_pauses", "--runs", str(args.runs),
             "--warm-lines", str(args.warm_lines), "--seconds", str(args.seconds),
             "--rescan-seconds", str(args.rescan_seconds), "--one", mode],
            check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()
    print(f"full-collection pauses: {args.runs} runs x {len(SERIES)} series, {args.warm_lines} lines "
          f"each, then {args.seconds:g} s of 64-line batches; policy's rescan every "
          f"{args.rescan_seconds:g} s; load {load[0]:.2f} {load[1]:.2f}")
    print(f"{'policy':8} {'phase':7} {'passes':>6} {'max ms':>8} {'median ms':>10} "
          f"{'batches/s':>10} {'slowest batch ms':>17}")
    for r in results:
        for phase in ("growth", "steady"):
            p = r[phase]
            rate = f"{p['batches_per_second']:10.0f}" if "batches_per_second" in p else f"{'-':>10}"
            slow = f"{p['slowest_batch_ms']:17.1f}" if "slowest_batch_ms" in p else f"{'-':>17}"
            print(f"{'freeze' if r['policy'] else 'default':8} {phase:7} {p['full_passes']:6d} "
                  f"{p['max_pause_ms']:8.1f} {p['median_pause_ms']:10.1f} {rate} {slow}")
    for r in results:
        print(f"steady full passes, in order ({'freeze' if r['policy'] else 'default'}), ms: "
              f"{r['steady']['pauses_ms']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "load_average": load,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
