"""phasewatch: phase-transition detection for machine-learning training runs.

Importing this package does no work; the parts live in subpackages:
``detector.core`` (pure streaming detection), ``detector.engine`` (per-run
state), and the adapters ``detector.server``, ``detector.store``,
``detector.exporter``, ``detector.client`` and ``detector.cli``.

``detector.analyze(data)`` (see :mod:`detector.analysis`) is the notebook
API; it is imported on first use, so ``import detector`` stays light (no
numpy, scipy or ruptures).
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {"analyze": "detector.analysis", "Analysis": "detector.analysis"}


def __getattr__(name: str) -> Any:
    # PEP 562: the engine (scipy, ruptures) loads when the API is first used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
