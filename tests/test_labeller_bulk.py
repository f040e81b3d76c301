"""The labeller's bulk path (``update_block``: the rules' compiled ``quiet_run`` over
quiet stretches) gives, bit for bit, what its per-line path (``update``) gives.

Every case feeds the same lines (a) one at a time through ``update`` and (b)
through ``update_block`` in blocks of random sizes, with series events spliced
in at random lines, and compares the event lists and ``repr(state())`` (so
-0.0 against 0.0, an int against a float, or a numpy scalar left in the state
all count as differences) at every block boundary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detector.core.labeller import PhaseLabeller
from detector.core.types import Role, SeriesSpec, Split

SPECS = {
    "train_loss": SeriesSpec("train_loss", Role.LOSS, Split.TRAIN, None),
    "val_loss": SeriesSpec("val_loss", Role.LOSS, Split.VAL, None),
    "train_acc": SeriesSpec("train_acc", Role.ACCURACY, Split.TRAIN, None),
    "val_acc": SeriesSpec("val_acc", Role.ACCURACY, Split.VAL, None),
}
RUNS = Path(__file__).parent / "data" / "runs"


class _View:
    """A block as ``update_block`` reads it (the run detector's ``_BlockColumns``)."""

    def __init__(self, steps: np.ndarray, rows: list[dict[str, float]], names: list[str]) -> None:
        self.steps = steps
        self._columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in names:
            present = np.array([name in row for row in rows], dtype=bool)
            if present.any():
                values = np.array([row.get(name, math.nan) for row in rows], dtype=float)
                self._columns[name] = (values, present)

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self._columns.get(name)


def check_same(steps: list[int], rows: list[dict[str, float]], names: list[str], rng: np.random.Generator,
               at_lines: float = 0.05, every_block: bool = True) -> int:
    """Feed both paths; returns the number of run events (so a case can say it exercised something).
    ``every_block`` False: the states are compared at the end only (``state()`` brings
    the rules' fields up to date from their compiled loops' copies, which a run that is
    never checkpointed otherwise keeps from block to block)."""
    specs = {name: SPECS[name] for name in names}
    one, bulk = PhaseLabeller(), PhaseLabeller()
    one.set_specs(specs)
    bulk.set_specs(specs)
    marks = {s: [f"series event at {s}"] for s in steps if rng.random() < at_lines}
    i, run_events = 0, 0
    while i < len(steps):
        size = int(rng.choice([1, 2, 3, 7, 30, 100, 1000]))
        block = slice(i, min(len(steps), i + size))
        expected: list = []
        pending = {s: list(v) for s, v in marks.items()}
        for step, row in zip(steps[block], rows[block], strict=True):
            expected += pending.pop(step, [])
            new = one.update(step, row)
            run_events += len(new)
            expected += new
        at_line = {s: list(v) for s, v in marks.items() if s in set(steps[block])}
        got = bulk.update_block(np.asarray(steps[block], dtype=np.int64),
                                _View(np.asarray(steps[block]), rows[block], names), at_line)
        for s in set(steps[block]):
            marks.pop(s, None)
        assert got == expected, f"events differ in lines {block.start}:{block.stop}"
        assert at_line == {}
        if every_block:
            assert repr(bulk.state()) == repr(one.state()), f"state differs after line {block.stop}"
        i = block.stop
    assert one.finish() == bulk.finish()
    assert repr(bulk.state()) == repr(one.state()), "state differs at the end"
    return run_events


# --- constructed runs -------------------------------------------------------------


def _steps(rng: np.random.Generator, n: int) -> list[int]:
    gaps = np.full(n, int(rng.choice([1, 5, 10, 50, 100])))
    for _ in range(int(rng.integers(0, 3))):  # cadence changes
        gaps[int(rng.integers(0, n)):] = int(rng.choice([1, 2, 10, 25, 200]))
    if rng.random() < 0.1:
        gaps[rng.random(n) < 0.02] = 0  # a repeated step
    return (int(rng.integers(0, 1000)) + np.cumsum(gaps) - gaps[0]).tolist()


def _loss(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n, dtype=float)
    loss = 4.0 * np.exp(-t / rng.uniform(3, 300)) + 10 ** rng.uniform(-8, -1)
    loss *= np.exp(rng.uniform(0, 0.4) * rng.standard_normal(n))
    for _ in range(int(rng.integers(0, 4))):  # spikes and excursions, some that stay (collapses)
        at = int(rng.integers(0, n))
        loss[at:at + int(rng.choice([1, 3, 20, n]))] *= 10 ** rng.uniform(0.1, 6)
    if rng.random() < 0.3:  # a slow drift up
        loss *= np.exp(np.linspace(0, rng.uniform(0, 8), n))
    return loss


def _accuracy(rng: np.random.Generator, n: int, late: bool) -> np.ndarray:
    t = np.arange(n, dtype=float)
    centre = rng.uniform(0.1, 0.9) * n if late else rng.uniform(0, 0.2) * n
    top = rng.choice([1.0, 0.97, 0.9, 0.5])
    rise = np.clip((t - centre) / rng.uniform(0.5, n / 10 + 1), -500, 500)
    acc = rng.uniform(0, 0.1) + (top - 0.05) / (1 + np.exp(-rise))
    acc += rng.uniform(0, 0.02) * rng.standard_normal(n)
    for _ in range(int(rng.integers(0, 3))):  # generalisation collapses, some that end
        at = int(rng.integers(0, n))
        acc[at:at + int(rng.choice([2, 10, 50, n]))] -= rng.uniform(0.02, 0.6)
    if rng.random() < 0.2:
        acc = np.round(acc, 2)  # ties
    elif rng.random() < 0.2:
        acc = np.round(acc * 20) / 20  # ties, and values on the thresholds (0.95)
    return np.clip(acc, 0, 1)


def constructed(seed: int, n: int) -> tuple[list[int], list[dict[str, float]], list[str]]:
    rng = np.random.default_rng(seed)
    names = [name for name in SPECS if rng.random() < 0.8] or ["train_loss"]
    steps = _steps(rng, n)
    columns = {
        "train_loss": _loss(rng, n), "val_loss": _loss(rng, n),
        "train_acc": _accuracy(rng, n, late=False), "val_acc": _accuracy(rng, n, late=True),
    }
    for name in ("train_acc", "val_acc"):
        if rng.random() < 0.2:  # in percent, from some line on
            columns[name][int(rng.integers(0, n)):] *= 100
    rows: list[dict[str, float]] = [{} for _ in range(n)]
    for name in names:
        values = columns[name].tolist()
        first = int(rng.integers(0, n // 2 + 1)) if rng.random() < 0.3 else 0  # starts late
        every = int(rng.choice([1, 1, 2, 5]))  # logged on every line or fewer
        missing = rng.random(n) < rng.choice([0.0, 0.0, 0.05, 0.3])
        for i in range(first, n, every):
            if missing[i]:
                continue
            value = values[i]
            if rng.random() < 0.01:
                value = float(rng.choice([math.nan, math.inf, -math.inf]))
            rows[i][name] = value
    return steps, rows, names


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 600))
@example(seed=887, n=592)  # memorised after the onset, at a lower level: the level it measures from
def test_bulk_path_equals_per_line_path_on_constructed_runs(seed: int, n: int) -> None:
    steps, rows, names = constructed(seed, n)
    check_same(steps, rows, names, np.random.default_rng(seed + 1))


@pytest.mark.parametrize("seed", range(40))
def test_bulk_path_equals_per_line_path_on_long_runs(seed: int) -> None:
    steps, rows, names = constructed(10_000 + seed, 3000)
    check_same(steps, rows, names, np.random.default_rng(seed))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 2000))
def test_bulk_path_equals_per_line_path_unchecked_between_blocks(seed: int, n: int) -> None:
    """No ``state()`` between blocks: the rules keep their compiled loops' copies of their
    state across blocks and bring their fields up to date only when a line of their own
    needs the per-line path."""
    steps, rows, names = constructed(seed, n)
    check_same(steps, rows, names, np.random.default_rng(seed + 1), every_block=False)


# --- the repository's real runs ------------------------------------------------------


def _real(path: Path) -> tuple[list[int], list[dict[str, float]], list[str]]:
    steps: list[int] = []
    rows: list[dict[str, float]] = []
    renames = {"train_loss": "train_loss", "test_loss": "val_loss", "val_loss": "val_loss",
               "train_acc": "train_acc", "test_acc": "val_acc", "val_acc": "val_acc"}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        steps.append(int(record["step"]))
        rows.append({renames[k]: float(v) for k, v in record.items() if k in renames and v is not None})
    names = sorted({name for row in rows for name in row})
    return steps, rows, names


@pytest.mark.parametrize("path", sorted(RUNS.glob("*.jsonl")), ids=lambda p: p.stem)
@pytest.mark.parametrize("seed", range(3))
def test_bulk_path_equals_per_line_path_on_real_runs(path: Path, seed: int) -> None:
    steps, rows, names = _real(path)
    assert check_same(steps, rows, names, np.random.default_rng(seed)) > 0
    assert check_same(steps, rows, names, np.random.default_rng(seed), every_block=False) > 0


@pytest.mark.parametrize("seed", range(3))
def test_bulk_path_equals_per_line_path_with_a_percent_accuracy_and_gaps(seed: int) -> None:
    steps, rows, names = _real(RUNS / "grok_add_0.jsonl")
    rng = np.random.default_rng(seed)
    switch = int(rng.integers(10, len(rows)))
    for i, row in enumerate(rows):
        if i >= switch and "val_acc" in row:
            row["val_acc"] *= 100
        if rng.random() < 0.1:
            row.pop(str(rng.choice(names)), None)
    check_same(steps, rows, names, rng, at_lines=0.2)


def test_bulk_path_equals_per_line_path_on_exact_thresholds() -> None:
    """Held-out accuracy exactly at ``grokked_accuracy`` (0.95) once, on a line
    before the onset is complete, then just under it, then a fall that is a
    generalisation collapse only if that 0.95 counted as generalised."""
    val = [0.1] * 50 + [0.95] + [0.94] * 100 + [0.8] * 100 + [0.94] * 50
    steps = list(range(0, 10 * len(val), 10))
    rows = [{"train_loss": 1.0 / (1 + i), "train_acc": 1.0, "val_acc": v} for i, v in enumerate(val)]
    names = ["train_loss", "train_acc", "val_acc"]
    for seed in range(5):
        assert check_same(steps, rows, names, np.random.default_rng(seed)) > 0


@pytest.mark.parametrize("seed", range(9))
def test_bulk_path_equals_per_line_path_on_hidden_progress(seed: int) -> None:
    """Memorised at once, held-out accuracy flat, a held-out loss that falls slowly
    (in steps of equal values on some seeds: ties between bin means), climbs
    and falls back, or climbs, stays exactly flat and falls: the hidden-progress
    history's bins open, merge and are tested."""
    rng = np.random.default_rng(seed)
    n = 4000
    t = np.arange(n, dtype=float)
    if seed >= 6:
        flat = rng.uniform(0.3, 0.7) * n
        val_loss = np.where(t < n / 10, 2 + 20 * t / n, 4.0)
        val_loss = np.where(t > flat, 4.0 - (t - flat) / n * rng.uniform(0.5, 3), val_loss)
    elif seed % 2:
        val_loss = 5.0 - 3.0 * t / n + 0.3 * np.sin(t / rng.uniform(50, 400))
    else:
        val_loss = 5.0 * np.exp(-t / rng.uniform(500, 8000)) * np.exp(0.02 * rng.standard_normal(n))
    if seed % 3 == 0:
        val_loss = np.round(val_loss, 1)  # plateaus: equal bin means
    steps = np.cumsum(rng.choice([1, 1, 1, 5], n)).tolist()
    rows = [{"train_loss": 0.01, "train_acc": 1.0, "val_loss": float(v), "val_acc": 0.01 + 0.001 * (i % 3)}
            for i, v in enumerate(val_loss)]
    rows[0]["train_loss"] = 3.0
    check_same(steps, rows, ["train_loss", "train_acc", "val_loss", "val_acc"], rng)


@pytest.mark.parametrize("seed", range(6))
def test_bulk_path_equals_per_line_path_on_hidden_progress_in_accuracy(seed: int) -> None:
    """Memorised at once, held-out accuracy driven below chance creeps back up (past
    chance on some seeds, with zeros on others) while the held-out loss climbs: the
    accuracy's history opens, merges and is tested."""
    rng = np.random.default_rng(seed)
    n = 3000
    t = np.arange(n, dtype=float)
    top = 0.005 if seed % 2 else 0.05
    val_acc = 0.002 * (top / 0.002) ** (t / n) * np.exp(0.1 * rng.standard_normal(n))
    if seed % 3 == 0:
        val_acc[rng.random(n) < 0.05] = 0.0
    steps = np.cumsum(rng.choice([1, 1, 1, 5], n)).tolist()
    rows = [{"train_loss": 0.01, "train_acc": 1.0, "val_loss": 20 + 10 * float(x) / n, "val_acc": float(v)}
            for x, v in zip(t, val_acc, strict=True)]
    rows[0].update(train_loss=3.0, train_acc=0.01, val_acc=0.01)
    check_same(steps, rows, ["train_loss", "train_acc", "val_loss", "val_acc"], rng)


@pytest.mark.parametrize("seed", range(4))
def test_bulk_path_equals_per_line_path_on_a_loss_only_run_with_both_losses(seed: int) -> None:
    """Training and validation loss only (the validation loss on every line, or every
    fifth): the training loss's step history fills on quiet lines too, and its fall
    decides beside the headline's when a bin opens."""
    rng = np.random.default_rng(seed)
    n = 3000
    t = np.arange(n, dtype=float)
    val = 1.95 + 0.25 * np.exp(-t / 200) + 0.1 * np.clip(t - 800, 0, None) / n * (seed % 2)
    train = (1.0 + 1.2 * np.exp(-t / rng.uniform(300, 3000))) * np.exp(0.02 * rng.standard_normal(n))
    steps = np.cumsum(rng.choice([1, 1, 1, 5], n)).tolist()
    rows: list[dict[str, float]] = []
    for i in range(n):
        row = {"train_loss": float(train[i])}
        if seed < 2 or i % 5 == 0:
            row["val_loss"] = float(val[i])
        rows.append(row)
    check_same(steps, rows, ["train_loss", "val_loss"], rng)


def test_working_scale_list_is_working_scale_bit_for_bit() -> None:
    from detector.core.series import working_scale, working_scale_list

    rng = np.random.default_rng(0)
    values = np.concatenate([10 ** rng.uniform(-12, 300, 5000), -(10 ** rng.uniform(-12, 30, 500)),
                             [0.0, -0.0, 1e-10, 5e-324, 1.7976931348623157e308]]).tolist()
    for role in (Role.LOSS, Role.ACCURACY):
        assert repr(working_scale_list(role, values)) == repr([working_scale(role, v) for v in values])


def test_bulk_path_equals_per_line_path_on_a_bounce_while_settling() -> None:
    """A spike that comes back, then bounces up by just over the band's threshold
    (log10 1.5 decades) while still back halfway: settling starts again."""
    losses = [4.0 * math.exp(-i / 5.0) + 1e-3 for i in range(300)]
    losses[200:202] = [0.1, 0.1]
    losses[204] = 1e-3 * 10 ** 0.18
    steps = list(range(0, 3000, 10))
    rows = [{"train_loss": v} for v in losses]
    for seed in range(5):
        assert check_same(steps, rows, ["train_loss"], np.random.default_rng(seed)) > 0


@pytest.mark.parametrize("every", [1, 10, 50])
def test_bulk_path_equals_per_line_path_on_a_stretch_after_a_falling_edge(every: int) -> None:
    """Held-out accuracy that peaks, falls twice the tolerance and holds: the stable
    stretch's start is read off a level dated at its middle line, a line behind the
    newest, on both paths (and a low and a high of one step meet in the same order)."""
    t = np.arange(0, 1500, every)
    test_acc = np.round(2000 * (0.785 * (1 - np.exp(-t / 20)) - 0.02 * np.clip((t - 200) / 100, 0, 1))) / 2000
    train_acc = np.minimum(1.0, 0.05 + t / 200)
    rows = [{"train_loss": 2.3 * (1.02 - a), "train_acc": a, "val_acc": v}
            for a, v in zip(train_acc.tolist(), test_acc.tolist(), strict=True)]
    for seed in range(3):
        check_same(t.tolist(), rows, ["train_loss", "train_acc", "val_acc"], np.random.default_rng(seed))


@pytest.mark.parametrize("every", [1, 10, 50])
def test_bulk_path_equals_per_line_path_past_the_horizon_on_the_way_back(every: int) -> None:
    """An excursion out at the horizon but three quarters of the way home goes on
    (the recovery extension), one settled half-way is a collapse; per-step noise
    makes it cross the band's edge many times."""
    steps = list(range(0, 10000, every))
    noise = np.exp(0.05 * np.random.default_rng(every).standard_normal(len(steps)))
    since = np.asarray(steps) - 5000
    home = np.where((since >= 0) & (since < 650), 1000.0 ** (1 - since / 650), 1.0)
    half_way = np.where(since >= 0, np.maximum(1000.0 ** (1 - since / 300), 30.0), 1.0)
    for shape in (home, half_way):
        rows = [{"train_loss": float(v)} for v in 1e-3 * noise * shape]
        for seed in range(3):
            assert check_same(steps, rows, ["train_loss"], np.random.default_rng(seed)) > 0


def test_bulk_path_equals_per_line_path_back_at_the_bands_edge() -> None:
    """A per-step noisy loss that comes home to the band's edge and pokes out of it
    every few lines: the staying allowance (``back_slack``) on both paths."""
    rng = np.random.default_rng(8)
    steps = list(range(8000))
    since = np.asarray(steps) - 5000
    shape = np.where(since < 0, 1.0, np.where(since < 100, 10.0 ** (1 - since / 100 * 0.84), 1.45))
    rows = [{"train_loss": float(v)} for v in 2.0 * shape * np.exp(0.03 * rng.standard_normal(len(steps)))]
    for seed in range(3):
        assert check_same(steps, rows, ["train_loss"], np.random.default_rng(seed)) > 0


@pytest.mark.parametrize("seed", range(4))
def test_bulk_path_equals_per_line_path_on_held_out_dips(seed: int) -> None:
    """A generalised held-out accuracy that dips for a line or two again and again
    (each back in time, some while training falls too), once long enough to be a
    generalisation collapse, and a dip open across block boundaries: the dips on
    the compiled path, the collapse on the per-line path."""
    rng = np.random.default_rng(seed)
    n = 1500
    steps = list(range(0, 10 * n, 10))
    acc = np.clip(0.98 + 0.005 * rng.standard_normal(n), 0, 1)
    acc[:50] = np.linspace(0.1, 0.98, 50)
    for at in rng.integers(100, n - 10, 60):
        acc[at:at + int(rng.choice([1, 1, 2]))] -= rng.uniform(0.06, 0.3)
    acc[900:960] -= 0.4  # a collapse, that ends
    train_acc = np.where(rng.random(n) < 0.02, 0.5, 1.0)  # training falls now and then
    rows = [{"train_loss": 1.0 / (1 + i), "val_acc": float(a), "train_acc": float(t)}
            for i, (a, t) in enumerate(zip(acc, train_acc, strict=True))]
    events = check_same(steps, rows, ["train_loss", "val_acc", "train_acc"], rng)
    assert events > 0
    events = check_same(steps, rows, ["train_loss", "val_acc", "train_acc"], rng, every_block=False)
    assert events > 0


@pytest.mark.parametrize("every", [1, 10])
def test_bulk_path_equals_per_line_path_on_a_creep_into_divergence(every: int) -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        t = np.arange(0, 400, every)
        loss = np.where(t < 70, 0.2 + 2.1 * np.exp(-t / 12.0), np.minimum(0.2 * 1.08 ** (t - 70), 1.2))
        loss = loss * np.exp(0.02 * rng.standard_normal(len(t)))
        rows = [{"train_loss": float(v)} for v in loss]
        assert check_same(t.tolist(), rows, ["train_loss"], rng) > 0


@pytest.mark.parametrize("every", [1, 10, 50])
def test_bulk_path_equals_per_line_path_on_a_run_logged_from_a_trained_model(every: int) -> None:
    """Held-out accuracy at 0.99 from the first line (a converged checkpoint resumed):
    its onset is holding that level, complete at once, and the run stabilises."""
    rng = np.random.default_rng(7)
    n = 400
    steps = list(range(0, n * every, every))
    rows = [{"train_loss": 0.05 * math.exp(rng.normal(0, 0.05)),
             "train_acc": float(rng.binomial(512, 0.97)) / 512,
             "val_acc": float(rng.binomial(2048, 0.99)) / 2048} for _ in range(n)]
    names = ["train_loss", "train_acc", "val_acc"]
    for seed in range(3):
        assert check_same(steps, rows, names, np.random.default_rng(seed)) > 0
