"""A Hugging Face ``TrainerCallback`` that streams a training run to a phasewatch detector.

``pip install 'phasewatch[huggingface]'``::

    from transformers import Trainer
    from detector.integrations.huggingface import PhasewatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[PhasewatchCallback("detector:50051", run_id="exp-42",
                                                    stop_on_collapse=True)])

What it sends, at ``state.global_step``: every dictionary the Trainer logs
(``on_log``: ``loss``, ``grad_norm``, ``learning_rate``, ``eval_loss``,
``eval_accuracy``, …; how often is the Trainer's ``logging_steps`` and
``eval_strategy``), without the bookkeeping keys (``epoch``, ``*_runtime``,
``*_per_second``, ``total_flos``) and without the end-of-training summary;
and, with ``probe_layers`` and ``probe_batch`` (or a ready ``probe``), the
:class:`~detector.probe.SpectralProbe` values every ``probe_every`` steps
(``on_step_end``). The detector infers roles from the names: ``loss`` is a
training loss, ``eval_loss`` a validation loss, ``learning_rate`` the
learning rate, ``grad_norm`` a norm.

The run is opened at ``on_train_begin`` (on the main process only) and closed
at ``on_train_end``. With ``stop_on_collapse=True`` the Trainer stops
(``control.should_training_stop``) after the detector reports a training
collapse (``COLLAPSE_ONSET`` with ``scope=training``; a generalisation
collapse, ``scope=generalization``, does not stop it). No hook raises into
the Trainer or waits on the network, except the close at the end (at most
``close_timeout`` seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "detector.integrations.huggingface needs transformers: pip install 'phasewatch[huggingface]'"
    ) from None

from detector.client import ClientConfig, Event, SeriesSpecLike
from detector.integrations._common import SessionView, TrainingSession, guarded, probe_factory

__all__ = ["DEFAULT_EXCLUDE", "PhasewatchCallback"]

DEFAULT_EXCLUDE = frozenset({"epoch", "total_flos", "step"})
"""Logged keys that are bookkeeping, not metrics (plus ``*_runtime`` and ``*_per_second``)."""

_SUMMARY_KEY = "train_runtime"  # only the end-of-training summary has it


class PhasewatchCallback(SessionView, TrainerCallback):  # type: ignore[misc]
    """Stream a Hugging Face Trainer's logs (and spectral probes) to a detector.

    Parameters
    ----------
    target
        The detector's ``HOST:PORT``; default ``$PHASEWATCH_TARGET``, else
        ``127.0.0.1:50051``. With ``$PHASEWATCH_DISABLED=1`` the callback does
        nothing at all (no connection, no probe), as ``WANDB_MODE=disabled``.
    run_id
        The run's id; default ``hf-<date>-<time>-<pid>``.
    labels, series, on_event, token, credentials, config
        As for :func:`detector.client.connect`.
    stop_on_collapse
        Stop training once the detector reports a training collapse
        (``COLLAPSE_ONSET`` with ``scope=training``); a generalisation
        collapse does not stop it.
    probe, probe_layers, probe_batch, probe_every, probe_kwargs
        A :class:`~detector.probe.SpectralProbe`, or the layers and fixed batch
        (a tensor, tuple or keyword mapping for the model) to build one on the
        Trainer's model when training starts.
    exclude
        Logged keys never sent (default :data:`DEFAULT_EXCLUDE`).
    close_timeout
        Seconds the end of training may wait for the detector to acknowledge.
    """

    def __init__(
        self,
        target: str | None = None,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        series: Iterable[SeriesSpecLike] = (),
        on_event: Callable[[Event], object] | None = None,
        stop_on_collapse: bool = False,
        probe: Any = None,
        probe_layers: Sequence[str] | None = None,
        probe_batch: Any = None,
        probe_every: int = 100,
        probe_kwargs: Mapping[str, Any] | None = None,
        exclude: Iterable[str] = DEFAULT_EXCLUDE,
        token: str | None = None,
        credentials: Any = None,
        config: ClientConfig | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        self.session = TrainingSession(
            target,
            run_id,
            default_prefix="hf",
            labels=labels,
            series=series,
            on_event=on_event,
            stop_on_collapse=stop_on_collapse,
            token=token,
            credentials=credentials,
            config=config,
            close_timeout=close_timeout,
            exclude=exclude,
        )
        self._probe_factory = probe_factory(probe, probe_layers, probe_batch, probe_every, probe_kwargs)

    @guarded
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(state, "is_world_process_zero", True):
            self.session.start(model, self._probe_factory)

    @guarded
    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.session.run is None or not logs or _SUMMARY_KEY in logs:
            return
        metrics = {
            k: v for k, v in logs.items()
            if not (isinstance(k, str) and (k.endswith("_runtime") or k.endswith("_per_second")))
        }
        self.session.log(state.global_step, metrics)
        if self.session.should_stop():
            control.should_training_stop = True

    @guarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.session.run is None:
            return
        self.session.probe_step(state.global_step)
        if self.session.should_stop():
            control.should_training_stop = True

    @guarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.close()
