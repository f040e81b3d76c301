"""Shared test helpers: locating the test data and reading run logs without the CLI.

The data the tests read is in the repository, ``tests/data/`` (copies of the
project's labelled runs and of TCPD's redistributable subset, see
``tests/data/README.md``), so a fresh clone runs them; a sibling ``../shared``
folder is only looked at for what ``tests/data`` lacks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = REPO / "tests" / "data"


def data_path(*parts: str) -> Path:
    """``tests/data/<parts>``, else ``../shared/<parts>`` (which may not exist)."""
    path = DATA.joinpath(*parts)
    return path if path.exists() else SHARED.joinpath(*parts)


def shared_dir(*parts: str) -> Path:
    """Test data (:func:`data_path`); in CI its absence is a failure, not a skip."""
    path = data_path(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} not present")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_to_columns(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    steps: dict[str, list[int]] = {}
    values: dict[str, list[float]] = {}
    for row in rows:
        step = row["step"]
        for key, value in row.items():
            if key == "step":
                continue
            steps.setdefault(key, []).append(step)
            values.setdefault(key, []).append(math.nan if value is None else float(value))
    return {k: (np.asarray(steps[k], dtype=np.int64), np.asarray(values[k])) for k in steps}
