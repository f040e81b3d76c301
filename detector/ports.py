"""The types the engine's adapters share: run statuses, ingest results, the
snapshot the exporter reads, checkpoints, and the store's interface.

Standard library only (the core's types are imported for annotations alone),
so that a store, the exporter or the CLI can name these without importing the
engine and with it numpy, scipy and ruptures. :mod:`detector.engine`
re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from detector.core import Event, Phase, Segment
    from detector.core.types import Role, Split

__all__ = [
    "DETECTION_BUCKETS",
    "Checkpoint",
    "EngineSnapshot",
    "IngestResult",
    "RunClaim",
    "RunStatus",
    "SeriesStatus",
    "Store",
]


@dataclass(frozen=True)
class SeriesStatus:
    """One headline series of a run (training/validation loss and accuracy, as the
    labeller picked them), for the exporter's per-series gauges and the alerts."""

    name: str
    role: Role
    split: Split
    in_plateau: bool
    trend_tau: float | None  # Kendall's tau over the last plateau bins (~half the steps); None before
    trend_p_value: float | None
    last_value: float  # raw, may be non-finite


@dataclass(frozen=True)
class RunStatus:
    """An immutable view of one run, as queries and the exporter see it."""

    run_id: str
    labels: Mapping[str, str]
    phase: Phase | None
    since_step: int
    confidence: float
    last_step: int
    ended: bool
    recent_events: tuple[Event, ...] = ()
    updated_at: float = 0.0
    series: tuple[SeriesStatus, ...] = ()  # headline series only: at most 4
    # Scopes of the collapses open now, sorted: "training" and/or "generalization".
    # The phase is COLLAPSE while any is open; this tells the two apart (a training
    # collapse pages, a generalisation one warns). Not stored: () for a status
    # read from the store, which only queries see.
    collapse_scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class IngestResult:
    """What one ``ingest`` did. ``through_step``: every point at or below it has been
    processed by the detector (points held for reordering are above it); -1 if none."""

    accepted: int
    rejected: int
    through_step: int
    events: tuple[Event, ...]
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSnapshot:
    """What the Prometheus collector reads; built without holding run locks."""

    runs: tuple[RunStatus, ...]
    events_by_kind: Mapping[str, int]
    ingested_points: int
    rejected_by_reason: Mapping[str, int]
    detection_seconds: float
    detection_batches: int
    # Calls per DETECTION_BUCKETS bucket (not cumulative), the last one past the
    # greatest bound: the exporter's histogram.
    detection_buckets: tuple[int, ...] = ()


# Upper bounds (seconds) of the detection-time histogram: a batch takes ~0.1-10 ms,
# a ruptures localisation or a checkpoint write tens of ms.
DETECTION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class Checkpoint(NamedTuple):
    """A run's checkpoint as stored: the full ``state``, the step the last write
    covers, and the ``log`` entries appended since ``state`` was written (oldest first)."""

    state: bytes
    through_step: int
    log: tuple[bytes, ...] = ()


class RunClaim(Protocol):
    """A replica's hold on one run, from ``Store.claim_run`` until ``release()``."""

    def release(self) -> bool:
        """Give the hold back; True when this process holds the run no more."""
        ...


class Store(Protocol):
    """Where runs, events, segments and checkpoints survive restarts (SQLite or PostgreSQL).

    ``shared`` is True when other processes may write the same runs (PostgreSQL):
    then claims exclude other replicas and the engine keeps a run in memory only
    while it holds a claim on it. ``local_commits`` is True when a commit is work
    in this process, with no round trip or fsync to wait on (SQLite in WAL mode):
    the engine then commits before it lets another run detect.
    """

    shared: bool
    local_commits: bool

    def upsert_run(self, status: RunStatus) -> None: ...
    def add_events(self, run_id: str, events: Sequence[Event]) -> None: ...
    def replace_segments(self, run_id: str, segments: Sequence[Segment]) -> None: ...
    def get_run(self, run_id: str) -> RunStatus | None: ...
    def list_runs(self) -> list[RunStatus]: ...
    def get_events(self, run_id: str, offset: int = 0, limit: int | None = None) -> list[Event]:
        """A run's events in insertion order, ``limit`` of them from ``offset`` (None: all)."""
        ...
    def get_segments(self, run_id: str) -> list[Segment]: ...
    def save_checkpoint(
        self,
        run_id: str,
        blob: bytes,
        through_step: int,
        *,
        status: RunStatus | None = None,
        events: Sequence[Event] = (),
        segments: Sequence[Segment] | None = None,
        append: bool = False,
    ) -> None:
        """Store a run's checkpoint, and with it (same transaction) its status, new
        events and segments. ``append``: ``blob`` is a log entry added to the run's
        stored checkpoint (which must exist); else it replaces the checkpoint and
        its log. Raises Aborted if another replica took the run over."""
        ...
    def load_checkpoint(self, run_id: str) -> Checkpoint | None:
        """The last checkpoint of a run with its log, or None."""
        ...
    def claim_run(self, run_id: str, owner: str) -> RunClaim:
        """Hold a run for writing; raises Aborted naming the owner if another holds it."""
        ...
    def close(self) -> None: ...
