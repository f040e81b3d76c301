"""A Lightning callback that streams a training run to a phasewatch detector.

``pip install 'phasewatch[lightning]'``; works with ``lightning.pytorch`` (or,
when only that is installed, ``pytorch_lightning``)::

    from lightning.pytorch import Trainer
    from detector.integrations.lightning import PhasewatchCallback

    trainer = Trainer(callbacks=[PhasewatchCallback("detector:50051", run_id="exp-42",
                                                    stop_on_collapse=True)])

What it sends, at ``trainer.global_step``:

- after every ``every``-th training step (default: the trainer's
  ``log_every_n_steps``, 50 unless set, as for Lightning's own loggers: each
  send reads the values, a device sync on a GPU), the scalars in
  ``trainer.callback_metrics`` (everything the module logged with
  ``self.log``); after validation and at the end of each epoch, the same
  again. Lightning keeps a metric in ``callback_metrics`` until it is logged
  anew, so a series is only sent when its value differs from the last value
  sent for it (a stale validation metric is not repeated at every training
  step; the price is that an exactly repeated value is skipped, which the
  detector does not miss);
- with ``probe_layers`` and ``probe_batch`` (or a ready ``probe``), the
  :class:`~detector.probe.SpectralProbe` values every ``probe_every`` steps.

The run is opened when training starts (on the global-zero process only) and
closed when it ends, on an exception too. With ``stop_on_collapse=True`` the
trainer stops (``trainer.should_stop``) after the detector reports a
training collapse (``COLLAPSE_ONSET`` with ``scope=training``);
:attr:`PhasewatchCallback.stop_event` holds that event. Under a distributed
strategy (DDP) only rank 0 talks to the detector, and the decision is reduced
over all ranks (``strategy.reduce_boolean_decision``, one all-reduce of a
scalar every ``every`` steps and after validation and each epoch), so every
rank stops at the same step. The callback's ``state_dict`` keeps the run id
in checkpoints: a job resumed from one (``fit(ckpt_path=...)``) continues the
same run (``resume=True``) instead of opening a new one.

:class:`PhasewatchLogger` is the same as a Lightning ``Logger``
(``Trainer(logger=PhasewatchLogger(...))``): it sends what Lightning's logging
sends, at Lightning's cadence; stopping on collapse needs the callback. A generalisation
collapse (``scope=generalization``: a held-out metric fell while training
holds) does not stop training; ``on_event`` sees it.
No hook raises into the trainer or waits on the network, except ``close`` at
the end (at most ``close_timeout`` seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ImportError:
        raise ImportError(
            "detector.integrations.lightning needs Lightning: pip install 'phasewatch[lightning]'"
        ) from None

from detector.client import ClientConfig, Event, SeriesSpecLike
from detector.integrations._common import SessionView, TrainingSession, guarded, probe_factory

__all__ = ["PhasewatchCallback", "PhasewatchLogger"]


class PhasewatchCallback(SessionView, Callback):  # type: ignore[misc]
    """Stream a Lightning run's logged metrics (and spectral probes) to a detector.

    Parameters
    ----------
    target
        The detector's ``HOST:PORT``; default ``$PHASEWATCH_TARGET``, else
        ``127.0.0.1:50051``. With ``$PHASEWATCH_DISABLED=1`` the callback does
        nothing at all (no connection, no probe), as ``WANDB_MODE=disabled``.
    run_id
        The run's id; default ``lightning-<date>-<time>-<pid>``.
    labels, series, on_event, token, credentials, config
        As for :func:`detector.client.connect`.
    stop_on_collapse
        Stop training once the detector reports a training collapse
        (``COLLAPSE_ONSET`` with ``scope=training``); a generalisation
        collapse does not stop it.
    every
        Send ``callback_metrics`` every ``every`` training steps; default the
        trainer's ``log_every_n_steps``.
    probe, probe_layers, probe_batch, probe_every, probe_kwargs
        A :class:`~detector.probe.SpectralProbe`, or the layers and fixed batch
        to build one on the LightningModule when training starts.
    exclude
        Metric names never sent.
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
        every: int | None = None,
        probe: Any = None,
        probe_layers: Sequence[str] | None = None,
        probe_batch: Any = None,
        probe_every: int = 100,
        probe_kwargs: Mapping[str, Any] | None = None,
        exclude: Iterable[str] = (),
        token: str | None = None,
        credentials: Any = None,
        config: ClientConfig | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self.session = TrainingSession(
            target,
            run_id,
            default_prefix="lightning",
            labels=labels,
            series=series,
            on_event=on_event,
            stop_on_collapse=stop_on_collapse,
            token=token,
            credentials=credentials,
            config=config,
            close_timeout=close_timeout,
            exclude=exclude,
            dedupe=True,
        )
        self._probe_factory = probe_factory(probe, probe_layers, probe_batch, probe_every, probe_kwargs)

    def _send(self, trainer: Any) -> None:
        self.session.log(trainer.global_step, dict(trainer.callback_metrics))

    def _check_stop(self, trainer: Any) -> None:
        """Set ``trainer.should_stop`` on every rank once rank 0 heard of a collapse.

        Called at the same hooks and steps on every rank: under DDP it is a
        collective (all ranks must take part, whatever rank 0 knows)."""
        if not self.session.stop_on_collapse:
            return
        decision = self.session.should_stop()
        if getattr(trainer, "world_size", 1) > 1:
            decision = bool(trainer.strategy.reduce_boolean_decision(decision, all=False))
        if decision:
            trainer.should_stop = True

    @guarded
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "is_global_zero", True):
            self.session.start(pl_module, self._probe_factory)

    @guarded
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        every = self.every or getattr(trainer, "log_every_n_steps", None) or 1
        if self.session.run is not None:
            if step % every == 0:
                self._send(trainer)
            self.session.probe_step(step)
        # One rank: every step (no cost). Several: every `every` steps, a collective.
        if getattr(trainer, "world_size", 1) == 1 or step % every == 0:
            self._check_stop(trainer)

    @guarded
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        if self.session.run is not None:
            self._send(trainer)
        self._check_stop(trainer)

    @guarded
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.session.run is not None:
            self._send(trainer)
        self._check_stop(trainer)

    def state_dict(self) -> dict[str, Any]:
        """The run id, kept in checkpoints so that a resumed job continues the run."""
        return self.session.state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's run (unless another ``run_id`` was given)."""
        try:
            self.session.restore(state_dict)
        except Exception:
            self.session.warn_once("restore", "phasewatch: could not restore the run id")

    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        try:
            if self.session.run is not None:
                self._send(trainer)
        finally:
            self.session.close()

    @guarded
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.close()


try:
    from lightning.pytorch.loggers import Logger as _Logger
    from lightning.pytorch.utilities import rank_zero_only
except ImportError:  # pragma: no cover - pytorch_lightning only
    from pytorch_lightning.loggers import Logger as _Logger  # type: ignore[assignment]
    from pytorch_lightning.utilities import rank_zero_only


class PhasewatchLogger(_Logger):  # type: ignore[misc]
    """A Lightning ``Logger`` streaming what the module logs to a detector.

    ``Trainer(logger=PhasewatchLogger("detector:50051", run_id="exp-42"))``, alone
    or beside other loggers. It opens the run on the first metrics (rank 0
    only, as every Lightning logger), sends each ``log_metrics`` call at its
    step, and ends the run in ``finalize``. Hyperparameters are not sent (a run's
    labels are fixed when it opens: pass them as ``labels``). It cannot stop
    training; :class:`PhasewatchCallback` with ``stop_on_collapse`` can. Never
    raises into the trainer. Arguments as for :class:`PhasewatchCallback`.
    """

    def __init__(
        self,
        target: str | None = None,
        run_id: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        series: Iterable[SeriesSpecLike] = (),
        on_event: Callable[[Event], object] | None = None,
        exclude: Iterable[str] = ("epoch",),
        token: str | None = None,
        credentials: Any = None,
        config: ClientConfig | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.session = TrainingSession(
            target, run_id, default_prefix="lightning", labels=labels, series=series,
            on_event=on_event, token=token, credentials=credentials, config=config,
            close_timeout=close_timeout, exclude=exclude,
        )

    @property
    def name(self) -> str:
        return "phasewatch"

    @property
    def version(self) -> str:
        return self.session.run_id

    @property
    def experiment(self) -> Any:
        """The :class:`detector.client.Run` (None before the first metrics and after the end)."""
        return self.session.run

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # see the class docstring

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        try:
            if self.session.run is None and not self.session.closed_once:
                self.session.start()
            if step is not None:
                self.session.log(step, metrics)
        except Exception:
            self.session.warn_once("logger", "phasewatch: could not log metrics")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.session.close()
