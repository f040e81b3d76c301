"""The phase labeller's rules on constructed runs: each test builds the shape of a
phenomenon (a one-line spike, a long excursion that comes back, a collapse that
stays, a generalisation collapse, grokking and its look-alikes, a loss-only
run) and checks the events and phases the run detector reports, and that they
do not depend on how often the run was logged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detector.core import RunDetector
from detector.core.labeller import PhaseLabeller
from detector.core.types import EventKind, Phase


def run(rows: list[dict[str, float]], every: int = 10, start: int = 0) -> RunDetector:
    det = RunDetector()
    for i, row in enumerate(rows):
        det.update(start + i * every, row)
    return det


def kinds(det: RunDetector, *wanted: EventKind) -> list[tuple[str, int]]:
    return [(e.kind.value, e.step) for e in det.events_so_far if e.kind in wanted]


def fitted_losses(n: int, rng: np.random.Generator, floor: float = 1e-3) -> list[float]:
    """A training loss that falls from 4 to ``floor`` and jitters there by ~5%."""
    t = np.arange(n)
    loss = 4.0 * np.exp(-t / 5.0) + floor * np.exp(0.05 * rng.standard_normal(n))
    return [float(v) for v in loss]


def with_excursion(base: list[float], at: int, values: list[float]) -> list[dict[str, float]]:
    losses = base[:at] + values + base[at + len(values):]
    return [{"train_loss": v} for v in losses]


SPIKES = [EventKind.LOSS_SPIKE, EventKind.COLLAPSE_ONSET, EventKind.COLLAPSE_END]


@pytest.mark.parametrize("height", [3.0, 30.0, 500.0])
def test_a_one_line_spike_is_one_loss_spike_with_its_evidence(height: float) -> None:
    rng = np.random.default_rng(0)
    base = fitted_losses(300, rng)
    det = run(with_excursion(base, 200, [base[200] * height]))
    assert kinds(det, *SPIKES) == [("LOSS_SPIKE", 2000)]
    [spike] = [e for e in det.events_so_far if e.kind is EventKind.LOSS_SPIKE]
    # Reported once it has stayed back a quarter of the recovery horizon, from halfway
    # between its one line and the next (where it came back, as best a log of every
    # 10 steps can tell).
    settle = int(spike.evidence["horizon_steps"]) // 4
    assert 2005 + settle <= spike.detected_at <= 2005 + settle + 10
    assert float(spike.evidence["factor"]) == pytest.approx(height, rel=0.2)
    assert spike.evidence["duration_steps"] == "5"
    assert det.current_phase()[0] is not Phase.COLLAPSE


def test_a_wobble_of_nothing_after_a_spike_leaves_it_one_line_long() -> None:
    # A real slingshot: 1e-7 -> 0.56 for one line, back at 1.5e-5, 5e-8, then a wobble
    # to 1e-6 (1.3 decades, but nothing against a first loss of 4) while it settles.
    rng = np.random.default_rng(0)
    base = fitted_losses(400, rng, floor=1e-7)
    det = run(with_excursion(base, 300, [0.56, 1.5e-5, 5e-8, 1e-6, 6e-7, 8e-7]))
    [spike] = [e for e in det.events_so_far if e.kind in SPIKES]
    assert spike.kind is EventKind.LOSS_SPIKE and spike.step == 3000
    assert spike.evidence["duration_steps"] == "5"


def test_a_material_bounce_while_settling_keeps_the_excursion_open() -> None:
    # Back at 0.1 after 1e-3 -> 3, then up to 0.8 (a fifth of the first loss): not over.
    rng = np.random.default_rng(0)
    base = fitted_losses(400, rng)
    det = run(with_excursion(base, 300, [3.0, 0.1, 0.8, 0.1, 0.05]))
    [spike] = [e for e in det.events_so_far if e.kind in SPIKES]
    assert spike.kind is EventKind.LOSS_SPIKE and spike.step == 3000
    assert int(spike.evidence["duration_steps"]) >= 25


def test_a_jitter_of_the_size_of_the_series_noise_is_no_spike() -> None:
    rng = np.random.default_rng(1)
    # A mini-batch loss: each line 40% up or down at random around a slow fall.
    t = np.arange(600)
    loss = (2.0 * np.exp(-t / 300) + 0.5) * np.exp(0.35 * rng.standard_normal(600))
    det = run([{"train_loss": float(v)} for v in loss])
    assert kinds(det, *SPIKES) == []


def test_an_excursion_that_comes_back_in_time_is_a_spike_a_long_one_a_collapse_that_ends() -> None:
    rng = np.random.default_rng(2)
    base = fitted_losses(1000, rng)
    short = [1.0] * 5          # 50 steps at step 5000: back within the horizon (500 steps)
    det = run(with_excursion(base, 500, short))
    assert kinds(det, *SPIKES) == [("LOSS_SPIKE", 5000)]

    long = [1.0] * 100         # 1000 steps: a collapse, and it ends
    det = run(with_excursion(base, 500, long))
    events = kinds(det, *SPIKES)
    # Its last line out is 5990, its first back 6000: it came back halfway between.
    assert events == [("COLLAPSE_ONSET", 5000), ("COLLAPSE_END", 5995)]
    onset = next(e for e in det.events_so_far if e.kind is EventKind.COLLAPSE_ONSET)
    assert onset.evidence["scope"] == "training"
    assert det.current_phase()[0] is not Phase.COLLAPSE
    phases = [s.phase for s in det.segments()]
    assert phases[-2:] == [Phase.COLLAPSE, phases[-3]]  # back to what it was


@pytest.mark.parametrize("every", [1, 10, 50])
def test_an_excursion_on_its_way_back_at_the_horizon_is_judged_by_where_it_ends(every: int) -> None:
    # At step 5000 the horizon is 500 steps. The loss jumps 1000x and decays back
    # geometrically, home 650 steps later: past the horizon, but more than three
    # quarters of the way down (log scale) when it is reached. A loss that stays up,
    # or settles half-way, is a collapse at the horizon, not later.
    steps = np.arange(0, 10000, every)
    base = 1e-3 * np.exp(0.05 * np.random.default_rng(6).standard_normal(len(steps)))
    since = steps - 5000
    back = np.where((since >= 0) & (since < 650), 1000.0 ** (1 - since / 650), 1.0)
    det = RunDetector()
    for step, value in zip(steps.tolist(), (base * back).tolist(), strict=True):
        det.update(step, {"train_loss": value})
    assert [k for k, _ in kinds(det, *SPIKES)] == ["LOSS_SPIKE"]
    [spike] = [e for e in det.events_so_far if e.kind is EventKind.LOSS_SPIKE]
    assert spike.step == 5000 and 500 < int(spike.evidence["duration_steps"]) < 1000

    stays = np.where(since >= 0, 1000.0, 1.0)
    half_way = np.where(since >= 0, np.maximum(1000.0 ** (1 - since / 300), 30.0), 1.0)
    for shape in (stays, half_way):
        det = RunDetector()
        for step, value in zip(steps.tolist(), (base * shape).tolist(), strict=True):
            det.update(step, {"train_loss": value})
        [onset] = [e for e in det.events_so_far if e.kind is EventKind.COLLAPSE_ONSET]
        assert onset.step == 5000 and onset.detected_at <= 5000 + 500 + every


def test_the_level_a_spike_left_is_not_one_noisy_low_line() -> None:
    # A mini-batch loss at 2.0 (+-3%) whose line before the jump happens to read 1.5:
    # the spike's level is the loss's level, and its recovery to 2.4 counts as back.
    rng = np.random.default_rng(7)
    loss = 2.0 * np.exp(0.03 * rng.standard_normal(400))
    loss[199], loss[200:230] = 1.5, np.geomspace(10.0, 2.4, 30)
    det = run([{"train_loss": float(v)} for v in loss])
    [spike] = [e for e in det.events_so_far if e.kind is EventKind.LOSS_SPIKE]
    assert spike.step == 2000 and float(spike.evidence["level"]) == pytest.approx(2.0, rel=0.1)
    assert kinds(det, EventKind.COLLAPSE_ONSET) == []


def test_a_noisy_per_step_loss_back_at_the_bands_edge_is_back() -> None:
    # Logged every step, +-3% a step: after a 10x jump at 5000 the loss comes home
    # to 1.45x its level, just inside the band (1.5x), and its noise pokes out of
    # the band every eighth line. That is a spike, not a collapse for want of 125
    # lucky lines in a row.
    rng = np.random.default_rng(8)
    steps = np.arange(10000)
    since = steps - 5000
    shape = np.where(since < 0, 1.0, np.where(since < 100, 10.0 ** (1 - since / 100 * (1 - math.log10(1.45))),
                                               1.45))
    loss = 2.0 * shape * np.exp(0.03 * rng.standard_normal(len(steps)))
    det = run([{"train_loss": float(v)} for v in loss], every=1)
    assert [k for k, _ in kinds(det, *SPIKES)] == ["LOSS_SPIKE"]


def test_a_collapse_that_stays_is_never_ended() -> None:
    rng = np.random.default_rng(3)
    base = fitted_losses(600, rng)
    det = run(with_excursion(base, 300, [4.0] * 300))
    assert kinds(det, *SPIKES) == [("COLLAPSE_ONSET", 3000)]
    assert det.current_phase()[0] is Phase.COLLAPSE


def test_non_finite_loss_that_stays_is_a_collapse_located_where_it_began() -> None:
    rng = np.random.default_rng(4)
    base = fitted_losses(200, rng)
    det = run(with_excursion(base, 150, [math.nan] * 50))
    [onset] = [e for e in det.events_so_far if e.kind is EventKind.COLLAPSE_ONSET]
    assert onset.step == 1500 and onset.evidence["test"] == "non_finite"


def test_a_small_lasting_creep_at_a_tiny_loss_is_not_a_collapse() -> None:
    rng = np.random.default_rng(5)
    base = fitted_losses(800, rng, floor=1e-7)
    det = run(with_excursion(base, 400, [1e-5] * 400))  # 100x, but 1e-5 of a loss of 4
    assert [k for k, _ in kinds(det, *SPIKES)] == []


def creep_to_divergence(every: int) -> list[dict[str, float]]:
    """A warm-up into divergence logged every ``every`` steps: the loss falls from 2.3 to
    0.2 by step 70, then climbs 8 % a step (5x in 21 steps) to 1.2 and stays there."""
    steps = np.arange(0, 400, every)
    creep = np.minimum(0.2 * 1.08 ** (steps - 70), 1.2)
    loss = np.where(steps < 70, 0.2 + 2.1 * np.exp(-steps / 12.0), creep)
    return [{"train_loss": float(v)} for v in loss]


@pytest.mark.parametrize("every", [1, 10])
def test_a_loss_that_creeps_up_a_few_percent_a_step_and_stays_is_a_collapse(every: int) -> None:
    # Logged every step no line is log10(1.5) above the one before, yet the loss left
    # its band: out is measured against the line the run's own time scale back.
    det = run(creep_to_divergence(every), every=every)
    [onset] = [e for e in det.events_so_far if e.kind is EventKind.COLLAPSE_ONSET]
    assert 70 <= onset.step <= 95, onset.step
    assert not [e for e in det.events_so_far if e.kind is EventKind.LOSS_SPIKE]


def test_a_creep_of_nothing_at_a_tiny_loss_is_not_an_excursion() -> None:
    # Adam's slingshot precursor: 3e-8 -> 1.4e-7 over 250 steps, on a loss that began at 4.
    steps = np.arange(0, 3000)
    loss = np.where(steps < 2500, 3e-8 + 4.0 * np.exp(-steps / 30.0), 3e-8 * 1.006 ** (steps - 2500))
    det = run([{"train_loss": float(v)} for v in loss], every=1)
    assert kinds(det, *SPIKES) == []


def grokking_rows(mem_line: int, onset_line: int, n: int, every: int = 10,
                  settle: float = 1.0, rng_seed: int = 3) -> list[dict[str, float]]:
    """Training accuracy reaches 1 at ``mem_line``; test accuracy rises from chance at
    ``onset_line`` to ``settle`` over 80 lines; the test loss falls before the rise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for i in range(n):
        train_acc = min(1.0, 0.02 + i / mem_line)
        rise = 1 / (1 + math.exp(-(i - onset_line - 40) / 10))
        test_acc = 0.02 + (settle - 0.02) * rise + 0.003 * rng.standard_normal()
        test_loss = 6.0 * math.exp(-max(0, i - mem_line) / (onset_line - mem_line)) + 0.1
        rows.append({"train_loss": max(1e-4, 4.0 * (1 - train_acc)) + 1e-4,
                     "train_acc": train_acc, "test_acc": test_acc, "test_loss": test_loss})
    return rows


def test_grokking_onset_early_warning_and_phases() -> None:
    det = run(grokking_rows(mem_line=10, onset_line=150, n=400))
    [onset] = [e for e in det.events_so_far if e.kind is EventKind.GROKKING_ONSET]
    assert 1550 <= onset.step <= 1750  # located where the rise begins (0.1 above chance)
    assert onset.detected_at >= onset.step
    warnings = [e for e in det.events_so_far if e.kind is EventKind.HIDDEN_PROGRESS]
    assert warnings and warnings[0].detected_at < onset.step
    phases = [s.phase for s in det.segments()]
    assert phases == [Phase.INSTABILITY, Phase.ABSTRACTION, Phase.STABILIZATION]


def creeping_rows(creep_to: float, n: int = 400, rng_seed: int = 5) -> list[dict[str, float]]:
    """Chance is 0.01 (the untrained line); memorised by line 5, which drives held-out
    accuracy to 0.002; it then creeps back geometrically to ``creep_to`` by line 250
    while the test loss climbs (confidently wrong), and rises to 1 from line 280
    when ``creep_to`` is above chance."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for i in range(n):
        creep = 0.002 * (creep_to / 0.002) ** min(1.0, max(0, i - 5) / 245)
        rise = 1 / (1 + math.exp(-(i - 300) / 6)) if creep_to > 0.01 else 0.0
        test_acc = 0.01 if i == 0 else (creep + (1 - creep) * rise) * math.exp(0.05 * rng.standard_normal())
        rows.append({"train_loss": 4.0 if i == 0 else 1e-3, "train_acc": 0.01 if i == 0 else 1.0,
                     "test_acc": min(1.0, test_acc), "test_loss": 5.0 if i == 0 else 20 + 0.05 * min(i, 280)})
    return rows


def test_held_out_accuracy_creeping_above_chance_is_hidden_progress_while_its_loss_climbs() -> None:
    det = run(creeping_rows(creep_to=0.04))
    [onset] = [e for e in det.events_so_far if e.kind is EventKind.GROKKING_ONSET]
    [warning] = [e for e in det.events_so_far if e.kind is EventKind.HIDDEN_PROGRESS]
    assert warning.series == "test_acc" and warning.evidence["measure"] == "accuracy"
    assert 550 <= warning.detected_at < onset.step  # after grokking's delay, before the rise


def test_a_creep_halfway_to_the_onset_level_is_still_hidden_progress() -> None:
    # Chance 0.01; memorising lifts held-out accuracy to 0.05 at once, and it creeps to
    # 0.10 over 2 500 steps (still short of the onset, 0.11) before the rise: the
    # model makes progress the whole time, more than half the onset's rise of it.
    rng = np.random.default_rng(6)
    rows = []
    for i in range(400):
        rise = 1 / (1 + math.exp(-(i - 300) / 6))
        creep = 0.05 + 0.05 * min(1.0, max(0, i - 5) / 250)
        test_acc = 0.01 if i == 0 else (creep + (1 - creep) * rise) * math.exp(0.02 * rng.standard_normal())
        rows.append({"train_loss": 4.0 if i == 0 else 1e-3, "train_acc": 0.01 if i == 0 else 1.0,
                     "test_acc": min(1.0, test_acc), "test_loss": 5.0 if i == 0 else 20 + 0.05 * min(i, 280)})
    det = run(rows)
    [onset] = [e for e in det.events_so_far if e.kind is EventKind.GROKKING_ONSET]
    [warning] = [e for e in det.events_so_far if e.kind is EventKind.HIDDEN_PROGRESS]
    assert warning.evidence["measure"] == "accuracy" and warning.detected_at < onset.step


def test_held_out_accuracy_drifting_back_towards_chance_is_no_hidden_progress() -> None:
    # The same creep, from a fifth of chance to just below it: un-memorising, not progress.
    det = run(creeping_rows(creep_to=0.008))
    assert kinds(det, EventKind.HIDDEN_PROGRESS, EventKind.GROKKING_ONSET) == []


def test_generalising_soon_after_memorisation_is_not_grokking() -> None:
    # Memorised by step 50, test accuracy at 0.95 about 400 steps later: the bar
    # is max(500 steps, the 50 memorisation took), so this is not grokking.
    det = run(grokking_rows(mem_line=5, onset_line=-25, n=300))
    assert kinds(det, EventKind.GROKKING_ONSET) == []


def test_a_healthy_run_whose_test_accuracy_settles_below_training_is_not_grokking() -> None:
    det = run(grokking_rows(mem_line=30, onset_line=200, n=900, settle=0.85))
    assert kinds(det, EventKind.GROKKING_ONSET) == []
    assert det.current_phase()[0] is Phase.STABILIZATION


def test_generalisation_collapse_and_its_end() -> None:
    rows = grokking_rows(mem_line=10, onset_line=100, n=900)
    for i in range(500, 540):  # test accuracy falls to 0.75 for 40 lines, training holds
        rows[i]["test_acc"] = 0.75
    det = run(rows)
    collapse = [e for e in det.events_so_far if e.kind in (EventKind.COLLAPSE_ONSET, EventKind.COLLAPSE_END)]
    assert [(e.kind.value, e.step, e.evidence["scope"], e.series) for e in collapse] == [
        ("COLLAPSE_ONSET", 5000, "generalization", "test_acc"),
        ("COLLAPSE_END", 5400, "generalization", "test_acc"),
    ]
    assert det.current_phase()[0] is Phase.STABILIZATION


def test_percent_accuracies_are_recognised_per_run() -> None:
    rows = grokking_rows(mem_line=10, onset_line=150, n=400)
    percent = [{**r, "train_acc": 100 * r["train_acc"], "test_acc": 100 * r["test_acc"]} for r in rows]
    assert _key_events(run(percent)) == _key_events(run(rows))
    # A run that never generalises, in percent: 0.9 % is not 90 %.
    flat = [{**r, "test_acc": 0.9 + 0.05 * math.sin(i)} for i, r in enumerate(percent)]
    det = run(flat)
    assert kinds(det, EventKind.GROKKING_ONSET) == []
    assert Phase.ABSTRACTION not in [s.phase for s in det.segments()]


def _key_events(det: RunDetector) -> list[tuple[str, int]]:
    keep = (EventKind.GROKKING_ONSET, EventKind.COLLAPSE_ONSET, EventKind.COLLAPSE_END,
            EventKind.LOSS_SPIKE, EventKind.PHASE_CHANGE)
    return [(e.kind.value, e.step) for e in det.events_so_far if e.kind in keep]


def test_the_same_run_at_cadences_1_10_and_50_gives_the_same_events() -> None:
    rng = np.random.default_rng(7)
    n = 6000  # steps
    steps = np.arange(n)
    train_acc = np.minimum(1.0, 0.02 + steps / 300)
    rise = 1 / (1 + np.exp(-(steps - 2500) / 150))
    test_acc = 0.02 + 0.98 * rise + 0.002 * rng.standard_normal(n)
    train_loss = 4.0 * np.exp(-steps / 60) + 1e-3 * np.exp(0.05 * rng.standard_normal(n))
    train_loss[4500:4540] = 1.0  # a 40-step excursion
    rows = [{"train_loss": float(a), "train_acc": float(b), "test_acc": float(c)}
            for a, b, c in zip(train_loss, train_acc, test_acc, strict=True)]
    results = {}
    for every in (1, 10, 50):
        det = RunDetector()
        for s in range(0, n, every):
            det.update(s, rows[s])
        results[every] = _key_events(det)
    for every in (10, 50):
        assert [k for k, _ in results[every]] == [k for k, _ in results[1]], every
        for (kind, fine), (_, coarse) in zip(results[1], results[every], strict=True):
            # Where a noisy accuracy comes within the tolerance of its asymptote is
            # uncertain by the noise over the slope (~60 steps here), at any cadence.
            slack = 200 if kind == "PHASE_CHANGE" and fine > 3000 else every
            assert abs(fine - coarse) <= slack, (every, results)


def test_cadences_agree_on_a_small_test_sets_plateau_and_its_collapse() -> None:
    # Test accuracy on 96 examples (steps of 0.0104, more than the 0.01 tolerance):
    # it rises, holds, gains one example, and falls to 0.75 while training holds.
    # Logged every 1, 10 or 50 steps: the same phases and the same collapse. (A
    # sparse log confirms the onset lines after its first one, and its band still
    # holds the rise when the fall comes.)
    n = 1500
    steps = np.arange(n)
    rise = 0.1 + 0.88 / (1 + np.exp(-(steps - 400) / 10))
    test_acc = np.round(96 * rise) / 96
    test_acc[570:610] += 1 / 96
    test_acc[612:] = 0.75 + 0.15 * (steps[612:] - 612) / n
    train_acc = np.minimum(1.0, 0.1 + steps / 100)
    train_loss = 2.3 * np.exp(-steps / 30) + 1e-3
    results = {}
    for every in (1, 10, 50):
        det = RunDetector()
        for s in range(0, n, every):
            det.update(int(s), {"train_loss": float(train_loss[s]), "train_acc": float(train_acc[s]),
                                "test_acc": float(test_acc[s])})
        results[every] = _key_events(det)
    assert [k for k, _ in results[1]] == ["PHASE_CHANGE", "PHASE_CHANGE", "COLLAPSE_ONSET", "PHASE_CHANGE"]
    for every in (10, 50):
        assert [k for k, _ in results[every]] == [k for k, _ in results[1]], (every, results)
        for (_, fine), (_, coarse) in zip(results[1], results[every], strict=True):
            assert abs(fine - coarse) <= every, (every, results)


def _at_cadences(rows: dict[str, np.ndarray], n: int, cadences: tuple[int, ...]) -> dict[int, list]:
    results = {}
    for every in cadences:
        det = RunDetector()
        for s in range(0, n, every):
            det.update(int(s), {name: float(values[s]) for name, values in rows.items()})
        results[every] = _key_events(det)
    return results


def test_the_onset_is_measured_from_the_level_memorisation_drove_held_out_accuracy_to() -> None:
    # Held-out accuracy starts at chance (0.1) and memorisation drives it to 0 by step
    # 40; it rises slowly from step 1500. Logged every 50 steps, the first line that
    # holds a fitted model is step 50, when only the chance level has been seen: the
    # onset must still be measured from 0 (0.1 is reached ~80 steps before 0.2).
    n = 3000
    steps = np.arange(n)
    train_acc = np.minimum(1.0, 0.1 + steps / 40)
    train_loss = 2.3 * np.exp(-steps / 8) + 1e-3
    test_acc = np.where(steps < 40, 0.1 * (1 - steps / 40), 0.0) + 1 / (1 + np.exp(-(steps - 2000) / 100))
    rows = {"train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
    results = _at_cadences(rows, n, (1, 50))
    onsets = {every: [s for k, s in found if k == "GROKKING_ONSET"] for every, found in results.items()}
    assert len(onsets[1]) == 1 and 1770 <= onsets[1][0] <= 1790, results
    assert len(onsets[50]) == 1 and abs(onsets[50][0] - onsets[1][0]) <= 50, results


def test_a_plateau_before_the_training_metric_has_fitted_is_not_stabilisation() -> None:
    # Both accuracies jump to 0.35 in three steps and hold for thirteen, then rise on;
    # held-out accuracy settles at 0.75 from step 150, the training one fits at 190.
    # Logged every step the early plateau is long next to the three steps before it,
    # but logged every 10 it is not even seen: the only stabilisation is the late one,
    # at every cadence.
    n = 800
    steps = np.arange(n)
    early = np.minimum(0.35, 0.08 + 0.09 * steps)
    later = np.clip((steps - 16) / 134, 0.0, 1.0)
    test_acc = np.round(2000 * (early + 0.4 * later)) / 2000
    train_acc = np.minimum(1.0, early + 0.65 * np.clip((steps - 16) / 174, 0.0, 1.0))
    train_loss = 2.3 * (1.02 - train_acc)
    rows = {"train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
    results = _at_cadences(rows, n, (1, 10))
    assert [k for k, _ in results[1]] == ["PHASE_CHANGE", "PHASE_CHANGE"], results
    assert results[1][1][1] >= 140, results
    assert [k for k, _ in results[10]] == ["PHASE_CHANGE", "PHASE_CHANGE"], results
    assert abs(results[10][1][1] - results[1][1][1]) <= 10, results


def test_a_run_whose_training_accuracy_never_fits_stabilises_once_both_have_levelled_off() -> None:
    # Label noise: training accuracy levels off at 0.90 (never fitted_accuracy) by step
    # ~7 000 and held-out accuracy at 0.80; both stay there to step 20 000. Stable from
    # where held-out accuracy is within the tolerance of its level, at every cadence
    # (before: "abstraction" for the whole run, the stretch waiting for a fit that
    # never comes).
    rng = np.random.default_rng(3)
    n = 20000
    steps = np.arange(n)
    train_acc = np.clip(0.9 - 0.8 * np.exp(-steps / 1500) + 0.004 * rng.standard_normal(n), 0, 1)
    test_acc = np.clip(0.8 - 0.7 * np.exp(-steps / 1500) + 0.004 * rng.standard_normal(n), 0, 1)
    train_loss = 0.35 + 1.9 * np.exp(-steps / 1500)
    rows = {"train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
    results = _at_cadences(rows, n, (1, 10, 50))
    # Where the stretch starts moves by a few hundred steps with the cadence (a long
    # dense log sees noise extremes a sparse one does not: the known limit of the
    # stable stretch, not of this rule).
    for every, found in results.items():
        stable = [s for k, s in found if k == "PHASE_CHANGE"][1:]
        assert len(stable) == 1 and 4000 <= stable[0] <= 8000, (every, results)


def test_without_a_training_accuracy_the_training_loss_says_where_it_levelled_off() -> None:
    # A Hugging Face Trainer's log: training loss, held-out accuracy, no training
    # accuracy. The loss levels off at 0.35 (never 1 % of its first value: never
    # "memorised") and held-out accuracy at 0.80: stable, as with the accuracy; while
    # the loss still falls 5 % every 1 000 steps, not.
    rng = np.random.default_rng(4)
    n = 20000
    steps = np.arange(n)
    test_acc = np.clip(0.8 - 0.7 * np.exp(-steps / 1500) + 0.004 * rng.standard_normal(n), 0, 1)
    flat = 0.35 + 1.9 * np.exp(-steps / 1500)
    for train_loss, stabilises in ((flat, True), (flat * np.exp(-steps / 20000), False)):
        results = _at_cadences({"train_loss": train_loss, "test_acc": test_acc}, n, (10,))
        stable = [s for k, s in results[10] if k == "PHASE_CHANGE"][1:]
        assert (len(stable) == 1 and 4000 <= stable[0] <= 8000) if stabilises else not stable, results


def test_a_pre_trained_model_that_improves_from_a_high_level_generalises() -> None:
    # Fine-tuning a pre-trained classifier: held-out accuracy 0.86 at the first
    # evaluation, 0.91 by step ~2 000 (never 0.10 above where it started). It
    # generalised further: abstraction once it is a quarter of the way to 1 above
    # its early level (0.035), not "instability" for the whole run.
    n = 6000
    steps = np.arange(n)
    test_acc = 0.91 - 0.05 * np.exp(-steps / 500)
    train_loss = 0.25 + 0.45 * np.exp(-steps / 600)
    results = _at_cadences({"train_loss": train_loss, "test_acc": test_acc}, n, (1, 10, 50))
    for every, found in results.items():
        changes = [s for k, s in found if k == "PHASE_CHANGE"]
        # 0.86 + 0.035 is reached at step ~650.
        assert changes and 600 <= changes[0] <= 700 + every, (every, results)


@pytest.mark.parametrize("every", [10, 1000])
def test_a_run_logged_from_a_trained_model_is_stable_not_instability_nor_grokking(every: int) -> None:
    # A converged checkpoint resumed: training accuracy 0.97 (never "fitted"),
    # held-out 0.99 from the first line, every series flat. A reader calls it stable
    # from the start; the labeller kept it in "instability" for good (no onset can
    # rise 0.02 above 0.99), so nothing about it ever settled. Logged every 1 000
    # steps, the onset's confirmation is more than grokking's 500-step delay after
    # "memorisation": still no grokking.
    rng = np.random.default_rng(3)
    rows = [{"train_loss": 0.05 * math.exp(rng.normal(0, 0.05)),
             "train_acc": float(rng.binomial(512, 0.97)) / 512,
             "test_acc": float(rng.binomial(2048, 0.99)) / 2048} for _ in range(300)]
    det = run(rows, every=every)
    changes = [(e.evidence["to"], e.step) for e in det.events_so_far if e.kind is EventKind.PHASE_CHANGE]
    assert changes[0] == ("abstraction", 0)
    assert [to for to, _ in changes][-1] == "stabilization"
    assert not kinds(det, EventKind.GROKKING_ONSET, EventKind.GROKKING_COMPLETE, EventKind.HIDDEN_PROGRESS)
    # An early level below grokked accuracy still needs its rise (the fine-tune above).
    low = [{**row, "test_acc": row["test_acc"] - 0.1} for row in rows]
    assert not [e for e in run(low, every=every).events_so_far if e.kind is EventKind.PHASE_CHANGE]


def test_loss_spikes_do_not_pass_for_the_held_out_accuracy_s_noise() -> None:
    # A memorised run whose held-out accuracy creeps from 0.60 to 0.75 over 6 000 steps
    # (never stable: 0.15 is fifteen tolerances), with a loss spike every 350 steps
    # that drags it 0.25 down for one line. Logged every 50 steps, one line in seven is
    # a spike: read as noise, it made a tolerance of ~0.3 and a "stable" creep.
    n = 6000
    steps = np.arange(n)
    spiked = (steps % 350 == 100) & (steps > 400)
    train_loss = np.where(spiked, 2.0, 2.3 * np.exp(-steps / 30) + 0.01)
    train_acc = np.where(spiked, 0.3, np.minimum(1.0, 0.1 + steps / 100))
    test_acc = 0.1 + 0.5 * np.minimum(1.0, steps / 300) + 0.15 * steps / n - np.where(spiked, 0.25, 0.0)
    rows = {"train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
    results = _at_cadences(rows, n, (50,))
    assert not [s for k, s in results[50] if k == "PHASE_CHANGE"][1:], results


def test_a_held_out_accuracy_that_settles_a_little_below_its_peak_stabilises() -> None:
    # A healthy run with a generalisation gap: held-out accuracy peaks at 0.785 near
    # step 200, then settles 0.012 lower and stays there for 1 300 steps. Within the
    # tolerance of its own level it is stable; measured against the peak it never was.
    n = 1500
    steps = np.arange(n)
    rise = 0.785 * (1 - np.exp(-steps / 20))
    settle = 0.012 * np.clip((steps - 200) / 60, 0.0, 1.0)
    test_acc = np.round(2000 * (rise - settle)) / 2000
    train_acc = np.minimum(1.0, 0.05 + steps / 200)
    rows = {"train_loss": 2.3 * (1.02 - train_acc), "train_acc": train_acc, "test_acc": test_acc}
    results = _at_cadences(rows, n, (1, 10))
    for every in (1, 10):
        assert [k for k, _ in results[every]] == ["PHASE_CHANGE", "PHASE_CHANGE"], results
        assert 200 <= results[every][1][1] <= 300, results


def test_a_stretch_after_a_falling_edge_starts_at_the_same_step_at_every_cadence() -> None:
    # Held-out accuracy peaks at 0.785 near step 200 and falls 0.02 (twice the
    # tolerance) over the next 100 steps, then holds. The stable stretch starts on the
    # falling edge, where the level (a median of three lines) comes within the tolerance
    # of the lows after it. That median is the level at its middle line: dated at its
    # newest line it lags one line, which is 50 steps logged every 50 (the stretch
    # started 72 steps late, and 12 late logged every 10).
    n = 1500
    steps = np.arange(n)
    rise = 0.785 * (1 - np.exp(-steps / 20))
    settle = 0.02 * np.clip((steps - 200) / 100, 0.0, 1.0)
    test_acc = np.round(2000 * (rise - settle)) / 2000
    train_acc = np.minimum(1.0, 0.05 + steps / 200)
    rows = {"train_loss": 2.3 * (1.02 - train_acc), "train_acc": train_acc, "test_acc": test_acc}
    results = _at_cadences(rows, n, (1, 10, 50))
    for every in (1, 10, 50):
        assert [k for k, _ in results[every]] == ["PHASE_CHANGE", "PHASE_CHANGE"], results
    assert 220 <= results[1][1][1] <= 300, results
    for every in (10, 50):
        assert abs(results[every][1][1] - results[1][1][1]) <= every, results


def test_a_one_line_spike_on_a_coarsely_logged_falling_loss_is_seen_at_every_cadence() -> None:
    # A loss falling 0.05 decades every 50 steps with 1 % noise, and a 2x one-step
    # spike: logged every 50 steps, the fall between lines is not noise, and the
    # median of the band lags the fall; the spike must still be seen.
    rng = np.random.default_rng(3)
    n = 2000
    steps = np.arange(n)
    loss = 2.3 * (1 + steps / 40.0) ** -0.5 * np.exp(0.01 * rng.standard_normal(n))
    loss[1000] *= 2.0
    for every in (1, 10, 50):
        det = RunDetector()
        for s in range(0, n, every):
            det.update(s, {"train_loss": float(loss[s])})
        spikes = kinds(det, EventKind.LOSS_SPIKE, EventKind.COLLAPSE_ONSET)
        assert spikes == [("LOSS_SPIKE", 1000)], (every, spikes)


def test_evaluation_every_fifth_line_still_sees_generalisation() -> None:
    rows = grokking_rows(mem_line=10, onset_line=150, n=400)
    sparse = [r if i % 5 == 0 else {k: v for k, v in r.items() if not k.startswith("test")}
              for i, r in enumerate(rows)]
    det = run(sparse)
    assert kinds(det, EventKind.GROKKING_ONSET)
    assert [e for e in det.events_so_far if e.kind is EventKind.HIDDEN_PROGRESS]


def lm_losses(n: int, every: int, rng: np.random.Generator) -> list[dict[str, float]]:
    """A language model's losses: fast fall, then a slow one that goes on to the end."""
    rows = []
    for i in range(n):
        s = i * every
        level = 3.0 + 7.0 * math.exp(-s / 200) + 1.0 * (1 - s / (n * every)) ** 2
        rows.append({"train_loss": level * math.exp(0.01 * rng.standard_normal()),
                     "val_loss": level + 0.05})
    return rows


def test_a_loss_only_run_is_not_stable_while_its_loss_still_falls() -> None:
    rng = np.random.default_rng(8)
    det = run(lm_losses(2000, 10, rng))
    phases = [s.phase for s in det.segments()]
    assert Phase.ABSTRACTION in phases
    for seg in det.segments():
        if seg.phase is Phase.STABILIZATION:  # from here the loss falls < 0.05 nats more
            val = 3.0 + 1.0 * (1 - seg.start_step / 20000) ** 2
            assert val - 3.0 < 0.1, seg


def finetune_losses(n: int, every: int, rng: np.random.Generator) -> list[dict[str, float]]:
    """A fine-tuning run on a small set: the validation loss falls from 2.2 to 1.95 by
    step 300, then turns up to 2.1 by the end (overfitting) while the training loss
    falls from 2.2 to 1.0 all along."""
    rows = []
    for i in range(n):
        s = i * every
        val = 1.95 + 0.25 * math.exp(-s / 80) + 0.15 * max(0.0, s - 300) / (n * every - 300)
        train = 1.0 + 1.2 * math.exp(-s / (0.4 * n * every))
        rows.append({"train_loss": train * math.exp(0.02 * rng.standard_normal()), "val_loss": val})
    return rows


def test_a_validation_loss_that_turns_up_while_training_still_falls_is_not_stable() -> None:
    rng = np.random.default_rng(9)
    det = run(finetune_losses(150, 10, rng))
    assert Phase.STABILIZATION not in [s.phase for s in det.segments()]
    # Once the training loss has settled too (a longer run), the run stabilises.
    det = run(finetune_losses(150, 10, rng) + [
        {"train_loss": 1.0 * math.exp(0.02 * rng.standard_normal()), "val_loss": 2.1} for _ in range(600)])
    assert Phase.STABILIZATION in [s.phase for s in det.segments()]


def test_a_state_from_before_the_early_level_and_the_falls_were_kept_resumes() -> None:
    # A checkpoint written before ``val_low`` and ``val_fall`` existed: the onset is
    # measured from the early level it had, the falls' mean starts at the noise it had
    # measured (not at infinity, which would make it NaN), and grokking is still found.
    rows = grokking_rows(mem_line=10, onset_line=150, n=400)
    first = run(rows[:180])
    state = json.loads(json.dumps(first.labeller.state()))
    old = state["generalisation"]
    noise = old["val_noise"]
    del old["val_low"], old["val_fall"]
    resumed = run(rows[:180])
    resumed.labeller = PhaseLabeller.from_state(state)
    resumed.labeller.set_specs(resumed.specs)
    rule = resumed.labeller.generalisation
    assert rule.val_low == rule.val_base
    assert rule.val_fall * math.sqrt(math.pi) == pytest.approx(noise)
    for i, row in enumerate(rows[180:], start=180):
        resumed.update(i * 10, row)
    assert math.isfinite(resumed.labeller.generalisation.val_fall)
    found = [e for e in resumed.events_so_far if e.kind is EventKind.GROKKING_ONSET]
    assert len(found) == 1 and found[0].detected_at >= 1800  # after the resume


def test_a_state_from_before_the_training_metric_s_history_was_kept_resumes() -> None:
    # Checkpoints written before the training metric's history (it starts at the
    # resume) and before it could hold a loss (a history with bins held the accuracy).
    rows = grokking_rows(mem_line=10, onset_line=150, n=400)
    whole = run(rows)
    for missing in (("train_history", "train_level_at", "train_by_loss"), ("train_by_loss",)):
        first = run(rows[:5])  # before memorisation: the history has bins
        state = json.loads(json.dumps(first.labeller.state()))
        old = state["generalisation"]
        assert old["train_history"]["starts"] and old["train_by_loss"] is False
        for name in missing:
            del old[name]
        resumed = run(rows[:5])
        resumed.labeller = PhaseLabeller.from_state(state)
        resumed.labeller.set_specs(resumed.specs)
        rule = resumed.labeller.generalisation
        assert rule.train_by_loss is (None if len(missing) == 3 else False)
        for i, row in enumerate(rows[5:], start=5):
            resumed.update(i * 10, row)
        assert resumed.segments() == whole.segments()


def test_streamed_phase_changes_rebuild_the_final_timeline() -> None:
    rng = np.random.default_rng(9)
    rows = lm_losses(1500, 10, rng)
    rows[900]["train_loss"] *= 1.9  # a one-step spike in a language model's loss
    det = run(rows)
    changes = [e for e in det.events_so_far if e.kind is EventKind.PHASE_CHANGE]
    rebuilt = [(0, Phase.INSTABILITY)] + [(e.step, e.phase) for e in changes]
    assert [(s.start_step, s.phase) for s in det.segments()] == rebuilt
    assert kinds(det, EventKind.LOSS_SPIKE) == [("LOSS_SPIKE", 9000)]


def test_labeller_state_is_plain_data_and_resumes_identically() -> None:
    rows = grokking_rows(mem_line=10, onset_line=150, n=400)
    whole = run(rows)
    first = run(rows[:180])
    state = json.loads(json.dumps(first.labeller.state()))  # plain data: survives JSON
    resumed = run(rows[:180])
    resumed.labeller = PhaseLabeller.from_state(state)
    resumed.labeller.set_specs(resumed.specs)
    for i, row in enumerate(rows[180:], start=180):
        resumed.update(i * 10, row)
    assert resumed.segments() == whole.segments()
    assert json.dumps(resumed.labeller.state()) == json.dumps(whole.labeller.state())
