"""Sequence level of HiLoRA: which adapters (candidate set) and how many ROCs each.

Reads top to bottom: :func:`candidate_counts` (the candidate rule, the only place it is
written), :func:`select_candidates`, :func:`roc_budget`, :func:`allocate_rocs`.
"""

from __future__ import annotations

import math

import numpy as np

from hilora_core.errors import EmptyPoolError, InvalidInputError


def _as_finite_vector(name: str, values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D array, got shape {v.shape}")
    if v.size == 0:
        raise EmptyPoolError(f"{name} is empty: the adapter pool has no adapters")
    if not np.all(np.isfinite(v)):
        raise InvalidInputError(f"{name} contains a non-finite value: {v[~np.isfinite(v)][0]!r}")
    return v


def _order_by_score(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep the lower index first."""
    return np.lexsort((np.arange(scores.size), -scores))


def candidate_counts(scores: np.ndarray, max_candidates: int | None = None) -> np.ndarray:
    """|C(x)| for each query: the candidate rule.

    If any score is > 0, C is every adapter scoring > 0 (a "seen" task). Otherwise C is the
    top ``c = max(1, ceil(-max score))`` adapters: the further the query is from every
    adapter, the wider the set. Never more than the pool, nor than ``max_candidates``.

    Args:
        scores: (n, I) scores of n queries against I adapters (finite).
        max_candidates: optional cap on |C|.

    Returns:
        (n,) int64 candidate-set sizes, each in [1, I].
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    top = s.max(axis=1)
    count = np.where(top > 0, (s > 0).sum(axis=1), np.maximum(1, np.ceil(-top))).astype(np.int64)
    cap = s.shape[1] if max_candidates is None else min(s.shape[1], max_candidates)
    return np.minimum(count, cap)


def select_candidates(scores: np.ndarray, max_candidates: int | None = None) -> np.ndarray:
    """The candidate set C(x) from one query's adapter scores (:func:`candidate_counts`).

    Args:
        scores: (I,) the query's scores against all adapters.
        max_candidates: optional cap on |C| (keeps the best-scoring ones).

    Returns:
        (|C|,) int64 adapter indices, best score first.
    """
    s = _as_finite_vector("scores", scores)
    if max_candidates is not None and max_candidates < 1:
        raise InvalidInputError(f"max_candidates must be >= 1 or None, got {max_candidates!r}")
    order = _order_by_score(s)
    return order[: int(candidate_counts(s, max_candidates)[0])].astype(np.int64)


def roc_budget(ranks: np.ndarray, gamma: float) -> int:
    """Total ROCs to activate: ``max(1, round(gamma * sum r))`` (half rounds up)."""
    r = np.asarray(ranks)
    if not 0.0 < gamma <= 1.0 or not math.isfinite(gamma):
        raise InvalidInputError(f"gamma must be in (0, 1], got {gamma!r}")
    if r.size == 0:
        raise EmptyPoolError("no candidate adapters to budget ROCs for")
    if np.any(r < 1):
        raise InvalidInputError(f"ranks must be >= 1, got {r.tolist()}")
    return max(1, int(math.floor(gamma * float(r.sum()) + 0.5)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to ``total`` closest to ``total * weights`` (weights sum to 1).

    Leftover units go to the largest fractional parts; ties to the larger weight, then lower index.
    """
    exact = total * weights
    base = np.floor(exact).astype(np.int64)
    left = total - int(base.sum())
    if left > 0:
        frac = exact - base
        order = np.lexsort((np.arange(weights.size), -weights, -frac))
        base[order[:left]] += 1
    return base


def allocate_rocs(
    cand_scores: np.ndarray,
    ranks: np.ndarray,
    gamma: float,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """ROCs per candidate adapter: ``o ~ Multinomial(O, softmax(scores))`` with ``o_i <= r_i``.

    Units drawn beyond an adapter's rank are redistributed over the adapters
    that still have room, in proportion to their softmax weight, until none
    is left (O <= sum r always holds since gamma <= 1).

    Args:
        cand_scores: (|C|,) scores of the candidates.
        ranks: (|C|,) their LoRA ranks, >= 1.
        gamma: budget fraction in (0, 1].
        rng: a numpy Generator or seed for sampling; None gives the deterministic
            mode (expected counts rounded by largest remainder).

    Returns:
        (|C|,) int64 ROC counts, summing to :func:`roc_budget`.
    """
    s = _as_finite_vector("cand_scores", cand_scores)
    r = np.asarray(ranks)
    if r.shape != s.shape:
        raise InvalidInputError(f"ranks shape {r.shape} does not match cand_scores shape {s.shape}")
    if not np.all(np.equal(np.mod(r, 1), 0)):
        raise InvalidInputError(f"ranks must be integers, got {r.tolist()}")
    r = r.astype(np.int64)
    total = roc_budget(r, gamma)
    pi = softmax(s)
    if rng is not None and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)

    def draw(units: int, eligible: np.ndarray) -> np.ndarray:
        w = np.where(eligible, pi, 0.0)
        if w.sum() <= 0:  # softmax underflowed for every eligible adapter: share evenly
            w = eligible.astype(np.float64)
        w = w / w.sum()
        return rng.multinomial(units, w).astype(np.int64) if rng is not None else _largest_remainder(units, w)

    o = draw(total, np.ones(s.size, dtype=bool))
    for _ in range(s.size + 1):
        excess = int(np.maximum(o - r, 0).sum())
        if excess == 0:
            break
        o = np.minimum(o, r)
        o = o + draw(excess, o < r)
    assert int(o.sum()) == total and np.all(o <= r), (o, r, total)
    return o
