"""Spectral metrics of representations and weights, in numpy (float64).

Pure functions of a matrix (rows are samples: a probe batch's embeddings
``H`` of shape ``(n, d)``, or a weight ``W`` of shape ``(out, in)``), plus a
small stateful :class:`SpectralTracker` for the two metrics that compare a
call with the previous one (change of effective rank, cosine stability).
``detector.probe`` wraps them for torch tensors and module hooks.

Every spectral metric needs the singular values ``σ`` of a matrix. They are
taken from the eigenvalues of the *smaller* Gram matrix (``X Xᵀ`` or ``XᵀX``,
``k = min(n, d)``): ``σ_i² = λ_i(Gram)``. That costs ``O(n d k)`` for the
product plus ``O(k³)`` for ``eigvalsh``, against a bidiagonalisation for
an SVD. Measured on a busy 2-core x86_64 machine (numpy 2.4, OpenBLAS, one
thread, float64, median of repeated calls; ``python -m benchmarks.spectral``):

=============  ==========  ==========  ========  ===============
n x d          Gram (µs)   SVD (µs)    SVD/Gram  tracker.update
=============  ==========  ==========  ========  ===============
59 x 64           178         213        1.2        0.50 ms
512 x 64          319         813        2.6        1.0 ms
512 x 256       4 384      11 348        2.6       11 ms
512 x 1024     24 294      77 279        3.2       60 ms
2048 x 512     32 593      99 558        3.1       77 ms
1024 x 1024   122 181     240 795        2.0      270 ms
4096 x 1024   228 234     690 936        3.0      469 ms
=============  ==========  ==========  ========  ===============

The two agree to ~1e-14 relative on the upper half of the spectrum.
``tracker.update`` is every representation metric of one layer (two
spectra: raw and centred, plus the cosine with the previous call). A
layer's weight metrics cost one spectrum of the weight (the Gram column).
On a GPU, ``detector.probe`` forms the Gram matrix on the device and moves
only the ``k x k`` result to the CPU.

Precision: a Gram matrix squares the condition number, so singular values
below about ``sqrt(eps) * σ_1`` (≈1.5e-8 σ_1) are noise. Eigenvalues under
``max(n, d) * eps * λ_1`` are set to zero, as an SVD would report them; the
entropy-based ranks weigh such values by ``σ_i / Σσ`` and do not notice. Use
``method="svd"`` where tiny singular values matter (``lambda_min`` of a nearly
singular covariance).

Costs of each metric (``k = min(n, d)``), all dominated by one spectrum:

- :func:`effective_rank`, :func:`rankme`, :func:`top_singular_values`,
  :func:`stable_rank`: one spectrum of ``X``, then ``O(k)``. (The stable rank's
  Frobenius norm is ``Σ λ_i``; its ``σ_1`` alone could come from a few power
  iterations, ``O(n d)`` each, but the full spectrum is cheap at these sizes.)
- :func:`alpha_req`, :func:`lambda_min`: one spectrum of the centred ``X``
  (``O(n d)`` to centre), then a least-squares fit in ``O(k)``.
- :func:`cosine_similarity_rows` / cosine stability: ``O(n d)``.
- :func:`weight_norm`: ``O(number of parameters)``.
- :class:`SpectralTracker.update` computes both spectra once and derives every
  metric from them: two Gram products and two ``eigvalsh`` of ``k x k``.

>>> import numpy as np
>>> round(effective_rank(np.eye(8)), 6)
8.0
>>> round(effective_rank(np.outer(np.arange(1.0, 6.0), np.ones(4))), 6)
1.0

Over 400 lines: one numpy function per measure, each with its definition,
cost and doctest, and the small tracker that calls them; nearly half of the
file is docstrings (the measured table above among them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "RANKME_EPS",
    "SpectralTracker",
    "alpha_req",
    "alpha_req_of_eigenvalues",
    "cosine_similarity_rows",
    "covariance_eigenvalues",
    "effective_rank",
    "effective_rank_of_spectrum",
    "lambda_min",
    "rankme",
    "rankme_of_spectrum",
    "squared_singular_values",
    "stable_rank",
    "stable_rank_of_spectrum",
    "top_singular_values",
    "weight_norm",
]

RANKME_EPS = 1e-7
"""The ε of RankMe (Garrido et al. 2023), added to each normalised singular value."""

ALPHA_FLOOR = 1e-6
"""α-ReQ fits only covariance eigenvalues above ``ALPHA_FLOOR * λ_1``."""

_EPS = np.finfo(np.float64).eps


def _matrix(x: Any) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    elif m.ndim > 2:
        m = m.reshape(m.shape[0], -1)
    return m


def squared_singular_values(x: Any, *, method: str = "gram") -> np.ndarray:
    """Squared singular values of ``x``, descending; NaNs if ``x`` is not finite.

    ``x`` is made 2-D (a vector is one row; more dimensions are flattened
    after the first). ``method="gram"`` (default) takes the eigenvalues of the
    smaller Gram matrix and zeroes those under the noise floor
    ``max(n, d) * eps * λ_1``; ``method="svd"`` squares an SVD's singular
    values. Length ``min(n, d)``.

    Cost: ``O(n d k + k³)``, ``k = min(n, d)``; see the module's table.

    >>> x = np.array([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    >>> squared_singular_values(x).round(12).tolist()
    [16.0, 9.0]
    >>> squared_singular_values(x, method="svd").round(12).tolist()
    [16.0, 9.0]
    """
    m = _matrix(x)
    k = min(m.shape)
    if k == 0:
        return np.zeros(0)
    if not np.isfinite(m).all():
        return np.full(k, np.nan)
    if method == "svd":
        s = np.linalg.svd(m, compute_uv=False)
        return s * s
    if method != "gram":
        raise ValueError(f"method must be 'gram' or 'svd', not {method!r}")
    with np.errstate(over="ignore", invalid="ignore"):
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    if not np.isfinite(gram).all():  # overflow of huge values
        return np.full(k, np.nan)
    lam = np.linalg.eigvalsh(gram)[::-1].copy()
    floor = max(lam[0], 0.0) * max(m.shape) * _EPS
    lam[lam < floor] = 0.0
    return lam


def covariance_eigenvalues(x: Any, *, method: str = "gram") -> np.ndarray:
    """Eigenvalues of the covariance ``Hcᵀ Hc / n`` of the rows of ``x``, descending.

    ``Hc`` is ``x`` with its column means removed. Only the ``min(n, d)``
    eigenvalues that can be non-zero are returned (the covariance is
    ``d x d``; see :func:`lambda_min` for its smallest one).

    >>> h = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    >>> covariance_eigenvalues(h).round(12).tolist()
    [2.0, 0.5]
    """
    m = _matrix(x)
    if m.shape[0] == 0:
        return np.zeros(0)
    centred = m - m.mean(axis=0, keepdims=True)
    return squared_singular_values(centred, method=method) / m.shape[0]


def effective_rank_of_spectrum(sq: np.ndarray) -> float:
    """Roy & Vetterli effective rank from squared singular values ``sq``.

    ``exp(H(p))`` with ``p_i = σ_i / Σ σ`` and ``H`` the Shannon entropy;
    between 1 and the number of non-zero singular values. NaN when all are
    zero or any is NaN.

    >>> round(effective_rank_of_spectrum(np.array([4.0, 4.0, 4.0])), 12)
    3.0
    """
    s = np.sqrt(np.clip(np.asarray(sq, dtype=np.float64), 0.0, None))
    total = float(s.sum())
    if not math.isfinite(total) or total <= 0.0:
        return math.nan
    p = s[s > 0.0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(x: Any, *, method: str = "gram") -> float:
    """Effective rank (Roy & Vetterli 2007) of ``x``: ``exp`` of the entropy of ``σ/Σσ``.

    ``n`` for an ``n x n`` identity (all singular values equal), 1 for a
    rank-1 matrix. Cost: one spectrum.

    >>> round(effective_rank(np.diag([1.0, 1.0, 0.0])), 6)
    2.0
    """
    return effective_rank_of_spectrum(squared_singular_values(x, method=method))


def rankme_of_spectrum(sq: np.ndarray, eps: float = RANKME_EPS) -> float:
    """RankMe from squared singular values: ``exp(-Σ p_k log p_k)``, ``p_k = σ_k/‖σ‖₁ + ε``.

    >>> round(rankme_of_spectrum(np.array([1.0, 1.0, 0.0, 0.0])), 4)
    2.0
    """
    s = np.sqrt(np.clip(np.asarray(sq, dtype=np.float64), 0.0, None))
    total = float(s.sum())
    if not math.isfinite(total) or total <= 0.0:
        return math.nan
    p = s / total + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def rankme(x: Any, *, eps: float = RANKME_EPS, method: str = "gram") -> float:
    """RankMe (Garrido et al. 2023) of embeddings ``x`` (rows are samples).

    The effective rank with ``ε = 1e-7`` added to each normalised singular
    value, as in the paper, so that zero singular values are defined; equal
    to :func:`effective_rank` within about ``k ε``. Cost: one spectrum.

    >>> round(rankme(np.eye(16)), 4)
    16.0
    """
    return rankme_of_spectrum(squared_singular_values(x, method=method), eps)


def alpha_req_of_eigenvalues(eigenvalues: np.ndarray, floor: float = ALPHA_FLOOR) -> float:
    """Power-law exponent α of a descending eigenspectrum, ``λ_i ∝ i^-α``.

    Least squares of ``-log λ_i`` on ``log i`` over the eigenvalues above
    ``floor * λ_1``; NaN with fewer than 3 of them.

    >>> lam = np.arange(1, 101, dtype=float) ** -1.5
    >>> round(alpha_req_of_eigenvalues(lam), 6)
    1.5
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.size == 0 or not np.isfinite(lam).all() or lam[0] <= 0.0:
        return math.nan
    lam = lam[lam > floor * lam[0]]
    if lam.size < 3:
        return math.nan
    x = np.log(np.arange(1, lam.size + 1, dtype=np.float64))
    y = -np.log(lam)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def alpha_req(x: Any, *, floor: float = ALPHA_FLOOR, method: str = "gram") -> float:
    """α-ReQ (Agrawal et al. 2022): the decay exponent of the covariance eigenspectrum.

    Fits ``λ_i ∝ i^-α`` to the eigenvalues of the centred covariance of the
    rows of ``x`` by least squares in log-log (eigenvalues above ``floor λ_1``,
    at least 3). Larger α: faster decay, fewer directions in use. Cost: one
    spectrum of the centred matrix plus ``O(k)``.

    >>> rng = np.random.default_rng(0)
    >>> z = rng.standard_normal((400, 50))
    >>> q, _ = np.linalg.qr(z - z.mean(0))      # orthonormal, centred columns
    >>> h = q * np.arange(1, 51) ** -1.0        # singular values ∝ i^-1, so λ_i ∝ i^-2
    >>> round(alpha_req(h), 6)
    2.0
    """
    return alpha_req_of_eigenvalues(covariance_eigenvalues(x, method=method), floor)


def stable_rank_of_spectrum(sq: np.ndarray) -> float:
    """``Σ σ_i² / σ_1²`` from squared singular values (descending or not).

    >>> stable_rank_of_spectrum(np.array([4.0, 2.0, 2.0]))
    2.0
    """
    sq = np.asarray(sq, dtype=np.float64)
    if sq.size == 0 or not np.isfinite(sq).all():
        return math.nan
    top = float(sq.max())
    return float(sq.sum() / top) if top > 0.0 else math.nan


def stable_rank(w: Any, *, method: str = "gram") -> float:
    """Stable rank ``‖W‖_F² / ‖W‖_2²`` of a weight matrix (≤ its rank, ≥ 1).

    Cost: one spectrum (``‖W‖_F²`` alone is ``O(n d)``).

    >>> stable_rank(np.eye(5))
    5.0
    >>> stable_rank(np.outer([1.0, 2.0], [3.0, 4.0, 5.0]))
    1.0
    """
    return stable_rank_of_spectrum(squared_singular_values(w, method=method))


def top_singular_values(x: Any, k: int = 1, *, method: str = "gram") -> np.ndarray:
    """The ``k`` largest singular values of ``x``, descending (fewer if ``x`` has fewer).

    Cost: one spectrum.

    >>> top_singular_values(np.diag([1.0, 5.0, 3.0]), 2).round(12).tolist()
    [5.0, 3.0]
    """
    sq = squared_singular_values(x, method=method)[: max(int(k), 0)]
    return np.sqrt(np.clip(sq, 0.0, None))


def lambda_min(x: Any, *, centre: bool = True, method: str = "gram") -> float:
    """Smallest eigenvalue of the ``d x d`` covariance of the rows of ``x``.

    With ``centre=False``, of the second-moment matrix ``xᵀx / n`` instead.
    Zero whenever the covariance is rank-deficient by construction (``d``
    greater than ``n - 1`` when centred, than ``n`` otherwise), so probe with
    more samples than features. Cost: one spectrum.

    >>> h = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    >>> lambda_min(h)
    0.5
    >>> lambda_min(np.ones((3, 8)))
    0.0
    """
    m = _matrix(x)
    n, d = m.shape
    if n == 0 or d == 0:
        return math.nan
    if centre:
        lam = covariance_eigenvalues(m, method=method)
        rank_cap = n - 1
    else:
        lam = squared_singular_values(m, method=method) / n
        rank_cap = n
    if not np.isfinite(lam).all():
        return math.nan
    if d > rank_cap or lam.size < d:
        return 0.0
    return float(max(lam[-1], 0.0))


def cosine_similarity_rows(a: Any, b: Any, *, eps: float = 1e-8) -> float:
    """Mean cosine similarity of corresponding rows of ``a`` and ``b``.

    Each row's norm is clamped below at ``eps`` (as
    ``torch.nn.functional.cosine_similarity`` does), so a vanishing row reads
    near 0. NaN if the shapes differ or a value is not finite. Cost ``O(n d)``.

    >>> a = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> cosine_similarity_rows(a, a)
    1.0
    >>> cosine_similarity_rows(a, np.array([[1.0, 0.0], [1.0, 0.0]]))
    0.5
    """
    x, y = _matrix(a), _matrix(b)
    if x.shape != y.shape or x.size == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    dots = (x * y).sum(axis=1)
    norms = np.maximum(np.linalg.norm(x, axis=1), eps) * np.maximum(np.linalg.norm(y, axis=1), eps)
    return float((dots / norms).mean())


def weight_norm(arrays: Any | Iterable[Any]) -> float:
    """L2 norm of all entries of one array or of several (the parameters of a model).

    Accumulated in float64. Cost ``O(number of entries)``.

    >>> weight_norm([np.full(4, 1.0), np.array([[2.0]])])
    2.8284271247461903
    >>> weight_norm(np.array([3.0, 4.0]))
    5.0
    """
    if isinstance(arrays, np.ndarray) or np.isscalar(arrays):
        arrays = [arrays]
    total = 0.0
    for a in arrays:
        v = np.asarray(a, dtype=np.float64).ravel()
        total += float(v @ v)
    return math.sqrt(total)


# --- state between calls -------------------------------------------------------------

REPRESENTATION_METRICS = (
    "effective_rank",
    "rankme",
    "alpha_req",
    "lambda_min",
    "top_sv",
    "cos_stability",
    "effrank_delta",
)
"""Metrics :meth:`SpectralTracker.update` computes from a representation."""

WEIGHT_METRICS = ("weight_stable_rank", "weight_norm", "weight_top_sv")
"""Metrics :meth:`SpectralTracker.update` computes from a weight matrix."""


@dataclass
class SpectralTracker:
    """Spectral metrics of named representations, remembering the previous call.

    ``update(key, h)`` returns, for the representation ``h`` (rows are the
    probe batch's samples, always the same samples in the same order):

    ``effective_rank``, ``rankme``, ``top_sv1`` … ``top_sv{top_k}`` (of ``h``),
    ``alpha_req`` and ``lambda_min`` (of its centred covariance),
    ``cos_stability`` (mean cosine of each sample's embedding with the same
    sample's at the previous call: near 1 when the representation barely
    moved) and ``effrank_delta`` (effective rank now minus at the previous
    call); the last two are left out on the first call for ``key``. With a
    ``weight`` matrix it also returns ``weight_stable_rank``, ``weight_norm``
    and ``weight_top_sv1`` … Names are chosen so that the detector infers
    their roles (``*rank*`` → rank, ``*norm`` → norm, ``cos_stability`` →
    stability; ``effrank_delta``, ``alpha_req``, ``lambda_min`` and the
    singular values → other).

    Memory: the previous ``h`` per key (``n x d`` floats). Cost: two spectra of
    ``h`` (raw and centred) and one of the weight.

    >>> t = SpectralTracker(top_k=1)
    >>> m = t.update("layer", np.eye(4))
    >>> sorted(m)
    ['alpha_req', 'effective_rank', 'lambda_min', 'rankme', 'top_sv1']
    >>> m = t.update("layer", np.diag([1.0, 1.0, 0.0, 0.0]))
    >>> round(m["effective_rank"], 6), round(m["effrank_delta"], 6), round(m["cos_stability"], 6)
    (2.0, -2.0, 0.5)
    """

    top_k: int = 1
    method: str = "gram"
    metrics: frozenset[str] | None = None
    _previous: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _previous_rank: dict[str, float] = field(default_factory=dict, repr=False)

    def _want(self, name: str) -> bool:
        return self.metrics is None or name in self.metrics

    def update(self, key: str, h: Any, weight: Any | None = None) -> dict[str, float]:
        """Metrics of representation ``h`` (and ``weight``) under ``key``; remembers ``h``."""
        out: dict[str, float] = {}
        if h is not None:
            m = _matrix(h)
            if any(self._want(n) for n in ("effective_rank", "rankme", "top_sv", "effrank_delta")):
                sq = squared_singular_values(m, method=self.method)
                erank = effective_rank_of_spectrum(sq)
                if self._want("effective_rank"):
                    out["effective_rank"] = erank
                if self._want("rankme"):
                    out["rankme"] = rankme_of_spectrum(sq)
                if self._want("top_sv"):
                    for i, v in enumerate(np.sqrt(np.clip(sq[: self.top_k], 0.0, None)), start=1):
                        out[f"top_sv{i}"] = float(v)
                if self._want("effrank_delta"):
                    before = self._previous_rank.get(key)
                    if before is not None:
                        out["effrank_delta"] = erank - before
                    self._previous_rank[key] = erank
            if self._want("alpha_req") or self._want("lambda_min"):
                cov = covariance_eigenvalues(m, method=self.method)
                if self._want("alpha_req"):
                    out["alpha_req"] = alpha_req_of_eigenvalues(cov)
                if self._want("lambda_min"):
                    n, d = m.shape
                    if not np.isfinite(cov).all():
                        out["lambda_min"] = math.nan
                    elif d > n - 1 or cov.size < d:
                        out["lambda_min"] = 0.0
                    else:
                        out["lambda_min"] = float(max(cov[-1], 0.0))
            if self._want("cos_stability"):
                before_h = self._previous.get(key)
                if before_h is not None:
                    out["cos_stability"] = cosine_similarity_rows(m, before_h)
                self._previous[key] = m.copy()
        if weight is not None:
            w = _matrix(weight)
            if self._want("weight_stable_rank") or self._want("weight_top_sv"):
                sq = squared_singular_values(w, method=self.method)
                if self._want("weight_stable_rank"):
                    out["weight_stable_rank"] = stable_rank_of_spectrum(sq)
                if self._want("weight_top_sv"):
                    for i, v in enumerate(np.sqrt(np.clip(sq[: self.top_k], 0.0, None)), start=1):
                        out[f"weight_top_sv{i}"] = float(v)
            if self._want("weight_norm"):
                out["weight_norm"] = weight_norm(w)
        return out

    def reset(self, key: str | None = None) -> None:
        """Forget the previous call of ``key`` (of every key if None)."""
        if key is None:
            self._previous.clear()
            self._previous_rank.clear()
        else:
            self._previous.pop(key, None)
            self._previous_rank.pop(key, None)

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the deltas (plain Python and numpy)."""
        return {
            "previous": {k: v.copy() for k, v in self._previous.items()},
            "previous_rank": dict(self._previous_rank),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self._previous = {k: np.asarray(v, dtype=np.float64) for k, v in state["previous"].items()}
        self._previous_rank = {k: float(v) for k, v in state["previous_rank"].items()}
