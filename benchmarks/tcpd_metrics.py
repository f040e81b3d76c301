"""F1 and Cover for change-point detection, as defined by the TCPD benchmark.

The definitions are those of G. J. J. van den Burg and C. K. I. Williams,
"An Evaluation of Change Point Detection Algorithms", arXiv:2003.06222 (2020),
Section 4 ("Evaluation"), as implemented by the benchmark's own scoring code
(TCPDBench, ``analysis/scripts/metrics.py`` and ``summarize.py``). This module
is an independent implementation of those definitions; the unit tests check
it against the benchmark's worked examples and against its published
per-series scores.

Conventions
-----------
* A change point at index ``t`` (0-based) means that observation ``t`` is the
  first observation of a new segment. TCPD annotations use this convention.
* Index 0 is always counted as a change point, both in every annotator's set
  and in the predicted set (the start of the series is trivially "detected";
  this makes both metrics well defined when nobody marks a change).
* Predictions are cleaned as the benchmark does before scoring
  (:func:`clean_predictions`): duplicates are dropped, and so is any index
  outside ``1 <= t <= n_obs - 2`` (several methods report the two end points,
  which carry no information).

F1 (margin M = 5)
-----------------
Let ``T_k`` be the change points of annotator ``k`` (``k = 1..K``, each with 0
added), ``T* = union_k T_k`` and ``X`` the predicted change points (with 0
added). ``TP(T, X)`` is the set of true points ``tau`` in ``T`` matched to a
prediction within ``|tau - x| <= M``, each prediction matching at most one true
point (greedy: every true point in turn takes the closest prediction not yet
taken, ties to the earlier index; see "Matching order" below). Then

    P = |TP(T*, X)| / |X|
    R = (1/K) * sum_k |TP(T_k, X)| / |T_k|
    F1 = 2 P R / (P + R)

Precision is computed against the union of the annotations (a prediction is
right if some annotator marked a change near it); recall is averaged over the
annotators.

Cover
-----
A set of change points partitions ``{0, ..., n_obs - 1}`` into segments. The
covering of the ground-truth partition ``G`` by the predicted partition ``G'``
(Arbelaez et al., 2011, eq. 8) is

    C(G', G) = (1/n_obs) * sum_{A in G} |A| * max_{A' in G'} J(A, A')

with ``J`` the Jaccard index ``|A n A'| / |A u A'|``. The score of a prediction
is the mean of ``C(G', G_k)`` over the annotators ``k``.

Matching order
--------------
The greedy matching depends on the order in which true points are visited,
and a different order can change a series' F1 (by up to ~0.15 in rare cases
where two true points compete for one prediction and a second prediction is in
reach of one of them). TCPDBench visits them in the iteration order of the
Python ``set`` in which it collects them. ``order="benchmark"`` (the default)
builds those sets the same way (per annotator: the annotated indices, then 0;
the union: annotator by annotator, each in its set's order) and visits them in
CPython's set iteration order, which is deterministic for ints: this is what
reproduces the published scores. ``order="ascending"`` visits them in
ascending order instead (independent of the interpreter). Scores with no
predicted change point (the benchmark's ``zero`` method) never depend on the
order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

__all__ = [
    "DEFAULT_MARGIN",
    "F1Score",
    "MatchOrder",
    "clean_predictions",
    "cover_single",
    "covering",
    "f_measure",
    "partition_from_change_points",
    "true_positives",
]

DEFAULT_MARGIN = 5
"""The benchmark's margin of error, in observations, for F1."""

Annotations = Mapping[str, Iterable[int]]
"""Annotator id -> that annotator's change points (0-based indices)."""

Segment = tuple[int, int]
"""A segment as a half-open index range ``[start, stop)``."""

MatchOrder = Literal["benchmark", "ascending"]
"""Order in which F1 visits the true change points (see the module docstring)."""


@dataclass(frozen=True)
class F1Score:
    """F1 with the precision and recall it combines."""

    f1: float
    precision: float
    recall: float


def clean_predictions(locations: Iterable[int], n_obs: int) -> list[int]:
    """Deduplicate and sort predicted change points, keeping ``1 <= t <= n_obs - 2``.

    This is the benchmark's cleaning of every method's output before scoring:
    index 0 and index ``n_obs - 1`` are valid end points that several methods
    report by default, so they are dropped, as is anything out of range.

    >>> clean_predictions([7, 0, 3, 3, 9, 12], 10)
    [3, 7]
    """
    return sorted({int(t) for t in locations if 1 <= int(t) < n_obs - 1})


def true_positives(
    true_cps: Iterable[int], predicted: Iterable[int], margin: int = DEFAULT_MARGIN
) -> set[int]:
    """True change points matched by a prediction within ``margin``.

    The true points are visited in the order ``true_cps`` yields them (repeats
    ignored); each takes the closest prediction within ``margin`` that no
    earlier true point has taken (ties go to the earlier prediction), so a
    prediction is counted at most once.

    >>> sorted(true_positives([1, 10, 20, 23], {3, 8, 20}))
    [1, 10, 20]
    >>> sorted(true_positives([1, 10, 20, 23], {1, 3, 5, 8, 20}))
    [1, 10, 20]
    >>> true_positives([], {1, 2, 3})
    set()
    >>> sorted(true_positives([10, 14], {12, 17})), sorted(true_positives([14, 10], {12, 17}))
    ([10, 14], [14])
    """
    available = sorted(set(predicted))
    matched: set[int] = set()
    for tau in true_cps:
        if tau in matched:
            continue
        best: int | None = None
        for x in available:
            d = abs(tau - x)
            if d <= margin and (best is None or d < abs(tau - best)):
                best = x
        if best is not None:
            matched.add(tau)
            available.remove(best)
    return matched


def _true_sets(annotations: Annotations, order: MatchOrder) -> tuple[list[Collection[int]], Collection[int]]:
    """Per-annotator true points and their union, each with 0, in visiting order."""
    if order == "benchmark":
        per_annotator: list[set[int]] = []
        for cps in annotations.values():
            t_k = {int(t) for t in cps}
            t_k.add(0)
            per_annotator.append(t_k)
        union: set[int] = set()
        for t_k in per_annotator:
            for tau in t_k:
                union.add(tau)
        return list(per_annotator), union
    if order == "ascending":
        sorted_sets = [sorted({0, *map(int, cps)}) for cps in annotations.values()]
        return list(sorted_sets), sorted({t for t_k in sorted_sets for t in t_k})
    raise ValueError(f"order must be 'benchmark' or 'ascending', got {order!r}")


def f_measure(
    annotations: Annotations,
    predictions: Iterable[int],
    margin: int = DEFAULT_MARGIN,
    order: MatchOrder = "benchmark",
) -> F1Score:
    """F1 of ``predictions`` against several annotators (van den Burg & Williams, 2020).

    ``P = |TP(T*, X)| / |X|`` over the union ``T*`` of the annotations,
    ``R`` the mean over annotators of ``|TP(T_k, X)| / |T_k|``, and
    ``F1 = PR / (R/2 + P/2) = 2PR / (P + R)``; index 0 is added to every set
    (see the module docstring, also for ``order``). ``predictions`` should
    already be cleaned (:func:`clean_predictions`).

    >>> f_measure({"1": [10, 20], "2": [11, 20], "3": [10], "4": [0, 5]}, [10, 20]).f1
    1.0
    >>> f_measure({"1": [], "2": [10], "3": [50]}, [10]).f1
    0.9090909090909091
    >>> f_measure({"1": [], "2": [10], "3": [50]}, []).f1
    0.8
    """
    if not annotations:
        raise ValueError("f_measure needs at least one annotator")
    per_annotator, union = _true_sets(annotations, order)
    predicted = {0, *map(int, predictions)}

    precision = len(true_positives(union, predicted, margin)) / len(predicted)
    # (1/K) * sum and the weighted harmonic mean with weight 1/2 are written as
    # the benchmark writes them, so that the floating-point results are the same
    # to the last bit.
    recall = (1 / len(per_annotator)) * sum(
        len(true_positives(t_k, predicted, margin)) / len(t_k) for t_k in per_annotator
    )
    denominator = 0.5 * recall + 0.5 * precision
    f1 = 0.0 if denominator == 0 else precision * recall / denominator
    return F1Score(f1=f1, precision=precision, recall=recall)


def partition_from_change_points(locations: Iterable[int], n_obs: int) -> list[Segment]:
    """Segments ``[start, stop)`` of ``0..n_obs-1`` cut at the given change points.

    Indices outside ``1..n_obs-1`` start no segment (index 0 always starts the
    first one).

    >>> partition_from_change_points([], 5)
    [(0, 5)]
    >>> partition_from_change_points([3, 5], 8)
    [(0, 3), (3, 5), (5, 8)]
    >>> partition_from_change_points([0, 4, 4, 9], 6)
    [(0, 4), (4, 6)]
    """
    if n_obs < 1:
        raise ValueError(f"n_obs must be positive, got {n_obs}")
    cuts = sorted({int(t) for t in locations if 0 < int(t) < n_obs})
    bounds = [0, *cuts, n_obs]
    return list(pairwise(bounds))


def _jaccard(a: Segment, b: Segment) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union


def cover_single(truth: Sequence[Segment], predicted: Sequence[Segment]) -> float:
    """Covering ``C(G', G)`` of the partition ``truth`` (G) by ``predicted`` (G').

    ``(1/T) * sum_{A in G} |A| * max_{A' in G'} J(A, A')`` (Arbelaez et al.,
    2011, eq. 8), with ``T`` the number of observations.

    >>> round(cover_single([(1, 4), (4, 7)], [(1, 4), (4, 6), (6, 7)]), 6)
    0.833333
    >>> round(cover_single([(1, 2), (2, 3), (3, 4), (4, 7)], [(1, 7)]), 6)
    0.333333
    """
    total = sum(b - a for a, b in truth)
    if total != sum(b - a for a, b in predicted):
        raise ValueError("the two partitions cover different numbers of observations")
    covered = sum((a[1] - a[0]) * max(_jaccard(a, p) for p in predicted) for a in truth)
    return covered / total


def covering(annotations: Annotations, predictions: Iterable[int], n_obs: int) -> float:
    """Cover of ``predictions``: mean over annotators of ``C(G', G_k)``.

    >>> round(covering({"1": [10, 20], "2": [10], "3": [0, 5]}, [10, 20], 45), 6)
    0.796296
    >>> round(covering({"1": [], "2": [10], "3": [40]}, [], 45), 6)
    0.81893
    """
    if not annotations:
        raise ValueError("covering needs at least one annotator")
    predicted = partition_from_change_points(predictions, n_obs)
    scores = [
        cover_single(partition_from_change_points(cps, n_obs), predicted) for cps in annotations.values()
    ]
    return sum(scores) / len(scores)
