"""One run's state in the engine: the reorder buffer in front of its
:class:`~detector.core.RunDetector`, and the checkpoint format.

A checkpoint is a pickled dict with a ``version`` (:data:`CHECKPOINT_VERSION`):
either the whole state, or (``"replay"``) a log entry to replay from an empty run
(a run first checkpointed before its log filled: the state of a fresh run is
implied, so nothing of its detector is written). Version 2 (the same whole state)
is read as is, version 1 (the per-step dict reorder buffer) is converted by
:func:`_checkpoint_v1_to_v2`, any other version is refused with FailedPrecondition
naming it.

A log entry (:func:`encode_log_entry`) is the list of what changed a run since its
last write, in order: batches (each as two flat buffers, steps and values, and the
series' names and lengths, not as pickled arrays, which cost ~8 us each), starts
(labels and declared series), flushes and ends. Replaying them on the restored
state (:meth:`_Run.replay`) redoes them exactly: detection is deterministic. The
engine (:mod:`detector.engine`) owns the locks, the store and the durability rules
around these objects.

Over 400 lines: the reorder buffer's ingest (numpy, per series) and its
checkpoint are the fields of one object and change together.
"""

from __future__ import annotations

import itertools
import math
import pickle
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from detector.core import Event, RunDetector, SeriesSpec
from detector.core.run import distinct_steps
from detector.core.trend import mann_kendall
from detector.core.types import Role, Split, infer_spec
from detector.errors import FailedPrecondition, ResourceExhausted
from detector.ports import RunStatus, SeriesStatus

if TYPE_CHECKING:
    from detector.engine import EngineConfig

_RELEASED_MEMORY = 4096

# Bump when the checkpoint's layout changes; older checkpoints are then refused
# with a clear error instead of being misread (version 1, the per-step dict
# reorder buffer, and version 2, without the replay form, are still read: see
# _Run.restore).
CHECKPOINT_VERSION = 3
_READABLE_VERSIONS = (2, 3)

# What changed a run, as its checkpoint log records it: ("batch", columns),
# ("start", labels, specs), ("flush",) or ("end",).
Op = tuple
_LOG_TAG = "phasewatch-log-1"


Columns = Mapping[str, tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray]]


class _Run:
    """Per-run state: the reorder buffer and the run detector.

    The reorder buffer is columnar: per series, the held points as sorted,
    distinct (steps, values) arrays, and the sorted distinct steps held by any
    series (``pending_steps``; their count is what ``reorder_window`` bounds).
    Each ingest sorts, deduplicates and merges a batch in numpy, then releases
    the oldest held steps as one block to ``RunDetector.update_many``. Cost per
    batch: O(points log points) in numpy plus O(series) Python calls, no Python
    object per point; per released line, the labeller's O(1) state machine.
    The released-steps memory (the last 4096 released steps, sorted since steps
    are released in order) tells a resent point from a new one that came too late.
    """

    def __init__(self, run_id: str, labels: Mapping[str, str], config: EngineConfig,
                 *, timeline: bool = True) -> None:
        self.run_id = run_id
        self.labels = dict(labels)
        self.config = config
        self.detector = RunDetector(config=config.detector, keep_events=0)  # see self.events
        self.lock = threading.Lock()
        # Held points per series: sorted distinct steps and their first values.
        self.pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.pending_steps = _EMPTY_STEPS  # sorted distinct steps held by any series
        self.released_through: int | None = None  # every step <= this went to the detector
        self.last_seen: dict[str, int] = {}  # per series, the greatest step accepted
        # Recently released steps (sorted) tell a resent point (idempotent) from a new
        # one that came too late; older than this bounded memory, a point at or below
        # the series' last step is taken as resent.
        self.released_recent = _EMPTY_STEPS
        self.released_floor = -1
        self.max_step = -1
        self.ended = False
        self.recent: deque[Event] = deque(maxlen=config.recent_events)
        # The run's newest events, for its timeline (bounded: memory per run must not
        # grow with its length); none without ``timeline``, when a store keeps them.
        self.events: deque[Event] = deque(maxlen=config.max_timeline_events if timeline else 0)
        self.changes = 0  # bumped by every new point: a checkpoint is due when it moved
        self.saved_changes = 0
        # What changed the run since the last commit (Op), for the checkpoint log;
        # None when something the log cannot replay did (a full checkpoint is then due).
        self.unlogged: list[Op] | None = []
        # True while ``unlogged`` holds everything done to the run since it was made
        # empty and nothing of it is stored: its first checkpoint can be the replay form.
        self.from_empty = True
        self.logged_points = 0  # points a restore replays (the log, or a replay form)
        self.defunct = False  # dropped after a failed store write: callers must re-fetch
        self.status = self._make_status()

    @property
    def through_step(self) -> int:
        return -1 if self.released_through is None else self.released_through

    def checkpoint(self) -> bytes:
        """Everything needed to go on detecting this run elsewhere (pickled).

        Not in it: the timeline's event list, which the store keeps in step with
        the checkpoint, and the engine settings, which are the restoring engine's.
        """
        state = {
            "version": CHECKPOINT_VERSION,
            "run_id": self.run_id,
            "labels": self.labels,
            "detector": self.detector.state(),
            "pending": self.pending,
            "pending_steps": self.pending_steps,
            "released_through": self.released_through,
            "last_seen": self.last_seen,
            "released_recent": self.released_recent,
            "released_floor": self.released_floor,
            "max_step": self.max_step,
            "ended": self.ended,
            "recent": list(self.recent),
            "changes": self.changes,
        }
        # Not compressed: zlib took 1.8 ms for 300 kB (8 series), 15x the pickling,
        # and the checkpoint log makes full writes rare.
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    def replay_checkpoint(self, ops: Sequence[Op]) -> bytes:
        """The checkpoint of a run made empty that then went through ``ops`` (which
        must be everything done to it: ``from_empty``). O(points in ops), against
        O(series x window) for :meth:`checkpoint`: a short run, or any run's first
        write, stores its batches instead of its detector."""
        return pickle.dumps(
            {"version": CHECKPOINT_VERSION, "run_id": self.run_id,
             "replay": encode_log_entry(ops)},
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    @classmethod
    def restore(cls, blob: bytes, config: EngineConfig) -> _Run:
        """The run a :meth:`checkpoint` was taken of. Its timeline is the store's, so
        it keeps none in memory.

        The blob comes from the store, which is trusted like the detector's own
        memory: unpickling runs code, so only phasewatch may write the store.
        """
        try:
            if blob[:1] != _PICKLE_START:  # zlib-compressed, as written before 0.x
                blob = zlib.decompress(blob)
            state = pickle.loads(blob)
        except (zlib.error, pickle.UnpicklingError, EOFError) as error:
            raise FailedPrecondition(f"unreadable checkpoint: {error}") from None
        version = state.get("version") if isinstance(state, dict) else None
        if version == 1:
            state = _checkpoint_v1_to_v2(state)
        elif version not in _READABLE_VERSIONS:
            raise FailedPrecondition(
                f"checkpoint version {version!r}, this phasewatch reads {CHECKPOINT_VERSION}"
            )
        if "replay" in state:
            run = cls(state["run_id"], {}, config, timeline=False)
            run.from_empty = False
            run.replay([state["replay"]])
            return run
        run = cls(state["run_id"], state["labels"], config, timeline=False)
        run.detector = RunDetector.from_state(state["detector"], config.detector, keep_events=0)
        run.pending = state["pending"]
        run.pending_steps = state["pending_steps"]
        run.released_through = state["released_through"]
        run.last_seen = state["last_seen"]
        run.released_recent = state["released_recent"]
        run.released_floor = state["released_floor"]
        run.max_step = state["max_step"]
        run.ended = state["ended"]
        run.recent.extend(state["recent"])
        run.changes = run.saved_changes = state["changes"]
        run.unlogged = []  # the stored checkpoint is this state
        run.from_empty = False
        run.status = run._make_status()
        return run

    def replay(self, log: Sequence[bytes]) -> None:
        """Redo what a checkpoint's log entries record, as it was first done.

        Detection is deterministic, so this rebuilds the state the log's last write
        covered; the events it finds again are already in the stored timeline (a
        restored run keeps none in memory). O(points in the log), which
        ``checkpoint_log_points`` bounds.
        """
        self.unlogged = None
        points = 0
        for entry in log:
            for op in decode_log_entry(entry):
                kind = op[0]
                if kind == "batch":
                    self.ingest(op[1])
                elif kind == "start":
                    self.start(op[1], op[2])
                elif kind == "flush":
                    self.flush()
                else:
                    self.end()
                points += op_points(op)
        self.unlogged = []
        self.logged_points += points
        self.saved_changes = self.changes
        self.status = self._make_status()

    def start(self, labels: Mapping[str, str], specs: Sequence[SeriesSpec]) -> None:
        """Add labels, declare series and (re)open the run (``Engine.start_run``)."""
        unlogged, self.unlogged = self.unlogged, None  # if this raises half-way: a full one
        self.labels.update(labels)
        for spec in specs:
            self.declare(spec)
        self.ended = False
        self.changes += 1  # labels, series, ended: the next commit checkpoints them
        if unlogged is not None:
            unlogged.append(("start", dict(labels), tuple(specs)))
            self.unlogged = unlogged
        self.status = self._make_status()

    def end(self) -> list[Event]:
        """Release every held point, localise what the run left open (once) and mark
        it ended (``Engine.end_run``); returns the events of both."""
        unlogged, self.unlogged = self.unlogged, None
        events = self._release(len(self.pending_steps))
        # A second end must not localise again.
        finished = [] if self.ended else self.detector.finish()
        self.recent.extend(finished)
        self.events.extend(finished)
        self.ended = True
        self.changes += 1
        if unlogged is not None:
            unlogged.append(("end",))
            self.unlogged = unlogged
        self.status = self._make_status()
        return events + finished

    def declare_many(self, specs: Iterable[SeriesSpec]) -> None:
        """``declare`` each, in order, the labeller's roles resolved once at the end
        (the same roles: they are a function of the specs). The caller checks
        ``max_series_per_run``. O(series)."""
        self.detector.add_series_many(s for s in specs if s.name not in self.detector.specs)

    def declare(self, spec: SeriesSpec) -> None:
        if spec.name not in self.detector.specs:
            if len(self.detector.specs) >= self.config.max_series_per_run:
                raise ResourceExhausted(
                    f"run {self.run_id!r} already has {self.config.max_series_per_run} series"
                )
            self.detector.add_series(spec)

    def ingest(self, columns: Columns) -> tuple[int, dict[str, int], list[Event]]:
        """Hold a batch's points, then release all but ``reorder_window`` held steps.

        Per series, in numpy: negative steps are rejected; a point at or below
        ``through_step`` is a resent one (accepted, ignored) when the series had
        already been sent that step or later and the step was released (or is
        older than the released-steps memory), else rejected as out of order; the
        rest are held, a step already held for the series keeping its first
        value. O(points log points) per batch, plus the release.
        """
        batch = as_arrays(columns)
        unlogged, self.unlogged = self.unlogged, None  # if this raises half-way: a full one
        result = self._ingest(batch)
        if unlogged is not None:
            unlogged.append(("batch", batch))
            self.unlogged = unlogged
        return result

    def _ingest(
        self, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ) -> tuple[int, dict[str, int], list[Event]]:
        events = self._hold_in_order(columns)
        if events is not None:
            return sum(len(steps) for steps, _ in columns.values()), {}, events
        accepted = 0
        rejected: dict[str, int] = {}
        through = self.released_through
        held: list[np.ndarray] = []
        for name, (steps, values) in columns.items():
            if name not in self.detector.specs:
                self.declare(infer_spec(name))
            last = self.last_seen.get(name, -1)
            if len(steps) == 0:
                self.last_seen[name] = last
                continue
            negative = int(np.count_nonzero(steps < 0))
            if negative:
                rejected["negative_step"] = rejected.get("negative_step", 0) + negative
            hold = steps >= 0 if through is None else steps > through
            if through is not None:
                late = (steps >= 0) & ~hold
                if late.any():
                    # "step <= last" with last as it stood at that point of the batch:
                    # the series' last step, raised by the held points before it.
                    running = np.maximum.accumulate(np.where(hold, steps, -1))
                    last_before = np.maximum(last, np.r_[-1, running[:-1]])
                    late_steps = steps[late]
                    known = late_steps < self.released_floor
                    if len(self.released_recent):
                        at = np.searchsorted(self.released_recent, late_steps)
                        at = np.minimum(at, len(self.released_recent) - 1)
                        known |= self.released_recent[at] == late_steps
                    resent = int(np.count_nonzero(known & (late_steps <= last_before[late])))
                    accepted += resent
                    if len(late_steps) > resent:
                        rejected["out_of_order"] = (
                            rejected.get("out_of_order", 0) + len(late_steps) - resent
                        )
            if not hold.all():
                steps, values = steps[hold], values[hold]
            if len(steps) == 0:
                self.last_seen[name] = last
                continue
            accepted += len(steps)
            top = int(steps.max())
            self.last_seen[name] = max(last, top)
            self.max_step = max(self.max_step, top)
            # Distinct steps, first value of each (np.unique's index is the first occurrence).
            if len(steps) > 1 and not (steps[1:] > steps[:-1]).all():
                steps, first = np.unique(steps, return_index=True)
                values = values[first]
            old = self.pending.get(name)
            if old is not None:
                new = ~_isin_sorted(steps, old[0])
                if not new.all():
                    steps, values = steps[new], values[new]
                if len(steps):
                    merged = np.concatenate((old[0], steps))
                    order = np.argsort(merged, kind="stable")
                    steps, values = merged[order], np.concatenate((old[1], values))[order]
                else:
                    steps, values = old
            if len(steps) != (0 if old is None else len(old[0])):
                self.changes += len(steps) - (0 if old is None else len(old[0]))
                self.pending[name] = (steps, values)
                held.append(steps)
        if held:
            self.pending_steps = distinct_steps(np.concatenate([self.pending_steps, *held]))
        events = self._release(len(self.pending_steps) - self.config.reorder_window)
        return accepted, rejected, events

    def _hold_in_order(
        self, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]
    ) -> list[Event] | None:
        """Hold a batch that is in order and release all but ``reorder_window`` held
        steps, as ``_ingest`` would, in a few numpy calls for the whole batch and a
        few per series; None (nothing done) when it is not in order.

        In order: every series not empty, its steps strictly increasing and above
        both ``through_step`` and its last step so far. Then nothing is rejected,
        resent or repeated, and each series' points go after its held ones:
        ``_ingest``'s per-series checks and merge (a dozen numpy calls a series)
        reduce to a concatenation. Series not seen
        before are declared first, together (the labeller's roles resolved once).
        What a training job sends is nearly always so. O(points) plus O(series)
        Python steps.
        """
        if not columns:
            return None
        specs, last_seen = self.detector.specs, self.last_seen
        floor = -1 if self.released_through is None else self.released_through
        arrays = []
        lows = []
        new = []
        for name, (steps, _) in columns.items():
            if not len(steps):
                return None
            if name not in specs:
                new.append(name)
            arrays.append(steps)
            lows.append(max(floor, last_seen.get(name, -1)))
        if new and len(specs) + len(new) > self.config.max_series_per_run:
            return None  # _ingest declares what fits, then refuses
        steps = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        ends = list(itertools.accumulate(len(a) for a in arrays))
        starts = [0, *ends[:-1]]
        firsts = steps[starts].tolist()
        if not all(first > low for first, low in zip(firsts, lows, strict=True)):
            return None
        if len(steps) > 1:
            rising = steps[1:] > steps[:-1]
            if len(ends) > 1:
                rising[np.array(ends[:-1]) - 1] = True  # across two series: no order needed
            if not rising.all():
                return None
        if new:
            self.declare_many(infer_spec(name) for name in new)
        tops = steps[np.array(ends) - 1].tolist()
        self.max_step = max(self.max_step, max(tops))
        self.changes += len(steps)
        pending = self.pending
        for (name, (new_steps, new_values)), top in zip(columns.items(), tops, strict=True):
            last_seen[name] = top
            old = pending.get(name)
            pending[name] = ((new_steps, new_values) if old is None else
                             (np.concatenate((old[0], new_steps)), np.concatenate((old[1], new_values))))
        self.pending_steps = distinct_steps(np.concatenate((self.pending_steps, steps)))
        return self._release(len(self.pending_steps) - self.config.reorder_window)

    def flush(self) -> list[Event]:
        """Release every held point without ending the run."""
        if not len(self.pending_steps):
            return []
        unlogged, self.unlogged = self.unlogged, None
        events = self._release(len(self.pending_steps))
        if unlogged is not None:
            unlogged.append(("flush",))
            self.unlogged = unlogged
        return events

    def _release(self, count: int) -> list[Event]:
        """Give the ``count`` oldest held steps to the detector, as one block."""
        if count <= 0:
            return []
        lines = self.pending_steps[:count]
        self.pending_steps = self.pending_steps[count:]
        cut = int(lines[-1])
        block: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (steps, values) in list(self.pending.items()):
            k = int(steps.searchsorted(cut, "right"))
            if k == 0:
                continue
            block[name] = (steps[:k], values[:k])
            if k == len(steps):
                del self.pending[name]
            else:
                self.pending[name] = (steps[k:], values[k:])
        events = self.detector.update_many(block, lines)
        memory = np.concatenate((self.released_recent, lines))
        if len(memory) > _RELEASED_MEMORY:
            self.released_floor = int(memory[len(memory) - _RELEASED_MEMORY - 1]) + 1
            memory = memory[len(memory) - _RELEASED_MEMORY :].copy()
        self.released_recent = memory
        self.released_through = cut
        self.changes += 1
        self.recent.extend(events)
        self.events.extend(events)
        self.status = self._make_status()
        return events

    def _make_status(self) -> RunStatus:
        phase, since, confidence = self.detector.current_phase()
        return RunStatus(
            run_id=self.run_id,
            labels=dict(self.labels),
            phase=phase,
            since_step=since,
            confidence=confidence,
            last_step=self.max_step,
            ended=self.ended,
            recent_events=tuple(self.recent),
            updated_at=time.time(),
            series=_headline_series(self.detector),
            collapse_scopes=self.detector.collapse_scopes(),
        )


_EMPTY_STEPS = np.zeros(0, dtype=np.int64)
_INT64 = np.dtype(np.int64)
_FLOAT64 = np.dtype(np.float64)


def as_arrays(columns: Columns) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``columns`` as flat int64 steps and float64 values (numpy arrays). Arrays
    already so (what the server's conversion and :func:`_blocks` give) are taken
    as they are: a batch goes through this twice, and a conversion is ~1 us a
    series. O(series), plus O(points) for what needs converting."""
    out = {}
    for name, (steps, values) in columns.items():
        if not (type(steps) is np.ndarray and steps.dtype == _INT64 and steps.ndim == 1):
            steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        if not (type(values) is np.ndarray and values.dtype == _FLOAT64 and values.ndim == 1):
            values = np.asarray(values, dtype=np.float64).reshape(-1)
        out[name] = (steps, values)
    return out
_PICKLE_START = b"\x80"  # the PROTO opcode every pickle of protocol >= 2 starts with


def op_points(op: Op) -> int:
    """Points an op carries (what replaying it costs, ~5 us each)."""
    return sum(len(steps) for steps, _ in op[1].values()) if op[0] == "batch" else 0


def encode_log_entry(ops: Sequence[Op]) -> bytes:
    """``ops`` as one checkpoint log entry. A batch is stored as its series' names
    and lengths and two flat buffers (int64 steps, float64 values): O(points),
    one concatenation per batch instead of pickling two arrays per series."""
    encoded: list[tuple] = []
    for op in ops:
        if op[0] != "batch":
            encoded.append(op)
            continue
        columns = op[1]
        names = tuple(columns)
        lengths = tuple(len(steps) for steps, _ in columns.values())
        if columns:
            steps = np.concatenate([s for s, _ in columns.values()]).astype(np.int64, copy=False)
            values = np.concatenate([v for _, v in columns.values()]).astype(
                np.float64, copy=False)
        else:
            steps, values = _EMPTY_STEPS, np.zeros(0)
        encoded.append(("batch", names, lengths, steps.tobytes(), values.tobytes()))
    return pickle.dumps((_LOG_TAG, encoded), protocol=pickle.HIGHEST_PROTOCOL)


def decode_log_entry(entry: bytes) -> list[Op]:
    """The ops of a log entry (:func:`encode_log_entry`), or of one written before
    it (a pickled list of batches); FailedPrecondition when it is neither."""
    try:
        decoded = pickle.loads(entry)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise FailedPrecondition(f"unreadable checkpoint log entry: {error}") from None
    if isinstance(decoded, list):  # before the op log: batches only
        return [("batch", columns) for columns in decoded]
    if not (isinstance(decoded, tuple) and len(decoded) == 2 and decoded[0] == _LOG_TAG):
        raise FailedPrecondition("unreadable checkpoint log entry: not a phasewatch log entry")
    ops: list[Op] = []
    for op in decoded[1]:
        if op[0] != "batch":
            ops.append(op)
            continue
        _, names, lengths, steps_bytes, values_bytes = op
        # Copies: frombuffer's arrays are read-only views of the entry.
        steps = np.frombuffer(steps_bytes, dtype=np.int64).copy()
        values = np.frombuffer(values_bytes, dtype=np.float64).copy()
        bounds = np.cumsum((0, *lengths))
        ops.append(("batch", {
            name: (steps[bounds[i]:bounds[i + 1]], values[bounds[i]:bounds[i + 1]])
            for i, name in enumerate(names)
        }))
    return ops


def _isin_sorted(needles: np.ndarray, haystack: np.ndarray) -> np.ndarray:
    """``np.isin`` for a sorted ``haystack``: O(n log m) by binary search."""
    if len(haystack) == 0:
        return np.zeros(len(needles), dtype=bool)
    at = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return haystack[at] == needles


def _checkpoint_v1_to_v2(state: dict) -> dict:
    """A version-1 checkpoint (reorder buffer as {step: {series: value}}) as version 2."""
    per_series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(state["pending"]):
        for name, value in state["pending"][step].items():
            steps, values = per_series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    pending = {
        name: (np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))
        for name, (steps, values) in per_series.items()
    }
    return {
        **state,
        "version": 2,
        "pending": pending,
        "pending_steps": np.asarray(sorted(state["pending"]), dtype=np.int64),
        "released_recent": np.asarray(state["released_recent"], dtype=np.int64),
    }


def _headline_series(detector: RunDetector) -> tuple[SeriesStatus, ...]:
    """The labeller's headline series: what per-series gauges are kept for (bounded).

    Their trends are computed when read (:class:`_HeadlineSeries`), not here: a
    status is made at every release, and Mann–Kendall on the four headline series
    was ~0.2 ms a batch while only a /metrics scrape reads it. O(headline series
    × trend window) here (a copy of each trend window)."""
    roles = detector.labeller.roles
    names = dict.fromkeys(n for n in (roles.train_loss, roles.val_loss, roles.train_acc, roles.val_acc) if n)
    out = []
    for name in names:
        series = detector.detectors.get(name)
        if series is None:
            continue
        out.append(_HeadlineSeries(
            name, series.spec.role, series.spec.split, series.in_plateau,
            last_value=series.last_value, trend_window=series.trend_window(),
        ))
    return tuple(out)


class _HeadlineSeries(SeriesStatus):
    """A :class:`SeriesStatus` whose trend (``trend_tau``, ``trend_p_value``) is
    Mann–Kendall on a held copy of its window, computed on first read and kept.

    Immutable like its base: the window is copied when the status is made, so a
    read later (the exporter's thread, after more points) sees the trend as of the
    status. Compares, hashes and prints as the plain :class:`SeriesStatus` of its
    values; ``replace``, ``asdict`` and pickling read the resolved values.
    """

    _window: np.ndarray | None
    _trend: tuple[float | None, float | None] | None

    def __init__(self, name: str, role: Role, split: Split, in_plateau: bool,
                 trend_tau: float | None = None, trend_p_value: float | None = None,
                 last_value: float = math.nan, *, trend_window: np.ndarray | None = None) -> None:
        set_ = object.__setattr__  # frozen: fields are set once, here
        set_(self, "name", name)
        set_(self, "role", role)
        set_(self, "split", split)
        set_(self, "in_plateau", in_plateau)
        set_(self, "last_value", last_value)
        set_(self, "_window", trend_window)
        set_(self, "_trend", (trend_tau, trend_p_value) if trend_window is None else None)

    def _resolved(self) -> tuple[float | None, float | None]:
        # The window before the trend: a thread that resolves it sets the trend, then
        # drops the window, so a None window here means the trend is already set.
        # Two threads may both compute it: the same value.
        window, trend = self._window, self._trend
        if trend is None:
            assert window is not None
            result = mann_kendall(window)
            trend = (result.statistic, result.p_value)
            object.__setattr__(self, "_trend", trend)
            object.__setattr__(self, "_window", None)
        return trend

    @property  # type: ignore[override]
    def trend_tau(self) -> float | None:
        return self._resolved()[0]

    @property  # type: ignore[override]
    def trend_p_value(self) -> float | None:
        return self._resolved()[1]

    def _values(self) -> tuple:
        return (self.name, self.role, self.split, self.in_plateau, *self._resolved(),
                self.last_value)

    # As a plain SeriesStatus of the same values: equal to one, hashed and shown alike.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, _HeadlineSeries):
            return self._values() == other._values()
        if type(other) is SeriesStatus:
            return self._values() == (other.name, other.role, other.split, other.in_plateau,
                                      other.trend_tau, other.trend_p_value, other.last_value)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return repr(SeriesStatus(*self._values()))
