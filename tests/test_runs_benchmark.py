"""The scoring functions of ``benchmarks.runs`` on hand-made labels and events (no subprocess)."""

from __future__ import annotations

import json

from benchmarks import runs as bench

STEPS = list(range(0, 5010, 10))  # 501 lines, every 10 steps


def ev(kind: str, step: int, detected: int | None = None, series: str = "train_loss",
       **evidence: str) -> dict:
    return {"kind": kind, "step": step, "detected_at_step": step if detected is None else detected,
            "series": series, "evidence": evidence, "phase": None}


def score(labels: dict, events: list[dict], segments: list[dict] | None = None, steps=STEPS,
          name: str = "run") -> bench.RunScore:
    return bench.score_run(name, "test", labels, {"events": events, "segments": segments or []}, steps)


# --- 1, 2 grokking and hidden progress ----------------------------------------------------


def test_grokking_recall_false_grokking_and_early_warning():
    grok = {"is_grokking": True, "grokking_onset_step": 1400, "grokking_step": 2600}
    s = score(grok, [ev("HIDDEN_PROGRESS", 1100, 1140), ev("GROKKING_ONSET", 1370, 1390)])
    assert (s.onset_found, s.warning_early, s.warning_lead) == (True, True, 300)
    late = score(grok, [ev("HIDDEN_PROGRESS", 1300, 1400)])
    assert (late.onset_found, late.warning_early) == (False, False)
    nogrok = score({"is_grokking": False}, [ev("GROKKING_ONSET", 900), ev("HIDDEN_PROGRESS", 800)])
    assert (nogrok.false_grokking, nogrok.false_warning, nogrok.onset_found) == (True, True, None)
    assert score({}, [ev("GROKKING_ONSET", 900)]).false_grokking is None  # labels say nothing
    # A log that stops while its labelled onset is under way: the warning is not scored.
    cut = {"is_grokking": False, "kinds": ["never_grokking", "ends_early"], "grokking_onset_step": 7800}
    assert score(cut, [ev("HIDDEN_PROGRESS", 1200)]).false_warning is None
    assert score({**cut, "grokking_onset_step": None}, [ev("HIDDEN_PROGRESS", 1200)]).false_warning is True


# --- 3, 4 sustained collapses, standing and false collapses ------------------------------------


def test_sustained_collapse_found_within_tolerance_with_delay():
    labels = {"collapse_kind": "sustained_collapse", "collapse_step": 1220}
    s = score(labels, [ev("COLLAPSE_ONSET", 1230, 1260, scope="training")])
    assert (s.sustained_found, s.sustained_delay, s.standing) == (True, 40, 0)
    # tolerance = max(5 lines, 5% of 5000 steps) = 250: an onset 300 steps off is not found
    far = score(labels, [ev("COLLAPSE_ONSET", 1520, scope="training")])
    assert far.sustained_found is False
    # a generalisation-scope onset does not find a training collapse
    assert score(labels, [ev("COLLAPSE_ONSET", 1220, scope="generalization")]).sustained_found is False


def test_a_sustained_collapse_label_within_the_recovery_window_of_the_end_is_not_scored():
    labels = {"log_every": 10, "collapse_kind": "sustained_collapse", "collapse_step": 2790,
              "last_step": 2810, "label_rules": {"RECOVER_WINDOW": 200},
              "train_collapse_kind": "transient", "train_collapse_episodes": [[2790, 2790, True]]}
    assert bench.sustained_step(labels) is None  # two lines before the end: it may recover
    assert bench.sustained_step(dict(labels, last_step=2990)) == 2790
    assert bench.sustained_step(dict(labels, collapse_kind="divergence_nonfinite")) == 2790


def test_sustained_label_from_train_collapse_episodes():
    labels = {"log_every": 10, "train_collapse_kind": "sustained",
              "train_collapse_episodes": [[300, 320, True], [4000, 5000, False]]}
    assert bench.sustained_step(labels) == 4000
    s = score(labels, [ev("COLLAPSE_ONSET", 4010)])  # scope-less counts as training
    assert s.sustained_found is True
    assert bench.sustained_step({"train_collapse_kind": "transient",
                                 "train_collapse_episodes": [[300, 320, True]]}) is None


def test_collapse_without_end_on_transient_run_is_standing():
    labels = {"collapse_kind": "transient_spike", "collapse_step": 4480, "collapse_recovered_step": 4490}
    standing = score(labels, [ev("COLLAPSE_ONSET", 4480, scope="training")])
    assert standing.standing == 1 and standing.standing_steps == [4480]
    ended = score(labels, [ev("COLLAPSE_ONSET", 4480, scope="training"),
                           ev("COLLAPSE_END", 4520, scope="training")])
    assert ended.standing == 0
    # an end of the other scope does not close it
    other = score(labels, [ev("COLLAPSE_ONSET", 4480, scope="training"),
                           ev("COLLAPSE_END", 4520, scope="generalization")])
    assert other.standing == 1


def test_end_closes_only_one_onset():
    events = [ev("COLLAPSE_ONSET", 1000, scope="training"), ev("COLLAPSE_ONSET", 2000, scope="training"),
              ev("COLLAPSE_END", 2100, scope="training")]
    pairs = bench.collapse_pairs(events)
    assert [(on["step"], end and end["step"]) for on, end in pairs] == [(1000, None), (2000, 2100)]
    assert score({"collapse_kind": None}, events).standing == 1


def test_standing_excused_by_sustained_label_but_not_before_it():
    labels = {"collapse_kind": "divergence_nonfinite", "collapse_step": 3000}
    assert score(labels, [ev("COLLAPSE_ONSET", 3050)]).standing == 0
    assert score(labels, [ev("COLLAPSE_ONSET", 2800)]).standing == 0  # within tolerance 250
    early = score(labels, [ev("COLLAPSE_ONSET", 1000), ev("COLLAPSE_ONSET", 3000)])
    assert early.standing == 1 and early.standing_steps == [1000]


def test_false_collapses_only_on_quiet_runs():
    quiet = {"collapse_kind": None, "collapse_step": None}
    assert score(quiet, [ev("COLLAPSE_ONSET", 1000), ev("COLLAPSE_END", 1100)]).false_collapses == 1
    assert score(quiet, [ev("COLLAPSE_ONSET", 1000, scope="generalization")]).false_collapses == 0
    spiky = {"collapse_kind": None, "spikes": [[1000, 1010, 1.7, True]]}
    assert score(spiky, [ev("COLLAPSE_ONSET", 1000)]).false_collapses is None
    assert score({}, [ev("COLLAPSE_ONSET", 1000)]).false_collapses is None  # labels say nothing


# --- 5 spikes ----------------------------------------------------------------------------------


def test_spike_outside_window_is_not_found():
    labels = {"log_every": 10, "spikes": [[2000, 2030, 3.0, True], [4000, 4000, 1.6, True],
                                          [4500, 4600, 5.0, False]]}
    inside = score(labels, [ev("LOSS_SPIKE", 2050)])  # last + 2 lines
    assert (inside.spikes, inside.spikes_found) == (1, 1)  # 1.6x and unrecovered ones not in recall
    outside = score(labels, [ev("LOSS_SPIKE", 2060), ev("LOSS_SPIKE", 1970)])
    assert (outside.spikes, outside.spikes_found) == (1, 0)
    both = score(labels, [ev("LOSS_SPIKE", 1980), ev("LOSS_SPIKE", 3990)])
    assert (both.spikes_found, both.spikes15, both.spikes15_found) == (1, 2, 2)


def test_a_chain_of_fragments_is_one_excursion_with_its_peak():
    # The labels cut one slow recovery into pieces where it dips under their bound:
    # unrecovered ones (high again within the recovery window) and the recovered one
    # that ends the chain are one excursion, as high as its highest piece.
    labels = {"log_every": 10, "spikes": [[1100, 1250, 6.0, False], [1270, 1280, 1.6, True],
                                          [3000, 3000, 1.7, False], [3100, 3300, 2.5, False]]}
    assert bench.spike_windows(labels) == [(1100, 1280)]  # a chain that never recovers is none
    found = score(labels, [ev("LOSS_SPIKE", 1100, duration_steps="100")])
    assert (found.spikes, found.spikes_found, found.spikes15, found.spikes15_found) == (1, 1, 1, 1)
    late = score(labels, [ev("LOSS_SPIKE", 1400)])  # after the tail + 2 lines
    assert (late.spikes, late.spikes_found) == (1, 0)
    broken = dict(labels, spikes=[[1100, 1250, 6.0, True], [1270, 1280, 1.6, True]])
    assert bench.spike_windows(broken, 1.5) == [(1100, 1250), (1270, 1280)]


def test_spike_found_by_ended_collapse_only():
    labels = {"log_every": 100, "train_collapse_episodes": [[2100, 2200, True], [9000, 9900, False]]}
    assert bench.spike_windows(labels) == [(2100, 2200)]
    steps = list(range(0, 10_001, 100))
    ended = score(labels, [ev("COLLAPSE_ONSET", 2100), ev("COLLAPSE_END", 2500)], steps=steps)
    assert (ended.spikes, ended.spikes_found) == (1, 1)
    open_ = score(labels, [ev("COLLAPSE_ONSET", 2100)], steps=steps)
    assert open_.spikes_found == 0 and open_.standing == 1
    shared = {"collapse_kind": "transient_spike", "collapse_step": 4480, "collapse_recovered_step": 4490}
    assert bench.spike_windows(shared) == [(4480, 4490)]
    assert score(shared, [ev("LOSS_SPIKE", 4510)]).spikes_found == 1
    assert score(shared, [ev("LOSS_SPIKE", 4520)]).spikes_found == 0


# --- 6 generalisation collapses ----------------------------------------------------------------------


def test_generalisation_collapse_needs_generalisation_scope():
    steps = list(range(0, 100_001, 100))
    labels = {"log_every": 100, "train_collapse_episodes": [[50_000, 50_100, True]],
              "generalization_collapse_episodes": [[20_000, 20_500, True], [30_000, 30_300, True],
                                                   [50_000, 50_400, True], [60_000, 60_000, True]]}
    s = score(labels, [ev("COLLAPSE_ONSET", 20_100, scope="generalization"),
                       ev("COLLAPSE_END", 20_600, scope="generalization"),
                       ev("COLLAPSE_ONSET", 30_000, scope="training"),
                       ev("COLLAPSE_ONSET", 50_000, scope="training")], steps=steps)
    # 60 000 is one line: not scored; 50 000 overlaps a train collapse: any scope finds it
    assert (s.gen_episodes, s.gen_found, s.gen_train_episodes, s.gen_train_found) == (2, 1, 1, 1)
    missed = score(labels, [ev("COLLAPSE_ONSET", 20_800, scope="generalization"),
                            ev("COLLAPSE_END", 21_000, scope="generalization")], steps=steps)
    assert missed.gen_found == 0  # 20 500 + 2 lines = 20 700
    # A collapse still open when an episode begins finds it (flagged before the 0.90 line).
    early = score(labels, [ev("COLLAPSE_ONSET", 19_000, scope="generalization"),
                           ev("COLLAPSE_END", 20_200, scope="generalization")], steps=steps)
    assert early.gen_found == 1


# --- 7 event economy ---------------------------------------------------------------------------------


def test_event_economy_rates_stationary_and_brackets():
    events = [ev("CHANGE_POINT", t, series="grad_norm") for t in range(100, 5000, 500)]  # 10 events
    events += [ev("CHANGE_POINT", 3000, series="test_acc"), ev("CHANGE_POINT", 3020, series="test_acc"),
               ev("PLATEAU_START", 3500, series="test_acc"), ev("GROKKING_ONSET", 1000, series="test_acc")]
    labels = {"phases": [[0, 2000, "instability"], [2000, 5010, "stabilization"]]}
    s = score(labels, events)
    assert s.economy_max_series == "grad_norm" and abs(s.economy_max - 100 * 10 / 501) < 1e-9
    assert s.economy_over == 1  # grad_norm 2.0; test_acc 3 / 501 lines = 0.6
    assert s.brackets == 1
    assert s.stationary_lines == 301
    assert abs(s.stationary_max - 100 * 6 / 301) < 1e-9 and s.stationary_over == 1  # test_acc 3 / 301
    spiky = dict(labels, spikes=[[3000, 3020, 4.0, True]])  # keeps [2950, 3220] out
    assert score(spiky, events).stationary_lines == 301 - 28
    # A stretch of 81 lines may hold one event (within one per 100 lines), not two.
    short = {"phases": [[0, 4200, "instability"], [4200, 5010, "stabilization"]]}
    one = score(short, [ev("CHANGE_POINT", 4600, series="w")])
    assert one.stationary_lines == 81 and one.stationary_max == 1.0 and one.stationary_over == 0
    two = score(short, [ev("CHANGE_POINT", 4600, series="w"), ev("CHANGE_POINT", 4900, series="w")])
    assert two.stationary_max == 2.0 and two.stationary_over == 1


# --- 8 cadence ----------------------------------------------------------------------------------------


def test_cadence_mismatch_detected():
    ref = [ev("GROKKING_ONSET", 1370), ev("LOSS_SPIKE", 2000), ev("CHANGE_POINT", 10)]
    assert bench.compare_cadence(ref, [ev("GROKKING_ONSET", 1400), ev("LOSS_SPIKE", 1990)], 50)[0]
    ok, bad, text = bench.compare_cadence(ref, [ev("GROKKING_ONSET", 1500), ev("LOSS_SPIKE", 2000)], 50)
    assert not ok and "GROKKING_ONSET" in text and bad > 1
    ok, bad, text = bench.compare_cadence(ref, [ev("GROKKING_ONSET", 1370)], 50)
    assert not ok and bad == float("inf") and "LOSS_SPIKE count 1 vs 0" in text
    ok, _, text = bench.compare_cadence([ev("COLLAPSE_ONSET", 100, scope="training")],
                                        [ev("COLLAPSE_ONSET", 100, scope="generalization")], 50)
    assert not ok


def test_score_cadence_groups_by_base_and_uses_c1_reference():
    def member(name: str, cadence: int, events: list[dict], base: str | None = "g") -> tuple:
        labels = {"variant_of": base, "cadence": cadence, "log_every": cadence}
        return score(labels, events, name=name), events

    runs = {"g": member("g", 10, [ev("GROKKING_ONSET", 1370)], None),
            "g_c1": member("g_c1", 1, [ev("GROKKING_ONSET", 1365)]),
            "g_c50": member("g_c50", 50, [ev("GROKKING_ONSET", 1400)]),
            "g_e5": member("g_e5", 10, [ev("GROKKING_ONSET", 1600)]),
            "h_c10": member("h_c10", 10, [], "h"), "h_c50": member("h_c50", 50, [], "h")}
    result = bench.score_cadence(runs)
    assert result["g"]["reference"] == "g_c1" and result["g"]["variants"] == 3
    assert not result["g"]["passed"] and result["g"]["failures"] == ["g_e5"]
    assert "g_e5" in result["g"]["worst"]
    assert result["h"]["reference"] == "h_c10" and result["h"]["passed"]


def test_a_spike_between_two_lines_of_the_other_log_is_not_compared():
    def member(name: str, cadence: int, events: list[dict]) -> tuple:
        labels = {"variant_of": "s", "cadence": cadence, "log_every": cadence}
        return score(labels, events, name=name), events

    dense = [ev("LOSS_SPIKE", 1214, duration_steps="24"), ev("COLLAPSE_ONSET", 1277, scope="training")]
    sparse = [ev("COLLAPSE_ONSET", 1250, scope="training")]
    runs = {"s_c1": member("s_c1", 1, dense), "s_c50": member("s_c50", 50, sparse)}
    lines = {"s_c1": list(range(0, 2000)), "s_c50": list(range(0, 2000, 50))}
    assert bench.spikes_between_lines(dense, lines["s_c50"]) == [1214]  # 1214..1237: no line of 50
    assert bench.spikes_between_lines(dense, lines["s_c1"]) == []
    # The sparse log saw its tail (a spike at its next line): both are compared.
    assert bench.spikes_between_lines(dense, lines["s_c50"], [ev("LOSS_SPIKE", 1250)], 50) == []
    assert bench.score_cadence(runs, lines)["s"]["passed"]
    assert not bench.score_cadence(runs)["s"]["passed"]  # without the logs' lines: a count mismatch
    # Seen by the sparse log (a line at 1200 inside a longer excursion), it must be found there too.
    longer = [ev("LOSS_SPIKE", 1190, duration_steps="30"), ev("COLLAPSE_ONSET", 1277, scope="training")]
    runs["s_c1"] = member("s_c1", 1, longer)
    assert not bench.score_cadence(runs, lines)["s"]["passed"]


def test_a_collapse_too_brief_for_the_other_log_is_not_compared():
    def member(name: str, cadence: int, events: list[dict]) -> tuple:
        labels = {"variant_of": "t", "cadence": cadence, "log_every": cadence}
        return score(labels, events, name=name), events

    dip = [ev("COLLAPSE_ONSET", 2779, scope="generalization"),
           ev("PHASE_CHANGE", 2779, **{"from": "stabilization", "to": "collapse"}),
           ev("COLLAPSE_END", 2786, scope="generalization"),
           ev("PHASE_CHANGE", 2786, **{"from": "collapse", "to": "stabilization"})]
    lines = {"t_c1": list(range(3000)), "t_c10": list(range(0, 3000, 10))}
    assert bench.collapses_between_lines(dip, lines["t_c10"]) == [(2779, 2786)]  # one line of 10
    assert bench.collapses_between_lines(dip, lines["t_c1"]) == []  # seven lines of 1
    runs = {"t_c1": member("t_c1", 1, dip), "t_c10": member("t_c10", 10, [])}
    assert bench.score_cadence(runs, lines)["t"]["passed"]
    assert not bench.score_cadence(runs)["t"]["passed"]
    # Where the sparse log called it too, both are compared (here 40 steps apart: a failure).
    late = [ev("COLLAPSE_ONSET", 2820, scope="generalization"),
            ev("COLLAPSE_END", 2850, scope="generalization")]
    runs["t_c10"] = member("t_c10", 10, late)
    assert bench.collapses_between_lines(dip, lines["t_c10"], late, 50) == []
    assert not bench.score_cadence(runs, lines)["t"]["passed"]


# --- 9, 10 loss-only runs, streamed phases, agreement -------------------------------------------------


def test_premature_stabilization_and_streamed_mismatch():
    labels = {"loss_only": True, "settled_step": 3000, "log_every": 10}
    segments = [{"start_step": 0, "end_step": 2000, "phase": "instability"},
                {"start_step": 2000, "end_step": 5010, "phase": "stabilization"}]
    changes = [ev("PHASE_CHANGE", 2000, 2100, **{"from": "instability", "to": "stabilization"})]
    s = score(labels, changes, segments)
    assert s.premature is True and s.stream_mismatch == 0
    ok = [dict(seg, start_step=2990) if seg["phase"] == "stabilization" else dict(seg, end_step=2990)
          for seg in segments]
    assert score(labels, [], ok).premature is False
    late = [ev("PHASE_CHANGE", 2500, 2600, **{"from": "instability", "to": "stabilization"})]
    assert score(labels, late, segments).stream_mismatch == 50  # steps 2000..2490
    assert score({"loss_only": True}, [], segments).premature is None  # no settled_step


def test_phase_agreement_counts_memorisation_as_instability():
    labels = {"is_grokking": True, "grokking_onset_step": 1000, "grokking_step": 2000,
              "phases": [[0, 50, "instability"], [50, 1000, "memorisation"], [1000, 5010, "abstraction"]]}
    segments = [{"start_step": 0, "end_step": 1000, "phase": "instability"},
                {"start_step": 1000, "end_step": 4010, "phase": "abstraction"},
                {"start_step": 4010, "end_step": 5010, "phase": "stabilization"}]
    assert abs(score(labels, [], segments).phase_agreement - 401 / 501) < 1e-9


def test_summary_and_report_render(tmp_path):
    runs = [score({"is_grokking": True, "grokking_onset_step": 1400, "grokking_step": 2600},
                  [ev("GROKKING_ONSET", 1370)], name="a"),
            score({"collapse_kind": "transient_spike", "collapse_step": 4480}, [ev("COLLAPSE_ONSET", 4480)],
                  name="b")]
    summary = bench.summarise(runs)
    assert summary["grokking_recall"] == (1, 1) and summary["standing"] == 1
    assert summary["spike_recall"] == (0, 1)
    text = bench.format_report(runs, {"test": summary, "TOTAL": summary})
    assert "TOTAL" in text and "1/1" in text
    json.dumps(summary)  # serialisable


def test_read_run_counts_finite_points(tmp_path):
    log = tmp_path / "r.jsonl"
    log.write_text('{"step": 0, "train_loss": 1.0, "test_acc": null}\n{"step": 10, "train_loss": 0.5}\n')
    assert bench.read_run(log) == ([0, 10], 2)


def test_a_chain_of_unrecovered_spikes_leads_into_the_collapse():
    # Each rose again before it had recovered; the last holds the divergence.
    labels = {"log_every": 10, "collapse_kind": "divergence_nonfinite", "collapse_step": 1010,
              "spikes": [[830, 830, 2.1, False], [900, 900, 1.7, False], [990, 1310, 1e69, False]]}
    assert bench.sustained_start(labels, 1010) == 830
    steps = list(range(0, 1320, 10))  # tolerance max(5 lines, 5% of 1310 steps) = 65
    early = score(labels, [ev("COLLAPSE_ONSET", 900, 990)], steps=steps)
    assert early.sustained_found and early.standing == 0
    broken = dict(labels, spikes=[[830, 830, 2.1, False], [900, 900, 1.7, True], [990, 1310, 1e69, False]])
    assert bench.sustained_start(broken, 1010) == 990
    assert not score(broken, [ev("COLLAPSE_ONSET", 900, 990)], steps=steps).sustained_found


def test_an_unrecovered_spike_the_log_cut_short_is_not_a_sustained_collapse():
    labels = {"log_every": 10, "last_step": 2940, "label_rules": {"RECOVER_WINDOW": 200},
              "spikes": [[2760, 2940, 2.5e5, False]]}
    assert bench.sustained_step(labels) is None  # 180 steps before the end: still coming down
    assert bench.sustained_step(dict(labels, spikes=[[2700, 2940, 2.5e5, False]])) == 2700


def test_an_unrecovered_spike_after_memorisation_is_not_a_sustained_collapse():
    # A slingshot: the loss jumps from 2e-7 and decays for 1 100 steps while the
    # held-out accuracy reaches 1.0; the labels call no collapse, nor does the yardstick.
    labels = {"log_every": 10, "last_step": 2530, "label_rules": {"RECOVER_WINDOW": 200},
              "spikes": [[1430, 2530, 3.4e5, False]]}
    assert bench.sustained_step(labels) == 1430  # never memorised: a collapse
    memorised = dict(labels, memorisation_step=90, grokking_step=1530)
    assert bench.sustained_step(memorised) is None
    assert score(memorised, [ev("LOSS_SPIKE", 1430)]).sustained_found is None


def test_a_divergence_is_training_falling_too_for_generalisation_episodes():
    labels = {"log_every": 10, "collapse_kind": "divergence_nonfinite", "collapse_step": 980,
              "train_collapse_episodes": [], "generalization_collapse_episodes": [[970, 1310, False]]}
    s = score(labels, [ev("COLLAPSE_ONSET", 980, 1000, scope="training")])
    assert (s.gen_episodes, s.gen_train_episodes, s.gen_train_found) == (0, 1, 1)
