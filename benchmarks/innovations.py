"""How far the fast trigger's innovations are from its design assumption, by corpus.

The fast CUSUM (:class:`~detector.core.trigger.CusumTrigger`) is calibrated for
white standardised innovations: threshold 6 puts its false alarms near one per
1 300 points. On curves whose Holt innovations run in same-signed stretches
(autocorrelated), a CUSUM sums them and alarms far more often, and every alarm
costs the localiser a look. This measures, per corpus, each series' lag-1
autocorrelation of the trigger's standardised innovations (``last_z`` after
each point past the warm-up, on the series' working scale) and the alarms per
1 000 points (the sums cleared at each alarm, as a look that finds nothing
leaves them): the runs :mod:`benchmarks.ingest` streams (the labelled runs of
``../shared/real_runs`` and ``../shared/runs``, ``benchmarks/generated``;
:func:`benchmarks.real_workload.run_paths`), the univariate TCPD series
(``../shared/tcpd``) and seeded white noise. A corpus that is absent is
skipped and said so.

It is the baseline for a calibration of the fast trigger to each series' own
innovations (the issue-15 notes): a rule that cuts the real runs' alarms by
their autocorrelation cuts TCPD's as much when TCPD's innovations are as
autocorrelated, and TCPD's change points come from those alarms.

Usage (from the repository root)::

    python -m benchmarks.innovations [--json OUT]

O(points): one ``CusumTrigger.update`` a point (a few µs each; ~30 s for the
shared corpora and the generated runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from benchmarks import real_workload  # noqa: E402
from detector.core.series import working_scale_many  # noqa: E402
from detector.core.trigger import CusumTrigger  # noqa: E402
from detector.core.types import infer_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIN_POINTS = 50  # shorter series say little about their innovations
WHITE_SERIES, WHITE_POINTS = 5, 5000


def innovations(y: np.ndarray) -> tuple[np.ndarray, int]:
    """The default trigger's standardised innovations after its warm-up, point by
    point, and its alarms (each followed by clearing the sums). O(len(y))."""
    trigger = CusumTrigger()
    out, alarms = [], 0
    for value in y.tolist():
        if trigger.update(value):
            alarms += 1
            trigger.clear()
        if trigger.n > trigger.warmup:
            out.append(trigger.last_z)
    return np.array(out), alarms


def lag1(z: np.ndarray) -> float:
    """Lag-1 autocorrelation (NaN for a constant or too short sequence)."""
    if len(z) < 3:
        return math.nan
    centred = z - z.mean()
    power = float(centred @ centred)
    return float(centred[1:] @ centred[:-1]) / power if power > 0 else math.nan


def summary(name: str, series: Iterable[np.ndarray]) -> dict:
    """Per-series lag-1 autocorrelations (median and quartiles) and the corpus' alarms
    per 1 000 points."""
    rhos, points, alarms = [], 0, 0
    for y in series:
        z, found = innovations(y)
        if len(z) < 20:
            continue
        rho = lag1(z)
        if not math.isnan(rho):
            rhos.append(rho)
        points += len(y)
        alarms += found
    if not rhos:
        return {"corpus": name, "series": 0}
    q25, median, q75 = (float(q) for q in np.quantile(rhos, [0.25, 0.5, 0.75]))
    return {"corpus": name, "series": len(rhos), "points": points, "rho_median": median, "rho_q25": q25,
            "rho_q75": q75, "alarms_per_1000": 1000 * alarms / points}


def log_series(paths: Sequence[Path]) -> Iterator[np.ndarray]:
    """Every series of the runs at ``paths`` with enough finite points, on its working scale."""
    from detector.logfile import read_log

    for path in paths:
        for name, (_, values) in read_log(path).items():
            values = values[np.isfinite(values)]
            if len(values) >= MIN_POINTS:
                yield working_scale_many(infer_spec(name).role, values)


def tcpd_series(folder: Path) -> Iterator[np.ndarray]:
    from benchmarks.tcpd import load_tcpd

    for s in load_tcpd(folder)[0]:
        values = np.array([v for v in s.values if v is not None and math.isfinite(v)])
        if len(values) >= MIN_POINTS:
            yield values


def white_series() -> Iterator[np.ndarray]:
    for seed in range(WHITE_SERIES):
        yield np.random.default_rng(seed).normal(size=WHITE_POINTS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    # The runs benchmarks.ingest streams (labelled shared runs, generated ones), by folder.
    paths, notes = real_workload.run_paths(REPO)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    rows = []
    for name in (*real_workload.SHARED_SUBDIRS, "generated"):
        mine = [p for p in paths if p.parent.name == name]
        if mine:
            rows.append(summary(name, log_series(mine)))
    tcpd = REPO.parent / "shared" / "tcpd"
    if tcpd.is_dir():
        rows.append(summary("tcpd", tcpd_series(tcpd)))
    else:
        print(f"note: {tcpd} is absent, TCPD skipped", file=sys.stderr)
    rows.append(summary("white noise", white_series()))
    print("the fast trigger's standardised innovations: lag-1 autocorrelation per series, "
          "alarms per 1 000 points")
    print(f"  {'corpus':<12} {'series':>6} {'points':>8} {'rho q25':>8} {'median':>7} {'q75':>6}"
          f" {'alarms/1000':>12}")
    for r in rows:
        if not r["series"]:
            print(f"  {r['corpus']:<12} {0:>6}")
            continue
        print(f"  {r['corpus']:<12} {r['series']:>6} {r['points']:>8} {r['rho_q25']:>8.2f}"
              f" {r['rho_median']:>7.2f} {r['rho_q75']:>6.2f} {r['alarms_per_1000']:>12.1f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
