"""Benchmark the spectral metrics: Gram eigenvalues against an SVD, and each metric's cost.

For each matrix size it times, on one random float64 matrix (median of
``--repeat`` calls after a warm-up, in µs):

- ``gram``: ``detector.spectral.squared_singular_values`` (product with the
  smaller Gram matrix + ``numpy.linalg.eigvalsh``);
- ``svd``: ``numpy.linalg.svd(compute_uv=False)``, the same singular values;
- the largest relative difference of the two spectra's top singular values;
- every metric of :class:`detector.spectral.SpectralTracker` together
  (``tracker``: two spectra, raw and centred) and the weight metrics.

Usage::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.spectral [--repeat 20] [--json OUT]

Set ``OPENBLAS_NUM_THREADS`` before Python starts: OpenBLAS reads it once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from detector import spectral

SIZES: tuple[tuple[int, int], ...] = (
    (59, 64),  # the grokking runs' token embedding
    (512, 64),
    (512, 256),  # a probe batch of 512 through a 256-wide layer
    (512, 1024),
    (2048, 512),
    (1024, 1024),  # a square weight
    (4096, 1024),
)


def _time(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1e3


def measure(sizes: tuple[tuple[int, int], ...] = SIZES, repeat: int = 20) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for n, d in sizes:
        x = rng.standard_normal((n, d)) * np.linspace(1.0, 0.01, d)  # a decaying spectrum
        reps = repeat if n * d * min(n, d) < 5e8 else max(3, repeat // 4)
        gram_us = _time(lambda x=x: spectral.squared_singular_values(x), reps)
        svd_us = _time(lambda x=x: np.linalg.svd(x, compute_uv=False), reps)
        g = np.sqrt(spectral.squared_singular_values(x))
        s = np.linalg.svd(x, compute_uv=False)
        top = max(1, min(n, d) // 2)  # the upper half: well above the Gram's noise floor
        rel = float(np.max(np.abs(g[:top] - s[:top]) / s[:top]))
        tracker = spectral.SpectralTracker(top_k=3)
        tracker.update("x", x)
        tracker_us = _time(lambda x=x, t=tracker: t.update("x", x), reps)
        weight_us = _time(
            lambda x=x, t=tracker: t.update("w", None, weight=x), reps
        )
        rows.append(
            {
                "n": n,
                "d": d,
                "gram_us": round(gram_us, 1),
                "svd_us": round(svd_us, 1),
                "svd_over_gram": round(svd_us / gram_us, 2),
                "max_rel_diff_top_half": rel,
                "tracker_update_us": round(tracker_us, 1),
                "weight_metrics_us": round(weight_us, 1),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    rows = measure(repeat=args.repeat)
    meta = {
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    header = f"{'n x d':>12} {'gram µs':>10} {'svd µs':>10} {'svd/gram':>9} {'rel diff':>9} " \
        f"{'tracker µs':>11} {'weight µs':>10}"
    print(header)
    for r in rows:
        print(
            f"{r['n']:>5} x {r['d']:<5} {r['gram_us']:>10.1f} {r['svd_us']:>10.1f} "
            f"{r['svd_over_gram']:>9.2f} {r['max_rel_diff_top_half']:>9.1e} "
            f"{r['tracker_update_us']:>11.1f} {r['weight_metrics_us']:>10.1f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
