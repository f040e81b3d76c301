"""The event economy: which series events reach the user."""

from __future__ import annotations

import json

from detector.core.economy import EventEconomy, group_of
from detector.core.types import Event, EventKind, infer_spec


def cp(step: int, series: str, **evidence: str) -> Event:
    return Event(step=step, kind=EventKind.CHANGE_POINT, detected_at=step, series=series, evidence=evidence)


def plateau(step: int, series: str, start: bool = True) -> Event:
    kind = EventKind.PLATEAU_START if start else EventKind.PLATEAU_END
    return Event(step=step, kind=kind, detected_at=step, series=series)


def test_per_layer_series_share_one_allowance_and_the_next_event_says_what_was_held() -> None:
    economy = EventEconomy(burst=2, lines_per_event=100)
    events = [cp(10 * i, f"layer{i}.weight_norm") for i in range(6)]
    kept = economy.filter(events, [1] * 6)
    assert [e.series for e in kept] == ["layer0.weight_norm", "layer1.weight_norm"]
    # 100 lines later one more token: the 4 held back are named on it.
    [later] = economy.filter([cp(5000, "layer9.weight_norm")], [101])
    assert later.evidence["suppressed"] == "4"
    assert group_of("blocks.11.attn.norm") == group_of("blocks.3.attn.norm") != group_of("val_loss")


def test_the_norms_of_a_run_share_one_allowance_its_losses_their_own() -> None:
    # A muon run's cycle moves the parameter, gradient and update norms at once: one
    # allowance for all of them, so the losses still speak.
    names = ("weight_norm", "grad_norm", "aux_grad_norm", "unembed_norm", "train_loss", "test_loss")
    specs = {n: infer_spec(n) for n in names}
    economy = EventEconomy(burst=2, lines_per_event=100)
    kept = economy.filter([cp(10 * i, n) for i, n in enumerate(names)], [1] * len(names), specs)
    assert [e.series for e in kept] == ["weight_norm", "grad_norm", "train_loss", "test_loss"]
    # Without specs (roles unknown) each kind keeps its own.
    assert len(EventEconomy(burst=2).filter([cp(10 * i, n) for i, n in enumerate(names)], [1] * 6)) == 6


def test_a_long_stationary_stretch_gets_at_most_one_event_per_100_lines() -> None:
    economy = EventEconomy()
    lines = list(range(1, 5001, 5))  # an event every 5 lines for 5000 lines
    kept = economy.filter([cp(line, "grad_norm") for line in lines], lines)
    assert len(kept) <= economy.burst + 5000 / 100


def test_plateaus_come_one_at_a_time_change_points_in_a_burst() -> None:
    economy = EventEconomy(burst=8)
    flaps = [plateau(i, "weight_norm", start=i % 2 == 0) for i in range(6)]
    # The first start, and its end (it resolves what was told); the next starts are
    # held back, and so are their ends.
    assert [(e.step, e.kind) for e in economy.filter(flaps, [1] * 6)] == [
        (0, EventKind.PLATEAU_START), (1, EventKind.PLATEAU_END)]
    economy = EventEconomy(burst=8)
    assert len(economy.filter([cp(i, "test_loss") for i in range(6)], [1] * 6)) == 6
    # Change points do not use up the plateau's turn.
    assert len(economy.filter([plateau(7, "test_loss")], [1])) == 1


def test_a_change_point_of_an_accuracy_pinned_at_its_bound_is_dropped() -> None:
    economy = EventEconomy()
    specs = {n: infer_spec(n) for n in ("train_acc", "train_pct_acc", "train_loss")}
    events = [cp(1, "train_acc", before="0.999", after="1"),      # pinned at 1
              cp(2, "train_pct_acc", before="99.95", after="100"),  # pinned at 100 %
              cp(3, "train_acc", before="0.9", after="1"),          # a real rise
              cp(4, "train_loss", before="0.999", after="1")]       # not an accuracy
    assert [e.step for e in economy.filter(events, [1] * 4, specs)] == [3, 4]


def test_run_level_events_pass_untouched_and_state_is_plain_data() -> None:
    economy = EventEconomy(burst=1)
    spike = Event(step=5, kind=EventKind.LOSS_SPIKE, detected_at=6, series="train_loss")
    kept = economy.filter([cp(1, "a"), cp(2, "a"), spike], [1, 1, 1])
    assert [e.kind for e in kept] == [EventKind.CHANGE_POINT, EventKind.LOSS_SPIKE]
    restored = EventEconomy.from_state(json.loads(json.dumps(economy.state())))
    assert restored.state() == economy.state()


def phase_change(line: int, to: str) -> Event:
    return Event(step=line, kind=EventKind.PHASE_CHANGE, detected_at=line, series="train_loss",
                 evidence={"from": "abstraction", "to": to})


def test_a_stabilised_run_has_no_burst_until_it_leaves_stabilization() -> None:
    economy = EventEconomy(burst=8, lines_per_event=100)
    # Changes while the run learns come in a burst.
    assert len(economy.filter([cp(i, "weight_norm") for i in range(5)], [1] * 5)) == 5
    # Stabilised: the allowance starts empty and refills to one per 100 lines,
    # although the burst would have refilled by line 900.
    stable = [phase_change(100, "stabilization")] + [cp(s, "weight_norm") for s in range(110, 1000, 10)]
    lines = [100] + list(range(110, 1000, 10))
    kept = [e for e in economy.filter(stable, lines) if e.kind is EventKind.CHANGE_POINT]
    assert [e.step for e in kept] == [200, 300, 400, 500, 600, 700, 800, 900]
    assert kept[0].evidence["suppressed"] == "9"
    # A collapse ends the stable stretch: the allowance refills past one again
    # (600 lines since the last event at line 900: six).
    back = [phase_change(1000, "collapse")] + [cp(s, "weight_norm") for s in range(1500, 1510)]
    kept = economy.filter(back, [1000] + [1500] * 10)
    assert sum(e.kind is EventKind.CHANGE_POINT for e in kept) == 6
    restored = EventEconomy.from_state(json.loads(json.dumps(economy.state())))
    assert restored.state() == economy.state() and not restored.settled


def test_a_grokked_run_that_never_stabilises_is_settled_outside_its_collapses() -> None:
    economy = EventEconomy(burst=8, lines_per_event=100)
    # Three changes before grokking leave five events of burst unspent ...
    assert len(economy.filter([cp(i, "max_update") for i in range(3)], [1] * 3)) == 3
    grokked = Event(step=300, kind=EventKind.GROKKING_COMPLETE, detected_at=300, series="test_acc")
    wander = [grokked] + [cp(s, "max_update") for s in range(350, 950, 50)]
    kept = economy.filter(wander, [300] + list(range(350, 950, 50)))
    # ... which a wandering series does not spend after it: one per 100 lines.
    assert [e.step for e in kept if e.kind is EventKind.CHANGE_POINT] == [400, 500, 600, 700, 800, 900]
    # A collapse is not settled; its end (back to abstraction) settles the run again.
    economy.filter([phase_change(1000, "collapse")], [1000])
    assert not economy.settled
    economy.filter([phase_change(1100, "abstraction")], [1100])
    restored = EventEconomy.from_state(json.loads(json.dumps(economy.state())))
    assert restored.settled_at == 1100 and restored.grokked


def test_a_change_point_that_keeps_a_rhythm_is_held_after_three() -> None:
    economy = EventEconomy(burst=20, lines_per_event=1)
    # A sawtooth: up every ~30 steps (one tooth unseen at 140), with a down move between.
    teeth = [cp(s, "balance", direction="up") for s in (20, 49, 80, 110, 171, 200)]
    drop = cp(125, "balance", direction="down")
    events = sorted([*teeth, drop], key=lambda e: e.step)
    kept = economy.filter(events, [e.step for e in events])
    assert [e.step for e in kept] == [20, 49, 80, 125]
    assert kept[-1].evidence["suppressed"] == "1"  # the tooth at 110
    # Off the rhythm is news again, and starts a new count.
    later = [cp(290, "balance", direction="up"), cp(300, "balance", direction="up")]
    kept = economy.filter(later, [290, 300])
    assert [e.step for e in kept] == [290, 300]
    assert kept[0].evidence["suppressed"] == "2"  # 171 (a tooth unseen at 140) and 200
    restored = EventEconomy.from_state(json.loads(json.dumps(economy.state())))
    assert restored.state() == economy.state()


def test_changes_at_uneven_spacings_are_never_a_rhythm() -> None:
    economy = EventEconomy(burst=20, lines_per_event=1)
    steps = [10, 40, 55, 120, 130, 210, 290, 300, 330]  # a run of real changes, all one way
    kept = economy.filter([cp(s, "level", direction="up") for s in steps], steps)
    assert [e.step for e in kept] == steps


def test_a_series_first_heard_from_in_a_stable_stretch_waits_its_turn_too() -> None:
    economy = EventEconomy(burst=8, lines_per_event=100)
    kept = economy.filter([phase_change(50, "stabilization"), cp(80, "top_sv"), cp(160, "top_sv")],
                          [50, 80, 160])
    assert [e.step for e in kept if e.kind is EventKind.CHANGE_POINT] == [160]
    assert EventEconomy.from_state(json.loads(json.dumps(economy.state()))).settled_at == 50


def test_a_plateau_end_goes_with_its_start() -> None:
    economy = EventEconomy(burst=8)
    assert len(economy.filter([plateau(1, "layer1.norm")], [1])) == 1
    # A start of the group within the same 100 lines is held back; its end goes with it.
    assert economy.filter([plateau(2, "layer2.norm"), plateau(3, "layer2.norm", start=False)], [2, 3]) == []
    resumed = EventEconomy.from_state(json.loads(json.dumps(economy.state())))
    # The first series' end resolves what was told, whatever the allowance.
    assert len(resumed.filter([plateau(4, "layer1.norm", start=False)], [4])) == 1
    assert resumed.open_plateaus == set()
