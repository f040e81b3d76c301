"""Root conftest: skip the doctests of modules whose optional framework is not installed.

``detector/probe.py`` needs torch for its examples, and the integrations import
Lightning or transformers when imported; without them, ``--doctest-modules``
leaves those files out instead of failing to import them, and says so at the
end of the run. (CI installs all three, see ``.ci/run``.)
"""

from __future__ import annotations

import importlib.util


def _missing(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is None for m in modules)


_IGNORED: dict[str, str] = {}
if _missing("torch"):
    _IGNORED["detector/probe.py"] = "torch is not installed: pip install -e '.[torch]'"
if _missing("lightning", "pytorch_lightning") or _missing("torch"):
    _IGNORED["detector/integrations/lightning.py"] = (
        "Lightning is not installed: pip install torch, then -e '.[lightning]'")
if _missing("transformers") or _missing("torch"):
    _IGNORED["detector/integrations/huggingface.py"] = (
        "transformers is not installed: pip install torch, then -e '.[huggingface]'")
# The notebook API's examples show pandas tables and a matplotlib figure.
if _missing("pandas") or _missing("matplotlib"):
    _IGNORED["detector/analysis.py"] = "pandas or matplotlib is not installed: -e '.[notebook]'"
collect_ignore: list[str] = list(_IGNORED)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 (pytest's hook)
    """Say which doctest modules were left out, and why, beside pytest's skip reasons."""
    for path, why in _IGNORED.items():
        terminalreporter.write_line(f"SKIPPED doctests of {path}: {why}")
