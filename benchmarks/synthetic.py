"""Detection delay and false alarms of the default series detector on seeded signals.

Signals come from :mod:`detector.core.synthetic` (seeded, known change points).

* False alarms: change points reported per 10 000 points on signals without
  any change: stationary Gaussian noise (role ``other``) and power-law training
  losses ``3 (10 + t)^-0.5`` with 2 % and 10 % multiplicative noise (role
  ``loss``, so on the log scale the detector uses for losses).
* Delay on mean shifts of δ = 1, 2, 3 noise standard deviations: the change
  is at point 1 000 of 2 000; the delay is ``detected_at - change`` of the
  first change point located within ``MATCH`` points of it (missed otherwise).
  It is set beside the delay of the CUSUM that is optimal for that shift
  (knows the pre-change mean, σ and δ; drift k = δ/2) at the same false-alarm
  rate: its threshold h gives an in-control average run length of
  10 000 / (our false alarms per 10 000 points on stationary noise), or 10 000
  when we raised none. Its zero-state delay is simulated on the same noise.
* Detection rate and delay on the other shapes (no optimal reference):
  a plateau that ends in a sudden drop, a slope change, a variance change
  (×4) and a spike.

Usage (from the repository root)::

    python -m benchmarks.synthetic [--seeds 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from detector.core import synthetic
from detector.core.series import SeriesDetector
from detector.core.types import Direction, EventKind, Role, SeriesSpec, Split

MATCH = 10  # a detection must be located within this many points of the true change
OTHER = SeriesSpec("value", Role.OTHER, Split.TRAIN, Direction.MINIMIZE)
LOSS = SeriesSpec("train_loss", Role.LOSS, Split.TRAIN, Direction.MINIMIZE)


def change_points(spec: SeriesSpec, y: np.ndarray) -> list[tuple[int, int]]:
    """(located step, detected_at) of every change point the default detector reports."""
    det = SeriesDetector(spec)
    events = det.update_many(np.arange(len(y)), y)
    return [(e.step, e.detected_at) for e in events if e.kind is EventKind.CHANGE_POINT]


def false_alarms(spec: SeriesSpec, make: Callable[[int], np.ndarray], seeds: int) -> dict:
    points = alarms = 0
    for seed in range(seeds):
        y = make(seed)
        points += len(y)
        alarms += len(change_points(spec, y))
    return {"points": points, "alarms": alarms, "per_10k": 1e4 * alarms / points}


def delays(spec: SeriesSpec, make: Callable[[int], tuple[np.ndarray, list[int]]], seeds: int) -> dict:
    found: list[int] = []
    missed = early = 0
    for seed in range(seeds):
        y, bkps = make(seed)
        cp = bkps[0]
        cps = change_points(spec, y)
        early += sum(1 for step, at in cps if at < cp - MATCH)
        hits = [at - cp for step, at in cps if abs(step - cp) <= MATCH and at >= cp]
        if hits:
            found.append(min(hits))
        else:
            missed += 1
    return {
        "detected": len(found), "missed": missed, "false_before_change": early,
        "median_delay": float(np.median(found)) if found else None,
        "mean_delay": float(np.mean(found)) if found else None,
    }


def siegmund_arl(drift: float, h: float) -> float:
    """Siegmund's approximation of a one-sided CUSUM's average run length.

    ``drift`` is the mean of the increments ``z - k`` (negative in control).
    """
    b = h + 1.166
    if abs(drift) < 1e-12:
        return b * b
    return (math.exp(-2 * drift * b) + 2 * drift * b - 1) / (2 * drift * drift)


def optimal_threshold(delta: float, arl0: float) -> float:
    """h with in-control ARL ``arl0`` for the CUSUM with k = δ/2 (bisection)."""
    k = delta / 2
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if siegmund_arl(-k, mid) < arl0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def optimal_delay(delta: float, h: float, seeds: int) -> float:
    """Mean zero-state delay of the optimal CUSUM after a shift δ (simulated, σ = 1)."""
    k = delta / 2
    runs = []
    rng = np.random.default_rng(12345)
    for _ in range(max(seeds, 200)):
        s, t = 0.0, 0
        while True:
            s = max(0.0, s + rng.normal(delta, 1.0) - k)
            if s > h:
                break
            t += 1
        runs.append(t)  # the alarm point's offset from the first post-change point
    return float(np.mean(runs))


def run(seeds: int) -> dict:
    started = time.perf_counter()
    fa = {
        "stationary_noise": false_alarms(OTHER, lambda s: synthetic.stationary(10_000, seed=s)[0], seeds),
        "power_law_loss_2pct": false_alarms(
            LOSS, lambda s: synthetic.power_law_loss(10_000, noise=0.02, seed=s)[0], seeds),
        "power_law_loss_10pct": false_alarms(
            LOSS, lambda s: synthetic.power_law_loss(10_000, noise=0.10, seed=s)[0], seeds),
    }
    rate = fa["stationary_noise"]["per_10k"]
    arl0 = 1e4 / rate if rate > 0 else 1e4
    shifts = {}
    for delta in (1.0, 2.0, 3.0):
        ours = delays(OTHER, lambda s, d=delta: synthetic.mean_shifts(2000, 1, d, seed=1000 + s), seeds)
        h = optimal_threshold(delta, arl0)
        best = optimal_delay(delta, h, seeds)
        ratio = None if ours["mean_delay"] is None else ours["mean_delay"] / max(best, 1e-9)
        shifts[f"delta_{delta:g}"] = {**ours, "optimal_h": h, "optimal_mean_delay": best, "ratio": ratio}
    shapes = {
        "plateau_drop": delays(LOSS, lambda s: _loss(synthetic.plateau_drop(2000, seed=2000 + s)), seeds),
        "slope_change": delays(OTHER, lambda s: synthetic.slope_change(2000, seed=3000 + s), seeds),
        "variance_x4": delays(OTHER, lambda s: synthetic.variance_change(2000, seed=4000 + s), seeds),
        "spike_10sd": delays(OTHER, lambda s: synthetic.spike(2000, seed=5000 + s), seeds),
    }
    return {"seeds": seeds, "false_alarms": fa, "arl0_for_optimal": arl0, "mean_shifts": shifts,
            "shapes": shapes, "seconds": time.perf_counter() - started}


def _loss(pair: tuple[np.ndarray, list[int]]) -> tuple[np.ndarray, list[int]]:
    """A log10-loss curve back to loss units (the detector takes the log itself)."""
    y, bkps = pair
    return 10.0**y, bkps


def _f(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def report(doc: dict) -> str:
    lines = [f"Synthetic signals, default configuration, {doc['seeds']} seeds each", "",
             "False alarms (change points on signals without a change):",
             f"  {'signal':<24} {'points':>9} {'alarms':>7} {'per 10k':>8}"]
    for name, r in doc["false_alarms"].items():
        lines.append(f"  {name:<24} {r['points']:>9} {r['alarms']:>7} {r['per_10k']:>8.2f}")
    arl0 = doc["arl0_for_optimal"]
    lines += ["", f"Mean shifts at point 1000 of 2000 (σ = 1); optimal CUSUM at ARL0 = {arl0:.0f}:",
              f"  {'shift':<10} {'found':>5} {'missed':>6} {'early':>5} {'mean delay':>10} {'median':>6}"
              f" {'optimal':>7} {'h':>5} {'ratio':>5}"]
    for name, r in doc["mean_shifts"].items():
        lines.append(
            f"  {name:<10} {r['detected']:>5} {r['missed']:>6} {r['false_before_change']:>5}"
            f" {_f(r['mean_delay']):>10} {_f(r['median_delay'], '.1f'):>6} {r['optimal_mean_delay']:>7.2f}"
            f" {r['optimal_h']:>5.2f} {_f(r['ratio']):>5}")
    lines += ["", "Other shapes (change at point 1000 of 2000):",
              f"  {'shape':<14} {'found':>5} {'missed':>6} {'early':>5} {'mean delay':>10} {'median':>6}"]
    for name, r in doc["shapes"].items():
        lines.append(f"  {name:<14} {r['detected']:>5} {r['missed']:>6} {r['false_before_change']:>5}"
                     f" {_f(r['mean_delay']):>10} {_f(r['median_delay'], '.1f'):>6}")
    lines.append(f"\nwall time {doc['seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthetic",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="signals per case (default 20)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all numbers to OUT")
    args = parser.parse_args(argv)
    doc = run(args.seeds)
    print(report(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
