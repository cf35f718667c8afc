"""RoutingPlan: what one sequence uses, decided once per sequence, applied at every layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hilora_core.errors import InvalidInputError


class TokenRule(str, Enum):
    """How a plan's adapters are applied to each token (the only spelling of the rule names).

    per_adapter  HiLoRA: the top-o_i ROCs of each adapter by |projection| (all of them: plain LoRA)
    global_topk  HiLoRA-ROC: the top-k ROCs over all the plan's adapters together
    arrow        Arrow: the top-k adapters per token by |x . v_i|, all their ROCs
    """

    PER_ADAPTER = "per_adapter"
    GLOBAL_TOPK = "global_topk"
    ARROW = "arrow"


@dataclass(frozen=True)
class RoutingPlan:
    """Per-sequence routing decision.

    Attributes:
        adapters: adapter names (the candidate set C); empty means the base model alone.
        rocs: ROCs to keep per token for each adapter (``per_adapter`` rule); None keeps all.
        scale: extra multiplier on the routed LoRA sum (1.0 for plain LoRA).
        weights: per-adapter multipliers (mixtures, merging); None means 1 each.
        token_rule: ``per_adapter`` (HiLoRA), ``global_topk`` (HiLoRA-ROC), ``arrow``.
        top_k: ROCs per token (global_topk) or adapters per token (arrow).
        normalize: multiply by ``sqrt(rbar / O)`` (HiLoRA's variance normalisation).
        signed: rank ROCs by signed projection (ablation).
        ensemble: run each adapter as its own pass and average output distributions by
            ``weights`` (the Ensemble baseline) instead of mixing inside the layers.
        scores: the sequence-level scores of ``adapters`` (informational, for responses).
        layer_weights: optional (L, n) per-layer multipliers, row l for decoder layer l, applied on top of
            ``weights`` (layer-level fusion such as qa-FLoRA); None means 1 everywhere.
    """

    adapters: tuple[str, ...] = ()
    rocs: tuple[int, ...] | None = None
    scale: float = 1.0
    weights: tuple[float, ...] | None = None
    token_rule: TokenRule = TokenRule.PER_ADAPTER
    top_k: int | None = None
    normalize: bool = True
    signed: bool = False
    ensemble: bool = False
    scores: tuple[float, ...] | None = field(default=None, compare=False)
    layer_weights: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        n = len(self.adapters)
        if len(set(self.adapters)) != n:
            raise InvalidInputError(f"a plan names an adapter twice: {list(self.adapters)}")
        for name in ("rocs", "weights", "scores"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                object.__setattr__(self, name, value)
                if len(value) != n:
                    raise InvalidInputError(f"plan has {n} adapters but {len(value)} {name}: {list(value)}")
        if self.layer_weights is not None:
            rows = tuple(tuple(float(w) for w in row) for row in self.layer_weights)
            object.__setattr__(self, "layer_weights", rows)
            if not rows or any(len(row) != n for row in rows):
                lengths = [len(r) for r in rows]
                raise InvalidInputError(f"layer_weights must be (n_layers, {n}), got row lengths {lengths}")
            if any(not math.isfinite(w) for row in rows for w in row):
                raise InvalidInputError("layer_weights must be finite")
            if self.ensemble:
                raise InvalidInputError("an ensemble plan cannot have layer_weights")
        if self.rocs is not None and any(int(o) < 0 for o in self.rocs):
            raise InvalidInputError(f"ROC counts must be >= 0, got {list(self.rocs)}")
        if self.rocs is not None and n and sum(self.rocs) < 1:
            raise InvalidInputError(f"a plan with adapters must activate at least one ROC, got {list(self.rocs)}")
        try:
            object.__setattr__(self, "token_rule", TokenRule(self.token_rule))
        except ValueError:
            raise InvalidInputError(
                f"token_rule must be one of {[r.value for r in TokenRule]}, got {self.token_rule!r}"
            ) from None
        if self.token_rule != TokenRule.PER_ADAPTER and (self.top_k is None or self.top_k < 1):
            raise InvalidInputError(f"token rule {self.token_rule!r} needs top_k >= 1, got {self.top_k!r}")
        if not (self.scale == self.scale) or abs(self.scale) == float("inf"):
            raise InvalidInputError(f"scale must be finite, got {self.scale!r}")

    @property
    def is_base(self) -> bool:
        return len(self.adapters) == 0

    @classmethod
    def single(cls, adapter: str) -> RoutingPlan:
        """Plain LoRA with one adapter (all ROCs, scale 1): equals PEFT running it."""
        return cls(adapters=(adapter,), rocs=None, normalize=False)

    @classmethod
    def from_dict(cls, d: dict) -> RoutingPlan:
        """The inverse of :meth:`to_dict` (lists back to tuples; checked like any plan)."""
        def tup(v: Any) -> Any:  # a JSON value, lists made tuples
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: tup(v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return {
            "adapters": list(self.adapters),
            "rocs": None if self.rocs is None else [int(o) for o in self.rocs],
            "scale": self.scale,
            "weights": None if self.weights is None else list(self.weights),
            "token_rule": self.token_rule.value,
            "top_k": self.top_k,
            "normalize": self.normalize,
            "signed": self.signed,
            "ensemble": self.ensemble,
            "scores": None if self.scores is None else [float(s) for s in self.scores],
            "layer_weights": None if self.layer_weights is None else [list(row) for row in self.layer_weights],
        }


@dataclass(frozen=True)
class Routed:
    """One query's routing outcome: the plan to execute, and the candidates it was chosen from.

    Attributes:
        plan: what the engine runs.
        candidates: indices (into the pool's adapter list) of the adapters the policy considered,
            best first (HiLoRA: the whole candidate set C, including adapters that drew 0 ROCs;
            Retriever: the top k; pool-wide policies: none).
        candidate_scores: their scores (Gaussian scores; cosine for Retriever).
    """

    plan: RoutingPlan
    candidates: tuple[int, ...] = ()
    candidate_scores: tuple[float, ...] = ()
