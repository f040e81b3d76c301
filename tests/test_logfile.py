"""Run log reading: JSON Lines and CSV, errors that name the line, batching."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from detector import logfile
from detector.errors import LogFileError
from detector.logfile import count_points, detect_format, iter_batches, read_log, write_jsonl
from tests.helpers import read_rows, rows_to_columns, shared_dir


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _as_lists(columns: dict) -> dict:
    return {name: (s.tolist(), v.tolist()) for name, (s, v) in columns.items()}


def _assert_columns_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name][0], want[name][0])
        np.testing.assert_array_equal(got[name][1], want[name][1])  # NaN == NaN here


# --- JSON Lines ----------------------------------------------------------------


def test_jsonl_points_nulls_and_absent_keys(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "run.jsonl",
        '{"step": 0, "loss": 2.5, "acc": 0}\n'
        '{"step": 10, "loss": null}\n'
        '{"step": 20, "loss": "nan", "acc": "inf", "lr": "-inf"}\n'
        '{"step": 30, "loss": NaN, "acc": -Infinity, "lr": 1e-3}\n',
    )
    columns = read_log(path)
    assert list(columns) == ["loss", "acc", "lr"]  # order of first appearance
    steps, values = columns["loss"]
    assert steps.dtype == np.int64 and values.dtype == np.float64
    assert steps.tolist() == [0, 10, 20, 30]
    assert values[0] == 2.5 and np.isnan(values[1:]).all()
    assert columns["acc"][0].tolist() == [0, 20, 30]  # absent at 10: no point
    assert columns["acc"][1].tolist() == [0.0, math.inf, -math.inf]
    assert columns["lr"][0].tolist() == [20, 30]


def test_jsonl_blank_lines_are_skipped_and_lines_still_counted(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.jsonl", '\n{"step": 0, "a": 1}\n\n   \n{"step": 1, "a": []}\n')
    with pytest.raises(LogFileError) as caught:
        read_log(path)
    assert caught.value.line == 5


def test_integral_float_steps_are_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, "run.jsonl", '{"step": 10.0, "a": 1}\n{"step": 20, "a": 2}\n')
    assert read_log(path)["a"][0].tolist() == [10, 20]


def test_blocks_join_seamlessly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks: the block boundaries must not show in the columns or the line numbers.
    rows = [{"step": i, "a": float(i)} if i % 3 else {"step": i, "b": i} for i in range(20)]
    path = tmp_path / "run.jsonl"
    write_jsonl(path, rows)
    whole = read_log(path)
    monkeypatch.setattr(logfile, "_BLOCK_LINES", 3)
    _assert_columns_equal(read_log(path), whole)
    _assert_columns_equal(whole, rows_to_columns(rows))
    with path.open("a") as out:
        out.write('{"step": 20, "a": "oops"}\n')
    with pytest.raises(LogFileError) as caught:
        read_log(path)
    assert caught.value.line == 21


def test_gzip_and_content_sniffing(tmp_path: Path) -> None:
    text = '{"step": 0, "a": 1}\n{"step": 5, "a": 2}\n'
    gz = tmp_path / "run.jsonl.gz"
    with gzip.open(gz, "wt") as out:
        out.write(text)
    plain = _write(tmp_path, "run.log", text)
    csv_plain = _write(tmp_path, "run.txt", "step,a\n0,1\n5,2\n")
    assert detect_format(str(plain)) == "jsonl"
    assert detect_format(str(csv_plain)) == "csv"
    expected = {"a": ([0, 5], [1.0, 2.0])}
    for path in (gz, plain, csv_plain):
        assert _as_lists(read_log(path)) == expected


def test_write_jsonl_round_trip_with_non_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"step": np.int64(0), "a": np.float64("nan"), "b": math.inf, "c": 1.5}])
    assert json.loads(path.read_text()) == {"step": 0, "a": None, "b": None, "c": 1.5}
    columns = read_log(path)
    assert np.isnan(columns["a"][1]).all() and columns["c"][1].tolist() == [1.5]


# --- CSV -----------------------------------------------------------------------


def test_csv_empty_cells_are_no_point(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "run.csv",
        "step,loss,acc,never\n0,2.5,,\n10,nan,0.5,\n20.0, inf ,-inf,\n",
    )
    columns = read_log(path)
    assert list(columns) == ["loss", "acc", "never"]
    assert columns["loss"][0].tolist() == [0, 10, 20]
    assert columns["loss"][1][0] == 2.5 and np.isnan(columns["loss"][1][1])
    assert columns["loss"][1][2] == math.inf
    assert _as_lists({"acc": columns["acc"]}) == {"acc": ([10, 20], [0.5, -math.inf])}
    assert columns["never"][0].tolist() == []  # every series of the file is a key


def test_csv_and_jsonl_read_the_same(tmp_path: Path) -> None:
    rows = [{"step": i * 10, "a": i / 3, "b": None if i % 4 == 0 else -i} for i in range(50)]
    write_jsonl(tmp_path / "run.jsonl", rows)
    lines = ["step,a,b"] + [
        f"{r['step']},{r['a']!r},{'nan' if r['b'] is None else r['b']}" for r in rows
    ]
    _write(tmp_path, "run.csv", "\n".join(lines) + "\n")
    _assert_columns_equal(read_log(tmp_path / "run.csv"), read_log(tmp_path / "run.jsonl"))


# --- errors name the file and the first bad line --------------------------------

ERRORS = [
    ("not JSON", "run.jsonl", '{"step": 0, "a": 1}\n{"step": 1, "a": \n', 2, "not valid JSON"),
    ("not an object", "run.jsonl", '{"step": 0}\n[1, 2]\n', 2, "expected a JSON object"),
    ("no step", "run.jsonl", '{"step": 0, "a": 1}\n{"a": 2}\n', 2, 'no "step"'),
    ("null step", "run.jsonl", '{"step": null, "a": 2}\n', 1, '"step" is not an integer'),
    ("float step", "run.jsonl", '{"step": 1.5, "a": 2}\n', 1, '"step" is not an integer'),
    ("string step", "run.jsonl", '{"step": "3", "a": 2}\n', 1, '"step" is not an integer'),
    ("bool step", "run.jsonl", '{"step": true, "a": 2}\n', 1, '"step" is not an integer'),
    ("negative step", "run.jsonl", '{"step": -1, "a": 2}\n', 1, "non-negative"),
    ("string value", "run.jsonl", '{"step": 0, "val_acc": "high"}\n', 1,
     'value of "val_acc" is not a number'),
    ("bool value", "run.jsonl", '{"step": 0, "a": 1}\n{"step": 1, "a": false}\n', 2,
     'value of "a" is not a number'),
    ("list value", "run.jsonl", '{"step": 0, "a": [1]}\n', 1, 'value of "a" is not a number'),
    ("bad name", "run.jsonl", '{"step": 0, "val acc": 1}\n', 1, "whitespace"),
    ("empty", "run.jsonl", "", None, "no records"),
    ("blank only", "run.jsonl", "\n  \n", None, "no records"),
    ("csv no step", "run.csv", "a,b\n1,2\n", 1, 'no "step" column'),
    ("csv duplicate", "run.csv", "step,a,a\n1,2,3\n", 1, "appears twice"),
    ("csv bad value", "run.csv", "step,a\n0,1\n1,x\n", 3, 'value of "a" is not a number'),
    ("csv ragged", "run.csv", "step,a\n0,1\n1,2,3\n", 3, "3 fields"),
    ("csv empty step", "run.csv", "step,a\n0,1\n,2\n", 3, 'no "step"'),
    ("csv header only", "run.csv", "step,a\n", None, "no records"),
]


@pytest.mark.parametrize(
    ("name", "text", "line", "problem"),
    [e[1:] for e in ERRORS],
    ids=[e[0] for e in ERRORS],
)
def test_errors_name_file_and_line(
    tmp_path: Path, name: str, text: str, line: int | None, problem: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(LogFileError) as caught:
        read_log(path)
    assert caught.value.line == line
    assert problem in caught.value.problem
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LogFileError, match="no such file"):
        read_log(tmp_path / "nope.jsonl")


def test_the_first_bad_line_is_reported(tmp_path: Path) -> None:
    # Column "b" goes bad on line 2, column "a" on line 3, JSON itself on line 4.
    path = _write(
        tmp_path,
        "run.jsonl",
        '{"step": 0, "a": 1, "b": 1}\n{"step": 1, "a": 1, "b": "x"}\n'
        '{"step": 2, "a": "y", "b": 1}\n{"step": 3,\n',
    )
    with pytest.raises(LogFileError) as caught:
        read_log(path)
    assert caught.value.line == 2


# --- batches -------------------------------------------------------------------


def test_batches_keep_rows_together_in_step_order() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(0, 1000, 10)
    columns = {
        name: (steps[mask], rng.normal(size=int(mask.sum())))
        for name, mask in (("a", np.ones(100, bool)), ("b", rng.random(100) < 0.5))
    }
    batches = list(iter_batches(columns, 25))
    assert sum(count_points(b) for b in batches) == count_points(columns)
    seen: set[int] = set()
    for batch in batches[:-1]:
        batch_steps = {int(s) for s, _ in batch.values() for s in s}
        assert not batch_steps & seen  # a step never spans two batches
        assert min(batch_steps) > max(seen, default=-1)  # step order
        seen |= batch_steps
        assert abs(count_points(batch) - 25) < 2  # off by less than a row (2 points)
    for name, (s, v) in columns.items():
        np.testing.assert_array_equal(np.concatenate([b[name][0] for b in batches if name in b]), s)
        np.testing.assert_array_equal(np.concatenate([b[name][1] for b in batches if name in b]), v)


def test_batches_sort_out_of_order_steps_stably() -> None:
    columns = {"a": (np.array([20, 10, 10, 0]), np.array([1.0, 2.0, 3.0, 4.0]))}
    (batch,) = iter_batches(columns, 100)
    assert batch["a"][0].tolist() == [0, 10, 10, 20]
    assert batch["a"][1].tolist() == [4.0, 2.0, 3.0, 1.0]


def test_batches_of_nothing_and_bad_size() -> None:
    assert list(iter_batches({"a": (np.array([], np.int64), np.array([]))}, 10)) == []
    with pytest.raises(ValueError):
        list(iter_batches({}, 0))


# --- the shared real runs ------------------------------------------------------


def test_shared_runs_read_like_a_plain_parser() -> None:
    runs = sorted(shared_dir("runs").glob("*.jsonl"))
    assert runs
    for path in runs:
        _assert_columns_equal(read_log(path), rows_to_columns(read_rows(path)))
