"""The HiLoRA policies: scores -> candidate set C -> ROC allocation -> RoutingPlan.

``hilora``: the paper's method, ``o_i`` ROCs per candidate (:func:`allocate_rocs`).
``hilora_gs``: the same candidate set, every ROC of each candidate (the paper's HiLoRA-GS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hilora_core.plan import Routed, RoutingPlan
from hilora_core.routing.sequence_routing import allocate_rocs, select_candidates


def hilora_route(
    scores: np.ndarray,
    names: Sequence[str],
    ranks: np.ndarray,
    gamma: float = 0.4,
    max_candidates: int | None = None,
    seed: int | None = None,
    signed: bool = False,
    all_rocs: bool = False,
) -> list[Routed]:
    """One plan per query from its adapter scores.

    Args:
        scores: (n, I) Gaussian scores of n queries against the I adapters ``names``.
        ranks: (I,) their LoRA ranks.
        gamma: the ROC budget fraction.
        max_candidates: optional cap on |C|.
        seed: None: deterministic allocation; an int seeds one Generator for all n queries.
        signed: rank ROCs by signed projection at the token level (ablation).
        all_rocs: HiLoRA-GS (every ROC of each candidate).
    """
    rng = None if seed is None else np.random.default_rng(seed)
    out = []
    for row in np.atleast_2d(scores):
        cand = select_candidates(row, max_candidates)
        if all_rocs:
            rocs, keep = ranks[cand], np.ones(cand.size, dtype=bool)
        else:
            rocs = allocate_rocs(row[cand], ranks[cand], gamma, rng=rng)
            keep = rocs > 0  # an adapter that drew no ROC contributes nothing: left out of the plan
        plan = RoutingPlan(adapters=tuple(names[i] for i in cand[keep]), rocs=tuple(int(o) for o in rocs[keep]),
                           signed=signed, scores=tuple(float(row[i]) for i in cand[keep]))
        out.append(Routed(plan, tuple(int(i) for i in cand), tuple(float(row[i]) for i in cand)))
    return out
