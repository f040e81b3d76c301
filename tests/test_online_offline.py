"""Online == offline: a log streamed through a real server, in any batch sizes,
gives exactly the segments and events that ``phasewatch analyze`` gives on the file."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.cli import main
from detector.logfile import read_log
from detector.replay import stream_log
from detector.report import event_view_from_proto, segment_view_from_proto
from tests.helpers import shared_dir

COMPARED = ("step", "kind", "series", "confidence", "message", "phase", "detected_at_step", "evidence")


def _analyze(path: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["analyze", path, "--json"]) == 0
    return json.loads(out.getvalue())


def _comparable(segments: list[dict], events: list[dict]) -> tuple[list, list]:
    return (
        [tuple(s[k] for k in ("start_step", "end_step", "phase", "confidence")) for s in segments],
        [tuple(json.dumps(e[k], sort_keys=True) for k in COMPARED) for e in events],
    )


@pytest.mark.parametrize("name", ["grok_add_0", "collapse_lr_0", "collapse_sgd_0"])
def test_streamed_equals_analyzed_over_random_batch_splits(server, name: str) -> None:
    _, _, channel = server
    stub = pb_grpc.PhaseDetectorStub(channel)
    path = str(shared_dir("runs", f"{name}.jsonl"))
    offline = _analyze(path)
    expected = _comparable(offline["segments"], offline["events"])
    assert expected[0] and expected[1], "the file should produce segments and events"
    columns = read_log(path)
    rng = np.random.default_rng(len(name))
    sizes = [1, 13, 4096, *rng.integers(2, 600, size=3).tolist()]
    for i, size in enumerate(sizes):
        run_id = f"{name}-{i}"
        result = stream_log(stub, run_id, columns, batch_size=int(size))
        assert result.rejected == 0 and result.accepted == result.points_sent
        timeline = stub.GetTimeline(pb.GetTimelineRequest(run_id=run_id))
        online = _comparable(
            [segment_view_from_proto(s) for s in timeline.segments],
            [event_view_from_proto(e) for e in timeline.events],
        )
        assert online == expected, f"batch size {size} changed the result"
        # The events told over the stream are the same events, in the same order.
        streamed = _comparable([], result.events)[1]
        assert streamed == expected[1]
