"""Bundled data: one real training run with its ground-truth labels, for ``phasewatch demo``.

Read the files with ``importlib.resources.files("detector.data")``.
"""
