"""Ensemble plans: each adapter run as its own row, the rows' next-token distributions averaged.

:func:`expand_ensembles` turns a batch of plans into the rows the model runs (one single-adapter
row per adapter of an ensemble plan, the plan's scale; every other plan is one row), and
:func:`mix_logits` folds the rows' logits back into one distribution per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hilora_core.errors import InvalidInputError
from hilora_core.plan import RoutingPlan


@dataclass(frozen=True)
class ExpandedBatch:
    """rows: (R,) plans the model runs; row_seq: (R,) the sequence of each row; matrix: (n, R) mixing
    weights (rows of a sequence sum to 1), or None when no plan is an ensemble (then R = n)."""

    rows: list[RoutingPlan]
    row_seq: list[int]
    matrix: torch.Tensor | None


def expand_ensembles(plans: Sequence[RoutingPlan] | None, n: int, device: torch.device | str = "cpu") -> ExpandedBatch:
    """The rows to run for ``n`` sequences under ``plans`` (None: the base model for all)."""
    plans = [RoutingPlan()] * n if plans is None else list(plans)
    if len(plans) != n:
        raise InvalidInputError(f"got {len(plans)} plans for {n} sequences")
    for p in plans:
        if not isinstance(p, RoutingPlan):
            raise InvalidInputError(f"plans must be RoutingPlan objects, got {type(p).__name__}")
    if not any(p.ensemble and p.adapters for p in plans):
        return ExpandedBatch(plans, list(range(n)), None)
    rows: list[RoutingPlan] = []
    row_seq: list[int] = []
    mix: list[tuple[int, int, float]] = []
    for i, p in enumerate(plans):
        if not (p.ensemble and p.adapters):
            mix.append((i, len(rows), 1.0))
            rows.append(p)
            row_seq.append(i)
            continue
        w = list(p.weights) if p.weights is not None else [1.0] * len(p.adapters)
        total = sum(w)
        if not total > 0:
            raise InvalidInputError(f"ensemble weights must have a positive sum, got {w}")
        for a, wa in zip(p.adapters, w, strict=True):
            mix.append((i, len(rows), wa / total))
            rows.append(RoutingPlan(adapters=(a,), scale=p.scale, normalize=False))
            row_seq.append(i)
    matrix = torch.zeros((n, len(rows)), dtype=torch.float32)
    for i, r, weight in mix:
        matrix[i, r] = weight
    return ExpandedBatch(rows, row_seq, matrix.to(device))


def mix_logits(logits: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """Rows' logits (R, ..., V) -> per-sequence scores; ensembles: log of the weighted mean probability."""
    if matrix is None:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    mixed = torch.einsum("nr,r...v->n...v", matrix, probs)
    return mixed.clamp_min(torch.finfo(torch.float32).tiny).log().to(logits.dtype)
