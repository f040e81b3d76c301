"""Draw a run's series with its phases shaded and its events marked (``analyze --plot``).

matplotlib is the optional ``plot`` extra; it is imported only here, and only
when a plot is asked for. The figure is drawn on an Agg canvas directly, with
no pyplot and no global backend state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detector.core.types import EventKind, Phase, Role, infer_spec
from detector.report import View

PHASE_COLOURS = {
    Phase.INSTABILITY.value: "#f4c542",
    Phase.ABSTRACTION.value: "#4caf50",
    Phase.STABILIZATION.value: "#2196f3",
    Phase.COLLAPSE.value: "#e53935",
}
# Kinds drawn as labelled lines on every panel; change points mark their own series'
# panel; plateaus and phase changes show in the shading.
_HEADLINE_KINDS = {
    EventKind.GROKKING_ONSET.value: "#1b5e20",
    EventKind.GROKKING_COMPLETE.value: "#0d47a1",
    EventKind.COLLAPSE_ONSET.value: "#b71c1c",
    EventKind.COLLAPSE_END.value: "#00897b",
    EventKind.LOSS_SPIKE.value: "#e65100",
    EventKind.HIDDEN_PROGRESS.value: "#6a1b9a",
}
# Panel order: the headline metrics first, then representations, then the rest.
_ROLE_ORDER = (
    Role.LOSS,
    Role.ACCURACY,
    Role.RANK,
    Role.STABILITY,
    Role.ENTROPY,
    Role.NORM,
    Role.LEARNING_RATE,
    Role.OTHER,
)
_LOG_SCALE_ROLES = {Role.LOSS, Role.NORM, Role.LEARNING_RATE}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_timeline(
    columns: Mapping[str, tuple[np.ndarray, np.ndarray]],
    segments: Sequence[View],
    events: Sequence[View],
    out: str | os.PathLike[str],
    *,
    title: str = "",
) -> None:
    """Write :func:`timeline_figure` to ``out`` (the format from its extension).

    Raises :class:`PlotUnavailable` without matplotlib, and ``OSError`` or
    ``ValueError`` (unknown image format) from writing ``out``.
    """
    timeline_figure(columns, segments, events, title=title).savefig(out, dpi=110)


def timeline_figure(
    columns: Mapping[str, tuple[np.ndarray, np.ndarray]],
    segments: Sequence[View],
    events: Sequence[View],
    *,
    title: str = "",
) -> Any:
    """A matplotlib ``Figure`` with one panel per role group (loss, accuracy, rank,
    ...), phases shaded and events marked; on its own Agg canvas, no pyplot.

    Raises :class:`PlotUnavailable` without matplotlib.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'phasewatch[plot]'"
        ) from None

    groups = _group_by_role(columns)
    figure = Figure(figsize=(11, 2.2 * len(groups) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (role, names) in zip(axes, groups, strict=True):
        _draw_panel(ax, role, names, columns, segments, events)
    _label_headline_events(axes[0], events)
    axes[-1].set_xlabel("step")
    handles = [
        Patch(facecolor=colour, alpha=0.25, label=phase) for phase, colour in PHASE_COLOURS.items()
    ]
    figure.legend(handles=handles, loc="outside upper right", ncols=len(handles), fontsize=8)
    if title:
        figure.suptitle(title, x=0.01, ha="left", fontsize=10)
    return figure


def _group_by_role(
    columns: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> list[tuple[Role, list[str]]]:
    by_role: dict[Role, list[str]] = {}
    for name in columns:
        by_role.setdefault(infer_spec(name).role, []).append(name)
    groups = [(role, by_role[role]) for role in _ROLE_ORDER if role in by_role]
    return groups or [(Role.OTHER, [])]


def _draw_panel(
    ax: Any,
    role: Role,
    names: list[str],
    columns: Mapping[str, tuple[np.ndarray, np.ndarray]],
    segments: Sequence[View],
    events: Sequence[View],
) -> None:
    for segment in segments:
        colour = PHASE_COLOURS.get(segment["phase"] or "", "#9e9e9e")
        ax.axvspan(segment["start_step"], segment["end_step"], color=colour, alpha=0.18, lw=0)
    finite_positive = True
    for name in names:
        steps, values = columns[name]
        ax.plot(steps, values, lw=1.2, label=name)
        finite = values[np.isfinite(values)]
        finite_positive &= bool(len(finite)) and bool(np.all(finite > 0))
    if role in _LOG_SCALE_ROLES and finite_positive:
        ax.set_yscale("log")
    in_panel = set(names)
    for event in events:
        if event["kind"] in _HEADLINE_KINDS:
            ax.axvline(event["step"], color=_HEADLINE_KINDS[event["kind"]], lw=1.2, ls="--")
        elif event["kind"] == EventKind.CHANGE_POINT.value and event["series"] in in_panel:
            ax.axvline(event["step"], color="#616161", lw=0.6, ls=":", alpha=0.8)
    ax.set_ylabel(role.value.replace("_", " "), fontsize=9)
    if names:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.2)


def _label_headline_events(ax: Any, events: Sequence[View]) -> None:
    for event in events:
        colour = _HEADLINE_KINDS.get(event["kind"])
        if colour is not None:
            ax.annotate(
                event["kind"].lower().replace("_", " "),
                xy=(event["step"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                va="top",
                fontsize=7,
                color=colour,
                rotation=90,
            )
