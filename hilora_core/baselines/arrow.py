"""Arrow: no sequence level; per token and layer, the top-k adapters by ``|x . v_i|`` with ``v_i`` the
top right singular vector of the adapter's ``B_i A_i`` there, mixed by a softmax over those k.

The token rule runs in the engine's batched kernel (``TokenRule.ARROW``); the prototypes are computed
by :func:`arrow_prototype` the first time an Arrow plan uses an adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hilora_core.plan import Routed, RoutingPlan, TokenRule

if TYPE_CHECKING:
    import torch


def arrow_route(names: Sequence[str], n: int, k: int = 3) -> list[Routed]:
    plan = RoutingPlan(adapters=tuple(names), token_rule=TokenRule.ARROW, top_k=min(k, len(names)), normalize=False)
    return [Routed(plan)] * n


def arrow_prototype(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of ``B A`` (d_in,), unit norm, sign fixed (largest |entry| > 0).

    Computed from the small (r, d_in) matrix ``R_B A`` where ``B = Q_B R_B``.
    """
    import torch  # the routing table imports this module; only the prototype needs torch
    _, r_b = torch.linalg.qr(b.to(torch.float64))  # (r, r)
    _, _, vh = torch.linalg.svd(r_b @ a.to(torch.float64), full_matrices=False)
    v = vh[0]
    if v[v.abs().argmax()] < 0:
        v = -v
    return v.to(a.dtype)
