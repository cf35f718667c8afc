"""The routing decision: the one message that says what a request runs and why.

The registry makes it (:func:`registry.routing.route_on_snapshot`, or an explicit adapter), the
registry deployment adds where each adapter's weights live (``sources``), the ingress reports its
:meth:`Decision.summary` in every response and hands its :class:`RoutingPlan` to a model replica.
(The policies' own output, :class:`hilora_core.plan.Routed`, names candidates by their index in
the pool; a decision names them.)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hilora_core.plan import RoutingPlan


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterLocation(_Message):
    """Where a model replica loads an adapter's weights from."""

    location: str
    revision: str | None = None


class OffPoolTest(_Message):
    """The base-model fallback test of one request (:mod:`hilora_core.routing.fallback`): ``fallback`` is
    whether it sent the request to the base model (flagged and ``enabled``)."""

    fallback: bool
    best_score: float
    threshold: float
    enabled: bool


class RoutingSummary(_Message):
    """The ``routing`` field of every response: what was used and why."""

    adapters: list[str]
    rocs: list[int] | None
    scores: list[float] | None
    candidates: list[str]
    candidate_scores: list[float]
    token_rule: str
    scale: float
    weights: list[float] | None
    epoch: int | None
    degraded: bool
    off_pool: OffPoolTest | None


class Decision(_Message):
    """The sequence-level decision for one request.

    Attributes:
        plan: what the model replicas run (adapters, ROCs, scale, token rule).
        candidates: the adapters the policy chose from (HiLoRA: the candidate set C, including any that
            drew 0 ROCs; retriever: its top k; other policies: the plan's adapters).
        candidate_scores: their scores (Gaussian scores; cosine for retriever; empty otherwise).
        epoch: the pool epoch of the snapshot used (None: no pool was read).
        degraded: the scorer could not reach Redis; the snapshot may be stale.
        prefiltered, shortlist_size: the FAISS shortlist was used, and its size (0 if not used).
        off_pool: the fallback test; None when the pool has no threshold or the policy does not route.
        sources: where each of the plan's adapters is loaded from (added by the registry deployment).
    """

    plan: RoutingPlan = Field(default_factory=RoutingPlan)
    candidates: tuple[str, ...] = ()
    candidate_scores: tuple[float, ...] = ()
    epoch: int | None = None
    degraded: bool = False
    prefiltered: bool = False
    shortlist_size: int = 0
    off_pool: OffPoolTest | None = None
    sources: dict[str, AdapterLocation] = {}

    @property
    def fell_back(self) -> bool:
        return bool(self.off_pool and self.off_pool.fallback)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the plan as :meth:`RoutingPlan.to_dict`)."""
        out = self.model_dump(mode="json", exclude={"plan"})
        out["plan"] = self.plan.to_dict()
        return out

    def summary(self) -> RoutingSummary:
        p = self.plan
        return RoutingSummary(
            adapters=list(p.adapters), rocs=None if p.rocs is None else list(p.rocs),
            scores=None if p.scores is None else [float(s) for s in p.scores], candidates=list(self.candidates),
            candidate_scores=[float(s) for s in self.candidate_scores], token_rule=p.token_rule.value,
            scale=p.scale, weights=None if p.weights is None else list(p.weights), epoch=self.epoch,
            degraded=self.degraded, off_pool=self.off_pool)
