"""Statistics over items: bootstrap confidence intervals, a paired test, and multiple-comparison correction.

Everything is seeded (numpy's PCG64), so an experiment gives the same numbers on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """Mean over items with a percentile-bootstrap interval; `spread` is the bootstrap standard deviation."""

    mean: float
    ci_low: float
    ci_high: float
    spread: float
    n: int  # items that had a finite value


def bootstrap(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[Estimate]:
    """Per column of `values` ([items, columns]; NaN = item left out), the mean and its bootstrap interval.

    Items are resampled with replacement, the same draws for every column (so columns stay comparable).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n_items = values.shape[0]
    finite = np.isfinite(values)
    counts = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, np.nansum(values, axis=0) / counts, np.nan)
    if n_items < 2:
        return [Estimate(float(m), float(m), float(m), 0.0, int(c)) for m, c in zip(means, counts, strict=True)]
    draws = np.random.default_rng(seed).integers(0, n_items, size=(n_boot, n_items))
    filled = np.where(finite, values, 0.0)
    sums = np.stack([filled[d].sum(axis=0) for d in draws])  # [n_boot, columns]
    kept = np.stack([finite[d].sum(axis=0) for d in draws])
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = sums / kept
    alpha = (1 - level) / 2
    low = np.nanquantile(boot, alpha, axis=0)
    high = np.nanquantile(boot, 1 - alpha, axis=0)
    spread = np.nanstd(boot, axis=0)
    return [
        Estimate(float(m), float(lo), float(hi), float(s), int(c))
        for m, lo, hi, s, c in zip(means, low, high, spread, counts, strict=True)
    ]


def paired_sign_flip_p(differences: np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value that paired differences are centred on zero: a sign-flip permutation test of their mean.

    Exact (all 2^n sign patterns) for up to 12 items, else `n_perm` random patterns with the +1 correction.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = len(d)
    if n == 0 or not np.any(d):
        return 1.0
    observed = abs(d.mean())
    if n <= 12:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        means = np.abs(signs @ d) / n
        return float(np.mean(means >= observed - 1e-12 * observed))
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(n_perm, n))
    means = np.abs(signs @ d) / n
    return float((1 + np.sum(means >= observed - 1e-12 * observed)) / (1 + n_perm))


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error control across components), in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
