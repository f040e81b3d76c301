"""A block's role columns as the labeller reads them: Python values a line, arrays a stretch.

:meth:`PhaseLabeller.update_block <detector.core.labeller.PhaseLabeller.update_block>`
takes quiet stretches of a block through the rules' compiled ``quiet_run``
and the lines between them through the per-line path; :class:`RoleColumns`
gives both what they read, each built once a block and only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from detector.core.labeller import _kernels as _k
from detector.core.series import working_scale_list
from detector.core.types import Role

if TYPE_CHECKING:
    from detector.core.labeller import LineBlock

_PERCENT_ABOVE = 1.5  # PhaseLabeller._fraction: an accuracy above this is in percent
_ONE_BY_ONE = 4  # lines of a block RoleColumns.line reads before it makes the columns Python lists


class Column:
    """One role series over a block: ``values`` (NaN where absent), ``present``, and
    lazily ``ws`` (working-scale values where finite, NaN elsewhere) and ``percent``
    (the values / 100)."""

    __slots__ = ("_percent", "_ws", "present", "values")

    def __init__(self, values: np.ndarray, present: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.present = np.asarray(present, dtype=np.bool_)
        self._ws: np.ndarray | None = None
        self._percent: np.ndarray | None = None

    @property
    def ws(self) -> np.ndarray:
        """The loss's working-scale values, by :func:`working_scale_list` (libm's log10,
        as the per-line path's :func:`working_scale` takes it; numpy's may differ in
        the last bit)."""
        if self._ws is None:
            # Every line in one go (NaN gives NaN, and no value raises), then NaN where
            # absent or not finite: cheaper than picking the rows first on a block of a
            # few dozen lines, most of them present.
            ws = self._ws = np.array(working_scale_list(Role.LOSS, self.values.tolist()))
            ws[~(self.present & np.isfinite(self.values))] = np.nan
        return self._ws

    def fraction(self, percent: bool) -> np.ndarray:
        """The accuracy as ``PhaseLabeller._fraction`` reads it (``value / 100.0`` in percent)."""
        if not percent:
            return self.values
        if self._percent is None:
            self._percent = self.values / 100.0
        return self._percent


class RoleColumns:
    """The four role columns of a block (train loss, held-out loss, train accuracy,
    held-out accuracy; an absent role is a column logged nowhere), as Python lists
    for the per-line path and as :class:`Column` arrays for the quiet stretches.
    O(1) to build (the lists and the working scales are made when first read)."""

    __slots__ = ("_asked", "_lists", "_raw", "step_list", "steps", "train_acc", "train_loss",
                 "val_acc", "val_loss")

    def __init__(self, steps: np.ndarray, view: LineBlock, names: tuple[str | None, ...]) -> None:
        self.steps = np.asarray(steps, dtype=np.int64)
        self.step_list: list[int] = self.steps.tolist()
        n = len(self.step_list)
        raw = [None if name is None else view.column(name) for name in names]
        self._raw = raw
        self._lists: list[list[float | None] | None] | None = None
        self._asked = 0  # lines read one by one (see line)
        absent: Column | None = None
        cols = []
        for col in raw:
            if col is None:
                if absent is None:  # read only: one for every absent role
                    absent = Column(np.full(n, np.nan), np.zeros(n, dtype=np.bool_))
                cols.append(absent)
            else:
                cols.append(Column(*col))
        self.train_loss, self.val_loss, self.train_acc, self.val_acc = cols

    def line(self, i: int) -> tuple[float | None, ...]:
        """Line i's four role values, None where absent: read one by one for the
        first few lines asked for (most blocks are taken whole by the quiet
        stretches, or but for a line or two), from the columns made Python lists
        after that (``float`` of an element is the float ``tolist`` gives)."""
        if self._lists is None:
            self._asked += 1
            if self._asked <= _ONE_BY_ONE:
                return tuple(None if col is None or not col[1][i] else float(col[0][i]) for col in self._raw)
            self._lists = role_lists(self._raw)
        return tuple(None if col is None else col[i] for col in self._lists)

    def percent_from(self, i: int, stop: int) -> int:
        """The first line of ``i:stop`` where an accuracy above 1.5 is logged (a per-line
        switch to percent); ``stop`` if none. O(stop - i)."""
        train, val = self.train_acc, self.val_acc
        return _k.percent_from(train.values, train.present, val.values, val.present, i, stop, _PERCENT_ABOVE)


def role_lists(columns: list[tuple[np.ndarray, np.ndarray] | None]) -> list[list[float | None] | None]:
    """Role columns ((values, present), or None for a role not logged) as Python
    lists for the per-line path."""
    return [None if col is None else as_list(*col) for col in columns]


def as_list(values: np.ndarray, present: np.ndarray) -> list[float | None]:
    """A column's values, None where absent."""
    if present.all():
        return values.tolist()
    return [v if p else None for v, p in zip(values.tolist(), present.tolist(), strict=True)]
