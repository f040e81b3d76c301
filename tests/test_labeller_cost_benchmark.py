"""``benchmarks.labeller_cost`` on a run of the repository (a smoke test: the cell runs and adds up)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import labeller_cost

RUN = Path(__file__).parent / "data" / "runs" / "grok_add_0.jsonl"


def test_labeller_cost_cell_adds_up() -> None:
    doc = labeller_cost.measure([RUN], sizes=(8, 64), repeats=1)
    (run,) = doc["runs"]
    assert run["run"] == "grok_add_0"
    for size, cell in run["cells"].items():
        assert cell["lines"] == 417  # every line of the run, once
        assert cell["calls"] == -(-417 // int(size))
        assert 0 < cell["quiet_calls"] < cell["calls"]  # the first block is never quiet
        assert cell["us_per_call"] > 0 and cell["us_per_quiet_call"] > 0
