"""Why HiLoRA does what it does on the demo pool: variants of its routing on the harness's units.

    .venv/bin/python benchmarks/eval_ablation.py --limit 10 --cross-seen-limit 5

A diagnostic, not a tuning run. It uses the same test items as ``eval_routing.py``; the product's
defaults were fixed before it ran and are not chosen from it. Each variant changes one thing of
HiLoRA's routing:

- the candidate set: the paper's rule (default); eps x 0.25 (a wider C through the same rule);
  C forced to the top 3 by Gaussian score;
- the token level: every ROC of C (HiLoRA-GS) versus top-o_i with gamma = 0.4;
- the normalisation: sqrt(rbar / O) on (default) or off.

Writes ``<out>/eval-ablation.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent


def _harness():
    spec = importlib.util.spec_from_file_location("eval_routing", ROOT / "eval_routing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_routing"] = module
    spec.loader.exec_module(module)
    return module


def top3_plans(scores: np.ndarray, pool: list[str], ranks: list[int], gamma: float | None):
    """C = the 3 best Gaussian scores; ROCs by HiLoRA's allocation (gamma) or all of them (None)."""
    from hilora_core.plan import RoutingPlan
    from hilora_core.sequence_routing import allocate_rocs

    plans = []
    for row in scores:
        cand = np.lexsort((np.arange(len(pool)), -row))[:3]
        r = np.asarray([ranks[i] for i in cand])
        o = r if gamma is None else allocate_rocs(row[cand], r, gamma)
        keep = o > 0
        plans.append(RoutingPlan(adapters=tuple(pool[i] for i in cand[keep]), rocs=tuple(int(x) for x in o[keep])))
    return plans


VARIANTS = {
    "HiLoRA (default: paper's C, gamma 0.4, normalised)": ("hilora", None),
    "HiLoRA, not normalised": ("hilora", "no_norm"),
    "HiLoRA, eps x 0.25": ("hilora", "eps_quarter"),
    "HiLoRA, C = top-3 by score": ("top3", 0.4),
    "HiLoRA-GS (every ROC of C)": ("hilora_gs", None),
    "HiLoRA-GS, C = top-3 by score": ("top3", None),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--cross-seen-limit", type=int, default=None)
    ap.add_argument("--settings", nargs="+", default=["within", "cross"], choices=["within", "cross"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT.parent / "docs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    h = _harness()
    from hilora_core.embedding import SentenceEmbedder
    from hilora_core.engine import RoutedLM
    from hilora_core.pool import GaussianFitSettings, fit_pool

    t0 = time.perf_counter()
    lm = RoutedLM.from_pretrained(None, max_slots=16)
    demo = h.load_demo(h.ROOT / "examples" / "demo_pool", args.limit, lm.tokenizer)
    for name in demo.names:
        lm.add_adapter(name, str(demo.folders[name]))
    units = h.make_units(demo, args.settings, 0, None, args.cross_seen_limit)
    embedder = SentenceEmbedder()
    items = [it for t in demo.names for it in demo.items[t]]
    q = embedder.encode([it.inputs for it in items])
    query_emb = {(it.task, it.index): q[i] for i, it in enumerate(items)}
    sample_emb = {t: embedder.encode(demo.samples[t]) for t in demo.names}

    results: dict[str, dict[str, dict]] = {}
    for label, (kind, option) in VARIANTS.items():
        per_unit = {}
        for unit in units:
            sets = [sample_emb[a] for a in unit.pool]
            model = fit_pool(sets, GaussianFitSettings())
            if option == "eps_quarter":
                model = fit_pool(sets, GaussianFitSettings(eps=model.eps / 4))
            ctx = h.Context(lm, demo, unit, model, query_emb)
            ranks = [demo.ranks[a] for a in unit.pool]

            def router(batch, ctx, kind=kind, option=option, ranks=ranks):
                if kind == "top3":
                    z = np.stack([ctx.query_emb[(it.task, it.index)] for it in batch])
                    return top3_plans(ctx.model.score(z), ctx.unit.pool, ranks, option)
                plans = h.route(kind, batch, ctx)
                return [replace(p, normalize=False) for p in plans] if option == "no_norm" else plans

            summary = h.summarise(h.run_method(kind, ctx, 32, router=router), unit)
            summary["unseen_tasks"] = unit.unseen
            per_unit[f"{unit.setting}|{unit.fold}"] = summary
        results[label] = per_unit
        print(label, {k: (round(v["seen"], 3), round(v["unseen"], 3)) for k, v in per_unit.items()}, flush=True)

    command = "python benchmarks/eval_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# HiLoRA variants on the demo pool (diagnostic)\n",
             f"Generated by `{command}` "
             f"({(time.perf_counter() - t0) / 60:.1f} min). Same units and items as `eval-demo-pool.md`; "
             "a diagnostic of why HiLoRA scores what it does, not a tuning run (defaults are not taken from it).\n",
             "| variant | within seen | within unseen | cross seen | cross unseen | adapters per plan |",
             "|---|---|---|---|---|---|"]
    for label, per_unit in results.items():
        tagged = {tuple(k.split("|")) + ("m",): v for k, v in per_unit.items()}
        cells = []
        for setting in ("within", "cross"):
            avg = h.setting_average(tagged, setting, "m")
            cells += [h.fmt(avg.get("seen")), h.fmt(avg.get("unseen"))]
        size = h._mean([v["mean_plan_size"] for v in per_unit.values()])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {h.fmt(size, 2)} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval-ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
