"""Candidate sets and ROC allocation, as the spec defines them."""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hilora_core import EmptyPoolError, InvalidInputError, allocate_rocs, roc_budget, select_candidates


def test_positive_branch_takes_every_positive_score_best_first():
    scores = np.array([0.5, -1.0, 2.0, 0.0, 0.1])
    assert select_candidates(scores).tolist() == [2, 0, 4]  # 0.0 is not > 0


def test_negative_branch_widens_with_misalignment():
    scores = np.array([-2.2, -9.0, -3.0, -4.0, -5.0])
    # c = max(1, ceil(2.2)) = 3
    assert select_candidates(scores).tolist() == [0, 2, 3]
    assert select_candidates(np.array([-0.3, -1.0])).tolist() == [0]  # c = max(1, ceil(0.3)) = 1
    # c larger than the pool: the whole pool
    assert select_candidates(np.array([-40.0, -50.0])).tolist() == [0, 1]


def test_ties_keep_lower_index_first():
    assert select_candidates(np.array([1.0, 3.0, 1.0, 3.0])).tolist() == [1, 3, 0, 2]
    assert select_candidates(np.array([-1.5, -1.5, -1.5])).tolist() == [0, 1]


def test_cap_keeps_the_best():
    scores = np.array([0.5, 0.7, 0.2, 0.9])
    assert select_candidates(scores, max_candidates=2).tolist() == [3, 1]
    assert select_candidates(np.array([-5.0, -6.0, -7.0]), max_candidates=1).tolist() == [0]


@pytest.mark.parametrize("bad", [np.array([]), np.array([np.nan, 1.0]), np.array([[1.0]])])
def test_candidates_reject_bad_scores(bad):
    with pytest.raises(InvalidInputError):
        select_candidates(bad)


def test_candidates_reject_bad_cap_and_empty_pool_is_typed():
    with pytest.raises(EmptyPoolError):
        select_candidates(np.array([]))
    with pytest.raises(InvalidInputError, match="max_candidates"):
        select_candidates(np.array([1.0]), max_candidates=0)


def test_budget_rounds_half_up_and_is_at_least_one():
    assert roc_budget(np.array([8, 8]), 0.4) == 6  # 6.4
    assert roc_budget(np.array([5]), 0.5) == 3  # 2.5 -> 3
    assert roc_budget(np.array([1]), 0.1) == 1
    with pytest.raises(InvalidInputError, match="gamma"):
        roc_budget(np.array([8]), 0.0)
    with pytest.raises(InvalidInputError, match="gamma"):
        roc_budget(np.array([8]), 1.5)
    with pytest.raises(InvalidInputError, match="ranks"):
        roc_budget(np.array([0, 4]), 0.5)


@settings(max_examples=200, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 16), min_size=1, max_size=8),
    gamma=st.floats(0.05, 1.0),
    scale=st.floats(0.0, 30.0),
    seed=st.one_of(st.none(), st.integers(0, 1000)),
    data=st.data(),
)
def test_allocation_sums_to_budget_within_capacity(ranks, gamma, scale, seed, data):
    scores = np.array(data.draw(st.lists(st.floats(-1, 1), min_size=len(ranks), max_size=len(ranks)))) * scale
    r = np.array(ranks)
    o = allocate_rocs(scores, r, gamma, rng=seed)
    assert o.sum() == roc_budget(r, gamma)  # the budget itself is pinned by literal cases above
    assert np.all(o >= 0) and np.all(o <= r)


def test_deterministic_mode_is_largest_remainder_and_stable():
    scores = np.log(np.array([0.5, 0.3, 0.2]))  # softmax = (0.5, 0.3, 0.2)
    ranks = np.array([16, 16, 16])
    o = allocate_rocs(scores, ranks, gamma=7 / 48)  # O = 7: exact 3.5, 2.1, 1.4 -> 3,2,1 + 1 to 0.5
    assert o.tolist() == [4, 2, 1]
    assert all(allocate_rocs(scores, ranks, 7 / 48).tolist() == [4, 2, 1] for _ in range(5))


def test_capacity_excess_is_redistributed_by_weight():
    # adapter 0 dominates but holds only 2 ROCs; the 4 extra go to the others 1:1
    scores = np.array([50.0, 0.0, 0.0])
    o = allocate_rocs(scores, np.array([2, 8, 8]), gamma=1 / 3)  # O = 6
    assert o.tolist() == [2, 2, 2]


def test_sampled_mode_matches_multinomial_frequencies():
    scores = np.array([1.0, 0.0, -1.0])
    pi = np.exp(scores) / np.exp(scores).sum()
    ranks = np.array([16, 16, 16])  # O = 12: capacity never binds, so draws are plain multinomial
    rng = np.random.default_rng(0)
    draws = np.stack([allocate_rocs(scores, ranks, 0.25, rng=rng) for _ in range(4000)])
    np.testing.assert_allclose(draws.mean(axis=0) / 12, pi, atol=0.01)
    np.testing.assert_allclose(draws.var(axis=0), 12 * pi * (1 - pi), rtol=0.1)
    # seedable: same seed, same draws
    a = [allocate_rocs(scores, ranks, 0.25, rng=np.random.default_rng(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_allocation_rejects_bad_input():
    with pytest.raises(InvalidInputError, match="shape"):
        allocate_rocs(np.array([1.0, 2.0]), np.array([4]), 0.5)
    with pytest.raises(InvalidInputError, match="ranks must be >= 1"):
        allocate_rocs(np.array([1.0]), np.array([0]), 0.5)
    with pytest.raises(InvalidInputError, match="gamma"):
        allocate_rocs(np.array([1.0]), np.array([4]), -0.1)
    with pytest.raises(InvalidInputError, match="non-finite"):
        allocate_rocs(np.array([np.inf]), np.array([4]), 0.5)
    with pytest.raises(EmptyPoolError):
        allocate_rocs(np.array([]), np.array([]), 0.5)
