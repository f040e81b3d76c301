"""The engine's settings and the limits every input is checked against (steps,
labels, names)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from detector.core import RunDetectorConfig
from detector.core.types import MAX_NAME_LENGTH, check_name
from detector.errors import InvalidArgument
from detector.limits import RunRateLimiter


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the engine; the detector's own are in ``detector``."""

    max_series_per_run: int = 1024
    max_runs: int = 10_000
    # Distinct steps held back for reordering; a point older than the oldest
    # held step is a duplicate (ignored) or too late (rejected).
    reorder_window: int = 2
    recent_events: int = 20
    detector: RunDetectorConfig = field(default_factory=RunDetectorConfig)
    # Points a second per run (a token bucket, see detector.limits); None: no limit.
    max_points_per_second: float | None = None
    # The bucket's size in points; None: one second's worth.
    points_burst: float | None = None
    # Between full checkpoints, a commit appends only its batches to the run's
    # checkpoint log; a full one is written once the log holds this many points
    # (0: every commit writes a full checkpoint). Restoring replays the log, so
    # this bounds restore time (~5 µs a point) against write volume (a full
    # checkpoint is ~40 kB a series, a logged point 16 bytes).
    checkpoint_log_points: int = 16384
    # A run's events kept in memory for its timeline (the newest) when there is
    # no store; with one, timelines are read from the store, which keeps them all.
    max_timeline_events: int = 10_000
    # A batch is detected in blocks of about this many points, split by step:
    # cost stays linear in the batch (one 400k-point block cost 10x its share),
    # other runs detect between blocks, and a stopping server or a cancelled
    # call stops after the current block.
    block_points: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_series_per_run", "max_runs", "reorder_window", "recent_events",
                     "max_timeline_events", "block_points"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_log_points < 0:
            raise InvalidArgument(
                f"checkpoint_log_points must be at least 0, got {self.checkpoint_log_points}"
            )
        if self.max_points_per_second is not None:
            RunRateLimiter(self.max_points_per_second, self.points_burst)  # validates both


# Steps are 0 ..= MAX_STEP. 2^53 - 1 is the largest integer that float64 (the
# detectors' step arithmetic, JSON numbers in every client) holds exactly, and
# leaves int64 room for "step + 1" and segment ends downstream: a step beyond
# it is refused (InvalidArgument) rather than overflowing later (issue 18).
MAX_STEP = 2**53 - 1
# Labels are copied into every RunPhase, ListRuns page and /metrics scrape: bound
# them so that one run cannot make those exceed what clients accept (issue 18).
MAX_LABELS = 64
MAX_LABEL_KEY_BYTES = 128
MAX_LABEL_VALUE_BYTES = 1024


def _check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels; a run may have at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key.encode()) > MAX_LABEL_KEY_BYTES:
            raise InvalidArgument(
                f"label key {key[:40]!r} must be 1 to {MAX_LABEL_KEY_BYTES} bytes"
            )
        if len(value.encode()) > MAX_LABEL_VALUE_BYTES:
            raise InvalidArgument(
                f"label {key!r}: value of {len(value.encode())} bytes; at most "
                f"{MAX_LABEL_VALUE_BYTES}"
            )


_INT64 = np.dtype(np.int64)  # a dtype compares with a dtype at half the cost of with a type


def _check_steps(name: str, steps: Sequence[int] | np.ndarray) -> None:
    """InvalidArgument when a step is above MAX_STEP (negative ones are rejected per point)."""
    if len(steps) == 0:
        return
    try:
        top = int(np.max(np.asarray(steps, dtype=np.int64)))
    except OverflowError:  # a Python int beyond int64
        top = MAX_STEP + 1
    if top > MAX_STEP:
        raise InvalidArgument(
            f"series {name!r}: step {top} is beyond the largest step, {MAX_STEP} (2^53 - 1); "
            "nothing of this batch was taken"
        )


def _check_all_steps(columns: Mapping[str, tuple[Sequence[int] | np.ndarray, object]]) -> None:
    """``_check_steps`` for every series of a batch: one concatenation and one max
    when the steps are int64 arrays (what the server's conversion gives), instead
    of a numpy call per series. O(points)."""
    arrays = [steps for steps, _ in columns.values()]
    if all(isinstance(a, np.ndarray) and a.dtype == _INT64 and a.ndim == 1 for a in arrays):
        filled = [a for a in arrays if len(a)]
        if not filled or int(np.concatenate(filled).max()) <= MAX_STEP:
            return
    for name, (steps, _) in columns.items():
        _check_steps(name, steps)


@functools.lru_cache(maxsize=4096)
def _name_problem(kind: str, name: str) -> str | None:
    return check_name(kind, name)


def _check(kind: str, name: str) -> None:
    # Cached: a run's series names are checked again with every batch. Only names
    # of a valid length are cached, so the cache holds at most 4096 short strings.
    problem = (_name_problem(kind, name) if len(name) <= MAX_NAME_LENGTH
               else check_name(kind, name))
    if problem is not None:
        raise InvalidArgument(problem)
