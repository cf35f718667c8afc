"""Which adapters each routing method picks, per task, in one unit of the paper's protocol (no generation).

    .venv/bin/python benchmarks/route_diagnostics.py --pool transfer                 # within-cluster unit
    .venv/bin/python benchmarks/route_diagnostics.py --pool transfer --fold moods    # one cross-cluster fold

For every task of the unit (seen tasks first), over its first ``--limit`` test items: HiLoRA's median
best score, mean candidate-set size, how often the task's own adapter is in the plan (seen tasks),
how often the top-scoring adapter is the task's own, and the most common plans of HiLoRA and of the
Retriever (k = 3). This is what explains an exact-match gap between the two methods
(``docs/offpool.md``) without generating anything; it runs in about 30 s.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from benchmarks.common import pool_dir, table_head, table_row
from hilora_core.evaluation.harness import Context, load_pool, make_units, route
from hilora_core.models.embedding import SentenceEmbedder
from hilora_core.routing.fallback import load_reference_requests
from hilora_core.routing.pool import GaussianFitSettings, fit_pool


def _common(plans, n: int) -> str:
    counts = Counter(tuple(sorted(p.adapters)) for p in plans).most_common(n)
    return "; ".join(f"{'+'.join(k) or 'base'} x{v}" for k, v in counts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="transfer", choices=["demo", "transfer"])
    ap.add_argument("--fold", default=None, help="a cluster: its cross-cluster fold (default: the within unit)")
    ap.add_argument("--limit", type=int, default=10, help="test items per task")
    ap.add_argument("--embedder", default=None, help="sentence embedder (default: the offline all-MiniLM-L6-v2)")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from hilora_core.models.base_model import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(None))
    demo = load_pool(pool_dir(args.pool), args.limit, tokenizer)
    embedder = SentenceEmbedder(args.embedder)
    items = [it for t in demo.names for it in demo.items[t]]
    q = embedder.encode([it.inputs for it in items])
    query_emb = {(it.task, it.index): q[i] for i, it in enumerate(items)}
    settings = ["cross"] if args.fold else ["within"]
    unit = make_units(demo, settings, 0, [args.fold] if args.fold else None)[0]
    samples = [embedder.encode(demo.samples[a]) for a in unit.pool]
    model = fit_pool(samples, GaussianFitSettings(), embedder.encode(load_reference_requests()))
    ctx = Context(None, demo, unit, model, query_emb)
    print(f"# {args.pool} pool, {unit.setting} unit {unit.fold}: {len(unit.pool)} adapters, eps {model.eps:.4g}\n")
    print(*table_head(["task", "seen", "median best score", "mean C", "own in plan", "own is top-1", "HiLoRA plans",
                       "Retriever plans"]), sep="\n")
    for task in unit.seen + [t for t in unit.unseen if t not in unit.seen]:
        its = demo.items[task]
        hilora, retriever = route("hilora", its, ctx), route("retriever", its, ctx)
        scores = model.score(np.stack([query_emb[(it.task, it.index)] for it in its]))
        seen = task in unit.pool
        own = f"{np.mean([task in p.adapters for p in hilora]):.1f}" if seen else ""
        top1 = f"{np.mean([unit.pool[i] == task for i in scores.argmax(axis=1)]):.1f}" if seen else ""
        print(table_row([task, "yes" if seen else "no", f"{np.median(scores.max(axis=1)):.2f}",
                         f"{np.mean([len(p.adapters) for p in hilora]):.1f}", own, top1, _common(hilora, 2),
                         _common(retriever, 1)]), flush=True)

if __name__ == "__main__":
    main()
