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
    monkeypatch.setattr(logfile._blocks, "_BLOCK_LINES", 3)
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
    ("string value", "run.jsonl", '{"step": 0, "val_acc": 0.5}\n{"step": 1, "val_acc": "high"}\n',
     2, 'value of "val_acc" is not a number'),
    ("string first", "run.jsonl", '{"step": 0, "a": "x"}\n{"step": 1, "a": 2}\n', 1,
     'value of "a" is not a number: "x"'),
    ("bool value", "run.jsonl", '{"step": 0, "a": 1}\n{"step": 1, "a": false}\n', 2,
     'value of "a" is not a number'),
    ("list value", "run.jsonl", '{"step": 0, "a": 1}\n{"step": 1, "a": [1]}\n', 2,
     'value of "a" is not a number'),
    ("bad name", "run.jsonl", '{"step": 0, "val acc": 1}\n', 1, "whitespace"),
    ("empty", "run.jsonl", "", None, "no records"),
    ("blank only", "run.jsonl", "\n  \n", None, "no records"),
    ("csv no step", "run.csv", "a,b\n1,2\n", 1, 'no "step" column'),
    ("csv bad name", "run.csv", "step,val acc\n1,2\n", 1, "whitespace"),
    ("csv bad value", "run.csv", "step,a\n0,1\n1,x\n", 3, 'value of "a" is not a number'),
    ("csv text first", "run.csv", "step,a\n0,\n1,x\n2,nan\n3,0.5\n", 3,
     'value of "a" is not a number: "x"'),
    ("csv percent sign", "run.csv", "step,acc\n0,0.5\n1,51%\n", 3, '"51%"'),
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


# --- logs as users have them: warnings, not errors -------------------------------

LIGHTNING_CSV = """\
epoch,step,train_loss,train_acc_step,val_loss,val_acc,train_acc_epoch,lr-Adam
0,49,2.1,20.0,,,,0.001
0,99,1.9,30.0,,,,0.001
0,99,,,1.8,35.0,,
0,99,,,,,28.0,
1,149,1.5,50.0,,,,0.0005
1,199,1.2,60.0,,,,0.0005
1,199,,,1.3,55.0,,
1,199,,,,,58.0,
"""


def test_lightning_csv_logger_rows_merge_by_step(tmp_path: Path) -> None:
    path = _write(tmp_path, "metrics.csv", LIGHTNING_CSV)
    notes: list[str] = []
    columns = read_log(path, warn=notes.append)
    assert notes == []  # nothing of the file is left unread
    assert list(columns) == [  # no "epoch": a counter, like "step"
        "train_loss", "train_acc_step", "val_loss", "val_acc", "train_acc_epoch", "lr-Adam"
    ]
    assert _as_lists(columns) == {
        "train_loss": ([49, 99, 149, 199], [2.1, 1.9, 1.5, 1.2]),
        # Percent stays percent: the detector decides per series, not the reader per value.
        "train_acc_step": ([49, 99, 149, 199], [20.0, 30.0, 50.0, 60.0]),
        "val_loss": ([99, 199], [1.8, 1.3]),
        "val_acc": ([99, 199], [35.0, 55.0]),
        "train_acc_epoch": ([99, 199], [28.0, 58.0]),
        "lr-Adam": ([49, 99, 149, 199], [0.001, 0.001, 0.0005, 0.0005]),
    }


def test_a_repeated_step_keeps_the_last_value_with_a_warning(tmp_path: Path) -> None:
    # A run resumed from its step-10 checkpoint logs steps 10 and 20 again.
    path = _write(
        tmp_path,
        "run.jsonl",
        '{"step": 0, "a": 1, "b": 5}\n{"step": 10, "a": 2}\n{"step": 20, "a": 3}\n'
        '{"step": 10, "a": 20}\n{"step": 20, "a": null, "b": 6}\n{"step": 30, "a": 4}\n',
    )
    notes: list[str] = []
    columns = read_log(path, warn=notes.append)
    assert columns["a"][0].tolist() == [0, 10, 20, 30]
    np.testing.assert_array_equal(columns["a"][1], [1.0, 20.0, math.nan, 4.0])
    assert _as_lists({"b": columns["b"]}) == {"b": ([0, 20], [5.0, 6.0])}
    assert len(notes) == 1 and str(path) in notes[0]
    assert "more than one value at a step" in notes[0] and notes[0].endswith(": a")


def test_percent_values_are_read_as_logged(tmp_path: Path) -> None:
    # A fraction early and percent later stays as logged: no rescaling per value.
    path = _write(tmp_path, "run.csv", "step,val_acc\n0,0.5\n10,1.2\n20,12.5\n30,99.5\n")
    assert _as_lists(read_log(path)) == {"val_acc": ([0, 10, 20, 30], [0.5, 1.2, 12.5, 99.5])}


def test_csv_repeated_column_names_get_a_suffix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        "run.csv",
        "step,loss,acc,loss,loss.1,step,loss\n0,1,0.1,2,3,0,4\n10,5,0.2,6,7,10,8\n",
    )
    columns = read_log(path)
    # Second "loss" -> "loss.1" is taken by a column of that name -> "loss.2"; third -> "loss.3".
    assert _as_lists(columns) == {
        "loss": ([0, 10], [1.0, 5.0]),
        "acc": ([0, 10], [0.1, 0.2]),
        "loss.2": ([0, 10], [2.0, 6.0]),
        "loss.1": ([0, 10], [3.0, 7.0]),
        "loss.3": ([0, 10], [4.0, 8.0]),
    }
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f'phasewatch: warning: {path}: repeated column names, read as series of their own: '
        f'"loss" as "loss.2", "loss" as "loss.3"',
        f'phasewatch: warning: {path}: columns not read: repeated "step" (column 6)',
    ]


def test_csv_non_numeric_columns_are_skipped_once_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path,
        "run.csv",
        ",step,timestamp,run_name,loss,note,empty,val_loss\n"
        "0,0,2024-05-01T10:00:00,baseline,2.5,,,None\n"
        "1,10,2024-05-01T10:01:00,baseline,2.0,nan,,1.9\n"
        "2,20,2024-05-01T10:02:00,baseline,nan,restarted,,N/A\n"
        "3,30,2024-05-01T10:03:00,baseline,1.0,,,null\n",
    )
    monkeypatch.setattr(logfile._blocks, "_BLOCK_LINES", 2)  # the verdict is the file's, not a block's
    columns = read_log(path)
    assert list(columns) == ["loss", "empty", "val_loss"]
    assert columns["loss"][0].tolist() == [0, 10, 20, 30]
    assert columns["empty"][0].tolist() == []  # empty: a series without points, as before
    assert _as_lists({"v": columns["val_loss"]}) == {"v": ([10], [1.9])}  # None, N/A: missing
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"phasewatch: warning: {path}: columns not read: column 1 (no name)",
        f"phasewatch: warning: {path}: non-numeric columns, not read: timestamp, run_name, note",
    ]


@pytest.mark.parametrize("block_lines", [2, 3, 65_536])
@pytest.mark.parametrize(
    ("cells", "line", "shown"),
    [
        (["1", "2", "x", "3"], 4, '"x"'),  # numbers, then a non-number
        (["", "x", "nan", "y", "2"], 3, '"x"'),  # non-numbers, then a number
    ],
)
def test_a_number_and_a_non_number_in_one_column_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_lines: int, cells: list[str],
    line: int, shown: str,
) -> None:
    monkeypatch.setattr(logfile._blocks, "_BLOCK_LINES", block_lines)
    rows = [f"{i},{c},{i}" for i, c in enumerate(cells)]
    path = _write(tmp_path, "run.csv", "\n".join(["step,a,b", *rows]) + "\n")
    with pytest.raises(LogFileError) as caught:
        read_log(path)
    assert caught.value.line == line
    assert caught.value.problem == f'value of "a" is not a number: {shown}'


def test_jsonl_sparse_rows_text_keys_and_epoch(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "run.jsonl",
        '{"step": 0, "epoch": 0, "loss": 2.0, "time": "10:00", "ok": true}\n'
        '{"step": 0, "val loss": "n/a", "val_loss": 2.2}\n'
        '{"step": 5, "epoch": 1, "loss": 1.0, "time": null, "ok": false, "tags": ["a"]}\n',
    )
    notes: list[str] = []
    columns = read_log(path, warn=notes.append)
    assert _as_lists(columns) == {"loss": ([0, 5], [2.0, 1.0]), "val_loss": ([0], [2.2])}
    # A non-numeric key is not a series: its name is not checked ("val loss").
    assert notes == [f"{path}: non-numeric columns, not read: time, ok, val loss, tags"]


# --- end to end through the CLI ----------------------------------------------------


def _lightning_copy(rows: list[dict], path: Path) -> None:
    """A run as Lightning's CSVLogger writes it: a train row and a val row per step,
    with an epoch counter, a timestamp, and empty cells for the other rows' metrics."""
    names = [k for k in rows[0] if k != "step"]
    val = [n for n in names if n.startswith("test_")]
    lines = ["epoch,step,timestamp," + ",".join(names)]
    for i, row in enumerate(rows):
        for part in ([n for n in names if n not in val], val):
            cells = [
                ("nan" if row[n] is None else repr(row[n])) if n in part and n in row else ""
                for n in names
            ]
            lines.append(f"{i // 10},{row['step']},2024-05-01T10:{i % 60:02d}," + ",".join(cells))
    path.write_text("\n".join(lines) + "\n")


def test_analyze_a_lightning_csv_like_the_jsonl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from detector.cli import main

    run = shared_dir("runs", "grok_add_0.jsonl")
    csv_path = tmp_path / "metrics.csv"
    _lightning_copy(read_rows(run), csv_path)
    assert main(["analyze", str(run), "--json"]) == 0
    from_jsonl = capsys.readouterr().out
    assert main(["analyze", str(csv_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert out == from_jsonl  # merged rows: the same series, points and timeline
    assert err.splitlines() == [
        f"phasewatch: warning: {csv_path}: non-numeric columns, not read: timestamp"
    ]
    assert main(["analyze", str(csv_path)]) == 0
    assert "12 series" in capsys.readouterr().out


def test_analyze_a_mixed_column_is_one_line_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from detector.cli import main

    path = _write(tmp_path, "metrics.csv", "epoch,step,loss\n0,0,1.0\n0,1,oops\n")
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f'phasewatch: {path}:3: value of "loss" is not a number: "oops"\n'


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


def test_jsonl_lines_parse_as_json_loads_parses_them() -> None:
    """The reader's direct scan of a line gives json.loads' value, or its error."""
    from detector.logfile._jsonl import _loads_lines

    lines = ['{"step": 1, "loss": 0.5}\n', '{"step": 2}', '{"step": 3}\r\n', ' {"step": 4}\n',
             '{"step": 5} \n', '{"a": NaN, "b": -Infinity, "c": null, "d": [1, {"e": "x"}]}\n', '7\n',
             '"text"\n', '[1, 2]\n', '\ufeff{"step": 6}\n', '{"step": 7}\x0c\n', '{"step": 8}\r',
             '{"step": 1}, {"step": 2}\n', '{"step": \n', '\n', '', '{"a": 1}{"b": 2}\n', '{"step": 1e999}\n']
    for line in lines:
        try:
            expected: object = json.loads(line)
        except ValueError as exc:
            expected = type(exc)
        try:
            got: object = _loads_lines([line])[0]
        except ValueError as exc:
            got = type(exc)
        assert repr(got) == repr(expected), line
