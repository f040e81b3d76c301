"""The pure streaming core: no I/O, no threads, no gRPC types.

Per-series detectors take points one at a time (``update``) or in vectorised
blocks (``update_many``) and return the events they caused; the run detector
combines series evidence into phases. Every class keeps bounded state and can
be saved with ``state()`` and restored with ``from_state()``.
"""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from detector.core.run import RunDetector, RunDetectorConfig


def __getattr__(name: str) -> object:
    # The detectors pull in scipy and ruptures (about a second); commands that only
    # query a server should not pay for them.
    if name in ("RunDetector", "RunDetectorConfig"):
        from detector.core import run

        return getattr(run, name)
    raise AttributeError(f"module 'detector.core' has no attribute {name!r}")


__all__ = [
    "Direction",
    "Event",
    "EventKind",
    "Phase",
    "Role",
    "RunDetector",
    "RunDetectorConfig",
    "Segment",
    "SeriesSpec",
    "Split",
    "infer_spec",
]
