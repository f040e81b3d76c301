"""Conversions between core types and protobuf."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector.convert import (
    batch_to_columns,
    event_to_proto,
    kind_from_proto,
    kind_to_proto,
    phase_from_proto,
    phase_to_proto,
    spec_from_proto,
    status_to_proto,
)
from detector.core.types import Direction, Event, EventKind, Phase, Role, Split
from detector.engine import RunStatus
from detector.errors import InvalidArgument


def test_enums_round_trip_and_unspecified_is_none():
    for phase in Phase:
        assert phase_from_proto(phase_to_proto(phase)) is phase
        assert pb.Phase.Name(phase_to_proto(phase)) == f"PHASE_{phase.name}"
    for kind in EventKind:
        assert kind_from_proto(kind_to_proto(kind)) is kind
    assert phase_to_proto(None) == pb.PHASE_UNSPECIFIED
    assert phase_from_proto(pb.PHASE_UNSPECIFIED) is None
    assert kind_from_proto(pb.EVENT_KIND_UNSPECIFIED) is None
    with pytest.raises(InvalidArgument):
        phase_from_proto(99)


def test_spec_infers_only_what_is_unspecified():
    inferred = spec_from_proto(pb.SeriesSpec(name="val_acc"))
    assert (inferred.role, inferred.split, inferred.direction) == (
        Role.ACCURACY, Split.VAL, Direction.MAXIMIZE
    )
    declared = spec_from_proto(pb.SeriesSpec(name="val_acc", role=pb.ROLE_RANK,
                                             split=pb.SPLIT_TEST))
    assert (declared.role, declared.split, declared.direction) == (
        Role.RANK, Split.TEST, Direction.MAXIMIZE
    )


def test_event_carries_detected_at_and_time():
    event = Event(step=5, kind=EventKind.LOSS_SPIKE, detected_at=9, series="loss",
                  confidence=0.8, message="spike", phase=Phase.COLLAPSE,
                  evidence={"test": "cusum"})
    message = event_to_proto("r", event, at=12.5)
    assert dict(message.evidence) == {"test": "cusum", "detected_at_step": "9"}
    assert (message.run_id, message.step, message.kind, message.phase) == (
        "r", 5, pb.EVENT_KIND_LOSS_SPIKE, pb.PHASE_COLLAPSE
    )
    assert (message.time.seconds, message.time.nanos) == (12, 500_000_000)
    assert not event_to_proto("r", event).HasField("time")
    assert event.evidence == {"test": "cusum"}  # the core event is not touched


def test_collapse_end_round_trips_with_its_scope():
    assert kind_to_proto(EventKind.COLLAPSE_END) == pb.EVENT_KIND_COLLAPSE_END == 10
    assert kind_from_proto(10) is EventKind.COLLAPSE_END
    event = Event(step=900, kind=EventKind.COLLAPSE_END, detected_at=950, series="val_acc",
                  confidence=0.9, message="recovered", phase=Phase.STABILIZATION,
                  evidence={"scope": "generalization"})
    wire = pb.PhaseEvent.FromString(event_to_proto("r", event).SerializeToString())
    assert (wire.kind, wire.series, wire.phase) == (
        pb.EVENT_KIND_COLLAPSE_END, "val_acc", pb.PHASE_STABILIZATION)
    assert pb.EventKind.Name(wire.kind) == "EVENT_KIND_COLLAPSE_END"
    assert dict(wire.evidence) == {"scope": "generalization", "detected_at_step": "950"}
    assert kind_from_proto(wire.kind) is EventKind.COLLAPSE_END


def test_status_to_proto():
    status = RunStatus(run_id="r", labels={"a": "b"}, phase=None, since_step=0,
                       confidence=0.0, last_step=-1, ended=False,
                       recent_events=(Event(step=1, kind=EventKind.CHANGE_POINT,
                                            detected_at=2),))
    message = status_to_proto(status)
    assert (message.phase, message.last_step, dict(message.labels)) == (
        pb.PHASE_UNSPECIFIED, -1, {"a": "b"}
    )
    assert [e.step for e in message.recent_events] == [1]


def test_batch_to_columns_is_columnar_and_merges_repeated_names():
    batch = pb.MetricBatch(series=[
        pb.Series(name="loss", steps=[1, 2], values=[0.5, math.nan]),
        pb.Series(name="acc", steps=[1], values=[math.inf]),
        pb.Series(name="loss", steps=[3], values=[0.25]),
        pb.Series(name="declared"),
    ])
    columns = batch_to_columns(batch)
    steps, values = columns["loss"]
    assert steps.dtype == np.int64 and values.dtype == np.float64
    assert steps.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(values, [0.5, math.nan, 0.25])
    assert columns["acc"][1].tolist() == [math.inf]
    assert columns["declared"][0].size == 0


@pytest.mark.parametrize(
    "series",
    [pb.Series(name="", steps=[1], values=[1.0]),
     pb.Series(name="x", steps=[1, 2], values=[1.0]),
     pb.Series(name="x", steps=[], values=[1.0])],
)
def test_batch_to_columns_rejects_bad_series(series):
    with pytest.raises(InvalidArgument):
        batch_to_columns(pb.MetricBatch(series=[series]))
