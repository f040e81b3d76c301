"""The phase labeller: turns a run's lines into phases and run events.

It speaks of roles, never of metric names: "the training loss-like series",
"the held-out accuracy-like series". With only some roles present it uses what
is there: losses alone still give spikes, collapse and loss-based phases.

The rules live in :mod:`detector.core.labeller.rules`, one class each
(training-loss excursions, generalisation collapse, generalisation and
grokking, loss-only phases), the settings and the reasons for their defaults
in :mod:`~detector.core.labeller.config`, the phase timeline (collapse is a
phase that can end) in :mod:`~detector.core.labeller.timeline`. Every duration
is in steps or relative to the run's own time scale, never in logged lines.

Accuracies logged in percent are recognised per run: once any accuracy-like
series shows a value above 1.5, every accuracy is read in percent (state kept
so far is rescaled), so a held-out accuracy that never leaves 0.9 % is not
read as 90 %.

Cost: O(1) a line (see the rules); state is plain data (``state()`` is a
dict of numbers, strings and lists), bounded whatever the run's length. A
block of lines (:meth:`PhaseLabeller.update_block`) goes through each rule's
``quiet_run`` (beside its ``update``: compiled loops in
:mod:`~detector.core.labeller._kernels`) while nothing can happen, and line by
line where something may, with the same events and state as line by line
throughout. Each rule keeps its compiled loop's copy of its state from one
quiet stretch to the next, across blocks too
(:class:`~detector.core.labeller.rules._common.Quiet`), and writes it into its
own fields only when they are read (its per-line ``update``, ``state()``,
``finish()``): a server that calls :meth:`~PhaseLabeller.update_block` once per
batch of a few dozen quiet lines pays a few compiled calls a batch, not the
packing of every rule's state into arrays and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from detector.core.labeller import _kernels as _k
from detector.core.labeller.block import RoleColumns, role_lists
from detector.core.labeller.config import LabellerConfig
from detector.core.labeller.rules import (
    Generalisation,
    GeneralisationCollapse,
    LossExcursions,
    LossOnlyPhases,
)
from detector.core.labeller.timeline import Timeline
from detector.core.types import Event, Phase, Role, Segment, SeriesSpec, Split

__all__ = ["LabellerConfig", "LineBlock", "PhaseLabeller", "Roles"]

STATE_VERSION = 5
_FIRST_WINDOW = 64  # lines of a quiet stretch looked at first (see PhaseLabeller._quiet_run)


@dataclass(frozen=True)
class Roles:
    """Which series play which part; resolved from specs whenever a series is added."""

    train_loss: str | None
    val_loss: str | None
    train_acc: str | None
    val_acc: str | None
    ranks: tuple[str, ...]

    @classmethod
    def resolve(cls, specs: Mapping[str, SeriesSpec]) -> Roles:
        def pick(role: Role, splits: Sequence[Split]) -> str | None:
            for split in splits:
                names = sorted(n for n, s in specs.items() if s.role is role and s.split is split)
                if names:
                    return names[0]
            return None

        held_out = (Split.VAL, Split.TEST)
        return cls(
            train_loss=pick(Role.LOSS, (Split.TRAIN,)),
            val_loss=pick(Role.LOSS, held_out),
            train_acc=pick(Role.ACCURACY, (Split.TRAIN,)),
            val_acc=pick(Role.ACCURACY, held_out),
            ranks=tuple(sorted(n for n, s in specs.items() if s.role is Role.RANK)),
        )

    @property
    def headline_loss(self) -> str | None:
        return self.train_loss or self.val_loss


class PhaseLabeller:
    """Combines a run's role series into phases and run events, one line at a time.

    >>> labeller = PhaseLabeller()
    >>> labeller.set_specs({"train_loss": SeriesSpec("train_loss", Role.LOSS, Split.TRAIN, None)})
    >>> events = []
    >>> for step in range(0, 2000, 10):
    ...     loss = 1.0 / (1 + step) * (40 if step == 1000 else 1)
    ...     events += labeller.update(step, {"train_loss": loss})
    >>> [(e.kind.value, e.step, e.evidence["factor"]) for e in events if e.kind.value == "LOSS_SPIKE"]
    [('LOSS_SPIKE', 1000, '39.2')]
    """

    def __init__(self, config: LabellerConfig | None = None) -> None:
        self.config = config or LabellerConfig()
        c = self.config
        self.roles = Roles(None, None, None, None, ())
        self.last_step: int | None = None
        self.last_gap = 1
        self.first_step = 0
        self.percent = False
        self.train_recent: list[float] = []
        self.train_best = -math.inf
        self.timeline = Timeline(c.max_boundaries)
        self.excursions = LossExcursions(c)
        self.generalisation_collapse = GeneralisationCollapse(c)
        self.generalisation = Generalisation(c)
        self.loss_only = LossOnlyPhases(c)
        # train_recent and train_best as the compiled loop takes them ([recent array,
        # count, best]), while a quiet stretch has moved them since they were written
        # (_train_recent; written by _sync_train).
        self._train: list | None = None
        self._train_stale = False

    # --- state ------------------------------------------------------------------

    _RULES = ("excursions", "generalisation_collapse", "generalisation", "loss_only")

    def state(self) -> dict:
        """Plain data: numbers, strings, None, lists and dicts of those."""
        if self._train_stale:
            self._sync_train()
        return {
            "version": STATE_VERSION,
            "config": {f.name: getattr(self.config, f.name) for f in fields(LabellerConfig)},
            "last_step": self.last_step, "last_gap": self.last_gap, "first_step": self.first_step,
            "percent": self.percent, "timeline": self.timeline.state(),
            "train_recent": list(self.train_recent), "train_best": self.train_best,
            **{name: getattr(self, name).state() for name in self._RULES},
        }

    @classmethod
    def from_state(cls, state: dict) -> PhaseLabeller:
        """Settings added since the state was written take their defaults. A state of
        an older labeller (before version 3) gives a fresh labeller that keeps its
        phase timeline: the rules' evidence starts again from the next line."""
        saved = state["config"] if isinstance(state["config"], dict) else vars(state["config"])
        config = LabellerConfig(**{f.name: saved[f.name] for f in fields(LabellerConfig) if f.name in saved})
        labeller = cls(config)
        if state.get("version") != STATE_VERSION:
            labeller.last_step, labeller.last_gap = state.get("last_step"), state.get("last_gap", 1)
            labeller.first_step = state.get("first_step", 0)
            labeller.timeline.boundaries = list(state.get("boundaries", []))
            return labeller
        labeller.last_step, labeller.last_gap = state["last_step"], state["last_gap"]
        labeller.first_step, labeller.percent = state["first_step"], state["percent"]
        labeller.train_recent, labeller.train_best = list(state["train_recent"]), state["train_best"]
        labeller.timeline = Timeline.from_state(state["timeline"])
        for name in cls._RULES:
            getattr(labeller, name).load(state[name])
        return labeller

    def set_specs(self, specs: Mapping[str, SeriesSpec]) -> None:
        self.roles = Roles.resolve(specs)

    # --- lines --------------------------------------------------------------------

    def update(self, step: int, row: Mapping[str, float]) -> list[Event]:
        """One line: ``row`` its values (series without a value on it are absent);
        the rules read only the role series."""
        r = self.roles
        return self._line(step, _get(row, r.train_loss), _get(row, r.val_loss),
                          _get(row, r.train_acc), _get(row, r.val_acc))

    def _line(self, step: int, train_loss: float | None, val_loss: float | None,
              train_acc: float | None, val_acc: float | None) -> list[Event]:
        if self._train is not None:  # the rules bring their own fields up to date (_Plain.release)
            self._sync_train()
            self._train = None
        if self.last_step is not None and step > self.last_step:
            self.last_gap = step - self.last_step
        if self.last_step is None:
            self.first_step = step
            self.timeline.start(step)
        self.last_step = step
        train_acc = self._fraction(train_acc)
        val_acc = self._fraction(val_acc)
        r, timeline = self.roles, self.timeline
        events: list[Event] = []
        loss_name = r.headline_loss
        loss = train_loss if r.train_loss else val_loss
        gen = self.generalisation
        memorised = self._memorised_steps()
        if loss is not None and loss_name is not None:
            events += self.excursions.update(step, loss, loss_name, self.first_step, memorised, timeline)
        if train_acc is not None and math.isfinite(train_acc):
            self.train_recent = [*self.train_recent[-2:], train_acc]
            self.train_best = max(self.train_best, sorted(self.train_recent)[len(self.train_recent) // 2])
        if val_acc is not None and r.val_acc:
            events += self.generalisation_collapse.update(
                step, val_acc, self._training_holds(), r.val_acc, timeline)
        if timeline.collapsed:
            return events
        gen.memorisation(step, train_acc, train_loss, self.excursions.first, self.first_step,
                         by_loss=not r.train_acc, levels=bool(r.val_acc))
        if r.val_acc:
            events += gen.update(step, val_acc, val_loss, self.first_step, r.val_acc, r.val_loss, timeline,
                                 steady=self.excursions.quiet)
        elif loss_name is not None and self.excursions.quiet:
            headline = val_loss if r.val_loss else train_loss
            training = train_loss if r.val_loss else None
            if headline is not None or training is not None:
                events += self.loss_only.update(step, headline, self.first_step,
                                                r.val_loss or r.train_loss or loss_name, timeline,
                                                self.excursions.last_start, training)
        return events

    def _memorised_steps(self) -> int | None:
        """The steps memorisation took, None before it."""
        at = self.generalisation.memorised_at
        return None if at is None else at - self.first_step

    def _training_holds(self) -> bool:
        """The training metric holds: its accuracy (median of its last three values)
        within ``generalisation_drop`` of the best it held, or, without accuracy, no
        loss excursion open. A loss blip that leaves the accuracy at 1 holds."""
        if self.roles.train_acc and self.train_recent:
            level = sorted(self.train_recent)[len(self.train_recent) // 2]
            return level >= self.train_best - self.config.generalisation_drop
        return self.excursions.quiet

    def _fraction(self, value: float | None) -> float | None:
        if value is None:
            return None
        if not self.percent and value > 1.5 and math.isfinite(value):
            self.percent = True
            self.train_recent = [v / 100 for v in self.train_recent]
            self.train_best /= 100
            self.generalisation.scale(0.01)
            self.generalisation_collapse.scale(0.01)
        return value / 100.0 if self.percent else value

    # --- a block of lines -----------------------------------------------------------

    def update_block(
        self,
        steps: np.ndarray,
        view: LineBlock,
        at_line: dict[int, list[Event]],
    ) -> list[Event]:
        """:meth:`update` on every line of a block, each line's series events first.

        ``view`` gives the block's columns; ``at_line`` the series events by step
        (popped as their lines are taken). Quiet stretches (see
        :meth:`_quiet_run`) go through the rules' compiled ``quiet_run``; the line
        after each, where something may happen, through the per-line path, which
        reads the role columns as Python lists. O(lines); a block of quiet lines
        costs O(1) Python calls (one window up to ``_FIRST_WINDOW`` lines) plus
        the working scale of its loss, a Python ``log10`` a line.
        """
        r = self.roles
        integer = isinstance(steps, np.ndarray) and steps.dtype.kind in "iu"  # without np.issubdtype's cost
        if not integer and not np.issubdtype(np.asarray(steps).dtype, np.integer):
            return self._lines(np.asarray(steps).tolist(), view, at_line)
        cols = RoleColumns(steps, view, (r.train_loss, r.val_loss, r.train_acc, r.val_acc))
        events: list[Event] = []
        step_list, n, i = cols.step_list, len(cols.step_list), 0
        while i < n:
            if self.last_step is not None:  # the run's first line starts the timeline
                taken = self._quiet_run(cols, i, n)
                if taken and at_line:
                    # Quiet lines give no run events: their series events keep their order.
                    for step in step_list[i:i + taken]:
                        series_events = at_line.pop(step, None)
                        if series_events:
                            events += series_events
                i += taken
                if i == n:
                    break
            step = step_list[i]
            if at_line:
                series_events = at_line.pop(step, None)
                if series_events:
                    events += series_events
            run_events = self._line(step, *cols.line(i))
            if run_events:
                events += run_events
            i += 1
        return events

    def _lines(self, steps: list, view: LineBlock, at_line: dict[int, list[Event]]) -> list[Event]:
        """Every line through the per-line path (steps that are not integers)."""
        r = self.roles
        lists = role_lists([None if name is None else view.column(name)
                            for name in (r.train_loss, r.val_loss, r.train_acc, r.val_acc)])
        events: list[Event] = []
        for i, step in enumerate(steps):
            if at_line:
                events += at_line.pop(step, [])
            events += self._line(step, *(None if col is None else col[i] for col in lists))
        return events

    def _quiet_run(self, cols: RoleColumns, start: int, end: int) -> int:
        """Take the longest stretch of lines ``start:end`` that every rule takes in its
        quiet regime (its ``quiet_run``: nothing but its own small state can change)
        and that switches no accuracy to percent; returns its length, 0 if the
        line at ``start`` must go through the per-line path.

        In windows that double while every rule takes all of them: a rule asked
        how far it could go scans its window, and a stretch that ends after a few
        lines must not cost a scan to the block's end. O(lines of the stretch).
        """
        taken, window = 0, _FIRST_WINDOW
        while start + taken < end:
            stop = min(end, start + taken + window)
            part = self._quiet_window(cols, start + taken, stop)
            taken += part
            if start + taken < stop:
                break
            window *= 2
        return taken

    def _quiet_window(self, cols: RoleColumns, start: int, stop: int) -> int:
        """:meth:`_quiet_run` on lines ``start:stop``. Each rule first says how far it
        could go (changing nothing), then every part of the labeller takes the
        shortest stretch: the rules read each other's state (the first loss,
        whether training holds), which is only the same as on the per-line path
        up to the first line where any of them would act (a rule counting keeps
        what it found: taking the same stretch next costs no second loop).
        O(stop - start), twice at most."""
        r, steps = self.roles, cols.steps
        if not self.percent:
            stop = cols.percent_from(start, stop)
            if stop <= start:
                return 0
        loss_name = r.headline_loss
        loss = cols.train_loss if r.train_loss else cols.val_loss
        train_acc = cols.train_acc.fraction(self.percent)
        val_acc = cols.val_acc.fraction(self.percent)
        if loss_name is not None:
            stop = start + self.excursions.quiet_run(steps, loss.values, loss.ws, loss.present, start, stop,
                                                     self.first_step, self._memorised_steps(), commit=False)
        holds, holds_stop, write_train = None, start, None
        if r.val_acc and stop > start:
            holds_stop = stop
            holds, write_train = self._train_recent(train_acc, cols.train_acc.present, start, stop)
            stop = start + self.generalisation_collapse.quiet_run(
                steps, val_acc, cols.val_acc.present, holds, start, stop, commit=False)
        collapsed = self.timeline.collapsed
        gen, headline = self.generalisation, cols.val_loss if r.val_loss else cols.train_loss
        # The training loss beside a validation headline (LossOnlyPhases.training).
        train_ys = cols.train_loss.ws if r.val_loss and r.train_loss and not r.val_acc else None
        stabilised = self.timeline.phase is Phase.STABILIZATION
        steady = self.excursions.quiet  # the same on every line of the stretch (none opens or ends)
        if not collapsed and stop > start:
            stop = start + gen.memorisation_quiet(steps, train_acc, cols.train_acc.present,
                                                  cols.train_loss.values, cols.train_loss.present,
                                                  self.excursions.first, start, stop, by_loss=not r.train_acc,
                                                  loss_ws=cols.train_loss.ws if not r.train_acc else None,
                                                  first_step=self.first_step, levels=bool(r.val_acc))
            # The held-out loss's working scale is read only while hidden progress is looked for.
            val_ws = cols.val_loss.ws if gen.progressing else cols.val_loss.values
            if r.val_acc:
                stop = start + gen.quiet_run(steps, val_acc, cols.val_acc.present, val_ws,
                                             cols.val_loss.present, self.first_step, stabilised, start, stop,
                                             commit=False, steady=steady)
            elif loss_name is not None and self.excursions.quiet:
                stop = start + self.loss_only.quiet_run(steps, headline.values, headline.ws, headline.present,
                                                        start, stop, commit=False, train_ys=train_ys)
        if stop <= start:
            return 0
        # Every part takes the same stretch.
        assert self.last_step is not None  # the run has begun
        self.last_step, self.last_gap = _k.line_steps(steps, start, stop, self.last_step, self.last_gap)
        if loss_name is not None:
            self.excursions.quiet_run(steps, loss.values, loss.ws, loss.present, start, stop,
                                      self.first_step, self._memorised_steps())
        if r.train_acc:
            if write_train is None or stop != holds_stop:
                _, write_train = self._train_recent(train_acc, cols.train_acc.present, start, stop)
            write_train()
        if r.val_acc:
            assert holds is not None  # counted above: the held-out accuracy's stretch was scanned
            self.generalisation_collapse.quiet_run(steps, val_acc, cols.val_acc.present, holds, start, stop)
        if not collapsed:
            gen.memorisation_take(steps, train_acc, cols.train_acc.present, start, stop,
                                  by_loss=not r.train_acc, levels=bool(r.val_acc),
                                  loss_ws=cols.train_loss.ws if not r.train_acc else None)
            if r.val_acc:
                gen.quiet_run(steps, val_acc, cols.val_acc.present, val_ws, cols.val_loss.present,
                              self.first_step, stabilised, start, stop, steady=steady)
            elif loss_name is not None and self.excursions.quiet:
                self.loss_only.quiet_run(steps, headline.values, headline.ws, headline.present, start, stop,
                                         train_ys=train_ys)
        return stop - start

    def _train_recent(self, train_acc: np.ndarray, present: np.ndarray, start: int,
                      stop: int) -> tuple[np.ndarray, Callable[[], None]]:
        """``train_recent`` and ``train_best`` over lines ``start:stop`` (an excursion
        neither opens nor ends): :meth:`_training_holds` after each line, and what
        writes their state after ``stop`` (nothing is written before; the fields
        themselves once read: :meth:`_sync_train`). O(lines)."""
        train = self._train
        if train is None:
            recent = np.zeros(3)
            recent[:len(self.train_recent)] = self.train_recent
            train = self._train = [recent, len(self.train_recent), float(self.train_best)]
        recent = train[0].copy()
        holds, count, best = _k.training_holds(
            train_acc, present, start, stop, recent, train[1], train[2], bool(self.roles.train_acc),
            self.excursions.quiet, float(self.config.generalisation_drop))

        def write() -> None:
            train[0], train[1], train[2] = recent, count, best
            self._train_stale = True

        return holds, write

    def _sync_train(self) -> None:
        """Write what quiet stretches did to ``train_recent`` and ``train_best`` into them."""
        if self._train_stale:
            recent, count, best = self._train  # type: ignore[misc]  # stale: kept since
            self.train_recent, self.train_best = recent[:count].tolist(), best
            self._train_stale = False

    def finish(self) -> list[Event]:
        """The run has ended (see ``RunDetector.finish``): an excursion that was back
        and settling is a spike (the run ended before it had settled for long)."""
        if self._train is not None:
            self._sync_train()
        return self.excursions.finish(self.roles.headline_loss or "")

    # --- phases -------------------------------------------------------------------

    @property
    def phase(self) -> Phase | None:
        return self.timeline.phase

    @property
    def boundaries(self) -> list[tuple[int, Phase, float]]:
        return self.timeline.boundaries

    def current(self) -> tuple[Phase | None, int, float]:
        return self.timeline.current()

    def collapse_scopes(self) -> tuple[str, ...]:
        """The scopes (``training``, ``generalization``) of the collapses open now,
        sorted; empty when none is. O(scopes): at most two."""
        return tuple(sorted(self.timeline.collapses))

    def segments(self) -> list[Segment]:
        if not self.timeline.boundaries or self.last_step is None:
            return []
        return self.timeline.segments(self.last_step + self.last_gap)


def _get(row: Mapping[str, float], name: str | None) -> float | None:
    if name is None:
        return None
    value = row.get(name)
    return None if value is None else float(value)


class LineBlock(Protocol):
    """A block of lines as :meth:`PhaseLabeller.update_block` reads it: its steps
    and, per series, its values on every line (NaN where absent) and where present."""

    steps: np.ndarray

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None: ...
