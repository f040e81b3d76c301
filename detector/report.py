"""Views of timelines, events and runs for people (text) and programs (JSON).

Core objects (from ``analyze``) and protobuf messages (from a detector) are
first turned into the same plain dicts, so every command prints an event the
same way whichever path it came by, and ``--json`` output is those dicts.

>>> from detector.core.types import Event, EventKind, Phase, Segment
>>> event = Event(step=1400, kind=EventKind.GROKKING_ONSET, detected_at=1420,
...               series="test_acc", confidence=0.9, message="validation accuracy rises")
>>> print(format_event(event_view(event)))
   1400  GROKKING_ONSET     test_acc             0.90  validation accuracy rises
>>> print(format_segments([segment_view(Segment(0, 1400, Phase.INSTABILITY, 0.5))]))
  [     0,   1400)  instability    0.50
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector.convert import DETECTED_AT_KEY, kind_from_proto, phase_from_proto
from detector.core.types import Event, EventKind, Phase, Segment

View = dict[str, Any]

# Kinds a person is alerted to; change points and plateaus are the evidence behind them.
ALERT_KINDS = frozenset(
    {
        EventKind.GROKKING_ONSET.value,
        EventKind.GROKKING_COMPLETE.value,
        EventKind.COLLAPSE_ONSET.value,
        EventKind.COLLAPSE_END.value,
        EventKind.LOSS_SPIKE.value,
        EventKind.HIDDEN_PROGRESS.value,
        EventKind.PHASE_CHANGE.value,
    }
)
# Kinds whose evidence carries a ``scope`` (``training`` or ``generalization``).
_SCOPED_KINDS = frozenset({EventKind.COLLAPSE_ONSET.value, EventKind.COLLAPSE_END.value})
_ALL_KINDS = frozenset(kind.value for kind in EventKind)
_KIND_WIDTH = max(len(kind.value) for kind in EventKind)
_PHASE_WIDTH = max(len(phase.value) for phase in Phase)


# --- views -----------------------------------------------------------------


def event_view(event: Event) -> View:
    """A core event as a JSON-ready dict (the keys of ``analyze --json``, plus extras)."""
    return {
        "step": event.step,
        "kind": event.kind.value,
        "series": event.series,
        "confidence": _number(event.confidence),
        "message": event.message,
        "phase": _phase_name(event.phase),
        "detected_at_step": event.detected_at,
        "evidence": dict(event.evidence),
    }


def event_view_from_proto(message: pb.PhaseEvent) -> View:
    """A PhaseEvent as the same dict as :func:`event_view`, plus ``run_id`` and ``time``."""
    evidence = dict(message.evidence)
    detected_at = evidence.get(DETECTED_AT_KEY)
    kind = kind_from_proto(message.kind)
    view = {
        "step": message.step,
        "kind": kind.value if kind is not None else "UNSPECIFIED",
        "series": message.series,
        "confidence": _number(message.confidence),
        "message": message.message,
        "phase": _phase_name(phase_from_proto(message.phase)),
        "detected_at_step": int(detected_at) if detected_at is not None else None,
        "evidence": evidence,
        "run_id": message.run_id,
    }
    if message.HasField("time"):
        stamp = message.time.ToDatetime(tzinfo=timezone.utc)
        view["time"] = stamp.isoformat(timespec="milliseconds")
    return view


def segment_view(segment: Segment) -> View:
    return {
        "start_step": segment.start_step,
        "end_step": segment.end_step,
        "phase": _phase_name(segment.phase),
        "confidence": _number(segment.confidence),
    }


def segment_view_from_proto(message: pb.Segment) -> View:
    return {
        "start_step": message.start_step,
        "end_step": message.end_step,
        "phase": _phase_name(phase_from_proto(message.phase)),
        "confidence": _number(message.confidence),
    }


def run_view_from_proto(message: pb.RunPhase) -> View:
    return {
        "run_id": message.run_id,
        "phase": _phase_name(phase_from_proto(message.phase)),
        "since_step": message.since_step,
        "confidence": _number(message.confidence),
        "last_step": message.last_step,
        "labels": dict(sorted(message.labels.items())),
        "recent_events": [event_view_from_proto(e) for e in message.recent_events],
    }


def change_points(events: Iterable[View], series: Iterable[str] = ()) -> dict[str, list[int]]:
    """Steps of CHANGE_POINT events per series; every name in ``series`` is a key."""
    found: dict[str, set[int]] = {name: set() for name in series}
    for event in events:
        if event["kind"] == EventKind.CHANGE_POINT.value and event["series"]:
            found.setdefault(event["series"], set()).add(event["step"])
    return {name: sorted(steps) for name, steps in found.items()}


def timeline_document(
    segments: Sequence[View], events: Sequence[View], series: Iterable[str]
) -> View:
    """The ``analyze --json`` document: segments, events and change points."""
    return {
        "segments": list(segments),
        "events": list(events),
        "change_points": change_points(events, series),
    }


# --- text ------------------------------------------------------------------


def format_segments(segments: Sequence[View]) -> str:
    if not segments:
        return "  (no phases yet)"
    return "\n".join(
        f"  [{s['start_step']:>6}, {s['end_step']:>6})  "
        f"{s['phase'] or '-':<{_PHASE_WIDTH}}  {_conf(s['confidence'])}"
        for s in segments
    )


def format_event(event: View, *, with_run: bool = False) -> str:
    """One line: step, kind, series, confidence, message (and run and time if asked)."""
    series = event["series"] or "-"
    text = (
        f"{event['step']:>7}  {event['kind']:<{_KIND_WIDTH}}  {series:<20} "
        f"{_conf(event['confidence'])}  {event['message']}"
    ).rstrip()
    if event["kind"] == EventKind.PHASE_CHANGE.value and event.get("phase") and not event["message"]:
        text += f"  -> {event['phase']}"
    scope = (event.get("evidence") or {}).get("scope")
    if event["kind"] in _SCOPED_KINDS and scope:
        text += f"  [{scope}]"  # a training collapse, or a generalisation one
    if with_run:
        stamp = datetime.fromisoformat(event["time"]) if "time" in event else datetime.now()
        when = stamp.astimezone().strftime("%H:%M:%S")
        text = f"{when}  {event.get('run_id', ''):<16} {text.lstrip()}"
    return text


def format_timeline(
    segments: Sequence[View],
    events: Sequence[View],
    series: Iterable[str] = (),
    *,
    kinds: frozenset[str] | None = None,
) -> str:
    """Phases, events in step order, and change points per series.

    Events list only ``kinds`` when given, else every kind but CHANGE_POINT,
    which has its own section by series.
    """
    listed = kinds if kinds is not None else _ALL_KINDS - {EventKind.CHANGE_POINT.value}
    shown = sorted((e for e in events if e["kind"] in listed), key=_by_step)
    not_listed = Counter(e["kind"] for e in events if e["kind"] not in listed)
    title = f"events ({len(shown)}"
    if not_listed:
        title += "; not listed: " + ", ".join(f"{n} {k}" for k, n in sorted(not_listed.items()))
    lines = ["phases", format_segments(segments), "", title + ")"]
    lines += [format_event(e) for e in shown] or ["  (none)"]
    points = change_points(events, series)
    if points:
        width = max(len(name) for name in points)
        lines += ["", "change points"]
        lines += [
            f"  {name:<{width}}  {', '.join(map(str, steps)) or '-'}"
            for name, steps in points.items()
        ]
    return "\n".join(lines)


def _by_step(event: View) -> tuple[int, int]:
    return event["step"], event.get("detected_at_step") or event["step"]


def format_run(run: View) -> str:
    """The ``status`` block of one run."""
    labels = ", ".join(f"{k}={v}" for k, v in run["labels"].items()) or "-"
    phase = run["phase"] or "none yet"
    since = f" since step {run['since_step']}" if run["phase"] else ""
    last = run["last_step"] if run["last_step"] >= 0 else "-"
    lines = [
        f"run        {run['run_id']}",
        f"phase      {phase}{since} (confidence {_conf(run['confidence'])})",
        f"last step  {last}",
        f"labels     {labels}",
        "recent events",
    ]
    lines += [format_event(e) for e in run["recent_events"]] or ["  (none)"]
    return "\n".join(lines)


def format_runs(runs: Sequence[View]) -> str:
    """The ``runs`` table."""
    if not runs:
        return "no runs"
    width = max(6, *(len(r["run_id"]) for r in runs))
    header = f"{'RUN':<{width}}  {'PHASE':<{_PHASE_WIDTH}}  {'SINCE':>7}  {'LAST':>7}  CONF  LABELS"
    rows = [
        f"{r['run_id']:<{width}}  {r['phase'] or '-':<{_PHASE_WIDTH}}  "
        f"{r['since_step'] if r['phase'] else '-':>7}  "
        f"{r['last_step'] if r['last_step'] >= 0 else '-':>7}  {_conf(r['confidence'])}  "
        + (",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-")
        for r in runs
    ]
    return "\n".join([header, *rows])


# --- helpers ---------------------------------------------------------------


def _phase_name(phase: Phase | None) -> str | None:
    return phase.value if phase is not None else None


def _number(value: float) -> float | None:
    # JSON has no NaN; a missing confidence is null rather than invalid JSON.
    return float(value) if math.isfinite(value) else None


def _conf(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "  - "
