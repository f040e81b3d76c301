"""Seeded synthetic signals with known change points, ruptures-style.

Every generator returns ``(signal, true_breakpoints)``: ``signal`` a 1-D float
array, ``true_breakpoints`` the indices that start a new segment (the TCPD
convention; unlike ruptures, ``n`` itself is not appended). The shapes are those
of training curves: mean shifts, a plateau that ends in a sudden drop, slope
changes, variance changes, spikes, and power-law decays, which are not changes.
O(n) each.

>>> signal, bkps = mean_shifts(n=300, n_bkps=2, delta=3.0, seed=0)
>>> signal.shape, bkps
((300,), [100, 200])
"""

from __future__ import annotations

import numpy as np

from detector.errors import InvalidArgument


def _rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def _even_breakpoints(n: int, n_bkps: int) -> list[int]:
    if n_bkps < 0 or n < n_bkps + 1:
        raise InvalidArgument("need n > n_bkps >= 0")
    return [int(round(n * (k + 1) / (n_bkps + 1))) for k in range(n_bkps)]


def mean_shifts(n: int = 1000, n_bkps: int = 1, delta: float = 2.0, noise_std: float = 1.0,
                seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Gaussian noise whose mean steps by ±``delta`` (alternating sign) at evenly spaced breaks."""
    bkps = _even_breakpoints(n, n_bkps)
    mean = np.zeros(n)
    for k, b in enumerate(bkps):
        mean[b:] += delta if k % 2 == 0 else -delta
    return mean + _rng(seed).normal(0.0, noise_std, n), bkps


def variance_change(n: int = 1000, ratio: float = 4.0, noise_std: float = 1.0,
                    seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Zero-mean noise whose standard deviation is multiplied by ``ratio`` halfway."""
    b = n // 2
    scale = np.where(np.arange(n) < b, noise_std, noise_std * ratio)
    return _rng(seed).normal(0.0, 1.0, n) * scale, [b]


def slope_change(n: int = 1000, slope_before: float = 0.0, slope_after: float = -0.02,
                 noise_std: float = 0.1, seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """A continuous line whose slope changes halfway (a plateau that starts falling)."""
    b = n // 2
    t = np.arange(n, dtype=float)
    line = slope_before * t + np.where(t >= b, (slope_after - slope_before) * (t - b), 0.0)
    return line + _rng(seed).normal(0.0, noise_std, n), [b]


def plateau_drop(n: int = 1000, level: float = 2.0, drop: float = 1.0, decay: float = 0.05,
                 noise_std: float = 0.02, seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """A log-loss plateau that ends in a sudden exponential drop by ``drop`` (grokking)."""
    b = n // 2
    t = np.arange(n, dtype=float)
    y = level - drop * np.where(t >= b, 1.0 - np.exp(-decay * (t - b + 1)), 0.0)
    return y + _rng(seed).normal(0.0, noise_std, n), [b]


def spike(n: int = 1000, height: float = 10.0, width: int = 5, noise_std: float = 1.0,
          seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Noise with one transient spike of ``width`` points at the middle: breaks at both edges."""
    b = n // 2
    y = _rng(seed).normal(0.0, noise_std, n)
    y[b : b + width] += height
    return y, [b, b + width]


def power_law_loss(n: int = 10_000, exponent: float = 0.5, scale: float = 3.0, noise: float = 0.02,
                   offset: float = 10.0, seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """A training loss ``scale · (offset + t)^-exponent`` with multiplicative noise: no change point."""
    t = np.arange(n, dtype=float)
    y = scale * (offset + t) ** -exponent * np.exp(_rng(seed).normal(0.0, noise, n))
    return y, []


def stationary(n: int = 10_000, noise_std: float = 1.0,
               seed: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Gaussian white noise: no change point."""
    return _rng(seed).normal(0.0, noise_std, n), []
