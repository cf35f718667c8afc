"""Token choice (``choose_tokens``): batched inverse-CDF sampling with one uniform draw per row.

Stratified uniforms ``(k + 0.5) / N`` turn sampling into quadrature: each token must be chosen for a
share of the N draws equal to its probability up to 1/N, so the distribution is checked exactly,
without a random test.
"""

from __future__ import annotations

import pytest
import torch

from hilora_core.engine.generation import choose_tokens, logprob_entries
from hilora_core.errors import InvalidInputError

N = 4000


def stratified(n: int = N) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def shares(logits: torch.Tensor, temperature: float, top_p: float | None) -> torch.Tensor:
    """(V,) share of N stratified draws that chose each token, for one row of logits."""
    scores = logits.expand(N, -1)
    temp = torch.full((N,), temperature)
    nucleus = None if top_p is None else torch.full((N,), top_p)
    tokens = choose_tokens(scores, temp, nucleus, stratified())
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / N


def test_sampled_shares_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
    for temperature in (0.5, 1.0, 2.0):
        want = torch.softmax(logits / temperature, dim=-1)
        assert torch.allclose(shares(logits, temperature, None), want, atol=2.0 / N)


def test_nucleus_keeps_the_smallest_set_reaching_top_p_and_renormalises():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05]))
    got = shares(logits, 1.0, 0.75)  # 0.5 + 0.3 reaches 0.75: tokens 1 and 3 only
    want = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.0]) / 0.8
    assert torch.allclose(got, want, atol=2.0 / N)
    assert torch.equal(shares(logits, 1.0, 1e-6) > 0, torch.tensor([False, True, False, False, False]))


def test_tokens_of_probability_zero_are_never_chosen_even_at_the_ends_of_the_unit_interval():
    logits = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.5, float("-inf")]] * 4)
    uniforms = torch.tensor([0.0, 1e-9, 1.0 - 2.0**-24, 1.0])
    for top_p in (None, torch.full((4,), 0.999)):
        tokens = choose_tokens(logits, torch.ones(4), top_p, uniforms)
        assert set(tokens.tolist()) <= {1, 3}
    assert choose_tokens(logits, torch.ones(4), None, uniforms).tolist() == [1, 1, 3, 3]


def test_greedy_rows_ignore_their_draw_and_rows_do_not_interact():
    torch.manual_seed(0)
    scores = torch.randn(6, 50)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.3, 0.0])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.8, 1.0])
    uniforms = torch.rand(6)
    batch = choose_tokens(scores, temperature, top_p, uniforms)
    greedy = scores.argmax(dim=-1)
    assert torch.equal(batch[temperature == 0], greedy[temperature == 0])
    for i in range(6):  # each row alone gives its batched token
        alone = choose_tokens(scores[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], uniforms[i:i + 1])
        assert alone.item() == batch[i].item()
    assert torch.equal(choose_tokens(scores, None, None, None), greedy)


def test_sampling_without_draws_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="uniform"):
        choose_tokens(torch.zeros(2, 5), torch.ones(2), None, None)


def test_logprob_entries_equal_each_row_read_on_its_own():
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(5, 30), dim=-1)
    tokens, tops = [3, 0, 29, 7, 11], [0, 1, 3, 0, 5]
    entries = logprob_entries(logp, tokens, tops)
    assert [e.token_id for e in entries] == tokens
    for i, e in enumerate(entries):
        assert e.logprob == pytest.approx(float(logp[i, tokens[i]]))
        values, ids = logp[i].topk(tops[i]) if tops[i] else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        assert [t for t, _ in e.top] == ids.tolist()
        assert [v for _, v in e.top] == pytest.approx(values.tolist())
    assert logprob_entries(logp[:0], [], []) == []
    assert all(e.top == () for e in logprob_entries(logp, tokens, [0] * 5))
