"""The routing metadata of one batch: what each row routes on, built once from the rows' plans.

Per row (built by :func:`build_batch_routing`):

    seq_cand     (B, C)  index into the batch's active slots, -1 = no candidate
    seq_rocs     (B, C)  ROCs per candidate (per_adapter) or the rule's k in column 0
    seq_weights  (B, C)  per-candidate multiplier
    seq_scale    (B,)    plan.scale * sqrt(rbar / O) (when normalised)
    layer_weights (L, B, C) optional per-layer multipliers of seq_weights (plans with layer_weights)

A :class:`BatchRouting` also caches, per layer, the active slots' stacks gathered for the batch
(:class:`LayerView`) and the x-independent half of the token rule, so that every decode step of the
batch reuses them (``routed_linear.py`` reads it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from hilora_core.engine.slots import LayerSlots
from hilora_core.errors import InvalidInputError
from hilora_core.plan import RoutingPlan, TokenRule
from hilora_core.routing.row_routing import RowRouting
from hilora_core.routing.sparse_lora import sparse_pattern
from hilora_core.routing.token_routing import TokenRouting, normalisation


@dataclass
class RuleGroup:
    """Sequences of the batch sharing one token rule and sign setting."""

    rule: TokenRule
    signed: bool
    rows: torch.Tensor | None  # (B_g,) sequence rows, None = every row of the batch


@dataclass(frozen=True)
class LayerView:
    """The active slots one layer routes on (P of the U), and their stacks gathered on first use.

        remap      (U + 1,) position in the view of each active slot, -1 if left out; entry U is -1
                   (so ``remap[cand]`` keeps an empty candidate, -1, empty)
        scalings   (P,), ranks (P,) at this layer; ``rank`` the largest of them
        a          (P, rank, d_in); b (P, d_out, rank), a transposed view of a contiguous tensor: gathered
                   from the row pools when first read (plain-LoRA batches read the concatenated rows instead)
        signature  (kept positions, ranks, scalings): layers with equal signatures share their
                   prepared routing
    """

    remap: torch.Tensor
    scalings: torch.Tensor
    ranks: torch.Tensor
    rank: int
    signature: tuple
    slots: LayerSlots
    index: torch.Tensor  # (P,) the kept slots' ids

    @cached_property
    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, bt = self.slots.gather(self.index, self.rank)  # (P, r, d_in), (P, r, d_out), copies
        return a, bt.transpose(1, 2)

    @property
    def a(self) -> torch.Tensor:
        return self._stacks[0]

    @property
    def b(self) -> torch.Tensor:
        return self._stacks[1]


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
        """The slots this layer routes on, made once per batch: with ``adapting_only`` the active
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
            sig = (tuple(kept), tuple(host_ranks[i] for i in kept), tuple(host_scalings[i] for i in kept))
            hit = self._layer_cache[key] = LayerView(remap, scalings.index_select(0, keep), ranks.index_select(0, keep),
                                                     r, sig, slots, self.active.index_select(0, keep))
        return hit

    def layer_concat(self, slots: LayerSlots, view: LayerView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The view's adapters' rows concatenated without rank padding (:meth:`LayerSlots.concat`), once per
        batch: plain LoRA (every ROC kept) over them costs the sum of their ranks, not P times the largest."""
        key = ("concat", id(slots), view.signature)
        hit = self._layer_cache.get(key)
        if hit is None:
            hit = self._layer_cache[key] = slots.concat([self.active_slots[i] for i in view.signature[0]])
        return hit

    def layer_sparse(self, slots: LayerSlots, view: LayerView, routing: TokenRouting, key: tuple,
                     places: bool = False) -> tuple[torch.Tensor, ...]:
        """(crow (N + 1,), col (nnz,), vals (nnz,)[, places (nnz,)]): per token of ``routing`` (per-adapter rule over
        the view's adapters), the pool rows of each adapter it uses at this layer and that adapter's coefficient
        (:func:`sparse_pattern`; ``places`` in the (N, P, view.rank) layout of the top-o choice), for the sparse
        forms; once per batch, layer and group (``key``)."""
        rank = view.rank if places else None
        return self.prepared(("sparse", id(slots), rank, *key), lambda: sparse_pattern(
            routing.coeff, [slots.rows_of(self.active_slots[i]) for i in view.signature[0]], rank))

    def layer_positions(self, view: LayerView) -> torch.Tensor:
        """(S,) each concatenated row's place ``u * R + j`` in the view's padded (U, R) layout (R = view.rank),
        for the per-adapter rule over concatenated rows; once per view signature."""
        key = ("pos", view.signature, view.rank)
        hit = self._layer_cache.get(key)
        if hit is None:
            places = [u * view.rank + j for u, r in enumerate(view.signature[1]) for j in range(r)]
            hit = self._layer_cache[key] = torch.tensor(places, dtype=torch.long, device=view.remap.device)
        return hit

    def to_slots(self, routing: RowRouting) -> RowRouting:
        """``routing`` with its index mapped from the active slots (U) to the slot stacks (S)."""
        return replace(routing, index=self.active.index_select(0, routing.index))

    def row_stacks(self, slots: LayerSlots, slot_ids: torch.Tensor, n_rows: int,
                   r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (B, C * r, d_in), b (B, C * r, d_out)) of each row's candidates (``slot_ids`` (B * C,) into
        the slot stacks) cut to rank ``r``, gathered for one forward pass."""
        a, bt = slots.gather(slot_ids, r)
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
