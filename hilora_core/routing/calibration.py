"""Choosing ``eps`` from the registered samples themselves.

``eps`` sets how sharp every adapter's Gaussian is and, with it, the absolute
level of every score, so it decides the candidate sets. :func:`calibrate_eps`
picks it by leave-one-out: each sample is held out in turn, its adapter's
Gaussian is refitted on the other m - 1 samples, and the held-out sample is
scored as if it were a request. Two criteria:

``candidates`` (default)
    apply the full candidate rule (:func:`select_candidates`) to the held-out
    sample's scores against the whole pool; among the eps at which its own
    adapter lands in the candidate set at ``target_rate`` or more, take the one
    with the smallest mean candidate set.
``own_score``
    the smallest eps at which ``target_rate`` of held-out samples score > 0
    under their own adapter.

The factor of every fit does not depend on eps, so each eps on the grid costs
one closed-form rescoring, not a refit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hilora_core.errors import InvalidInputError
from hilora_core.routing.gaussian import GaussianBank, fit_gaussian, score_from_terms, woodbury_terms
from hilora_core.routing.sequence_routing import candidate_counts


@dataclass(frozen=True)
class EpsCalibration:
    """Result of :func:`calibrate_eps`.

    Attributes:
        eps: the chosen eps.
        rate: at ``eps``, the fraction of held-out samples meeting the criterion.
        criterion: "candidates" or "own_score".
        mean_candidates: mean candidate-set size of held-out samples at ``eps`` ("candidates" only).
        target_rate: what was asked for.
        reached: False when no eps on the grid reached the target (then eps maximises the rate).
        grid: (G,) eps values tried; rates: (G,) the held-out rate at each.
    """

    eps: float
    rate: float
    target_rate: float
    criterion: str
    reached: bool
    grid: np.ndarray
    rates: np.ndarray
    mean_candidates: float | None = None


@dataclass(frozen=True)
class _HeldOut:
    """Everything the held-out scores need, for N leave-one-out fits, padded to K directions."""

    variances: np.ndarray  # (N, K) variances of each fit's factor (0 = padding)
    proj_sq: np.ndarray  # (N, K) squared projections of the held-out sample on each direction
    dist_sq: np.ndarray  # (N,) squared distance of the held-out sample to the fit's mean
    dim: int

    def scores(self, grid: np.ndarray) -> np.ndarray:
        """(N, G) held-out scores (1/d) log N for every eps in grid (G,)."""
        eps = np.broadcast_to(np.asarray(grid, dtype=np.float64)[None, :], (len(self.dist_sq), len(grid)))  # (N, G)
        weights, const = woodbury_terms(self.variances[:, None, :], eps, self.dim)  # (N, G, K), (N, G)
        proj_sq = np.broadcast_to(self.proj_sq[:, None, :], weights.shape)
        return score_from_terms(self.dist_sq[:, None], proj_sq, weights, const, eps, self.dim)


def _held_out_terms(sets: Sequence[np.ndarray]) -> _HeldOut:
    """One leave-one-out fit per sample of every set (the SVDs do not depend on eps)."""
    rows = []
    for z in sets:
        m = z.shape[0]
        for h in range(m):
            rest = np.delete(z, h, axis=0)
            mu = rest.mean(axis=0)
            _, s, vt = np.linalg.svd(rest - mu, full_matrices=False)
            keep = s > 1e-10 * max(float(s[0]), 1e-300)
            delta = z[h] - mu
            rows.append((s[keep] ** 2 / (m - 2), (vt[keep] @ delta) ** 2, float(delta @ delta)))
    k = max(1, max(len(r[0]) for r in rows))
    lam = np.zeros((len(rows), k))
    proj = np.zeros((len(rows), k))
    for i, (v, p, _) in enumerate(rows):
        lam[i, : len(v)] = v
        proj[i, : len(p)] = p
    return _HeldOut(lam, proj, np.array([r[2] for r in rows]), sets[0].shape[1])


def candidate_stats(scores: np.ndarray, own: np.ndarray,
                    max_candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whether each query's own adapter lands in its candidate set, and the set sizes.

    Args:
        scores: (N, I) scores of N queries; own: (N,) the index of each query's own adapter.

    Returns:
        (N,) bool own adapter in the candidate set, (N,) int candidate-set sizes.
    """
    n, n_ad = scores.shape
    sizes = candidate_counts(scores, max_candidates)
    own_score = scores[np.arange(n), own]
    # rank of the own adapter in select_candidates' order (score desc, lower index first on ties)
    ahead = (scores > own_score[:, None]).sum(axis=1)
    ahead += ((scores == own_score[:, None]) & (np.arange(n_ad)[None, :] < own[:, None])).sum(axis=1)
    return ahead < sizes, sizes


def calibrate_eps(
    sample_sets: Sequence[np.ndarray],
    target_rate: float = 0.9,
    grid: np.ndarray | None = None,
    max_adapters: int | None = 128,
    seed: int = 0,
    criterion: str = "candidates",
    max_candidates: int | None = None,
    loo: LeaveOneOutScores | None = None,
) -> EpsCalibration:
    """Pick eps by leave-one-out over the adapters' sample embeddings (see the module docstring).

    Args:
        sample_sets: one (m_i, d) array per adapter, m_i >= 3 (leave-one-out refits on m_i - 1 >= 2).
        target_rate: wanted rate of the criterion, in (0, 1].
        grid: eps values to try (default: 31 log-spaced values from 1e-4 to 1e2 times the
            mean per-coordinate variance of the samples, so the grid follows the space's scale;
            the "candidates" criterion then refines around the best one).
        max_adapters: use a random subset of this many adapters for large pools (None: all).
        seed: for that subset.
        criterion: "candidates" or "own_score".
        max_candidates: the cap on |C| the router will use ("candidates" only).
        loo: the leave-one-out fits of these sets' calibration subset, when the caller already has
            them (:func:`hilora_core.routing.pool.fit_pool` shares them with the off-pool threshold).
    """
    if not 0.0 < target_rate <= 1.0:
        raise InvalidInputError(f"target_rate must be in (0, 1], got {target_rate!r}")
    if criterion not in ("candidates", "own_score"):
        raise InvalidInputError(f"criterion must be 'candidates' or 'own_score', got {criterion!r}")
    sets = [np.asarray(s, dtype=np.float64) for s in sample_sets]
    if not sets:
        raise InvalidInputError("calibrate_eps needs at least one adapter's samples, got none")
    dims = {s.shape[1] for s in sets}
    if len(dims) != 1:
        raise InvalidInputError(f"sample sets have different dimensions {sorted(dims)}")
    for i, s in enumerate(sets):
        if s.shape[0] < 3:
            raise InvalidInputError(f"adapter {i} has {s.shape[0]} samples; leave-one-out needs at least 3")
    if loo is None:
        loo = LeaveOneOutScores(subset_for_calibration(sets, max_adapters, seed))
    if grid is None:
        pooled = np.concatenate(loo.sets)
        var = float(((pooled - pooled.mean(axis=0)) ** 2).mean())
        grid = max(var, 1e-300) * np.logspace(-4, 2, 31)
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    if criterion == "own_score":
        return _calibrate_own_score(loo.held, grid, target_rate)
    return _calibrate_candidates(loo, grid, target_rate, max_candidates)


def _calibrate_own_score(held: _HeldOut, grid: np.ndarray, target_rate: float) -> EpsCalibration:
    scores = held.scores(grid)  # (N, G)
    rates = (scores > 0).mean(axis=0)  # (G,)
    hit = np.flatnonzero(rates >= target_rate)
    if hit.size == 0:
        # target not reachable: the highest rate, ties (e.g. all 0) broken by the best median score
        median = np.median(scores, axis=0)
        best = int(np.lexsort((-median, -rates))[0])
        return EpsCalibration(float(grid[best]), float(rates[best]), target_rate, "own_score", False, grid, rates)
    first = int(hit[0])
    eps = float(grid[first])
    if first > 0:  # refine between the last miss and the first hit, on a fine log grid
        fine = np.exp(np.linspace(math.log(grid[first - 1]), math.log(grid[first]), 65))
        fine_rates = (held.scores(fine) > 0).mean(axis=0)
        eps = float(fine[np.flatnonzero(fine_rates >= target_rate)[0]])
    rate = float((held.scores(np.array([eps])) > 0).mean())
    return EpsCalibration(eps, rate, target_rate, "own_score", True, grid, rates)


class LeaveOneOutScores:
    """Every registered sample routed as if it were a request, its own adapter refitted without it.

    Built once from the pool's sample sets (the SVDs and distance terms do not depend on eps);
    :meth:`scores` then gives the (N, I) score matrix at any eps: row n is sample n scored
    against every adapter, with its own adapter's column replaced by the leave-one-out fit.

    Attributes:
        owner: (N,) the adapter index of each sample.
    """

    def __init__(self, sets: Sequence[np.ndarray]) -> None:
        self.sets = [np.asarray(s, dtype=np.float64) for s in sets]
        bank = GaussianBank([fit_gaussian(s, 1.0) for s in self.sets], dtype=np.float64)
        self._bank = bank
        self.held = _held_out_terms(self.sets)
        self.owner = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
        self._dist_sq, self._proj_sq = bank.distance_terms(np.concatenate(self.sets))  # eps-independent

    def scores(self, eps: float) -> np.ndarray:
        """(N, I) leave-one-out scores at ``eps``."""
        scores = self._bank.with_eps(eps).score_from_terms(self._dist_sq, self._proj_sq)
        scores[np.arange(len(self.owner)), self.owner] = self.held.scores(np.array([eps]))[:, 0]
        return scores


def subset_for_calibration(sets: Sequence[np.ndarray], max_adapters: int | None, seed: int) -> list[np.ndarray]:
    """The sample sets calibration uses: all of them, or a seeded subset of ``max_adapters``."""
    if max_adapters is None or len(sets) <= max_adapters:
        return list(sets)
    pick = np.random.default_rng(seed).choice(len(sets), size=max_adapters, replace=False)
    return [sets[i] for i in sorted(pick)]


def _calibrate_candidates(loo: LeaveOneOutScores, grid, target_rate, max_candidates) -> EpsCalibration:

    def stats(eps: float) -> tuple[float, float]:
        hit, size = candidate_stats(loo.scores(eps), loo.owner, max_candidates)
        return float(hit.mean()), float(size.mean())

    def pick(eps_values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, bool]:
        res = np.array([stats(float(e)) for e in eps_values])
        rates, sizes = res[:, 0], res[:, 1]
        ok = np.flatnonzero(rates >= target_rate)
        if ok.size:  # smallest mean candidate set among those reaching the target; then the higher rate
            return int(ok[np.lexsort((-rates[ok], sizes[ok]))[0]]), rates, sizes, True
        return int(np.lexsort((sizes, -rates))[0]), rates, sizes, False

    best, rates, sizes, reached = pick(grid)
    # refine between the neighbours of the best grid point
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    fine = np.exp(np.linspace(np.log(lo), np.log(hi), 9))
    fbest, frates, fsizes, freached = pick(fine)
    if freached or not reached:
        eps, rate, size = float(fine[fbest]), float(frates[fbest]), float(fsizes[fbest])
        reached = reached or freached
    else:
        eps, rate, size = float(grid[best]), float(rates[best]), float(sizes[best])
    return EpsCalibration(eps, rate, target_rate, "candidates", reached, grid, rates, mean_candidates=size)
