"""Training-framework integrations: callbacks that stream a run to a detector.

- :mod:`detector.integrations.lightning`: ``PhasewatchCallback`` for a
  Lightning ``Trainer`` (``pip install 'phasewatch[lightning]'``);
- :mod:`detector.integrations.huggingface`: ``PhasewatchCallback`` for a
  Hugging Face ``Trainer`` (``pip install 'phasewatch[huggingface]'``).

Importing this package imports neither framework; each submodule imports its
own framework when it is imported. Both callbacks keep the client's promise:
nothing they do raises into the trainer or blocks it, whether the detector is
up or not.
"""
