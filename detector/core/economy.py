"""Event economy: change points and plateaus only where a person would draw a line.

The series detectors report every statistically supported break and plateau;
on real runs with dozens of series that is a flood. :class:`EventEconomy`
decides which of those reach the user:

* a ``CHANGE_POINT`` of an accuracy-like series pinned at its bound (both sides
  within ``pinned_tolerance`` of 1, or of 100 for percent) says nothing;
* parallel series of one kind (names equal once digits are blanked:
  ``layer3.weight_norm`` and ``layer17.weight_norm``) share one allowance, so
  44 per-layer norms speak as one; so do all the norms of a run (role
  ``norm``: parameter, gradient and update norms move together when a run
  turns unstable, and a real muon run's three post-grokking cycles were marked
  on each of its eight norms);
* each such group may report ``burst`` (8) change points at once (a run of
  real changes: TCPD series hold up to about that many) but plateau starts and
  ends one at a time (a slope test on a slowly drifting series flips back and
  forth); then one event per ``lines_per_event`` logged lines in all (token
  buckets counted in lines of the run). The next event
  let through says how many were held back (evidence ``suppressed``);
* once the run has settled there is no burst: every group (also one first
  heard from later) starts the stretch with an empty allowance that refills to
  one event per ``lines_per_event`` lines, so a long settled stretch reports
  at most one event per group per 100 lines however much its series wander (a
  settled run's series changes are rarely news, and a wandering norm would
  otherwise spend a fresh burst, or what is left of the first one, on every
  stretch). Settled: in ``stabilization`` (a ``PHASE_CHANGE`` to it has passed
  through the filter), or generalised (``GROKKING_COMPLETE`` has passed) and
  not in ``collapse`` or ``instability``: a grokked run that never stabilises
  (its training loss cycling for 70 000 steps) is as settled for its series as
  a stable one, its collapses being told by run-level events. Leaving a settled
  stretch (a collapse, say) gives the burst back;
* a ``CHANGE_POINT`` that repeats a rhythm is a cycle, not news: once a series
  has moved the same way ``cycle_repeats`` (3) times at even intervals (each
  within ``cycle_tolerance``, a quarter, of the first, or of twice it: a tooth
  may go unseen; counted in steps),
  the next moves that keep the rhythm are held back. A balance paid in every
  month and spent down, a loss restarted by every learning-rate restart, a
  sawtooth: a reader marks none of its teeth after seeing three. Once is chance,
  twice a coincidence (two changes at a similar spacing are common in a run of
  real changes); a move off the rhythm starts over;
* the ``PLATEAU_END`` of a series whose ``PLATEAU_START`` was let through always
  goes through (it resolves what the user was told, the ``TrainingPlateau``
  alert among it), and one whose start was held back is held back too.

Run-level events (phases, spikes, collapses, grokking) are never held back.
Why the defaults: ``burst`` 8 is about the most change points a TCPD series
holds; ``lines_per_event`` 100 is the bound a reader accepts on a stable
stretch (issue 14); ``pinned_tolerance`` 0.01: an accuracy at 0.99 or more on
both sides has not moved on a plot.
O(1) an event; state: a few numbers per group.

>>> from detector.core.types import Event, EventKind
>>> economy = EventEconomy(burst=3)
>>> cps = [Event(step=s, kind=EventKind.CHANGE_POINT, detected_at=s, series=f"layer{s % 3}.norm")
...        for s in range(10)]
>>> [e.step for e in economy.filter(cps, [0] * 10)]
[0, 1, 2]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from detector.core.types import Event, EventKind, Phase, Role, SeriesSpec

_SERIES_KINDS = frozenset({EventKind.CHANGE_POINT, EventKind.PLATEAU_START, EventKind.PLATEAU_END})
_DIGITS = re.compile(r"\d+")


def _with_evidence(event: Event, evidence: dict[str, str]) -> Event:
    """``dataclasses.replace(event, evidence=evidence)``, without its per-call field
    introspection and the frozen ``__init__``'s one ``object.__setattr__`` a field
    (~10 us; the economy does this for every event it lets through after held-back
    ones): the same fields in a new instance (an Event has no ``__post_init__``). O(fields)."""
    new = object.__new__(type(event))
    new.__dict__.update(event.__dict__)
    new.__dict__["evidence"] = evidence
    return new


def group_of(name: str) -> str:
    """The kind of series ``name`` is one of (digits blanked)."""
    return _DIGITS.sub("#", name)


class EventEconomy:
    """Holds back series events beyond each group's allowance (see the module)."""

    def __init__(self, burst: int = 8, lines_per_event: int = 100, pinned_tolerance: float = 0.01,
                 cycle_repeats: int = 3, cycle_tolerance: float = 0.25) -> None:
        self.burst = burst
        self.lines_per_event = lines_per_event
        self.pinned_tolerance = pinned_tolerance
        self.cycle_repeats = cycle_repeats
        self.cycle_tolerance = cycle_tolerance
        # series and direction -> [step of its last change point, the rhythm's period (the
        # first interval of the current run of even moves; 0 after one move), the moves in it]
        self.rhythms: dict[str, list[int]] = {}
        # group -> [credit, line of last refill, held back, credit for weak events]; credit is
        # counted in lines (an event costs lines_per_event), so refills add up exactly.
        self.groups: dict[str, list[int]] = {}
        self.settled_at: int | None = None  # the line the run settled (no burst), if it is settled
        self.phase: str | None = None  # the run's phase as last told by a PHASE_CHANGE
        self.grokked = False  # GROKKING_COMPLETE has passed
        self.open_plateaus: set[str] = set()  # series whose reported plateau has not ended

    def filter(self, events: Sequence[Event], lines: Sequence[int],
               specs: dict[str, SeriesSpec] | None = None) -> list[Event]:
        """The events to report; ``lines[i]`` is the run's line count when ``events[i]`` was found."""
        out = []
        for event, line in zip(events, lines, strict=True):
            if event.kind not in _SERIES_KINDS:
                if event.kind is EventKind.PHASE_CHANGE:
                    self.phase = event.evidence.get("to")
                    self._settle(line)
                elif event.kind is EventKind.GROKKING_COMPLETE:
                    self.grokked = True
                    self._settle(line)
                out.append(event)
                continue
            if self._pinned(event, specs):
                continue
            if event.kind is EventKind.CHANGE_POINT and self._in_rhythm(event):
                self._allowance(self._group(event.series, specs), line)[2] += 1
                continue
            if event.kind is EventKind.PLATEAU_END:
                if event.series not in self.open_plateaus:
                    continue  # its start was held back (or came before a restart)
                self.open_plateaus.discard(event.series)
                out.append(event)
                continue
            cost = self.lines_per_event
            cap = cost * (1 if self.settled else self.burst)
            group = self._allowance(self._group(event.series, specs), line)
            refill = line - group[1]
            group[0] = min(cap, group[0] + refill)
            group[3] = min(cost, group[3] + refill)
            group[1] = line
            plateau = event.kind is not EventKind.CHANGE_POINT
            if group[0] < cost or (plateau and group[3] < cost):
                group[2] += 1
                continue
            group[0] -= cost
            if plateau:
                group[3] -= cost
            if group[2]:
                event = _with_evidence(event, {**event.evidence, "suppressed": str(int(group[2]))})
                group[2] = 0
            if plateau:
                self.open_plateaus.add(event.series)
            out.append(event)
        return out

    def _allowance(self, name: str, line: int) -> list[int]:
        """Group ``name``'s allowance state, made full for a group first heard from at
        ``line`` (or, in a settled stretch, refilled since the stretch began)."""
        group = self.groups.get(name)
        if group is None:
            cost = self.lines_per_event
            cap = cost * (1 if self.settled else self.burst)
            start = cap if self.settled_at is None else min(cap, line - self.settled_at)
            group = self.groups[name] = [start, line, 0, min(cost, start)]
        return group

    def _in_rhythm(self, event: Event) -> bool:
        """Whether the change point ``event`` keeps a rhythm its series has shown
        ``cycle_repeats`` times (see the module); it joins the series' moves either way. O(1)."""
        direction = event.evidence.get("direction")
        if direction is None:
            return False
        key = f"{event.series}\x00{direction}"
        rhythm = self.rhythms.get(key)
        if rhythm is None:
            self.rhythms[key] = [event.step, 0, 1]
            return False
        interval = event.step - rhythm[0]
        if interval <= 0:
            return False  # located at or before the last: not a next move
        period = rhythm[1]
        beats = round(interval / period) if period > 0 else 0  # one beat may go unseen
        even = 1 <= beats <= 2 and abs(interval - beats * period) <= self.cycle_tolerance * period
        if even:
            self.rhythms[key] = [event.step, period, rhythm[2] + 1]
            return rhythm[2] + 1 > self.cycle_repeats
        self.rhythms[key] = [event.step, interval, 2]
        return False

    @staticmethod
    def _group(series: str, specs: dict[str, SeriesSpec] | None) -> str:
        """The allowance ``series`` shares: every norm of the run (parameter, gradient
        and update norms move together: a run's instability shows on all of them at
        once), else the series' kind (:func:`group_of`)."""
        spec = None if specs is None else specs.get(series)
        if spec is not None and spec.role is Role.NORM:
            return "role:norm"
        return group_of(series)

    @property
    def settled(self) -> bool:
        return self.settled_at is not None

    def _settle(self, line: int) -> None:
        """Enter or leave a settled stretch after a run-level event at ``line``."""
        settled = self.phase == Phase.STABILIZATION.value or (
            self.grokked and self.phase not in (Phase.COLLAPSE.value, Phase.INSTABILITY.value))
        if not settled:
            self.settled_at = None
        elif self.settled_at is None:  # a stable stretch begins: every allowance empty
            self.settled_at = line
            for group in self.groups.values():
                group[0], group[1], group[3] = 0, line, 0

    def _pinned(self, event: Event, specs: dict[str, SeriesSpec] | None) -> bool:
        if event.kind is not EventKind.CHANGE_POINT or specs is None:
            return False
        spec = specs.get(event.series)
        if spec is None or spec.role is not Role.ACCURACY:
            return False
        try:
            before, after = float(event.evidence["before"]), float(event.evidence["after"])
        except (KeyError, ValueError):
            return False
        bound = 100.0 if max(before, after) > 1.5 else 1.0
        return min(before, after) >= bound * (1 - self.pinned_tolerance)

    def state(self) -> dict:
        return {"version": 2, "burst": self.burst, "lines_per_event": self.lines_per_event,
                "pinned_tolerance": self.pinned_tolerance, "cycle_repeats": self.cycle_repeats,
                "cycle_tolerance": self.cycle_tolerance,
                "rhythms": {k: list(v) for k, v in self.rhythms.items()},
                "settled_at": self.settled_at,
                "phase": self.phase, "grokked": self.grokked,
                "groups": {k: list(v) for k, v in self.groups.items()},
                "open_plateaus": sorted(self.open_plateaus)}

    @classmethod
    def from_state(cls, state: dict) -> EventEconomy:
        economy = cls(state["burst"], state["lines_per_event"], state["pinned_tolerance"],
                      state.get("cycle_repeats", 3), state.get("cycle_tolerance", 0.25))
        economy.rhythms = {k: [int(x) for x in v] for k, v in state.get("rhythms", {}).items()}
        if state.get("version", 1) < 2:  # tokens counted in events, the weak ones maybe absent
            cost = economy.lines_per_event
            economy.groups = {k: [round(v[0] * cost), int(v[1]), int(v[2]), round([*v, 1.0][3] * cost)]
                              for k, v in state["groups"].items()}
        else:
            economy.groups = {k: list(v) for k, v in state["groups"].items()}
        economy.settled_at = state.get("settled_at")
        economy.phase = state.get("phase")
        economy.grokked = bool(state.get("grokked", False))
        economy.open_plateaus = set(state.get("open_plateaus", ()))
        return economy
