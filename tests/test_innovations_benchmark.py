"""``benchmarks.innovations``: the fast trigger's innovations are white on white noise and
autocorrelated, with many more alarms, on a smooth curve (no shared data needed)."""

from __future__ import annotations

import numpy as np

from benchmarks import innovations


def test_white_noise_is_white_and_a_smooth_curve_is_not() -> None:
    rng = np.random.default_rng(3)
    white = innovations.summary("white", [rng.normal(size=4000) for _ in range(3)])
    t = np.arange(4000.0)
    smooth = innovations.summary("smooth", [np.sin(t / (40.0 + 10 * k)) + rng.normal(0, 1e-3, t.size)
                                            for k in range(3)])
    assert white["series"] == smooth["series"] == 3 and white["points"] == smooth["points"] == 12000
    assert abs(white["rho_median"]) < 0.2 and white["alarms_per_1000"] < 2
    assert smooth["rho_median"] > 0.5 and smooth["alarms_per_1000"] > 5 * max(white["alarms_per_1000"], 1.0)


def test_a_corpus_that_is_absent_is_said_and_skipped(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(innovations, "REPO", tmp_path / "repo")  # no ../shared, no generated runs
    assert innovations.main([]) == 0
    out, err = capsys.readouterr()
    assert "real_runs" in err and "absent" in err and "white noise" in out
