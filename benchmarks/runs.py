"""Score phasewatch's phases and alerts against labelled training runs.

Runs ``phasewatch analyze FILE --json`` (the public, offline path, default
configuration) on every ``<name>.jsonl`` that has a ``<name>.labels.json``
beside it (the format of ``../shared/runs`` and of ``examples/make_runs.py``)
and compares events and segments with the labels:

* grokking (runs with ``is_grokking``): onset recall (a ``GROKKING_ONSET``),
  onset error ``|event step - label onset| / (grokking_step - onset)``;
  false grokking alarms: a ``GROKKING_ONSET`` on a run that does not grok;
* early warning: a ``HIDDEN_PROGRESS`` detected before the label onset on a
  grokking run, and its lead in steps; any ``HIDDEN_PROGRESS`` on a run that
  does not grok is a false warning;
* collapse (``sustained_collapse`` and ``divergence_nonfinite``): a
  ``COLLAPSE_ONSET`` located within 5 log lines of the label, and the delay
  ``detected_at_step - label``; a ``COLLAPSE_ONSET`` on any other run is false;
* spikes (``transient_spike``): a ``LOSS_SPIKE`` within 5 lines of the label;
* detection lag ``detected_at_step - step`` per event kind;
* per-step phase agreement on grokking runs (``memorisation`` counts as
  ``instability``).

Usage (from the repository root)::

    python -m benchmarks.runs                          # ../shared/runs
    python -m benchmarks.runs --runs /path/to/heldout --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = REPO.parent / "shared" / "runs"
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
COLLAPSES = ("sustained_collapse", "divergence_nonfinite")
WITHIN_LINES = 5


@dataclass
class RunScore:
    name: str
    scenario: str
    grokking: bool
    seconds: float
    onset_found: bool | None = None
    onset_error: float | None = None
    false_grokking: bool = False
    warning_lead: int | None = None  # steps before the label onset; None: no warning in time
    false_warning: bool = False
    collapse_found: bool | None = None
    collapse_delay: int | None = None
    false_collapse: bool = False
    spike_found: bool | None = None
    phase_agreement: float | None = None
    lags: dict[str, list[int]] = field(default_factory=dict)


def label_phase(phases: list, step: int) -> str | None:
    for start, end, phase in phases:
        if start <= step < end:
            return "instability" if phase == "memorisation" else phase
    return None


def our_phase(segments: list[dict], step: int) -> str | None:
    for seg in segments:
        if seg["start_step"] <= step < seg["end_step"]:
            return seg["phase"]
    return None


def score_run(log: Path, labels: dict, doc: dict, seconds: float) -> RunScore:
    events = doc["events"]
    by_kind: dict[str, list[dict]] = {}
    for event in events:
        by_kind.setdefault(event["kind"], []).append(event)
    grokking = bool(labels.get("is_grokking"))
    score = RunScore(log.stem, labels.get("scenario", ""), grokking, seconds)
    steps = sorted({s for s in _logged_steps(log)})
    gap = (steps[1] - steps[0]) if len(steps) > 1 else 1
    onsets = by_kind.get("GROKKING_ONSET", [])
    warnings = by_kind.get("HIDDEN_PROGRESS", [])
    if grokking:
        onset, grokked = labels["grokking_onset_step"], labels["grokking_step"]
        score.onset_found = bool(onsets)
        if onsets:
            score.onset_error = abs(onsets[0]["step"] - onset) / max(grokked - onset, 1)
        early = [w for w in warnings if w["detected_at_step"] < onset]
        score.warning_lead = onset - early[0]["step"] if early else None
        agree = [our_phase(doc["segments"], s) == label_phase(labels["phases"], s) for s in steps]
        score.phase_agreement = sum(agree) / len(agree) if agree else None
    else:
        score.false_grokking = bool(onsets)
        score.false_warning = bool(warnings)
    kind = labels.get("collapse_kind")
    collapses = by_kind.get("COLLAPSE_ONSET", [])
    if kind in COLLAPSES:
        near = [c for c in collapses if abs(c["step"] - labels["collapse_step"]) <= WITHIN_LINES * gap]
        score.collapse_found = bool(near)
        if near:
            score.collapse_delay = near[0]["detected_at_step"] - labels["collapse_step"]
    else:
        score.false_collapse = bool(collapses)
    if kind == "transient_spike":
        spikes = by_kind.get("LOSS_SPIKE", [])
        label = labels["collapse_step"]
        score.spike_found = any(abs(s["step"] - label) <= WITHIN_LINES * gap for s in spikes)
    for event in events:
        if event["kind"] in ("CHANGE_POINT", "PLATEAU_START", "PLATEAU_END"):
            continue
        score.lags.setdefault(event["kind"], []).append(event["detected_at_step"] - event["step"])
    return score


def _logged_steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]


def analyze(log: Path, command: Sequence[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [*command, str(log), "--json"], capture_output=True, text=True, check=False,
        env={**os.environ, **CHILD_ENV},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{log}: analyze failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout), time.perf_counter() - started


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(scores: list[RunScore]) -> dict:
    grok = [s for s in scores if s.grokking]
    nogrok = [s for s in scores if not s.grokking]
    collapse = [s for s in scores if s.collapse_found is not None]
    healthy = [s for s in scores if s.collapse_found is None]
    spikes = [s for s in scores if s.spike_found is not None]
    agreement = [s.phase_agreement for s in grok if s.phase_agreement is not None]
    delays = [s.collapse_delay for s in collapse if s.collapse_delay is not None]
    lags: dict[str, list[int]] = {}
    for s in scores:
        for kind, values in s.lags.items():
            lags.setdefault(kind, []).extend(values)
    return {
        "runs": len(scores),
        "grokking_runs": len(grok),
        "grokking_recall": _frac([s.onset_found for s in grok]),
        "median_onset_error": _median([s.onset_error for s in grok if s.onset_error is not None]),
        "false_grokking_alarms": sum(s.false_grokking for s in nogrok),
        "non_grokking_runs": len(nogrok),
        "early_warning_rate": _frac([s.warning_lead is not None for s in grok]),
        "median_warning_lead_steps": _median([s.warning_lead for s in grok if s.warning_lead is not None]),
        "false_warnings": sum(s.false_warning for s in nogrok),
        "collapse_runs": len(collapse),
        "collapse_recall": _frac([s.collapse_found for s in collapse]),
        "median_collapse_delay_steps": _median(delays),
        "false_collapses": sum(s.false_collapse for s in healthy),
        "healthy_runs": len(healthy),
        "spike_runs": len(spikes),
        "spike_recall": _frac([s.spike_found for s in spikes]),
        "median_phase_agreement": _median(agreement),
        "min_phase_agreement": min(agreement, default=None),
        "detection_lag_median_steps": {k: _median(v) for k, v in sorted(lags.items())},
    }


def _frac(flags: list[bool | None]) -> float | None:
    flags = [f for f in flags if f is not None]
    return sum(flags) / len(flags) if flags else None


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_report(scores: list[RunScore], summary: dict) -> str:
    header = ("run", "scenario", "grok", "onset", "err", "lead", "falseG", "falseW", "collapse", "delay",
              "falseC", "spike", "agree", "secs")
    rows = [header]
    for s in scores:
        rows.append((s.name, s.scenario, _fmt(s.grokking), _fmt(s.onset_found), _fmt(s.onset_error),
                     _fmt(s.warning_lead), _fmt(s.false_grokking), _fmt(s.false_warning),
                     _fmt(s.collapse_found), _fmt(s.collapse_delay), _fmt(s.false_collapse),
                     _fmt(s.spike_found), _fmt(s.phase_agreement), f"{s.seconds:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines += [f"{k:32s} {_fmt(v) if not isinstance(v, dict) else json.dumps(v)}" for k, v in summary.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, action="append", help=f"folder of runs (default {DEFAULT_RUNS})")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write per-run scores and the summary here")
    parser.add_argument("--cmd", default=f"{sys.executable} -m detector.cli analyze",
                        help="the analyze command (FILE --json is appended)")
    args = parser.parse_args(argv)
    folders = args.runs or [DEFAULT_RUNS]
    logs = sorted(p for folder in folders for p in folder.glob("*.jsonl")
                  if p.with_name(p.stem + ".labels.json").exists())
    if not logs:
        print(f"no labelled runs in {', '.join(map(str, folders))}", file=sys.stderr)
        return 2
    command = args.cmd.split()

    def one(log: Path) -> RunScore:
        doc, seconds = analyze(log, command)
        labels = json.loads(log.with_name(log.stem + ".labels.json").read_text())
        return score_run(log, labels, doc, seconds)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        scores = list(pool.map(one, logs))
    summary = summarise(scores)
    print(format_report(scores, summary))
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(s) for s in scores], "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
