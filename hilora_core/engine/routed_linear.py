"""Routed linear layers and the per-batch routing metadata they read.

:class:`RoutedLinear` wraps a base ``nn.Linear``: ``y = base(x) + routed LoRA(x)``, the routed part
added into the base output for the whole mixed batch at once (one call per distinct (token rule,
signed) pair present, usually one). The metadata comes from a :class:`BatchRouting` placed on the
shared :class:`RoutingState` by the engine around each forward pass.

Per sequence (built once per batch from the plans, see :func:`build_batch_routing`):

    seq_cand     (B, C)  index into the batch's active slots, -1 = no candidate
    seq_rocs     (B, C)  ROCs per candidate (per_adapter) or the rule's k in column 0
    seq_weights  (B, C)  per-candidate multiplier
    seq_scale    (B,)    plan.scale * sqrt(rbar / O) (when normalised)
    layer_weights (L, B, C) optional per-layer multipliers of seq_weights (plans with layer_weights)

Two forms of the same sum (``hilora_core.routing.token_routing``), chosen per forward pass:

- **Dense** (decode, T = 1, and every rule): each token is projected on every active adapter, those
  not among its candidates weighted 0 (:func:`apply_token_routing`). The active slots' stacks, cut to
  the largest rank among them, are gathered once per batch and reused at every decode step; reading
  U small stacks costs less than gathering each row's own copy.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from hilora_core.engine.slots import LayerSlots
from hilora_core.errors import InvalidInputError
from hilora_core.plan import RoutingPlan, TokenRule
from hilora_core.routing.token_routing import (
    RowRouting,
    TokenRouting,
    apply_row_routing,
    apply_token_routing,
    normalisation,
    prepare_row_routing,
    prepare_token_routing,
)


@dataclass
class RuleGroup:
    """Sequences of the batch sharing one token rule and sign setting."""

    rule: TokenRule
    signed: bool
    rows: torch.Tensor | None  # (B_g,) sequence rows, None = every row of the batch


@dataclass(frozen=True)
class LayerView:
    """The active slots one layer routes on, and their stacks gathered for the batch (P of the U).

        remap      (U + 1,) position in the view of each active slot, -1 if left out; entry U is -1
                   (so ``remap[cand]`` keeps an empty candidate, -1, empty)
        scalings   (P,), ranks (P,) at this layer; ``rank`` the largest of them
        a          (P, rank, d_in); b (P, d_out, rank), a transposed view of a contiguous tensor
        signature  (kept positions, ranks, scalings): layers with equal signatures share their
                   prepared routing
    """

    remap: torch.Tensor
    scalings: torch.Tensor
    ranks: torch.Tensor
    rank: int
    a: torch.Tensor
    b: torch.Tensor
    signature: tuple


@dataclass
class BatchRouting:
    """Routing metadata of one batch (shapes in the module docstring)."""

    active: torch.Tensor  # (U,) slot indices used by the batch
    active_slots: tuple[int, ...]  # the same, on the host
    r_eff: int  # largest rank among the active slots
    seq_cand: torch.Tensor  # (B, C)
    seq_rocs: torch.Tensor  # (B, C)
    seq_weights: torch.Tensor  # (B, C)
    seq_scale: torch.Tensor  # (B,)
    groups: list[RuleGroup]
    arrow_temperature: float = 1.0
    layer_weights: torch.Tensor | None = None  # (L, B, C)
    slot_writes: tuple[int, ...] | None = None  # AdapterSlots.writes() of the active slots when built
    _layer_cache: dict = field(default_factory=dict)
    _meta_cache: dict[int, tuple[torch.Tensor, torch.Tensor, tuple]] = field(default_factory=dict)
    _token_cache: dict[tuple[int, int | None], list[tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]]] = field(
        default_factory=dict
    )
    _routing_cache: dict[tuple, TokenRouting | RowRouting] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.seq_cand.shape[0])

    def reuse_stacks(self, other: BatchRouting | None) -> bool:
        """Take ``other``'s gathered per-layer stacks if both batches use the same slots, cut to the same
        rank, with the same contents (rows left or joined, the adapters stayed): the decode loop then
        does not regather every layer each time its rows change. True if taken."""
        if (other is None or self.slot_writes is None or other.slot_writes != self.slot_writes
                or other.r_eff != self.r_eff or other.active_slots != self.active_slots):  # host values
            return False
        self._layer_cache, self._meta_cache = other._layer_cache, other._meta_cache
        return True

    def layer_meta(self, slots: LayerSlots) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(scalings (U,), ranks (U,), signature) of the active slots at one layer, once per batch.

        The signature is the (ranks, scalings) values: layers with equal signatures share one prepared
        routing (usually every layer of a batch does, so the x-independent work is done once)."""
        key = id(slots)
        hit = self._meta_cache.get(key)
        if hit is None:
            scalings = slots.scalings.index_select(0, self.active)
            ranks = slots.ranks.index_select(0, self.active)
            sig = (tuple(slots.host_ranks[s] for s in self.active_slots),
                   tuple(slots.host_scalings[s] for s in self.active_slots))  # host copies: no device read
            hit = self._meta_cache[key] = (scalings, ranks, sig)
        return hit

    def layer_view(self, slots: LayerSlots, adapting_only: bool) -> LayerView:
        """The slots this layer routes on, gathered once per batch: with ``adapting_only`` the active
        slots with weights at the layer (rank > 0; exact for per-adapter rules, where a rank-0 adapter
        adds nothing), else every active slot (Arrow weighs candidates against each other, a zero
        prototype included). Cut to the largest rank among them at this layer."""
        key = ("view", id(slots), adapting_only)
        hit = self._layer_cache.get(key)
        if hit is None:
            scalings, ranks, (host_ranks, host_scalings) = self.layer_meta(slots)
            kept = [i for i, r in enumerate(host_ranks) if r > 0 or not adapting_only]
            positions = [-1] * (len(host_ranks) + 1)
            for p, i in enumerate(kept):
                positions[i] = p
            device = ranks.device
            keep = torch.tensor(kept, dtype=torch.long, device=device)
            remap = torch.tensor(positions, dtype=torch.long, device=device)
            r = max([host_ranks[i] for i in kept] + [1])
            idx = self.active.index_select(0, keep)
            a = slots.a_stack[:, :r].index_select(0, idx)  # copies only the (P, r, d_in) in use
            bt = slots.bt_stack[:, :r].index_select(0, idx)  # (P, r, d_out), contiguous
            sig = (tuple(kept), tuple(host_ranks[i] for i in kept), tuple(host_scalings[i] for i in kept))
            hit = self._layer_cache[key] = LayerView(remap, scalings.index_select(0, keep), ranks.index_select(0, keep),
                                                     r, a, bt.transpose(1, 2), sig)
        return hit

    def to_slots(self, routing: RowRouting) -> RowRouting:
        """``routing`` with its index mapped from the active slots (U) to the slot stacks (S)."""
        return replace(routing, index=self.active.index_select(0, routing.index))

    def row_stacks(self, slots: LayerSlots, slot_ids: torch.Tensor, n_rows: int,
                   r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (B, C * r, d_in), b (B, C * r, d_out)) of each row's candidates (``slot_ids`` (B * C,) into
        the slot stacks) cut to rank ``r``, gathered for one forward pass."""
        a = slots.a_stack[:, :r].index_select(0, slot_ids)
        bt = slots.bt_stack[:, :r].index_select(0, slot_ids)
        return a.view(n_rows, -1, a.shape[-1]), bt.view(n_rows, -1, bt.shape[-1])

    def layer_prototypes(self, slots: LayerSlots) -> torch.Tensor:
        """(U, d_in) Arrow prototypes of the active slots (Arrow plans only)."""
        key = ("proto", id(slots))
        hit = self._layer_cache.get(key)
        if hit is None:
            hit = self._layer_cache[key] = slots.prototypes.index_select(0, self.active)
        return hit

    def token_metadata(
        self, n_tokens: int, layer: int | None = None
    ) -> list[tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]]:
        """Per group: (token rows or None, (cand (N, C), rocs (N, C), weights (N, C), scale (N,))).

        ``layer`` selects the row of :attr:`layer_weights` (ignored when the batch has none)."""
        t_len, rem = divmod(n_tokens, self.batch_size)
        assert rem == 0, f"{n_tokens} tokens for a batch of {self.batch_size} sequences"
        if self.layer_weights is None:
            layer = None
        key = (t_len, layer)
        hit = self._token_cache.get(key)
        if hit is None:
            hit = []
            device = self.seq_cand.device
            seq_weights = self.seq_weights
            if layer is not None and self.layer_weights is not None:
                seq_weights = seq_weights * self.layer_weights[layer]
            for g in self.groups:
                meta: tuple[torch.Tensor, ...] = (self.seq_cand, self.seq_rocs, seq_weights, self.seq_scale)
                if g.rows is not None:
                    meta = tuple(m.index_select(0, g.rows) for m in meta)
                if t_len > 1:
                    meta = tuple(m.repeat_interleave(t_len, dim=0) for m in meta)
                tok_rows = None
                if g.rows is not None:
                    tok_rows = (g.rows.unsqueeze(1) * t_len + torch.arange(t_len, device=device)).reshape(-1)
                hit.append((tok_rows, meta))
            self._token_cache[key] = hit
        return hit


    def prepared(self, key: tuple, make):
        """The x-independent routing for ``key`` (layer signature, group, token count or "rows", layer
        row of ``layer_weights``), made once per batch by ``make()``."""
        hit = self._routing_cache.get(key)
        if hit is None:
            hit = self._routing_cache[key] = make()
        return hit


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
            if tok_rows is None:
                out2 = apply_token_routing(x2, view.a, view.b, routing, group.signed, protos, batch.arrow_temperature,
                                           out=out2.to(x2.dtype), accumulate=own)
            else:
                dg = apply_token_routing(x2.index_select(0, tok_rows), view.a, view.b, routing, group.signed, protos,
                                         batch.arrow_temperature)
                out2 = _add_rows(out2, tok_rows, dg, own)
        return out2.view(out.shape).to(out.dtype)

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


def _add_rows(out: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, own: bool) -> torch.Tensor:
    """``out`` with ``delta`` added at ``rows`` (dim 0); in place when the caller owns ``out``."""
    delta = delta.to(out.dtype)
    return out.index_add_(0, rows, delta) if own else out.index_add(0, rows, delta)


def build_batch_routing(
    plans: Sequence[RoutingPlan],
    slot_of: Mapping[str, int],
    slot_rank: Mapping[int, int],
    adapter_rank: Mapping[str, int],
    device: torch.device,
    dtype: torch.dtype,
    arrow_temperature: float = 1.0,
    n_layers: int | None = None,
) -> BatchRouting:
    """Per-sequence routing metadata for a batch (a loop over sequences, once per batch).

    Args:
        plans: one non-ensemble plan per row.
        slot_of: adapter name -> device slot (the batch's lease).
        slot_rank: slot -> largest rank of its adapter (sets r_eff).
        adapter_rank: adapter name -> its nominal rank ``r`` (rbar of the normalisation).
        device, dtype: of the model.
        arrow_temperature: softmax temperature of the Arrow rule.
        n_layers: decoder layers of the model (checked against plans with ``layer_weights``).

    Raises:
        InvalidInputError: a plan's ``layer_weights`` has a row count other than ``n_layers``.
    """
    active_slots = sorted({slot_of[a] for p in plans for a in p.adapters})
    pos = {s: i for i, s in enumerate(active_slots)}
    n_rows = len(plans)
    n_cand = max((len(p.adapters) for p in plans), default=0)
    big = max((slot_rank[s] for s in active_slots), default=1)
    cand = torch.full((n_rows, max(n_cand, 1)), -1, dtype=torch.long)
    rocs = torch.zeros((n_rows, max(n_cand, 1)), dtype=torch.long)
    weights = torch.zeros((n_rows, max(n_cand, 1)), dtype=torch.float64)
    scale = torch.zeros((n_rows,), dtype=torch.float64)
    by_rule: dict[tuple[TokenRule, bool], list[int]] = {}
    layer_weights = None
    if any(p.layer_weights is not None for p in plans):
        bad = sorted({len(p.layer_weights) for p in plans if p.layer_weights is not None} - {n_layers})
        if n_layers is None or bad:
            raise InvalidInputError(f"layer_weights must have one row per decoder layer ({n_layers}), got {bad} rows")
        layer_weights = torch.ones((n_layers, n_rows, max(n_cand, 1)), dtype=torch.float64)
        for i, p in enumerate(plans):
            if p.layer_weights is not None:
                layer_weights[:, i, : len(p.adapters)] = torch.tensor(p.layer_weights, dtype=torch.float64)
    for i, p in enumerate(plans):
        assert not p.ensemble, "ensemble plans are expanded into single-adapter rows before routing"
        if p.is_base:
            continue
        n = len(p.adapters)
        cand[i, :n] = torch.tensor([pos[slot_of[a]] for a in p.adapters])
        ranks = [adapter_rank[a] for a in p.adapters]
        o = list(p.rocs) if p.rocs is not None else ranks
        if p.token_rule == TokenRule.PER_ADAPTER:
            rocs[i, :n] = torch.tensor(list(p.rocs) if p.rocs is not None else [big] * n)
        else:
            assert p.top_k is not None, "global_topk and arrow plans carry top_k"
            rocs[i, 0] = int(p.top_k)
        weights[i, :n] = torch.tensor(list(p.weights) if p.weights is not None else [1.0] * n)
        s = float(p.scale)
        if p.normalize:
            s *= normalisation(ranks, o)
        scale[i] = s
        by_rule.setdefault((p.token_rule, bool(p.signed)), []).append(i)
    groups = [
        RuleGroup(rule, signed, None if len(rows) == n_rows else torch.tensor(rows, dtype=torch.long, device=device))
        for (rule, signed), rows in by_rule.items()
    ]
    return BatchRouting(
        active=torch.tensor(active_slots, dtype=torch.long, device=device),
        active_slots=tuple(active_slots),
        r_eff=big,
        seq_cand=cand.to(device),
        seq_rocs=rocs.to(device),
        seq_weights=weights.to(device=device, dtype=dtype),
        seq_scale=scale.to(device=device, dtype=dtype),
        groups=groups,
        arrow_temperature=arrow_temperature,
        layer_weights=None if layer_weights is None else layer_weights.to(device=device, dtype=dtype),
    )
