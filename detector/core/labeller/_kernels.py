"""Compiled quiet stretches of the labeller's rules (numba), bit for bit their per-line ``update``.

Each rule's ``quiet_run`` (beside its ``update``) hands a stretch of lines to
one kernel here. A kernel walks the lines while the rule's per-line update
would only move its own small state (a band, a sampling interval, running
sums) and stops *before* the first line where it could emit an event, open an
excursion or dip, change the phase or take any other branch; that line goes
through the per-line path. A rule's kernel takes the block's columns, the
stretch (``start, stop``), the state it moves (arrays first, written in place:
it is given copies; then scalars) and what no quiet line changes; it returns
the number of lines taken and the scalars after them, in the order it took
them, so that the rule keeps them as they come for the next stretch
(:class:`~detector.core.labeller.rules._common.Quiet`) and writes them into
its fields only when they are read (or not at all: the labeller first asks
every rule how far it could go, then has each take the shortest of those
stretches).

Exactness, as in :mod:`detector.core._kernels`:

* every formula is the per-line one with its operations in the same order
  (``x += (v - x) / min(n, 10)``, ``value - 2 * last + before``), no fast-math,
  so every float rounds as Python's does;
* Python's ``max(a, b)`` is ``b if b > a else a`` and ``min(a, b)`` is
  ``b if b < a else a`` (which of two equal values is kept shows in a -0.0);
* medians sort a copy with a stable insertion sort, as ``sorted()`` keeps equal
  values (0.0 and -0.0) in their order;
* no logarithm is taken here: the working-scale values of a loss come in
  computed by :func:`detector.core.series.working_scale` itself (libm's
  ``log10``, which numpy's may not match in the last bit).

The logic each kernel copies from its rule is in one place per rule (the
kernel named after it), so a change to a rule's quiet regime is made in the
rule and here. Equality with the per-line path is checked by
tests/test_labeller_bulk.py.
"""

from __future__ import annotations

import math

import numpy as np

from detector.core._kernels import _jit

SQRT_PI = math.sqrt(math.pi)  # generalisation._SQRT_PI
LOWS = 64  # suffix minima the stable stretch keeps (generalisation._LOWS)
SYMLOG_EPS = 1e-10  # series._SYMLOG_EPS

# --- small shared pieces --------------------------------------------------------


@_jit
def _raw_loss(y):  # pragma: no cover - compiled
    """``series.raw_scale(Role.LOSS, y)``: a working-scale loss in its own units."""
    return math.copysign((10.0 ** min(abs(y), 300.0) - 1.0) * SYMLOG_EPS, y)


@_jit
def _sorted_into(values, n, out):  # pragma: no cover - compiled
    """``sorted(values[:n])`` in ``out[:n]`` (a scratch array the caller allocates once
    per kernel call, not once per line): a stable insertion sort (n is at most a
    band's size)."""
    for i in range(n):
        out[i] = values[i]
    for i in range(1, n):
        x = out[i]
        j = i - 1
        while j >= 0 and out[j] > x:
            out[j + 1] = out[j]
            j -= 1
        out[j + 1] = x
    return out


@_jit
def _median(values, n, scratch):  # pragma: no cover - compiled
    """``_common._median`` / ``Band.level``: the middle value, or the mean of the middle
    two (``scratch``: at least n floats, see :func:`_sorted_into`)."""
    ordered = _sorted_into(values, n, scratch)
    if n % 2:
        return ordered[n // 2]
    return 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


@_jit
def _band_noise(first_noise, second_noise, diffs):  # pragma: no cover - compiled
    """``Band.noise``."""
    if diffs >= 2:
        return second_noise if second_noise < first_noise else first_noise
    return first_noise


@_jit
def _band_add(values, n, size, first_noise, second_noise, diffs, value):  # pragma: no cover - compiled
    """``Band.add``: ``values[:n]`` oldest first (in place); returns n and the noise sums."""
    if n > 0:
        diffs += 1
        first_noise += (abs(value - values[n - 1]) - first_noise) / min(diffs, 10)
        if n >= 2 and diffs >= 2:
            second = 0.58 * abs(value - 2 * values[n - 1] + values[n - 2])
            second_noise += (second - second_noise) / min(diffs - 1, 10)
    if n == size:
        for j in range(n - 1):
            values[j] = values[j + 1]
        n -= 1
    values[n] = value
    return n + 1, first_noise, second_noise, diffs


@_jit
def _max(a, b):  # pragma: no cover - compiled
    """Python's ``max(a, b)``, NaN and signed zeros included."""
    return b if b > a else a


@_jit
def _min(a, b):  # pragma: no cover - compiled
    """Python's ``min(a, b)``, NaN and signed zeros included."""
    return b if b < a else a


@_jit
def _see(has_last, last, gap, step):  # pragma: no cover - compiled
    """``Interval.see``."""
    if has_last and step > last:
        gap = step - last
    return True, step, gap


# --- the labeller -----------------------------------------------------------------


@_jit
def line_steps(steps, start, stop, last, gap):  # pragma: no cover - compiled
    """``last_step`` and ``last_gap`` after lines ``start:stop`` (the run has begun)."""
    for i in range(start, stop):
        step = steps[i]
        if step > last:
            gap = step - last
        last = step
    return last, gap


@_jit
def percent_from(train, train_present, val, val_present, start, stop, above):  # pragma: no cover - compiled
    """The first line of ``start:stop`` where either accuracy is logged, finite and
    above ``above`` (``PhaseLabeller._fraction`` switches to percent there); ``stop``
    if none."""
    for i in range(start, stop):
        if train_present[i] and math.isfinite(train[i]) and train[i] > above:
            return i
        if val_present[i] and math.isfinite(val[i]) and val[i] > above:
            return i
    return stop


@_jit
def training_holds(values, present, start, stop, recent, count, best, with_accuracy, quiet,
                   drop):  # pragma: no cover - compiled
    """``train_recent`` / ``train_best`` over lines ``start:stop`` (``recent[:count]``,
    updated in place) and, per line, ``_training_holds()`` after it (``quiet``:
    no loss excursion open, the same on every line). Returns the holds, count and
    best."""
    holds = np.full(stop - start, quiet)
    scratch = np.empty(3)
    for i in range(start, stop):
        value = values[i]
        if present[i] and math.isfinite(value):
            if count == 3:
                recent[0], recent[1] = recent[1], recent[2]
                count = 2
            recent[count] = value
            count += 1
            level = _sorted_into(recent, count, scratch)[count // 2]
            best = level if level > best else best
        if with_accuracy and count > 0:
            holds[i - start] = _sorted_into(recent, count, scratch)[count // 2] >= best - drop
    return holds, count, best


# --- LossExcursions -----------------------------------------------------------------


@_jit
def excursions_quiet(steps, values, ys, present, start, stop, band, run_min, n, first_noise, second_noise,
                     diffs, has_last, last, gap, calm, first, size, log_spike, spike_noise, collapse_factor,
                     collapse_margin, collapse_material, first_step, memorised_steps, recovery_fraction,
                     recovery_memorisation):  # pragma: no cover - compiled
    """``LossExcursions.update`` with no excursion or collapse open, while the loss
    stays in its band: finite, the first loss known, not out (``_threshold``,
    ``_drift_bound``, ``_risen``; ``memorised_steps`` -1 for none). Returns the lines
    taken and the state after them."""
    for i in range(start, stop):
        if not present[i]:
            continue
        value = values[i]
        if not math.isfinite(value) or math.isnan(first):
            return i - start, run_min, n, first_noise, second_noise, diffs, has_last, last, gap, calm
        y = ys[i]
        noise = spike_noise * _band_noise(first_noise, second_noise, diffs)
        thr = noise if noise > log_spike else log_spike
        if not math.isfinite(run_min) or run_min < 0:
            bound = math.inf
        else:
            slow, margin = collapse_factor * run_min, run_min + collapse_margin * abs(first)
            bound = margin if margin > slow else slow
        out = value > bound
        if not out and n >= 3:
            out = y > band[n - 1] + thr
            if not out:
                # _risen's creep: the line the run's time scale back, in intervals counted
                # with this line seen (as update's interval.see does first)
                scale = recovery_fraction * (steps[i] - first_step)
                if memorised_steps > 0 and recovery_memorisation * memorised_steps < scale:
                    scale = recovery_memorisation * memorised_steps
                back = min(int(math.ceil(scale)) // _see(has_last, last, gap, steps[i])[2], n, calm)
                if back >= 2 and y > band[n - back] + thr:
                    out = value - _raw_loss(band[n - back]) >= collapse_material * abs(first)
        if out:
            return i - start, run_min, n, first_noise, second_noise, diffs, has_last, last, gap, calm
        has_last, last, gap = _see(has_last, last, gap, steps[i])
        n, first_noise, second_noise, diffs = _band_add(band, n, size, first_noise, second_noise, diffs, y)
        calm += 1
        run_min = value if value < run_min else run_min
    return stop - start, run_min, n, first_noise, second_noise, diffs, has_last, last, gap, calm


@_jit
def _back(value, y, bound, ref, thr, peak_value, ref_value, first,
          back_fraction, slack):  # pragma: no cover - compiled
    """``LossExcursions._back`` (``slack``: the staying allowance, 0.0 when not back)."""
    if not math.isfinite(value) or value > bound:
        return False
    if y <= ref + thr + slack:
        return True
    peak = peak_value if math.isfinite(peak_value) else math.inf
    top = _min(peak, _max(abs(first), ref_value))
    return top > ref_value and value <= ref_value + back_fraction * (top - ref_value)


@_jit
def _recovering(y, peak, ref, thr, left, step, began, horizon, extension):  # pragma: no cover - compiled
    """``LossExcursions._recovering`` and the extension's time limit."""
    top = ref + thr
    return (math.isfinite(y) and math.isfinite(peak) and peak > top and y <= top + left * (peak - top)
            and step - began < extension * horizon)


@_jit
def _back_since(has_last, last, gap, step):  # pragma: no cover - compiled
    """``LossExcursions._back_since``: halfway from the line before ``step``."""
    return step - _see(has_last, last, gap, step)[2] // 2


@_jit
def excursions_open_quiet(steps, values, ys, present, start, stop, peak, peak_value, last_y, low_y, has_back,
                          back_at, has_last, last, gap, first, in_collapse, began, ref, ref_value, thr, bound,
                          horizon, settle, back_fraction, slack, left, extension,
                          material):  # pragma: no cover - compiled
    """``LossExcursions.update`` with an excursion open (``in_collapse`` False) while it
    neither ends (a spike, a collapse, a band that starts again) nor learns its
    level, or with a collapse open while it does not end: ``began`` the
    excursion's first step, ``has_back``/``back_at`` its ``back_at`` (a collapse's
    ``back_since``); ``slack`` its staying allowance; ``left`` 1 - ``recovering_fraction`` and ``extension``
    ``recovery_extension`` (an excursion still out past the horizon but on its way
    back, ``LossExcursions._recovering``, goes on); the other arguments its fields
    of the same names. Returns the lines taken and the state after them."""
    taken = stop - start
    for i in range(start, stop):
        if not present[i]:
            continue
        value = values[i]
        finite = math.isfinite(value)
        y = ys[i] if finite else math.inf
        if finite and math.isnan(first):
            taken = i - start
            break  # the run's first loss: learnt on the per-line path
        step = steps[i]
        if in_collapse:
            if math.isnan(ref) or not _back(value, y, bound, ref, thr, peak_value, ref_value, first,
                                             back_fraction, slack if has_back else 0.0):
                has_back = False
            else:
                since = back_at if has_back else _back_since(has_last, last, gap, step)
                if step - since >= horizon:
                    taken = i - start
                    break  # the collapse ends
                has_back, back_at = True, since
            has_last, last, gap = _see(has_last, last, gap, step)
            continue
        if math.isnan(ref) and math.isfinite(y):
            taken = i - start
            break  # the level it left is learnt
        jumped = not finite
        if has_back and not jumped and y > low_y + thr:  # LossExcursions._bounced
            jumped = value - _raw_loss(low_y) >= material * abs(first)
        new_peak, new_peak_value = peak, peak_value
        if y > peak or not finite:
            new_peak = _max(peak, y)
            new_peak_value = value if not math.isfinite(peak_value) or not finite else _max(peak_value, value)
        back = _back(value, y, bound, ref, thr, new_peak_value, ref_value, first, back_fraction,
                     slack if has_back else 0.0)
        new_has_back, new_back_at = has_back, back_at
        if has_back:
            if jumped or not back:
                new_has_back = False  # bounced: out again
                if step - began >= horizon and not _recovering(y, new_peak, ref, thr, left, step, began,
                                                               horizon, extension):
                    taken = i - start
                    break  # a collapse, or a lasting shift
            elif step - back_at >= settle:
                taken = i - start
                break  # a spike
            else:
                low_y = _min(low_y, y)
        elif not math.isnan(ref) and back:
            if settle <= 0:
                taken = i - start
                break  # a spike at once
            new_has_back, new_back_at = True, _back_since(has_last, last, gap, step)
            low_y = y
        elif step - began >= horizon and not _recovering(y, new_peak, ref, thr, left, step, began, horizon,
                                                         extension):
            taken = i - start
            break  # a collapse, or a lasting shift
        peak, peak_value, last_y = new_peak, new_peak_value, y
        has_back, back_at = new_has_back, new_back_at
        has_last, last, gap = _see(has_last, last, gap, step)
    return taken, peak, peak_value, last_y, low_y, has_back, back_at, has_last, last, gap


# --- GeneralisationCollapse ----------------------------------------------------------


@_jit
def generalisation_collapse_quiet(steps, values, present, holds, start, stop, band, generalised, high, fresh,
                                  n, first_noise, second_noise, diffs, has_last, last, gap, has_dip, dip_new,
                                  dip_start, dip_ref, dip_thr, dip_low, size, drop, spike_noise, grokked,
                                  min_intervals):  # pragma: no cover - compiled
    """``GeneralisationCollapse.update`` with no collapse open, while none opens
    (``holds[i - start]``: training holds on line i): a dip (``has_dip``, its
    ``start``, ``ref``, ``thr`` and ``low`` as ``dip_*``; ``dip_new``: opened
    here, not the one the rule held) may open, go on or end
    back in time (or with training falling too); the line where one has lasted
    ``min_intervals`` intervals (a collapse) is left to the per-line path.
    Returns the lines taken and the state after them."""
    scratch = np.empty(len(band))
    for i in range(start, stop):
        value = values[i]
        if not present[i] or not math.isfinite(value):
            continue
        holding = holds[i - start]
        step = steps[i]
        seen, new_last, new_gap = _see(has_last, last, gap, step)
        if has_dip:
            if value >= dip_ref - dip_thr / 2 or not holding:
                has_dip = False  # back in time, or training fell too
                has_last, last, gap = seen, new_last, new_gap
                if holding:
                    n, first_noise, second_noise, diffs = _band_add(band, n, size, first_noise, second_noise,
                                                                    diffs, value)
                    if generalised and fresh < size:
                        fresh += 1
                continue
            if step - dip_start >= min_intervals * new_gap:
                return (i - start, generalised, high, fresh, n, first_noise, second_noise, diffs, has_last,
                        last, gap, has_dip, dip_new, dip_start, dip_ref, dip_thr, dip_low)  # a collapse
            dip_low = _min(dip_low, value)
            has_last, last, gap = seen, new_last, new_gap
            continue
        noise = spike_noise * _band_noise(first_noise, second_noise, diffs) if diffs >= 2 else 0.0
        thr = noise if noise > drop else drop
        has_last, last, gap = seen, new_last, new_gap
        if generalised and n >= 3 and holding and value < high - thr:
            has_dip, dip_new, dip_start, dip_ref, dip_thr, dip_low = True, True, step, high, thr, value
            continue
        if holding:
            n, first_noise, second_noise, diffs = _band_add(band, n, size, first_noise, second_noise, diffs,
                                                            value)
            if generalised:
                if fresh < size:
                    fresh += 1
                if n >= 3:
                    count = fresh if fresh < n else n
                    level = _median(band[n - count:n], count, scratch)
                    high = level if level > high else high
        if value >= grokked and not generalised:
            generalised = True
            fresh = 1 if holding else 0
            first_noise, second_noise, diffs = 0.0, 0.0, 0
    return (stop - start, generalised, high, fresh, n, first_noise, second_noise, diffs, has_last, last, gap,
            has_dip, dip_new, dip_start, dip_ref, dip_thr, dip_low)


@_jit
def generalisation_collapse_open_quiet(steps, values, present, start, stop, low, has_back, back_since,
                                       has_last, last, gap, ref, thr,
                                       min_intervals):  # pragma: no cover - compiled
    """``GeneralisationCollapse.update`` with a collapse open while it does not end
    (back within half the drop for ``min_intervals`` intervals). Returns the lines
    taken and the state after them."""
    for i in range(start, stop):
        value = values[i]
        if not present[i] or not math.isfinite(value):
            continue
        step = steps[i]
        seen, new_last, new_gap = _see(has_last, last, gap, step)
        if value < ref - thr / 2:
            has_back = False
            low = _min(low, value)
        else:
            since = back_since if has_back else step
            if step - since >= min_intervals * new_gap:
                return i - start, low, has_back, back_since, has_last, last, gap
            has_back, back_since = True, since
        has_last, last, gap = seen, new_last, new_gap
    return stop - start, low, has_back, back_since, has_last, last, gap


# --- Generalisation ------------------------------------------------------------------


@_jit
def memorisation_quiet(train_acc, acc_present, train_loss, loss_present, start, stop, first_loss,
                       fitted_accuracy, fitted_loss_fraction, steps, by_loss, loss_ws, first_step, settle,
                       delay, starts, sums, counts, n, width, capacity,
                       levels):  # pragma: no cover - compiled
    """``Generalisation.memorisation`` before memorisation: the lines before the
    first that fits or whose training accuracy (``by_loss``: training loss,
    ``loss_ws`` not NaN) opens a bin of the history (``starts``, ``sums``,
    ``counts``: copies, ``n`` bins, written here) where ``Generalisation._levelled``
    tests it (``settle`` × the steps since ``first_step`` ≥ ``delay``). Bins that
    open before that only change the history (:func:`history_take`). ``levels``
    False: no history is kept."""
    for i in range(start, stop):
        loss = train_loss[i]
        usable, value = _training_value(train_acc, acc_present, loss_ws, by_loss, i)
        if usable and levels:
            opened, n, width = _history_add(starts, sums, counts, n, width, capacity, steps[i], value)
            if opened and settle * (steps[i] - first_step) >= delay:
                return i - start
        if acc_present[i]:
            acc = train_acc[i]
            loss_ok = (not loss_present[i] or not math.isfinite(loss) or math.isnan(first_loss)
                       or loss <= 0.5 * first_loss)
            fitted = math.isfinite(acc) and acc >= fitted_accuracy and loss_ok
        else:
            fitted = (loss_present[i] and math.isfinite(loss) and math.isfinite(first_loss)
                      and loss <= fitted_loss_fraction * first_loss)
        if fitted:
            return i - start
    return stop - start


@_jit
def _stack_bound(steps_, next_, count, keep, dropped, has_floor, floor, step):  # pragma: no cover - compiled
    """Where a suffix stack's remembered stretch begins once the newest line is in."""
    if dropped:
        return step if count == 1 else next_[0]
    if has_floor:
        return floor
    return steps_[0] if keep > 0 else step


@_jit
def _stable_since(lows_step, lows_value, lows_next, count, has_floor, floor, highs_step, highs_value,
                  highs_next, h_count, h_has_floor, h_floor, step, value, level, level_step,
                  tol):  # pragma: no cover - compiled
    """``Generalisation._stable_since(tol)`` on the suffix minima and maxima as
    ``Generalisation._remember(step, value, level, level_step)`` would leave them,
    without changing them: the same walk, newest first (a low before a high of the
    same step). Returns (found, since)."""
    keep = count
    while keep > 0 and lows_value[keep - 1] >= value:
        keep -= 1
    h_keep = h_count
    while h_keep > 0 and highs_value[h_keep - 1] <= level:
        h_keep -= 1
    dropped = keep + 1 > LOWS
    h_dropped = h_keep + 1 > LOWS
    lowest = 1 if dropped else 0
    h_lowest = 1 if h_dropped else 0
    # Index keep (h_keep) is the line's own entry, pushed last: its next step is None (-1).
    i, j = keep, h_keep
    top, bottom = -math.inf, math.inf
    while i >= lowest or j >= h_lowest:
        low_at = step if i == keep else lows_step[i]
        if j < h_lowest or (i >= lowest and low_at >= (level_step if j == h_keep else highs_step[j])):
            at = low_at
            if i == keep:
                following, v = -1, value
            else:
                # _remember set the old newest entry's next step to this line's
                following = step if i == count - 1 else lows_next[i]
                v = lows_value[i]
            bottom = v if v < bottom else bottom
            i -= 1
        else:
            if j == h_keep:
                at, following, v = level_step, -1, level
            else:
                at = highs_step[j]
                following = level_step if j == h_count - 1 else highs_next[j]
                v = highs_value[j]
            top = v if v > top else top
            j -= 1
        if top - bottom > tol:
            if following < 0:
                return False, 0
            return True, at + (following - at + 1) // 2
    low_bound = _stack_bound(lows_step, lows_next, count, keep, dropped, has_floor, floor, step)
    high_bound = _stack_bound(highs_step, highs_next, h_count, h_keep, h_dropped, h_has_floor, h_floor,
                              level_step)
    return True, low_bound if low_bound > high_bound else high_bound


@_jit
def _remember(steps_, values, next_, count, has_floor, floor, step, value,
              lowest):  # pragma: no cover - compiled
    """``generalisation._push_suffix`` on arrays of capacity LOWS + 1 (in place),
    for minima (``lowest``) or maxima; returns the count and the floor."""
    if count > 0:
        next_[count - 1] = step
    while count > 0 and (values[count - 1] >= value if lowest else values[count - 1] <= value):
        count -= 1
    steps_[count], values[count], next_[count] = step, value, -1
    count += 1
    if count > LOWS:
        has_floor, floor = True, next_[0]
        for j in range(count - 1):
            steps_[j], values[j], next_[j] = steps_[j + 1], values[j + 1], next_[j + 1]
        count -= 1
    return count, has_floor, floor


@_jit
def _history_add(starts, sums, counts, n, width, capacity, step, value):  # pragma: no cover - compiled
    """``StepHistory.add`` on arrays of ``capacity + 1`` (in place, ``n`` bins):
    returns whether a bin opened, the bins and the width after."""
    w = width if width > 0 else 1
    if n > 0 and step < starts[n - 1] + w:
        sums[n - 1] += value
        counts[n - 1] += 1
        return False, n, width
    starts[n], sums[n], counts[n] = step - step % w, value, 1
    n += 1
    while starts[n - 1] - starts[0] >= capacity * w:  # StepHistory._regrid
        w *= 2
        m = 0
        for j in range(n):
            cell = starts[j] - starts[j] % w
            if m > 0 and starts[m - 1] == cell:
                sums[m - 1] += sums[j]
                counts[m - 1] += counts[j]
            else:
                starts[m], sums[m], counts[m] = cell, sums[j], counts[j]
                m += 1
        n = m
    return True, n, w


@_jit
def onset_rise_of(low, rise, headroom, tolerance, grokked):  # pragma: no cover - compiled
    """``Generalisation._onset_rise``."""
    if low >= grokked:
        return -tolerance  # generalised when the log began: holding its level is the onset
    share = headroom * (1.0 - low)
    share = share if share > 2 * tolerance else 2 * tolerance
    return rise if rise < share else share


@_jit
def history_take(steps, train_acc, acc_present, loss_ws, by_loss, start, stop, starts, sums, counts, n, width,
                 capacity):  # pragma: no cover - compiled
    """``Generalisation.memorisation_take``: every usable value of lines ``start:stop``
    (``-train_acc`` where present and finite, or ``loss_ws`` where not NaN) into the
    history (arrays of ``capacity + 1``, in place), as ``StepHistory.add`` one at a
    time. Returns the bins and the width after."""
    for i in range(start, stop):
        usable, value = _training_value(train_acc, acc_present, loss_ws, by_loss, i)
        if usable:
            _, n, width = _history_add(starts, sums, counts, n, width, capacity, steps[i], value)
    return n, width


@_jit
def _training_value(train_acc, acc_present, loss_ws, by_loss, i):  # pragma: no cover - compiled
    """Whether line ``i`` adds to the training metric's history, and what: its
    accuracy negated where present and finite, or (``by_loss``) its loss's working
    scale where not NaN (``Generalisation.memorisation``)."""
    if by_loss:
        return not math.isnan(loss_ws[i]), loss_ws[i]
    return acc_present[i] and math.isfinite(train_acc[i]), -train_acc[i]


@_jit
def _no_hidden_progress(starts, sums, counts, n, step, memorised_at, first_step, delay, min_bins, min_change,
                        min_share):  # pragma: no cover - compiled
    """``Generalisation._hidden_progress`` once a bin has opened, up to its
    Mann–Kendall test: True where it surely returns nothing (False: the test
    runs, on the per-line path; also where a mean is not finite)."""
    took = memorised_at - first_step
    if step - memorised_at < (took if took > delay else delay):
        return True
    if n < min_bins:
        return True
    peak, top = 0, sums[0] / counts[0]
    for j in range(n):
        mean = sums[j] / counts[j]
        if not math.isfinite(mean):
            return False
        if mean > top:
            peak, top = j, mean
    last = sums[n - 1] / counts[n - 1]
    change = last - sums[peak] / counts[peak]
    if n - peak < min_bins or change > -min_change:
        return True
    if step - starts[peak] < min_share * (step - memorised_at):
        return True
    quarter = max(1, (n - peak) // 4)
    lowest, head = math.inf, math.inf
    for j in range(peak, n):
        mean = sums[j] / counts[j]
        lowest = mean if mean < lowest else lowest
        if j < n - quarter:
            head = mean if mean < head else head
    return last > lowest or head - last < min_change / 4


@_jit
def _take_history_line(starts, sums, counts, t_starts, t_sums, t_counts, bins, width, opened, new_bins,
                       new_width, add_loss, y):  # pragma: no cover - compiled
    """Write a taken line into the hidden-progress history: the bins it opened (and
    merged) from their copies, or its value ``y`` into the open bin. Returns the
    history's bin count and width after it."""
    if opened:
        starts[:new_bins], sums[:new_bins], counts[:new_bins] = (
            t_starts[:new_bins], t_sums[:new_bins], t_counts[:new_bins])
        return new_bins, new_width
    if add_loss:
        sums[bins - 1] += y
        counts[bins - 1] += 1
    return bins, width


@_jit
def generalisation_quiet(steps, acc, acc_present, loss_ws, loss_present, first_step, stabilised, steady,
                         start, stop,
                         starts, sums, counts, recent, window, lows_step, lows_value, lows_next, highs_step,
                         highs_value, highs_next, a_starts, a_sums, a_counts, bins, width, a_bins, a_width,
                         has_last, last, gap, recent_n, window_n, curv_near, curv_wide, noise, val_step,
                         val_fall, has_above, above, best, lows_n, has_floor, floor, highs_n, has_hfloor,
                         hfloor, gate_first, has_onset, onset, has_complete, has_base, base, progressing,
                         memorised_at, has_memorised, has_level, level_at, has_first, first_acc,
                         stable_best, onset_rise, onset_headroom, grokked, min_intervals, stable_tolerance,
                         stable_fraction,
                         capacity, delay, min_bins, min_change, min_share):  # pragma: no cover - compiled
    """``Generalisation.update`` while it only moves its state: a held-out loss that
    adds to the hidden-progress history without a test that could find it (the
    Mann–Kendall test is left to the per-line path), a held-out accuracy past its
    first three values that neither completes an onset nor reaches
    ``grokked_accuracy`` for the first time nor enters or leaves stabilisation.
    ``loss_ws``: the held-out loss on the working scale, NaN where not finite;
    ``starts``, ``sums``, ``counts``: the history's bins (``bins`` of them) in
    arrays of ``capacity + 1``; ``a_*`` the held-out accuracy's history
    (-log10 of it) alike, ``first_acc`` its first value. The arrays ``starts`` … ``counts``, ``recent``,
    ``window``, ``lows_*`` are updated in place (the caller passes copies).
    Returns the lines taken and the scalar state after them."""
    taken = stop - start
    t_starts, t_sums, t_counts = starts.copy(), sums.copy(), counts.copy()
    ta_starts, ta_sums, ta_counts = a_starts.copy(), a_sums.copy(), a_counts.copy()
    scratch = np.empty(3)
    for i in range(start, stop):
        step = steps[i]
        add_loss = progressing and loss_present[i] and not math.isnan(loss_ws[i])
        opened, new_bins, new_width = False, bins, width
        if add_loss and not (bins > 0 and step < starts[bins - 1] + width):
            # A bin opens (and bins may merge): on copies until the line is taken.
            t_starts[:bins], t_sums[:bins], t_counts[:bins] = starts[:bins], sums[:bins], counts[:bins]
            opened, new_bins, new_width = _history_add(t_starts, t_sums, t_counts, bins, width, capacity,
                                                       step, loss_ws[i])
            if not _no_hidden_progress(t_starts, t_sums, t_counts, new_bins, step, memorised_at, first_step,
                                       delay, min_bins, min_change, min_share):
                taken = i - start  # the hidden-progress test runs
                break
        value = acc[i]
        if not acc_present[i] or not math.isfinite(value):
            bins, width = _take_history_line(starts, sums, counts, t_starts, t_sums, t_counts, bins, width,
                                             opened, new_bins, new_width, add_loss, loss_ws[i])
            continue
        if gate_first:
            taken = i - start  # one of the first three values: the early level moves
            break
        # The accuracy's hidden-progress history (Generalisation._hidden_progress_in_accuracy).
        add_acc = progressing and value > 0
        a_y = -math.log10(value) if add_acc else 0.0
        a_opened, a_new_bins, a_new_width = False, a_bins, a_width
        if add_acc and not (a_bins > 0 and step < a_starts[a_bins - 1] + a_width):
            ta_starts[:a_bins], ta_sums[:a_bins], ta_counts[:a_bins] = (
                a_starts[:a_bins], a_sums[:a_bins], a_counts[:a_bins])
            a_opened, a_new_bins, a_new_width = _history_add(ta_starts, ta_sums, ta_counts, a_bins, a_width,
                                                             capacity, step, a_y)
            if (has_first and 10 ** -(ta_sums[a_new_bins - 1] / ta_counts[a_new_bins - 1]) > first_acc
                    and not _no_hidden_progress(ta_starts, ta_sums, ta_counts, a_new_bins, step, memorised_at,
                                                first_step, delay, min_bins, min_change, min_share)):
                taken = i - start  # the hidden-progress test runs
                break
        new_last, new_gap = step, (step - last if has_last and step > last else gap)
        # The line's values, before anything is written.
        r0, r1, r2 = recent[0], recent[1], recent[2]
        if recent_n == 3:
            recent[0], recent[1] = r1, r2
            recent[2] = value
            new_recent_n = 3
        else:
            recent[recent_n] = value
            new_recent_n = recent_n + 1
        # The three-line median is the level at the middle line (Generalisation.level_step).
        level_step = last if new_recent_n == 3 and has_last else step
        new_window_n = (window_n + 1 if window_n < 7 else 7) if steady else window_n
        new_step, new_fall = val_step, val_fall
        if window_n > 0 and steady:
            change = abs(value - window[window_n - 1])
            if change > 0 and (new_step == 0 or change < new_step):
                new_step = change
            fall = window[window_n - 1] - value
            if math.isfinite(fall):
                new_fall += ((fall if fall > 0 else 0.0) - new_fall) / 10
        new_near, new_wide, new_noise = curv_near, curv_wide, noise
        if new_window_n == 7 and steady:
            off = 1 if window_n == 7 else 0
            v0, v2, v3 = window[off], window[off + 2], window[off + 3]
            v4, v5, v6 = window[off + 4], window[off + 5], value
            near, wide = v6 - 3 * v5 + 3 * v4 - v3, v6 - 3 * v4 + 3 * v2 - v0
            if math.isfinite(near * near + wide * wide):
                new_near += (near * near - new_near) / 10
                new_wide += (wide * wide - new_wide) / 10
                spread = 64 * new_near - new_wide
                new_noise = math.sqrt((spread if spread > 0.0 else 0.0) / 1260)
                falls = SQRT_PI * new_fall
                new_noise = falls if falls < new_noise else new_noise
        hold = min_intervals * new_gap
        new_above, has_new_above = above, has_above
        new_best = best
        if not has_onset:
            if has_base and new_recent_n == 3 and _median(recent, 3, scratch) < base:
                recent[0], recent[1], recent[2] = r0, r1, r2
                taken = i - start  # the early level falls
                break
            if has_base and value >= base + onset_rise_of(base, onset_rise, onset_headroom,
                                                          stable_tolerance, grokked):
                if not has_above:
                    new_above, has_new_above = step, True
                if step - new_above >= hold:
                    recent[0], recent[1], recent[2] = r0, r1, r2
                    taken = i - start  # onset
                    break
                if not has_above:  # a new candidate onset: the stable stretch starts no earlier
                    lows_n, has_floor, floor = 0, False, 0
                    highs_n, has_hfloor, hfloor = 0, False, 0
                lows_n, has_floor, floor = _remember(lows_step, lows_value, lows_next, lows_n, has_floor,
                                                     floor, step, value, True)
                highs_n, has_hfloor, hfloor = _remember(highs_step, highs_value, highs_next, highs_n,
                                                        has_hfloor, hfloor, level_step,
                                                        _median(recent, new_recent_n, scratch), False)
            else:
                has_new_above = False
        else:
            if not has_complete and value >= grokked:
                recent[0], recent[1], recent[2] = r0, r1, r2
                taken = i - start  # grokking's threshold
                break
            five = 5 * new_noise
            tol = five if five > stable_tolerance else stable_tolerance
            resolution = 1.5 * new_step
            cap = 2 * stable_tolerance
            resolution = cap if cap < resolution else resolution
            tol = resolution if resolution > tol else tol
            level = _median(recent, new_recent_n, scratch)
            new_best = level if level > best else best
            if stabilised:
                leaves = new_best > stable_best + 2 * tol
            else:
                found, since = _stable_since(lows_step, lows_value, lows_next, lows_n, has_floor, floor,
                                             highs_step, highs_value, highs_next, highs_n, has_hfloor, hfloor,
                                             step, value, level, level_step, tol)
                leaves = False
                if found:
                    if new_best >= grokked:
                        span = stable_fraction * (since - onset)
                    else:
                        # Generalisation._fitted
                        if has_memorised:
                            fitted = memorised_at - first_step
                        elif has_level:
                            fitted = level_at - first_step
                        else:
                            fitted = step - first_step
                        early = since - first_step
                        span = 4 * stable_fraction * (early if early > fitted else fitted)
                    lines = (min_intervals - 0.5) * new_gap
                    needed = span if span > lines else lines
                    leaves = step - since >= needed
            if leaves:
                recent[0], recent[1], recent[2] = r0, r1, r2
                taken = i - start  # enters or leaves stabilisation
                break
            lows_n, has_floor, floor = _remember(lows_step, lows_value, lows_next, lows_n, has_floor,
                                                 floor, step, value, True)
            highs_n, has_hfloor, hfloor = _remember(highs_step, highs_value, highs_next, highs_n,
                                                    has_hfloor, hfloor, level_step, level, False)
        # The line is taken: write its state.
        bins, width = _take_history_line(starts, sums, counts, t_starts, t_sums, t_counts, bins, width,
                                         opened, new_bins, new_width, add_loss, loss_ws[i])
        a_bins, a_width = _take_history_line(a_starts, a_sums, a_counts, ta_starts, ta_sums, ta_counts,
                                             a_bins, a_width, a_opened, a_new_bins, a_new_width, add_acc, a_y)
        has_last, last, gap = True, new_last, new_gap
        recent_n = new_recent_n
        if steady:  # a loss spike's line is not the held-out accuracy's noise (Generalisation.update)
            if window_n == 7:
                for j in range(6):
                    window[j] = window[j + 1]
                window[6] = value
            else:
                window[window_n] = value
        window_n = new_window_n
        curv_near, curv_wide, noise, val_step, val_fall = new_near, new_wide, new_noise, new_step, new_fall
        has_above, above = has_new_above, new_above
        best = new_best
    return (taken, bins, width, a_bins, a_width, has_last, last, gap, recent_n, window_n, curv_near,
            curv_wide, noise, val_step, val_fall, has_above, above, best, lows_n, has_floor, floor, highs_n,
            has_hfloor, hfloor)


# --- LossOnlyPhases --------------------------------------------------------------------


@_jit
def loss_only_quiet(steps, values, ys, present, train_ys, with_train, start, stop, t_starts, t_sums, t_counts,
                    bin_sum, bin_count, has_last, last, gap, t_bins, t_width, bins, bin_start, width,
                    capacity):  # pragma: no cover - compiled
    """``LossOnlyPhases.update`` while the loss opens no step bin (where the phase is
    decided): with ``with_train``, ``train_ys`` the training loss's working scale
    (NaN where absent or not finite) goes into its history ``t_*`` (``t_bins``
    bins, in place; not read otherwise). Returns the lines taken and the state
    after them."""
    for i in range(start, stop):
        step = steps[i]
        headline = present[i] and math.isfinite(values[i])
        if headline and not (bins > 0 and step < bin_start + width):
            return (i - start, bin_sum, bin_count, has_last, last, gap, t_bins, t_width)
        if with_train and not math.isnan(train_ys[i]):
            _, t_bins, t_width = _history_add(t_starts, t_sums, t_counts, t_bins, t_width, capacity, step,
                                              train_ys[i])
        if not headline:
            continue
        has_last, last, gap = _see(has_last, last, gap, step)
        bin_sum += ys[i]
        bin_count += 1
    return stop - start, bin_sum, bin_count, has_last, last, gap, t_bins, t_width
