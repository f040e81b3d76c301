"""Score phasewatch's phases and alerts against labelled training runs.

Runs ``phasewatch analyze FILE --json`` (the public, offline path, default
configuration) on every ``<name>.jsonl`` that has a ``<name>.labels.json``
beside it, in each corpus folder (default: ``../shared/runs``,
``../shared/real_runs`` and ``benchmarks/generated``, those that exist), and
scores events and segments against the labels. Every criterion is computed
only on the runs whose labels define it (any label field may be missing).

Notation: ``L`` is a run's logging interval (label ``log_every``, else the
median step gap); an event's *step* is where it is located, ``detected_at`` when
it was raised. A ``COLLAPSE_ONSET``'s scope is its evidence ``scope``
(``training`` or ``generalization``); one without a scope counts as
``training``. A ``COLLAPSE_ONSET`` is *ended* when a later ``COLLAPSE_END`` of
the same scope closes it (onsets and ends of one scope are paired in step
order, an end closing the newest open onset). The *tolerance* of a run is
``max(5 L, 5% of its length in steps)``.

1. Grokking: recall = runs with ``is_grokking`` true that have any
   ``GROKKING_ONSET``; false grokking = runs with ``is_grokking`` false that have
   one. Onset error ``|first onset - label onset| / (grokking_step - onset)``.
2. ``HIDDEN_PROGRESS``: early = a grokking run with one whose ``detected_at`` <
   ``grokking_onset_step`` (lead = label onset - its step); false = a run with
   ``is_grokking`` false that has any, except a run whose log ends while its
   labelled onset is under way (``ends_early`` with a ``grokking_onset_step``:
   the warning came true, whether it groks is past the log).
3. Sustained collapse: the label step is ``collapse_step`` when
   ``collapse_kind`` is ``sustained_collapse`` (and began at least the labels'
   ``RECOVER_WINDOW`` before the log's end: they could not see a later one
   recover) or ``divergence_nonfinite``, else,
   when ``train_collapse_kind`` is ``sustained``, the first step of the last
   train-collapse episode, else, on a run that never memorised (no
   ``memorisation_step``: loss-only or never fitting), the first step of the last
   labelled spike when it is unrecovered, lasts to the end of the log and began
   at least the labels' ``RECOVER_WINDOW`` before it (a spike the log cut short
   may still have been recovering). Found = a training-scope ``COLLAPSE_ONSET`` located
   within the tolerance of it, or from the start of an unrecovered labelled
   spike that holds it, or of the unbroken chain of unrecovered spikes before
   that one (the labels' own excursion leading into the collapse: a loss that
   rises from step 80 and is non-finite from 160); delay = its
   ``detected_at`` - label step (median over found runs).
4. Standing: training-scope ``COLLAPSE_ONSET`` events that are not ended and
   are not excused by a sustained collapse whose start (as in 3) is <= their
   step + tolerance; counted per run (should be 0). False collapses: training-scope
   ``COLLAPSE_ONSET`` events on a *quiet* run (labels define collapses or spikes,
   and there is no ``collapse_step``, no train-collapse episode, no ``spikes``
   and no ``injected_spikes`` entry).
5. Spikes: windows from ONE source per run: ``spikes`` entries with
   ``recovered`` true, each joined with the unbroken chain of unrecovered ones
   before it (high again within the labels' recovery window: one excursion the
   1.5x bound cut into fragments), with the chain's largest ``peak_factor``
   (>= 2 for recall, >= 1.5 reported separately), else recovered ``train_collapse_episodes``, else
   ``collapse_kind == transient_spike`` ([collapse_step,
   collapse_recovered_step]). Found = a ``LOSS_SPIKE`` whose excursion (its
   step to step + its evidence ``duration_steps``) overlaps [first - 2 L, last +
   2 L], or a training-scope collapse open during that window and ended by
   ``COLLAPSE_END`` (a burst of excursions called one collapse that recovered;
   a slow recovery that the labels cut into fragments at their bound, called one
   spike).
6. Generalisation collapse: ``generalization_collapse_episodes`` with last -
   first >= 2 L. Test-only (no train-collapse episode, nor the sustained
   collapse of 3 from its start on, overlaps [first, last]):
   found = a generalization-scope collapse open (from its ``COLLAPSE_ONSET`` to
   its ``COLLAPSE_END``, or the end of the run) at some step of [first - 2 L,
   last + 2 L]: the detector says "generalisation has collapsed" during the
   flagged episode (it may flag a 0.05 fall before the authors' 0.90 line); with
   train: found = a collapse of any scope open in that window.
7. Event economy: per series, CHANGE_POINT + PLATEAU_START + PLATEAU_END per 100
   logged lines of the run ("rate"); the max over series and the number of
   series above 1. Stationary: the same counted only over the stationary
   stretch: labelled ``stabilization`` phases when the labels have ``phases``,
   else [grokking_step + 2000, end] on grokking runs; minus [first - 5 L, last +
   20 L] around every collapse episode, spike and labelled collapse; scored when
   it holds >= 50 lines; events located within 2 L of a stretch's start are
   the line that begins it and are not counted; the rate is per 100 lines of
   the stretch, or per the stretch if it is shorter (one event in a stretch of
   fewer than 100 lines is within the bound). Brackets: pairs of consecutive CHANGE_POINTs of one
   series located <= 2 L apart (a single-line outlier cut out twice).
8. Cadence (runs with ``variant_of``): per base, the reference is the
   ``<base>_c1`` run, else the finest ``cadence``; each other member must have,
   for each of GROKKING_ONSET, COLLAPSE_ONSET/END (per scope), LOSS_SPIKE,
   HIDDEN_PROGRESS and PHASE_CHANGE, the same count, and the i-th events located
   within max(cadence_a, cadence_b) steps of each other; LOSS_SPIKEs at a
   labelled spike that the other member's labels lack (it fell between two of
   its lines) are left out, and so is a LOSS_SPIKE whose excursion (its step
   to step + its ``duration_steps``) holds no line of the other member's log
   and that log has no LOSS_SPIKE within the tolerance (a spike the training
   process made itself, unlabelled); likewise a collapse that ended within fewer
   than 3 lines of the other log (criterion 6's shortest episode) that the
   other lacks: its onset, end and the PHASE_CHANGEs at them. Pass/fail per
   base and its worst mismatch (a count mismatch beats any step mismatch).
9. Loss-only (``loss_only`` true): premature = a ``stabilization`` segment
   starting before ``settled_step`` - 2 L. Streamed vs final (every run with
   PHASE_CHANGE events): the streamed phase at a logged step is the ``to`` of
   the last PHASE_CHANGE located at or before it (before the first: its
   ``from``); mismatch = logged lines where it differs from the final segment's.
10. Phase agreement: share of logged steps of a grokking run with ``phases``
   whose segment phase equals the label's (``memorisation`` = ``instability``).
   Seconds per run (the analyze subprocess, wall) and µs per point (points:
   finite values in the file other than ``step``).

Usage (from the repository root)::

    python -m benchmarks.runs                          # every default corpus that exists
    python -m benchmarks.runs --runs /path/to/heldout --json out.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPORA = (REPO.parent / "shared" / "runs", REPO.parent / "shared" / "real_runs",
                   REPO / "benchmarks" / "generated")
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SUSTAINED_KINDS = ("sustained_collapse", "divergence_nonfinite")
ECONOMY_KINDS = ("CHANGE_POINT", "PLATEAU_START", "PLATEAU_END")
CADENCE_KINDS = ("GROKKING_ONSET", "COLLAPSE_ONSET", "COLLAPSE_END", "LOSS_SPIKE", "HIDDEN_PROGRESS",
                 "PHASE_CHANGE")
GEN_MIN_LINES = 3  # criterion 6's shortest generalisation-collapse episode: last - first >= 2 L
SPIKE_LINES = 2  # a spike/episode window is widened by this many logging intervals each side
MIN_STATIONARY_LINES = 50
ECONOMY_LIMIT = 1.0  # events per 100 lines per series


# --- small helpers ------------------------------------------------------------


def log_interval(labels: dict, steps: Sequence[int]) -> int:
    every = labels.get("log_every")
    if isinstance(every, int | float) and every > 0:
        return int(every)
    gaps = [b - a for a, b in zip(steps, steps[1:], strict=False) if b > a]
    return int(statistics.median(gaps)) if gaps else 1


def tolerance(steps: Sequence[int], every: int) -> float:
    length = (steps[-1] - steps[0]) if steps else 0
    return max(5 * every, 0.05 * length)


def scope(event: dict) -> str:
    """A COLLAPSE_* event's scope; none given counts as training."""
    value = (event.get("evidence") or {}).get("scope")
    return value if value in ("training", "generalization") else "training"


def collapse_pairs(events: Sequence[dict]) -> list[tuple[dict, dict | None]]:
    """Every COLLAPSE_ONSET with the COLLAPSE_END that closes it (or None), per scope in step order."""
    pairs: list[tuple[dict, dict | None]] = []
    by_scope: dict[str, list[dict]] = {}
    for e in events:
        if e["kind"] in ("COLLAPSE_ONSET", "COLLAPSE_END"):
            by_scope.setdefault(scope(e), []).append(e)
    for items in by_scope.values():
        items.sort(key=lambda e: (e["step"], e["kind"] == "COLLAPSE_END", e.get("detected_at_step", 0)))
        open_: list[dict] = []
        for e in items:
            if e["kind"] == "COLLAPSE_ONSET":
                open_.append(e)
            elif open_:
                pairs.append((open_.pop(), e))
        pairs += [(e, None) for e in open_]
    pairs.sort(key=lambda p: p[0]["step"])
    return pairs


def _num(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def cadence_of(labels: dict, steps: Sequence[int] = ()) -> int:
    """A run's logging cadence in steps: ``cadence`` (a number, or the largest of a dict's), else L."""
    raw = labels.get("cadence")
    if isinstance(raw, dict):
        values = [v for v in map(_num, raw.values()) if v]
        raw = max(values) if values else None
    value = _num(raw)
    return int(value) if value and value > 0 else log_interval(labels, steps)


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


def _episodes(labels: dict, key: str) -> list[tuple[int, int, bool]]:
    out = []
    for item in labels.get(key) or []:
        if isinstance(item, list | tuple) and len(item) >= 2 and item[0] is not None:
            last = item[1] if item[1] is not None else item[0]
            out.append((int(item[0]), int(last), bool(item[2]) if len(item) > 2 else True))
    return out


def _spikes(labels: dict, key: str = "spikes") -> list[tuple[int, int, float, bool]]:
    out = []
    for item in labels.get(key) or []:
        if isinstance(item, dict):
            item = [item.get("first_step", item.get("step")), item.get("last_step"),
                    item.get("peak_factor", item.get("factor")), item.get("recovered", True)]
        if isinstance(item, list | tuple) and item and item[0] is not None:
            last = item[1] if len(item) > 1 and item[1] is not None else item[0]
            factor = _num(item[2]) if len(item) > 2 else None
            recovered = bool(item[3]) if len(item) > 3 else True
            out.append((int(item[0]), int(last), factor if factor is not None else math.inf, recovered))
    return out


# --- label-derived quantities -------------------------------------------------------


def sustained_step(labels: dict) -> int | None:
    """The step at which the training collapse that never recovers starts (criterion 3)."""
    if labels.get("collapse_kind") in SUSTAINED_KINDS and labels.get("collapse_step") is not None:
        # A sustained_collapse that began less than the labels' recovery window before
        # the log's end is one the labels could not see recover (their rule needs the
        # whole window inside the log): undecided, not scored, as below.
        window = labels.get("label_rules", {}).get("RECOVER_WINDOW", 0)
        last = labels.get("last_step")
        if labels["collapse_kind"] == "sustained_collapse" and last is not None \
                and int(last) - int(labels["collapse_step"]) < window:
            return None
        return int(labels["collapse_step"])
    if labels.get("train_collapse_kind") == "sustained":
        episodes = _episodes(labels, "train_collapse_episodes")
        if episodes:
            return episodes[-1][0]
    # Loss-only or never-memorising runs: a loss excursion that never recovers and
    # lasts to the end of the log (generated ``spikes``). A run that memorised has
    # its collapses labelled (``collapse_kind``, episodes); an excursion the labels
    # leave there uncalled is not one (a slingshot from a 2e-7 loss that decays
    # for 1 000 steps while held-out accuracy climbs to 1.0 never gets back
    # within 1.5x of its floor).
    # Only when the log ran on for the labels' recovery window after it began: an
    # excursion still coming down when the log ends (a slingshot 180 steps before
    # the end, against a 200-step window) was not given the chance to recover.
    spikes = _spikes(labels)
    if labels.get("memorisation_step") is not None:
        return None
    if spikes and not spikes[-1][3] and labels.get("last_step") in (None, spikes[-1][1]):
        window = labels.get("label_rules", {}).get("RECOVER_WINDOW", 0)
        if spikes[-1][1] - spikes[-1][0] >= window:
            return int(spikes[-1][0])
    return None


def sustained_start(labels: dict, label: int) -> int:
    """Where the labels say the excursion that becomes the sustained collapse at
    ``label`` began: the first step of an unrecovered labelled spike that holds
    ``label`` (a loss that starts rising at 80 and is non-finite from 160), or of
    the unbroken chain of unrecovered spikes before it (each rose again before it
    had recovered: one excursion that the labels cut at their bound), else
    ``label`` itself."""
    spikes = _spikes(labels)
    for i, (first, last, _, recovered) in enumerate(spikes):
        if not recovered and first <= label <= last:
            while i > 0 and not spikes[i - 1][3]:
                i -= 1
            return min(spikes[i][0], label)
    return label


def _spike_excursions(labels: dict) -> list[tuple[int, int, float]]:
    """The recovered excursions of ``spikes`` as [first, last, peak factor]: an
    unbroken chain of unrecovered spikes (each high again within the labels'
    recovery window, so never back in between) and the recovered one that ends it
    are one excursion, which a noisy per-step loss crossing the 1.5x bound on its
    way down cuts into fragments; a chain that never recovers is not a spike."""
    out, chain = [], None
    for first, last, factor, recovered in _spikes(labels):
        start, peak = (first, factor) if chain is None else (chain[0], max(chain[1], factor))
        if recovered:
            out.append((start, last, peak))
            chain = None
        else:
            chain = (start, peak)
    return out


def spike_windows(labels: dict, min_factor: float = 2.0) -> list[tuple[int, int]] | None:
    """Recovered excursions [first, last] to find (criterion 5); None when the labels define none."""
    if "spikes" in labels:
        return [(a, b) for a, b, f in _spike_excursions(labels) if f >= min_factor]
    if "train_collapse_episodes" in labels:
        return [(a, b) for a, b, rec in _episodes(labels, "train_collapse_episodes") if rec]
    if "collapse_kind" in labels:
        if labels["collapse_kind"] == "transient_spike" and labels.get("collapse_step") is not None:
            first = int(labels["collapse_step"])
            last = labels.get("collapse_recovered_step")
            return [(first, max(first, int(last)) if last is not None else first)]
        return []
    return None


def is_quiet(labels: dict) -> bool | None:
    """No training trouble at all (criterion 4's false collapses); None when the labels cannot say."""
    keys = ("collapse_kind", "collapse_step", "train_collapse_episodes", "spikes")
    if not any(k in labels for k in keys):
        return None
    return (labels.get("collapse_step") is None and not labels.get("train_collapse_episodes")
            and not labels.get("spikes") and not labels.get("injected_spikes"))


def trouble_windows(labels: dict, every: int) -> list[tuple[int, int]]:
    """Step ranges kept out of the stationary stretch: episodes, spikes and labelled collapses."""
    spans = [(a, b) for a, b, _ in _episodes(labels, "train_collapse_episodes")]
    spans += [(a, b) for a, b, _ in _episodes(labels, "generalization_collapse_episodes")]
    spans += [(a, b) for a, b, _, _ in _spikes(labels)]
    spans += [(a, b) for a, b, _, _ in _spikes(labels, "injected_spikes")]
    if labels.get("collapse_step") is not None:
        first = int(labels["collapse_step"])
        last = labels.get("collapse_recovered_step")
        spans.append((first, int(last) if last is not None else math.inf))  # type: ignore[arg-type]
    return [(a - 5 * every, b + 20 * every) for a, b in spans]


def stationary_ranges(labels: dict, steps: Sequence[int]) -> list[tuple[float, float]] | None:
    """[start, end) ranges of the long stationary stretch (criterion 7), before exclusions."""
    if labels.get("phases"):
        return [(s, e) for s, e, p in labels["phases"] if p == "stabilization"]
    if labels.get("is_grokking") and labels.get("grokking_step") is not None and steps:
        return [(labels["grokking_step"] + 2000, steps[-1] + 1)]
    return None


# --- per-run score ----------------------------------------------------------------


@dataclass
class RunScore:
    name: str
    corpus: str
    scenario: str = ""
    lines: int = 0
    log_every: int = 1
    points: int = 0
    seconds: float = 0.0
    us_per_point: float | None = None
    # 1, 2
    is_grokking: bool | None = None
    onset_found: bool | None = None
    onset_error: float | None = None
    false_grokking: bool | None = None
    warning_early: bool | None = None
    warning_lead: int | None = None
    false_warning: bool | None = None
    # 3, 4
    sustained_step: int | None = None
    sustained_found: bool | None = None
    sustained_delay: int | None = None
    standing: int = 0
    standing_steps: list[int] = field(default_factory=list)
    false_collapses: int | None = None
    # 5, 6
    spikes: int | None = None
    spikes_found: int | None = None
    spikes15: int | None = None
    spikes15_found: int | None = None
    gen_episodes: int | None = None
    gen_found: int | None = None
    gen_train_episodes: int | None = None
    gen_train_found: int | None = None
    # 7
    economy_max: float = 0.0
    economy_max_series: str = ""
    economy_over: int = 0
    stationary_lines: int | None = None
    stationary_max: float | None = None
    stationary_over: int | None = None
    brackets: int = 0
    # 8 (membership only; scored across runs)
    variant_of: str | None = None
    cadence: int = 1
    spike_steps: list[int] = field(default_factory=list)  # labelled spikes' first steps
    # 9, 10
    loss_only: bool = False
    premature: bool | None = None
    stream_mismatch: int | None = None
    phase_agreement: float | None = None
    lags: dict[str, list[int]] = field(default_factory=dict)


def score_run(name: str, corpus: str, labels: dict, doc: dict, steps: Sequence[int],
              points: int = 0, seconds: float = 0.0) -> RunScore:
    """Score one run's analyze document against its labels (pure)."""
    events: list[dict] = doc.get("events", [])
    segments: list[dict] = doc.get("segments", [])
    steps = sorted(set(steps))
    every = log_interval(labels, steps)
    tol = tolerance(steps, every)
    s = RunScore(name, corpus, str(labels.get("scenario") or labels.get("regime") or ""), len(steps), every,
                 points, seconds, 1e6 * seconds / points if points else None)
    by_kind: dict[str, list[dict]] = {}
    for e in events:
        by_kind.setdefault(e["kind"], []).append(e)
    for kind in by_kind.values():
        kind.sort(key=lambda e: e["step"])
    _score_grokking(s, labels, by_kind)
    _score_collapses(s, labels, events, by_kind, tol)
    _score_generalisation(s, labels, events)
    _score_economy(s, labels, events, steps)
    s.variant_of = labels.get("variant_of")
    s.cadence = cadence_of(labels, steps)
    s.spike_steps = sorted(int(sp[0]) for sp in labels.get("spikes") or [])
    _score_phases(s, labels, by_kind, segments, steps)
    for e in events:
        if e["kind"] not in ECONOMY_KINDS and e.get("detected_at_step") is not None:
            s.lags.setdefault(e["kind"], []).append(e["detected_at_step"] - e["step"])
    return s


def _score_grokking(s: RunScore, labels: dict, by_kind: dict[str, list[dict]]) -> None:
    onsets = by_kind.get("GROKKING_ONSET", [])
    warnings = by_kind.get("HIDDEN_PROGRESS", [])
    grok = labels.get("is_grokking")
    s.is_grokking = None if grok is None else bool(grok)
    if grok:
        s.onset_found = bool(onsets)
        onset, grokked = labels.get("grokking_onset_step"), labels.get("grokking_step")
        if onsets and onset is not None and grokked is not None:
            s.onset_error = abs(onsets[0]["step"] - onset) / max(grokked - onset, 1)
        if onset is not None:
            early = [w for w in warnings if w["detected_at_step"] < onset]
            s.warning_early = bool(early)
            s.warning_lead = onset - early[0]["step"] if early else None
    elif grok is not None:
        s.false_grokking = bool(onsets)
        if not undecided(labels):
            s.false_warning = bool(warnings)


def undecided(labels: dict) -> bool:
    """The log stops while its labelled onset of generalisation is under way
    (``ends_early`` with a ``grokking_onset_step``): not grokking within the
    log, but a warning that generalisation is coming has come true."""
    return "ends_early" in (labels.get("kinds") or ()) and labels.get("grokking_onset_step") is not None


def _score_collapses(s: RunScore, labels: dict, events: list[dict], by_kind: dict[str, list[dict]],
                     tol: float) -> None:
    pairs = collapse_pairs(events)
    training = [(on, end) for on, end in pairs if scope(on) == "training"]
    label = sustained_step(labels)
    s.sustained_step = label
    start = None if label is None else sustained_start(labels, label)
    if label is not None and start is not None:
        # Within the tolerance of the label, or located where the labels' own
        # unrecovered excursion that led into it began.
        near = [on for on, _ in training if start - tol <= on["step"] <= label + tol]
        s.sustained_found = bool(near)
        if near:
            s.sustained_delay = near[0]["detected_at_step"] - label
    standing = [on for on, end in training
                if end is None and not (start is not None and start <= on["step"] + tol)]
    s.standing = len(standing)
    s.standing_steps = [on["step"] for on in standing]
    if is_quiet(labels):
        s.false_collapses = len(training)
    every = s.log_every
    # A spike is found by a LOSS_SPIKE whose excursion (its step to step +
    # duration_steps) overlaps its window, or by a training collapse that was open
    # during it and ended (a burst of excursions that the detector calls one
    # collapse and its recovery). The labels cut one slow recovery into fragments
    # wherever it dips under their 1.5x bound; one excursion covering them found them.
    spans = [(e["step"], e["step"] + _duration(e)) for e in by_kind.get("LOSS_SPIKE", [])]
    spans += [(on["step"], end["step"]) for on, end in training if end is not None]
    for attr, factor in (("spikes", 2.0), ("spikes15", 1.5)):
        windows = spike_windows(labels, factor)
        if windows is None or (attr == "spikes15" and "spikes" not in labels):
            continue
        hits = sum(any(x <= b + SPIKE_LINES * every and a - SPIKE_LINES * every <= y for x, y in spans)
                   for a, b in windows)
        setattr(s, attr, len(windows))
        setattr(s, attr + "_found", hits)


def _duration(event: dict) -> int:
    """A LOSS_SPIKE's duration in steps (its evidence ``duration_steps``; 0 without)."""
    try:
        return max(0, int(event.get("evidence", {}).get("duration_steps", 0)))
    except (TypeError, ValueError):
        return 0


def _overlaps(a: int, b: int, spans: Iterable[tuple[int, int, bool]]) -> bool:
    return any(x <= b and a <= y for x, y, _ in spans)


def _score_generalisation(s: RunScore, labels: dict, events: list[dict]) -> None:
    if "generalization_collapse_episodes" not in labels:
        return
    every = s.log_every
    train = _episodes(labels, "train_collapse_episodes")
    # A sustained training collapse (a divergence) is training falling too, also
    # where the authors' train flag was never armed (training accuracy never 0.999).
    label = sustained_step(labels)
    if label is not None:
        train.append((sustained_start(labels, label), math.inf, False))
    # A collapse is open from its onset to its end (or the end of the run).
    open_spans = [(onset["step"], math.inf if end is None else end["step"], scope(onset))
                  for onset, end in collapse_pairs(events)]
    s.gen_episodes = s.gen_found = s.gen_train_episodes = s.gen_train_found = 0
    for a, b, _ in _episodes(labels, "generalization_collapse_episodes"):
        if b - a < 2 * every:
            continue
        lo, hi = a - SPIKE_LINES * every, b + SPIKE_LINES * every
        if _overlaps(a, b, train):
            s.gen_train_episodes += 1
            s.gen_train_found += any(x <= hi and lo <= y for x, y, _ in open_spans)
        else:
            s.gen_episodes += 1
            s.gen_found += any(x <= hi and lo <= y and sc == "generalization" for x, y, sc in open_spans)


def _score_economy(s: RunScore, labels: dict, events: list[dict], steps: Sequence[int]) -> None:
    every = s.log_every
    noisy = [e for e in events if e["kind"] in ECONOMY_KINDS]
    per_series: dict[str, int] = {}
    for e in noisy:
        per_series[e["series"]] = per_series.get(e["series"], 0) + 1
    if steps:
        rates = {k: 100.0 * v / len(steps) for k, v in per_series.items()}
        if rates:
            s.economy_max_series, s.economy_max = max(rates.items(), key=lambda kv: kv[1])
        s.economy_over = sum(r > ECONOMY_LIMIT for r in rates.values())
    cps: dict[str, list[int]] = {}
    for e in noisy:
        if e["kind"] == "CHANGE_POINT":
            cps.setdefault(e["series"], []).append(e["step"])
    for located in cps.values():
        located.sort()
        s.brackets += sum(b - a <= SPIKE_LINES * every for a, b in zip(located, located[1:], strict=False))
    ranges = stationary_ranges(labels, steps)
    if ranges is None:
        return
    excluded = trouble_windows(labels, every)

    def inside(step: int) -> bool:
        return (any(a <= step < b for a, b in ranges)
                and not any(a <= step <= b for a, b in excluded))

    lines = sum(inside(t) for t in steps)
    if lines < MIN_STATIONARY_LINES:
        return
    # An event located where the stretch begins (within 2 L) is the line that
    # starts it (the plateau's start), not a line drawn inside it.
    starts = [a for a, _ in ranges]
    counts: dict[str, int] = {}
    for e in noisy:
        if inside(e["step"]) and not any(a <= e["step"] <= a + 2 * every for a in starts):
            counts[e["series"]] = counts.get(e["series"], 0) + 1
    # One event in a stretch shorter than 100 lines is within "one per 100 lines"
    # (counted over the stretch alone it would read as 1.2 per 100 at 81 lines).
    rates = [100.0 * v / max(lines, 100) for v in counts.values()]
    s.stationary_lines = lines
    s.stationary_max = max(rates, default=0.0)
    s.stationary_over = sum(r > ECONOMY_LIMIT for r in rates)


def streamed_mismatch(phase_changes: Sequence[dict], segments: Sequence[dict], steps: Sequence[int]) -> int:
    """Logged lines where the phase rebuilt from PHASE_CHANGE events differs from the final segments."""
    changes = sorted(phase_changes, key=lambda e: e["step"])
    first = changes[0].get("evidence", {}).get("from") if changes else None
    if first is None and segments:
        first = segments[0]["phase"]
    bad, k, current = 0, 0, first
    for t in steps:
        while k < len(changes) and changes[k]["step"] <= t:
            current = changes[k].get("evidence", {}).get("to") or changes[k].get("phase")
            k += 1
        final = our_phase(list(segments), t)
        bad += final is not None and final != current
    return bad


def _score_phases(s: RunScore, labels: dict, by_kind: dict[str, list[dict]], segments: list[dict],
                  steps: Sequence[int]) -> None:
    s.loss_only = bool(labels.get("loss_only"))
    settled = labels.get("settled_step")
    if s.loss_only and settled is not None:
        s.premature = any(seg["phase"] == "stabilization" and seg["start_step"] < settled - 2 * s.log_every
                          for seg in segments)
    changes = by_kind.get("PHASE_CHANGE", [])
    if changes:
        s.stream_mismatch = streamed_mismatch(changes, segments, steps)
    if labels.get("is_grokking") and labels.get("phases") and steps:
        agree = [our_phase(segments, t) == label_phase(labels["phases"], t) for t in steps]
        s.phase_agreement = sum(agree) / len(agree)


# --- cadence consistency (across runs) ---------------------------------------------


def _cadence_key(event: dict) -> str:
    return f"{event['kind']}/{scope(event)}" if event["kind"].startswith("COLLAPSE_") else event["kind"]


def collapses_between_lines(events: Sequence[dict], lines: Sequence[int], other: Sequence[dict] = (),
                            tol: float = 0, min_lines: int = GEN_MIN_LINES) -> list[tuple[int, int]]:
    """(onset, end) steps of the collapses in ``events`` that ended within fewer than
    ``min_lines`` of the sorted ``lines`` of another log (a seven-step dip of test
    accuracy is one line of a log of every 10: no episode there) and that the other
    log's events (``other``) lack (no COLLAPSE_ONSET of the scope within ``tol``)."""
    theirs = [(scope(e), e["step"]) for e in other if e["kind"] == "COLLAPSE_ONSET"]
    out = []
    for on, end in collapse_pairs(events):
        if end is None or any(sc == scope(on) and abs(st - on["step"]) <= tol for sc, st in theirs):
            continue
        if bisect.bisect_left(lines, end["step"]) - bisect.bisect_left(lines, on["step"]) < min_lines:
            out.append((on["step"], end["step"]))
    return out


def compare_cadence(ref: Sequence[dict], other: Sequence[dict], tol: float,
                    unseen: tuple[Sequence[int], Sequence[int]] = ((), ()),
                    brief: tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]] = ((), ()),
                    ) -> tuple[bool, float, str]:
    """(pass, badness, worst mismatch) of ``other``'s events against ``ref``'s.

    ``unseen``: labelled spikes of ``ref`` and of ``other`` that the other log does
    not hold (a one-step spike between two lines of a sparse log): LOSS_SPIKE
    events within ``tol`` of them are not compared. ``brief``: collapses of each
    (onset, end steps) too short for the other log to hold: their COLLAPSE_ONSET,
    COLLAPSE_END and the PHASE_CHANGEs into and out of them are not compared.
    Badness: inf for a count mismatch, else the worst located-step gap / tol (> 1 fails).
    """
    def groups(events: Sequence[dict], hidden: Sequence[int],
               episodes: Sequence[tuple[int, int]]) -> dict[str, list[int]]:
        ends = {step for episode in episodes for step in episode}
        out: dict[str, list[int]] = {}
        for e in events:
            if e["kind"] == "LOSS_SPIKE" and any(abs(e["step"] - h) <= tol for h in hidden):
                continue
            if e["kind"] in ("COLLAPSE_ONSET", "COLLAPSE_END", "PHASE_CHANGE") and e["step"] in ends:
                continue
            if e["kind"] in CADENCE_KINDS:
                out.setdefault(_cadence_key(e), []).append(e["step"])
        return {k: sorted(v) for k, v in out.items()}

    a, b = groups(ref, unseen[0], brief[0]), groups(other, unseen[1], brief[1])
    worst, text = 0.0, ""
    for key in sorted(set(a) | set(b)):
        xs, ys = a.get(key, []), b.get(key, [])
        if len(xs) != len(ys):
            return False, math.inf, f"{key} count {len(xs)} vs {len(ys)}"
        for x, y in zip(xs, ys, strict=True):
            bad = abs(x - y) / tol
            if bad > worst:
                worst, text = bad, f"{key} at {x} vs {y} (tol {tol:g})"
    return worst <= 1.0, worst, text


def spikes_between_lines(events: Sequence[dict], lines: Sequence[int], other: Sequence[dict] = (),
                         tol: float = 0) -> list[int]:
    """Steps of the LOSS_SPIKEs in ``events`` whose excursion (step to step +
    ``duration_steps``) holds none of the sorted ``lines`` of another log, which could
    not see them, and that the other log's events (``other``) lack within ``tol``
    (where it found one, it saw the spike's tail: they are compared)."""
    theirs = [e["step"] for e in other if e["kind"] == "LOSS_SPIKE"]
    out = []
    for e in events:
        if e["kind"] != "LOSS_SPIKE" or any(abs(e["step"] - x) <= tol for x in theirs):
            continue
        start, duration = e["step"], int(e.get("evidence", {}).get("duration_steps", 0) or 0)
        i = bisect.bisect_left(lines, start)
        if i == len(lines) or lines[i] >= start + max(duration, 1):
            out.append(start)
    return out


def score_cadence(runs: dict[str, tuple[RunScore, list[dict]]],
                  lines: dict[str, Sequence[int]] | None = None) -> dict[str, dict]:
    """Per base run: pass/fail of every cadence variant against the reference (criterion 8).
    ``lines``: each run's logged steps, sorted (where given, a spike between two lines
    of the other log is left out)."""
    lines = lines or {}
    groups: dict[str, list[str]] = {}
    for name, (score, _) in runs.items():
        if score.variant_of:
            groups.setdefault(score.variant_of, []).append(name)
    out = {}
    for base, members in sorted(groups.items()):
        if base in runs and base not in members:
            members.append(base)
        ref = f"{base}_c1" if f"{base}_c1" in members else min(members, key=lambda n: (runs[n][0].cadence, n))
        result = {"reference": ref, "variants": len(members) - 1, "passed": True, "worst": "", "failures": []}
        worst = -1.0
        for name in sorted(members):
            if name == ref:
                continue
            # ``_e5`` variants log held-out series every 5th line: their interval.
            tol = max(runs[ref][0].cadence * (5 if ref.endswith("_e5") else 1),
                      runs[name][0].cadence * (5 if name.endswith("_e5") else 1))
            mine, theirs = runs[ref][0].spike_steps, runs[name][0].spike_steps
            unseen = ([x for x in mine if all(abs(x - y) > tol for y in theirs)],
                      [y for y in theirs if all(abs(x - y) > tol for x in mine)])
            if ref in lines and name in lines:
                unseen[0].extend(spikes_between_lines(runs[ref][1], lines[name], runs[name][1], tol))
                unseen[1].extend(spikes_between_lines(runs[name][1], lines[ref], runs[ref][1], tol))
            brief = ((collapses_between_lines(runs[ref][1], lines[name], runs[name][1], tol),
                      collapses_between_lines(runs[name][1], lines[ref], runs[ref][1], tol))
                     if ref in lines and name in lines else ((), ()))
            ok, bad, text = compare_cadence(runs[ref][1], runs[name][1], tol, unseen, brief)
            if not ok:
                result["passed"] = False
                result["failures"].append(name)
            if bad > worst and text:
                worst, result["worst"] = bad, f"{name}: {text}"
        out[base] = result
    return out


# --- running ----------------------------------------------------------------------------


def read_run(log: Path) -> tuple[list[int], int]:
    """(logged steps, finite values other than ``step``)."""
    steps, points = [], 0
    with open(log, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            steps.append(row["step"])
            points += sum(1 for k, v in row.items() if k != "step" and _finite(v))
    return steps, points


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def analyze(log: Path, command: Sequence[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [*command, str(log), "--json"], capture_output=True, text=True, check=False,
        env={**os.environ, **CHILD_ENV},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{log}: analyze failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout), time.perf_counter() - started


# --- summaries and the table ------------------------------------------------------------


def _median(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _count(flags: Iterable[bool | None]) -> tuple[int, int]:
    flags = [f for f in flags if f is not None]
    return sum(flags), len(flags)


def _sum(values: Iterable[int | None]) -> int | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def summarise(scores: list[RunScore], cadence: dict[str, dict] | None = None) -> dict:
    grok = [s for s in scores if s.is_grokking]
    lags: dict[str, list[int]] = {}
    for s in scores:
        for kind, values in s.lags.items():
            lags.setdefault(kind, []).extend(values)
    stationary = [s for s in scores if s.stationary_max is not None]
    points = sum(s.points for s in scores)
    seconds = sum(s.seconds for s in scores)
    cadence = cadence or {}
    return {
        "runs": len(scores),
        "grokking_recall": _count(s.onset_found for s in scores),
        "false_grokking": _count(s.false_grokking for s in scores),
        "median_onset_error": _median(s.onset_error for s in grok),
        "hidden_progress_early": _count(s.warning_early for s in scores),
        "median_warning_lead_steps": _median(s.warning_lead for s in scores),
        "hidden_progress_false": _count(s.false_warning for s in scores),
        "sustained_recall": _count(s.sustained_found for s in scores),
        "median_sustained_delay_steps": _median(s.sustained_delay for s in scores),
        "standing": sum(s.standing for s in scores),
        "runs_with_standing": sum(s.standing > 0 for s in scores),
        "false_collapses": _sum(s.false_collapses for s in scores),
        "quiet_runs": sum(s.false_collapses is not None for s in scores),
        "spike_recall": (_sum(s.spikes_found for s in scores), _sum(s.spikes for s in scores)),
        "spike15_recall": (_sum(s.spikes15_found for s in scores), _sum(s.spikes15 for s in scores)),
        "gen_collapse_recall": (_sum(s.gen_found for s in scores), _sum(s.gen_episodes for s in scores)),
        "gen_with_train_recall": (_sum(s.gen_train_found for s in scores),
                                  _sum(s.gen_train_episodes for s in scores)),
        "economy_max_rate": max((s.economy_max for s in scores), default=None),
        "economy_pairs_over_1": sum(s.economy_over for s in scores),
        "stationary_runs": len(stationary),
        "stationary_max_rate": max((s.stationary_max for s in stationary), default=None),
        "stationary_pairs_over_1": sum(s.stationary_over or 0 for s in stationary),
        "brackets": sum(s.brackets for s in scores),
        "cadence_pass": (sum(r["passed"] for r in cadence.values()), len(cadence)),
        "premature_stabilization": _count(s.premature for s in scores),
        "stream_mismatch_runs": _count(None if s.stream_mismatch is None else s.stream_mismatch > 0
                                       for s in scores),
        "stream_mismatch_lines": _sum(s.stream_mismatch for s in scores),
        "median_phase_agreement": _median(s.phase_agreement for s in scores),
        "min_phase_agreement": min((s.phase_agreement for s in scores if s.phase_agreement is not None),
                                   default=None),
        "seconds": seconds,
        "median_seconds_per_run": _median(s.seconds for s in scores),
        "us_per_point": 1e6 * seconds / points if points else None,
        "points": points,
        "detection_lag_median_steps": {k: _median(v) for k, v in sorted(lags.items())},
    }


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "y" if value else "n"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, tuple | list) and len(value) == 2:
        return "-" if value[1] in (None, 0) else f"{value[0]}/{value[1]}"
    return str(value)


def _ratio(found: int | None, total: int | None) -> str:
    return "-" if not total else f"{found}/{total}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


RUN_COLUMNS = ("run", "corpus", "grok", "onset", "falseG", "HPearly", "HPfalse", "sust", "delay", "stand",
               "falseC", "spk", "spk1.5", "gen", "gen+tr", "econ", "stat", "brk", "prem", "stream", "agree",
               "secs", "us/pt")
SUMMARY_COLUMNS = ("corpus", "runs", "grok", "falseG", "HPearly", "HPfalse", "sust", "delay", "stand",
                   "falseC", "spk", "spk1.5", "gen", "gen+tr", "econMax", "econ>1", "statMax", "stat>1",
                   "brk", "cadence", "prem", "stream", "agree", "secs", "us/pt")


def format_report(scores: list[RunScore], summaries: dict[str, dict]) -> str:
    rows = [RUN_COLUMNS]
    for s in scores:
        rows.append((s.name, s.corpus, _fmt(s.is_grokking), _fmt(s.onset_found), _fmt(s.false_grokking),
                     _fmt(s.warning_early), _fmt(s.false_warning), _fmt(s.sustained_found),
                     _fmt(s.sustained_delay), str(s.standing), _fmt(s.false_collapses),
                     _ratio(s.spikes_found, s.spikes), _ratio(s.spikes15_found, s.spikes15),
                     _ratio(s.gen_found, s.gen_episodes), _ratio(s.gen_train_found, s.gen_train_episodes),
                     f"{s.economy_max:.1f}", _fmt(s.stationary_max), str(s.brackets), _fmt(s.premature),
                     _fmt(s.stream_mismatch), _fmt(s.phase_agreement), f"{s.seconds:.1f}",
                     _fmt(s.us_per_point)))
    lines = _table(rows)
    lines.append("")
    rows = [SUMMARY_COLUMNS]
    for corpus, m in summaries.items():
        rows.append((corpus, str(m["runs"]), _fmt(m["grokking_recall"]), _fmt(m["false_grokking"]),
                     _fmt(m["hidden_progress_early"]), _fmt(m["hidden_progress_false"]),
                     _fmt(m["sustained_recall"]), _fmt(m["median_sustained_delay_steps"]), str(m["standing"]),
                     _fmt(m["false_collapses"]), _fmt(m["spike_recall"]), _fmt(m["spike15_recall"]),
                     _fmt(m["gen_collapse_recall"]), _fmt(m["gen_with_train_recall"]),
                     _fmt(m["economy_max_rate"]), str(m["economy_pairs_over_1"]),
                     _fmt(m["stationary_max_rate"]), str(m["stationary_pairs_over_1"]),
                     str(m["brackets"]), _fmt(m["cadence_pass"]),
                     _fmt(m["premature_stabilization"]), _fmt(m["stream_mismatch_runs"]),
                     _fmt(m["median_phase_agreement"]), f"{m['seconds']:.0f}", _fmt(m["us_per_point"])))
    lines += _table(rows)
    return "\n".join(lines)


def corpus_name(folder: Path) -> str:
    return folder.resolve().name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runs", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, action="append",
                        help="a corpus folder, repeatable (default: those of "
                             f"{', '.join(str(p) for p in DEFAULT_CORPORA)} that exist)")
    parser.add_argument("--jobs", type=int, default=2, help="analyze processes at once (default 2)")
    parser.add_argument("--json", type=Path, help="write per-run scores and the summaries here")
    parser.add_argument("--cmd", default=f"{sys.executable} -m detector.cli analyze",
                        help="the analyze command (FILE --json is appended)")
    args = parser.parse_args(argv)
    folders = args.runs or [p for p in DEFAULT_CORPORA if p.is_dir()]
    jobs: list[tuple[str, Path]] = []
    for folder in folders:
        jobs += [(corpus_name(folder), p) for p in sorted(folder.glob("*.jsonl"))
                 if p.with_name(p.stem + ".labels.json").exists()]
    if not jobs:
        print(f"no labelled runs in {', '.join(map(str, folders))}", file=sys.stderr)
        return 2
    command = args.cmd.split()

    def one(job: tuple[str, Path]) -> tuple[RunScore, list[dict], list[int]] | None:
        corpus, log = job
        try:
            doc, seconds = analyze(log, command)
        except (RuntimeError, json.JSONDecodeError) as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            return None
        labels = json.loads(log.with_name(log.stem + ".labels.json").read_text())
        steps, points = read_run(log)
        return (score_run(log.stem, corpus, labels, doc, steps, points, seconds), doc.get("events", []),
                sorted(set(steps)))

    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, 2))) as pool:
        results = [r for r in pool.map(one, jobs) if r is not None]
    if len(results) < len(jobs):
        print(f"{len(jobs) - len(results)} of {len(jobs)} runs failed to analyze", file=sys.stderr)
    if not results:
        return 1
    scores = [r[0] for r in results]
    summaries: dict[str, dict] = {}
    cadences: dict[str, dict] = {}
    for corpus in dict.fromkeys(s.corpus for s in scores):
        members = {s.name: (s, ev) for s, ev, _ in results if s.corpus == corpus}
        cadences[corpus] = score_cadence(members, {s.name: steps for s, _, steps in results
                                                   if s.corpus == corpus})
        summaries[corpus] = summarise([s for s, _ in members.values()], cadences[corpus])
    all_cadence = {f"{c}/{b}": r for c, rs in cadences.items() for b, r in rs.items()}
    summaries["TOTAL"] = summarise(scores, all_cadence)
    print(format_report(scores, summaries))
    failed = {k: r for k, r in all_cadence.items() if not r["passed"]}
    for key, r in failed.items():
        print(f"cadence FAIL {key}: {r['worst']}")
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(s) for s in scores], "cadence": all_cadence,
                                         "summary": summaries}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
