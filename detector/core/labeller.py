"""The phase labeller: turns series evidence into run phases and run events.

It speaks of roles, never of metric names: "the training loss-like series",
"the validation accuracy-like series", "rank-like series". With only some roles
present it uses what is there (losses alone still give collapse, spikes,
plateaus and loss-based phases).

Rules, each located at the step where the evidence begins:

* memorisation: the training accuracy-like series reaches ``fitted_accuracy``
  (or, without accuracy, the training loss falls below ``fitted_loss_fraction``
  of its first value); part of ``instability``.
* abstraction starts when the validation accuracy-like series rises
  ``onset_rise`` above its baseline for ``onset_lines`` consecutive lines;
  that is a ``GROKKING_ONSET`` when it comes after a memorised plateau at
  least ``grokking_delay_ratio`` times as long as memorisation took, or, for a
  rise that starts early but creeps, once ``grokking_min_lines`` lines (and as
  many as memorisation took) have passed since memorisation with the
  validation accuracy risen twice ``onset_rise`` yet still short of
  ``complete_fraction`` of the training accuracy (located at the onset).
* ``HIDDEN_PROGRESS``: after memorisation and before onset, the validation
  loss-like series falls with a significant Mann–Kendall trend while the
  validation accuracy-like series is still flat.
* stabilization: the validation accuracy-like series stays within
  ``stable_tolerance`` of its best, and its best rises by no more than that,
  for ``stable_lines`` lines (``grokking_min_lines`` before it has reached
  ``complete_fraction`` of the training accuracy: a slow creep is not stable).
* collapse: the training loss-like series turns non-finite, or exceeds both
  ``collapse_factor`` × its running minimum and its minimum plus
  ``collapse_margin`` × its first value (the bound), and is above the bound on
  ``collapse_confirm_lines`` lines of the excursion before it has stayed under
  it for ``recovered_lines`` lines in a row or fallen back halfway (on the log
  scale) to where it was, or a rank-like series drops below
  ``rank_collapse_fraction`` of its recent level meanwhile. An
  excursion that falls back is a ``LOSS_SPIKE``.

Every rule is O(1) per line; state is a few scalars and short deques.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from detector.core.series import SeriesDetector, working_scale
from detector.core.trend import TrendResult
from detector.core.types import Event, EventKind, Phase, Role, Segment, SeriesSpec, Split
from detector.errors import InvalidArgument


@dataclass(frozen=True)
class LabellerConfig:
    fitted_accuracy: float = 0.99
    fitted_loss_fraction: float = 0.01
    onset_rise: float = 0.10
    onset_lines: int = 3
    grokking_delay_ratio: float = 2.0
    complete_fraction: float = 0.95
    stable_tolerance: float = 0.01
    stable_lines: int = 10
    collapse_factor: float = 10.0
    collapse_margin: float = 0.25
    collapse_confirm_lines: int = 4
    recovered_lines: int = 10
    grokking_min_lines: int = 50
    rank_collapse_fraction: float = 0.5
    rank_history: int = 10
    progress_p_value: float = 1e-3
    progress_min_change: float = 0.1  # decades over the trend window
    max_boundaries: int = 1000

    def __post_init__(self) -> None:
        if self.onset_lines < 1 or self.stable_lines < 1 or self.collapse_confirm_lines < 1:
            raise InvalidArgument("line counts must be at least 1")


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


class PhaseLabeller:
    """Combines per-series evidence, one logged line (step) at a time."""

    def __init__(self, config: LabellerConfig | None = None) -> None:
        self.config = config or LabellerConfig()
        self.roles = Roles(None, None, None, None, ())
        self.lines = 0
        self.last_step: int | None = None
        self.last_gap = 1
        # phases: (start_step, phase, confidence), in order
        self.boundaries: list[tuple[int, Phase, float]] = []
        # memorisation and generalisation
        self.memorised_at: int | None = None
        self.memorised_line = 0
        self.first_step = 0
        self.val_first: deque[float] = deque(maxlen=3)
        self.val_recent: deque[float] = deque(maxlen=3)
        self.val_base: float | None = None
        self.above_since: tuple[int, int] | None = None  # (step, line)
        self.onset_at: int | None = None
        self.grokking = False
        self.complete_at: int | None = None
        self.best_val = -math.inf
        self.stable_since: int | None = None
        self.stable_lines = 0
        self.stable_min = math.inf
        self.stable_best = -math.inf
        self.generalised = False
        self.stable_at: int | None = None
        self.hidden_progress_at: int | None = None
        # collapse
        self.loss_first = math.nan
        self.loss_min = math.inf
        self.loss_last_y = math.nan
        self.excursion: dict | None = None
        self.collapsed_at: int | None = None
        self.rank_recent: dict[str, deque[float]] = {}
        # loss-only phases
        self.loss_plateau = False

    def state(self) -> dict:
        """A deep copy of the labeller's few scalars and short deques."""
        return copy.deepcopy(vars(self))

    @classmethod
    def from_state(cls, state: dict) -> PhaseLabeller:
        # Settings added since the checkpoint was written take their defaults.
        saved = vars(state["config"])
        config = LabellerConfig(**{f.name: saved[f.name] for f in fields(LabellerConfig) if f.name in saved})
        labeller = cls(config)
        vars(labeller).update(copy.deepcopy({k: v for k, v in state.items() if k != "config"}))
        return labeller

    def set_specs(self, specs: Mapping[str, SeriesSpec]) -> None:
        self.roles = Roles.resolve(specs)

    # --- the per-line rules -----------------------------------------------------

    def update(
        self,
        step: int,
        row: Mapping[str, float],
        detectors: Mapping[str, SeriesDetector],
        series_events: Sequence[Event],
        trend_of: Callable[[str], TrendResult | None] | None = None,
    ) -> list[Event]:
        """One line: ``row`` its values, ``series_events`` what the series detectors
        found at it (series in name order). ``trend_of(name)``, when given, is a
        series' trend as of this line (the run detector's block path, where
        ``detectors`` have already taken later lines); else ``detectors[name].trend``."""
        if self.last_step is not None and step > self.last_step:
            self.last_gap = step - self.last_step
        self.last_step = step
        self.lines += 1
        events: list[Event] = []
        if not self.boundaries:
            self.first_step = step
            self.boundaries.append((step, Phase.INSTABILITY, 0.5))
        if self.collapsed_at is None:
            events += self._collapse(step, row)
        self._track_ranks(row)
        if self.collapsed_at is None:
            events += self._memorisation(step, row)
            events += self._generalisation(step, row, detectors, trend_of)
            events += self._loss_only_phases(step, series_events)
        return events

    # --- a block of lines -----------------------------------------------------------

    # Class-level so that tests can compare the block path with line-by-line updates.
    skip_quiet_lines = True

    def update_block(
        self,
        steps: np.ndarray,
        view: LineBlock,
        detectors: Mapping[str, SeriesDetector],
        at_line: dict[int, list[Event]],
    ) -> list[Event]:
        """:meth:`update` on every line of a block, series events first on each line.

        ``view`` is the block's rows (``view.line`` selects one) and columns;
        ``at_line`` the series events by step (popped as their lines are taken).
        Stretches of lines on which no rule can fire (no collapse bound crossed,
        no memorisation, no onset, no hidden-progress trend, and, once the run
        has stabilised, only the stability bookkeeping) are found with a few
        numpy calls and taken in bulk, with the state they leave exactly what
        :meth:`update` line by line leaves; the other lines go through
        :meth:`update`. After a short stretch, the next lines are taken one at a
        time for a while (up to 256) before looking again, so a busy block costs
        little more than line by line. O(lines) in numpy plus O(1) Python per
        line that can fire (or per ``stable`` bookkeeping line).
        """
        events: list[Event] = []
        step_list = steps.tolist()
        n = len(step_list)
        no_events: list[Event] = []
        i, burst, backoff = 0, 0 if self.skip_quiet_lines else n, 4
        while i < n:
            if burst <= 0:
                j = self._quiet_until(i, steps, view, detectors, at_line)
                if j > i:
                    events += self._skip(i, j, step_list, view, at_line)
                if j - i < 32:
                    burst, backoff = backoff, min(2 * backoff, 256)
                else:
                    backoff = 4
                i = j
                if i == n:
                    break
            view.line = i
            step = step_list[i]
            series_events = at_line.pop(step, no_events) if at_line else no_events
            run_events = self.update(step, view, detectors, series_events, view.trend_of)
            if series_events:
                events += series_events
            if run_events:
                events += run_events
            i += 1
            burst -= 1
        return events

    def _quiet_until(self, i: int, steps: np.ndarray, view: LineBlock,
                     detectors: Mapping[str, SeriesDetector], at_line: Mapping[int, list[Event]]) -> int:
        """The first line at or after ``i`` on which a rule may fire (``len(steps)``: none)."""
        if not self.boundaries or self.last_step is None:
            return i
        roles, c = self.roles, self.config
        quiet = np.ones(len(steps) - i, dtype=bool)
        if self.collapsed_at is None:
            loss_name = roles.train_loss or roles.val_loss
            col = None if loss_name is None else view.column(loss_name)
            if col is not None:
                if (self.excursion is not None or math.isnan(self.loss_first)
                        or not math.isfinite(self.loss_min)):
                    return i
                loss, present = col[0][i:], col[1][i:]
                # The running minimum before each line, as _collapse keeps it.
                before = np.minimum.accumulate(np.r_[self.loss_min, np.where(present, loss, np.inf)])[:-1]
                bound = np.maximum(c.collapse_factor * before,
                                   before + c.collapse_margin * abs(self.loss_first))
                with np.errstate(invalid="ignore"):
                    calm = np.isfinite(loss) & ((before < 0) | (loss <= bound))
                quiet &= ~present | calm
            if self.memorised_at is None:
                fitted = None
                if roles.train_acc is not None:
                    col = view.column(roles.train_acc)
                    if col is not None:
                        values, present = col[0][i:], col[1][i:]
                        with np.errstate(invalid="ignore"):
                            fitted = present & np.isfinite(values) & (
                                _as_fractions(values) >= c.fitted_accuracy)
                elif roles.train_loss is not None:
                    col = view.column(roles.train_loss)
                    if col is not None:
                        if not math.isfinite(self.loss_first):
                            return i
                        values, present = col[0][i:], col[1][i:]
                        with np.errstate(invalid="ignore"):
                            fitted = present & np.isfinite(values) & (
                                values <= c.fitted_loss_fraction * self.loss_first)
                if fitted is not None:
                    quiet &= ~fitted
            if roles.val_acc is not None:
                col = view.column(roles.val_acc)
                if col is not None:
                    values, present = col[0][i:], col[1][i:]
                    finite = present & np.isfinite(values)
                    value = _as_fractions(values)
                    if self.val_base is None:
                        return i
                    if self.onset_at is None:
                        with np.errstate(invalid="ignore"):
                            quiet &= ~(finite & (value >= self.val_base + c.onset_rise))
                        self._quiet_of_hidden_progress(i, quiet, finite, value, view, detectors)
                    elif not self._stabilised():
                        quiet &= ~finite
            elif at_line:  # loss-only phases follow the series events
                quiet &= ~np.isin(steps[i:], np.fromiter(at_line, dtype=np.int64))
        loud = np.flatnonzero(~quiet)
        return i + int(loud[0]) if len(loud) else len(steps)

    def _quiet_of_hidden_progress(self, i: int, quiet: np.ndarray, finite: np.ndarray,
                                  value: np.ndarray, view: LineBlock,
                                  detectors: Mapping[str, SeriesDetector]) -> None:
        """Clear ``quiet`` at the first line of the block (from ``i``) where
        :meth:`_hidden_progress` would fire; its trend is looked up once per
        trend update, not per line."""
        c, loss = self.config, self.roles.val_loss
        if (self.hidden_progress_at is not None or self.memorised_at is None or loss is None
                or loss not in detectors):
            return
        det = detectors[loss]
        window = det.config.trend_window
        lines_then = self.lines + 1 + np.arange(len(quiet))  # self.lines after each line's update
        with np.errstate(invalid="ignore"):
            candidate = (finite & (value < self.val_base + c.onset_rise / 2)
                         & (lines_then - self.memorised_line >= window))
        loud = np.flatnonzero(~quiet)
        if len(loud):
            candidate[loud[0]:] = False  # past the first loud line nothing is decided here
        at = np.flatnonzero(candidate)
        if len(at) == 0:
            return
        due = view.trend_due(loss, det.config.trend_every)
        due = np.zeros(len(at), dtype=np.int64) if due is None else due[i:][at]
        for k in at[np.r_[True, due[1:] != due[:-1]]].tolist():  # first line of each trend
            view.line = i + k
            trend = view.trend_of(loss)
            if trend is not None and (trend.statistic < 0 and trend.p_value < c.progress_p_value
                                      and trend.slope * (window - 1) < -c.progress_min_change):
                quiet[k] = False
                return

    def _stabilised(self) -> bool:
        """After onset, nothing the validation accuracy does fires any more: stable,
        generalised, and grokking (if any) complete."""
        return (self.stable_at is not None and self.generalised
                and (not self.grokking or self.complete_at is not None))

    def _skip(self, i: int, j: int, step_list: list[int], view: LineBlock,
              at_line: dict[int, list[Event]]) -> list[Event]:
        """Lines ``i .. j - 1``, on which no rule fires, in bulk: the state
        :meth:`update` would leave, and the series events found on them."""
        events: list[Event] = []
        if at_line:
            lo, hi = step_list[i], step_list[j - 1]
            for step in sorted(s for s in at_line if lo <= s <= hi):
                events += at_line.pop(step)
        self.last_gap = step_list[j - 1] - (step_list[j - 2] if j - 1 > i else self.last_step)
        self.last_step = step_list[j - 1]
        self.lines += j - i
        roles = self.roles
        loss_name = roles.train_loss or roles.val_loss
        if self.collapsed_at is None and loss_name is not None:
            values = _finite_in(view, loss_name, i, j)
            if values is not None:
                self.loss_min = min(self.loss_min, float(values.min()))
                self.loss_last_y = working_scale(Role.LOSS, float(values[-1]))
        for name in roles.ranks:
            values = _finite_in(view, name, i, j)
            if values is not None:
                history = self.rank_recent.setdefault(name, deque(maxlen=self.config.rank_history))
                history.extend(values[-self.config.rank_history:].tolist())
        if self.collapsed_at is None and roles.val_acc is not None:
            values = _finite_in(view, roles.val_acc, i, j, with_steps=True)
            if values is not None:
                value_steps, values = values
                fractions = _as_fractions(values).tolist()
                self.val_recent.extend(fractions[-3:])
                if self.onset_at is None:
                    self.above_since = None
                else:  # stabilised: only the stability bookkeeping of _generalisation
                    self._track_stability(value_steps.tolist(), fractions)
        return events

    def _track_stability(self, step_list: list[int], values: list[float]) -> None:
        """The best-value and stable-stretch bookkeeping of :meth:`_generalisation`, line by line."""
        tolerance = self.config.stable_tolerance
        best, since, count = self.best_val, self.stable_since, self.stable_lines
        low, best_then = self.stable_min, self.stable_best
        for step, value in zip(step_list, values, strict=True):
            if value > best:
                best = value
            if since is None or value < best - tolerance or low < best - tolerance or (
                best > best_then + tolerance
            ):
                since, count, low, best_then = step, 0, value, best
            count += 1
            low = min(low, value)
        self.best_val, self.stable_since, self.stable_lines = best, since, count
        self.stable_min, self.stable_best = low, best_then

    def finish(self, step: int, series_events: Sequence[Event]) -> list[Event]:
        """Series events found when the run ended (see ``RunDetector.finish``)."""
        if self.collapsed_at is not None:
            return []
        return self._loss_only_phases(step, series_events)

    def _collapse(self, step: int, row: Mapping[str, float]) -> list[Event]:
        name = self.roles.train_loss or self.roles.val_loss
        if name is None or name not in row:
            return []
        c = self.config
        loss = row[name]
        if not math.isfinite(loss):
            located = self.excursion["step"] if self.excursion else step
            return self._collapse_event(
                located, step, name, 1.0, f"{name} became non-finite",
                {"test": "non_finite", "value": str(loss)},
            )
        y = working_scale(Role.LOSS, loss)
        if math.isnan(self.loss_first):
            self.loss_first = loss
        events: list[Event] = []
        if self.excursion is not None:
            ex = self.excursion
            ex["lines"] += 1
            ex["peak"] = max(ex["peak"], y)
            if loss > ex["bound"]:
                ex["above"] = ex.get("above", 1) + 1
                ex["below"] = 0
            else:
                ex["below"] = ex.get("below", 0) + 1
            halfway = (ex["before"] + ex["peak"]) / 2
            rank = self._rank_drop(row)
            if rank is not None:
                events += self._collapse_event(
                    ex["step"], step, name, 0.9,
                    f"{name} jumped and {rank[0]} fell to {rank[1]:.0%} of its recent level",
                    {"test": "loss_bound+rank_drop", "rank_series": rank[0],
                     "rank_fraction": f"{rank[1]:.4g}", "bound": f"{ex['bound']:.4g}"},
                )
            elif y < halfway or ex["below"] >= c.recovered_lines:
                events.append(self._event(
                    ex["step"], step, EventKind.LOSS_SPIKE, name, 0.8,
                    f"{name} spiked at step {ex['step']} and recovered",
                    {"test": "loss_bound", "bound": f"{ex['bound']:.4g}",
                     "peak": f"{10 ** abs(ex['peak']) * 1e-10:.4g}", "recovered_lines": str(ex["lines"]),
                     "recovery": "halfway" if y < halfway else "below_bound"},
                ))
                self.excursion = None
            elif ex["above"] >= c.collapse_confirm_lines:
                events += self._collapse_event(
                    ex["step"], step, name, 0.8,
                    f"{name} diverged at step {ex['step']} and has not recovered",
                    {"test": "loss_bound", "bound": f"{ex['bound']:.4g}",
                     "lines_above": str(ex["above"]), "lines": str(ex["lines"] + 1)},
                )
        elif math.isfinite(self.loss_min) and self.loss_min >= 0:
            bound = max(c.collapse_factor * self.loss_min,
                        self.loss_min + c.collapse_margin * abs(self.loss_first))
            if loss > bound:
                self.excursion = {"step": step, "before": self.loss_last_y, "peak": y,
                                  "lines": 0, "bound": bound, "above": 1, "below": 0}
                rank = self._rank_drop(row)
                if rank is not None:
                    events += self._collapse_event(
                        step, step, name, 0.9,
                        f"{name} jumped and {rank[0]} fell to {rank[1]:.0%} of its recent level",
                        {"test": "loss_bound+rank_drop", "rank_series": rank[0],
                         "rank_fraction": f"{rank[1]:.4g}", "bound": f"{bound:.4g}"},
                    )
        if self.excursion is None and self.collapsed_at is None:
            self.loss_min = min(self.loss_min, loss)
            self.loss_last_y = y
        return events

    def _rank_drop(self, row: Mapping[str, float]) -> tuple[str, float] | None:
        for name in self.roles.ranks:
            history = self.rank_recent.get(name)
            value = row.get(name, math.nan)
            if history and len(history) >= 3 and math.isfinite(value):
                level = float(np.median(history))
                if level > 0 and value < self.config.rank_collapse_fraction * level:
                    return name, value / level
        return None

    def _track_ranks(self, row: Mapping[str, float]) -> None:
        if self.excursion is not None:
            return  # keep the pre-excursion level as the reference
        for name in self.roles.ranks:
            value = row.get(name, math.nan)
            if math.isfinite(value):
                history = self.rank_recent.setdefault(name, deque(maxlen=self.config.rank_history))
                history.append(value)

    def _collapse_event(self, located: int, step: int, series: str, confidence: float,
                        message: str, evidence: dict[str, str]) -> list[Event]:
        self.collapsed_at = located
        self.excursion = None
        event = self._event(located, step, EventKind.COLLAPSE_ONSET, series, confidence,
                            message, evidence, Phase.COLLAPSE)
        return [event, *self._enter(Phase.COLLAPSE, located, step, confidence, series)]

    def _memorisation(self, step: int, row: Mapping[str, float]) -> list[Event]:
        if self.memorised_at is not None:
            return []
        c = self.config
        fitted = False
        acc = self.roles.train_acc
        if acc is not None:
            value = row.get(acc, math.nan)
            fitted = math.isfinite(value) and _as_fraction(value) >= c.fitted_accuracy
        elif self.roles.train_loss is not None:
            value = row.get(self.roles.train_loss, math.nan)
            fitted = (math.isfinite(value) and math.isfinite(self.loss_first)
                      and value <= c.fitted_loss_fraction * self.loss_first)
        if fitted:
            self.memorised_at = step
            self.memorised_line = self.lines
            if self.val_recent:
                base = float(np.median(self.val_recent))
                self.val_base = base if self.val_base is None else min(self.val_base, base)
        return []

    def _generalisation(self, step: int, row: Mapping[str, float],
                        detectors: Mapping[str, SeriesDetector],
                        trend_of: Callable[[str], TrendResult | None] | None = None) -> list[Event]:
        name = self.roles.val_acc
        if name is None:
            return []
        value = row.get(name, math.nan)
        if not math.isfinite(value):
            return []
        value = _as_fraction(value)
        c = self.config
        events: list[Event] = []
        if self.val_base is None:
            self.val_first.append(value)
            if len(self.val_first) == self.val_first.maxlen:
                self.val_base = float(np.median(self.val_first))
        self.val_recent.append(value)
        if self.onset_at is None:
            events += self._hidden_progress(step, value, detectors, trend_of)
            if self.val_base is not None and value >= self.val_base + c.onset_rise:
                if self.above_since is None:
                    self.above_since = (step, self.lines)
                if self.lines - self.above_since[1] + 1 >= c.onset_lines:
                    events += self._onset(step, value, name)
            else:
                self.above_since = None
            return events
        # After onset: grokking completes, then stabilises.
        train = row.get(self.roles.train_acc, math.nan) if self.roles.train_acc else 1.0
        train = _as_fraction(train) if math.isfinite(train) else 1.0
        if (not self.grokking and not self.generalised and self.memorised_at is not None
                and self.lines - self.memorised_line >= max(c.grokking_min_lines, self.memorised_line)
                and value >= self.val_base + 2 * c.onset_rise
                and value < c.complete_fraction * train):
            events += self._late_grokking(step, value, name)
        if value >= c.complete_fraction * train:
            self.generalised = True
        if self.grokking and self.complete_at is None and value >= c.complete_fraction * train:
            self.complete_at = step
            events.append(self._event(
                step, step, EventKind.GROKKING_COMPLETE, name, 0.9,
                f"{name} reached {value:.3f}: grokking complete",
                {"test": "threshold", "value": f"{value:.4g}", "train_value": f"{train:.4g}"},
            ))
        if value > self.best_val:
            self.best_val = value
        if self.stable_since is None or value < self.best_val - c.stable_tolerance or (
            self.stable_min < self.best_val - c.stable_tolerance
        ) or self.best_val > self.stable_best + c.stable_tolerance:  # still climbing
            self.stable_since, self.stable_lines, self.stable_min = step, 0, value
            self.stable_best = self.best_val
        self.stable_lines += 1
        self.stable_min = min(self.stable_min, value)
        # Before it generalises, a slow creep must stop for longer to count as stable.
        needed = c.stable_lines if self.generalised else max(c.stable_lines, c.grokking_min_lines)
        if self.stable_at is None and self.stable_lines >= needed:
            self.stable_at = self.stable_since
            events += self._enter(Phase.STABILIZATION, self.stable_since, step, 0.8, name)
        return events

    def _onset(self, step: int, value: float, name: str) -> list[Event]:
        c = self.config
        located = self.above_since[0] if self.above_since else step
        self.onset_at = located
        events: list[Event] = []
        evidence = {"test": "sustained_rise", "baseline": f"{self.val_base:.4g}",
                    "value": f"{value:.4g}", "rise": f"{c.onset_rise:.4g}",
                    "lines": str(c.onset_lines)}
        if self.memorised_at is not None:
            took = self.memorised_at - self.first_step
            waited = located - self.memorised_at
            evidence["memorised_at_step"] = str(self.memorised_at)
            if took > 0 and waited >= c.grokking_delay_ratio * took:
                self.grokking = True
                events.append(self._event(
                    located, step, EventKind.GROKKING_ONSET, name,
                    min(1.0, 0.5 + waited / (4 * took * c.grokking_delay_ratio)),
                    f"grokking started: {name} rising at step {located}, "
                    f"{waited} steps after memorisation",
                    {**evidence, "delay_ratio": f"{waited / took:.3g}"},
                    Phase.ABSTRACTION,
                ))
        return events + self._enter(Phase.ABSTRACTION, located, step, 0.8, name)

    def _late_grokking(self, step: int, value: float, name: str) -> list[Event]:
        """Generalisation that began early but still lags memorisation by the grokking
        delay: grokking, known only now, located at the onset."""
        self.grokking = True
        located = self.onset_at if self.onset_at is not None else step
        waited = step - self.memorised_at
        return [self._event(
            located, step, EventKind.GROKKING_ONSET, name, 0.7,
            f"grokking: {name} has risen slowly since step {located} and is still at "
            f"{value:.3f}, {waited} steps after memorisation",
            {"test": "delayed_generalisation", "baseline": f"{self.val_base:.4g}",
             "value": f"{value:.4g}", "memorised_at_step": str(self.memorised_at),
             "lines_since_memorisation": str(self.lines - self.memorised_line)},
            Phase.ABSTRACTION,
        )]

    def _hidden_progress(self, step: int, value: float,
                         detectors: Mapping[str, SeriesDetector],
                         trend_of: Callable[[str], TrendResult | None] | None = None) -> list[Event]:
        c = self.config
        loss = self.roles.val_loss
        if (self.hidden_progress_at is not None or self.memorised_at is None or loss is None
                or loss not in detectors or self.val_base is None
                or value >= self.val_base + c.onset_rise / 2):
            return []
        det = detectors[loss]
        window = det.config.trend_window
        trend = det.trend if trend_of is None else trend_of(loss)
        if trend is None or self.lines - self.memorised_line < window:
            return []
        change = trend.slope * (window - 1)
        if trend.statistic < 0 and trend.p_value < c.progress_p_value and change < -c.progress_min_change:
            self.hidden_progress_at = step
            return [self._event(
                step, step, EventKind.HIDDEN_PROGRESS, loss, min(1.0, 1 - trend.p_value),
                f"{loss} is falling while {self.roles.val_acc} is flat: a transition may be coming",
                {"test": trend.test, "tau": f"{trend.statistic:.4g}", "p_value": f"{trend.p_value:.3g}",
                 "change_decades": f"{change:.4g}", "window": str(window)},
            )]
        return []

    def _loss_only_phases(self, step: int, series_events: Sequence[Event]) -> list[Event]:
        if self.roles.val_acc is not None:
            return []
        headline = self.roles.val_loss or self.roles.train_loss
        events: list[Event] = []
        for event in series_events:
            if event.series != headline:
                continue
            if event.kind is EventKind.PLATEAU_START and self.lines > 40:
                events += self._enter(Phase.STABILIZATION, event.step, step, 0.6, headline)
            elif (event.kind is EventKind.CHANGE_POINT and event.evidence.get("direction") == "down"
                  and self.phase is Phase.STABILIZATION):
                events += self._enter(Phase.ABSTRACTION, event.step, step, 0.6, headline)
        return events

    # --- phases -------------------------------------------------------------------

    @property
    def phase(self) -> Phase | None:
        return self.boundaries[-1][1] if self.boundaries else None

    def _enter(self, phase: Phase, located: int, step: int, confidence: float,
               series: str) -> list[Event]:
        if self.phase is phase:
            return []
        previous = self.phase
        located = max(located, self.boundaries[-1][0]) if self.boundaries else located
        if self.boundaries and self.boundaries[-1][0] == located:
            self.boundaries[-1] = (located, phase, confidence)
        else:
            self.boundaries.append((located, phase, confidence))
        if len(self.boundaries) > self.config.max_boundaries:
            del self.boundaries[1]
        return [self._event(
            located, step, EventKind.PHASE_CHANGE, series, confidence,
            f"phase {previous.value if previous else 'none'} -> {phase.value} at step {located}",
            {"from": previous.value if previous else "", "to": phase.value}, phase,
        )]

    def current(self) -> tuple[Phase | None, int, float]:
        if not self.boundaries:
            return None, 0, 0.0
        start, phase, confidence = self.boundaries[-1]
        return phase, start, confidence

    def segments(self) -> list[Segment]:
        if not self.boundaries or self.last_step is None:
            return []
        ends = [b[0] for b in self.boundaries[1:]] + [self.last_step + self.last_gap]
        return [Segment(start, end, phase, conf)
                for (start, phase, conf), end in zip(self.boundaries, ends, strict=True)]

    @staticmethod
    def _event(located: int, step: int, kind: EventKind, series: str, confidence: float,
               message: str, evidence: dict[str, str], phase: Phase | None = None) -> Event:
        return Event(step=located, kind=kind, detected_at=step, series=series,
                     confidence=float(confidence), message=message, phase=phase,
                     evidence={**evidence, "detected_at_step": str(step)})


def _as_fraction(value: float) -> float:
    """Accuracy logged in percent is read as a fraction."""
    return value / 100.0 if value > 1.5 else value


def _as_fractions(values: np.ndarray) -> np.ndarray:
    """:func:`_as_fraction` of each value (the same floats)."""
    with np.errstate(invalid="ignore"):
        return np.where(values > 1.5, values / 100.0, values)


def _finite_in(view: LineBlock, name: str, i: int, j: int, with_steps: bool = False):
    """The finite values of series ``name`` on lines ``i .. j - 1`` (with their
    steps if asked), or None when there are none."""
    col = view.column(name)
    if col is None:
        return None
    values, present = col[0][i:j], col[1][i:j]
    keep = present & np.isfinite(values)
    if not keep.any():
        return None
    if with_steps:
        return view.steps[i:j][keep], values[keep]
    return values[keep]


class LineBlock(Protocol):
    """A block of lines as :meth:`PhaseLabeller.update_block` reads it: a row
    (``line`` selects it, read as a mapping of series to value), columns, and
    the trend of a series as of the selected line."""

    line: int
    steps: np.ndarray

    def __getitem__(self, name: str) -> float: ...
    def get(self, name: str, default: float | None = None) -> float | None: ...
    def __contains__(self, name: object) -> bool: ...
    def column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Values on every line (NaN where absent) and where present; None if absent throughout."""
        ...
    def trend_of(self, name: str) -> TrendResult | None: ...
    def trend_due(self, name: str, every: int) -> np.ndarray | None:
        """Per line, the finite count of ``name``'s last trend update (None: no points here)."""
        ...
