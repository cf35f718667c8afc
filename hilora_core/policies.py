"""Routing policies: the paper's methods as functions from scores to RoutingPlans.

Every policy sees the same inputs for one query: the adapter names, their
ranks, the HiLoRA Gaussian scores (n, I) and/or the cosine similarity of the
query to each adapter's mean sample embedding (n, I). It returns one
:class:`RoutingPlan` per query.

| policy      | sequence level                      | token level                            |
|-------------|-------------------------------------|----------------------------------------|
| hilora      | Gaussian scores -> C, budget O, o_i | top-o_i ROCs per adapter, sqrt(rbar/O) |
| hilora_gs   | same C                              | all ROCs of C, sqrt(rbar/O)            |
| hilora_roc  | all adapters                        | top-k ROCs over the pool (k = 24)      |
| retriever   | top-k by cosine (k = 3)             | uniform mixture of the k adapters      |
| arrow       | all adapters                        | top-k adapters per token by |x . v_i|  |
| ensemble    | all adapters                        | outputs averaged over separate passes  |
| merged      | all adapters                        | uniform average of the deltas          |
| explicit    | the caller's adapters               | all ROCs (plain LoRA for one adapter)  |
| base        | none                                | none                                   |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DimensionMismatchError, EmptyPoolError, InvalidInputError, UnknownAdapterError
from .plan import RoutingPlan
from .sequence_routing import allocate_rocs, select_candidates

POLICIES: tuple[str, ...] = (
    "hilora", "hilora_gs", "hilora_roc", "retriever", "arrow", "ensemble", "merged", "explicit", "base",
)
DEFAULT_TOP_K = {"hilora_roc": 24, "retriever": 3, "arrow": 3}


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of a routing policy.

    Attributes:
        name: one of :data:`POLICIES`.
        gamma: HiLoRA's ROC budget fraction, in (0, 1].
        max_candidates: optional cap on |C| (None: the paper's uncapped rule).
        top_k: k of retriever / arrow / hilora_roc (None: 3 / 3 / 24).
        seed: None for deterministic allocation; an int seeds multinomial sampling.
        signed: rank ROCs by signed projection (ablation of the |p| rule).
        arrow_temperature: softmax temperature of the Arrow rule.
        fallback: serve requests that the pool's off-pool test flags with the base model alone
            (:mod:`hilora_core.fallback`); False gives the paper's behaviour (always route).
            Applies to every policy that routes (not ``explicit`` or ``base``).
    """

    name: str = "hilora"
    gamma: float = 0.4
    max_candidates: int | None = None
    top_k: int | None = None
    seed: int | None = None
    signed: bool = False
    arrow_temperature: float = 1.0
    fallback: bool = True

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise InvalidInputError(f"unknown policy {self.name!r}; choose one of {list(POLICIES)}")
        if not 0.0 < self.gamma <= 1.0:
            raise InvalidInputError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise InvalidInputError(f"max_candidates must be >= 1, got {self.max_candidates!r}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k!r}")
        if self.arrow_temperature <= 0:
            raise InvalidInputError(f"arrow_temperature must be > 0, got {self.arrow_temperature!r}")

    @property
    def k(self) -> int:
        return self.top_k if self.top_k is not None else DEFAULT_TOP_K.get(self.name, 3)

    @property
    def needs_gaussian_scores(self) -> bool:
        return self.name in ("hilora", "hilora_gs")

    @property
    def needs_cosine(self) -> bool:
        return self.name == "retriever"

    @property
    def may_fall_back(self) -> bool:
        """Whether the off-pool test applies to this policy's requests."""
        return self.fallback and self.name not in ("explicit", "base")


def cosine_similarity(z: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(n, d) queries x (I, d) adapter mean embeddings -> (n, I) cosine similarity."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    m = np.asarray(means, dtype=np.float64)
    if z.shape[1] != m.shape[1]:
        raise DimensionMismatchError(f"query dimension {z.shape[1]} != adapter mean dimension {m.shape[1]}")
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    mn = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return zn @ mn.T


def _hilora_plan(cfg: PolicyConfig, names, ranks, row, rng) -> RoutingPlan:
    cand = select_candidates(row, cfg.max_candidates)
    cand_ranks = ranks[cand]
    if cfg.name == "hilora_gs":
        rocs = cand_ranks
    else:
        rocs = allocate_rocs(row[cand], cand_ranks, cfg.gamma, rng=rng)
    keep = rocs > 0  # an adapter that drew no ROC contributes nothing: leave it out of the plan
    if cfg.name == "hilora_gs":
        keep[:] = True
    return RoutingPlan(
        adapters=tuple(names[i] for i in cand[keep]),
        rocs=tuple(int(o) for o in rocs[keep]),
        signed=cfg.signed,
        scores=tuple(float(row[i]) for i in cand[keep]),
    )


def make_plans(
    cfg: PolicyConfig,
    names: Sequence[str],
    ranks: Sequence[int],
    scores: np.ndarray | None = None,
    cosine: np.ndarray | None = None,
    explicit: Sequence[str] | None = None,
    n_queries: int | None = None,
    off_pool: np.ndarray | None = None,
) -> list[RoutingPlan]:
    """One plan per query.

    Args:
        cfg: the policy and its settings.
        names: (I,) adapter names in pool order.
        ranks: (I,) their ranks.
        scores: (n, I) Gaussian scores (hilora, hilora_gs).
        cosine: (n, I) cosine to the adapter means (retriever).
        explicit: adapter names for the explicit policy.
        n_queries: n, when neither scores nor cosine is given.
        off_pool: (n,) True for queries the pool does not cover (:meth:`PoolModel.off_pool_rows`);
            with ``cfg.fallback`` they get the base-model plan whatever the policy.

    Returns:
        n plans. ``hilora`` with ``cfg.seed`` set draws from one Generator seeded once.
    """
    plans = _policy_plans(cfg, names, ranks, scores, cosine, explicit, n_queries)
    if off_pool is not None and cfg.may_fall_back:
        flags = np.asarray(off_pool, dtype=bool).ravel()
        if flags.shape != (len(plans),):
            raise DimensionMismatchError(f"off_pool has {flags.size} flags for {len(plans)} queries")
        plans = [RoutingPlan() if off else plan for plan, off in zip(plans, flags, strict=True)]
    return plans


def _policy_plans(cfg, names, ranks, scores, cosine, explicit, n_queries) -> list[RoutingPlan]:
    names = list(names)
    ranks_arr = np.asarray(ranks, dtype=np.int64)
    if ranks_arr.shape != (len(names),):
        raise DimensionMismatchError(f"{len(names)} adapter names but ranks of shape {ranks_arr.shape}")
    if np.any(ranks_arr < 1):
        raise InvalidInputError(f"ranks must be >= 1, got {ranks_arr.tolist()}")
    if cfg.name != "base" and cfg.name != "explicit" and not names:
        raise EmptyPoolError(f"policy {cfg.name!r} needs at least one registered adapter; the pool is empty")
    matrix = scores if cfg.needs_gaussian_scores else cosine if cfg.needs_cosine else None
    if (cfg.needs_gaussian_scores or cfg.needs_cosine) and matrix is None:
        raise InvalidInputError(f"policy {cfg.name!r} needs {'scores' if cfg.needs_gaussian_scores else 'cosine'}")
    if matrix is not None:
        matrix = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
        if matrix.shape[1] != len(names):
            raise DimensionMismatchError(f"score matrix has {matrix.shape[1]} columns for {len(names)} adapters")
        n = matrix.shape[0]
    else:
        n = n_queries if n_queries is not None else (len(scores) if scores is not None else 1)

    everyone = tuple(names)
    if cfg.name == "hilora" or cfg.name == "hilora_gs":
        rng = None if cfg.seed is None else np.random.default_rng(cfg.seed)
        return [_hilora_plan(cfg, names, ranks_arr, matrix[q], rng) for q in range(n)]
    if cfg.name == "retriever":
        k = min(cfg.k, len(names))
        plans = []
        for q in range(n):
            top = np.lexsort((np.arange(len(names)), -matrix[q]))[:k]
            plans.append(RoutingPlan(adapters=tuple(names[i] for i in top), weights=(1.0 / k,) * k,
                                     normalize=False, scores=tuple(float(matrix[q, i]) for i in top)))
        return plans
    if cfg.name == "hilora_roc":
        k = min(cfg.k, int(ranks_arr.sum()))
        # HiLoRA's normalisation with O = k activated ROCs over the whole pool
        plan = RoutingPlan(adapters=everyone, token_rule="global_topk", top_k=k, signed=cfg.signed,
                           scale=float(np.sqrt(ranks_arr.mean() / k)), normalize=False)
        return [plan] * n
    if cfg.name == "arrow":
        plan = RoutingPlan(adapters=everyone, token_rule="arrow", top_k=min(cfg.k, len(names)), normalize=False)
        return [plan] * n
    if cfg.name == "ensemble":
        return [RoutingPlan(adapters=everyone, weights=(1.0 / len(names),) * len(names),
                            normalize=False, ensemble=True)] * n
    if cfg.name == "merged":
        return [RoutingPlan(adapters=everyone, weights=(1.0 / len(names),) * len(names), normalize=False)] * n
    if cfg.name == "explicit":
        chosen = tuple(explicit or ())
        if not chosen:
            raise InvalidInputError("the explicit policy needs at least one adapter name")
        unknown = [a for a in chosen if a not in names]
        if unknown:
            raise UnknownAdapterError(f"unknown adapter(s) {unknown}; registered: {names[:20]}")
        return [RoutingPlan(adapters=chosen, normalize=False)] * n
    return [RoutingPlan()] * n  # base

