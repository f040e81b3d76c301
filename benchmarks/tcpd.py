"""Score phasewatch's change points on the TCPD benchmark.

Runs ``phasewatch analyze FILE --json`` (the public, offline path, default
configuration) on every univariate series of the Turing Change Point Dataset
shipped in ``../shared/tcpd`` and scores the change points it reports with the
benchmark's F1 (margin 5) and Cover (see :mod:`benchmarks.tcpd_metrics`), as in
G. J. J. van den Burg and C. K. I. Williams, "An Evaluation of Change Point
Detection Algorithms", arXiv:2003.06222 (2020).

How a series becomes a run log: observation ``i`` (0-based) becomes the JSON
Lines record ``{"step": i, "value": x}``, with ``null`` for a missing value, so
a step is the observation index. A change point reported at step ``t`` means
that observation ``t`` starts a new segment, which is the TCPD annotation
convention, so steps are scored as indices unchanged. The prediction is the
union of the steps in ``change_points`` over all series keys of analyze's
output (there is one, ``value``); no other event kind counts (a plateau start,
say, is not a change point for this benchmark). Predictions are then cleaned as
the benchmark cleans every method's output (duplicates and the end points 0 and
``n - 1`` dropped).

The means are taken over the series the paper averages over that are shipped
here: every univariate series except ``quality_control_*`` (synthetic, used to
vet annotators) and ``uk_coal_employ`` (missing values), 25 series.
``run_log`` is two-dimensional and skipped. The table puts them next to the
published Default-experiment scores of ``binseg``, ``pelt``, ``bocpd`` and
``zero`` (no change points) on the same 25 series, and next to the
zero-change-point baseline computed here, which must reproduce the published
``zero`` scores (0.647 F1, 0.557 Cover): that is the check that the metrics are
right.

Usage (from the repository root)::

    python -m benchmarks.tcpd                     # phasewatch analyze, 2 jobs
    python -m benchmarks.tcpd --jobs 8 --json tcpd.json
    python -m benchmarks.tcpd --method binseg     # ruptures reference, in-process
    python -m benchmarks.tcpd --cmd "python -m detector.cli analyze"

``--cmd`` replaces the analyze command: ``{file}`` in it is replaced by the
log's path, otherwise ``FILE --json`` is appended. ``--method zero|binseg|pelt``
computes predictions in-process instead (no change points; or ruptures'
binary segmentation / PELT with an L2 cost on the standardised series and an
MBIC-like penalty ``3 log n``, binseg capped at 5 change points, which is the
paper's Default setting of those methods): reference baselines for checking
this harness, not phasewatch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.tcpd_metrics import DEFAULT_MARGIN, clean_predictions, covering, f_measure

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TCPD_DIR = REPO_ROOT.parent / "shared" / "tcpd"
PUBLISHED_FILE = Path(__file__).with_name("tcpd_published_default.json")

EXCLUDED_FROM_MEAN = frozenset({"uk_coal_employ", *(f"quality_control_{i}" for i in range(1, 6))})
"""Univariate series the paper leaves out of its averages."""

PAPER_METHODS = ("binseg", "pelt", "bocpd", "zero")
"""Published Default-experiment results shown next to ours."""

METHODS = ("phasewatch", "zero", "binseg", "pelt")

CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Set in every analyze process, so that ``--jobs`` processes do not oversubscribe."""


class BenchmarkError(RuntimeError):
    """A series could not be analysed (command failed, timed out or printed bad JSON)."""


@dataclass(frozen=True)
class Series:
    """One univariate TCPD series with its annotations."""

    name: str
    values: tuple[float | None, ...]
    annotations: Mapping[str, tuple[int, ...]]

    @property
    def n_obs(self) -> int:
        return len(self.values)

    @property
    def in_mean(self) -> bool:
        return self.name not in EXCLUDED_FROM_MEAN


@dataclass
class SeriesResult:
    """Scores of one series (``f1``/``cover`` are ``None`` when it failed)."""

    name: str
    n_obs: int
    in_mean: bool
    predicted: list[int] = field(default_factory=list)
    raw_change_points: dict[str, list[int]] = field(default_factory=dict)
    f1: float | None = None
    precision: float | None = None
    recall: float | None = None
    cover: float | None = None
    seconds: float | None = None
    error: str | None = None
    zero_f1: float = math.nan
    zero_cover: float = math.nan


# ---------------------------------------------------------------- loading


def load_tcpd(tcpd_dir: Path) -> tuple[list[Series], list[str]]:
    """Univariate series of a TCPD folder (sorted by name), and the names skipped.

    ``tcpd_dir`` holds ``annotations.json`` and ``data/<name>.json`` (TCPD
    format). Multivariate series are skipped.
    """
    annotations_file = tcpd_dir / "annotations.json"
    data_dir = tcpd_dir / "data"
    if not annotations_file.is_file() or not data_dir.is_dir():
        raise FileNotFoundError(f"{tcpd_dir} is not a TCPD folder (expected annotations.json and data/)")
    annotations = json.loads(annotations_file.read_text())
    series: list[Series] = []
    skipped: list[str] = []
    for path in sorted(data_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        name = doc["name"]
        if doc["n_dim"] != 1:
            skipped.append(name)
            continue
        raw = doc["series"][0]["raw"]
        if len(raw) != doc["n_obs"]:
            raise ValueError(f"{path}: n_obs={doc['n_obs']} but {len(raw)} values")
        if name not in annotations:
            raise ValueError(f"{path}: no annotations for {name!r}")
        values = tuple(None if v is None else float(v) for v in raw)
        series.append(
            Series(
                name=name,
                values=values,
                annotations={k: tuple(int(t) for t in v) for k, v in annotations[name].items()},
            )
        )
    return series, skipped


def load_published(path: Path = PUBLISHED_FILE) -> dict[str, dict[str, dict[str, float | None]]]:
    """Published Default scores: ``{method: {"f1"|"cover": {series: score or None}}}``."""
    return json.loads(path.read_text())["methods"]


def write_run_log(series: Series, path: Path) -> None:
    """Write ``series`` as a phasewatch run log: ``{"step": i, "value": x}`` per line."""
    with path.open("w") as fh:
        for i, x in enumerate(series.values):
            value = x if x is not None and math.isfinite(x) else None
            fh.write(json.dumps({"step": i, "value": value}) + "\n")


# ---------------------------------------------------------------- predictors

Predictor = Callable[[Series], tuple[list[int], dict[str, list[int]]]]
"""Series -> (predicted indices, change points per analyze series key)."""


def default_analyze_command() -> list[str]:
    """``phasewatch analyze``: the console script beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("phasewatch")
    exe = str(beside) if beside.is_file() else shutil.which("phasewatch")
    if exe is None:
        raise BenchmarkError(
            "the phasewatch console script was not found beside "
            f"{sys.executable} nor on PATH; install the package or pass --cmd"
        )
    return [exe, "analyze"]


def build_command(cmd: Sequence[str], log_file: Path) -> list[str]:
    """``cmd`` with ``{file}`` replaced by ``log_file``, or ``cmd FILE --json``."""
    if any("{file}" in part for part in cmd):
        return [part.replace("{file}", str(log_file)) for part in cmd]
    return [*cmd, str(log_file), "--json"]


def parse_change_points(stdout: str) -> dict[str, list[int]]:
    """``change_points`` of analyze's JSON output, as ``{series key: [steps]}``."""
    try:
        doc = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"analyze did not print one JSON document: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("change_points"), dict):
        raise BenchmarkError("analyze output has no 'change_points' object")
    out: dict[str, list[int]] = {}
    for key, steps in doc["change_points"].items():
        if not isinstance(steps, list):
            raise BenchmarkError(f"change_points[{key!r}] is not a list")
        ints: list[int] = []
        for step in steps:
            if isinstance(step, bool) or not isinstance(step, int | float) or step != int(step):
                raise BenchmarkError(f"change_points[{key!r}] has a non-integer step {step!r}")
            ints.append(int(step))
        out[str(key)] = ints
    return out


def analyze_predictor(cmd: Sequence[str], timeout: float) -> Predictor:
    """Predictor that runs ``cmd`` (see :func:`build_command`) in a child process."""
    env = {**os.environ, **CHILD_ENV}

    def predict(series: Series) -> tuple[list[int], dict[str, list[int]]]:
        with tempfile.TemporaryDirectory(prefix="tcpd-") as tmp:
            log_file = Path(tmp) / f"{series.name}.jsonl"
            write_run_log(series, log_file)
            argv = build_command(cmd, log_file)
            try:
                proc = subprocess.run(
                    argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise BenchmarkError(f"timed out after {timeout:g} s") from exc
            except OSError as exc:
                raise BenchmarkError(f"could not run {shlex.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            raise BenchmarkError(f"exit status {proc.returncode}: {' | '.join(tail)}")
        raw = parse_change_points(proc.stdout)
        union = sorted({t for steps in raw.values() for t in steps})
        return union, raw

    return predict


def zero_predictor(series: Series) -> tuple[list[int], dict[str, list[int]]]:
    """No change points (the benchmark's ``zero`` method)."""
    return [], {"value": []}


def ruptures_predictor(method: str) -> Predictor:
    """ruptures Binseg/PELT reference (L2 cost, standardised data, penalty 3 log n).

    Mirrors the paper's Default setting of changepoint's ``cpt.mean`` (Normal
    mean change, MBIC penalty, data scaled; binseg at most ``Q = 5`` change
    points). Missing values are filled with the previous value (the first
    with the next one).

    Predictions follow the TCPD convention (index of the first observation of
    the new segment). TCPDBench's changepoint wrapper reports the last index of
    the old segment instead, one earlier: shifted by -1, these predictions give
    the published per-series Default scores bit for bit on 19 of the 25
    averaged series for binseg and 16 for pelt (mean F1/Cover 0.681/0.651 and
    0.685/0.651, against 0.690/0.655 and 0.684/0.656 published).
    """
    import numpy as np
    import ruptures as rpt

    def predict(series: Series) -> tuple[list[int], dict[str, list[int]]]:
        x = np.array([np.nan if v is None else v for v in series.values], dtype=float)
        finite = np.flatnonzero(np.isfinite(x))
        if finite.size == 0:
            return [], {"value": []}
        idx = np.maximum.accumulate(np.where(np.isfinite(x), np.arange(x.size), 0))
        x = np.where(np.isfinite(x), x, x[idx])
        x[: finite[0]] = x[finite[0]]
        std = x.std()
        z = (x - x.mean()) / (std if std > 0 else 1.0)
        pen = 3.0 * math.log(x.size)
        if method == "pelt":
            bkps = rpt.Pelt(model="l2", min_size=1, jump=1).fit(z).predict(pen=pen)
        else:
            algo = rpt.Binseg(model="l2", min_size=1, jump=1).fit(z)
            bkps = algo.predict(pen=pen)
            if len(bkps) - 1 > 5:
                bkps = algo.predict(n_bkps=5)
        cps = [int(b) for b in bkps[:-1]]  # ruptures ends with n; b starts a segment
        return cps, {"value": cps}

    return predict


# ---------------------------------------------------------------- scoring


def score_series(series: Series, predict: Predictor, margin: int = DEFAULT_MARGIN) -> SeriesResult:
    """Run ``predict`` on ``series`` and score it; errors are recorded, not raised."""
    result = SeriesResult(name=series.name, n_obs=series.n_obs, in_mean=series.in_mean)
    result.zero_f1 = f_measure(series.annotations, [], margin).f1
    result.zero_cover = covering(series.annotations, [], series.n_obs)
    start = time.perf_counter()
    try:
        raw_predicted, raw = predict(series)
    except BenchmarkError as exc:
        result.seconds = time.perf_counter() - start
        result.error = str(exc)
        return result
    result.seconds = time.perf_counter() - start
    result.raw_change_points = raw
    result.predicted = clean_predictions(raw_predicted, series.n_obs)
    f1 = f_measure(series.annotations, result.predicted, margin)
    result.f1, result.precision, result.recall = f1.f1, f1.precision, f1.recall
    result.cover = covering(series.annotations, result.predicted, series.n_obs)
    return result


def run_benchmark(
    series: Sequence[Series], predict: Predictor, jobs: int = 1, margin: int = DEFAULT_MARGIN
) -> list[SeriesResult]:
    """Score every series, ``jobs`` at a time; results in the order of ``series``."""
    if jobs <= 1:
        return [score_series(s, predict, margin) for s in series]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda s: score_series(s, predict, margin), series))


def _mean(values: Iterable[float | None]) -> float | None:
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    return math.fsum(vals) / len(vals)  # type: ignore[arg-type]


def summarise(
    results: Sequence[SeriesResult],
    published: Mapping[str, Mapping[str, Mapping[str, float | None]]],
) -> dict[str, dict[str, Any]]:
    """Means over the averaging subset and over all series, ours and published.

    ``{"paper_subset" | "all_univariate": {"series", "n_series", "n_failed",
    "method": {"f1", "cover"}, "zero_computed": {...}, "paper_default": {method: {...}}}}``;
    a mean is ``None`` where a value is missing (ours: over the series that succeeded).
    """
    summary: dict[str, dict[str, Any]] = {}
    for label, chosen in (
        ("paper_subset", [r for r in results if r.in_mean]),
        ("all_univariate", list(results)),
    ):
        names = [r.name for r in chosen]
        ok = [r for r in chosen if r.error is None]
        summary[label] = {
            "series": names,
            "n_series": len(names),
            "n_failed": len(chosen) - len(ok),
            # over the series that succeeded; equal to the full mean when none failed
            "method": {"f1": _mean(r.f1 for r in ok), "cover": _mean(r.cover for r in ok)},
            "zero_computed": {
                "f1": _mean(r.zero_f1 for r in chosen),
                "cover": _mean(r.zero_cover for r in chosen),
            },
            "paper_default": {
                m: {metric: _mean(published[m][metric].get(n) for n in names) for metric in ("f1", "cover")}
                for m in PAPER_METHODS
            },
        }
    return summary


# ---------------------------------------------------------------- report


def _fmt(x: float | None, width: int = 6) -> str:
    return f"{'—':>{width}}" if x is None else f"{x:{width}.3f}"


def format_report(
    method_label: str,
    results: Sequence[SeriesResult],
    summary: Mapping[str, Mapping[str, Any]],
    published: Mapping[str, Mapping[str, Mapping[str, float | None]]],
) -> str:
    """The per-series table and the comparison of means, as text."""
    lines = [
        f"TCPD univariate series scored with F1 (margin {DEFAULT_MARGIN}) and Cover; "
        f"predictions: {method_label}",
        "",
        f"{'series':<20} {'n':>5} {'#pred':>5} {'F1':>6} {'Cover':>6} {'secs':>7}"
        f"   {'binseg F1':>9} {'Cover':>6}  (paper)",
    ]
    for r in results:
        name = r.name if r.in_mean else f"{r.name}*"
        secs = "—" if r.seconds is None else f"{r.seconds:.2f}"
        npred = "—" if r.error else str(len(r.predicted))
        lines.append(
            f"{name:<20} {r.n_obs:>5} {npred:>5} {_fmt(r.f1)} {_fmt(r.cover)} {secs:>7}"
            f"   {_fmt(published['binseg']['f1'].get(r.name), 9)}"
            f" {_fmt(published['binseg']['cover'].get(r.name))}"
        )
    lines.append("* not in the paper's averages (synthetic quality-control series, missing values)")
    lines.append("secs: time to predict one series (for analyze: the process's wall time, start-up included)")
    failed = [r for r in results if r.error]
    for r in failed:
        lines.append(f"FAILED {r.name}: {r.error}")

    sub = summary["paper_subset"]
    n_ok = sub["n_series"] - sub["n_failed"]
    lines += [
        "",
        f"Mean over the {sub['n_series']} series of the paper's averaging subset run here"
        + (
            f" ({sub['n_failed']} FAILED: ours is over the other {n_ok}, the rest over all)"
            if sub["n_failed"]
            else ""
        )
        + ":",
        f"  {'':<34} {'F1':>6} {'Cover':>6}",
        f"  {method_label:<34} {_fmt(sub['method']['f1'])} {_fmt(sub['method']['cover'])}",
        f"  {'zero (computed by this code)':<34} {_fmt(sub['zero_computed']['f1'])}"
        f" {_fmt(sub['zero_computed']['cover'])}",
    ]
    for m in PAPER_METHODS:
        paper = sub["paper_default"][m]
        lines.append(f"  {f'{m} (paper, Default)':<34} {_fmt(paper['f1'])} {_fmt(paper['cover'])}")
    allu = summary["all_univariate"]
    lines.append(
        f"Mean over all {allu['n_series']} univariate series: {method_label} "
        f"F1 {_fmt(allu['method']['f1'], 0)} Cover {_fmt(allu['method']['cover'], 0)}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tcpd",
        description="Score phasewatch analyze's change points on TCPD (F1 margin 5, Cover).",
    )
    parser.add_argument(
        "--tcpd",
        type=Path,
        default=DEFAULT_TCPD_DIR,
        metavar="DIR",
        help=f"TCPD folder with annotations.json and data/ (default: {DEFAULT_TCPD_DIR})",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all numbers to OUT")
    parser.add_argument(
        "--jobs", type=int, default=2, metavar="N", help="analyze processes at once (default 2)"
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="phasewatch",
        help="phasewatch (run analyze, the default) or an in-process reference baseline",
    )
    parser.add_argument(
        "--cmd",
        metavar="CMD",
        help="analyze command instead of 'phasewatch analyze' ({file} = the log; "
        "otherwise 'FILE --json' is appended)",
    )
    parser.add_argument("--series", action="append", metavar="NAME", help="only this series (repeatable)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, metavar="S", help="per-series limit (default 600)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.cmd is not None and args.method != "phasewatch":
        parser.error("--cmd only applies to --method phasewatch")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if a series failed, 2 on a usage or setup error."""
    args = parse_args(argv)
    try:
        series, skipped = load_tcpd(args.tcpd)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.series:
        unknown = sorted(set(args.series) - {s.name for s in series})
        if unknown:
            print(f"error: unknown or multivariate series: {', '.join(unknown)}", file=sys.stderr)
            return 2
        series = [s for s in series if s.name in set(args.series)]

    if args.method == "phasewatch":
        try:
            cmd = shlex.split(args.cmd) if args.cmd else default_analyze_command()
        except BenchmarkError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        predict = analyze_predictor(cmd, args.timeout)
        label = "phasewatch" if args.cmd is None else "phasewatch (--cmd)"
        jobs = args.jobs
    elif args.method == "zero":
        cmd, predict, label, jobs = [], zero_predictor, "zero (no change points)", 1
    else:
        cmd, predict, jobs = [], ruptures_predictor(args.method), 1
        label = f"ruptures {args.method} (reference)"

    published = load_published()
    started = time.perf_counter()
    results = run_benchmark(series, predict, jobs=jobs)
    wall = time.perf_counter() - started
    summary = summarise(results, published)
    print(format_report(label, results, summary, published))
    if cmd:
        print(f"Command: {shlex.join(build_command(cmd, Path('FILE')))}")
    print(f"Skipped (multivariate): {', '.join(skipped) or 'none'}; wall time {wall:.1f} s")

    if args.json:
        doc = {
            "config": {
                "method": args.method,
                "command": cmd,
                "tcpd_dir": str(args.tcpd),
                "margin": DEFAULT_MARGIN,
                "match_order": "benchmark",
                "jobs": jobs,
                "child_env": CHILD_ENV if args.method == "phasewatch" else {},
                "skipped_multivariate": skipped,
                "wall_seconds": wall,
            },
            "series": [asdict(r) for r in results],
            "summary": summary,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
