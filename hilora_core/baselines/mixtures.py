"""The two pool-wide mixtures of the paper's comparison.

Ensemble: every adapter run as its own pass, output distributions averaged.
Merged: every adapter's delta averaged into one (uniform weights inside the layers).
"""

from __future__ import annotations

from collections.abc import Sequence

from hilora_core.plan import Routed, RoutingPlan


def ensemble_route(names: Sequence[str], n: int) -> list[Routed]:
    plan = RoutingPlan(adapters=tuple(names), weights=(1.0 / len(names),) * len(names), normalize=False,
                       ensemble=True)
    return [Routed(plan)] * n


def merged_route(names: Sequence[str], n: int) -> list[Routed]:
    plan = RoutingPlan(adapters=tuple(names), weights=(1.0 / len(names),) * len(names), normalize=False)
    return [Routed(plan)] * n
