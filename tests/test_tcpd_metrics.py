"""F1 and Cover of the TCPD benchmark (benchmarks/tcpd_metrics.py) and its harness.

Reference values: hand computations, the worked examples in TCPDBench's
``analysis/scripts/metrics.py``, and the published per-series Default scores
of G. J. J. van den Burg and C. K. I. Williams, "An Evaluation of Change Point
Detection Algorithms", arXiv:2003.06222 (copied in
benchmarks/tcpd_published_default.json).
"""

from __future__ import annotations

import doctest
import json
import math
import os
import shlex
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not part of the installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import tcpd, tcpd_metrics  # noqa: E402
from benchmarks.tcpd_metrics import (  # noqa: E402
    clean_predictions,
    cover_single,
    covering,
    f_measure,
    partition_from_change_points,
    true_positives,
)

TCPD_DIR = REPO_ROOT / "tests" / "data" / "tcpd"  # a copy of TCPD's redistributable subset
if not TCPD_DIR.is_dir():
    TCPD_DIR = REPO_ROOT.parent / "shared" / "tcpd"

PAPER_SUBSET = {
    "bank", "brent_spot", "businv", "centralia", "children_per_woman", "co2_canada",
    "construction", "debt_ireland", "gdp_argentina", "gdp_croatia", "gdp_iran", "gdp_japan",
    "global_co2", "homeruns", "jfk_passengers", "lga_passengers", "nile", "ozone",
    "rail_lines", "seatbelts", "shanghai_license", "unemployment_nl", "us_population",
    "usd_isk", "well_log",
}  # fmt: skip


@pytest.fixture(scope="module")
def tcpd_data() -> tuple[list[tcpd.Series], list[str]]:
    if not TCPD_DIR.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"TCPD data not found at {TCPD_DIR}")
        pytest.skip(f"TCPD data not found at {TCPD_DIR}")
    return tcpd.load_tcpd(TCPD_DIR)


@pytest.fixture(scope="module")
def published() -> dict[str, dict[str, dict[str, float | None]]]:
    return tcpd.load_published()


# ------------------------------------------------------------ the metrics


def test_module_doctests() -> None:
    result = doctest.testmod(tcpd_metrics)
    assert result.attempted > 10
    assert result.failed == 0


@pytest.mark.parametrize(
    ("true_cps", "predicted", "expected"),
    [
        # TCPDBench's own examples for true_positives
        ([1, 10, 20, 23], {3, 8, 20}, {1, 10, 20}),
        ([1, 10, 20, 23], {1, 3, 8, 20}, {1, 10, 20}),
        ([1, 10, 20, 23], {1, 3, 5, 8, 20}, {1, 10, 20}),
        ([], {1, 2, 3}, set()),
        ([1, 2, 3], set(), set()),
        # the margin is inclusive: 5 away matches, 6 away does not
        ([10], {15}, {10}),
        ([10], {16}, set()),
        # one prediction matches one true point only
        ([10, 12], {11}, {10}),
    ],
)
def test_true_positives(true_cps: list[int], predicted: set[int], expected: set[int]) -> None:
    assert true_positives(true_cps, predicted) == expected


def test_true_positives_takes_the_closest_and_earlier_on_ties() -> None:
    # 10 takes 9 (closer than 13); 14 then takes 13
    assert true_positives([10, 14], {9, 13}) == {10, 14}
    # 10 is as far from 8 as from 12: it takes 8, leaving 12 to 16
    assert true_positives([10, 16], {8, 12}) == {10, 16}


@pytest.mark.parametrize(
    ("annotations", "predictions", "expected"),
    [
        # TCPDBench's own examples for f_measure
        ({"1": [10, 20], "2": [11, 20], "3": [10], "4": [0, 5]}, [10, 20], 1.0),
        ({"1": [], "2": [10], "3": [50]}, [10], 0.9090909090909091),
        ({"1": [], "2": [10], "3": [50]}, [], 0.8),
    ],
)
def test_f_measure_benchmark_examples(
    annotations: dict[str, list[int]], predictions: list[int], expected: float
) -> None:
    assert f_measure(annotations, predictions).f1 == expected


def test_f_measure_by_hand() -> None:
    # T_a = {0, 5}, T_b = {0}, X = {0, 6}: every point matched: P = R = 1.
    assert f_measure({"a": [5], "b": []}, [6]) == tcpd_metrics.F1Score(1.0, 1.0, 1.0)
    # T = {0, 10, 12}, X = {0, 11}: 11 is taken by 10 only, so P = 2/2, R = 2/3, F1 = 0.8.
    score = f_measure({"a": [10, 12]}, [11])
    assert (score.precision, score.recall) == (1.0, pytest.approx(2 / 3))
    assert score.f1 == pytest.approx(0.8)
    # Precision uses the union of the annotations, recall averages annotators:
    # T_a = {0, 10}, T_b = {0, 30}, X = {0, 10, 30, 50}: P = 3/4, R = 1, F1 = 6/7.
    score = f_measure({"a": [10], "b": [30]}, [10, 30, 50])
    assert score.precision == 0.75
    assert score.recall == 1.0
    assert score.f1 == pytest.approx(6 / 7)


def test_f_measure_visiting_order() -> None:
    # T = {0, 14, 17}, X = {0, 15, 20}. Ascending: 14 takes 15 and 17 takes 20.
    # The benchmark visits its set {0, 14, 17} as CPython iterates it
    # (0, 17, 14): 17 takes 15, and 14 has nothing left within 5.
    ascending = f_measure({"a": [14, 17]}, [15, 20], order="ascending")
    assert (ascending.precision, ascending.recall, ascending.f1) == (1.0, 1.0, 1.0)
    benchmark = f_measure({"a": [14, 17]}, [15, 20])
    assert benchmark.precision == pytest.approx(2 / 3)
    assert benchmark.recall == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="order"):
        f_measure({"a": [1]}, [], order="sideways")  # type: ignore[arg-type]


def test_f_measure_needs_an_annotator() -> None:
    with pytest.raises(ValueError):
        f_measure({}, [3])
    with pytest.raises(ValueError):
        covering({}, [3], 10)


@pytest.mark.parametrize(
    ("locations", "n_obs", "expected"),
    [
        # TCPDBench's own examples for partition_from_cps (as index ranges)
        ([], 5, [(0, 5)]),
        ([3, 5], 8, [(0, 3), (3, 5), (5, 8)]),
        ([1, 2, 7], 8, [(0, 1), (1, 2), (2, 7), (7, 8)]),
        ([0, 4], 6, [(0, 4), (4, 6)]),
        # repeats and out-of-range indices start no segment
        ([4, 4, 6, 9, -1], 6, [(0, 4), (4, 6)]),
    ],
)
def test_partition_from_change_points(
    locations: list[int], n_obs: int, expected: list[tuple[int, int]]
) -> None:
    assert partition_from_change_points(locations, n_obs) == expected


@pytest.mark.parametrize(
    ("truth", "predicted", "expected"),
    [
        # TCPDBench's own examples for cover_single, on {1..6}, as index ranges
        ([(1, 4), (4, 7)], [(1, 4), (4, 6), (6, 7)], 0.8333333333333334),
        ([(1, 7)], [(1, 5), (5, 7)], 0.6666666666666666),
        ([(1, 4), (4, 7)], [(1, 3), (3, 5), (5, 7)], 0.6666666666666666),
        ([(1, 2), (2, 3), (3, 4), (4, 7)], [(1, 7)], 0.3333333333333333),
        # a partition covers itself perfectly
        ([(0, 3), (3, 10)], [(0, 3), (3, 10)], 1.0),
    ],
)
def test_cover_single(
    truth: list[tuple[int, int]], predicted: list[tuple[int, int]], expected: float
) -> None:
    assert cover_single(truth, predicted) == pytest.approx(expected, abs=1e-15)


def test_cover_single_rejects_mismatched_partitions() -> None:
    with pytest.raises(ValueError):
        cover_single([(0, 5)], [(0, 6)])


@pytest.mark.parametrize(
    ("annotations", "predictions", "expected"),
    [
        # TCPDBench's own examples for covering
        ({"1": [10, 20], "2": [10], "3": [0, 5]}, [10, 20], 0.7962962962962963),
        ({"1": [], "2": [10], "3": [40]}, [10], 0.7954144620811286),
        ({"1": [], "2": [10], "3": [40]}, [], 0.8189300411522634),
    ],
)
def test_covering_benchmark_examples(
    annotations: dict[str, list[int]], predictions: list[int], expected: float
) -> None:
    assert covering(annotations, predictions, 45) == pytest.approx(expected, abs=1e-15)


def test_covering_by_hand() -> None:
    # n = 10, prediction {6}: [0,6) [6,10].
    # Annotator a, {5}: [0,5) best J = 5/6, [5,10) best J = 4/5 -> (5*5/6 + 5*4/5)/10 = 49/60.
    # Annotator b, none: [0,10) best J = 6/10 -> 6/10 = 36/60.  Mean: 85/120 = 17/24.
    assert covering({"a": [5], "b": []}, [6], 10) == pytest.approx(17 / 24)


def test_clean_predictions_drops_end_points_and_repeats() -> None:
    assert clean_predictions([0, 1, 5, 5, 8, 9, 10, -3], 10) == [1, 5, 8]
    assert clean_predictions([], 10) == []


# ------------------------------------------------------------ against the paper

# Predictions that give, on these series, exactly the published per-series
# Default scores of binseg or pelt (F1 and Cover to the last bit): they are
# TCPDBench's changepoint outputs (which report the last index of the old
# segment, one before the TCPD convention), e.g. lga_passengers' binseg
# output [86, 253, 422] as TCPDBench's summary file records it.
PUBLISHED_PREDICTIONS = [
    ("brent_spot", "binseg", [139, 279, 378]),
    ("businv", "pelt", [152, 247]),
    ("centralia", "binseg", [9]),
    ("children_per_woman", "binseg", [177]),
    ("co2_canada", "binseg", [106, 166]),
    ("construction", "pelt", [63, 135, 189, 266]),
    ("construction", "binseg", [86, 135, 190, 267]),
    ("debt_ireland", "binseg", [8]),
    ("gdp_argentina", "binseg", [44]),
    ("gdp_croatia", "binseg", [7]),
    ("gdp_japan", "binseg", [23]),
    ("homeruns", "binseg", [59]),
    ("jfk_passengers", "binseg", [328]),
    ("lga_passengers", "binseg", [86, 253, 422]),
    ("nile", "binseg", [27]),
    ("ozone", "binseg", [10, 35]),
    ("rail_lines", "binseg", [25]),
    ("seatbelts", "binseg", [71, 168]),
    ("shanghai_license", "binseg", [147]),
    ("unemployment_nl", "binseg", [130, 142, 180]),
    ("unemployment_nl", "pelt", [131, 140, 174]),
    ("usd_isk", "pelt", [58, 115]),
    ("usd_isk", "binseg", [58, 116]),
]


@pytest.mark.parametrize(("name", "method", "predicted"), PUBLISHED_PREDICTIONS)
def test_reproduces_published_scores(
    tcpd_data: tuple[list[tcpd.Series], list[str]],
    published: dict[str, dict[str, dict[str, float | None]]],
    name: str,
    method: str,
    predicted: list[int],
) -> None:
    series = {s.name: s for s in tcpd_data[0]}[name]
    assert f_measure(series.annotations, predicted).f1 == published[method]["f1"][name]
    assert covering(series.annotations, predicted, series.n_obs) == pytest.approx(
        published[method]["cover"][name], abs=1e-15
    )


def test_lga_passengers_bocpd_published_score(
    tcpd_data: tuple[list[tcpd.Series], list[str]],
    published: dict[str, dict[str, dict[str, float | None]]],
) -> None:
    # bocpd's Default output on lga_passengers, from TCPDBench's summary file:
    # ten change points, several within 5 of two annotated points at once.
    series = {s.name: s for s in tcpd_data[0]}["lga_passengers"]
    predicted = [14, 87, 111, 164, 254, 296, 302, 327, 371, 423]
    score = f_measure(series.annotations, predicted)
    assert score.f1 == published["bocpd"]["f1"]["lga_passengers"]
    assert (score.precision, score.recall) == (6 / 11, pytest.approx(0.745))
    assert covering(series.annotations, predicted, series.n_obs) == pytest.approx(
        published["bocpd"]["cover"]["lga_passengers"], abs=1e-15
    )


def test_zero_baseline_reproduces_paper(
    tcpd_data: tuple[list[tcpd.Series], list[str]],
    published: dict[str, dict[str, dict[str, float | None]]],
) -> None:
    series, skipped = tcpd_data
    assert skipped == ["run_log"]
    assert len(series) == 31
    assert {s.name for s in series if s.in_mean} == PAPER_SUBSET

    results = tcpd.run_benchmark(series, tcpd.zero_predictor)
    for r in results:  # every series, to the last bits
        assert r.error is None
        assert r.predicted == []
        assert r.f1 == pytest.approx(published["zero"]["f1"][r.name], abs=1e-12), r.name
        assert r.cover == pytest.approx(published["zero"]["cover"][r.name], abs=1e-12), r.name
        assert (r.f1, r.cover) == (r.zero_f1, r.zero_cover)

    summary = tcpd.summarise(results, published)["paper_subset"]
    assert summary["n_series"] == 25
    f1, cover = summary["method"]["f1"], summary["method"]["cover"]
    # the paper's no-change-point row on these 25 series
    assert (round(f1, 3), round(cover, 3)) == (0.647, 0.557)
    assert f1 == pytest.approx(summary["paper_default"]["zero"]["f1"], abs=1e-12)
    assert cover == pytest.approx(summary["paper_default"]["zero"]["cover"], abs=1e-12)


def test_published_means_are_the_papers(
    published: dict[str, dict[str, dict[str, float | None]]],
) -> None:
    def mean(method: str, metric: str) -> float:
        values = [published[method][metric][name] for name in PAPER_SUBSET]
        assert all(v is not None for v in values)
        return round(math.fsum(values) / len(values), 3)  # type: ignore[arg-type]

    assert (mean("binseg", "f1"), mean("binseg", "cover")) == (0.690, 0.655)
    assert (mean("pelt", "f1"), mean("pelt", "cover")) == (0.684, 0.656)
    assert (mean("bocpd", "f1"), mean("bocpd", "cover")) == (0.657, 0.591)
    assert (mean("zero", "f1"), mean("zero", "cover")) == (0.647, 0.557)


# ------------------------------------------------------------ the harness

SERIES = tcpd.Series(name="toy", values=(1.0, None, 2.0, float("nan"), 3.0), annotations={"1": (2,), "2": ()})


def test_write_run_log(tmp_path: Path) -> None:
    path = tmp_path / "toy.jsonl"
    tcpd.write_run_log(SERIES, path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [
        {"step": 0, "value": 1.0},
        {"step": 1, "value": None},
        {"step": 2, "value": 2.0},
        {"step": 3, "value": None},
        {"step": 4, "value": 3.0},
    ]


def test_build_command() -> None:
    assert tcpd.build_command(["pw", "analyze"], Path("/t/x.jsonl")) == [
        "pw", "analyze", "/t/x.jsonl", "--json",
    ]  # fmt: skip
    assert tcpd.build_command(["pw", "a", "--in={file}"], Path("/t/x.jsonl")) == [
        "pw", "a", "--in=/t/x.jsonl",
    ]  # fmt: skip


def test_parse_change_points_takes_only_change_points() -> None:
    out = {
        "segments": [{"start_step": 0, "end_step": 4, "phase": "instability", "confidence": 1}],
        "events": [{"step": 3, "kind": "PLATEAU_START", "series": "value"}],
        "change_points": {"value": [2, 4.0], "other": []},
    }
    assert tcpd.parse_change_points(json.dumps(out)) == {"value": [2, 4], "other": []}
    for bad in ("not json", "{}", '{"change_points": {"value": [1.5]}}'):
        with pytest.raises(tcpd.BenchmarkError):
            tcpd.parse_change_points(bad)


def _fake_analyze(change_points: dict[str, list[int]]) -> list[str]:
    doc = json.dumps({"segments": [], "events": [], "change_points": change_points})
    return [sys.executable, "-c", f"print({doc!r})"]


def test_analyze_predictor_unions_series_and_cleans() -> None:
    predict = tcpd.analyze_predictor(_fake_analyze({"value": [0, 2, 4], "x": [2, 3]}), 30)
    result = tcpd.score_series(SERIES, predict)
    assert result.error is None
    assert result.raw_change_points == {"value": [0, 2, 4], "x": [2, 3]}
    assert result.predicted == [2, 3]  # 0 and n - 1 = 4 dropped, union deduplicated
    assert result.f1 == f_measure(SERIES.annotations, [2, 3]).f1
    assert result.cover == covering(SERIES.annotations, [2, 3], 5)
    assert result.seconds is not None and result.seconds > 0


def test_analyze_failure_is_recorded() -> None:
    predict = tcpd.analyze_predictor([sys.executable, "-c", "import sys; sys.exit(3)"], 30)
    result = tcpd.score_series(SERIES, predict)
    assert result.f1 is None
    assert result.error is not None and "exit status 3" in result.error


def test_main_zero_writes_json(tcpd_data: tuple[list[tcpd.Series], list[str]], tmp_path: Path) -> None:
    out = tmp_path / "zero.json"
    assert tcpd.main(["--tcpd", str(TCPD_DIR), "--method", "zero", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["series"]) == 31
    subset = doc["summary"]["paper_subset"]
    assert round(subset["method"]["f1"], 3) == 0.647
    assert round(subset["zero_computed"]["cover"], 3) == 0.557


def test_main_with_cmd(tcpd_data: tuple[list[tcpd.Series], list[str]], tmp_path: Path) -> None:
    cmd = shlex.join(_fake_analyze({"value": [28]}))
    out = tmp_path / "nile.json"
    argv = ["--tcpd", str(TCPD_DIR), "--series", "nile", "--cmd", cmd, "--json", str(out)]
    assert tcpd.main(argv) == 0
    (nile,) = json.loads(out.read_text())["series"]
    assert nile["predicted"] == [28]
    assert nile["f1"] == 1.0
