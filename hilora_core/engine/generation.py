"""Pieces of the generation loop that do not touch the model: token choice, stop strings, results.

Token choice works on a (B, V) matrix of next-token log-probabilities (or logits):
greedy rows (temperature 0) take the argmax; the others sample from
``softmax(logp / temperature)`` restricted to the smallest set of tokens whose
probability reaches ``top_p`` (nucleus sampling). Sampling is the Gumbel-max race, one
row of noise per request drawn from that request's own seeded generator, and every row
is then sampled in one batched pass with no read-back to the host.

Text is produced incrementally: :class:`TextTracker` decodes a sequence's tokens, cuts
the text at the first stop string, and releases only text that can no longer change
(no trailing partial UTF-8 character, no trailing prefix of a stop string), so the
streamed deltas concatenate to exactly the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hilora_core.errors import InvalidInputError


@dataclass
class GenerationResult:
    """One finished sequence.

    Attributes:
        text: the generated text (prompt excluded, cut before any stop string).
        token_ids: generated token ids (including a final EOS / stop token if one ended it).
        prompt_tokens: prompt length in tokens (after the chat template, if used).
        completion_tokens: ``len(token_ids)``.
        finish_reason: ``"stop"`` (EOS or stop string) or ``"length"`` (max_new_tokens).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability (natural log) and, if asked, the ``top`` alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_entries(logp: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """One :class:`TokenLogprob` per row: one gather and one top-k over all rows, read back once each
    (not once per row).

    Args:
        logp: (M, V) log-probabilities.
        tokens: (M,) the token whose log-probability each row reports.
        tops: (M,) how many alternatives each row lists (0: none).
    """
    m = logp.shape[0]
    if m == 0:
        return []
    index = torch.tensor(list(tokens), device=logp.device).unsqueeze(-1)
    chosen = logp.gather(1, index).squeeze(-1).tolist()
    k = max(tops)
    if k == 0:
        return [TokenLogprob(int(t), c) for t, c in zip(tokens, chosen, strict=True)]
    top_values, top_ids = logp.topk(k, dim=-1)
    values, ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(int(tokens[i]), chosen[i], tuple(zip(ids[i][: tops[i]], values[i][: tops[i]], strict=True)))
            for i in range(m)]


@dataclass
class StreamEvent:
    """A text delta of sequence ``index``; the last event of a sequence has ``finished=True``.

    ``logprobs``: the tokens chosen since the previous event, when the request asked for them.
    ``prompt_logprobs``: on the first event, the prompt tokens' entries (the first one None), when asked.
    """

    index: int
    delta: str
    finished: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    token_ids: list[int] | None = None  # all generated ids, on the finishing event only
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class SequenceProgress:
    """When one sequence ends: EOS, a stop string, or its token budget (the rule of every decode loop)."""

    tracker: TextTracker
    max_new_tokens: int
    eos: frozenset[int] | set[int]
    done: bool = False

    def accept(self, token_id: int) -> tuple[str, str | None]:
        """Add a chosen token. Returns (text delta now final, finish reason or None)."""
        ended = token_id in self.eos
        delta, stopped = self.tracker.push(None if ended else token_id)
        if ended:
            self.tracker.token_ids.append(token_id)
        n = len(self.tracker.token_ids)
        reason = "stop" if (ended or stopped) else "length" if n >= self.max_new_tokens else None
        if reason is not None:
            self.done = True
            delta += self.tracker.finish()
        return delta, reason


def per_sequence(name: str, value, n: int, kind=float) -> list:
    """Broadcast a scalar setting to ``n`` sequences, or check a per-sequence list's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidInputError(f"{name} has {len(value)} values for {n} prompts: {list(value)}")
        return [kind(v) for v in value]
    return [kind(value)] * n


def check_sampling(temperatures: Sequence[float], top_ps: Sequence[float], max_new: Sequence[int]) -> None:
    for t in temperatures:
        if not (t >= 0.0) or t == float("inf"):
            raise InvalidInputError(f"temperature must be finite and >= 0, got {t!r}")
    for p in top_ps:
        if not 0.0 < p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {p!r}")
    for m in max_new:
        if m < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {m!r}")


def gumbel_noise(generator: torch.Generator | None, size: int, device: torch.device) -> torch.Tensor:
    """(size,) standard Gumbel draws ``-log(-log(u))`` from ``generator`` (u in [0, 1); u = 0 gives -inf)."""
    u = torch.rand((size,), generator=generator, device=device)
    return -torch.log(-torch.log(u))


def choose_tokens(
    scores: torch.Tensor,
    temperature: torch.Tensor | None,
    top_p: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Next token per row, greedy or sampled, in one batched pass (no host read-back).

    Sampling is the Gumbel-max race: ``argmax_i(logit_i / temperature + g_i)`` with one standard
    Gumbel draw ``g_i`` per token, an exact draw from ``softmax(logit / temperature)``. Each token's
    chance rests on its own logit alone, so the rounding that differs between batch shapes (last
    bits of a logit) changes the token only when the two leading contenders tie to within it. An
    inverse-CDF draw instead compares one uniform with cumulative sums over the vocabulary, which
    that rounding moves at every boundary (``docs/continuous-batching.md`` measures both).

    Args:
        scores: (B, V) logits or log-probabilities.
        temperature: (B,) 0 means greedy; None: every row is greedy (the caller knows it on the host).
        top_p: (B,) nucleus mass in (0, 1]; None: no nucleus cut on any row (skips the sort over V).
        noise: (B, V) standard Gumbel draws (:func:`gumbel_noise`), one row per request from its own
            generator (greedy rows ignore theirs); needed with temperature.

    Returns:
        (B,) token ids on ``scores``' device.
    """
    greedy = scores.argmax(dim=-1)
    if temperature is None:
        return greedy
    if noise is None:
        raise InvalidInputError("sampling needs one row of Gumbel noise per request")
    sample_rows = temperature > 0
    temp = torch.where(sample_rows, temperature, torch.ones_like(temperature)).float()
    logits = scores.float() / temp.unsqueeze(-1)  # (B, V)
    if top_p is not None:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        cut = before >= top_p.unsqueeze(-1).float()  # keeps at least the top token
        logits = logits.masked_fill(torch.zeros_like(cut).scatter_(-1, order, cut), float("-inf"))
    sampled = (logits + noise.float()).argmax(dim=-1)
    return torch.where(sample_rows, sampled, greedy)


@dataclass
class TextTracker:
    """Incremental text of one sequence with stop strings (see the module docstring)."""

    tokenizer: Any  # a transformers tokenizer (decode)
    stops: tuple[str, ...]
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    final_text: str | None = None
    # decoding is O(length): every CHECKPOINT tokens the text so far is frozen (when decoding in
    # two pieces provably gives the same text), so each step decodes only the recent tokens
    _ckpt_tokens: int = 0
    _ckpt_text: str = ""
    CHECKPOINT = 32

    def text(self) -> str:
        """The decoded text of all tokens so far."""
        tail = self.tokenizer.decode(self.token_ids[self._ckpt_tokens:], skip_special_tokens=True)
        text = self._ckpt_text + tail
        if len(self.token_ids) - self._ckpt_tokens >= self.CHECKPOINT and not text.endswith("\ufffd"):
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            if full == text:
                self._ckpt_tokens, self._ckpt_text = len(self.token_ids), full
            text = full
        return text

    def push(self, token_id: int | None) -> tuple[str, bool]:
        """Add a token (None: just flush). Returns (new safe text, stop string hit)."""
        if token_id is not None:
            self.token_ids.append(token_id)
        text = self.text()
        hit = -1
        for s in self.stops:
            i = text.find(s, max(0, len(self.emitted) - len(s)))
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            self.final_text = text[:hit]
            return self._advance(self.final_text), True
        safe = text.rstrip("\ufffd")
        hold = 0
        for s in self.stops:  # keep back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._advance(safe[: len(safe) - hold]), False

    def finish(self) -> str:
        """The remaining text once the sequence ended (length or EOS)."""
        if self.final_text is None:
            self.final_text = self.text()
        return self._advance(self.final_text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
