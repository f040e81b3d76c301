"""The phase labeller's cost per call on real runs, in blocks of lines as a server gets them.

A server calls :meth:`PhaseLabeller.update_block` once per received batch per
run (8–256 logged lines), so its fixed cost per call matters as much as its
cost per line. This cell reads each run once (``read_log``), cuts it into
blocks of ``B`` lines (B = 8, 32, 64, 256), builds the block views as
:class:`~detector.core.run.RunDetector` does (``_BlockColumns``, outside the
timing), and times every ``update_block`` call of a fresh labeller taking the
whole run, ``--repeats`` times (a fresh labeller each), keeping each call's
best time. It reports µs per call: the mean over all calls, the median call, and the mean over the
*quiet* calls (blocks of which no line took the per-line path: every line in a
quiet stretch of every rule), with µs per line.
The series detectors are not run (the labeller reads only its role columns;
series events only interleave with its own).

Usage (from the repository root)::

    python -m benchmarks.labeller_cost [--runs FILE ...] [--blocks 8 32 64 256] [--repeats 7] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_RUNS = (SHARED / "real_runs" / "seedstudy_adamw_stable_seed_1.jsonl",
                SHARED / "runs" / "grok_add_0.jsonl")
BLOCKS = (8, 32, 64, 256)


def _blocks(columns: dict, size: int) -> list[tuple[np.ndarray, object]]:
    """The run's lines in blocks of ``size`` lines, as (lines, view) pairs (the views RunDetector builds)."""
    from detector.core.run import _BlockColumns

    cols = {name: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
            for name, (s, v) in columns.items() if len(s)}
    lines = np.unique(np.concatenate([s for s, _ in cols.values()]))
    out = []
    for lo in range(0, len(lines), size):
        block = lines[lo:lo + size]
        first, last = int(block[0]), int(block[-1])
        parts = {}
        for name in sorted(cols):
            steps, values = cols[name]
            a, b = np.searchsorted(steps, (first, last + 1))
            if b > a:
                parts[name] = (steps[a:b], values[a:b])
        out.append((block, _BlockColumns(block, parts)))
    return out


def measure_run(path: Path, sizes: Sequence[int] = BLOCKS, repeats: int = 7) -> dict:
    """µs per ``update_block`` call on the run at ``path`` for each block size (see the module)."""
    from detector.core.labeller import PhaseLabeller
    from detector.core.types import infer_spec
    from detector.logfile import read_log

    columns = read_log(path)
    specs = {name: infer_spec(name) for name in columns}
    out: dict = {"run": path.stem, "series": len(columns), "cells": {}}
    for size in sizes:
        blocks = _blocks(columns, size)
        runs = []
        for _ in range(max(1, repeats)):
            labeller = PhaseLabeller()
            labeller.set_specs(specs)
            times: list[float] = []
            for lines, view in blocks:
                start = time.perf_counter()
                labeller.update_block(lines, view, {})  # type: ignore[arg-type]
                times.append(time.perf_counter() - start)
            runs.append(times)
        # Each call's best of the repeats (the least disturbed, as timeit reports).
        times = np.min(np.asarray(runs), axis=0).tolist()
        total = sum(times)
        quiet = _quiet_calls(blocks, specs)
        quiet_times = [t for t, q in zip(times, quiet, strict=True) if q]
        lines = sum(len(b[0]) for b in blocks)
        out["cells"][str(size)] = {
            "calls": len(times), "lines": lines,
            "us_per_call": 1e6 * total / len(times),
            "us_per_call_median": 1e6 * float(np.median(times)),
            "us_per_quiet_call": 1e6 * float(np.mean(quiet_times)) if quiet_times else None,
            "quiet_calls": len(quiet_times),
            "us_per_line": 1e6 * total / max(lines, 1),
        }
    return out


def _quiet_calls(blocks: list, specs: dict) -> list[bool]:
    """Per block, whether no line of it took the labeller's per-line path (an untimed
    pass of its own, counting ``PhaseLabeller._line`` calls)."""
    from detector.core.labeller import PhaseLabeller

    labeller = PhaseLabeller()
    labeller.set_specs(specs)
    count = [0]
    line = labeller._line

    def counted(*args: object) -> object:
        count[0] += 1
        return line(*args)  # type: ignore[arg-type]

    labeller._line = counted  # type: ignore[method-assign]
    quiet = []
    for lines, view in blocks:
        count[0] = 0
        labeller.update_block(lines, view, {})
        quiet.append(count[0] == 0)
    return quiet


def measure(paths: Sequence[Path], sizes: Sequence[int] = BLOCKS, repeats: int = 7) -> dict:
    """The cell on every run of ``paths``, after a warm-up (numba loads its compiled code on a first call)."""
    existing = [p for p in paths if p.exists()]
    if existing:
        measure_run(existing[0], sizes[:1], 1)
    return {"repeats": repeats, "load_average": list(os.getloadavg()),
            "runs": [measure_run(p, sizes, repeats) for p in existing]}


def print_cell(doc: dict) -> None:
    print("labeller: µs per update_block call by block size (lines), each call's best of"
          f" {doc['repeats']}; mean / median / mean of quiet calls, µs per line;"
          f" load {' '.join(f'{v:.2f}' for v in doc['load_average'])}")
    for run in doc["runs"]:
        print(f"  {run['run']} ({run['series']} series)")
        for size, c in run["cells"].items():
            quiet = "-" if c["us_per_quiet_call"] is None else f"{c['us_per_quiet_call']:.1f}"
            print(f"    {size:>4} lines: {c['us_per_call']:8.1f} {c['us_per_call_median']:8.1f} {quiet:>8}"
                  f"  ({c['quiet_calls']}/{c['calls']} quiet)  {c['us_per_line']:6.2f} µs/line")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.labeller_cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, nargs="*", default=list(DEFAULT_RUNS), metavar="FILE")
    parser.add_argument("--blocks", type=int, nargs="*", default=list(BLOCKS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, metavar="OUT")
    args = parser.parse_args(argv)
    doc = measure(args.runs, args.blocks, args.repeats)
    print_cell(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
