"""What the rules share: plain-data state, the sampling interval, the scopes, the end of a
collapse, a counted quiet stretch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from detector.core.labeller.timeline import Timeline, make_event
from detector.core.types import Event, EventKind

TRAINING, GENERALISATION = "training", "generalization"


class _Plain:
    """State as plain data: ``_FIELDS`` are numbers, strings, None, lists or dicts of
    those; ``_NESTED`` are objects with ``state()`` / ``from_state()``."""

    _FIELDS: tuple[str, ...] = ()
    _NESTED: dict[str, Any] = {}  # name -> a class with from_state()

    def state(self) -> dict:
        out = {name: _copy(getattr(self, name)) for name in self._FIELDS}
        for name in self._NESTED:
            value = getattr(self, name)
            out[name] = None if value is None else value.state()
        return out

    def load(self, state: dict) -> None:
        for name in self._FIELDS:
            setattr(self, name, _copy(state[name]))
        for name, kind in self._NESTED.items():
            value = state[name]
            setattr(self, name, None if value is None else kind.from_state(value))


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class Interval(_Plain):
    """The sampling interval of one series, in steps (its last gap)."""

    _FIELDS = ("last", "gap")

    def __init__(self) -> None:
        self.last: int | None = None
        self.gap = 1

    @classmethod
    def from_state(cls, state: dict) -> Interval:
        interval = cls()
        interval.load(state)
        return interval

    def see(self, step: int) -> None:
        if self.last is not None and step > self.last:
            self.gap = step - self.last
        self.last = step

    def packed(self) -> tuple[bool, int, int]:
        """(seen, last, gap) as a compiled loop takes them (``_kernels._see``)."""
        return self.last is not None, 0 if self.last is None else self.last, self.gap

    def unpack(self, seen: bool, last: int, gap: int) -> None:
        self.last, self.gap = (int(last) if seen else None), int(gap)


class Pending:
    """What a counting ``quiet_run`` (``commit=False``) found, kept so that taking
    exactly that stretch next writes it without running the loop again (the
    labeller counts every rule's stretch, then has each take the shortest)."""

    __slots__ = ("_apply", "_key")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._apply: Callable[[], None] | None = None

    def keep(self, steps: Any, start: int, taken: int, apply: Callable[[], None]) -> None:
        self._key, self._apply = (steps, start, taken), apply

    def settle(self, commit: bool, steps: Any, start: int, taken: int, apply: Callable[[], None]) -> int:
        """The end of every ``quiet_run``: write the state (``apply``) of the ``taken``
        lines, or only keep it when counting (``commit`` False); returns ``taken``."""
        if not commit:
            self.keep(steps, start, taken, apply)
        elif taken:
            apply()
        return taken

    def take(self, steps: Any, start: int, stop: int) -> bool:
        """Write the kept state if it is that of lines ``start:stop`` of ``steps``; forget it either way."""
        key, apply = self._key, self._apply
        self._key = self._apply = None
        if key is None or apply is None or key[0] is not steps or key[1] != start or key[2] != stop - start:
            return False
        apply()
        return True


def collapse_end(timeline: Timeline, scope: str, began: int, located: int, step: int, series: str,
                 message: str, value: float, level: float) -> list[Event]:
    """``COLLAPSE_END`` of the ``scope`` collapse that began at ``began``, and the
    phase change back to what the run was before (if no other collapse is open)."""
    event = make_event(
        located, step, EventKind.COLLAPSE_END, series, 0.8, message,
        {"test": "recovered", "scope": scope, "collapse_step": str(began),
         "value": f"{value:.4g}", "level": f"{level:.4g}"},
    )
    return [event, *timeline.close_collapse(scope, located, step, series)]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
