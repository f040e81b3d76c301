"""Value types shared by the core: roles, phases, events, segments.

These mirror the enums of ``proto/phasewatch/v1/detector.proto`` without
depending on the generated code, so the core stays free of gRPC.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field


class Role(enum.Enum):
    LOSS = "loss"
    ACCURACY = "accuracy"
    NORM = "norm"
    LEARNING_RATE = "learning_rate"
    RANK = "rank"
    STABILITY = "stability"
    ENTROPY = "entropy"
    OTHER = "other"


class Split(enum.Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class Direction(enum.Enum):
    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


class Phase(enum.Enum):
    INSTABILITY = "instability"
    ABSTRACTION = "abstraction"
    STABILIZATION = "stabilization"
    COLLAPSE = "collapse"


class EventKind(enum.Enum):
    CHANGE_POINT = "CHANGE_POINT"
    PLATEAU_START = "PLATEAU_START"
    PLATEAU_END = "PLATEAU_END"
    HIDDEN_PROGRESS = "HIDDEN_PROGRESS"
    PHASE_CHANGE = "PHASE_CHANGE"
    GROKKING_ONSET = "GROKKING_ONSET"
    GROKKING_COMPLETE = "GROKKING_COMPLETE"
    LOSS_SPIKE = "LOSS_SPIKE"
    COLLAPSE_ONSET = "COLLAPSE_ONSET"
    COLLAPSE_END = "COLLAPSE_END"


@dataclass(frozen=True)
class Event:
    """Something the detector found.

    ``step`` is where the transition is located; ``detected_at`` is the last
    step seen when the event was emitted (``detected_at >= step``). Events are
    never rewritten: a refined location is a new event.
    """

    step: int
    kind: EventKind
    detected_at: int
    series: str = ""
    confidence: float = 1.0
    message: str = ""
    phase: Phase | None = None
    evidence: dict[str, str] = field(default_factory=dict)

    def sort_key(self) -> tuple[int, int, str, str]:
        return (self.detected_at, self.step, self.kind.value, self.series)


@dataclass(frozen=True)
class Segment:
    """A phase over the half-open step range ``[start_step, end_step)``."""

    start_step: int
    end_step: int
    phase: Phase
    confidence: float


# --- series specs and inference from names ---------------------------------

MAX_NAME_LENGTH = 256

_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")

_SPLIT_TOKENS = {
    "train": Split.TRAIN,
    "training": Split.TRAIN,
    "tr": Split.TRAIN,
    "val": Split.VAL,
    "valid": Split.VAL,
    "validation": Split.VAL,
    "eval": Split.VAL,
    "dev": Split.VAL,
    "test": Split.TEST,
    "holdout": Split.TEST,
}

# Checked in order: the first role whose tokens appear wins, so "grad_norm" is a
# norm and "loss_entropy" would be an entropy before it is a loss.
_ROLE_TOKENS: tuple[tuple[Role, frozenset[str]], ...] = (
    (Role.LEARNING_RATE, frozenset({"lr", "learning", "learningrate"})),
    (Role.STABILITY, frozenset({"stability", "cos", "cosine", "similarity"})),
    (Role.ENTROPY, frozenset({"entropy"})),
    (Role.RANK, frozenset({"rank", "rankme", "erank"})),
    (Role.NORM, frozenset({"norm", "l2"})),
    (Role.ACCURACY, frozenset({"acc", "accuracy", "top1", "top5", "f1", "auc"})),
    (Role.LOSS, frozenset({"loss", "nll", "ce", "mse", "ppl", "perplexity", "error", "err"})),
)

_DEFAULT_DIRECTION = {
    Role.LOSS: Direction.MINIMIZE,
    Role.ACCURACY: Direction.MAXIMIZE,
    Role.NORM: Direction.MINIMIZE,
    Role.LEARNING_RATE: Direction.MINIMIZE,
    Role.RANK: Direction.MAXIMIZE,
    Role.STABILITY: Direction.MAXIMIZE,
    Role.ENTROPY: Direction.MAXIMIZE,
    Role.OTHER: Direction.MINIMIZE,
}


@dataclass(frozen=True)
class SeriesSpec:
    """What a series is: its role, split and the direction that means better.

    >>> infer_spec("val_acc")
    SeriesSpec(name='val_acc', role=<Role.ACCURACY: 'accuracy'>, split=<Split.VAL: 'val'>, direction=<Direction.MAXIMIZE: 'maximize'>)
    """  # noqa: E501

    name: str
    role: Role
    split: Split
    direction: Direction


def infer_spec(
    name: str,
    role: Role | None = None,
    split: Split | None = None,
    direction: Direction | None = None,
) -> SeriesSpec:
    """Fill the unspecified parts of a series spec from its name."""
    tokens = [t for t in _TOKEN_SPLIT.split(name.lower()) if t]
    token_set = set(tokens)
    if role is None:
        role = Role.OTHER
        for candidate, words in _ROLE_TOKENS:
            if token_set & words:
                role = candidate
                break
    if split is None:
        split = next((_SPLIT_TOKENS[t] for t in tokens if t in _SPLIT_TOKENS), Split.TRAIN)
    if direction is None:
        direction = _DEFAULT_DIRECTION[role]
    return SeriesSpec(name=name, role=role, split=split, direction=direction)


def check_name(kind: str, name: str) -> str | None:
    """Return why ``name`` is not a valid run id or series name, or None if it is."""
    if not name:
        return f"{kind} is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"{kind} is longer than {MAX_NAME_LENGTH} characters"
    if not name.isprintable() or any(c.isspace() for c in name):
        return f"{kind} {name!r} has whitespace or non-printable characters"
    return None
