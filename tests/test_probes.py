"""The probes' runs are what benchmarks/probes.py says they are (its numbers mean nothing otherwise)."""

import numpy as np

from benchmarks.probes import BUMP_AT, finetune, lm_bump, never_fits


def _mean_near(steps: np.ndarray, values: np.ndarray, lo: int, hi: int) -> float:
    return float(np.mean(values[(steps >= lo) & (steps < hi)]))


def test_lm_bump_drops_a_nat_at_its_centre_on_every_cadence() -> None:
    for every in (1, 10, 50):
        steps, loss = lm_bump(0, every)["loss"]
        assert steps[1] - steps[0] == every
        before = _mean_near(steps, loss, BUMP_AT - 1000, BUMP_AT - 500)
        after = _mean_near(steps, loss, BUMP_AT + 500, BUMP_AT + 1000)
        assert 0.8 < before - after < 1.2  # the drop, in nats
        flat = _mean_near(steps, loss, 1500, 2000) - _mean_near(steps, loss, 2000, 2500)
        assert abs(flat) < 0.1  # a plateau before it


def test_never_fits_levels_off_below_fitted_and_is_flat_after_8000() -> None:
    columns = never_fits(0)
    _, train_acc = columns["train_acc"]
    steps, val_acc = columns["val_acc"]
    assert train_acc.max() < 0.99
    late = val_acc[steps >= 8000]
    assert late.max() - late.min() < 0.04 and abs(late.mean() - 0.8) < 0.01


def test_finetune_starts_high_and_gains_five_points() -> None:
    columns = finetune(0)
    steps, accuracy = columns["eval_accuracy"]
    assert steps[0] == 200 and abs(accuracy[0] - 0.86) < 0.01
    assert abs(float(np.mean(accuracy[steps >= 3000])) - 0.91) < 0.005
    _, loss = columns["loss"]
    assert loss[:5].mean() > 0.6 and abs(float(np.median(loss[-100:])) - 0.25) < 0.01
