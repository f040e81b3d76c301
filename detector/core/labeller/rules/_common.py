"""What the rules share: plain-data state, the sampling interval, the scopes, the end of a
collapse, the state of a compiled quiet loop (:class:`Quiet`)."""

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
    _quiet: Quiet | None = None  # the compiled quiet loop's state, while it has one (see Quiet)

    def release(self) -> None:
        """The fields are about to be read or written outside a quiet stretch: bring
        them up to date and drop the compiled loop's copy (made again at the next
        quiet stretch). O(state) when a stretch was taken since, else O(1)."""
        quiet = self._quiet
        if quiet is not None:
            quiet.sync()
            self._quiet = None

    def state(self) -> dict:
        if self._quiet is not None:
            self._quiet.sync()
        out = {name: _copy(getattr(self, name)) for name in self._FIELDS}
        for name in self._NESTED:
            value = getattr(self, name)
            out[name] = None if value is None else value.state()
        return out

    def load(self, state: dict) -> None:
        self._quiet = None
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


class Quiet:
    """A rule's state as its compiled quiet loop takes it, kept from one quiet stretch
    to the next (within a block and across blocks), so that a run of quiet blocks
    neither packs the rule's fields into arrays nor writes them back on every call.

    ``kernel(*block, start, stop, *arrays, *state, *consts)`` returns ``(taken,
    *state)`` and writes only into ``arrays`` (it is given copies); ``consts`` are
    what no quiet line changes. While ``stale`` the rule's own fields are behind:
    ``sync`` writes the state into them (``unpack(arrays, state)``); the rule
    calls it before it reads or writes them itself (``_Plain.release``), and
    drops its ``Quiet`` before any per-line update, so the fields stay the one
    truth between quiet stretches. A counting run (``commit=False``) keeps what
    it found, so that taking exactly that stretch next writes it without running
    the loop again (the labeller counts every rule's stretch, then has each take
    the shortest). O(arrays) a run besides the loop.
    """

    __slots__ = ("_pending", "arrays", "consts", "kernel", "stale", "state", "unpack")

    def __init__(self, kernel: Callable[..., tuple], arrays: tuple, state: tuple, consts: tuple,
                 unpack: Callable[[tuple, tuple], None]) -> None:
        self.kernel, self.arrays, self.state, self.consts, self.unpack = kernel, arrays, state, consts, unpack
        self.stale = False
        self._pending: tuple | None = None

    def run(self, block: tuple, start: int, stop: int, commit: bool) -> int:
        """Lines ``start:stop`` of ``block`` (the kernel's first arguments, ``block[0]``
        the block's steps): the lines taken; their state written here (``commit``)
        or only kept (see the class)."""
        if commit:
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] is block[0] and pending[1] == start \
                    and pending[2] == stop - start:
                self.arrays, self.state, self.stale = pending[3], pending[4], True
                return stop - start
        arrays = tuple([a.copy() for a in self.arrays])
        out = self.kernel(*block, start, stop, *arrays, *self.state, *self.consts)
        taken = out[0]
        if not commit:
            self._pending = (block[0], start, taken, arrays, out[1:])
        elif taken:
            self.arrays, self.state, self.stale = arrays, out[1:], True
        return taken

    def sync(self) -> None:
        """Write the state into the rule's fields (once after each stretch taken)."""
        if self.stale:
            self.unpack(self.arrays, self.state)
            self.stale = False


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

