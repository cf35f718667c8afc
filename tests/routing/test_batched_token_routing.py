"""route_rocs_batched as the engine calls it: random mixed batches with -1 padded candidate lists,
prepared metadata reused across calls, each token equal to routing it alone without padding."""

from __future__ import annotations

import pytest
import torch

from hilora_core import InvalidInputError, TokenRule, arrow_prototype
from hilora_core.routing.row_routing import apply_row_routing, prepare_row_routing
from hilora_core.routing.sparse_lora import apply_lora_sparse, apply_token_rows_sparse, sparse_pattern
from hilora_core.routing.token_routing import (
    apply_token_routing,
    apply_token_rows,
    prepare_token_routing,
    route_rocs_batched,
    stack_adapters,
)


def _random_batch(rule: TokenRule, seed: int):
    g = torch.Generator().manual_seed(seed)
    ranks = [4, 8, 2, 6, 0]  # the last adapter does not adapt this layer (rank 0)
    a = [torch.randn(max(r, 1), 12, generator=g, dtype=torch.float64) * (r > 0) for r in ranks]
    b = [torch.randn(10, max(r, 1), generator=g, dtype=torch.float64) for r in ranks]
    a_stack, b_stack, _ = stack_adapters(a, b)
    rank_t = torch.tensor(ranks)
    protos = torch.stack([arrow_prototype(ai, bi) if r else torch.zeros(12, dtype=torch.float64)
                          for ai, bi, r in zip(a, b, ranks, strict=True)])
    n_tok, n_cand = 11, 3
    cand = torch.full((n_tok, n_cand), -1)
    rocs = torch.zeros((n_tok, n_cand), dtype=torch.long)
    for t in range(n_tok):
        k = int(torch.randint(1, n_cand + 1, (1,), generator=g))
        cand[t, :k] = torch.randperm(len(ranks), generator=g)[:k]
        if rule == TokenRule.PER_ADAPTER:
            rocs[t, :k] = torch.randint(0, 10, (k,), generator=g)  # may exceed the rank: keeps all
        else:
            rocs[t, 0] = int(torch.randint(1, 6, (1,), generator=g))
    x = torch.randn(n_tok, 12, generator=g, dtype=torch.float64)
    scal = torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.5
    weights = torch.rand((n_tok, n_cand), generator=g, dtype=torch.float64)
    scale = torch.rand(n_tok, generator=g, dtype=torch.float64) + 0.5
    return x, a_stack, b_stack, scal, rank_t, cand, rocs, scale, weights, protos


@pytest.mark.parametrize("rule", list(TokenRule))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_mixed_batch_equals_each_token_alone(rule, seed):
    x, a_stack, b_stack, scal, ranks, cand, rocs, scale, weights, protos = _random_batch(rule, seed)
    kw = dict(rule=rule, prototypes=protos if rule == TokenRule.ARROW else None)
    got = route_rocs_batched(x, a_stack, b_stack, scal, ranks, cand, rocs, scale, weights, **kw)
    for t in range(x.shape[0]):
        k = int((cand[t] >= 0).sum())
        want = route_rocs_batched(x[t : t + 1], a_stack, b_stack, scal, ranks, cand[t : t + 1, :k],
                                  rocs[t : t + 1, :k], scale[t : t + 1], weights[t : t + 1, :k], **kw)
        torch.testing.assert_close(got[t : t + 1], want)
    # the prepared (x-independent) half can be reused for another input of the same batch
    routing = prepare_token_routing(scal, ranks, a_stack.shape[1], cand, rocs, scale, weights, rule)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(
        route_rocs_batched(x2, a_stack, b_stack, scal, ranks, cand, rocs, scale, weights, routing=routing, **kw),
        route_rocs_batched(x2, a_stack, b_stack, scal, ranks, cand, rocs, scale, weights, **kw),
    )


def test_per_adapter_keeps_the_largest_projections():
    x, a_stack, b_stack, scal, ranks, *_ = _random_batch(TokenRule.PER_ADAPTER, 5)
    cand = torch.tensor([[1, -1]])
    one = torch.ones(1, dtype=torch.float64)
    got = route_rocs_batched(x[:1], a_stack, b_stack, scal, ranks, cand, torch.tensor([[3, 0]]), one)
    p = a_stack[1] @ x[0]
    top = p.abs().topk(3).indices
    want = scal[1] * (b_stack[1][:, top] @ p[top])
    torch.testing.assert_close(got[0], want)


def test_repeated_candidate_is_refused():
    x, a_stack, b_stack, scal, ranks, *_ = _random_batch(TokenRule.PER_ADAPTER, 0)
    with pytest.raises(InvalidInputError, match="twice"):
        route_rocs_batched(x[:1], a_stack, b_stack, scal, ranks, torch.tensor([[1, 1]]), torch.tensor([[2, 2]]),
                           torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("keep_all", [False, True])
def test_row_form_equals_the_dense_form_for_rows_of_tokens(seed, keep_all):
    """A prefill's rows (T tokens sharing one candidate list) routed on their own candidates only
    (apply_row_routing) give what the dense form (every adapter of the stack, weighted 0) gives."""
    _, a_stack, b_stack, scal, ranks, cand, rocs, scale, weights, _ = _random_batch(TokenRule.PER_ADAPTER, seed)
    if keep_all:
        rocs = torch.where(cand >= 0, 10, 0)  # at least every rank
    n_rows, t_len = cand.shape[0], 5
    x = torch.randn(n_rows, t_len, a_stack.shape[2], generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    rows = prepare_row_routing(scal, ranks, a_stack.shape[1], cand, rocs, scale, weights)
    assert rows.keep_all == keep_all
    bt = b_stack.transpose(1, 2)  # (U, R, d_out)
    a_rows = a_stack.index_select(0, rows.index).view(n_rows, -1, a_stack.shape[2])
    b_rows = bt.index_select(0, rows.index).reshape(n_rows, -1, bt.shape[2])
    got = apply_row_routing(x, a_rows, b_rows, rows)
    rep = [m.repeat_interleave(t_len, dim=0) for m in (cand, rocs, scale, weights)]
    want = route_rocs_batched(x.reshape(-1, x.shape[2]), a_stack, b_stack, scal, ranks, *rep)
    torch.testing.assert_close(got.reshape(-1, got.shape[2]), want)
    base = torch.randn_like(got)
    torch.testing.assert_close(apply_row_routing(x, a_rows, b_rows, rows, out=base), base + got)
    acc = base.clone()
    assert apply_row_routing(x, a_rows, b_rows, rows, out=acc, accumulate=True) is acc
    torch.testing.assert_close(acc, base + got)


def test_row_form_refuses_a_repeated_candidate():
    *_, scal, ranks, _c, _r, scale, _w, _p = _random_batch(TokenRule.PER_ADAPTER, 0)
    with pytest.raises(InvalidInputError, match="twice"):
        prepare_row_routing(scal, ranks, 8, torch.tensor([[1, 1]]), torch.tensor([[2, 2]]), scale[:1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("signed", [False, True])
def test_concatenated_rows_equal_the_padded_dense_form(seed, signed):
    """apply_token_rows (the adapters' own rows, no padding: the engine's decode path for per-adapter rules)
    gives the padded dense form's output, ROC choice included, with a rank-0 adapter in the stack."""
    x, a_stack, b_stack, scal, ranks, cand, rocs, scale, weights, _ = _random_batch(TokenRule.PER_ADAPTER, seed)
    routing = prepare_token_routing(scal, ranks, a_stack.shape[1], cand, rocs, scale, weights, TokenRule.PER_ADAPTER)
    assert not routing.keep_all  # some tokens keep fewer ROCs than the rank: the top-o choice is exercised
    r_max = a_stack.shape[1]
    rows = [(u, j) for u, r in enumerate(ranks.tolist()) for j in range(r)]
    a_cat = torch.stack([a_stack[u, j] for u, j in rows])
    bt_cat = torch.stack([b_stack[u, :, j] for u, j in rows])
    seg = torch.tensor([u for u, _ in rows])
    pos = torch.tensor([u * r_max + j for u, j in rows])
    want = apply_token_routing(x, a_stack, b_stack, routing, signed)
    got = apply_token_rows(x, a_cat, bt_cat, seg, pos, routing, signed)
    torch.testing.assert_close(got, want)
    base = torch.randn(x.shape[0], b_stack.shape[1], dtype=x.dtype)
    torch.testing.assert_close(apply_token_rows(x, a_cat, bt_cat, seg, pos, routing, signed, out=base.clone(),
                                                accumulate=True), base + want)
    assert got.abs().max() > 0


def _shuffled_pool(a_stack: torch.Tensor, b_stack: torch.Tensor, ranks: torch.Tensor, seed: int, n_pool: int = 40):
    """(a_rows (P, d_in), bt_rows (P, d_out), rows): the stacks' rank rows written at random places of a pool of
    other random rows, as a RowPool holds them; ``rows[u]`` lists adapter u's places in rank order."""
    g = torch.Generator().manual_seed(seed)
    a_rows = torch.randn(n_pool, a_stack.shape[2], generator=g, dtype=a_stack.dtype)
    bt_rows = torch.randn(n_pool, b_stack.shape[1], generator=g, dtype=b_stack.dtype)
    free = torch.randperm(n_pool, generator=g).tolist()
    rows = []
    for u, r in enumerate(ranks.tolist()):
        rows.append([free.pop() for _ in range(r)])
        for j, p in enumerate(rows[-1]):
            a_rows[p], bt_rows[p] = a_stack[u, j], b_stack[u, :, j]
    return a_rows, bt_rows, rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_plain_lora_over_a_shuffled_pool_equals_the_dense_form(seed):
    """apply_lora_sparse (the engine's CPU decode path for plain LoRA) reads each token's adapters' rows where they
    lie in a row pool, in any order and among other adapters' rows, and gives the dense form's output: tokens with
    one, several or no candidates, a rank-0 adapter, with and without accumulating into ``out``."""
    x, a_stack, b_stack, scal, ranks, cand, _, scale, weights, _ = _random_batch(TokenRule.PER_ADAPTER, seed)
    cand[0] = -1  # a token with no candidate adds nothing
    rocs = torch.full(cand.shape, 99)  # every ROC kept: plain LoRA
    routing = prepare_token_routing(scal, ranks, a_stack.shape[1], cand, rocs, scale, weights, TokenRule.PER_ADAPTER)
    assert routing.keep_all
    a_rows, bt_rows, rows = _shuffled_pool(a_stack, b_stack, ranks, 100 + seed)
    crow, col, vals = sparse_pattern(routing.coeff, rows)
    assert crow[1] == crow[0] and len(col) < x.shape[0] * sum(ranks.tolist())  # token 0 is empty; no padding
    want = apply_token_routing(x, a_stack, b_stack, routing)
    got = apply_lora_sparse(x, a_rows, bt_rows, crow, col, vals)
    torch.testing.assert_close(got, want)
    base = torch.randn(x.shape[0], b_stack.shape[1], dtype=x.dtype)
    torch.testing.assert_close(apply_lora_sparse(x, a_rows, bt_rows, crow, col, vals, out=base.clone(),
                                                 accumulate=True), base + want)
    assert got[0].abs().max() == 0 and got.abs().max() > 0
    empty = sparse_pattern(torch.zeros_like(routing.coeff), rows)
    assert apply_lora_sparse(x, a_rows, bt_rows, *empty).abs().max() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("signed", [False, True])
def test_sparse_top_o_over_a_shuffled_pool_equals_the_padded_dense_form(seed, signed):
    """apply_token_rows_sparse (the engine's CPU decode path for HiLoRA plans): each token's projections on its own
    candidates' rows only, read where they lie in a pool; the top-o choice and the sum equal the padded form."""
    x, a_stack, b_stack, scal, ranks, cand, rocs, scale, weights, _ = _random_batch(TokenRule.PER_ADAPTER, seed)
    routing = prepare_token_routing(scal, ranks, a_stack.shape[1], cand, rocs, scale, weights, TokenRule.PER_ADAPTER)
    assert not routing.keep_all  # the top-o choice is exercised
    a_rows, bt_rows, rows = _shuffled_pool(a_stack, b_stack, ranks, 200 + seed)
    crow, col, vals, places = sparse_pattern(routing.coeff, rows, a_stack.shape[1])
    want = apply_token_routing(x, a_stack, b_stack, routing, signed)
    got = apply_token_rows_sparse(x, a_rows, bt_rows, crow, col, vals, places, routing, signed)
    torch.testing.assert_close(got, want)
    base = torch.randn(x.shape[0], b_stack.shape[1], dtype=x.dtype)
    torch.testing.assert_close(apply_token_rows_sparse(x, a_rows, bt_rows, crow, col, vals, places, routing, signed,
                                                       out=base.clone(), accumulate=True), base + want)
    assert got.abs().max() > 0
