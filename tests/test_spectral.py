"""The numpy spectral metrics against closed-form cases, and the tracker's state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector import spectral
from detector.core.types import Role, infer_spec


def _with_singular_values(s: np.ndarray, n: int, d: int, seed: int = 0) -> np.ndarray:
    """An ``n x d`` matrix whose singular values are exactly ``s``."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((d, len(s))))
    return (u * s) @ v.T


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_identity_has_full_effective_rank_and_stable_rank(n: int) -> None:
    eye = np.eye(n)
    assert spectral.effective_rank(eye) == pytest.approx(n, rel=1e-12)
    assert spectral.rankme(eye) == pytest.approx(n, rel=1e-4)  # epsilon: +2e-5 at n = 64
    assert spectral.stable_rank(eye) == pytest.approx(n, rel=1e-12)
    assert spectral.top_singular_values(eye, 3).tolist() == pytest.approx([1.0] * min(3, n))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (40, 40), (200, 17)])
def test_rank_one_matrix_has_rank_one(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    x = np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1])) * 7.0
    assert spectral.effective_rank(x) == pytest.approx(1.0, abs=1e-9)
    assert spectral.stable_rank(x) == pytest.approx(1.0, abs=1e-9)
    # RankMe's epsilon adds about (k - 1) * eps * log terms: still 1 to 4 digits.
    assert spectral.rankme(x) == pytest.approx(1.0, abs=1e-4)


def test_effective_rank_of_a_known_spectrum() -> None:
    s = np.array([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    x = _with_singular_values(s, 30, 12)
    assert spectral.effective_rank(x) == pytest.approx(expected, rel=1e-10)
    assert spectral.effective_rank(x.T) == pytest.approx(expected, rel=1e-10)
    assert spectral.stable_rank(x) == pytest.approx((s**2).sum() / 16.0, rel=1e-10)
    assert spectral.top_singular_values(x, 2).tolist() == pytest.approx([4.0, 2.0], rel=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_alpha_req_recovers_a_power_law(alpha: float) -> None:
    rng = np.random.default_rng(2)
    n, d = 2000, 60
    z = rng.standard_normal((n, d))
    q, _ = np.linalg.qr(z - z.mean(axis=0))  # orthonormal, zero-mean columns
    sigma = np.arange(1, d + 1, dtype=float) ** (-alpha / 2)  # lambda_i ∝ sigma_i^2 ∝ i^-alpha
    h = (q * sigma) @ np.linalg.qr(rng.standard_normal((d, d)))[0]  # rotate: not axis-aligned
    assert spectral.alpha_req(h) == pytest.approx(alpha, abs=1e-6)
    assert spectral.alpha_req_of_eigenvalues(np.arange(1, 50.0) ** -alpha) == pytest.approx(alpha)


def test_alpha_req_needs_three_eigenvalues() -> None:
    assert math.isnan(spectral.alpha_req_of_eigenvalues(np.array([1.0, 0.5])))
    assert math.isnan(spectral.alpha_req(np.zeros((10, 4))))


def test_lambda_min_of_a_covariance() -> None:
    rng = np.random.default_rng(3)
    h = rng.standard_normal((500, 6)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.1])
    hc = h - h.mean(axis=0)
    expected = np.linalg.eigvalsh(hc.T @ hc / h.shape[0])[0]
    assert spectral.lambda_min(h) == pytest.approx(expected, rel=1e-8)
    assert spectral.lambda_min(h, centre=False) == pytest.approx(
        np.linalg.eigvalsh(h.T @ h / h.shape[0])[0], rel=1e-8
    )
    assert spectral.lambda_min(rng.standard_normal((5, 8))) == 0.0  # d > n - 1: singular


@pytest.mark.parametrize("shape", [(59, 64), (512, 256), (64, 512), (300, 300)])
def test_gram_eigenvalues_agree_with_svd(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape) * np.linspace(1.0, 0.05, shape[1])
    gram = spectral.squared_singular_values(x)
    svd = spectral.squared_singular_values(x, method="svd")
    assert gram.shape == svd.shape == (min(shape),)
    assert np.all(np.diff(gram) <= 0)
    np.testing.assert_allclose(np.sqrt(gram), np.sqrt(svd), rtol=1e-10, atol=1e-12 * np.sqrt(svd[0]))
    for fn in (spectral.effective_rank, spectral.rankme, spectral.stable_rank, spectral.alpha_req):
        assert fn(x) == pytest.approx(fn(x, method="svd"), rel=1e-10)


def test_non_finite_input_gives_nan_never_raises() -> None:
    x = np.eye(4)
    x[1, 2] = np.nan
    for fn in (spectral.effective_rank, spectral.rankme, spectral.stable_rank, spectral.alpha_req,
               spectral.lambda_min):
        assert math.isnan(fn(x))
    assert math.isnan(spectral.cosine_similarity_rows(x, np.eye(4)))
    assert math.isnan(spectral.effective_rank(np.zeros((3, 3))))
    assert math.isnan(spectral.effective_rank(np.full((3, 3), 1e300)))  # the Gram overflows


def test_cosine_and_weight_norm() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert spectral.cosine_similarity_rows(a, a * 3.0) == pytest.approx(1.0)
    assert spectral.cosine_similarity_rows(a, -a) == pytest.approx(-1.0)
    assert math.isnan(spectral.cosine_similarity_rows(a, a[:2]))
    assert spectral.weight_norm([a, np.array([2.0])]) == pytest.approx(math.sqrt(1 + 4 + 2 + 4))


def test_tracker_keeps_state_between_calls() -> None:
    tracker = spectral.SpectralTracker(top_k=2)
    h0 = np.eye(6)
    first = tracker.update("l1", h0, weight=np.diag([3.0, 1.0]))
    assert "effrank_delta" not in first and "cos_stability" not in first
    assert first["effective_rank"] == pytest.approx(6.0)
    assert first["top_sv1"] == pytest.approx(1.0) and first["top_sv2"] == pytest.approx(1.0)
    assert first["weight_stable_rank"] == pytest.approx(10.0 / 9.0)
    assert first["weight_top_sv1"] == pytest.approx(3.0)
    assert first["weight_norm"] == pytest.approx(math.sqrt(10.0))
    # Another key has its own memory.
    assert "effrank_delta" not in tracker.update("l2", h0)
    h1 = np.diag([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    second = tracker.update("l1", h1)
    assert second["effrank_delta"] == pytest.approx(3.0 - 6.0)
    assert second["cos_stability"] == pytest.approx(0.5)  # three rows unchanged, three vanished
    # A checkpoint continues the deltas; reset forgets them.
    restored = spectral.SpectralTracker(top_k=2)
    restored.load_state(tracker.state())
    third = restored.update("l1", h0)
    assert third["effrank_delta"] == pytest.approx(3.0)
    restored.reset("l1")
    assert "effrank_delta" not in restored.update("l1", h0)


def test_tracker_metric_subset() -> None:
    tracker = spectral.SpectralTracker(metrics=frozenset({"effective_rank", "cos_stability"}))
    tracker.update("x", np.eye(3))
    assert sorted(tracker.update("x", np.eye(3))) == ["cos_stability", "effective_rank"]


def test_logged_names_get_the_right_roles() -> None:
    """The detector infers each metric's role from the name the tracker and probe use."""
    expected = {
        "effective_rank": Role.RANK,
        "rankme": Role.RANK,
        "weight_stable_rank": Role.RANK,
        "cos_stability": Role.STABILITY,
        "weight_norm": Role.NORM,
        "alpha_req": Role.OTHER,
        "lambda_min": Role.OTHER,
        "effrank_delta": Role.OTHER,  # a difference: never the rank-collapse evidence
        "top_sv1": Role.OTHER,
        "weight_top_sv1": Role.OTHER,
    }
    tracker = spectral.SpectralTracker(top_k=1)
    tracker.update("layer1", np.eye(5), weight=np.eye(3))
    produced = tracker.update("layer1", np.eye(5), weight=np.eye(3))
    assert set(produced) == set(expected)
    for metric, role in expected.items():
        spec = infer_spec(f"encoder.layer1.{metric}")
        assert spec.role is role, metric
        assert spec.split.value == "train"
