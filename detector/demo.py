"""``phasewatch demo``: a real training run through a real detector, in one process.

Starts the detector (engine, in-memory SQLite store, gRPC server on a free
port), streams the bundled run ``grok_add_0`` (modular addition that groks)
over the ``Stream`` RPC exactly as ``phasewatch replay`` does, prints alerts
as the detector raises them under a progress bar, then prints the final
timeline (read back with ``GetTimeline``) beside the run's ground truth.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import resources
from typing import Any, TextIO

import grpc

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.engine import Engine
from detector.logfile import Columns, count_points, read_log
from detector.replay import ReplayResult, final_step, stream_log
from detector.report import (
    ALERT_KINDS,
    View,
    event_view_from_proto,
    format_event,
    format_timeline,
    segment_view_from_proto,
)
from detector.server import create_server
from detector.store import open_store

RUN_NAME = "grok_add_0"
# At speed 1 the run streams in about this long: slow enough to watch the
# phases arrive, fast enough for CI.
STREAM_SECONDS = 5.0
BATCH_POINTS = 24  # two logged steps of the bundled run per message
PHASE_POLL_SECONDS = 0.25


@contextmanager
def bundled_run_path(name: str = RUN_NAME, suffix: str = ".jsonl") -> Any:
    """A real file path to a file of ``detector/data`` (zip-safe via importlib.resources)."""
    with resources.as_file(resources.files("detector.data") / f"{name}{suffix}") as path:
        yield path


def load_bundled_run(name: str = RUN_NAME) -> tuple[Columns, dict[str, Any]]:
    """The bundled run's columns and its ground-truth labels."""
    with bundled_run_path(name) as path:
        columns = read_log(path)
    with bundled_run_path(name, ".labels.json") as path:
        labels = json.loads(path.read_text(encoding="utf-8"))
    return columns, labels


class ProgressBar:
    """A one-line progress bar on a terminal, or a plain line every 20% elsewhere."""

    def __init__(self, stream: TextIO, *, enabled: bool = True, width: int = 30) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.width = width
        self._shown = False
        self._next_plain = 0.2

    def update(self, fraction: float, note: str) -> None:
        if not self.enabled:
            return
        fraction = min(max(fraction, 0.0), 1.0)
        if self.tty:
            filled = int(round(fraction * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            # Wider than the terminal, the line would wrap and \r could not redraw it.
            columns = shutil.get_terminal_size().columns
            line = f"[{bar}] {fraction:4.0%}  {note}"[: max(columns - 1, 10)]
            self.stream.write(f"\r\033[K{line}")
            self.stream.flush()
            self._shown = True
        elif fraction >= self._next_plain - 1e-9:
            print(f"progress {fraction:4.0%}  {note}", file=self.stream, flush=True)
            while self._next_plain <= fraction + 1e-9:
                self._next_plain += 0.2

    def clear(self) -> None:
        """Erase the bar so that other output can take the line."""
        if self.tty and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class _Watcher:
    """Turns the stream's replies into alert lines and progress."""

    def __init__(
        self, stub: pb_grpc.PhaseDetectorStub, run_id: str, first: int, last: int,
        bar: ProgressBar, out: TextIO,
    ) -> None:
        self.stub = stub
        self.run_id = run_id
        self.first = first
        self.span = max(last - first, 1)
        self.bar = bar
        self.out = out
        self.phase = "-"
        self.alerts = 0
        self.evidence_events = 0
        self._polled = 0.0

    def on_event(self, view: View) -> None:
        if view["kind"] not in ALERT_KINDS:
            self.evidence_events += 1
            return
        self.alerts += 1
        if view["kind"] == "PHASE_CHANGE" and view["phase"]:
            self.phase = view["phase"]
        self.bar.clear()
        late = view["detected_at_step"]
        suffix = f"  [seen at step {late}]" if late is not None and late != view["step"] else ""
        print(format_event(view) + suffix, file=self.out, flush=True)

    def on_ack(self, ack: pb.Ack, result: ReplayResult) -> None:
        if ack.through_step < 0:
            return
        self._poll_phase()
        note = (
            f"step {ack.through_step}  phase {self.phase}  alerts {self.alerts}  "
            f"change points/plateaus {self.evidence_events}"
        )
        self.bar.update((ack.through_step - self.first) / self.span, note)

    def _poll_phase(self) -> None:
        # The current phase as any client would see it: a GetPhase query, throttled.
        now = time.monotonic()
        if now - self._polled < PHASE_POLL_SECONDS:
            return
        self._polled = now
        phase = self.stub.GetPhase(pb.GetPhaseRequest(run_id=self.run_id), timeout=5)
        self.phase = pb.Phase.Name(phase.phase).removeprefix("PHASE_").lower()
        if self.phase == "unspecified":
            self.phase = "-"


def run_demo(
    *, speed: float = 1.0, progress: bool = True, out: TextIO | None = None,
    err: TextIO | None = None,
) -> ReplayResult:
    """Run the demo; ``speed`` scales the replay rate (``inf``: no pacing)."""
    out = out or sys.stdout
    err = err or sys.stderr
    columns, truth = load_bundled_run()
    store = open_store("sqlite://:memory:")
    server, port = create_server(Engine(store=store), "127.0.0.1:0")
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.PhaseDetectorStub(channel)
            result = _stream(stub, columns, truth, target, speed, ProgressBar(err, enabled=progress), out)
            timeline = stub.GetTimeline(pb.GetTimelineRequest(run_id=RUN_NAME), timeout=10)
    finally:
        server.stop(None)
        store.close()
    _print_summary(timeline, result, columns, truth, out)
    return result


def _stream(
    stub: pb_grpc.PhaseDetectorStub, columns: Columns, truth: dict[str, Any], target: str,
    speed: float, bar: ProgressBar, out: TextIO,
) -> ReplayResult:
    points = count_points(columns)
    first = min(int(steps[0]) for steps, _ in columns.values() if len(steps))
    print(
        f"phasewatch demo: a detector is listening on {target}; streaming the real training run "
        f"{RUN_NAME!r} ({_describe(truth)}) to it over gRPC: {points} points of "
        f"{len(columns)} series, steps {first}-{final_step(columns)}.\n"
        "Alerts as the detector raises them:\n",
        file=out,
        flush=True,
    )
    watcher = _Watcher(stub, RUN_NAME, first, final_step(columns), bar, out)
    try:
        return stream_log(
            stub,
            RUN_NAME,
            columns,
            batch_size=BATCH_POINTS,
            labels={"source": "phasewatch-demo", "task": str(truth.get("scenario", ""))},
            points_per_second=points / STREAM_SECONDS * speed,
            on_event=watcher.on_event,
            on_ack=watcher.on_ack,
        )
    finally:
        bar.close()


def _print_summary(
    timeline: pb.Timeline, result: ReplayResult, columns: Columns, truth: dict[str, Any],
    out: TextIO,
) -> None:
    segments = [segment_view_from_proto(s) for s in timeline.segments]
    events = [event_view_from_proto(e) for e in timeline.events]
    print(
        f"\nStreamed {result.points_sent} points in {result.batches} batches in "
        f"{result.seconds:.1f} s ({result.accepted} accepted, {result.rejected} rejected).\n"
        f"\nFinal timeline of {RUN_NAME!r} (GetTimeline):",
        file=out,
    )
    print(format_timeline(segments, events, columns, kinds=ALERT_KINDS), file=out)
    print(f"\nGround truth ({RUN_NAME}.labels.json):\n{_format_truth(truth)}", file=out)
    print(
        "\nNext: `phasewatch serve` runs a detector for real; `phasewatch analyze FILE` "
        "does this offline for your own log.",
        file=out,
        flush=True,
    )


def _describe(truth: dict[str, Any]) -> str:
    config = truth.get("config", {})
    if truth.get("is_grokking"):
        return f"modular arithmetic, p={config.get('p', '?')}, groks"
    return str(truth.get("scenario", "training run"))


def _format_truth(truth: dict[str, Any]) -> str:
    marks = [
        ("memorised (train acc >= 0.99)", truth.get("memorisation_step")),
        ("grokking onset", truth.get("grokking_onset_step")),
        ("grokked (test acc >= 0.95)", truth.get("grokking_step")),
        ("stable", truth.get("stabilization_step")),
        ("collapse", truth.get("collapse_step")),
    ]
    lines = [f"  {name:<30} step {step}" for name, step in marks if step is not None]
    phases = ", ".join(f"[{a}, {b}) {name}" for a, b, name in truth.get("phases", []))
    if phases:
        lines.append(f"  phases: {phases} (memorisation is part of instability)")
    return "\n".join(lines)
