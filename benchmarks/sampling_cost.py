"""What sampling and logprobs cost the generation loop: greedy against sampled requests, batched token choice
against the per-row form it replaced, in one process.

    .venv/bin/python benchmarks/sampling_cost.py [--threads 2] [--tokens 32] [--repeats 3]

Three measurements:

1. token choice alone on a (32, V) matrix of logits (V = SmolLM2's vocabulary): milliseconds per step,
   median of 50;
2. a burst of 32 demo-pool requests (each prompt's own adapter, ``--tokens`` tokens, EOS ignored) through
   the continuous-batching loop: generated tok/s, median of ``--repeats`` bursts after a warm-up.

``per row`` is the loop's first token choice, kept here as the reference: the batch's argmax, then for each
sampling row its own softmax, sort and ``torch.multinomial`` with its request's generator, read back to the
host one row at a time. ``inverse CDF`` is the second: one inverse-CDF pass over all rows, one uniform per
row from its request's generator, one read-back. ``batched`` is the loop's now
(``hilora_core.engine.output.choose``): the Gumbel-max race over all rows, one row of noise per request from
its generator, one read-back (it keeps a seeded draw when batching changes the logits' last bits).

3. the prompt logprobs of an ``echo`` request (what lm-evaluation-harness asks for every loglikelihood
   question), 5 alternatives per token, for prompts of 128 to 2048 tokens: ``per row`` reads each position
   back on its own (the loop's code before), ``batched`` is ``logprob_entries`` (one gather and one top-k
   over all rows); milliseconds, median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from benchmarks.common import load_demo_engine, load_prompts, print_table
from hilora_core.engine.generation import TokenLogprob, logprob_entries
from hilora_core.engine.loop import GenerationLoop
from hilora_core.engine.output import choose as batched_choose
from hilora_core.engine.requests import SequenceRequest
from hilora_core.engine.settings import LoopSettings
from hilora_core.engine.threads import use_torch_threads
from hilora_core.plan import RoutingPlan

SETTINGS = {"greedy": {}, "temperature 0.8": {"temperature": 0.8, "seed": 1},
            "temperature 0.8, top_p 0.95": {"temperature": 0.8, "top_p": 0.95, "seed": 1}}


def per_row_choose(seqs, scores: torch.Tensor) -> torch.Tensor:
    """The per-row token choice the loop used before (the reference of this benchmark)."""
    tokens = scores.argmax(dim=-1)
    for i, s in enumerate(seqs):
        if s.req.temperature > 0:
            probs = torch.softmax(scores[i].float() / s.req.temperature, dim=-1)
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p
            sorted_p = sorted_p.masked_fill(before >= s.req.top_p, 0.0)
            pick = torch.multinomial(sorted_p, 1, generator=s.generator)
            tokens[i] = int(order[pick].item())  # one read-back per sampling row
    return tokens


def inverse_cdf_choose(seqs, scores: torch.Tensor) -> torch.Tensor:
    """The loop's second token choice: one uniform per sampling row against the cumulative sums."""
    tokens = scores.argmax(dim=-1)
    if not any(s.req.temperature > 0 for s in seqs):
        return tokens
    temp = torch.tensor([s.req.temperature if s.req.temperature > 0 else 1.0 for s in seqs])
    probs = torch.softmax(scores.float() / temp.unsqueeze(-1), dim=-1)
    order = None
    if any(s.req.top_p < 1.0 for s in seqs):
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= torch.tensor([s.req.top_p for s in seqs]).unsqueeze(-1), 0.0)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    u = torch.cat([torch.rand((1,), generator=s.generator) if s.generator is not None else torch.zeros(1)
                   for s in seqs])
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    pick = torch.searchsorted(cdf, target.unsqueeze(-1), right=True)
    sampled = (pick if order is None else order.gather(1, pick)).squeeze(-1)
    rows = torch.tensor([s.req.temperature > 0 for s in seqs])
    return torch.where(rows, sampled, tokens)


class _Req:  # what the choosers read of a request
    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature, self.top_p = temperature, top_p


class _Seq:
    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self.req = _Req(temperature, top_p)
        self.generator = torch.Generator().manual_seed(seed) if temperature > 0 else None


CHOOSERS = {"per row": per_row_choose, "inverse CDF": inverse_cdf_choose, "batched": batched_choose}


def choice_ms(vocab: int, rows: int = 32, repeats: int = 50) -> dict[tuple[str, str], float]:
    scores = torch.randn(rows, vocab)
    out = {}
    for name, kw in SETTINGS.items():
        seqs = [_Seq(kw.get("temperature", 0.0), kw.get("top_p", 1.0), i) for i in range(rows)]
        for form, choose in CHOOSERS.items():
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                choose(seqs, scores).tolist()
                times.append(time.perf_counter() - t0)
            out[(name, form)] = 1000 * statistics.median(times[1:])
    return out


def per_row_entries(logp: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """The loop's logprob entries before ``logprob_entries`` (the reference): a top-k and reads per row."""
    out = []
    for j, tok in enumerate(tokens):
        values, ids = logp[j].topk(tops[j])
        out.append(TokenLogprob(tok, float(logp[j][tok]), tuple(zip(ids.tolist(), values.tolist(), strict=True))))
    return out


def echo_ms(vocab: int, lengths=(128, 512, 2048), top: int = 5, repeats: int = 5) -> dict[tuple[int, str], float]:
    out = {}
    for n in lengths:
        logp = torch.log_softmax(torch.randn(n, vocab), dim=-1)
        tokens = torch.randint(0, vocab, (n,)).tolist()
        for form, fn in (("per row", per_row_entries), ("batched", logprob_entries)):
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                fn(logp, tokens, [top] * n)
                times.append(time.perf_counter() - t0)
            out[(n, form)] = 1000 * statistics.median(times[1:])
    return out


def burst_tok_s(batcher: GenerationLoop, ids: list[list[int]], plans: list[RoutingPlan], tokens: int,
                kw: dict) -> float:
    t0 = time.perf_counter()
    handles = [batcher.submit(SequenceRequest(i, p, max_new_tokens=tokens, ignore_eos=True, **kw))
               for i, p in zip(ids, plans, strict=True)]
    for h in handles:
        for _ in h.events(timeout=600):
            pass
    return tokens * len(ids) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm, _ = load_demo_engine()
    prompts = load_prompts(12, 3)[:32]
    plans = [RoutingPlan.single(t) for t, _ in prompts]
    ids = []
    for _, x in prompts:
        enc, mask = lm.encode([x], chat=True)
        ids.append(enc[0][mask[0].bool()].tolist())
    ms: dict = {}
    tok_s: dict[tuple[str, str], list[float]] = {}

    def work() -> None:
        use_torch_threads(args.threads)
        with torch.inference_mode():
            ms.update(choice_ms(len(lm.tokenizer)))
            ms.update(echo_ms(len(lm.tokenizer)))
        batcher = GenerationLoop(lm, LoopSettings(max_rows=32), threads=args.threads)
        batcher.started.wait()
        try:
            burst_tok_s(batcher, ids, plans, args.tokens, {})  # warm-up: KV memory grows to 32 rows
            for _ in range(args.repeats):
                for form, choose in CHOOSERS.items():
                    batcher.output.choose = choose  # the loop's token choice, swapped between bursts
                    for name, kw in SETTINGS.items():
                        tok_s.setdefault((name, form), []).append(burst_tok_s(batcher, ids, plans, args.tokens, kw))
        finally:
            batcher.close()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    print(f"{args.threads} torch threads; token choice on (32, {len(lm.tokenizer)}) logits, median of 50; "
          f"burst of 32 x {args.tokens} tokens, median of {args.repeats}\n")
    rows = []
    for form in CHOOSERS:
        greedy = statistics.median(tok_s[("greedy", form)])
        for name in SETTINGS:
            t = statistics.median(tok_s[(name, form)])
            rows.append([name, form, f"{ms[(name, form)]:.2f}", f"{t:.1f}", f"{t / greedy:.2f}"])
    print_table(["requests", "token choice", "choice ms / step", "burst tok/s", "vs greedy, same form"], rows)
    print("\nPrompt logprobs of one echo request, 5 alternatives per token:\n")
    rows = []
    for n in sorted({k[0] for k in ms if isinstance(k[0], int)}):
        row, batched = ms[(n, "per row")], ms[(n, "batched")]
        rows.append([n, f"{row:.1f}", f"{batched:.1f}", f"{row / batched:.1f}x"])
    print_table(["prompt tokens", "per row ms", "batched ms", "speed-up"], rows)


if __name__ == "__main__":
    main()
