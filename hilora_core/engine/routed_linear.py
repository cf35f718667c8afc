"""Routed linear layers: ``y = base(x) + routed LoRA(x)`` for a whole mixed batch at once.

:class:`RoutedLinear` wraps a base ``nn.Linear``; the routed part is added into the base output (one
call per distinct (token rule, signed) pair present, usually one). What each row routes on comes
from the :class:`BatchRouting` (``batch_routing.py``) that the engine places on the shared
:class:`RoutingState` around each forward pass.

Two forms of the same sum, chosen per forward pass:

- **Sparse** (decode on the CPU, per-adapter rules: plain LoRA and HiLoRA's top-o ROCs, float32 / float64):
  each token is projected on its own candidates' rows only, read where they lie in the row pool, by a sampled
  matmul over a per-batch CSR pattern, and the kept ROCs are summed by a sparse-dense matmul
  (:func:`apply_lora_sparse`, :func:`apply_token_rows_sparse`; ``routing/sparse_lora.py``). The work follows
  each token's own ranks; with 25 adapters in a batch of 32 the dense form below did 25x the multiplications.
- **Dense** (decode elsewhere, T = 1, and every rule): each token is projected on every active adapter, those
  not among its candidates weighted 0. Under per-adapter rules over the adapters' rows concatenated without
  padding, gathered once per batch (:func:`apply_token_rows`, :func:`apply_full_lora`): the projections cost the
  sum of the ranks, not adapters x largest rank. Other rules use the active slots' stacks cut to the largest
  rank among them (:func:`apply_token_routing`). On a GPU this is one fast matmul per layer.
- **Per row** (prefill, T > 1, per-adapter rules): the T tokens of a row share one candidate list,
  so each row is projected on its own C candidates only (:func:`apply_row_routing`), C instead of U
  adapters per token (measured against the dense form in ``docs/load-test.md``).

Each layer routes only on the adapters that adapt it. Adapters target different modules (one adapts
q and v, another the MLP), and an adapter without weights at a layer has rank 0 there and adds
nothing. A layer that none of the batch's adapters adapts runs the base layer alone; under
per-adapter rules the dense form keeps only the adapters with weights at the layer (its
:class:`LayerView`), cut to their largest rank there, and the per-row form gathers at that rank.

The x-independent half (:func:`prepare_token_routing`, :func:`prepare_row_routing`) is made once
per batch and shared by every layer with the same adapters, ranks and scalings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from hilora_core.engine.batch_routing import BatchRouting, LayerView
from hilora_core.engine.slots import LayerSlots
from hilora_core.plan import TokenRule
from hilora_core.routing.row_routing import apply_row_routing, prepare_row_routing
from hilora_core.routing.sparse_lora import apply_lora_sparse, apply_token_rows_sparse
from hilora_core.routing.token_routing import (
    TokenRouting,
    apply_full_lora,
    apply_token_routing,
    apply_token_rows,
    prepare_token_routing,
)


class RoutingState:
    """Shared by every :class:`RoutedLinear` of a model: the batch being run, or None (base model).

    Switches, for comparing forms in one process (``benchmarks/routed_prefill.py``); both on by default:

    - ``per_row``: route multi-token passes in the per-row form; False runs every pass in the dense form;
    - ``layer_subsets``: route each layer on the adapters with weights there (see the module docstring);
      False routes every layer on all the batch's adapters (per-row prefill at the batch's largest rank). Layers no
      adapter of the batch adapts run the base layer alone either way."""

    def __init__(self) -> None:
        self.current: BatchRouting | None = None
        self.per_row = True
        self.layer_subsets = True


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """Decoder layer of a module name (``model.layers.12.self_attn.q_proj`` -> 12), None if none."""
    m = _LAYER_INDEX.search(f".{module_name}")
    return int(m.group(1)) if m else None


class RoutedLinear(nn.Module):
    """``base_layer(x)`` plus the routed LoRA contribution of the current batch.

    Args:
        base_layer: the frozen linear layer.
        slots: its adapter slot stacks.
        state: the model-wide routing state.
        layer: the decoder layer it belongs to (selects per-layer plan weights), None if unknown.
    """

    def __init__(self, base_layer: nn.Linear, slots: LayerSlots, state: RoutingState, layer: int | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = slots
        self.state = state
        self.layer = layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code peeks at .weight (dtype/device checks)
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        batch = self.state.current
        if batch is None or not batch.groups:
            return out
        scalings, ranks, sig = batch.layer_meta(self.slots)
        if not any(sig[0]):  # no adapter of the batch has weights at this layer
            return out
        x2 = x.reshape(-1, self.in_features)  # (N, d_in), N = B * T
        n_tok, n_rows = x2.shape[0], batch.batch_size
        layer = self.layer if batch.layer_weights is not None else None
        own = not out.requires_grad  # the base layer's fresh output: the LoRA part is added into it
        per_adapter = all(g.rule == TokenRule.PER_ADAPTER for g in batch.groups)
        if n_tok > n_rows and self.state.per_row and per_adapter:
            return self._per_row(x2.view(n_rows, -1, self.in_features), out, own, batch, scalings, ranks, sig,
                                 layer)
        view = batch.layer_view(self.slots, adapting_only=per_adapter and self.state.layer_subsets)
        groups = batch.token_metadata(n_tok, self.layer)
        out2 = out.view(-1, self.out_features)
        for gi, (group, (tok_rows, (cand, rocs, weights, scale))) in enumerate(
            zip(batch.groups, groups, strict=True)
        ):
            routing = batch.prepared(
                (view.signature, gi, n_tok, layer),
                lambda c=cand, o=rocs, w=weights, sc=scale, g=group: prepare_token_routing(
                    view.scalings, view.ranks, view.rank, view.remap[c], o, sc, w, g.rule
                ),
            )
            protos = batch.layer_prototypes(self.slots) if group.rule == TokenRule.ARROW else None
            if group.rule == TokenRule.PER_ADAPTER:  # HiLoRA's top-o ROCs, or plain LoRA (every ROC kept)
                key = (view.signature, gi, n_tok, layer)
                lora = self._per_adapter_sum(batch, view, routing, group.signed, key, x2)
                xg = x2 if tok_rows is None else x2.index_select(0, tok_rows)
                if tok_rows is None:
                    out2 = lora(xg, out=out2.to(x2.dtype), accumulate=own)
                else:
                    out2 = _add_rows(out2, tok_rows, lora(xg), own)
            elif tok_rows is None:
                out2 = apply_token_routing(x2, view.a, view.b, routing, group.signed, protos, batch.arrow_temperature,
                                           out=out2.to(x2.dtype), accumulate=own)
            else:
                dg = apply_token_routing(x2.index_select(0, tok_rows), view.a, view.b, routing, group.signed, protos,
                                         batch.arrow_temperature)
                out2 = _add_rows(out2, tok_rows, dg, own)
        return out2.view(out.shape).to(out.dtype)

    def _per_adapter_sum(self, batch: BatchRouting, view: LayerView, routing: TokenRouting, signed: bool,
                         key: tuple, x: torch.Tensor) -> Callable[..., torch.Tensor]:
        """This layer's routed sum under the per-adapter rule, as ``f(x, out=None, accumulate=False)``: the sparse
        form on the CPU (the tokens' own rows, read in the pool), else the dense form over the view's rows
        concatenated; plain LoRA (``routing.keep_all``) skips the top-o choice."""
        if _sparse_ok(x, self.slots):
            a_rows, bt_rows = self.slots.a_rows, self.slots.bt_rows
            if routing.keep_all:
                crow, col, vals = batch.layer_sparse(self.slots, view, routing, key)
                return partial(apply_lora_sparse, a_rows=a_rows, bt_rows=bt_rows, crow=crow, col=col, vals=vals)
            crow, col, vals, places = batch.layer_sparse(self.slots, view, routing, key, places=True)
            return partial(apply_token_rows_sparse, a_rows=a_rows, bt_rows=bt_rows, crow=crow, col=col, vals=vals,
                           places=places, routing=routing, signed=signed)
        a_cat, bt_cat, seg = batch.layer_concat(self.slots, view)
        if routing.keep_all:
            return partial(apply_full_lora, a_cat=a_cat, bt_cat=bt_cat, seg=seg, coeff=routing.coeff)
        return partial(apply_token_rows, a_cat=a_cat, bt_cat=bt_cat, seg=seg, pos=batch.layer_positions(view),
                       routing=routing, signed=signed)

    def _per_row(self, x3: torch.Tensor, out: torch.Tensor, own: bool, batch: BatchRouting,
                 scalings: torch.Tensor, ranks: torch.Tensor, sig: tuple, layer: int | None) -> torch.Tensor:
        """Several tokens per row (a prefill) under per-adapter rules: each row is projected on its own
        candidates only (:func:`apply_row_routing`), not on every adapter of the batch, at the largest
        rank among the adapters with weights at this layer."""
        out3 = out.view(x3.shape[0], x3.shape[1], self.out_features)
        r = max(sig[0]) if self.state.layer_subsets else batch.r_eff
        groups = batch.token_metadata(batch.batch_size, self.layer)  # one "token" per row: row metadata
        for gi, (group, (rows, (cand, rocs, weights, scale))) in enumerate(zip(batch.groups, groups, strict=True)):
            routing = batch.prepared(
                (sig, r, gi, "rows", layer),
                lambda c=cand, o=rocs, w=weights, sc=scale: batch.to_slots(
                    prepare_row_routing(scalings, ranks, r, c, o, sc, w)
                ),
            )
            xg = x3 if rows is None else x3.index_select(0, rows)
            a_rows, b_rows = batch.row_stacks(self.slots, routing.index, xg.shape[0], r)
            if rows is None:
                out3 = apply_row_routing(xg, a_rows, b_rows, routing, group.signed, out=out3.to(xg.dtype),
                                         accumulate=own)
            else:
                out3 = _add_rows(out3, rows, apply_row_routing(xg, a_rows, b_rows, routing, group.signed), own)
        return out3.view(out.shape).to(out.dtype)


def _sparse_ok(x: torch.Tensor, slots: LayerSlots) -> bool:
    """The per-adapter rule in the sparse form (plain LoRA and top-o, ``sparse_lora.py``): on the CPU, in float32 /
    float64 (torch's sampled matmul has no bfloat16 / float16 kernel there); elsewhere the dense form is one matmul."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and slots.a_rows.dtype == x.dtype


def _add_rows(out: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, own: bool) -> torch.Tensor:
    """``out`` with ``delta`` added at ``rows`` (dim 0); in place when the caller owns ``out``."""
    delta = delta.to(out.dtype)
    return out.index_add_(0, rows, delta) if own else out.index_add(0, rows, delta)
