"""Token level of HiLoRA: which rank-one components (ROCs) fire for each token.

A LoRA adapter ``u`` at one linear layer is ``A_u`` (r_u, d_in), ``B_u`` (d_out, r_u)
and scaling ``s_u``. ROC ``j`` is (row j of A_u, column j of B_u), and

    B_u A_u x = sum_j b_uj p_uj,    p_uj = a_uj . x   (the ROC's projection).

For every token, HiLoRA keeps, per candidate adapter, the ``o_u`` ROCs with the
largest ``|p_uj|`` and returns

    delta = sqrt(rbar / O) * sum_u s_u * sum_{j kept} b_uj p_uj

:func:`route_rocs_batched` states the rule for a whole mixed batch of tokens at once:
every token names its own candidates (indices into a stack of U adapters zero-padded to
rank R), ROC counts, weights and scale, so sequences with different plans share one code
path with no Python loop over tokens, sequences or adapters. It is two halves, which the
model layers call separately so that the x-independent one is made once per batch:
:func:`prepare_token_routing` then :func:`apply_token_routing` (the dense form), or
:func:`prepare_row_routing` then :func:`apply_row_routing` (the per-row form of a prefill, in
:mod:`hilora_core.routing.row_routing`).
:func:`route_rocs` is the single-sequence form of the library API.

Token rules (``TokenRule``):
    per_adapter  top-o_u ROCs of each candidate by |p| (HiLoRA; o_u = r_u gives all ROCs)
    global_topk  top-k ROCs over all candidates together by |p| (HiLoRA-ROC); k in column 0 of rocs
    arrow        top-k candidates by |x . v_u| (v_u = the adapter's Arrow prototype), all their
                 ROCs, weighted by softmax(|x . v_u| / temperature) over those k; k in column 0 of rocs
Weights multiply each candidate's contribution (mixtures, merging).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hilora_core.errors import DimensionMismatchError, InvalidInputError
from hilora_core.plan import TokenRule


@dataclass(frozen=True)
class TokenRouting:
    """The part of token routing that does not depend on the layer input ``x``.

    Built by :func:`prepare_token_routing` from per-token candidate lists; reusable for every
    call with the same metadata and stack (e.g. every decode step of a batch at one layer).
    Dense over the U adapters of the stack (a token's candidates must be distinct):

        counts      (N, U) ROCs to keep per adapter, clipped to its rank (per_adapter);
                    (N,) ROCs (global_topk) or adapters (arrow) to keep per token
        take        (N, U, kmax) or (N, kmax): 1 for the first ``counts`` top-k positions, else 0
                    (in the coefficients' dtype; bool for arrow)
        coeff       (N, U) s_u * weight * token scale, 0 for non-candidates
        bias        -inf where a ROC (or, for arrow, an adapter) may not be chosen, else 0:
                    (U, R) per_adapter, (N, U, R) global_topk, (N, U) arrow
        exists      (U, R) 1.0 for ROCs j < r_u
        keep_all    every candidate keeps all its ROCs (plain LoRA): no top-k needed
    """

    rule: TokenRule
    counts: torch.Tensor
    take: torch.Tensor
    kmax: int
    coeff: torch.Tensor
    bias: torch.Tensor
    exists: torch.Tensor
    keep_all: bool


def check_distinct(candidates: torch.Tensor) -> None:
    """:class:`InvalidInputError` if a row of ``candidates`` (N, C) names an adapter twice (-1 = empty)."""
    n_cand = candidates.shape[1]
    if n_cand > 1:
        empty = -1 - torch.arange(n_cand, device=candidates.device)  # distinct stand-ins for empty slots
        srt = torch.where(candidates >= 0, candidates, empty).sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise InvalidInputError("a token lists the same adapter twice among its candidates")


def take_mask(counts: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(kmax, take): the largest count, and ``take[..., k]`` True for the first ``counts[...]`` top-k positions."""
    kmax = int(counts.max()) if counts.numel() else 0
    return kmax, torch.arange(kmax, device=counts.device) < counts.unsqueeze(-1)


def prepare_token_routing(
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    r_max: int,
    token_adapters: torch.Tensor,
    token_rocs: torch.Tensor,
    token_scale: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    rule: TokenRule = TokenRule.PER_ADAPTER,
) -> TokenRouting:
    """The x-independent metadata of :func:`route_rocs_batched` (arguments as there; R = ``r_max``)."""
    n_tok = token_adapters.shape[0]
    n_ad = scalings.shape[0]
    device, dtype = scalings.device, scalings.dtype
    valid = token_adapters >= 0  # (N, C)
    cand = token_adapters.clamp(min=0)
    check_distinct(token_adapters)
    w = scalings[cand] * valid  # (N, C)
    if token_weights is not None:
        w = w * token_weights.to(dtype)
    w = w * token_scale.to(dtype).unsqueeze(-1)
    coeff = torch.zeros((n_tok, n_ad), device=device, dtype=dtype).scatter_add_(1, cand, w)  # (N, U)
    # empty candidate slots point at adapter 0 after the clamp: accumulate so they add nothing
    is_cand = torch.zeros((n_tok, n_ad), device=device, dtype=torch.long).scatter_add_(1, cand, valid.long()) > 0
    ranks = ranks.clamp(max=r_max)
    exists_b = torch.arange(r_max, device=device) < ranks.unsqueeze(-1)  # (U, R)
    exists = exists_b.to(dtype)
    neg = torch.tensor(-math.inf, device=device, dtype=dtype)
    zero = torch.tensor(0.0, device=device, dtype=dtype)
    if rule == TokenRule.PER_ADAPTER:
        counts = torch.zeros((n_tok, n_ad), device=device, dtype=torch.long).scatter_add_(
            1, cand, token_rocs.long() * valid
        )
        counts = torch.minimum(counts, ranks.unsqueeze(0))  # (N, U)
        keep_all = bool((counts[is_cand] >= ranks.unsqueeze(0).expand_as(counts)[is_cand]).all())
        bias = torch.where(exists_b, zero, neg)  # (U, R)
    elif rule == TokenRule.GLOBAL_TOPK:
        avail = exists_b.unsqueeze(0) & is_cand.unsqueeze(-1)  # (N, U, R)
        counts = torch.minimum(token_rocs[:, 0].long(), avail.flatten(1).sum(1))  # (N,)
        keep_all = False
        bias = torch.where(avail, zero, neg)
    elif rule == TokenRule.ARROW:
        counts = torch.minimum(token_rocs[:, 0].long(), is_cand.sum(1))  # (N,)
        keep_all = False
        bias = torch.where(is_cand, zero, neg)  # (N, U)
    else:  # pragma: no cover - the enum guards this
        raise InvalidInputError(f"unknown token rule {rule!r}")
    kmax, take = take_mask(counts)
    if rule != TokenRule.ARROW:  # multiplied in at every call: stored in the compute dtype once, here
        take = take.to(dtype)
    return TokenRouting(rule, counts, take, kmax, coeff, bias, exists, keep_all)


def apply_token_routing(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    routing: TokenRouting,
    signed: bool = False,
    prototypes: torch.Tensor | None = None,
    arrow_temperature: float = 1.0,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """The x-dependent part of :func:`route_rocs_batched`: (N, d_in) -> (N, d_out).

    ``out`` (N, d_out), when given, is added to the result in the last matmul (``addmm``, one pass
    instead of two); with ``accumulate`` the sum is written into ``out`` itself and returned."""
    n_tok, d_in = x.shape
    n_ad, r_max, _ = a_stack.shape
    d_out = b_stack.shape[1]
    b_flat = b_stack.permute(0, 2, 1).reshape(n_ad * r_max, d_out)  # a view when b_stack is (U, R, d_out).mT
    if n_tok == 0 or routing.kmax == 0:
        return x.new_zeros((n_tok, d_out)) if out is None else out
    coeff = routing.coeff.to(x.dtype)
    # projections of every token on every ROC of every adapter in the stack: one matmul
    proj = (x @ a_stack.reshape(n_ad * r_max, d_in).T).view(n_tok, n_ad, r_max)  # (N, U, R)
    if routing.rule == TokenRule.PER_ADAPTER:
        if routing.keep_all:
            coef = proj * coeff.unsqueeze(-1)
        else:
            key = proj + routing.bias if signed else proj.abs().add_(routing.bias)
            idx = key.topk(routing.kmax, dim=-1).indices  # (N, U, kmax)
            # key is spent: its buffer becomes the keep mask, then the coefficients (no new allocations)
            coef = key.zero_().scatter_(-1, idx, routing.take.to(x.dtype)).mul_(proj).mul_(coeff.unsqueeze(-1))
    elif routing.rule == TokenRule.GLOBAL_TOPK:
        key = ((proj if signed else proj.abs()) + routing.bias).view(n_tok, n_ad * r_max)
        idx = key.topk(routing.kmax, dim=-1).indices  # (N, kmax)
        keep = torch.zeros((n_tok, n_ad * r_max), dtype=x.dtype, device=x.device)
        keep.scatter_(-1, idx, routing.take.to(x.dtype))
        coef = proj * keep.view_as(proj) * coeff.unsqueeze(-1)
    else:  # ARROW
        if prototypes is None:
            raise InvalidInputError("the arrow token rule needs prototypes (U, d_in)")
        sim = (x @ prototypes.T).abs() + routing.bias  # (N, U)
        idx = sim.topk(routing.kmax, dim=-1).indices
        chosen = torch.zeros_like(sim, dtype=torch.bool).scatter_(-1, idx, routing.take)
        soft = torch.softmax((sim / arrow_temperature).masked_fill(~chosen, -math.inf), dim=-1).nan_to_num(0.0)
        coef = proj * ((coeff * soft).unsqueeze(-1) * routing.exists)
    coef = coef.reshape(n_tok, n_ad * r_max)
    if out is None:
        return coef @ b_flat
    return out.addmm_(coef, b_flat) if accumulate else torch.addmm(out, coef, b_flat)


def apply_full_lora(x: torch.Tensor, a_cat: torch.Tensor, bt_cat: torch.Tensor, seg: torch.Tensor,
                    coeff: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """:func:`apply_token_routing` when every candidate keeps all its ROCs (``TokenRouting.keep_all``, per-adapter
    rule), over the adapters' rows concatenated without padding: (N, d_in) -> (N, d_out).

    ``a_cat`` (S, d_in), ``bt_cat`` (S, d_out): the U adapters' rows, S the sum of their ranks; ``seg`` (S,): the
    adapter of each row; ``coeff`` (N, U): each token's multiplier per adapter (0 for non-candidates)."""
    coef = (x @ a_cat.T).mul_(coeff.to(x.dtype).index_select(1, seg))  # (N, S)
    if out is None:
        return coef @ bt_cat
    return out.addmm_(coef, bt_cat) if accumulate else torch.addmm(out, coef, bt_cat)


def apply_token_rows(x: torch.Tensor, a_cat: torch.Tensor, bt_cat: torch.Tensor, seg: torch.Tensor,
                     pos: torch.Tensor, routing: TokenRouting, signed: bool = False, out: torch.Tensor | None = None,
                     accumulate: bool = False) -> torch.Tensor:
    """:func:`apply_token_routing` for the per-adapter rule over the adapters' rows concatenated without padding:
    (N, d_in) -> (N, d_out), the projections costing the sum of the ranks S instead of U x R.

    ``a_cat`` (S, d_in), ``bt_cat`` (S, d_out): the U adapters' rows; ``seg`` (S,): each row's adapter;
    ``pos`` (S,): each row's place u * R + j in the padded (U, R) layout of ``routing``, where the top-o choice
    per adapter is made (non-existing ROCs stay at -inf there, as in the padded form)."""
    n_tok = x.shape[0]
    n_ad, r_max = routing.bias.shape
    if n_tok == 0 or routing.kmax == 0:
        return x.new_zeros((n_tok, bt_cat.shape[1])) if out is None else out
    proj = x @ a_cat.T  # (N, S)
    key = routing.bias.to(x.dtype).reshape(1, n_ad * r_max).repeat(n_tok, 1)  # one copy, written below
    key.index_copy_(1, pos, proj if signed else proj.abs())
    idx = key.view(n_tok, n_ad, r_max).topk(routing.kmax, dim=-1).indices  # (N, U, kmax)
    keep = key.zero_().view(n_tok, n_ad, r_max).scatter_(-1, idx, routing.take.to(x.dtype))
    coef = keep.view(n_tok, -1).index_select(1, pos).mul_(proj).mul_(routing.coeff.to(x.dtype).index_select(1, seg))
    if out is None:
        return coef @ bt_cat
    return out.addmm_(coef, bt_cat) if accumulate else torch.addmm(out, coef, bt_cat)


def route_rocs_batched(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    token_adapters: torch.Tensor,
    token_rocs: torch.Tensor,
    token_scale: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    rule: TokenRule = TokenRule.PER_ADAPTER,
    signed: bool = False,
    prototypes: torch.Tensor | None = None,
    arrow_temperature: float = 1.0,
    routing: TokenRouting | None = None,
) -> torch.Tensor:
    """Routed LoRA output for a batch of tokens with per-token plans.

    Args:
        x: (N, d_in) token inputs to the layer.
        a_stack: (U, R, d_in) down-projections, rows >= r_u zero.
        b_stack: (U, d_out, R) up-projections, columns >= r_u zero.
        scalings: (U,) s_u (lora_alpha / r, or / sqrt(r) for rsLoRA).
        ranks: (U,) r_u.
        token_adapters: (N, C) indices into U, distinct per token; -1 marks an empty candidate slot.
        token_rocs: (N, C) ROCs to keep per candidate (per_adapter), or the k of the
            rule in column 0 (global_topk: ROCs, arrow: adapters).
        token_scale: (N,) overall multiplier per token (sqrt(rbar/O) times the plan's scale).
        token_weights: (N, C) multiplier per candidate (default 1).
        rule: the token rule.
        signed: rank ROCs by signed p instead of |p| (ablation).
        prototypes: (U, d_in) Arrow prototypes (rule ARROW only).
        arrow_temperature: softmax temperature of the Arrow rule.
        routing: the result of :func:`prepare_token_routing` for exactly these metadata
            arguments, to skip recomputing it (callers that route many layers or decode
            steps with one batch's metadata); None computes it here.

    Returns:
        (N, d_out) the routed LoRA contribution (add it to the base layer's output).
    """
    n_tok = x.shape[0]
    if n_tok == 0 or token_adapters.shape[1] == 0:
        return x.new_zeros((n_tok, b_stack.shape[1]))
    if routing is None:
        routing = prepare_token_routing(
            scalings, ranks, a_stack.shape[1], token_adapters, token_rocs, token_scale, token_weights, rule
        )
    assert routing.rule == rule, (routing.rule, rule)
    return apply_token_routing(x, a_stack, b_stack, routing, signed, prototypes, arrow_temperature)


def stack_adapters(
    a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad adapters of different ranks into (U, R, d_in), (U, d_out, R) and ranks (U,)."""
    if len(a_list) != len(b_list) or not a_list:
        raise InvalidInputError(f"need matching non-empty A and B lists, got {len(a_list)} and {len(b_list)}")
    d_in = a_list[0].shape[1]
    d_out = b_list[0].shape[0]
    r_max = max(a.shape[0] for a in a_list)
    a_stack = a_list[0].new_zeros((len(a_list), r_max, d_in))
    b_stack = b_list[0].new_zeros((len(b_list), d_out, r_max))
    for u, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        r = a.shape[0]
        if a.ndim != 2 or a.shape[1] != d_in or b.ndim != 2 or b.shape != (d_out, r):
            raise DimensionMismatchError(
                f"adapter {u}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                f"A (r, {d_in}) and B ({d_out}, r)"
            )
        a_stack[u, :r] = a
        b_stack[u, :, :r] = b
    ranks = torch.tensor([a.shape[0] for a in a_list], dtype=torch.long, device=a_list[0].device)
    return a_stack, b_stack, ranks


def normalisation(ranks: Sequence[int], rocs: Sequence[int]) -> float:
    """``sqrt(rbar / O)``: rbar the mean rank of the candidates, O the ROCs activated."""
    total = int(sum(rocs))
    if total < 1:
        raise InvalidInputError(f"at least one ROC must be activated, got rocs={list(rocs)}")
    return math.sqrt((sum(ranks) / len(ranks)) / total)


def route_rocs(
    x: torch.Tensor,
    A_list: Sequence[torch.Tensor],
    B_list: Sequence[torch.Tensor],
    scalings: Sequence[float],
    o: Sequence[int],
    signed: bool = False,
) -> torch.Tensor:
    """HiLoRA's token-level routing for one sequence at one layer.

    Args:
        x: (T, d_in) tokens.
        A_list: per candidate, A_i (r_i, d_in) (PEFT ``lora_A.weight`` layout).
        B_list: per candidate, B_i (d_out, r_i) (PEFT ``lora_B.weight`` layout).
        scalings: per candidate s_i.
        o: per candidate ROCs to keep per token, 0 <= o_i <= r_i, sum >= 1.
        signed: rank by signed projection instead of its magnitude.

    Returns:
        (T, d_out): ``sqrt(rbar/O) * sum_i s_i * sum_{j in top-o_i} b_ij (a_ij . x)``.
    """
    if x.ndim != 2:
        raise InvalidInputError(f"x must be (T, d_in), got shape {tuple(x.shape)}")
    a_stack, b_stack, ranks = stack_adapters(list(A_list), list(B_list))
    if a_stack.shape[2] != x.shape[1]:
        raise DimensionMismatchError(f"x has d_in={x.shape[1]} but A has d_in={a_stack.shape[2]}")
    n_ad = len(A_list)
    if len(scalings) != n_ad or len(o) != n_ad:
        raise InvalidInputError(f"got {n_ad} adapters but {len(scalings)} scalings and {len(o)} ROC counts")
    o_t = torch.as_tensor(list(o), dtype=torch.long, device=x.device)
    if torch.any(o_t < 0) or torch.any(o_t > ranks):
        raise InvalidInputError(f"ROC counts must satisfy 0 <= o_i <= r_i, got o={list(o)} r={ranks.tolist()}")
    scale = normalisation(ranks.tolist(), o_t.tolist())
    n_tok = x.shape[0]
    cand = torch.arange(n_ad, device=x.device).expand(n_tok, n_ad)
    return route_rocs_batched(
        x,
        a_stack.to(x.dtype),
        b_stack.to(x.dtype),
        torch.as_tensor(list(scalings), dtype=x.dtype, device=x.device),
        ranks,
        cand,
        o_t.expand(n_tok, n_ad),
        torch.full((n_tok,), scale, dtype=x.dtype, device=x.device),
        signed=signed,
    )
