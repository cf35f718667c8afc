"""The generation loop's output stage: token choice, stop rules, logprobs and the events callers read.

Given a :class:`ForwardOutput` (one (V,) score row per request), :meth:`OutputStage.advance` chooses
every request's next token in one batched pass (:func:`choose_tokens`; a sampling request draws its
noise from its own seeded generator, so its text does not depend on its batch), reads the tokens
back once, applies each request's stop rules (:class:`SequenceProgress`), and emits the text that
became final as :class:`StreamEvent` deltas. It returns the requests that finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hilora_core.engine.generation import StreamEvent, TokenLogprob, choose_tokens, gumbel_noise, logprob_entries
from hilora_core.engine.metrics import LoopMetrics
from hilora_core.engine.requests import RequestState
from hilora_core.engine.runner import ForwardOutput


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """(n,) float32 on ``device``. On CUDA the copy goes through pinned memory without blocking, so it
    does not wait for the forward pass already queued (a plain host-to-device copy would)."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def choose(seqs: list[RequestState], scores: torch.Tensor) -> torch.Tensor:
    """(B,) next tokens of ``seqs`` from their (B, V) scores, in one batched pass; each sampling row
    draws its (V,) Gumbel noise from its own request's generator."""
    if not any(s.req.temperature > 0 for s in seqs):
        return choose_tokens(scores, None, None, None)
    dev, vocab = scores.device, scores.shape[-1]
    zero = torch.zeros((vocab,), device=dev)
    noise = torch.stack([gumbel_noise(s.generator, vocab, dev) if s.generator is not None else zero for s in seqs])
    temperature = _to_device([s.req.temperature for s in seqs], dev)
    nucleus = any(s.req.top_p < 1.0 and s.req.temperature > 0 for s in seqs)
    top_p = _to_device([s.req.top_p for s in seqs], dev) if nucleus else None
    return choose_tokens(scores, temperature, top_p, noise)


Chooser = Callable[[list[RequestState], torch.Tensor], torch.Tensor]


class OutputStage:
    """Tokens to events for one loop (see the module docstring). ``choose``: the token choice, (B,) tokens
    from the requests and their (B, V) scores (:func:`choose`; ``benchmarks/sampling_cost.py`` sets another)."""

    def __init__(self, metrics: LoopMetrics, choose: Chooser = choose) -> None:
        self.metrics = metrics
        self.choose = choose

    def advance(self, out: ForwardOutput) -> list[RequestState]:
        """Choose, emit and apply stop rules for every request of ``out``; the finished ones, each with its
        finishing event in ``final`` (not yet emitted)."""
        seqs = out.seqs
        if out.prompt_scores is not None:
            self._prompt_logprobs(out)
        tokens = self.choose(seqs, out.scores).tolist()  # one read-back of all the step's tokens
        want = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        if want:
            logp = torch.log_softmax(out.scores[want].float(), dim=-1)
            tops = [seqs[i].req.logprobs or 0 for i in want]
            for i, entry in zip(want, logprob_entries(logp, [tokens[i] for i in want], tops), strict=True):
                seqs[i].pending.append(entry)
        now = time.monotonic()
        done = []
        for s, tok in zip(seqs, tokens, strict=True):
            self._time(s, now)
            s.last_token = tok
            self.metrics.generated_tokens += 1
            delta, reason = s.progress.accept(tok)
            ids = s.progress.tracker.token_ids
            logprobs: list[TokenLogprob] | None = None
            if s.req.logprobs is not None and (delta or reason is not None):
                logprobs, s.pending = s.pending, []
            prompt_lp, s.prompt_lp = s.prompt_lp, None
            if reason is not None:  # emitted by the loop once the request has left (rows and slots freed)
                s.final = StreamEvent(0, delta, True, reason, len(ids), s.prompt_len, list(ids), logprobs, prompt_lp)
                self.metrics.finished += 1
                done.append(s)
            elif delta or prompt_lp is not None:
                s.handle.emit(StreamEvent(0, delta, False, None, len(ids), s.prompt_len, None, logprobs, prompt_lp))
        return done

    def _time(self, s: RequestState, now: float) -> None:
        if s.first_token_at is None:
            s.first_token_at = now
            self.metrics.ttft.observe(now - s.submitted)
        else:
            assert s.last_token_at is not None
            self.metrics.itl.observe(now - s.last_token_at)
        s.last_token_at = now

    @staticmethod
    def _prompt_logprobs(out: ForwardOutput) -> None:
        """Each prompt token's logprob given the tokens before it (``echo``); the first has none."""
        assert out.prompt_scores is not None
        for i, s in enumerate(out.seqs):
            if not s.req.prompt_logprobs:
                continue
            p, width = s.prompt_len, out.width
            logp = torch.log_softmax(out.prompt_scores[i, width - p: width - 1].float(), dim=-1)  # tokens 1..p-1
            ids = list(s.req.prompt_ids)
            s.prompt_lp = [None, *logprob_entries(logp, ids[1:p], [s.req.logprobs or 0] * (p - 1))]
