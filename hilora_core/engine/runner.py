"""The generation loop's model runner: prefill and decode forward passes over the loop's KV memory.

It owns the KV memory (:class:`SlotKVCache`: every running row ends at one column, ``head``) and
the row layout: which request each KV row belongs to (an ensemble request has one row per adapter).
Every row keeps its own :class:`RoutingPlan`; the batch's routing metadata is rebuilt whenever the
set of rows changes, and reuses the previous build's gathered adapter stacks when the adapters
stayed. A forward pass returns one (V,) score row per request (ensemble rows mixed by
:func:`mix_logits`): a :class:`ForwardOutput` for the output stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hilora_core.engine.ensemble import mix_logits
from hilora_core.engine.families import attention_layout
from hilora_core.engine.kv_slots import SlotKVCache
from hilora_core.engine.metrics import LoopMetrics
from hilora_core.engine.requests import RequestState
from hilora_core.engine.settings import LoopSettings
from hilora_core.errors import UnsupportedModelError

if TYPE_CHECKING:
    from hilora_core.engine.batch_routing import BatchRouting
    from hilora_core.engine.routed_model import RoutedModel


@dataclass
class ForwardOutput:
    """One forward pass's result: ``scores`` (n, V) next-token logits of the n ``seqs``; for a prefill
    with prompt logprobs, ``prompt_scores`` (n, width, V) over the left-padded prompts."""

    seqs: list[RequestState]
    scores: torch.Tensor
    prompt_scores: torch.Tensor | None = None
    width: int = 0


class ModelRunner:
    """Forward passes of one loop over its KV memory (see the module docstring)."""

    def __init__(self, lm: RoutedModel, settings: LoopSettings, metrics: LoopMetrics) -> None:
        self.lm, self.metrics = lm, metrics
        impl = getattr(lm.model.config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(f"the generation loop needs 'sdpa' or 'eager' attention, got {impl!r}")
        self._mask_kind = "bool" if impl == "sdpa" else "additive"
        self.layout = attention_layout(lm.model.config)
        self.cache = SlotKVCache.for_model(lm.model.config, settings.max_rows, settings.max_tokens_per_sequence,
                                           lm.device, lm.dtype)
        self.row_seq: list[RequestState] = []  # the request of each KV row
        self.row_member: list[int] = []  # which of its request's rows (index into RequestState.rows)
        self._routing: tuple[BatchRouting, Combine] | None = None  # rebuilt when the rows change
        self._last_routing: BatchRouting | None = None  # its gathered adapter stacks serve the rebuilt one

    @property
    def n_rows(self) -> int:
        return len(self.row_seq)

    # ---- forward passes --------------------------------------------------------------------------
    def prefill(self, new: list[RequestState], running: Sequence[RequestState]) -> ForwardOutput:
        """Prefill ``new`` requests in one pass into fresh rows after the ``running`` ones' rows."""
        cache, lm = self.cache, self.lm
        n_old = len(self.row_seq)
        rows = [(s, k) for s in new for k in range(len(s.rows))]
        width = max(s.prompt_len for s in new)
        if n_old == 0:
            cache.reserve(len(rows), width + 1)
            cache.head = cache.low = width
        elif cache.head < width or cache.head + 1 > cache.column_capacity:
            # room for the longest new prompt left of head, and a column at head: move the running rows to
            # the left edge (or right, for a long prompt) rather than grow (see decode)
            self._shift(max(width, cache.head - cache.low) - cache.head, running)
        cache.reserve(n_old + len(rows), cache.head + 1)
        head = cache.head
        pad = lm.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        starts = []
        for r, (s, _) in enumerate(rows):
            p = s.prompt_len
            ids[r, width - p:] = torch.as_tensor(list(s.req.prompt_ids), dtype=torch.long)
            positions[r, width - p:] = torch.arange(p)
            starts.append(head - p)
        cache.window((n_old, n_old + len(rows)), write=head - width, read=head - width)
        mask = cache.attention_masks(self.layout, starts, width, self._mask_kind)
        routing = lm.build_routing([s.rows[k] for s, k in rows], *_slot_map(new))
        want_prompt = any(s.req.prompt_logprobs for s in new)
        logits = lm.forward(routing, input_ids=ids.to(lm.device), attention_mask=mask,
                            position_ids=positions.to(lm.device), past_key_values=cache, use_cache=True,
                            logits_to_keep=0 if want_prompt else 1)
        combine = _combine(new, [s for s, _ in rows], [k for _, k in rows], lm.device)
        for s in new:
            s.start = head - s.prompt_len
            self.metrics.prompt_tokens += s.prompt_len
        for s, k in rows:
            self.row_seq.append(s)
            self.row_member.append(k)
        cache.low = min(s.start for s in [*running, *new])
        self._routing = None
        prompt_scores = _apply(combine, logits) if want_prompt else None
        return ForwardOutput(list(new), _apply(combine, logits[:, -1]), prompt_scores, width)

    def decode(self, running: list[RequestState]) -> ForwardOutput:
        """One decode step of every running row: each request's last token in, its next scores out."""
        cache, lm = self.cache, self.lm
        n = len(self.row_seq)
        if cache.head + 1 > cache.column_capacity:
            # Under steady traffic the batch never empties, so ``head`` keeps moving right while rows come
            # and go: reuse the columns left of every row's start (shift left by ``low``) while the rows'
            # span leaves a quarter free; grow only when the rows themselves need the columns. Growing on
            # every overflow took the KV memory to its bound (32 rows x 2,048 columns: 2.8 GiB in float32)
            # for 8-token requests (docs/soak.md).
            if cache.head + 1 - cache.low <= cache.column_capacity * 3 // 4 or \
                    cache.column_capacity >= cache.max_columns:
                self._shift(-cache.low, running)
                self.metrics.kv_shifts += 1
            else:
                cache.reserve(n, cache.head + 1)
        head = cache.head
        ids = torch.tensor([[s.last_token] for s in self.row_seq], dtype=torch.long, device=lm.device)
        positions = torch.tensor([[head - s.start] for s in self.row_seq], dtype=torch.long, device=lm.device)
        cache.window((0, n), write=head, read=cache.low)
        mask = cache.attention_masks(self.layout, [s.start for s in self.row_seq], 1, self._mask_kind)
        if self._routing is None:
            plans = [s.rows[k] for s, k in zip(self.row_seq, self.row_member, strict=True)]
            routing = lm.build_routing(plans, *_slot_map(running))
            self.metrics.routing_builds += 1
            if routing.reuse_stacks(self._last_routing):
                self.metrics.stack_reuses += 1
            self._last_routing = routing
            self._routing = (routing, _combine(running, self.row_seq, self.row_member, lm.device))
        routing, combine = self._routing
        logits = lm.forward(routing, input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)[:, -1]
        cache.head += 1
        return ForwardOutput(list(running), _apply(combine, logits))

    def _shift(self, by: int, running: Sequence[RequestState]) -> None:
        self.cache.shift(len(self.row_seq), by)
        for s in running:
            s.start += by

    # ---- rows leaving ----------------------------------------------------------------------------
    def remove(self, gone: list[RequestState], staying: Sequence[RequestState]) -> None:
        """Free the rows of requests that left (rows from the end of the batch move into the holes, so
        the running rows stay contiguous). ``staying``: the running requests that keep their rows."""
        leaving = {id(s) for s in gone}
        if not any(id(s) in leaving for s in self.row_seq):
            return
        keep = len(self.row_seq) - sum(1 for s in self.row_seq if id(s) in leaving)
        holes = [r for r in range(keep) if id(self.row_seq[r]) in leaving]
        movers = [r for r in range(keep, len(self.row_seq)) if id(self.row_seq[r]) not in leaving]
        for hole, mover in zip(holes, movers, strict=True):
            self.cache.move_row(mover, hole, self.row_seq[mover].start)
            self.row_seq[hole], self.row_member[hole] = self.row_seq[mover], self.row_member[mover]
        del self.row_seq[keep:], self.row_member[keep:]
        if staying:
            self.cache.low = min(s.start for s in staying)
        else:
            self.cache.head = self.cache.low = 0
            self._last_routing = None
        self._routing = None


def _slot_map(seqs: Sequence[RequestState]) -> tuple[dict[str, int], dict[str, int]]:
    """(adapter -> device slot, adapter -> nominal rank) over the requests' leases."""
    slots: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for s in seqs:
        assert s.lease is not None, "a request runs only while it holds its adapters' slots"
        slots.update(s.lease.slots)
        ranks.update(s.ranks)
    return slots, ranks


Combine = tuple[str, torch.Tensor] | None  # how a pass's rows become one score row per request


def _combine(seqs: Sequence[RequestState], row_seq: Sequence[RequestState], row_member: Sequence[int],
             device: torch.device) -> Combine:
    """How rows (R,) become requests (n_seq,): None when every request has one row, in order; ``("index", (n,))``
    when every request has one row in another order (rows move when others leave); else ``("mix", (n, R))``,
    each request's rows weighted (ensembles, :func:`mix_logits`)."""
    if len(row_seq) == len(seqs) and all(a is b for a, b in zip(row_seq, seqs, strict=True)):
        return None
    index = {id(s): i for i, s in enumerate(seqs)}
    if len(row_seq) == len(seqs):  # one row each, moved: a gather, not a matrix product over the vocabulary
        where = [0] * len(seqs)
        for r, s in enumerate(row_seq):
            where[index[id(s)]] = r
        return "index", torch.tensor(where, dtype=torch.long, device=device)
    matrix = torch.zeros((len(seqs), len(row_seq)), dtype=torch.float32)
    for r, (s, k) in enumerate(zip(row_seq, row_member, strict=True)):
        matrix[index[id(s)], r] = s.weights[k]
    return "mix", matrix.to(device)


def _apply(combine: Combine, logits: torch.Tensor) -> torch.Tensor:
    """(R, ...) row logits -> (n_seq, ...) per request (see :func:`_combine`)."""
    if combine is None:
        return logits
    kind, t = combine
    return logits.index_select(0, t) if kind == "index" else mix_logits(logits, t)
