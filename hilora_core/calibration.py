"""Choosing ``eps`` from the registered samples themselves.

``eps`` sets the absolute level of every score and so where the seen/unseen
threshold (score 0) falls. :func:`calibrate_eps` picks it by leave-one-out:
each sample is held out in turn, the Gaussian is refitted on the other m - 1,
and we find the smallest ``eps`` at which a ``target_rate`` fraction of held-out
samples score above 0 under their own adapter's Gaussian. The smallest such eps
gives the tightest candidate sets that still admit the own adapter at that rate.

The factor of each leave-one-out fit does not depend on eps, so every eps on
the grid is scored from the same SVDs in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError
from .gaussian import LOG_2PI


@dataclass(frozen=True)
class EpsCalibration:
    """Result of :func:`calibrate_eps`.

    Attributes:
        eps: the chosen eps.
        rate: fraction of held-out samples scoring > 0 at ``eps``.
        target_rate: what was asked for.
        reached: False when no eps on the grid reached the target (then eps maximises the rate).
        grid: (G,) eps values tried; rates: (G,) the held-out rate at each.
    """

    eps: float
    rate: float
    target_rate: float
    reached: bool
    grid: np.ndarray
    rates: np.ndarray


def _loo_terms(z: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Per held-out sample: (variances (k,), squared projections (k,), |delta|^2)."""
    m = z.shape[0]
    out = []
    for h in range(m):
        rest = np.delete(z, h, axis=0)
        mu = rest.mean(axis=0)
        _, s, vt = np.linalg.svd(rest - mu, full_matrices=False)
        keep = s > 1e-10 * max(float(s[0]), 1e-300)
        lam = s[keep] ** 2 / (m - 2) if m > 2 else np.zeros(0)
        delta = z[h] - mu
        proj_sq = (vt[keep] @ delta) ** 2 if m > 2 else np.zeros(0)
        out.append((lam, proj_sq, float(delta @ delta)))
    return out


def _scores_on_grid(terms, grid: np.ndarray, d: int) -> np.ndarray:
    """(G,) held-out scores of one leave-one-out fit for every eps on the grid."""
    lam, proj_sq, dsq = terms
    eps = grid[:, None]  # (G, 1)
    logdet = d * np.log(grid) + np.log1p(lam[None, :] / eps).sum(axis=1)
    explained = (lam[None, :] / (lam[None, :] + eps) * proj_sq[None, :]).sum(axis=1)
    maha = (dsq - explained) / grid
    return -0.5 * (d * LOG_2PI + logdet + maha) / d


def calibrate_eps(
    sample_sets: Sequence[np.ndarray],
    target_rate: float = 0.9,
    grid: np.ndarray | None = None,
    max_adapters: int | None = 256,
    seed: int = 0,
) -> EpsCalibration:
    """Pick eps by leave-one-out over the adapters' sample embeddings.

    Args:
        sample_sets: one (m_i, d) array per adapter, m_i >= 3 (m_i = 2 leaves one sample per fit).
        target_rate: wanted fraction of held-out samples with score > 0, in (0, 1].
        grid: eps values to try (default: 241 log-spaced values in [1e-7, 10]).
        max_adapters: use a random subset of this many adapters for large pools (None: all).
        seed: for that subset.
    """
    if not 0.0 < target_rate <= 1.0:
        raise InvalidInputError(f"target_rate must be in (0, 1], got {target_rate!r}")
    sets = [np.asarray(s, dtype=np.float64) for s in sample_sets]
    if not sets:
        raise InvalidInputError("calibrate_eps needs at least one adapter's samples, got none")
    dims = {s.shape[1] for s in sets}
    if len(dims) != 1:
        raise InvalidInputError(f"sample sets have different dimensions {sorted(dims)}")
    for i, s in enumerate(sets):
        if s.shape[0] < 3:
            raise InvalidInputError(f"adapter {i} has {s.shape[0]} samples; leave-one-out needs at least 3")
    d = dims.pop()
    if max_adapters is not None and len(sets) > max_adapters:
        pick = np.random.default_rng(seed).choice(len(sets), size=max_adapters, replace=False)
        sets = [sets[i] for i in sorted(pick)]
    grid = np.logspace(-7, 1, 241) if grid is None else np.sort(np.asarray(grid, dtype=np.float64))
    scores = np.stack([_scores_on_grid(t, grid, d) for s in sets for t in _loo_terms(s)])  # (N, G)
    rates = (scores > 0).mean(axis=0)  # (G,)
    hit = np.flatnonzero(rates >= target_rate)
    if hit.size == 0:
        # target not reachable: the highest rate, ties (e.g. all 0) broken by the best median score
        median = np.median(scores, axis=0)
        best = int(np.lexsort((-median, -rates))[0])
        return EpsCalibration(float(grid[best]), float(rates[best]), target_rate, False, grid, rates)
    first = int(hit[0])
    eps = float(grid[first])
    if first > 0:  # bisect in log space between the last miss and the first hit
        lo, hi = math.log(grid[first - 1]), math.log(grid[first])
        all_terms = [t for s in sets for t in _loo_terms(s)]
        for _ in range(20):
            mid = 0.5 * (lo + hi)
            rate = np.mean([_scores_on_grid(t, np.array([math.exp(mid)]), d)[0] > 0 for t in all_terms])
            lo, hi = (lo, mid) if rate >= target_rate else (mid, hi)
        eps = math.exp(hi)
    rate = float(np.mean([_scores_on_grid(t, np.array([eps]), d)[0] > 0 for s in sets for t in _loo_terms(s)]))
    return EpsCalibration(eps, rate, target_rate, True, grid, rates)
