"""The cost of routed LoRA on this machine, in one process: the engine's routing forms side by side, and
each against the base model, on the demo pool's prompts.

    .venv/bin/python benchmarks/routed_prefill.py [--rows 10] [--threads 2] [--repeats 7]

The forms are the engine's two switches (``RoutedLM.routing_state``):

- ``per row, layer subsets`` (the default): prefill in the per-row form; each layer routed only on
  the batch's adapters with weights at that layer;
- ``per row, every adapter``: ``layer_subsets`` off, every layer routed on all the batch's adapters
  at the batch's largest rank;
- ``dense, every adapter``: both off, every pass in the dense form (the engine before either change).

Two measurements per form:

1. one prefill pass (``logits_to_keep=1``) of ``--rows`` chat prompts: base model, each prompt's own
   adapter (``explicit``), and a HiLoRA-style plan (own adapter + one other, 2 ROCs each); median of
   ``--repeats``, as seconds and as a ratio to the base model;
2. a burst of 32 requests (16 tokens each, EOS ignored) into the continuous-batching loop: TTFT p50
   and generated tok/s (median of 3 bursts).

All of it runs on one generation thread with ``--threads`` torch threads, as a replica does.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from benchmarks.common import load_demo_engine, load_prompts, print_table
from hilora_core.engine import RoutedLM
from hilora_core.engine.loop import GenerationLoop
from hilora_core.engine.requests import SequenceRequest
from hilora_core.engine.settings import LoopSettings
from hilora_core.engine.threads import use_torch_threads
from hilora_core.plan import RoutingPlan


def plan_sets(tasks: list[str], names: list[str]) -> dict[str, list[RoutingPlan | None]]:
    def two(i: int, task: str) -> RoutingPlan:
        other = next(n for k, n in enumerate(names * 2) if k >= (5 * i + 1) % len(names) and n != task)
        return RoutingPlan(adapters=(task, other), rocs=(2, 2))

    return {"base": [None] * len(tasks), "explicit": [RoutingPlan.single(t) for t in tasks],
            "hilora": [two(i, t) for i, t in enumerate(tasks)]}


def prefill_seconds(lm: RoutedLM, texts: list[str], plans: list[RoutingPlan | None]) -> float:
    ids, mask = lm.encode(texts, chat=True)
    t0 = time.perf_counter()
    if plans[0] is None:
        lm.forward(None, input_ids=ids, attention_mask=mask, position_ids=lm.positions(mask), logits_to_keep=1)
    else:
        lease, routing = lm.start_batch(plans)
        with lease:
            lm.forward(routing, input_ids=ids, attention_mask=mask, position_ids=lm.positions(mask),
                       logits_to_keep=1)
    return time.perf_counter() - t0


def burst(batcher: GenerationLoop, ids: list[list[int]], plans: list[RoutingPlan | None]) -> tuple[float, float]:
    """(TTFT p50 s, generated tok/s) of 32 requests submitted at once."""
    t0 = time.monotonic()
    first: dict[int, float] = {}
    done = threading.Event()
    finished = []

    def sink_for(i: int):
        def sink(item) -> None:
            first.setdefault(i, time.monotonic() - t0)
            if isinstance(item, BaseException) or item.finished:
                finished.append(time.monotonic() - t0)
                if len(finished) == len(ids):
                    done.set()
        return sink

    for i, p in enumerate(plans):
        batcher.submit(SequenceRequest(ids[i], p or RoutingPlan(), max_new_tokens=16, ignore_eos=True), sink_for(i))
    done.wait(600)
    return statistics.median(first.values()), 16 * len(ids) / max(finished)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10, help="prompts in the one-pass prefill")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    lm, names = load_demo_engine()
    prompts = load_prompts(12, 3)[:32]
    tasks, texts = [t for t, _ in prompts], [x for _, x in prompts]
    sets = plan_sets(tasks, names)
    ids = []
    for x in texts:
        enc, mask = lm.encode([x], chat=True)
        ids.append(enc[0][mask[0].bool()].tolist())
    forms = {"per row, layer subsets": (True, True), "per row, every adapter": (True, False),
             "dense, every adapter": (False, False)}
    pre: dict[tuple[str, str], list[float]] = {}
    bursts: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def work() -> None:
        use_torch_threads(args.threads)
        with torch.inference_mode():
            for _ in range(args.repeats + 1):  # the first round warms up
                for form, switches in forms.items():
                    lm.routing_state.per_row, lm.routing_state.layer_subsets = switches
                    for mode, plans in sets.items():
                        pre.setdefault((form, mode), []).append(prefill_seconds(lm, texts[: args.rows],
                                                                               plans[: args.rows]))
        batcher = GenerationLoop(lm, LoopSettings(), threads=args.threads)
        batcher.started.wait()
        try:
            for _ in range(4):
                for form, switches in forms.items():
                    lm.routing_state.per_row, lm.routing_state.layer_subsets = switches
                    for mode, plans in sets.items():
                        bursts.setdefault((form, mode), []).append(burst(batcher, ids, plans))
        finally:
            batcher.close()
            lm.routing_state.per_row = lm.routing_state.layer_subsets = True

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    n_tok = sum(len(i) for i in ids[: args.rows])
    print(f"one prefill pass, {args.rows} prompts ({n_tok} tokens), median of {args.repeats}; "
          f"burst of 32 x 16 tokens, median of 3\n")
    rows = []
    for form in forms:
        base = statistics.median(pre[(form, "base")][1:])
        for mode in sets:
            s = statistics.median(pre[(form, mode)][1:])
            b = bursts[(form, mode)][1:]
            rows.append([form, mode, f"{s:.3f}", f"{s / base:.2f}x", f"{statistics.median(x[0] for x in b):.2f}",
                         f"{statistics.median(x[1] for x in b):.1f}"])
    print_table(["form", "plans", "prefill s", "vs base", "burst TTFT p50 s", "burst tok/s"], rows)


if __name__ == "__main__":
    main()
