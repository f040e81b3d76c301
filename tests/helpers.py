"""Shared test helpers: locating the test data and reading run logs without the CLI.

The data the tests read is in the repository, ``tests/data/`` (copies of the
project's labelled runs and of TCPD's redistributable subset, see
``tests/data/README.md``), so a fresh clone runs them; a sibling ``../shared``
folder is only looked at for what ``tests/data`` lacks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = REPO / "tests" / "data"


def data_path(*parts: str) -> Path:
    """``tests/data/<parts>``, else ``../shared/<parts>`` (which may not exist)."""
    path = DATA.joinpath(*parts)
    return path if path.exists() else SHARED.joinpath(*parts)


def shared_dir(*parts: str) -> Path:
    """Test data (:func:`data_path`); in CI its absence is a failure, not a skip."""
    path = data_path(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} not present")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_to_columns(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    steps: dict[str, list[int]] = {}
    values: dict[str, list[float]] = {}
    for row in rows:
        step = row["step"]
        for key, value in row.items():
            if key == "step":
                continue
            steps.setdefault(key, []).append(step)
            values.setdefault(key, []).append(math.nan if value is None else float(value))
    return {k: (np.asarray(steps[k], dtype=np.int64), np.asarray(values[k])) for k in steps}


def collapse_columns(
    n: int = 600,
    *,
    generalization: tuple[int, int | None] | None = None,
    training: tuple[int, int | None] | None = None,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A run logged every 10 steps that fits and generalises within ~20 lines, with
    collapses of either scope: ``(first line, lines)``, lines None for one still open
    at the end. ``generalization``: the test accuracy falls from 0.99 to 0.7 while
    training holds; ``training``: the loss goes back to its first value, the
    accuracies to chance. The labeller calls each a COLLAPSE_ONSET at its first
    line, of that scope (tests/test_metrics.py checks it), and a generalisation
    collapse that lasts 60 lines ends 60 lines later.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 4.0 * np.exp(-t / 5.0) + 1e-3 * np.exp(0.05 * rng.standard_normal(n))
    train_acc = np.minimum(1.0, 0.1 + 0.09 * t)
    test_acc = np.minimum(0.99, 0.1 + 0.045 * t) + 0.003 * rng.standard_normal(n)
    if generalization is not None:
        first, lines = generalization
        last = n if lines is None else first + lines
        test_acc[first:last] = 0.7 + 0.003 * rng.standard_normal(last - first)
    if training is not None:
        first, lines = training
        last = n if lines is None else first + lines
        loss[first:last], train_acc[first:last], test_acc[first:last] = 4.0, 0.1, 0.1
    steps = 10 * t
    return {"train_loss": (steps, loss), "train_acc": (steps, train_acc), "test_acc": (steps, test_acc)}
