"""The one place that converts between core types and protobuf messages.

Enums are mapped by tables built from the naming rule of the proto (a core
member ``LOSS`` is the proto value ``ROLE_LOSS``), so a member added on one side
only fails at import time instead of at the first request that uses it.
``*_UNSPECIFIED`` maps to ``None`` on the core side.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar, cast

import numpy as np

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector.core.types import (
    Direction,
    Event,
    EventKind,
    Phase,
    Role,
    Segment,
    SeriesSpec,
    Split,
    infer_spec,
)
from detector.errors import InvalidArgument

if TYPE_CHECKING:  # the engine (scipy, ruptures) is the server's: the CLI's clients stay light
    from detector.ports import RunStatus

E = TypeVar("E", bound=enum.Enum)

Columns = dict[str, tuple[np.ndarray, np.ndarray]]


def _table(core: type[E], proto_enum: object, prefix: str) -> dict[E, int]:
    # proto_enum is a generated EnumTypeWrapper; .Value raises if a name is missing.
    return {member: proto_enum.Value(f"{prefix}_{member.name}") for member in core}  # type: ignore[attr-defined]


_ROLE_TO = _table(Role, pb.Role, "ROLE")
_SPLIT_TO = _table(Split, pb.Split, "SPLIT")
_DIRECTION_TO = _table(Direction, pb.Direction, "DIRECTION")
_PHASE_TO = _table(Phase, pb.Phase, "PHASE")
_KIND_TO = _table(EventKind, pb.EventKind, "EVENT_KIND")

_ROLE_FROM = {v: k for k, v in _ROLE_TO.items()}
_SPLIT_FROM = {v: k for k, v in _SPLIT_TO.items()}
_DIRECTION_FROM = {v: k for k, v in _DIRECTION_TO.items()}
_PHASE_FROM = {v: k for k, v in _PHASE_TO.items()}
_KIND_FROM = {v: k for k, v in _KIND_TO.items()}

DETECTED_AT_KEY = "detected_at_step"


def _from(table: Mapping[int, E], value: int, what: str) -> E | None:
    if value == 0:  # every enum's *_UNSPECIFIED
        return None
    try:
        return table[value]
    except KeyError:
        # proto3 enums are open: a newer client can send a number we do not know.
        raise InvalidArgument(f"unknown {what} value {value}") from None


def phase_to_proto(phase: Phase | None) -> pb.Phase:
    """``None`` (no phase yet) is ``PHASE_UNSPECIFIED``."""
    # protoc's stubs type enum fields as their wrapper class; the values are ints.
    return cast("pb.Phase", 0 if phase is None else _PHASE_TO[phase])


def phase_from_proto(value: int) -> Phase | None:
    """``PHASE_UNSPECIFIED`` is ``None``; an unknown number is InvalidArgument."""
    return _from(_PHASE_FROM, value, "Phase")


def kind_to_proto(kind: EventKind) -> pb.EventKind:
    return cast("pb.EventKind", _KIND_TO[kind])


def kind_from_proto(value: int) -> EventKind | None:
    """``EVENT_KIND_UNSPECIFIED`` is ``None``; an unknown number is InvalidArgument."""
    return _from(_KIND_FROM, value, "EventKind")


def spec_from_proto(spec: pb.SeriesSpec) -> SeriesSpec:
    """A core spec; fields left unspecified are inferred from the name.

    >>> spec_from_proto(pb.SeriesSpec(name="val_acc", direction=pb.DIRECTION_MINIMIZE)).direction
    <Direction.MINIMIZE: 'minimize'>
    """
    return infer_spec(
        spec.name,
        role=_from(_ROLE_FROM, spec.role, "Role"),
        split=_from(_SPLIT_FROM, spec.split, "Split"),
        direction=_from(_DIRECTION_FROM, spec.direction, "Direction"),
    )


def event_to_proto(run_id: str, event: Event, at: float | None = None) -> pb.PhaseEvent:
    """A PhaseEvent; ``evidence`` also carries ``detected_at_step``.

    ``at`` (Unix seconds) stamps ``time``: live paths pass the emission time.
    Events read back from history have no wall-clock time, so ``time`` is left
    unset rather than made up.
    """
    message = pb.PhaseEvent(
        run_id=run_id,
        step=event.step,
        kind=kind_to_proto(event.kind),
        phase=phase_to_proto(event.phase),
        series=event.series,
        confidence=event.confidence,
        message=event.message,
        evidence=event.evidence,
    )
    message.evidence[DETECTED_AT_KEY] = str(event.detected_at)
    if at is not None:
        message.time.FromNanoseconds(int(at * 1e9))
    return message


def segment_to_proto(segment: Segment) -> pb.Segment:
    return pb.Segment(
        start_step=segment.start_step,
        end_step=segment.end_step,
        phase=phase_to_proto(segment.phase),
        confidence=segment.confidence,
    )


def status_to_proto(status: RunStatus) -> pb.RunPhase:
    """A RunPhase, with the run's recent events (history: ``time`` unset)."""
    return pb.RunPhase(
        run_id=status.run_id,
        phase=phase_to_proto(status.phase),
        since_step=status.since_step,
        confidence=status.confidence,
        last_step=status.last_step,
        recent_events=[event_to_proto(status.run_id, e) for e in status.recent_events],
        labels=status.labels,
    )


def batch_to_columns(batch: pb.MetricBatch) -> Columns:
    """Name -> (int64 steps, float64 values), without a Python object per point.

    A name repeated within the batch is concatenated in order. A series with
    no points is kept: it declares the series. O(points), in numpy.

    >>> cols = batch_to_columns(pb.MetricBatch(series=[pb.Series(name="loss", steps=[1, 2],
    ...                                                           values=[0.5, float("nan")])]))
    >>> cols["loss"][0].tolist(), cols["loss"][1].tolist()
    ([1, 2], [0.5, nan])
    """
    columns: Columns = {}
    for series in batch.series:
        name = series.name
        if not name:
            raise InvalidArgument("series name is empty")
        if len(series.steps) != len(series.values):
            raise InvalidArgument(
                f"series {name!r} has {len(series.steps)} steps but {len(series.values)} values"
            )
        # np.asarray on a repeated scalar field copies through the C API: ~50x
        # faster than np.fromiter, which goes through Python ints/floats.
        steps = np.asarray(series.steps, dtype=np.int64)
        values = np.asarray(series.values, dtype=np.float64)
        if name in columns:
            old_steps, old_values = columns[name]
            steps = np.concatenate((old_steps, steps))
            values = np.concatenate((old_values, values))
        columns[name] = (steps, values)
    return columns
