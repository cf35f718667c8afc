"""The decode loop of :meth:`RoutedLM.stream`: one mixed batch, greedy or sampled, with stop strings.

Prefill and every decode step run under the batch's routing metadata (each row its own plan);
a finished sequence keeps its row (fed padding) until the whole batch ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hilora_core.engine.ensemble import ExpandedBatch, mix_logits
from hilora_core.engine.generation import SequenceProgress, StreamEvent, TextTracker, choose_tokens

if TYPE_CHECKING:
    from hilora_core.engine.routed_lm import RoutedLM


@dataclass(frozen=True)
class DecodeRequest:
    """One batch to decode: prompts (B, T) left-padded, the expanded plans, per-sequence settings."""

    ids: torch.Tensor
    mask: torch.Tensor
    batch: ExpandedBatch
    max_new_tokens: Sequence[int]
    temperatures: Sequence[float]
    top_ps: Sequence[float]
    seed: int | None
    stops: Sequence[tuple[str, ...]]
    ignore_eos: bool = False


def decode(lm: RoutedLM, req: DecodeRequest) -> Iterator[StreamEvent]:
    """Yield :class:`StreamEvent` deltas as they become final; closing early releases the batch's slots."""
    from transformers import DynamicCache

    ids, mask, stops = req.ids, req.mask, req.stops
    n = ids.shape[0]
    generator = None
    if any(t > 0 for t in req.temperatures):
        generator = torch.Generator(device=lm.device)
        generator.manual_seed(int(req.seed) if req.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    # None tells choose_tokens, without a look at the device, that no row samples / no row cuts the nucleus
    temp_t = torch.tensor(req.temperatures, device=lm.device) if generator is not None else None
    top_p_t = torch.tensor(req.top_ps, device=lm.device) if any(p < 1.0 for p in req.top_ps) else None
    prompt_tokens = mask.sum(dim=1).tolist()
    eos = set() if req.ignore_eos else lm.eos_ids
    seqs = [SequenceProgress(TextTracker(lm.tokenizer, stops[i]), req.max_new_tokens[i], eos) for i in range(n)]
    pad = lm.tokenizer.pad_token_id
    row_idx = torch.tensor(req.batch.row_seq, device=lm.device)
    cur_ids = ids.index_select(0, row_idx)
    cur_mask = mask.index_select(0, row_idx)
    positions = lm.positions(cur_mask)
    lease, routing = lm.start_batch(req.batch.rows)
    try:
        cache = DynamicCache(config=lm.model.config)
        for _ in range(max(req.max_new_tokens)):
            logits = lm.forward(
                routing, input_ids=cur_ids, attention_mask=cur_mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )[:, -1]
            scores = mix_logits(logits, req.batch.matrix)  # (n, V)
            uniforms = None if generator is None else torch.rand((n,), generator=generator, device=lm.device)
            next_tok = choose_tokens(scores, temp_t, top_p_t, uniforms)
            for i, tok in enumerate(next_tok.tolist()):
                if seqs[i].done:
                    continue
                delta, reason = seqs[i].accept(tok)
                ids_i = seqs[i].tracker.token_ids
                if reason is not None:
                    yield StreamEvent(i, delta, True, reason, len(ids_i), prompt_tokens[i], list(ids_i))
                elif delta:
                    yield StreamEvent(i, delta, False, None, len(ids_i), prompt_tokens[i])
            done = [s.done for s in seqs]
            if all(done):
                break
            feed = torch.where(torch.tensor(done, device=lm.device), torch.full_like(next_tok, pad), next_tok)
            cur_ids = feed.index_select(0, row_idx).unsqueeze(1)
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones((cur_mask.shape[0], 1))], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        lease.release()
