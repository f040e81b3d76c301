"""Root conftest: skip the doctests of modules whose optional framework is not installed.

``detector/probe.py`` needs torch for its examples, and the integrations import
Lightning or transformers when imported; without them, ``--doctest-modules``
leaves those files out instead of failing to import them. (CI installs all
three, see ``.ci/run``.)
"""

from __future__ import annotations

import importlib.util


def _missing(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is None for m in modules)


collect_ignore: list[str] = []
if _missing("torch"):
    collect_ignore.append("detector/probe.py")
if _missing("lightning", "pytorch_lightning") or _missing("torch"):
    collect_ignore.append("detector/integrations/lightning.py")
if _missing("transformers") or _missing("torch"):
    collect_ignore.append("detector/integrations/huggingface.py")
# The notebook API's examples show pandas tables and a matplotlib figure.
if _missing("pandas") or _missing("matplotlib"):
    collect_ignore.append("detector/analysis.py")
