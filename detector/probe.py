"""Spectral metrics of a PyTorch model while it trains: tensor wrappers and :class:`SpectralProbe`.

torch is imported lazily, inside the functions: importing this module needs
only numpy (``pip install 'phasewatch[torch]'`` for the rest).

The tensor functions (:func:`effective_rank`, :func:`rankme`,
:func:`alpha_req`, :func:`stable_rank`, :func:`top_singular_values`,
:func:`lambda_min`, :func:`cosine_stability`, :func:`weight_norm`) accept a
tensor on any device: the smaller Gram matrix is formed there in float64
(float32 where the device has no float64) and only that ``k x k`` matrix goes
to the CPU, where ``numpy.linalg.eigvalsh`` gives the squared singular values
(see :mod:`detector.spectral` for the definitions, the costs and the Gram
against SVD measurements).

:class:`SpectralProbe` runs a fixed probe batch through the model every
``every`` steps, catches the named layers' outputs with forward hooks
(registered for that pass only, so ordinary training steps pay nothing), and
logs per-layer values into a run of :mod:`detector.client`::

    from detector.client import connect
    from detector.probe import SpectralProbe

    probe = SpectralProbe(model, layers=["emb", "l1"], batch=x_probe, every=100)
    with connect("detector:50051", run_id="exp-42", series=probe.series_specs()) as run:
        for step in range(steps):
            ...
            run.log(step, train_loss=loss.item())
            probe.log(run, step)          # every 100 steps; never raises

Logged names are ``<layer>.<metric>`` (``l1.effective_rank``,
``l1.cos_stability``, ``emb.weight_norm`` …) plus the model's ``weight_norm``.
:meth:`SpectralProbe.series_specs` declares each one's role explicitly, so a
layer named, say, ``val_proj`` or ``lr_head`` cannot mislead the name-based
inference of split or role; pass it to ``connect(series=...)``.

Over 400 lines: the torch side of every measure of :mod:`detector.spectral`,
one function each (kept side by side with the probe so that a measure and its
use change together), and the probe; a quarter of the file is docstrings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from detector import spectral

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "DEFAULT_METRICS",
    "SpectralProbe",
    "alpha_req",
    "cosine_stability",
    "effective_rank",
    "lambda_min",
    "rankme",
    "squared_singular_values",
    "stable_rank",
    "top_singular_values",
    "weight_norm",
]

logger = logging.getLogger("phasewatch.probe")

DEFAULT_METRICS: frozenset[str] = frozenset(
    spectral.REPRESENTATION_METRICS + spectral.WEIGHT_METRICS + ("model_weight_norm",)
)
"""Everything :class:`SpectralProbe` can log; pass a subset as ``metrics=``."""

# Declared roles of the logged names (the detector would infer the same from
# the metric part of the name; declaring them keeps layer names out of it).
_ROLES: dict[str, str] = {
    "effective_rank": "rank",
    "rankme": "rank",
    "weight_stable_rank": "rank",
    "cos_stability": "stability",
    "weight_norm": "norm",
    "alpha_req": "other",
    "lambda_min": "other",
    "effrank_delta": "other",
    "top_sv": "other",
    "weight_top_sv": "other",
}


# --- tensors -------------------------------------------------------------------------


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    if t.dim() > 2:
        return t.reshape(t.shape[0], -1)
    return t


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64, or float32 on a device without float64 (MPS)."""
    try:
        return t.to(dtype=_float64())
    except (TypeError, RuntimeError):
        return t.float()


def _float64() -> Any:
    import torch

    return torch.float64


def squared_singular_values(t: torch.Tensor) -> np.ndarray:
    """Squared singular values of a tensor (made 2-D), descending, as float64 numpy.

    The smaller Gram matrix is formed on the tensor's device; ``eigvalsh``
    runs on the CPU. NaNs if the tensor is not finite.
    """
    import torch

    m = _wide(_as_matrix(t))
    k = min(m.shape)
    if k == 0:
        return np.zeros(0)
    if not bool(torch.isfinite(m).all()):
        return np.full(k, np.nan)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    g = gram.cpu().numpy().astype(np.float64, copy=False)
    if not np.isfinite(g).all():
        return np.full(k, np.nan)
    lam = np.linalg.eigvalsh(g)[::-1].copy()
    lam[lam < max(lam[0], 0.0) * max(m.shape) * np.finfo(np.float64).eps] = 0.0
    return lam


def _centred(t: torch.Tensor) -> torch.Tensor:
    m = _wide(_as_matrix(t))
    return m - m.mean(dim=0, keepdim=True)


def effective_rank(t: torch.Tensor) -> float:
    """Roy & Vetterli effective rank of a tensor's rows (see :func:`detector.spectral.effective_rank`).

    >>> import torch
    >>> round(effective_rank(torch.eye(6)), 6)
    6.0
    """
    return spectral.effective_rank_of_spectrum(squared_singular_values(t))


def rankme(t: torch.Tensor, eps: float = spectral.RANKME_EPS) -> float:
    """RankMe of embeddings ``t`` (rows are samples); see :func:`detector.spectral.rankme`."""
    return spectral.rankme_of_spectrum(squared_singular_values(t), eps)


def alpha_req(t: torch.Tensor, floor: float = spectral.ALPHA_FLOOR) -> float:
    """α-ReQ of representations ``t`` (rows are samples); see :func:`detector.spectral.alpha_req`."""
    n = _as_matrix(t).shape[0]
    if n == 0:
        return math.nan
    return spectral.alpha_req_of_eigenvalues(squared_singular_values(_centred(t)) / n, floor)


def stable_rank(w: torch.Tensor) -> float:
    """Stable rank ``‖W‖_F² / ‖W‖_2²`` of a weight (conv kernels flattened per output).

    >>> import torch
    >>> stable_rank(torch.eye(3))
    3.0
    """
    return spectral.stable_rank_of_spectrum(squared_singular_values(w))


def top_singular_values(t: torch.Tensor, k: int = 1) -> list[float]:
    """The ``k`` largest singular values of a tensor, descending."""
    sq = squared_singular_values(t)[: max(int(k), 0)]
    return [float(v) for v in np.sqrt(np.clip(sq, 0.0, None))]


def lambda_min(t: torch.Tensor) -> float:
    """Smallest eigenvalue of the covariance of the rows of ``t`` (0 if ``d > n - 1``)."""
    m = _as_matrix(t)
    n, d = m.shape
    if n == 0 or d == 0:
        return math.nan
    if d > n - 1:
        return 0.0 if bool(_finite(m)) else math.nan
    lam = squared_singular_values(_centred(m)) / n
    if not np.isfinite(lam).all():
        return math.nan
    return float(max(lam[-1], 0.0))


def _finite(t: torch.Tensor) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def cosine_stability(current: torch.Tensor, previous: torch.Tensor, eps: float = 1e-8) -> float:
    """Mean cosine similarity of corresponding rows (the same probe samples) of two tensors.

    >>> import torch
    >>> cosine_stability(torch.eye(3), torch.eye(3))
    1.0
    """
    a, b = _wide(_as_matrix(current)), _wide(_as_matrix(previous))
    if a.shape != b.shape or a.numel() == 0 or not (_finite(a) and _finite(b)):
        return math.nan
    dots = (a * b).sum(dim=1)
    norms = a.norm(dim=1).clamp_min(eps) * b.norm(dim=1).clamp_min(eps)
    return float((dots / norms).mean())


def weight_norm(params: torch.nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> float:
    """L2 norm of all parameters of a module (or of tensors), accumulated in float64.

    >>> import torch
    >>> weight_norm([torch.ones(4), torch.full((1, 1), 2.0)])
    2.8284271247461903
    """
    import torch

    if isinstance(params, torch.nn.Module):
        tensors: Iterable[torch.Tensor] = params.parameters()
    elif isinstance(params, torch.Tensor):
        tensors = [params]
    else:
        tensors = params
    total = 0.0
    with torch.no_grad():
        for p in tensors:
            q = _wide(p.detach())
            total += float((q * q).sum())
    return math.sqrt(total)


# --- the probe -----------------------------------------------------------------------


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The activation tensor in a module's output (a tensor, tuple, dict or model output)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class SpectralProbe:
    """Per-layer spectral metrics of a model on a fixed probe batch, every ``every`` steps.

    Parameters
    ----------
    model
        The ``torch.nn.Module`` being trained.
    layers
        Names of submodules (as in ``model.named_modules()``; ``""`` is the
        model itself, logged as ``model``), or a mapping of name to module.
        Each layer's output on the probe batch is its representation ``H``
        (rows are samples); a layer with a ``weight`` of two or more
        dimensions also gets the weight metrics.
    batch
        The fixed probe batch: a tensor (``model(batch)``), a tuple/list
        (``model(*batch)``) or a mapping (``model(**batch)``). Moved once to
        the model's device. Use the same samples for the whole run (cosine
        stability compares each sample with itself), more samples than
        features where ``lambda_min`` matters.
    every
        Log every ``every`` steps (``step % every == 0``).
    top_k
        How many top singular values to log (``top_sv1`` …).
    metrics
        A subset of :data:`DEFAULT_METRICS`; default all.
    reduce
        How a layer output of more than two dimensions becomes ``H``:
        ``"auto"`` (``(batch, tokens, d)`` is averaged over tokens, other
        shapes flattened after the batch), ``"mean"``, ``"last"`` (last token)
        or ``"flatten"``.
    eval_mode
        Run the probe pass with the model in eval mode (dropout off); each
        module's mode is restored afterwards.
    prefix
        Prepended to every logged name.

    Cost per probe: one forward pass of the probe batch, then per layer two
    spectra of ``H`` and one of the weight (:mod:`detector.spectral` has the
    numbers: ~11 ms for a 512 x 256 representation on one CPU thread).

    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> probe = SpectralProbe(model, layers=["0", "2"], batch=torch.randn(32, 8), every=10)
    >>> values = probe.compute()
    >>> sorted(k for k in values if k.startswith("0."))  # doctest: +NORMALIZE_WHITESPACE
    ['0.alpha_req', '0.effective_rank', '0.lambda_min', '0.rankme', '0.top_sv1',
     '0.weight_norm', '0.weight_stable_rank', '0.weight_top_sv1']
    >>> 1.0 <= values["0.effective_rank"] <= 16.0
    True
    >>> sorted(k for k in probe.compute() if k.startswith("2."))[:3]  # second call: deltas
    ['2.alpha_req', '2.cos_stability', '2.effective_rank']
    >>> probe.log(None, 3) is None    # not a probe step
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[str] | Mapping[str, torch.nn.Module],
        batch: Any,
        *,
        every: int = 100,
        top_k: int = 1,
        metrics: Iterable[str] | None = None,
        reduce: str = "auto",
        eval_mode: bool = True,
        prefix: str = "",
    ) -> None:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if reduce not in ("auto", "mean", "last", "flatten"):
            raise ValueError(f"reduce must be 'auto', 'mean', 'last' or 'flatten', not {reduce!r}")
        chosen = frozenset(DEFAULT_METRICS if metrics is None else metrics)
        unknown = chosen - DEFAULT_METRICS
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {sorted(DEFAULT_METRICS)}")
        if isinstance(layers, str):
            layers = [layers]
        if isinstance(layers, Mapping):
            modules = dict(layers)
        else:
            named = dict(model.named_modules())
            missing = [name for name in layers if name not in named]
            if missing:
                raise ValueError(f"model has no submodules {missing}; it has e.g. {list(named)[1:8]}")
            modules = {name: named[name] for name in layers}
        self.model = model
        self.layers: dict[str, torch.nn.Module] = {
            (name or "model"): module for name, module in modules.items()
        }
        self.batch = batch
        self.every = every
        self.top_k = int(top_k)
        self.metrics = chosen
        self.reduce = reduce
        self.eval_mode = eval_mode
        self.prefix = prefix
        self.tracker = spectral.SpectralTracker(top_k=self.top_k, metrics=chosen)
        self._device: Any = None
        self._warned = False
        self.failures = 0

    # --- names -----------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every series name the probe can log."""
        return [spec["name"] for spec in self.series_specs()]

    def series_specs(self) -> list[dict[str, str]]:
        """Series declarations for ``connect(series=...)``: role and split of every name."""
        specs: list[dict[str, str]] = []
        has_weight = {name: self._weight(module) is not None for name, module in self.layers.items()}
        for name in self.layers:
            for metric in spectral.REPRESENTATION_METRICS + spectral.WEIGHT_METRICS:
                if metric not in self.metrics or (metric.startswith("weight") and not has_weight[name]):
                    continue
                role = _ROLES[metric]
                if metric in ("top_sv", "weight_top_sv"):
                    fields = [f"{metric}{i}" for i in range(1, self.top_k + 1)]
                else:
                    fields = [metric]
                for f in fields:
                    specs.append({"name": f"{self.prefix}{name}.{f}", "role": role, "split": "train"})
        if "model_weight_norm" in self.metrics:
            specs.append({"name": f"{self.prefix}weight_norm", "role": "norm", "split": "train"})
        return specs

    # --- measuring -------------------------------------------------------------------

    @staticmethod
    def _weight(module: torch.nn.Module) -> torch.Tensor | None:
        import torch

        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            return w
        return None

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.dim() <= 2:
            return _as_matrix(t)
        mode = self.reduce
        if mode == "auto":
            mode = "mean" if t.dim() == 3 else "flatten"
        if mode == "mean":
            return t.mean(dim=tuple(range(1, t.dim() - 1)))
        if mode == "last":
            return t[:, -1].reshape(t.shape[0], -1)
        return t.reshape(t.shape[0], -1)

    def _batch_on(self, device: Any) -> Any:
        import torch

        if self._device == device:
            return self.batch

        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, Mapping):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(move(v) for v in x)
            return x

        self.batch = move(self.batch)
        self._device = device
        return self.batch

    def compute(self) -> dict[str, float]:
        """Run the probe batch now and return every metric (raises on errors)."""
        import torch

        captured: dict[str, torch.Tensor] = {}

        def hook_for(name: str) -> Any:
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                t = _first_tensor(output)
                if t is not None and name not in captured:
                    captured[name] = self._reduce(t)

            return hook

        model = self.model
        param = next(model.parameters(), None)
        batch = self._batch_on(param.device) if param is not None else self.batch
        modes = [(m, m.training) for m in model.modules()]
        handles = [module.register_forward_hook(hook_for(name)) for name, module in self.layers.items()]
        try:
            if self.eval_mode:
                model.eval()
            with torch.no_grad():
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (list, tuple)):
                    model(*batch)
                else:
                    model(batch)
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in modes:
                module.training = mode
        out: dict[str, float] = {}
        with torch.no_grad():
            for name, module in self.layers.items():
                h = captured.get(name)
                h_np = None if h is None else _wide(h).cpu().numpy().astype(np.float64, copy=False)
                w = self._weight(module)
                values = self.tracker.update(name, h_np, weight=None)
                if w is not None:
                    values.update(self._weight_metrics(w))
                for metric, value in values.items():
                    out[f"{self.prefix}{name}.{metric}"] = value
            if "model_weight_norm" in self.metrics:
                out[f"{self.prefix}weight_norm"] = weight_norm(model)
        return out

    def _weight_metrics(self, w: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        want = self.metrics
        if "weight_stable_rank" in want or "weight_top_sv" in want:
            sq = squared_singular_values(w)
            if "weight_stable_rank" in want:
                out["weight_stable_rank"] = spectral.stable_rank_of_spectrum(sq)
            if "weight_top_sv" in want:
                for i, v in enumerate(np.sqrt(np.clip(sq[: self.top_k], 0.0, None)), start=1):
                    out[f"weight_top_sv{i}"] = float(v)
        if "weight_norm" in want:
            out["weight_norm"] = weight_norm(w)
        return out

    def due(self, step: int) -> bool:
        """Whether ``step`` is a probe step."""
        return step % self.every == 0

    def log(self, run: Any, step: int, *, force: bool = False) -> dict[str, float] | None:
        """At a probe step (or with ``force``), measure and ``run.log(step, values)``.

        Returns the values, or None when it is not a probe step or the probe
        failed. Never raises: a failure is logged once (then at debug level)
        and counted in :attr:`failures`, and training goes on. ``run`` may be
        None to measure without logging.
        """
        try:
            if not force and not self.due(step):
                return None
            values = self.compute()
            if run is not None:
                run.log(step, values)
            return values
        except Exception:
            self.failures += 1
            if not self._warned:
                self._warned = True
                logger.exception("phasewatch probe failed at step %s; training continues", step)
            else:
                logger.debug("phasewatch probe failed at step %s", step, exc_info=True)
            return None
