"""The typed messages between the deployments (request -> embed -> registry -> model replica).

:class:`Decision` is what the registry answers for one request and the ingress reports in
``routing``; :class:`GenerateCall` is what the ingress asks a model replica to run. Both are
pydantic models, so a field added on one side is validated on the other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hilora_core.plan import RoutingPlan


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterLocation(_Message):
    """Where a model replica loads an adapter's weights from."""

    location: str
    revision: str | None = None


class OffPoolTest(_Message):
    """The base-model fallback test of one request (:mod:`hilora_core.routing.fallback`)."""

    fallback: bool
    best_score: float
    threshold: float
    enabled: bool


class Decision(_Message):
    """The sequence-level decision for one request."""

    plan: dict = Field(description="RoutingPlan.to_dict()")
    candidates: list[str] = []
    candidate_scores: list[float] = []
    epoch: int | None = None
    degraded: bool = False
    prefiltered: bool = False
    shortlist_size: int = 0
    off_pool: OffPoolTest | None = None
    sources: dict[str, AdapterLocation] = {}

    @classmethod
    def base_model(cls) -> Decision:
        """The decision of ``model: "base"``: no adapter."""
        return cls(plan=RoutingPlan().to_dict())

    def routing_plan(self) -> RoutingPlan:
        return RoutingPlan.from_dict(self.plan)

    def summary(self) -> dict:
        """The ``routing`` field of every response: what was used and why."""
        plan = self.plan
        return {
            "adapters": plan["adapters"], "rocs": plan["rocs"], "scores": plan["scores"],
            "candidates": self.candidates, "candidate_scores": self.candidate_scores,
            "token_rule": plan["token_rule"], "scale": plan["scale"], "weights": plan["weights"],
            "epoch": self.epoch, "degraded": self.degraded,
            "off_pool": None if self.off_pool is None else self.off_pool.model_dump(),
        }


class GenerateCall(_Message):
    """One generation a model replica runs: the plan, where its adapters live, the prompt and settings."""

    plan: dict
    sources: dict[str, AdapterLocation]
    prompt: str | None = None
    prompt_ids: list[int] | None = Field(None, description="a prompt given as token ids (completions)")
    messages: list[dict] | None = None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    logprobs: int | None = Field(None, description="None, or alternatives (0-20) reported per generated token")
    echo_logprobs: bool = Field(False, description="also report the prompt tokens' logprobs")
    ignore_eos: bool = Field(False, description="generate past EOS until max_tokens")

    def routing_plan(self) -> RoutingPlan:
        return RoutingPlan.from_dict(self.plan)
