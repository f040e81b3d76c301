"""Seeded synthetic training runs for the ingestion and soak benchmarks.

A run logs :data:`SERIES` (8 metrics, one line every 10 steps) shaped like a
grokking job: power-law training loss, a validation loss on a plateau that
drops at ``grok`` lines, accuracies that saturate (training) and jump
(validation), a warm-up learning rate, noisy gradient and weight norms and a
representation rank that falls at the transition, each with multiplicative
noise. So the detector sees what it sees on real runs: alarms, localisations,
plateaus, a hidden-progress trend and a grokking onset, not flat noise.

``block(seed, first_line, lines)`` is a pure function of its arguments, so a
run of any length is made a batch at a time in O(lines × series) numpy, and
the same run is the same in every process.

>>> cols = block(seed=1, first_line=0, lines=4)
>>> sorted(cols) == sorted(SERIES), cols["train_loss"][0].tolist()
(True, [0, 10, 20, 30])
"""

from __future__ import annotations

import numpy as np

SERIES: tuple[str, ...] = (
    "train_loss", "val_loss", "train_acc", "val_acc",
    "lr", "grad_norm", "weight_norm", "repr_eff_rank",
)
STEP = 10  # steps between logged lines


def block(seed: int, first_line: int, lines: int,
          grok: int = 2000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Lines ``first_line .. first_line + lines - 1`` of run ``seed``: name -> (steps, values)."""
    i = np.arange(first_line, first_line + lines, dtype=np.int64)
    t = i.astype(float)
    rng = np.random.default_rng([seed, first_line, lines])
    noise = lambda scale: np.exp(rng.normal(0.0, scale, lines))  # noqa: E731
    jump = 1.0 / (1.0 + np.exp(-(t - grok) / 40.0))  # 0 before the transition, 1 after
    train_loss = 4.0 * (10.0 + t) ** -0.6 * noise(0.03)
    val_loss = (4.5 - 0.3 * np.minimum(t, grok) / grok) * (1.0 - 0.97 * jump) * noise(0.01)
    train_acc = np.clip(1.0 - 0.99 * np.exp(-t / 150.0) + rng.normal(0, 0.003, lines), 0, 1)
    val_acc = np.clip(0.02 + 0.97 * jump + rng.normal(0, 0.004, lines), 0, 1)
    lr = 1e-3 * np.minimum(1.0, (t + 1) / 200.0)
    grad_norm = 0.2 * (1.0 + 4.0 * np.exp(-t / 300.0)) * noise(0.15)
    weight_norm = (60.0 - 8.0 * jump + 0.001 * t) * noise(0.002)
    rank = (170.0 - 110.0 * jump) * noise(0.02)
    values = (train_loss, val_loss, train_acc, val_acc, lr, grad_norm, weight_norm, rank)
    steps = i * STEP
    return {name: (steps, v) for name, v in zip(SERIES, values, strict=True)}
