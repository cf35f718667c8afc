"""Routing policies: the one table from a policy name to the function that makes its plans.

| policy      | input   | sequence level                      | token level                            |
|-------------|---------|-------------------------------------|----------------------------------------|
| hilora      | scores  | Gaussian scores -> C, budget O, o_i | top-o_i ROCs per adapter, sqrt(rbar/O) |
| hilora_gs   | scores  | same C                              | all ROCs of C, sqrt(rbar/O)            |
| hilora_roc  | -       | all adapters                        | top-k ROCs over the pool (k = 24)      |
| retriever   | cosine  | top-k by cosine (k = 3)             | uniform mixture of the k adapters      |
| arrow       | -       | all adapters                        | top-k adapters per token by |x . v_i|  |
| ensemble    | -       | all adapters                        | outputs averaged over separate passes  |
| merged      | -       | all adapters                        | uniform average of the deltas          |
| explicit    | -       | the caller's adapters               | all ROCs (plain LoRA for one adapter)  |
| base        | -       | none                                | none                                   |

``scores`` are HiLoRA's Gaussian scores (n, I), ``cosine`` the cosine of each query to each
adapter's mean sample embedding (n, I). The paper's method lives in :mod:`hilora_core.routing`, the
others in :mod:`hilora_core.baselines`. Adding a policy: a module there, a :class:`Policy` member
and a line in :data:`POLICY_TABLE`. Instance-level baselines that need the model itself (LoGo,
qa-FLoRA) are not table policies: the evaluation harness runs them.

Every routing policy is gated by the pool's off-pool test (:mod:`hilora_core.routing.fallback`):
with ``PolicyConfig.fallback``, flagged queries get the base-model plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from hilora_core.baselines.arrow import arrow_route
from hilora_core.baselines.hilora_roc import hilora_roc_route
from hilora_core.baselines.mixtures import ensemble_route, merged_route
from hilora_core.baselines.retriever import retriever_route
from hilora_core.errors import DimensionMismatchError, EmptyPoolError, InvalidInputError, UnknownAdapterError
from hilora_core.plan import Routed, RoutingPlan
from hilora_core.routing.hilora import hilora_route


class Policy(str, Enum):
    """The policy names (the only spelling of them)."""

    HILORA = "hilora"
    HILORA_GS = "hilora_gs"
    HILORA_ROC = "hilora_roc"
    RETRIEVER = "retriever"
    ARROW = "arrow"
    ENSEMBLE = "ensemble"
    MERGED = "merged"
    EXPLICIT = "explicit"
    BASE = "base"


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of a routing policy.

    Attributes:
        name: a :class:`Policy` (or its string value).
        gamma: HiLoRA's ROC budget fraction, in (0, 1].
        max_candidates: optional cap on |C| (None: the paper's uncapped rule).
        top_k: k of retriever / arrow / hilora_roc (None: the table's default, 3 / 3 / 24).
        seed: None for deterministic allocation; an int seeds multinomial sampling.
        signed: rank ROCs by signed projection (ablation of the |p| rule).
        fallback: serve requests that the pool's off-pool test flags with the base model alone
            (:mod:`hilora_core.routing.fallback`); False gives the paper's behaviour (always route).
            Applies to every policy that routes (not ``explicit`` or ``base``).
    """

    name: Policy | str = Policy.HILORA
    gamma: float = 0.4
    max_candidates: int | None = None
    top_k: int | None = None
    seed: int | None = None
    signed: bool = False
    fallback: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "name", Policy(self.name))
        except ValueError:
            raise InvalidInputError(f"unknown policy {self.name!r}; choose one of {list(POLICIES)}") from None
        if not 0.0 < self.gamma <= 1.0:
            raise InvalidInputError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise InvalidInputError(f"max_candidates must be >= 1, got {self.max_candidates!r}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"the routing seed must be in [0, 2**63), got {self.seed!r}")

    @property
    def policy(self) -> Policy:
        """``name`` as a :class:`Policy` (construction normalises it; this says so to the type checker)."""
        return Policy(self.name)

    @property
    def spec(self) -> PolicySpec:
        return POLICY_TABLE[self.policy]

    @property
    def k(self) -> int:
        return self.top_k if self.top_k is not None else self.spec.default_k

    @property
    def needs_gaussian_scores(self) -> bool:
        return self.spec.input == "scores"

    @property
    def needs_cosine(self) -> bool:
        return self.spec.input == "cosine"

    @property
    def may_fall_back(self) -> bool:
        """Whether the off-pool test applies to this policy's requests."""
        return self.fallback and self.spec.routes


@dataclass(frozen=True)
class PolicyQueries:
    """What a policy routes: n queries against the pool ``names`` (I,) of ``ranks`` (I,).

    ``matrix`` is the (n, I) input the policy's table entry asks for (scores or cosine), else None;
    ``explicit`` the caller's adapter names (explicit policy).
    """

    names: list[str]
    ranks: np.ndarray
    n: int
    matrix: np.ndarray | None = None
    explicit: tuple[str, ...] = ()

    @property
    def required_matrix(self) -> np.ndarray:
        """``matrix``, for the policies that take one (:func:`route_queries` has checked it is given)."""
        if self.matrix is None:
            raise InvalidInputError("this policy needs a score or cosine matrix")
        return self.matrix


@dataclass(frozen=True)
class PolicySpec:
    """One row of the table: the plan function, its input, its default k, whether it routes."""

    route: Callable[[PolicyConfig, PolicyQueries], list[Routed]]
    input: str | None = None  # "scores", "cosine" or None
    default_k: int = 3
    routes: bool = True  # False: explicit and base choose no adapters by themselves


def _explicit(cfg: PolicyConfig, q: PolicyQueries) -> list[Routed]:
    if not q.explicit:
        raise InvalidInputError("the explicit policy needs at least one adapter name")
    unknown = [a for a in q.explicit if a not in q.names]
    if unknown:
        raise UnknownAdapterError(f"unknown adapter(s) {unknown}; registered: {q.names[:20]}")
    return [Routed(RoutingPlan(adapters=q.explicit, normalize=False))] * q.n


POLICY_TABLE: dict[Policy, PolicySpec] = {
    Policy.HILORA: PolicySpec(lambda c, q: hilora_route(q.required_matrix, q.names, q.ranks, c.gamma,
                                                        c.max_candidates, c.seed, c.signed), "scores"),
    Policy.HILORA_GS: PolicySpec(lambda c, q: hilora_route(q.required_matrix, q.names, q.ranks, c.gamma,
                                                           c.max_candidates, c.seed, c.signed, all_rocs=True),
                                 "scores"),
    Policy.HILORA_ROC: PolicySpec(lambda c, q: hilora_roc_route(q.names, q.ranks, q.n, c.k, c.signed),
                                  default_k=24),
    Policy.RETRIEVER: PolicySpec(lambda c, q: retriever_route(q.required_matrix, q.names, c.k), "cosine"),
    Policy.ARROW: PolicySpec(lambda c, q: arrow_route(q.names, q.n, c.k)),
    Policy.ENSEMBLE: PolicySpec(lambda c, q: ensemble_route(q.names, q.n)),
    Policy.MERGED: PolicySpec(lambda c, q: merged_route(q.names, q.n)),
    Policy.EXPLICIT: PolicySpec(_explicit, routes=False),
    Policy.BASE: PolicySpec(lambda c, q: [Routed(RoutingPlan())] * q.n, routes=False),
}
POLICIES: tuple[str, ...] = tuple(p.value for p in Policy)


def route_queries(
    cfg: PolicyConfig,
    names: Sequence[str],
    ranks: Sequence[int] | np.ndarray,
    scores: np.ndarray | None = None,
    cosine: np.ndarray | None = None,
    explicit: Sequence[str] | None = None,
    n_queries: int | None = None,
    off_pool: np.ndarray | None = None,
) -> list[Routed]:
    """One :class:`Routed` (plan and candidates) per query.

    Args:
        cfg: the policy and its settings.
        names: (I,) adapter names in pool order.
        ranks: (I,) their ranks.
        scores: (n, I) Gaussian scores (policies whose input is ``scores``).
        cosine: (n, I) cosine to the adapter means (``cosine``).
        explicit: adapter names for the explicit policy.
        n_queries: n, when the policy takes no matrix.
        off_pool: (n,) True for queries the pool does not cover (:meth:`PoolModel.off_pool_rows`);
            with ``cfg.fallback`` they get the base-model plan whatever the policy.
    """
    names = list(names)
    ranks_arr = np.asarray(ranks, dtype=np.int64)
    if ranks_arr.shape != (len(names),):
        raise DimensionMismatchError(f"{len(names)} adapter names but ranks of shape {ranks_arr.shape}")
    if np.any(ranks_arr < 1):
        raise InvalidInputError(f"ranks must be >= 1, got {ranks_arr.tolist()}")
    spec = cfg.spec
    if spec.routes and not names:
        raise EmptyPoolError(f"policy {cfg.policy.value!r} needs at least one registered adapter; the pool is empty")
    matrix = {"scores": scores, "cosine": cosine, None: None}[spec.input]
    if spec.input is not None and matrix is None:
        raise InvalidInputError(f"policy {cfg.policy.value!r} needs {spec.input}")
    if matrix is not None:
        matrix = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
        if matrix.shape[1] != len(names):
            raise DimensionMismatchError(f"score matrix has {matrix.shape[1]} columns for {len(names)} adapters")
        n = matrix.shape[0]
    else:
        n = n_queries if n_queries is not None else (len(scores) if scores is not None else 1)
    routed = spec.route(cfg, PolicyQueries(names, ranks_arr, n, matrix, tuple(explicit or ())))
    if off_pool is not None and cfg.may_fall_back:
        flags = np.asarray(off_pool, dtype=bool).ravel()
        if flags.shape != (len(routed),):
            raise DimensionMismatchError(f"off_pool has {flags.size} flags for {len(routed)} queries")
        routed = [Routed(RoutingPlan(), r.candidates, r.candidate_scores) if off else r
                  for r, off in zip(routed, flags, strict=True)]
    return routed


def make_plans(cfg: PolicyConfig, names: Sequence[str], ranks: Sequence[int] | np.ndarray,
               **kwargs) -> list[RoutingPlan]:
    """One plan per query (:func:`route_queries` without the candidates)."""
    return [r.plan for r in route_queries(cfg, names, ranks, **kwargs)]
