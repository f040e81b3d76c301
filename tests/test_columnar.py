"""The columnar hot path gives exactly what the per-point, per-line path gave.

The reference is the engine's former reorder buffer (a dict of steps, one
Python object per point) feeding ``RunDetector.update`` one line at a time,
kept here verbatim in spirit: every accepted/rejected count, ``through_step``,
event, segment and change point of the columnar engine must equal it, on real
runs made messy (duplicates, reordering within the window, points too late,
negative steps, non-finite values, sparse series, a series that starts late).
"""

from __future__ import annotations

import json
import math
import pickle
import zlib
from collections import deque

import numpy as np
import pytest

from detector.core import RunDetector
from detector.core.types import infer_spec
from detector.engine import CHECKPOINT_VERSION, Engine, EngineConfig, _Run
from tests.helpers import read_rows, rows_to_columns, shared_dir

_MEMORY = 4096


class ReferenceRun:
    """The former per-point engine run: dict-of-dicts buffer, one ``update`` per line."""

    def __init__(self, reorder_window: int = 2) -> None:
        self.window = reorder_window
        self.detector = RunDetector()
        self.pending: dict[int, dict[str, float]] = {}
        self.released_through: int | None = None
        self.last_seen: dict[str, int] = {}
        self.released_recent: deque[int] = deque()
        self.released_set: set[int] = set()
        self.released_floor = -1
        self.events: list = []

    def ingest(self, columns) -> tuple[int, dict[str, int], int, list]:
        accepted = 0
        rejected: dict[str, int] = {}
        for name, (steps, values) in columns.items():
            if name not in self.detector.specs:
                self.detector.add_series(infer_spec(name))
            last = self.last_seen.get(name, -1)
            for step, value in zip(steps, values, strict=True):
                step = int(step)
                if step < 0:
                    rejected["negative_step"] = rejected.get("negative_step", 0) + 1
                    continue
                if self.released_through is not None and step <= self.released_through:
                    if step <= last and (step in self.released_set or step < self.released_floor):
                        accepted += 1
                    else:
                        rejected["out_of_order"] = rejected.get("out_of_order", 0) + 1
                    continue
                row = self.pending.setdefault(step, {})
                if name not in row:
                    row[name] = float(value)
                accepted += 1
                last = max(last, step)
            self.last_seen[name] = last
        events = self.release(len(self.pending) - self.window)
        return accepted, rejected, -1 if self.released_through is None else self.released_through, events

    def release(self, count: int) -> list:
        if count <= 0:
            return []
        events = []
        steps = sorted(self.pending)[:count]
        for step in steps:
            events += self.detector.update(step, self.pending.pop(step))
            self.released_recent.append(step)
            self.released_set.add(step)
            if len(self.released_recent) > _MEMORY:
                oldest = self.released_recent.popleft()
                self.released_set.discard(oldest)
                self.released_floor = oldest + 1
        self.released_through = steps[-1]
        self.events += events
        return events


def _messy_batches(columns, seed: int) -> list[dict]:
    """Random batch splits of a run, with duplicates, local reordering, late and
    negative points, non-finite values and one series thinned to every 3rd line."""
    rng = np.random.default_rng(seed)
    cols = {}
    for k, (name, (steps, values)) in enumerate(sorted(columns.items())):
        values = values.copy()
        # Non-finite values, but not in the losses: a non-finite loss is a collapse,
        # after which the labeller's other rules stop.
        bad = rng.random(len(values)) < (0.0 if "loss" in name else 0.02)
        values[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
        if k == 1:
            steps, values = steps[::3], values[::3]
        cols[name] = (steps, values)
    # a series that only starts halfway through
    steps0 = next(iter(cols.values()))[0]
    half = steps0[len(steps0) // 2 :]
    cols["late_norm"] = (half, np.linspace(1.0, 2.0, len(half)))
    lines = np.unique(np.concatenate([s for s, _ in cols.values()]))
    cuts = np.sort(rng.choice(np.arange(1, len(lines)), size=min(40, len(lines) - 1), replace=False))
    bounds = list(zip(np.r_[0, cuts], np.r_[cuts, len(lines)], strict=True))
    batches = []
    for lo, hi in bounds:
        first, last = lines[lo], lines[hi - 1]
        batch = {}
        for name, (steps, values) in cols.items():
            sel = (steps >= first) & (steps <= last)
            s, v = steps[sel].copy(), values[sel].copy()
            if len(s) > 2 and rng.random() < 0.5:  # swap two neighbours: reordering within a batch
                i = int(rng.integers(0, len(s) - 1))
                s[[i, i + 1]], v[[i, i + 1]] = s[[i + 1, i]], v[[i + 1, i]]
            if len(s) and rng.random() < 0.3:  # a duplicate with another value: the first one wins
                i = int(rng.integers(0, len(s)))
                s, v = np.r_[s, s[i]], np.r_[v, v[i] + 1.0]
            if rng.random() < 0.1:
                s, v = np.r_[s, -5], np.r_[v, 1.0]
            batch[name] = (s, v)
        batches.append(batch)
    # Resend part of an earlier batch (idempotent), and points that come too late:
    # at a step never logged, and at a released step the series did not have.
    thinned = sorted(columns)[1]
    for k in range(3, len(batches), 7):
        batches[k] = {**batches[k], **{n: batches[k - 2][n] for n in list(batches[k - 2])[:2]}}
        old = lines[bounds[k - 2][0]]
        s, v = batches[k].get(thinned, (np.zeros(0, np.int64), np.zeros(0)))
        batches[k][thinned] = (np.r_[s, old + 1, old + 10], np.r_[v, 0.5, 0.5])
    return batches


def _event_key(e) -> tuple:
    return (e.step, e.kind, e.detected_at, e.series, e.confidence, e.message, e.phase,
            tuple(sorted(e.evidence.items())))


@pytest.mark.parametrize("name", ["grok_add_0", "collapse_lr_0", "nogrok_add_0", "grok_div_0"])
@pytest.mark.parametrize("seed", [0, 1])
def test_engine_block_ingest_equals_per_line_reference(name: str, seed: int) -> None:
    columns = rows_to_columns(read_rows(shared_dir("runs", f"{name}.jsonl")))
    batches = _messy_batches(columns, seed)
    reference = ReferenceRun()
    engine = Engine()
    engine.start_run("r")
    for batch in batches:
        accepted, rejected, through, events = reference.ingest(batch)
        result = engine.ingest("r", batch)
        assert (result.accepted, dict(result.rejected_by_reason), result.through_step) == (
            accepted, rejected, through)
        assert [_event_key(e) for e in result.events] == [_event_key(e) for e in events]
    tail = reference.release(len(reference.pending))
    finished = reference.detector.finish()  # the end of a run localises once more
    tail += finished
    reference.events += finished
    assert [_event_key(e) for e in engine.end_run("r")] == [_event_key(e) for e in tail]
    segments, events = engine.timeline("r")
    assert segments == reference.detector.segments()
    assert [_event_key(e) for e in events] == [_event_key(e) for e in reference.events]
    assert any(e.kind.value == "CHANGE_POINT" for e in events)


def test_run_detector_update_many_equals_update_per_line() -> None:
    rows = read_rows(shared_dir("runs", "grok_add_0.jsonl"))
    columns = rows_to_columns(rows)
    columns["late_norm"] = (columns["train_loss"][0][200:], np.linspace(1, 3, len(rows) - 200))
    lines = np.unique(np.concatenate([s for s, _ in columns.values()]))
    per_line = RunDetector()
    expected = []
    for step in lines.tolist():
        row = {n: float(v[np.searchsorted(s, step)]) for n, (s, v) in columns.items()
               if np.searchsorted(s, step) < len(s) and s[np.searchsorted(s, step)] == step}
        expected += per_line.update(step, row)
    rng = np.random.default_rng(5)
    for _ in range(3):
        cuts = np.r_[0, np.sort(rng.choice(np.arange(1, len(lines)), size=6, replace=False)), len(lines)]
        blocks = RunDetector()
        got = []
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            first, last = lines[lo], lines[hi - 1]
            part = {n: (s[(s >= first) & (s <= last)], v[(s >= first) & (s <= last)])
                    for n, (s, v) in columns.items()}
            got += blocks.update_many(part)
        assert [_event_key(e) for e in got] == [_event_key(e) for e in expected]
        assert blocks.segments() == per_line.segments()
        assert list(blocks.detectors) == list(per_line.detectors)  # series joined in the same order
        assert json.dumps(blocks.labeller.state()) == json.dumps(per_line.labeller.state())
    assert any(e.kind.value == "HIDDEN_PROGRESS" for e in expected)


def test_checkpoint_round_trips_mid_run_with_held_points() -> None:
    columns = rows_to_columns(read_rows(shared_dir("runs", "collapse_lr_0.jsonl")))
    batches = _messy_batches(columns, 7)
    config = EngineConfig(reorder_window=3)
    whole = _Run("r", {}, config)
    events_whole = []
    for batch in batches:
        events_whole += whole.ingest(batch)[2]
    events_whole += whole.flush()
    for cut in (1, len(batches) // 2, len(batches) - 1):
        first = _Run("r", {}, config)
        events = []
        for batch in batches[:cut]:
            events += first.ingest(batch)[2]
        assert first.pending, "the checkpoint should hold points"
        blob = first.checkpoint()
        assert pickle.loads(blob)["version"] == CHECKPOINT_VERSION == 3
        restored = _Run.restore(blob, config)
        for batch in batches[cut:]:
            events += restored.ingest(batch)[2]
        events += restored.flush()
        assert [_event_key(e) for e in events] == [_event_key(e) for e in events_whole]
        assert restored.detector.segments() == whole.detector.segments()


def test_version_1_checkpoint_is_still_read() -> None:
    columns = rows_to_columns(read_rows(shared_dir("runs", "grok_add_0.jsonl")))
    batches = _messy_batches(columns, 2)
    config = EngineConfig(reorder_window=4)
    whole = _Run("r", {}, config)
    for batch in batches:
        whole.ingest(batch)
    whole.flush()
    first = _Run("r", {}, config)
    for batch in batches[:10]:
        first.ingest(batch)
    state = pickle.loads(first.checkpoint())
    pending: dict[int, dict[str, float]] = {}
    for name, (steps, values) in first.pending.items():
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            pending.setdefault(step, {})[name] = value
    state.update(version=1, pending=pending, released_recent=first.released_recent.tolist())
    del state["pending_steps"]
    # Written compressed, as phasewatch wrote checkpoints then.
    restored = _Run.restore(zlib.compress(pickle.dumps(state)), config)
    for batch in batches[10:]:
        restored.ingest(batch)
    restored.flush()
    assert restored.detector.segments() == whole.detector.segments()
    assert restored.through_step == whole.through_step


def test_released_memory_is_bounded_and_tells_resent_from_late() -> None:
    engine = Engine()
    n = _MEMORY + 500
    steps = np.arange(n, dtype=np.int64)
    engine.ingest("r", {"x": (steps, np.sin(steps / 50.0))})
    run = engine._runs["r"]
    assert len(run.released_recent) == _MEMORY and run.released_floor == n - 2 - _MEMORY
    resent = engine.ingest("r", {"x": ([5, n - 10], [0.0, 0.0])})  # below the floor, in memory
    assert (resent.accepted, resent.rejected) == (2, 0)
    late = engine.ingest("r", {"y": ([n - 10], [1.0])})  # y never sent it: too late
    assert (late.accepted, late.rejected) == (0, 1)
    assert math.isfinite(run.detector.detectors["x"].last_value)


def _in_order_batches(columns, seed: int) -> list[dict]:
    """Random splits of a run in order (what a training job sends), with a series
    thinned, one missing from some batches, one that starts late; every 9th batch
    resends part of the one before, which the in-order path must leave alone."""
    rng = np.random.default_rng(seed)
    cols = dict(sorted(columns.items()))
    names = list(cols)
    cols[names[1]] = (cols[names[1]][0][::3], cols[names[1]][1][::3])
    first = next(iter(cols.values()))[0]
    cols["late_norm"] = (first[len(first) // 2:], np.linspace(1.0, 2.0, len(first) - len(first) // 2))
    lines = np.unique(np.concatenate([s for s, _ in cols.values()]))
    cuts = np.sort(rng.choice(np.arange(1, len(lines)), size=min(60, len(lines) - 1), replace=False))
    batches: list[dict] = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(lines)], strict=True):
        batch = {}
        for name, (steps, values) in cols.items():
            sel = (steps >= lines[lo]) & (steps <= lines[hi - 1])
            # names[2] is not logged at some batches' lines at all
            if sel.any() and not (name == names[2] and rng.random() < 0.3):
                batch[name] = (steps[sel], values[sel])
        if len(batches) % 9 == 8:
            batch = {**batch, **{n: batches[-1][n] for n in list(batches[-1])[:2]}}
        batches.append(batch)
    return batches


def test_in_order_batches_take_the_short_path_with_the_same_result(monkeypatch) -> None:
    columns = rows_to_columns(read_rows(shared_dir("runs", "grok_add_0.jsonl")))
    batches = _in_order_batches(columns, 3)
    config = EngineConfig()

    def run(batches: list[dict]) -> tuple[_Run, list]:
        r = _Run("r", {}, config)
        out = []
        for batch in batches:
            accepted, rejected, events = r.ingest(batch)
            # The held points too, in their order: they are part of the checkpoint.
            held = [(name, steps.tolist(), values.tobytes())
                    for name, (steps, values) in r.pending.items()]
            out.append((accepted, rejected, [_event_key(e) for e in events],
                        r.through_step, r.max_step, r.changes, held, r.pending_steps.tolist(),
                        r.released_recent.tolist()))
        out.append([_event_key(e) for e in r.flush()])
        return r, out

    taken = []
    short = _Run._hold_in_order
    def counted(self: _Run, c: dict) -> list | None:
        events = short(self, c)
        taken.append(events is not None)
        return events

    monkeypatch.setattr(_Run, "_hold_in_order", counted)
    fast, fast_out = run(batches)
    assert sum(taken) > len(batches) // 2 and not all(taken)  # both paths ran
    monkeypatch.setattr(_Run, "_hold_in_order", lambda self, c: None)
    slow, slow_out = run(batches)
    assert fast_out == slow_out
    assert any(step[2] for step in slow_out[:-1]), "the run should have events"
    assert fast.last_seen == slow.last_seen and fast.detector.segments() == slow.detector.segments()
    assert json.dumps(fast.detector.labeller.state()) == json.dumps(slow.detector.labeller.state())
