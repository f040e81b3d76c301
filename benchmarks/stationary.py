"""Event rates on stationary series: the economy bound without labels.

Criterion 7 of the runs benchmark (at most one CHANGE_POINT, PLATEAU_START or
PLATEAU_END per series per 100 logged lines on a long stationary stretch) is
scored there on labelled ``stabilization`` phases, where many series of a real
run still move (learning-rate steps, norms that jump together). This
benchmark checks the bound where nothing moves by construction: seeded runs of
``--lines`` logged lines (every ``--every`` steps), each with a series of every
kind below, all stationary, analysed as ``phasewatch analyze`` does
(:func:`detector.analysis.analyze_columns`, default configuration):

- ``train_loss``: a flat loss with multiplicative log-normal noise (5 %);
- ``test_loss``: the same with AR(1) noise (ρ = 0.9, a slowly wandering eval loss);
- ``train_acc``: a binomial accuracy on 512 examples around 0.97, quantised;
- ``test_acc``: the same pinned at 1.0 most of the time (around 0.999, on 2 048);
- ``grad_norm``: heavy-tailed (Student t, 3 degrees of freedom) around 1;
- ``layer{k}.weight_norm``: ``--layers`` parallel norms, a random walk with
  tiny steps around 50 (a drift far below the noise of a plot);
- ``lr``: constant.

Reported per kind of series: the most events any series had, per 100 lines,
and how many series went over 1; and over all, the runs and series over 1.
The first 10 % of each run is left out (the detectors' warm-up).

Usage (from the repository root)::

    python -m benchmarks.stationary [--runs 10] [--lines 1000] [--every 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from detector.analysis import analyze_columns  # noqa: E402
from detector.core.economy import group_of  # noqa: E402

NOISY_KINDS = ("CHANGE_POINT", "PLATEAU_START", "PLATEAU_END")


def stationary_run(seed: int, lines: int, every: int,
                   layers: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One run's columns: every series stationary (see the module). O(lines × series)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(lines, dtype=np.int64) * every
    ar = np.zeros(lines)
    shocks = rng.normal(0, 0.05 * np.sqrt(1 - 0.9**2), lines)
    for i in range(1, lines):
        ar[i] = 0.9 * ar[i - 1] + shocks[i]
    columns = {
        "train_loss": 0.3 * np.exp(rng.normal(0, 0.05, lines)),
        "test_loss": 0.4 * np.exp(ar),
        "train_acc": rng.binomial(512, 0.97, lines) / 512,
        "test_acc": rng.binomial(2048, 0.9995, lines) / 2048,
        "grad_norm": np.abs(1.0 + 0.1 * rng.standard_t(3, lines)),
        "lr": np.full(lines, 1e-3),
    }
    for k in range(layers):
        columns[f"layer{k}.weight_norm"] = 50.0 + np.cumsum(rng.normal(0, 0.002, lines))
    return {name: (steps, values.astype(float)) for name, values in columns.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    worst: dict[str, float] = defaultdict(float)
    over: dict[str, int] = defaultdict(int)
    counted: dict[str, int] = defaultdict(int)
    runs_over = 0
    skip = args.lines // 10
    scored_lines = args.lines - skip
    for seed in range(args.runs):
        columns = stationary_run(seed, args.lines, args.every, args.layers)
        _, events, _ = analyze_columns(columns, run_id=f"stationary-{seed}")
        per: dict[str, int] = defaultdict(int)
        for e in events:
            if e["kind"] in NOISY_KINDS and e["step"] >= skip * args.every:
                per[e["series"]] += 1
        run_over = False
        for name in columns:
            kind = group_of(name)
            rate = 100.0 * per.get(name, 0) / scored_lines
            worst[kind] = max(worst[kind], rate)
            counted[kind] += 1
            over[kind] += rate > 1.0
            run_over |= rate > 1.0
        runs_over += run_over
    print(f"stationary runs: {args.runs} × {args.lines} lines (every {args.every} steps), "
          f"events per 100 lines after the first {skip} lines")
    print(f"  {'series':26s} {'max rate':>9s} {'over 1':>7s}")
    for kind in worst:
        print(f"  {kind:26s} {worst[kind]:9.2f} {over[kind]:4d}/{counted[kind]}")
    total_over = sum(over.values())
    print(f"runs with a series over 1: {runs_over}/{args.runs}; "
          f"series over 1: {total_over}/{sum(counted.values())}")
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "lines": args.lines, "every": args.every,
                                         "max_rate": worst, "over": over, "series": counted,
                                         "runs_over": runs_over}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
