"""``benchmarks.cost``'s engine cell on the repository's labelled runs (a smoke test: the
cell streams every point, once, and its stages add up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cost

RUNS = Path(__file__).parent / "data" / "runs"


def test_the_engine_cell_streams_every_point_and_its_stages_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cost, "ENGINE_LINES", (64,))
    logs = [p for p in RUNS.glob("*.jsonl") if p.with_name(p.stem + ".labels.json").exists()]
    assert logs, f"no labelled runs in {RUNS}"
    expected = 0
    for log in logs:
        for line in log.read_text().splitlines():
            record = json.loads(line)
            values = [v for k, v in record.items() if k != "step"]
            expected += sum(1 for v in values if v is None or isinstance(v, float | int))
    rows = cost.measure_engine(RUNS, repeats=1)
    assert [(r["lines"], r["store"], r["threads"], r.get("detect", True)) for r in rows] == [
        (64, "none", 1, True), (64, "sqlite", 1, True), (64, "sqlite", cost.ENGINE_STREAMS, True),
        (64, "sqlite", 1, False)]
    bare = rows.pop()
    # The engine with run detectors that find nothing: every point, and cheaper.
    assert bare["points"] == expected and 0 < bare["us_per_point"] < rows[1]["us_per_point"]
    threaded = rows.pop()
    # Every point, once, fed from 32 threads at once.
    assert threaded["points"] == expected and threaded["us_per_point"] > 0
    assert threaded["us_per_point_by_stage"] is None
    for row in rows:
        assert row["points"] == expected
        stages = row["us_per_point_by_stage"]
        assert set(stages) == set(cost.ENGINE_STAGES)
        assert stages["localiser"] > 0 and stages["labeller"] > 0
        assert row["localisations_per_1000_points"] > 0
    plain, durable = (r["us_per_point_by_stage"]["store"] for r in rows)
    assert durable > 10 * plain  # a checkpoint a batch into SQLite, against a call that returns at once
