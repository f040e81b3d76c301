"""One conformance suite over every streaming detector of the core (detector/core/registry.py).

For each entry: the one-point and block forms agree for random splits of a
run, a state saved mid-stream and restored into a fresh detector gives the
same later output, the saved state does not grow with the run, the class
documents itself with an example, and its settings cannot be changed in place.
The runs are seeded synthetic training curves (a decaying loss with a spike
and a drop, an accuracy that jumps late, validation series every tenth line),
so every detector has something to report.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any

import numpy as np
import pytest

from detector.core.registry import RUN_SERIES, STREAMING, Streaming, block_of

Lines = list[tuple[int, dict[str, float]]]

# Checks a detector fails today, with the reason: xfail(strict=True), so a fix shows up.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def synthetic_run(n: int, seed: int) -> Lines:
    """``n`` lines of a run: steps 0, 10, 20...; validation every tenth line."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    train_loss = 2.5 / np.sqrt(1 + t / 20) + rng.normal(0, 0.01, n)
    train_loss[int(n * 0.55):] -= 0.3  # a sudden drop
    train_loss[int(n * 0.3)] += 3.0  # one spike
    train_acc = np.clip(1 - train_loss / 3 + rng.normal(0, 0.005, n), 0, 1)
    jump = 1 / (1 + np.exp(-(t - n * 0.7) / (n * 0.01)))
    val_acc = np.clip(0.05 + 0.9 * jump + rng.normal(0, 0.01, n), 0, 1)
    val_loss = 3.0 - 2.5 * jump + rng.normal(0, 0.02, n)
    lines: Lines = []
    for i in range(n):
        line = {"train_loss": float(train_loss[i]), "train_acc": float(train_acc[i])}
        if i % 10 == 0:
            line |= {"val_loss": float(val_loss[i]), "val_acc": float(val_acc[i])}
        lines.append((10 * i, line))
    return lines


def only(lines: Lines, entry: Streaming) -> Lines:
    picked = [(s, {k: v for k, v in line.items() if k in entry.series}) for s, line in lines]
    return [(s, line) for s, line in picked if line]


def online(entry: Streaming, detector: Any, lines: Lines) -> list[Any]:
    out: list[Any] = []
    for step, line in lines:
        out += entry.feed_line(detector, step, line)
    return out


def batched(entry: Streaming, detector: Any, lines: Lines, cuts: list[int]) -> list[Any]:
    out: list[Any] = []
    for lo, hi in zip([0, *cuts], [*cuts, len(lines)], strict=True):
        if hi > lo:
            out += entry.feed_block(detector, block_of(lines[lo:hi], entry.series))
    return out


def random_cuts(n: int, rng: np.random.Generator) -> list[int]:
    k = int(rng.integers(1, 12))
    return sorted({int(c) for c in rng.integers(1, n, k)})


def entries(what: str) -> list[Any]:
    """Every registry entry, those known to fail ``what`` marked xfail(strict=True)."""
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name, what]))
        if (name, what) in KNOWN_FAILURES else name
        for name in sorted(STREAMING)
    ]


def state_size(state: Any) -> int:
    """Numbers in a state: list and array items, dict values, scalars. O(size)."""
    if isinstance(state, dict):
        return sum(state_size(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_size(v) for v in state)
    if isinstance(state, np.ndarray):
        return int(state.size)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return state_size(dataclasses.asdict(state))
    return 1


def test_the_registry_names_every_streaming_detector_once():
    classes = [entry.cls for entry in STREAMING.values()]
    assert len(set(classes)) == len(classes)
    assert {c.__name__ for c in classes} >= {"CusumTrigger", "SeriesDetector", "RunDetector",
                                               "PhaseLabeller"}


@pytest.mark.parametrize("name", entries("online == batch"))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_equals_batch_for_any_split(name: str, seed: int):
    entry = STREAMING[name]
    lines = only(synthetic_run(1500, seed), entry)
    expected = online(entry, entry.make(), lines)
    assert expected, f"{name} reported nothing: the run does not exercise it"
    rng = np.random.default_rng(100 + seed)
    for _ in range(3):
        cuts = random_cuts(len(lines), rng)
        assert batched(entry, entry.make(), lines, cuts) == expected, f"cuts {cuts}"
    assert batched(entry, entry.make(), lines, []) == expected  # one block


@pytest.mark.parametrize("name", entries("state round trip"))
@pytest.mark.parametrize("seed", [0, 3])
def test_a_state_round_trip_mid_stream_changes_nothing_later(name: str, seed: int):
    entry = STREAMING[name]
    lines = only(synthetic_run(1500, seed), entry)
    rng = np.random.default_rng(200 + seed)
    for middle in sorted(int(m) for m in rng.integers(1, len(lines) - 1, 2)):
        reference = entry.make()
        online(entry, reference, lines[:middle])
        state = entry.save(reference)
        # Through pickle: a checkpoint leaves the process; nothing may alias the live detector.
        restored = entry.load(pickle.loads(pickle.dumps(state)))
        rest = lines[middle:]
        assert online(entry, restored, rest) == online(entry, reference, rest), f"at line {middle}"
        assert state_size(entry.save(restored)) == state_size(entry.save(reference))


@pytest.mark.parametrize("name", entries("bounded state"))
def test_state_is_bounded_by_the_settings_not_the_run_length(name: str):
    entry = STREAMING[name]
    sizes = []
    for n in (6000, 24000):
        detector = entry.make()
        lines = only(synthetic_run(n, 5), entry)
        entry.feed_block(detector, block_of(lines, entry.series))
        sizes.append(state_size(entry.save(detector)))
    # Four times the run (long enough for every window to fill): the state may not grow.
    assert sizes[1] <= sizes[0] * 1.25 + 64, sizes


@pytest.mark.parametrize("name", entries("docstring"))
def test_documented_with_an_example(name: str):
    doc = STREAMING[name].cls.__doc__ or ""
    assert len(doc.strip()) > 40 and ">>>" in doc


@pytest.mark.parametrize("name", entries("immutable settings"))
def test_default_settings_cannot_be_changed_in_place(name: str):
    entry = STREAMING[name]
    first, second = entry.make(), entry.make()
    settings = entry.settings(first)
    assert dataclasses.is_dataclass(settings)
    field = dataclasses.fields(settings)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, field.name, getattr(settings, field.name))
    # Nor is a mutable value shared between two detectors' defaults.
    other = entry.settings(second)
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, list | dict | set | np.ndarray):
            assert value is not getattr(other, f.name), f.name


def test_the_run_has_every_role_series():
    lines = synthetic_run(100, 0)
    assert {name for _, line in lines for name in line} == set(RUN_SERIES)
    assert all(math.isfinite(v) for _, line in lines for v in line.values())
