"""Routing policies produce the plans the spec describes."""

import numpy as np
import pytest

from hilora_core import (
    EmptyPoolError,
    InvalidInputError,
    PolicyConfig,
    RoutingPlan,
    UnknownAdapterError,
    make_plans,
)
from hilora_core.baselines.retriever import cosine_similarity

NAMES = ["a", "b", "c", "d"]
RANKS = [4, 8, 8, 16]


def test_hilora_plan_uses_candidates_and_budget():
    scores = np.array([[1.0, -2.0, 3.0, 0.5]])
    (plan,) = make_plans(PolicyConfig("hilora", gamma=0.4), NAMES, RANKS, scores=scores)
    assert set(plan.adapters) <= {"a", "c", "d"}
    assert plan.adapters[0] == "c"  # best score first
    assert sum(plan.rocs) == round(0.4 * (4 + 8 + 16))  # budget over C = {c, a, d}
    assert all(o <= RANKS[NAMES.index(n)] for n, o in zip(plan.adapters, plan.rocs, strict=True))
    assert plan.normalize and plan.token_rule == "per_adapter"


def test_hilora_gs_keeps_all_rocs_of_candidates():
    scores = np.array([[-1.5, -2.0, -3.0, -9.0]])  # c = 2
    (plan,) = make_plans(PolicyConfig("hilora_gs"), NAMES, RANKS, scores=scores)
    assert plan.adapters == ("a", "b") and plan.rocs == (4, 8)


def test_seeded_hilora_is_reproducible_and_deterministic_mode_is_stable():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 4)) + 1
    p1 = make_plans(PolicyConfig("hilora", seed=3), NAMES, RANKS, scores=scores)
    p2 = make_plans(PolicyConfig("hilora", seed=3), NAMES, RANKS, scores=scores)
    assert p1 == p2
    d1 = make_plans(PolicyConfig("hilora"), NAMES, RANKS, scores=scores)
    assert d1 == make_plans(PolicyConfig("hilora"), NAMES, RANKS, scores=scores)


def test_retriever_takes_top_k_cosine_uniformly():
    means = np.eye(4)
    z = np.array([[0.9, 0.1, 0.5, 0.0]])
    cos = cosine_similarity(z, means)
    (plan,) = make_plans(PolicyConfig("retriever"), NAMES, RANKS, cosine=cos)
    assert plan.adapters == ("a", "c", "b")
    assert plan.weights == pytest.approx((1 / 3,) * 3)
    assert not plan.normalize


def test_pool_wide_policies():
    n = 2
    roc = make_plans(PolicyConfig("hilora_roc"), NAMES, RANKS, n_queries=n)
    assert len(roc) == n and roc[0].token_rule == "global_topk" and roc[0].top_k == 24
    assert roc[0].scale == pytest.approx(np.sqrt(np.mean(RANKS) / 24))
    arrow = make_plans(PolicyConfig("arrow"), NAMES, RANKS, n_queries=n)[0]
    assert arrow.token_rule == "arrow" and arrow.top_k == 3 and arrow.adapters == tuple(NAMES)
    merged = make_plans(PolicyConfig("merged"), NAMES, RANKS, n_queries=n)[0]
    assert merged.weights == pytest.approx((0.25,) * 4) and not merged.ensemble
    ens = make_plans(PolicyConfig("ensemble"), NAMES, RANKS, n_queries=n)[0]
    assert ens.ensemble
    assert make_plans(PolicyConfig("base"), NAMES, RANKS, n_queries=n)[0].is_base


def test_explicit_and_errors():
    (plan,) = make_plans(PolicyConfig("explicit"), NAMES, RANKS, explicit=["b"], n_queries=1)
    assert plan == RoutingPlan.single("b")
    with pytest.raises(UnknownAdapterError, match="zz"):
        make_plans(PolicyConfig("explicit"), NAMES, RANKS, explicit=["zz"], n_queries=1)
    with pytest.raises(InvalidInputError, match="unknown policy 'nope'"):
        PolicyConfig("nope")
    with pytest.raises(InvalidInputError, match="gamma"):
        PolicyConfig(gamma=0.0)
    with pytest.raises(EmptyPoolError):
        make_plans(PolicyConfig("hilora"), [], [], scores=np.zeros((1, 0)))
    with pytest.raises(InvalidInputError, match="needs scores"):
        make_plans(PolicyConfig("hilora"), NAMES, RANKS)


def test_plan_validation():
    with pytest.raises(InvalidInputError, match="twice"):
        RoutingPlan(adapters=("a", "a"))
    with pytest.raises(InvalidInputError, match="rocs"):
        RoutingPlan(adapters=("a",), rocs=(1, 2))
    with pytest.raises(InvalidInputError, match="top_k"):
        RoutingPlan(adapters=("a",), token_rule="arrow")
