"""What the SDK sends and receives besides points: :class:`Event`, series specs, name rules."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector.client._settings import MAX_NAME_LENGTH, ClientConfigError


@dataclass(frozen=True)
class Event:
    """A phase event from the detector, in the spelling of the CLI's JSON.

    ``kind`` is upper case without prefix (``"COLLAPSE_ONSET"``,
    ``"GROKKING_ONSET"``, …), ``phase`` lower case (``"collapse"``) or None,
    ``time`` seconds since the epoch or None.
    """

    run_id: str
    step: int
    kind: str
    phase: str | None = None
    series: str = ""
    confidence: float = 0.0
    message: str = ""
    evidence: Mapping[str, str] = field(default_factory=dict)
    time: float | None = None

    @classmethod
    def from_proto(cls, message: pb.PhaseEvent) -> Event:
        """Convert a ``PhaseEvent``; unknown enum numbers are kept as digits."""
        return cls(
            run_id=message.run_id,
            step=message.step,
            kind=_enum_name(pb.EventKind, message.kind, "EVENT_KIND_") or "UNSPECIFIED",
            phase=(_enum_name(pb.Phase, message.phase, "PHASE_") or "").lower() or None,
            series=message.series,
            confidence=message.confidence,
            message=message.message,
            evidence=dict(message.evidence),
            time=message.time.ToNanoseconds() / 1e9 if message.HasField("time") else None,
        )


def _enum_name(enum: Any, number: int, prefix: str) -> str | None:
    if number == 0:
        return None
    try:
        return str(enum.Name(number)).removeprefix(prefix)
    except ValueError:
        return str(number)


SeriesSpecLike = str | Mapping[str, Any] | pb.SeriesSpec
"""A series declaration: a name (everything inferred), a mapping such as
``{"name": "val_acc", "role": "accuracy", "split": "val", "direction":
"maximize"}``, or a ``SeriesSpec`` message."""


def _series_spec(spec: SeriesSpecLike) -> pb.SeriesSpec:
    if isinstance(spec, pb.SeriesSpec):
        message = pb.SeriesSpec()
        message.CopyFrom(spec)
    elif isinstance(spec, str):
        message = pb.SeriesSpec(name=spec)
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "role", "split", "direction"}
        if unknown:
            raise ClientConfigError(f"series spec {spec!r} has unknown keys {sorted(unknown)}")
        message = pb.SeriesSpec(name=spec.get("name", ""))
        for key, enum, prefix in (
            ("role", pb.Role, "ROLE_"),
            ("split", pb.Split, "SPLIT_"),
            ("direction", pb.Direction, "DIRECTION_"),
        ):
            value = spec.get(key)
            if value is None:
                continue
            if isinstance(value, int):
                number = value
            else:
                try:
                    number = enum.Value(prefix + str(value).upper().removeprefix(prefix))
                except ValueError:
                    raise ClientConfigError(
                        f"series {message.name!r}: unknown {key} {value!r}"
                    ) from None
            setattr(message, key, number)
    else:
        raise ClientConfigError(f"a series spec must be a name, a mapping or a SeriesSpec: {spec!r}")
    problem = _name_problem("series name", message.name)
    if problem is not None:
        raise ClientConfigError(problem)
    return message


def _name_problem(kind: str, name: object) -> str | None:
    """Why ``name`` is not a valid run id or series name: the rules of
    ``detector.core.types.check_name``, repeated so that the SDK imports neither
    the core nor numpy into a training job (tests/test_client.py checks both)."""
    if not isinstance(name, str):
        return f"{kind} {name!r} is not a string"
    if not name:
        return f"{kind} is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"{kind} is longer than {MAX_NAME_LENGTH} characters"
    if not name.isprintable() or any(c.isspace() for c in name):
        return f"{kind} {name!r} has whitespace or non-printable characters"
    return None
