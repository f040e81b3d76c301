"""The phase labeller's rules on constructed runs: each test builds the shape of a
phenomenon (a spike that recovers, slowly or fast; a dip that bounces back into
collapse; a grokking curve; a run with only losses) and checks the events and
phases the run detector reports. Values are logged every 10 steps, as the
shared runs are."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.core import RunDetector
from detector.core.types import EventKind, Phase


def run(rows: list[dict[str, float]], every: int = 10) -> RunDetector:
    det = RunDetector()
    for i, row in enumerate(rows):
        det.update(i * every, row)
    return det


def kinds(det: RunDetector, *wanted: EventKind) -> list[tuple[str, int]]:
    return [(e.kind.value, e.step) for e in det.events_so_far if e.kind in wanted]


def memorised_losses(n: int, rng: np.random.Generator) -> list[float]:
    """A training loss that falls from 4 to ~1e-6 and creeps on down with noise."""
    t = np.arange(n)
    loss = 4.0 * np.exp(-t / 3.0) + 1e-6 * (1 + 0.05 * rng.standard_normal(n))
    return [float(v) for v in loss]


def with_excursion(base: list[float], at: int, values: list[float]) -> list[dict[str, float]]:
    losses = base[:at] + values + base[at + len(values):]
    return [{"train_loss": v} for v in losses]


@pytest.mark.parametrize("fall_per_line", [30.0, 3.0])
def test_a_spike_that_falls_back_is_a_loss_spike_not_a_collapse(fall_per_line: float) -> None:
    rng = np.random.default_rng(0)
    base = memorised_losses(200, rng)
    # Up to 1.5, then down by a constant factor a line: fast (30x) or slow (3x).
    spike = [1.5 / fall_per_line**k for k in range(12)]
    det = run(with_excursion(base, 100, spike))
    assert kinds(det, EventKind.LOSS_SPIKE) == [("LOSS_SPIKE", 1000)]
    assert kinds(det, EventKind.COLLAPSE_ONSET) == []
    assert det.current_phase()[0] is not Phase.COLLAPSE


def test_a_dip_that_bounces_back_up_is_a_collapse_located_at_its_start() -> None:
    rng = np.random.default_rng(1)
    base = memorised_losses(200, rng)
    # The shape of the shared collapse_lr runs: a jump, a partial dip that stalls
    # four decades above the old level, then the loss stays up.
    after = [3.7, 0.8, 0.08, 0.079, 1.1, 0.058, 0.052] + [4.1] * 80
    det = run(with_excursion(base, 100, after))
    [(kind, step)] = kinds(det, EventKind.COLLAPSE_ONSET)
    assert step == 1000
    [collapse] = [e for e in det.events_so_far if e.kind is EventKind.COLLAPSE_ONSET]
    # Confirmed on the fourth line above the bound: the jump, 1.1 and two of the 4.1s.
    assert int(collapse.evidence["detected_at_step"]) == 1000 + 10 * 8
    assert det.current_phase()[0] is Phase.COLLAPSE
    assert kinds(det, EventKind.LOSS_SPIKE) == []


def test_a_loss_stuck_above_its_bound_is_a_collapse_after_the_confirmation_lines() -> None:
    rng = np.random.default_rng(2)
    base = memorised_losses(120, rng)
    det = run(with_excursion(base, 60, [2.0] * 60))
    [collapse] = [e for e in det.events_so_far if e.kind is EventKind.COLLAPSE_ONSET]
    assert collapse.step == 600
    # The jump is the first of the confirmation lines above the bound.
    assert collapse.detected_at == 600 + 10 * (det.labeller.config.collapse_confirm_lines - 1)


def test_non_finite_loss_is_an_immediate_collapse() -> None:
    rows = [{"train_loss": 1.0 / (1 + i)} for i in range(50)] + [{"train_loss": math.inf}] * 3
    det = run(rows)
    [collapse] = [e for e in det.events_so_far if e.kind is EventKind.COLLAPSE_ONSET]
    assert (collapse.step, collapse.detected_at, collapse.confidence) == (500, 500, 1.0)


def grokking_rows(onset_line: int, n: int = 400, rng_seed: int = 3) -> list[dict[str, float]]:
    """Train accuracy 1 by line 5; validation accuracy at chance until ``onset_line``,
    then a logistic rise to 1; validation loss falls ahead of the rise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for i in range(n):
        train_acc = min(1.0, 0.2 + 0.2 * i)
        val_acc = 0.02 + 0.98 / (1 + math.exp(-(i - onset_line - 15) / 4.0))
        val_acc = float(np.clip(val_acc + 0.003 * rng.standard_normal(), 0, 1))
        val_loss = 4.0 - 3.5 / (1 + math.exp(-(i - onset_line + 30) / 15.0))
        rows.append({
            "train_loss": 4.0 * math.exp(-i / 2.0) + 1e-4,
            "train_acc": train_acc,
            "val_loss": val_loss + 0.002 * float(rng.standard_normal()),
            "val_acc": val_acc,
        })
    return rows


def test_grokking_onset_early_warning_and_phases() -> None:
    det = run(grokking_rows(onset_line=150))
    onset = [e for e in det.events_so_far if e.kind is EventKind.GROKKING_ONSET]
    assert len(onset) == 1
    # The rise passes baseline + 0.10 a few lines after the logistic's foot.
    assert 1500 <= onset[0].step <= 1700
    assert onset[0].detected_at > onset[0].step
    warning = [e for e in det.events_so_far if e.kind is EventKind.HIDDEN_PROGRESS]
    assert len(warning) == 1 and warning[0].step < onset[0].step
    assert float(warning[0].evidence["p_value"]) < 1e-3
    assert kinds(det, EventKind.GROKKING_COMPLETE)
    phases = [s.phase for s in det.segments()]
    assert phases == [Phase.INSTABILITY, Phase.ABSTRACTION, Phase.STABILIZATION]


def test_a_slow_creep_long_after_memorisation_is_grokking_located_at_its_start() -> None:
    # Validation accuracy leaves chance at line 10 and creeps up for 300 lines before
    # it generalises: no sudden late rise, but generalisation lags memorisation.
    rows = []
    for i in range(400):
        val = 0.02 + (0.001 * max(0, i - 10) + (0.15 if i >= 10 else 0.0) if i < 310 else 0.98)
        rows.append({"train_loss": 4.0 * math.exp(-i / 2.0) + 1e-4, "train_acc": min(1.0, 0.2 + 0.2 * i),
                     "val_acc": min(val, 0.98)})
    det = run(rows)
    [onset] = [e for e in det.events_so_far if e.kind is EventKind.GROKKING_ONSET]
    assert onset.step == 100 and onset.evidence["test"] == "delayed_generalisation"
    assert onset.detected_at >= 10 * (4 + 50)  # known only once the lag is established
    # The creep is not stabilization; the phase stays abstraction until it generalises.
    starts = {s.phase: s.start_step for s in det.segments()}
    assert starts[Phase.ABSTRACTION] == 100 and starts[Phase.STABILIZATION] >= 3100


def test_generalising_right_after_memorisation_is_not_grokking() -> None:
    # The rise comes 5 lines after memorisation (which took 4): no delay, no grokking.
    det = run(grokking_rows(onset_line=-5))
    assert kinds(det, EventKind.GROKKING_ONSET) == []
    assert [s.phase for s in det.segments()][-1] is Phase.STABILIZATION


def test_labeller_state_round_trip_mid_run_resumes_identically() -> None:
    rows = grokking_rows(onset_line=150)
    whole = run(rows)
    first = RunDetector()
    for i, row in enumerate(rows[:160]):
        first.update(i * 10, row)
    resumed = RunDetector.from_state(first.state())
    events = list(first.events_so_far)
    for i, row in enumerate(rows[160:], start=160):
        events += resumed.update(i * 10, row)
    assert [(e.kind, e.step, e.detected_at) for e in events] == [
        (e.kind, e.step, e.detected_at) for e in whole.events_so_far
    ]
    assert resumed.segments() == whole.segments()


def test_only_losses_still_give_collapse_and_phases() -> None:
    rng = np.random.default_rng(4)
    base = memorised_losses(300, rng)
    det = run(with_excursion(base, 250, [math.nan] * 5))
    assert kinds(det, EventKind.COLLAPSE_ONSET) == [("COLLAPSE_ONSET", 2500)]
    phases = [s.phase for s in det.segments()]
    assert phases[0] is Phase.INSTABILITY and phases[-1] is Phase.COLLAPSE


# --- the block path ------------------------------------------------------------------


def _variants() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Runs that walk every regime of the labeller: real runs (grokking, no grokking,
    collapses), the same with losses only, accuracies in percent, and sparse lines
    with non-finite values; a long synthetic grokking run that stabilises."""
    from benchmarks.workload import block
    from tests.helpers import read_rows, rows_to_columns, shared_dir

    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for name in ("grok_add_0", "nogrok_add_0", "collapse_lr_0", "collapse_sgd_0"):
        cols = rows_to_columns(read_rows(shared_dir("runs", f"{name}.jsonl")))
        out[name] = cols
        out[f"{name}-losses"] = {n: c for n, c in cols.items() if "acc" not in n}
        out[f"{name}-percent"] = {n: (s, v * 100 if "acc" in n else v) for n, (s, v) in cols.items()}
        rng = np.random.default_rng(3)
        sparse = {}
        for n, (s, v) in cols.items():
            keep = rng.random(len(s)) > 0.2
            v = np.where(rng.random(len(v)) < 0.01, np.nan, v)
            sparse[n] = (s[keep], v[keep])
        out[f"{name}-sparse"] = sparse
    out["synthetic-long"] = block(seed=4, first_line=0, lines=6000)
    return out


def _in_blocks(columns: dict, size: int, skip: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    from detector.core.labeller import PhaseLabeller

    monkeypatch.setattr(PhaseLabeller, "skip_quiet_lines", skip)
    det = RunDetector()
    lines = np.unique(np.concatenate([s for s, _ in columns.values()]))
    rng = np.random.default_rng(size)
    events, lo = [], 0
    while lo < len(lines):
        hi = min(len(lines), lo + int(rng.integers(1, 2 * size)))
        first, last = lines[lo], lines[hi - 1]
        block = {}
        for name, (steps, values) in columns.items():
            a, b = np.searchsorted(steps, (first, last + 1))
            if b > a:
                block[name] = (steps[a:b], values[a:b])
        events += det.update_many(block)
        lo = hi
    events += det.finish()
    state = {k: (list(v) if hasattr(v, "maxlen") else v) for k, v in vars(det.labeller).items()}
    state["rank_recent"] = {k: list(v) for k, v in det.labeller.rank_recent.items()}
    return [(e.step, e.kind, e.series, e.detected_at, e.confidence, e.message, e.evidence)
            for e in events], state


@pytest.mark.parametrize("size", [3, 64, 900])
def test_quiet_lines_taken_in_bulk_leave_what_line_by_line_leaves(size, monkeypatch):
    """The block path skips stretches where no rule can fire; its events and its
    whole state must be those of taking every line, in every regime."""
    for name, columns in _variants().items():
        assert _in_blocks(columns, size, True, monkeypatch) == _in_blocks(
            columns, size, False, monkeypatch), name
