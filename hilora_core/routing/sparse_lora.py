"""Plain LoRA over a row pool with sparse kernels: each token touches its own adapters' rank rows only.

The dense plain-LoRA form (:func:`hilora_core.routing.token_routing.apply_full_lora`) multiplies every token of
a decode batch by every adapter's rows (copied out of the pool first) and then zeroes what the token does not
use: with 25 adapters in a batch of 32 tokens, 1/25 of that work is kept. Here the token -> rows map is a CSR
pattern over the pool (one row per token, one column per pool row): the projections ``a_j . x_t`` are a sampled
matmul at the pattern (``torch.sparse.sampled_addmm``), the sum ``sum_j c_tj p_tj b_j`` a sparse-dense matmul,
both reading the rows where they lie. Work and memory traffic follow the tokens' own ranks.

HiLoRA's top-o rule takes the same route (:func:`apply_token_rows_sparse`): the sampled matmul gives each token's
projections on its candidates' rows, the top-o choice is made on those alone, and the kept ROCs are summed.

torch has these kernels on the CPU for float32 / float64; the engine uses this form there
(``routed_linear.py``) and the dense one elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from hilora_core.routing.token_routing import TokenRouting

# torch says once per process that its CSR tensors are "beta"; the two CPU kernels used here are long-standing
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def sparse_pattern(coeff: torch.Tensor, rows: Sequence[Sequence[int]], r_max: int | None = None) -> tuple[
        torch.Tensor, ...]:
    """(crow (N + 1,), col (nnz,), vals (nnz,)) for :func:`apply_lora_sparse`: per token, the pool rows ``rows[u]``
    of every adapter u with a non-zero ``coeff`` (N, U) entry, each row with that coefficient. With ``r_max`` R,
    also ``places`` (nnz,): each entry's place ``(t * U + u) * R + j`` in a padded (N, U, R) layout, for the
    top-o choice of :func:`apply_token_rows_sparse`."""
    crow: list[int] = [0]
    col: list[int] = []
    vals: list[float] = []
    places: list[int] = []
    n_ad = coeff.shape[1]
    for t, coeffs in enumerate(coeff.tolist()):
        for u, c in enumerate(coeffs):
            if c:
                col += rows[u]
                vals += [c] * len(rows[u])
                if r_max is not None:
                    first = (t * n_ad + u) * r_max
                    places += range(first, first + len(rows[u]))
        crow.append(len(col))
    device = coeff.device
    out = (torch.tensor(crow, dtype=torch.long, device=device), torch.tensor(col, dtype=torch.long, device=device),
           torch.tensor(vals, dtype=coeff.dtype, device=device))
    return out if r_max is None else (*out, torch.tensor(places, dtype=torch.long, device=device))


def apply_lora_sparse(x: torch.Tensor, a_rows: torch.Tensor, bt_rows: torch.Tensor, crow: torch.Tensor,
                      col: torch.Tensor, vals: torch.Tensor, out: torch.Tensor | None = None,
                      accumulate: bool = False) -> torch.Tensor:
    """:func:`apply_full_lora` reading each token's own adapters' rows only, straight from a row pool: (N, d_in)
    -> (N, d_out), CPU, float32 / float64.

    ``a_rows`` (P, d_in), ``bt_rows`` (P, d_out): a pool of rank rows; the CSR pattern ``crow`` (N + 1,), ``col``
    (nnz,) lists, per token, the pool rows of its candidates and ``vals`` (nnz,) their multipliers (the token's
    coefficient for that adapter). The projections are a sampled matmul at the pattern (nnz dot products) and the
    sum a sparse-dense matmul: the work is the tokens' own ranks, where the dense form multiplies every token by
    every adapter's rows and copies them out of the pool first (3.5x less time at 25 adapters on two cores)."""
    n_tok, n_pool = x.shape[0], a_rows.shape[0]
    if col.numel() == 0:
        return x.new_zeros((n_tok, bt_rows.shape[1])) if out is None else out
    pattern = torch.sparse_csr_tensor(crow, col, vals, size=(n_tok, n_pool), check_invariants=False)
    proj = torch.sparse.sampled_addmm(pattern, x, a_rows.T, beta=0.0)  # (N, P) at the pattern: x_t . a_j
    coef = torch.sparse_csr_tensor(crow, col, proj.values().mul_(vals), size=(n_tok, n_pool), check_invariants=False)
    if out is None:
        return coef @ bt_rows
    return out.addmm_(coef, bt_rows) if accumulate else torch.addmm(out, coef, bt_rows)


def apply_token_rows_sparse(x: torch.Tensor, a_rows: torch.Tensor, bt_rows: torch.Tensor, crow: torch.Tensor,
                            col: torch.Tensor, vals: torch.Tensor, places: torch.Tensor, routing: TokenRouting,
                            signed: bool = False, out: torch.Tensor | None = None,
                            accumulate: bool = False) -> torch.Tensor:
    """HiLoRA's per-adapter rule (each token keeps the top-o ROCs of each candidate by |p|) in the sparse form:
    (N, d_in) -> (N, d_out), the same sum as :func:`hilora_core.routing.token_routing.apply_token_rows`.

    The projections of each token on its candidates' rows come from the sampled matmul as in
    :func:`apply_lora_sparse` (pattern from :func:`sparse_pattern` with ``r_max`` = R of ``routing``); the top-o
    choice is made in the padded (N, U, R) layout at ``places`` (everything else at -inf, never kept), and the kept
    ROCs are summed by the sparse-dense matmul."""
    n_tok, n_pool = x.shape[0], a_rows.shape[0]
    n_ad, r_max = routing.bias.shape
    if n_tok == 0 or routing.kmax == 0 or col.numel() == 0:
        return x.new_zeros((n_tok, bt_rows.shape[1])) if out is None else out
    pattern = torch.sparse_csr_tensor(crow, col, vals, size=(n_tok, n_pool), check_invariants=False)
    proj = torch.sparse.sampled_addmm(pattern, x, a_rows.T, beta=0.0).values()  # (nnz,)
    key = torch.full((n_tok * n_ad * r_max,), float("-inf"), dtype=x.dtype, device=x.device)
    key.index_copy_(0, places, proj if signed else proj.abs())
    idx = key.view(n_tok, n_ad, r_max).topk(routing.kmax, dim=-1).indices  # (N, U, kmax)
    keep = key.zero_().view(n_tok, n_ad, r_max).scatter_(-1, idx, routing.take.to(x.dtype))
    coef = torch.sparse_csr_tensor(crow, col, keep.view(-1).index_select(0, places).mul_(proj).mul_(vals),
                                   size=(n_tok, n_pool), check_invariants=False)
    if out is None:
        return coef @ bt_rows
    return out.addmm_(coef, bt_rows) if accumulate else torch.addmm(out, coef, bt_rows)
