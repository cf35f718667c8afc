"""The per-row form of HiLoRA's token rule, for passes where every row runs T tokens under one plan.

:func:`hilora_core.routing.token_routing.apply_token_routing` projects every token on every adapter
of the batch's stack (U), weighting non-candidates 0. In a prefill the T tokens of a row share one
candidate list, so here each row is projected on its own C candidates only: C adapters per token
instead of U. The sum is the same (up to float rounding order); ``per_adapter`` rule only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hilora_core.routing.token_routing import check_distinct, take_mask


@dataclass(frozen=True)
class RowRouting:
    """Per-adapter token routing for a batch whose B rows each run T tokens under one candidate list
    (a prefill): the x-independent part, made once per batch by :func:`prepare_row_routing`.

    Where :class:`TokenRouting` is dense over the U adapters of the stack (every token is projected
    on every adapter, non-candidates weighted 0), this form gathers each row's own C candidates, so
    a token costs C adapters instead of U. The result is the same sum (up to float rounding order).

        index     (B * C,) the stack index of each (row, candidate); empty candidates point at the
                  first candidate's (weighted 0)
        coeff     (B, 1, C, 1) s_u * weight * row scale, 0 for empty candidates
        bias      (B, 1, C, R) -inf for ROCs j >= r_u (never chosen), else 0
        take      (B, 1, C, kmax) 1 for the first ``counts`` top-k positions, else 0 (coefficients' dtype)
        keep_all  every candidate keeps all its ROCs: no top-k needed
    """

    index: torch.Tensor
    coeff: torch.Tensor
    bias: torch.Tensor
    take: torch.Tensor
    kmax: int
    keep_all: bool


def prepare_row_routing(
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    r_max: int,
    row_adapters: torch.Tensor,
    row_rocs: torch.Tensor,
    row_scale: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> RowRouting:
    """The x-independent part of :func:`apply_row_routing` (the ``per_adapter`` token rule).

    Args:
        scalings, ranks: (U,) of the stack.
        r_max: R, the rank the stack is cut to.
        row_adapters: (B, C) indices into U, distinct per row; -1 marks an empty slot.
        row_rocs: (B, C) ROCs to keep per candidate (clipped to its rank).
        row_scale: (B,) multiplier per row.
        row_weights: (B, C) multiplier per candidate (default 1).
    """
    device, dtype = scalings.device, scalings.dtype
    n_rows, n_cand = row_adapters.shape
    valid = row_adapters >= 0
    cand = row_adapters.clamp(min=0)
    check_distinct(row_adapters)
    rank = ranks.clamp(max=r_max)[cand] * valid  # (B, C), 0 for empty slots
    coeff = scalings[cand] * valid * row_scale.to(dtype).unsqueeze(-1)
    if row_weights is not None:
        coeff = coeff * row_weights.to(dtype)
    counts = torch.minimum(row_rocs.long() * valid, rank)  # (B, C)
    keep_all = bool((counts >= rank).all())
    exists = torch.arange(r_max, device=device) < rank.unsqueeze(-1)  # (B, C, R)
    bias = torch.where(exists, torch.tensor(0.0, device=device, dtype=dtype),
                       torch.tensor(-math.inf, device=device, dtype=dtype))
    kmax, take = take_mask(counts)  # take: (B, C, kmax)
    return RowRouting(cand.reshape(-1), coeff.view(n_rows, 1, n_cand, 1), bias.unsqueeze(1),
                      take.to(dtype).unsqueeze(1), kmax, keep_all)


def apply_row_routing(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    routing: RowRouting,
    signed: bool = False,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """The x-dependent part of the per-row form: (B, T, d_in) -> (B, T, d_out).

    Args:
        x: (B, T, d_in) the rows' tokens.
        a_rows: (B, C * R, d_in) each row's candidates' A (the stack's rows at ``routing.index``).
        b_rows: (B, C * R, d_out) each row's candidates' B, transposed likewise.
        routing: from :func:`prepare_row_routing`.
        signed: rank ROCs by signed p instead of |p|.
        out: (B, T, d_out) added to the result in the last matmul (``baddbmm``); with ``accumulate``
            the sum is written into ``out`` itself and returned, else ``out`` is not modified.
    """
    n_rows, t_len, _ = x.shape
    n_cand, r_max = routing.bias.shape[-2:]
    if routing.kmax == 0:
        return x.new_zeros((n_rows, t_len, b_rows.shape[-1])) if out is None else out
    proj = torch.bmm(x, a_rows.transpose(1, 2)).view(n_rows, t_len, n_cand, r_max)  # (B, T, C, R)
    coeff = routing.coeff.to(x.dtype)
    if routing.keep_all:
        coef = proj * coeff
    else:
        bias = routing.bias.to(x.dtype)
        key = proj + bias if signed else proj.abs().add_(bias)
        idx = key.topk(routing.kmax, dim=-1).indices  # (B, T, C, kmax)
        # key's buffer becomes the keep mask, then the coefficients; take stays a view over T
        coef = key.zero_().scatter_(-1, idx, routing.take.to(x.dtype).expand_as(idx)).mul_(proj).mul_(coeff)
    coef = coef.view(n_rows, t_len, n_cand * r_max)
    if out is None:
        return torch.bmm(coef, b_rows)
    return out.baddbmm_(coef, b_rows) if accumulate else torch.baddbmm(out, coef, b_rows)
