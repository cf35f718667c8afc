"""Token-level ROC routing against a plain per-token loop written from the spec's equations."""

import math

import numpy as np
import pytest
import torch

from hilora_core import DimensionMismatchError, InvalidInputError, TokenRule, arrow_prototype, route_rocs
from hilora_core.routing.token_routing import route_rocs_batched, stack_adapters

torch.manual_seed(0)


def make_adapters(ranks, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    b = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for r in ranks]
    return a, b


def loop_reference(x, a_list, b_list, scalings, o, signed=False):
    """y_t = sqrt(rbar/O) sum_i s_i sum_{j in top-o_i |a_ij . x_t|} b_ij (a_ij . x_t), one token at a time."""
    rbar = sum(a.shape[0] for a in a_list) / len(a_list)
    norm = math.sqrt(rbar / sum(o))
    out = torch.zeros(x.shape[0], b_list[0].shape[0], dtype=x.dtype)
    for t in range(x.shape[0]):
        for a, b, s, k in zip(a_list, b_list, scalings, o, strict=True):
            p = [float(a[j] @ x[t]) for j in range(a.shape[0])]
            key = p if signed else [abs(v) for v in p]
            chosen = sorted(range(len(p)), key=lambda j: -key[j])[:k]
            for j in chosen:
                out[t] += norm * s * b[:, j] * p[j]
    return out


@pytest.mark.parametrize("signed", [False, True])
def test_matches_per_token_loop(signed):
    a, b = make_adapters([4, 8, 2])
    x = torch.randn(7, 12, dtype=torch.float64)
    o, s = [2, 3, 1], [0.5, 2.0, 1.5]
    got = route_rocs(x, a, b, s, o, signed=signed)
    torch.testing.assert_close(got, loop_reference(x, a, b, s, o, signed=signed))


def test_signed_and_magnitude_rules_differ():
    a, b = make_adapters([8])
    x = torch.randn(16, 12, dtype=torch.float64)
    assert not torch.allclose(route_rocs(x, a, b, [1.0], [2]), route_rocs(x, a, b, [1.0], [2], signed=True))


def test_all_rocs_one_adapter_is_plain_lora():
    a, b = make_adapters([6])
    x = torch.randn(5, 12, dtype=torch.float64)
    got = route_rocs(x, a, b, [1.7], [6])
    torch.testing.assert_close(got, 1.7 * x @ a[0].T @ b[0].T)


def test_zero_rocs_for_an_adapter_drops_it():
    a, b = make_adapters([4, 4])
    x = torch.randn(3, 12, dtype=torch.float64)
    got = route_rocs(x, a, b, [1.0, 1.0], [4, 0])
    # rbar = 4, O = 4: normalisation 1, only adapter 0 contributes
    torch.testing.assert_close(got, x @ a[0].T @ b[0].T)


def test_batched_mixed_plans_equal_each_sequence_alone():
    a, b = make_adapters([4, 8, 2, 6])
    a_stack, b_stack, ranks = stack_adapters(a, b)
    scal = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    x = torch.randn(9, 12, dtype=torch.float64)
    # tokens 0-3: sequence 1 uses adapters (1, 3) with o = (5, 2); tokens 4-8: adapter 2 with o = 1
    cand = torch.tensor([[1, 3]] * 4 + [[2, -1]] * 5)
    rocs = torch.tensor([[5, 2]] * 4 + [[1, 0]] * 5)
    n1 = math.sqrt((8 + 6) / 2 / 7)
    n2 = math.sqrt(2 / 1)
    scale = torch.tensor([n1] * 4 + [n2] * 5, dtype=torch.float64)
    got = route_rocs_batched(x, a_stack, b_stack, scal, ranks, cand, rocs, scale)
    want1 = route_rocs(x[:4], [a[1], a[3]], [b[1], b[3]], [0.5, 1.5], [5, 2])
    want2 = route_rocs(x[4:], [a[2]], [b[2]], [2.0], [1])
    torch.testing.assert_close(got, torch.cat([want1, want2]))


def test_global_topk_picks_across_adapters():
    a, b = make_adapters([4, 4])
    a_stack, b_stack, ranks = stack_adapters(a, b)
    x = torch.randn(6, 12, dtype=torch.float64)
    got = route_rocs_batched(
        x, a_stack, b_stack, torch.ones(2, dtype=torch.float64), ranks,
        torch.tensor([[0, 1]] * 6), torch.tensor([[3, 0]] * 6), torch.ones(6, dtype=torch.float64),
        rule=TokenRule.GLOBAL_TOPK,
    )
    want = torch.zeros(6, 10, dtype=torch.float64)
    for t in range(6):
        p = torch.cat([a[0] @ x[t], a[1] @ x[t]])
        bcat = torch.cat([b[0], b[1]], dim=1)
        top = p.abs().topk(3).indices
        want[t] = bcat[:, top] @ p[top]
    torch.testing.assert_close(got, want)


def test_arrow_rule_weights_topk_adapters_by_prototype():
    a, b = make_adapters([4, 4, 4])
    a_stack, b_stack, ranks = stack_adapters(a, b)
    protos = torch.stack([arrow_prototype(ai, bi) for ai, bi in zip(a, b, strict=True)])
    x = torch.randn(5, 12, dtype=torch.float64)
    got = route_rocs_batched(
        x, a_stack, b_stack, torch.ones(3, dtype=torch.float64), ranks,
        torch.tensor([[0, 1, 2]] * 5), torch.tensor([[2, 0, 0]] * 5), torch.ones(5, dtype=torch.float64),
        rule=TokenRule.ARROW, prototypes=protos,
    )
    want = torch.zeros(5, 10, dtype=torch.float64)
    for t in range(5):
        sim = (protos @ x[t]).abs()
        top = sim.topk(2).indices
        w = torch.softmax(sim[top], dim=0)
        for wi, i in zip(w, top, strict=True):
            want[t] += wi * (b[i] @ (a[i] @ x[t]))
    torch.testing.assert_close(got, want)


def test_arrow_prototype_is_top_right_singular_vector():
    a, b = make_adapters([5], d_in=20, d_out=15, seed=3)
    v = arrow_prototype(a[0], b[0])
    _, _, vh = torch.linalg.svd(b[0] @ a[0])
    assert float(torch.linalg.norm(v)) == pytest.approx(1.0)
    assert abs(float(v @ vh[0])) == pytest.approx(1.0, abs=1e-10)


def test_bad_input_is_typed():
    a, b = make_adapters([4])
    x = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="0 <= o_i <= r_i"):
        route_rocs(x, a, b, [1.0], [5])
    with pytest.raises(InvalidInputError, match="at least one ROC"):
        route_rocs(x, a, b, [1.0], [0])
    with pytest.raises(DimensionMismatchError, match="d_in"):
        route_rocs(torch.randn(3, 11, dtype=torch.float64), a, b, [1.0], [2])
    with pytest.raises(DimensionMismatchError, match="do not fit"):
        route_rocs(x, a, [torch.randn(10, 3, dtype=torch.float64)], [1.0], [2])
    with pytest.raises(InvalidInputError, match="scalings"):
        route_rocs(x, a, b, [1.0, 2.0], [2])


def test_float32_path_matches_float64():
    a, b = make_adapters([8, 4])
    x = torch.randn(4, 12, dtype=torch.float64)
    hi = route_rocs(x, a, b, [1.0, 1.0], [3, 2]).numpy()
    lo = route_rocs(x.float(), [t.float() for t in a], [t.float() for t in b], [1.0, 1.0], [3, 2]).numpy()
    np.testing.assert_allclose(lo, hi, rtol=1e-4, atol=1e-4)
