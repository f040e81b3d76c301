"""The notebook API, ``detector.analyze``: the same answers as ``phasewatch
analyze`` whatever the input's form, tables with or without pandas, a figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import detector
from detector.cli import main
from detector.logfile import read_log

ROOT = Path(__file__).resolve().parents[1]
RUN = str(resources.files("detector.data") / "grok_add_0.jsonl")


@pytest.fixture(scope="module")
def bundled() -> detector.Analysis:
    return detector.analyze(RUN, run_id="grok_add_0")


def test_the_same_document_as_the_command(
    bundled: detector.Analysis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["analyze", RUN, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(bundled.to_dict()))


def test_a_mapping_and_a_dataframe_give_the_same_analysis(bundled: detector.Analysis) -> None:
    pd = pytest.importorskip("pandas")
    columns = read_log(RUN)
    as_tuples = detector.analyze({k: (s, v) for k, (s, v) in columns.items()})
    as_series = detector.analyze({k: pd.Series(v, index=s) for k, (s, v) in columns.items()})
    for other in (as_tuples, as_series):
        assert other.to_dict() == bundled.to_dict()
    # Wide, as pandas.read_csv gives a Lightning metrics.csv: NaN where a series was not
    # logged, so a NaN cell is no point; compared with the same points as a mapping.
    finite = {k: (s[~np.isnan(v)], v[~np.isnan(v)]) for k, (s, v) in columns.items()}
    frame = pd.DataFrame({k: pd.Series(v, index=s) for k, (s, v) in finite.items()})
    frame = frame.rename_axis("step").reset_index()
    frame.insert(1, "epoch", 0)
    frame["note"] = "text"  # not a series
    assert detector.analyze(frame).to_dict() == detector.analyze(finite).to_dict()
    assert bundled.segments.equals(as_tuples.segments)
    assert list(bundled.events.columns)[:5] == ["step", "kind", "series", "confidence", "message"]


def test_sequences_are_indexed_from_zero_and_nan_cells_of_a_frame_are_no_point() -> None:
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    loss = np.r_[np.full(300, 2.0), np.full(300, 0.5)] + rng.normal(0, 0.02, 600)
    analysis = detector.analyze({"train_loss": list(loss)})
    assert analysis.columns["train_loss"][0].tolist() == list(range(600))
    steps = analysis.change_points["step"].tolist()
    assert steps and any(280 <= s <= 320 for s in steps)  # the drop is found
    frame = pd.DataFrame({"global_step": range(600), "train_loss": loss,
                          "val_loss": [1.0 if i % 50 == 0 else np.nan for i in range(600)]})
    sparse = detector.analyze(frame)
    assert sparse.columns["val_loss"][0].tolist() == list(range(0, 600, 50))


def test_plot_returns_a_figure(bundled: detector.Analysis, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    figure = bundled.plot(title="grokking")
    assert type(figure).__name__ == "Figure" and figure.axes
    figure.savefig(tmp_path / "out.png")
    assert (tmp_path / "out.png").stat().st_size > 10_000


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="a path, a pandas DataFrame or a mapping"):
        detector.analyze(42)
    with pytest.raises(ValueError, match="negative step"):
        detector.analyze({"loss": ([-1, 0], [1.0, 2.0])})
    with pytest.raises(ValueError, match="2 steps but 3 values"):
        detector.analyze({"loss": ([0, 1], [1.0, 2.0, 3.0])})


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_import_detector_is_light_and_tables_are_lists_without_pandas() -> None:
    loaded = _python(
        "import sys, detector; detector.__version__; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'numpy', 'scipy', 'ruptures', 'statsmodels', 'grpc', 'pandas'}))"
    )
    assert loaded == "[]"
    # pandas made unimportable in that process: the tables are lists of dicts.
    shown = _python(
        "import sys; sys.modules['pandas'] = None; import detector; "
        f"a = detector.analyze({RUN!r}); "
        "print(type(a.segments).__name__, sorted(a.segments[0]), sorted(a.change_points[0]))"
    )
    assert shown == "list ['confidence', 'end_step', 'phase', 'start_step'] ['series', 'step']"
