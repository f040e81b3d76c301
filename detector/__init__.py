"""phasewatch: phase-transition detection for machine-learning training runs.

Importing this package does no work; the parts live in subpackages:
``detector.core`` (pure streaming detection), ``detector.engine`` (per-run
state), and the adapters ``detector.server``, ``detector.store``,
``detector.exporter``, ``detector.client`` and ``detector.cli``.
"""

__version__ = "0.1.0"
