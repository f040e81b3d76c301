"""benchmarks.fingerprints: one hash per run and path, equal across batch sizes,
and changed by any change of an event."""

from __future__ import annotations

import numpy as np

from benchmarks import fingerprints, real_workload
from detector.logfile import write_jsonl


def _run(tmp_path, name: str, shift: float):
    rng = np.random.default_rng(3)
    rows = [{"step": s, "train_loss": float((2.0 if s < 600 else 2.0 - shift) * np.exp(rng.normal(0, 0.02))),
             "val_acc": min(1.0, s / 1500)} for s in range(0, 1200, 2)]
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(path, rows)
    return real_workload.load([path])[0]


def test_fingerprints_agree_across_batch_sizes_and_see_a_moved_event(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # The same run name, a smaller shift: its change point's evidence differs.
    first = fingerprints.fingerprints([_run(tmp_path / "a", "r", 1.5)])
    second = fingerprints.fingerprints([_run(tmp_path / "b", "r", 1.2)])
    assert set(first) == {"r@32", "r@256", "r@analyze"}
    assert first["r@32"] == first["r@256"]  # batching changes no result
    assert int(first["r@32"].split(":")[1]) > 0  # the shift is found
    assert first["r@32"] != second["r@32"] and first["r@analyze"] != second["r@analyze"]
    assert fingerprints.compare(first, first) == []
    differences = fingerprints.compare(first, {**second, "extra@32": "x:1"})
    assert any(line.startswith("r@32:") for line in differences)
    assert "extra@32: absent -> x:1" in differences
