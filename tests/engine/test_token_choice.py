"""Token choice (``choose_tokens``): the batched Gumbel-max race, one row of noise per request.

Each check is deterministic (seeded noise): the shares of many draws follow the tempered (and nucleus-cut)
softmax, greedy rows and neighbouring rows do not interact, and a seeded draw survives the last-bits
differences of logits that batching causes (the inverse-CDF draw the loop used before did not).
"""

from __future__ import annotations

import pytest
import torch

from hilora_core.engine.generation import choose_tokens, gumbel_noise, logprob_entries
from hilora_core.errors import InvalidInputError

N = 40000


def noise(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([gumbel_noise(g, vocab, torch.device("cpu")) for _ in range(rows)])


def shares(logits: torch.Tensor, temperature: float, top_p: float | None) -> torch.Tensor:
    """(V,) share of N seeded draws that chose each token, for one row of logits."""
    scores = logits.expand(N, -1)
    temp = torch.full((N,), temperature)
    nucleus = None if top_p is None else torch.full((N,), top_p)
    tokens = choose_tokens(scores, temp, nucleus, noise(N, logits.shape[-1]))
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / N


def test_sampled_shares_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
    for temperature in (0.5, 1.0, 2.0):
        want = torch.softmax(logits / temperature, dim=-1)
        assert torch.allclose(shares(logits, temperature, None), want, atol=0.01)  # 4 sigma at N draws


def test_nucleus_keeps_the_smallest_set_reaching_top_p_and_renormalises():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05]))
    got = shares(logits, 1.0, 0.75)  # 0.5 + 0.3 reaches 0.75: tokens 1 and 3 only
    want = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.0]) / 0.8
    assert torch.equal(got > 0, want > 0)  # tokens outside the nucleus are never chosen
    assert torch.allclose(got, want, atol=0.01)
    assert torch.equal(shares(logits, 1.0, 1e-6) > 0, torch.tensor([False, True, False, False, False]))


def test_tokens_of_probability_zero_are_never_chosen_whatever_their_noise():
    logits = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.5, float("-inf")]] * 4)
    extreme = torch.tensor([[1e30, 0.0, 1e30, 0.0, 1e30], [1e30, -5.0, 0.0, 5.0, 0.0],
                            [0.0, float("-inf"), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, float("-inf"), 0.0]])
    for top_p in (None, torch.full((4,), 0.999)):
        tokens = choose_tokens(logits, torch.ones(4), top_p, extreme)
        assert set(tokens.tolist()) <= {1, 3}
    assert choose_tokens(logits, torch.ones(4), None, extreme).tolist()[1:] == [3, 3, 1]


def test_greedy_rows_ignore_their_draw_and_rows_do_not_interact():
    torch.manual_seed(0)
    scores = torch.randn(6, 50)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.3, 0.0])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.8, 1.0])
    draws = noise(6, 50)
    batch = choose_tokens(scores, temperature, top_p, draws)
    greedy = scores.argmax(dim=-1)
    assert torch.equal(batch[temperature == 0], greedy[temperature == 0])
    for i in range(6):  # each row alone gives its batched token
        alone = choose_tokens(scores[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], draws[i:i + 1])
        assert alone.item() == batch[i].item()
    assert torch.equal(choose_tokens(scores, None, None, None), greedy)


def test_sampling_without_draws_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="noise"):
        choose_tokens(torch.zeros(2, 5), torch.ones(2), None, None)


def test_a_seeded_draw_survives_the_rounding_that_batching_causes():
    """The loop's logits for one request differ by up to about 3e-5 nats between batches (float rounding
    of other shapes; docs/continuous-batching.md). A seeded draw must not change with them: 2,000 draws
    over a SmolLM2-sized vocabulary, each redone on logits perturbed by that much."""
    g = torch.Generator().manual_seed(7)
    rows, vocab, rounds = 200, 49152, 10
    flips = 0
    for r in range(rounds):
        logits = 3.0 * torch.randn((rows, vocab), generator=g)
        logits[:, :8] += 8.0  # a few likely tokens and a long tail, as a language model's
        perturbed = logits + 3e-5 * torch.randn((rows, vocab), generator=g)
        draws = noise(rows, vocab, seed=100 + r)
        temperature = torch.ones(rows)
        flips += int((choose_tokens(logits, temperature, None, draws)
                      != choose_tokens(perturbed, temperature, None, draws)).sum())
    assert flips == 0


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
