"""The run generator (examples/make_runs.py): its labels reproduce the shared runs' labels.

The label code is a pure function of the logged records, so each shared run's
``labels.json`` must come back exactly from its ``.jsonl``. None of this needs
torch; the one training smoke test is skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / "tests" / "data" if (REPO / "tests" / "data" / "runs").is_dir() else REPO.parent / "shared"
SCRIPT = REPO / "examples" / "make_runs.py"

LABEL_KEYS = (
    "memorisation_step",
    "grokking_onset_step",
    "grokking_step",
    "stabilization_step",
    "collapse_step",
    "collapse_kind",
    "collapse_recovered_step",
    "is_grokking",
    "grokking_delay",
    "chance_acc",
    "phases",
    "label_rules_version",
    "label_rules",
)


NEW_LABEL_KEYS = {
    "spikes",
    "train_collapse_episodes",
    "generalization_collapse_episodes",
    "train_collapse_kind",
    "loss_only",
    "settled_step",
    "variant_of",
    "cadence",
    "injected_spikes",
}


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("phasewatch_make_runs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mr = _load()


def _runs_dir() -> Path:
    path = SHARED / "runs"
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} not present")
    return path


def _shared_names() -> list[str]:
    path = SHARED / "runs"
    names = sorted(p.name[: -len(".labels.json")] for p in path.glob("*.labels.json"))
    return names or ["<none>"]


def _read(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    runs = _runs_dir()
    if not (runs / f"{name}.jsonl").exists():
        pytest.skip(f"no shared run {name}")
    records = [json.loads(x) for x in (runs / f"{name}.jsonl").read_text().splitlines() if x]
    labels = json.loads((runs / f"{name}.labels.json").read_text())
    return records, labels


@pytest.mark.parametrize("name", _shared_names())
def test_labels_reproduce_shared_run(name: str) -> None:
    records, expected = _read(name)
    got = mr.labels_from_records(records, expected["chance_acc"], log_every=expected["log_every"])
    for key in LABEL_KEYS:
        assert got[key] == expected[key], f"{name}: {key}"
    assert got["phases"][-1][1] == expected["last_step"] + expected["log_every"]


@pytest.mark.parametrize("name", _shared_names())
def test_labels_document_has_the_shared_keys(name: str) -> None:
    records, expected = _read(name)
    meta = {
        k: expected[k]
        for k in ("num_classes", "n_train", "n_test", "log_every", "last_step", "runtime_s", "torch_threads")
    }
    doc = mr.build_labels(
        records,
        scenario=expected["scenario"],
        seed=expected["seed"],
        config=expected["config"],
        meta=meta,
    )
    assert set(expected) <= set(doc)
    assert set(doc) - set(expected) <= NEW_LABEL_KEYS
    assert doc["variant_of"] is None and doc["cadence"] == expected["log_every"]
    assert doc["run_id"] == expected["run_id"]
    assert {k: doc[k] for k in LABEL_KEYS} == {k: expected[k] for k in LABEL_KEYS}


# Scenarios whose default config departs from the shared run's (which these values restore).
SHARED_RUN_OVERRIDES: dict[str, dict[str, Any]] = {
    "nogrok_add": {"max_steps": 5000},  # 8000 by default: every seed then shows a transient spike
}


@pytest.mark.parametrize("name", _shared_names())
def test_scenario_config_and_phenomenon_match_shared_run(name: str) -> None:
    records, expected = _read(name)
    scenario = mr.SCENARIOS[expected["scenario"]]
    assert {**scenario.config, **SHARED_RUN_OVERRIDES.get(scenario.name, {})} == expected["config"]
    assert list(records[0]) == list(mr.FIELDS)
    for r in records:
        assert r["lr"] == mr.lr_at(scenario.config, r["step"])
    assert mr.check_run(scenario.name, expected, records) == []


def _rec(
    step: int, loss: float | None, train_acc: float | None = 0.5, test_acc: float | None = 0.1
) -> dict[str, Any]:
    return {"step": step, "train_loss": loss, "train_acc": train_acc, "test_acc": test_acc}


def test_transient_spike_recovers_and_phase_resumes() -> None:
    losses = [4.0, 1.0, 0.1, 0.01, 0.01, 3.0, 0.02] + [0.01] * 30
    records = [_rec(10 * i, x, train_acc=1.0 if i >= 2 else 0.5) for i, x in enumerate(losses)]
    lab = mr.labels_from_records(records, 0.1)
    assert lab["collapse_step"] == 50
    assert lab["collapse_kind"] == "transient_spike"
    assert lab["collapse_recovered_step"] == 60
    assert lab["phases"] == [
        [0, 20, "instability"],
        [20, 50, "memorisation"],
        [50, 60, "collapse"],
        [60, 370, "memorisation"],
    ]


def test_nonfinite_divergence_and_sustained_collapse() -> None:
    losses = [2.0, 1.0, 0.5, 0.4, 5.0, 50.0, None, None]
    lab = mr.labels_from_records([_rec(10 * i, x) for i, x in enumerate(losses)], 0.1)
    assert (lab["collapse_step"], lab["collapse_kind"]) == (40, "divergence_nonfinite")
    assert lab["phases"] == [[0, 40, "instability"], [40, 80, "collapse"]]

    losses = [2.0, 1.0, 0.01] + [3.0] * 30
    lab = mr.labels_from_records([_rec(10 * i, x) for i, x in enumerate(losses)], 0.1)
    assert (lab["collapse_step"], lab["collapse_kind"]) == (30, "sustained_collapse")
    assert lab["collapse_recovered_step"] is None


def test_spike_too_close_to_the_end_is_not_a_recovery() -> None:
    losses = [2.0, 0.01, 0.01, 3.0] + [0.01] * 5  # the run ends before 200 steps pass
    lab = mr.labels_from_records([_rec(10 * i, x) for i, x in enumerate(losses)], 0.1)
    assert lab["collapse_kind"] == "sustained_collapse"


def test_grokking_labels_on_a_synthetic_curve() -> None:
    steps = list(range(0, 3010, 10))
    test_acc = [0.0 if s < 1000 else min(1.0, (s - 1000) / 1000 + 0.005) for s in steps]
    records = [_rec(s, 0.001, 1.0 if s >= 100 else 0.2, a) for s, a in zip(steps, test_acc, strict=True)]
    lab = mr.labels_from_records(records, 0.01)
    assert lab["memorisation_step"] == 100
    assert lab["grokking_onset_step"] == 1110  # first line >= chance + 0.10
    assert lab["grokking_step"] == 1950
    assert lab["stabilization_step"] == 1990
    assert lab["is_grokking"] is True
    assert [p[2] for p in lab["phases"]] == ["instability", "memorisation", "abstraction", "stabilization"]


def test_label_code_imports_without_torch() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m\n"
        "spec.loader.exec_module(m)\n"
        "r = [{'step': 0, 'train_loss': 1.0, 'train_acc': 0.1, 'test_acc': 0.1}]\n"
        "m.labels_from_records(r, 0.1)\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_spectral_metrics_match_an_svd() -> None:
    rng = np.random.default_rng(0)
    for shape in ((59, 64), (512, 96), (30, 8)):
        m = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, shape[1])
        s = np.linalg.svd(m, compute_uv=False)
        p = s / s.sum()
        assert mr.effective_rank(mr.squared_singular_values(m)) == pytest.approx(
            math.exp(-(p * np.log(p)).sum()), rel=1e-9
        )
        assert math.sqrt(mr.squared_singular_values(m)[0]) == pytest.approx(s[0], rel=1e-12)
    # a covariance with eigenvalues i^-2 has alpha 2
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    z = rng.standard_normal((4096, 64))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T, bias=True))).T
    h = z @ np.diag(np.arange(1, 65, dtype=float) ** -1.0) @ q.T
    assert mr.alpha_req(h) == pytest.approx(2.0, abs=1e-6)
    assert mr.alpha_req(np.zeros((10, 4))) is None
    assert mr.effective_rank(mr.squared_singular_values(np.zeros((5, 3)))) is None
    assert mr.squared_singular_values(np.array([[np.nan, 1.0]])) is None


def test_a_fine_tuning_run_starts_from_a_pre_trained_model() -> None:
    """``lm_finetune`` trains the model on the base text before its first logged line:
    its first validation loss, on the related text, is well below an untrained
    model's (about ln 24), and below that of the same run pre-trained for fewer steps."""
    pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[torch]'")
    config = {**mr.SCENARIOS["lm_finetune"].config, "max_steps": 0}
    first = {}
    for steps in (0, 100, 300):
        config["pretrain"] = {**config["pretrain"], "steps": steps}
        records, _ = mr.train(config, 0)
        first[steps] = records[0]["val_loss"]
    assert first[0] == pytest.approx(math.log(24), abs=0.2)
    assert first[300] < first[100] - 0.2 < first[0] - 0.4, first
    assert set(records[0]) == set(mr.LM_FIELDS)  # losses and the learning rate only


def test_training_reproduces_the_start_of_shared_runs() -> None:
    """The first lines of two scenarios retrace the shared runs (seed 0); training is
    deterministic and the seed matters. Needs torch (most of the time is its import)."""
    pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[torch]'")
    runs = _runs_dir()
    for scenario, max_steps in (("grok_add", 10), ("smooth_teacher", 0)):
        path = runs / f"{scenario}_0.jsonl"
        if not path.exists():
            continue
        shared = [json.loads(x) for x in path.read_text().splitlines()[: max_steps // 10 + 1]]
        config = {**mr.SCENARIOS[scenario].config, "max_steps": max_steps}
        records, meta = mr.train(config, 0)
        assert meta["last_step"] == max_steps and meta["torch_threads"] == 1
        assert len(records) == len(shared)
        for got, want in zip(records, shared, strict=True):
            assert list(got) == list(mr.FIELDS)
            for key in mr.FIELDS:
                if want[key] is None:
                    assert got[key] is None, (scenario, got["step"], key)
                else:
                    assert got[key] == pytest.approx(want[key], rel=1e-5), (scenario, key)
        if max_steps:
            assert mr.train(config, 0)[0] == records
            assert mr.train(config, 1)[0][-1]["train_loss"] != records[-1]["train_loss"]


# --- spikes, collapse episodes, settling, cadence variants (no torch) ---


def test_loss_spikes_rule() -> None:
    steps = list(range(0, 1000, 10))
    loss = [1.0] * len(steps)
    loss[30] = 1.6  # one line, 1.6x the median: a recovered spike
    loss[55:60] = [3.0, None, 2.0, 1.6, 1.4]  # five lines, one non-finite; 1.4 is not high
    loss[90:] = [5.0] * 10  # to the end: not recovered
    spikes = mr.loss_spikes(steps, loss)
    assert spikes == [
        [300, 300, pytest.approx(1.6), True],
        [550, 580, pytest.approx(3.0), True],
        [900, 990, 5.0, False],
    ]
    # exactly 1.5x is not high; a falling loss is never high
    assert mr.loss_spikes(steps, [1.0] * 40 + [1.5] + [1.0] * 59) == []
    assert mr.loss_spikes(steps, [10.0 / (1 + i) for i in range(100)]) == []


def test_loss_spike_needs_200_quiet_steps_to_recover() -> None:
    steps = list(range(0, 600, 10))
    loss = [1.0] * 60
    loss[20] = 2.0
    loss[35] = 2.0  # within 200 steps of the end of the first spike
    got = mr.loss_spikes(steps, loss)
    assert [s[3] for s in got] == [False, True]
    # a long excursion keeps the last reference: it stays one episode
    loss = [1.0] * 20 + [2.0] * 30 + [1.0] * 10
    assert mr.loss_spikes(steps, loss) == [[200, 490, 2.0, False]]


def _acc(step: int, train: float | None, test: float | None = 1.0) -> dict[str, Any]:
    return {"step": step, "train_loss": 0.1, "train_acc": train, "test_acc": test}


def test_collapse_episodes_rule() -> None:
    train = [0.5, 0.85, 0.999, 0.95, 0.8, 0.7, 1.0, 0.89, None, 0.5]
    test = [0.1, 0.2, 0.96, 0.93, 0.5, 0.89, 0.99, 0.95, 0.9, 0.91]
    records = [_acc(10 * i, a, b) for i, (a, b) in enumerate(zip(train, test, strict=True))]
    assert mr.collapse_episodes(records, "train_acc", 0.999, 0.90) == [[40, 50, True], [70, 90, False]]
    assert mr.collapse_episodes(records, "test_acc", 0.95, 0.90) == [[40, 50, True]]
    labels = mr.extra_labels(records)
    assert labels["train_collapse_kind"] == "sustained"
    assert labels["generalization_collapse_episodes"] == [[40, 50, True]]
    assert labels["loss_only"] is False and labels["settled_step"] is None
    # before memorisation nothing is flagged; absent keys are skipped
    records = [_acc(0, 0.5), _acc(10, 1.0), {"step": 20, "train_loss": 1.0}, _acc(30, 0.5), _acc(40, 1.0)]
    assert mr.collapse_episodes(records, "train_acc", 0.999, 0.90) == [[30, 30, True]]
    assert mr.collapse_kind_of([[30, 30, True]]) == "transient"
    assert mr.collapse_kind_of([]) == "none"


def test_settled_step_and_loss_only_labels() -> None:
    steps = list(range(0, 1000, 10))
    val = [3.0 - 0.02 * i for i in range(100)]  # 3.0 ... 1.02: final (min of last 5) 1.02
    assert mr.settled_step(steps, val) == 970  # 1.06 at 970 is within 0.05; 1.08 at 960 is not
    val[95] = None  # a non-finite line before the settling point does not matter ...
    assert mr.settled_step(steps, val) == 970
    val[-1] = None  # ... and at the end: not settled
    assert mr.settled_step(steps, val) is None
    assert mr.settled_step(steps, [None] * 100) is None
    records = [
        {"step": s, "train_loss": 2.0, "val_loss": v, "lr": 0.1} for s, v in zip(steps, val, strict=True)
    ]
    labels = mr.labels_from_records(records, 0.1)
    assert labels["loss_only"] is True and labels["settled_step"] is None
    records[-1]["val_loss"] = 1.02
    assert mr.labels_from_records(records, 0.1)["settled_step"] == 970
    assert labels["memorisation_step"] is None and labels["is_grokking"] is False
    assert labels["train_collapse_episodes"] == [] and labels["generalization_collapse_episodes"] == []


def test_subsample_cadence_and_held_out_thinning() -> None:
    records = [{"step": s, "train_loss": 1.0, "test_acc": 0.5, "val_loss": 2.0} for s in range(0, 101)]
    c10 = mr.subsample(records, 10)
    assert [r["step"] for r in c10] == list(range(0, 101, 10))
    assert [r["step"] for r in mr.subsample(records, 50)] == [0, 50, 100]
    e5 = mr.subsample(records, 10, held_out_every=5)
    assert [r["step"] for r in e5 if "test_acc" in r] == [0, 50, 100]
    assert [r["step"] for r in e5 if "val_loss" in r] == [0, 50, 100]
    assert all("train_loss" in r for r in e5)
    assert "test_acc" in records[10]  # the input is not modified


def test_lr_schedule_and_injected_spikes() -> None:
    cfg = {"lr": 1.0, "sched": "warmup_cosine", "warmup": 10, "max_steps": 110, "min_lr_frac": 0.1}
    assert mr.lr_at(cfg, 0) == pytest.approx(0.1)
    assert mr.lr_at(cfg, 9) == pytest.approx(1.0)
    assert mr.lr_at(cfg, 60) == pytest.approx(0.55)
    assert mr.lr_at(cfg, 110) == pytest.approx(0.1)
    cfg = {**cfg, "sched": "warmup_cosine_restarts", "cycle": 40}  # SGDR: back to the peak every 40 steps
    assert [mr.lr_at(cfg, s) for s in (9, 10, 30, 49, 50, 70, 90)] == pytest.approx(
        [1.0, 1.0, 0.55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)), 1.0, 0.55, 1.0])
    cfg = {"lr": 1.0, "lr_bursts": [[5, 2, 10.0]], "jump_at": 20, "jump_factor": 3.0}
    assert [mr.lr_at(cfg, s) for s in (4, 5, 6, 7, 19, 20)] == [1.0, 10.0, 10.0, 1.0, 1.0, 3.0]
    assert mr.injected_spikes({"perturb": [[400, 0.1]], "lr_bursts": [[5, 2, 10.0]]}) == [[5, 6], [400, 400]]


def _spike_labels(spikes: list[list[Any]], injected: list[list[int]], every: int) -> dict[str, Any]:
    return {"spikes": spikes, "injected_spikes": injected, "log_every": every}


def test_injected_excursion_chains_a_noisy_tail_until_it_recovers() -> None:
    # cadence 1: the main episode, then a tail that crosses the high line again twice
    spikes = [[700, 765, 5.0, False], [772, 773, 1.8, False], [792, 792, 1.5, True], [1100, 1101, 3.0, True]]
    labels = _spike_labels(spikes, [[700, 700], [1100, 1100]], 1)
    assert mr._injected_excursions(labels) == [(700, 792, 93, True), (1100, 1101, 2, True)]
    assert mr._check_injected(labels, [], last_sustained=False) == []
    # a tail still unrecovered when the next injection comes: the first one does not recover
    spikes = [[700, 765, 5.0, False], [1090, 1095, 1.8, False], [1100, 1101, 3.0, True]]
    labels = _spike_labels(spikes, [[700, 700], [1100, 1100]], 1)
    assert mr._injected_excursions(labels)[0] == (700, 1095, 396, False)
    assert mr._check_injected(labels, [], last_sustained=False) == ["the spike at 700 does not recover"]
    # nothing within one logging interval of the injection
    labels = _spike_labels([[760, 770, 2.0, True]], [[700, 700]], 50)
    assert mr._check_injected(labels, [], last_sustained=False) == ["no spike at the injection 700-700"]


def test_spike_length_expectation_is_in_steps() -> None:
    """The same four excursions seen at cadence 10 and 50 pass; without a long one they fail."""
    injected = [[400, 400], [700, 700], [1000, 1000], [1500, 1500]]
    c10 = [[400, 400, 1.9, True], [700, 730, 9.0, True], [1000, 1150, 19.0, True], [1500, 1690, 12.0, True]]
    c50 = [[400, 400, 1.8, True], [700, 700, 9.0, True], [1000, 1150, 19.0, True], [1500, 1650, 12.0, True]]
    assert mr._check_spikes(_spike_labels(c10, injected, 10), []) == []
    assert mr._check_spikes(_spike_labels(c50, injected, 50), []) == []
    short = [[a, a + 20, 2.0, True] for a, _ in injected]
    assert "do not span" in mr._check_spikes(_spike_labels(short, injected, 10), [])[0]


def test_gen_collapse_check_asks_for_a_deep_fall_with_training_held() -> None:
    def run(test: list[float], train: float = 1.0) -> list[str]:
        records = [_acc(10 * i, train if i >= 2 else 0.5, t) for i, t in enumerate(test)]
        labels = {**mr.extra_labels(records), "grokking_step": 20}
        return mr._check_gen_collapse(labels, records)

    assert run([0.1, 0.5, 1.0, 0.85, 0.75, 0.8, 0.95]) == []
    shallow = run([0.1, 0.5, 1.0, 0.85, 0.85, 0.85, 0.95])
    assert shallow == ["test accuracy stays >= 0.8 in the generalisation collapse"]
    assert "training accuracy falls" in run([0.1, 0.5, 1.0, 0.85, 0.75, 0.8, 0.95], train=0.97)[0]
    assert run([0.1, 0.5, 1.0, 0.85, 0.95]) == ["no generalisation collapse of 3+ lines"]


def test_corrupt_labels_changes_about_that_fraction_to_other_classes() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install -e '.[torch]'")
    y = torch.arange(2000) % 31
    x = torch.zeros(2000, 1)

    def task_of(labels: Any) -> Any:
        return mr.Task(torch.nn.Linear(1, 1), x, labels, x, y, x, 31, lambda: x, lambda v: v)

    task = task_of(y.clone())
    mr._corrupt_labels(task, 0.05, seed=0)
    changed = task.y_train != y
    assert 60 <= int(changed.sum()) <= 140  # 5% of 2000 = 100
    assert int(task.y_train.min()) >= 0 and int(task.y_train.max()) < 31
    again = task_of(y.clone())
    mr._corrupt_labels(again, 0.05, seed=0)
    assert torch.equal(again.y_train, task.y_train)  # deterministic for a seed
