"""Paged queries (AIP-158): follow ``next_page_token`` to the end."""

from __future__ import annotations

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc


def list_runs_pages(
    stub: pb_grpc.PhaseDetectorStub, request: pb.ListRunsRequest, timeout: float | None
) -> list[pb.RunPhase]:
    """Every run ``request`` selects, following ``next_page_token`` (one call a page)."""
    runs: list[pb.RunPhase] = []
    while True:
        page = stub.ListRuns(request, timeout=timeout)
        runs.extend(page.runs)
        if not page.next_page_token:
            return runs
        request.page_token = page.next_page_token


def timeline_pages(
    stub: pb_grpc.PhaseDetectorStub, run_id: str, timeout: float | None
) -> pb.Timeline:
    """A run's whole timeline, its pages put together (one call a page)."""
    request = pb.GetTimelineRequest(run_id=run_id)
    timeline = stub.GetTimeline(request, timeout=timeout)
    while timeline.next_page_token:
        request.page_token = timeline.next_page_token
        page = stub.GetTimeline(request, timeout=timeout)
        timeline.events.extend(page.events)
        timeline.next_page_token = page.next_page_token
    return timeline
