"""HiLoRA-ROC: no sequence level; per token, the top-k ROCs over the whole pool (k = 24),
with HiLoRA's normalisation for O = k activated ROCs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hilora_core.plan import Routed, RoutingPlan, TokenRule


def hilora_roc_route(names: Sequence[str], ranks: np.ndarray, n: int, k: int = 24,
                     signed: bool = False) -> list[Routed]:
    """The same plan for all n queries: every adapter, the top ``k`` ROCs per token."""
    k = min(k, int(np.sum(ranks)))
    plan = RoutingPlan(adapters=tuple(names), token_rule=TokenRule.GLOBAL_TOPK, top_k=k, signed=signed,
                       scale=float(np.sqrt(np.mean(ranks) / k)), normalize=False)
    return [Routed(plan)] * n
