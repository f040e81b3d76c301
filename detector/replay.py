"""Stream a run log to a detector over the bidirectional ``Stream`` RPC.

This is the path a training job takes: ``RunStart``, then columnar
``MetricBatch`` messages of about ``batch_size`` points (whole rows, in step
order), then ``RunEnd``. ``phasewatch replay`` and ``phasewatch demo`` both use
:func:`stream_log`; the events and acknowledgements the detector sends back
are handed to callbacks as they arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.logfile import Columns, count_points, iter_batches
from detector.report import View, event_view_from_proto

DEFAULT_BATCH_POINTS = 2048


@dataclass
class ReplayResult:
    """What a replay sent and what the detector said about it."""

    run_id: str
    points_sent: int = 0
    batches: int = 0
    accepted: int = 0
    rejected: int = 0
    through_step: int = -1
    seconds: float = 0.0
    events: list[View] = field(default_factory=list)

    @property
    def points_per_second(self) -> float:
        return self.points_sent / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> View:
        return {
            "run_id": self.run_id,
            "points_sent": self.points_sent,
            "batches": self.batches,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "through_step": self.through_step,
            "seconds": round(self.seconds, 3),
            "points_per_second": round(self.points_per_second, 1),
        }


def columns_to_batch(columns: Columns) -> pb.MetricBatch:
    """A columnar MetricBatch; ``tolist`` hands protobuf plain numbers in one C pass."""
    return pb.MetricBatch(
        series=[
            pb.Series(name=name, steps=steps.tolist(), values=values.tolist())
            for name, (steps, values) in columns.items()
        ]
    )


def stream_log(
    stub: pb_grpc.PhaseDetectorStub,
    run_id: str,
    columns: Columns,
    *,
    batch_size: int = DEFAULT_BATCH_POINTS,
    labels: Mapping[str, str] | None = None,
    points_per_second: float | None = None,
    on_event: Callable[[View], None] | None = None,
    on_ack: Callable[[pb.Ack, ReplayResult], None] | None = None,
) -> ReplayResult:
    """Send ``columns`` as one run on one stream and collect the replies.

    ``points_per_second`` paces the sending (the demo); None sends as fast as
    the detector takes it. Raises ``grpc.RpcError`` when the stream fails.
    """
    result = ReplayResult(run_id=run_id)
    requests = _requests(run_id, columns, batch_size, labels or {}, points_per_second, result)
    started = time.perf_counter()
    responses = stub.Stream(requests, wait_for_ready=False)
    try:
        for response in responses:
            if response.WhichOneof("msg") == "event":
                view = event_view_from_proto(response.event)
                result.events.append(view)
                if on_event is not None:
                    on_event(view)
            else:
                _count_ack(result, response.ack)
                if on_ack is not None:
                    on_ack(response.ack, result)
    except BaseException:
        responses.cancel()  # e.g. Ctrl-C: stop the sending thread too
        raise
    result.seconds = time.perf_counter() - started
    return result


def _requests(
    run_id: str,
    columns: Columns,
    batch_size: int,
    labels: Mapping[str, str],
    points_per_second: float | None,
    result: ReplayResult,
) -> Iterator[pb.StreamRequest]:
    # Runs on a gRPC thread: keep it to building messages and sleeping.
    yield pb.StreamRequest(start=pb.RunStart(run_id=run_id, labels=labels))
    started = time.monotonic()
    for batch in iter_batches(columns, batch_size):
        if points_per_second:
            delay = started + result.points_sent / points_per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        result.points_sent += count_points(batch)
        result.batches += 1
        yield pb.StreamRequest(batch=columns_to_batch(batch))
    yield pb.StreamRequest(end=pb.RunEnd(final_step=final_step(columns)))


def final_step(columns: Columns) -> int:
    """The greatest step in columns, -1 when there are no points."""
    maxima = [int(np.max(steps)) for steps, _ in columns.values() if len(steps)]
    return max(maxima, default=-1)


def _count_ack(result: ReplayResult, ack: pb.Ack) -> None:
    # The server's acks count the points of one batch each (start and end: 0).
    result.accepted += ack.accepted
    result.rejected += ack.rejected
    result.through_step = max(result.through_step, ack.through_step)
