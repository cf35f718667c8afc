"""Routing methods compared on the demo pool, the HiLoRA paper's protocol (its Tables 1, 2 and 9).

    .venv/bin/python benchmarks/eval_routing.py --limit 20            # what docs/eval-demo-pool.md reports
    .venv/bin/python benchmarks/eval_routing.py --limit 2 --methods base hilora --out /tmp/smoke

In process on ``hilora_core`` (no Ray, no Redis): the SmolLM2 base, the 12 demo LoRAs, greedy decoding
in batches of 32 (the test sets' prompts are ``format_prompt(inputs)``; answers are scored by
``exact_match``). The Gaussians are fitted with the product's defaults (MiniLM with the default
instruction, standardised space, calibrated eps) from the manifest's 20 samples per adapter.

Settings (``--settings``):

- within: per cluster, a seeded half of the tasks is seen (2 of 3 here) and the rest unseen; the
  pool is the seen adapters of every cluster.
- cross: each cluster in turn is unseen; the pool is the adapters of the other clusters. Seen
  tasks are those of the other clusters.

Every method routes over the setting's pool, except ``oracle`` (the task's own adapter, also for
unseen tasks: an upper bound) and ``base``. The gamma sweep re-runs HiLoRA; the sequence-level
sensitivity (eps, embedder) needs no generation. Writes ``<out>/eval-demo-pool.{md,json}`` and
``<out>/img/eval-*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.demo_pool import tasks as T  # noqa: E402
from hilora_core.embedding import SentenceEmbedder  # noqa: E402
from hilora_core.engine import RoutedLM  # noqa: E402
from hilora_core.logo import LogoSettings, logo_plans, logo_signals  # noqa: E402
from hilora_core.plan import RoutingPlan  # noqa: E402
from hilora_core.policies import PolicyConfig, make_plans  # noqa: E402
from hilora_core.pool import GaussianFitSettings, PoolModel, fit_pool  # noqa: E402
from hilora_core.qa_flora import QaFloraSettings, layer_divergences, qa_flora_plans  # noqa: E402
from hilora_core.sequence_routing import select_candidates  # noqa: E402

METHODS = ("base", "oracle", "hilora", "hilora_gs", "hilora_roc", "retriever", "arrow", "ensemble", "merged",
           "logo", "qa_flora")
LABELS = {"base": "Base", "oracle": "Oracle (own LoRA)", "hilora": "HiLoRA", "hilora_gs": "HiLoRA-GS",
          "hilora_roc": "HiLoRA-ROC (k=24)", "retriever": "Retriever (k=3)", "arrow": "Arrow (k=3)",
          "ensemble": "Ensemble", "merged": "Merged", "logo": "LoGo (k=3)", "qa_flora": "qa-FLoRA"}
POOL_INDEPENDENT = ("base", "oracle")


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Item:
    task: str
    cluster: str
    index: int
    inputs: str
    target: str


@dataclass
class Demo:
    """The demo pool: adapters (name -> folder, rank, cluster, samples) and the test items."""

    names: list[str]
    folders: dict[str, Path]
    ranks: dict[str, int]
    cluster: dict[str, str]
    samples: dict[str, list[str]]
    items: dict[str, list[Item]]
    max_new: dict[str, int]


def load_demo(pool_dir: Path, limit: int, tokenizer) -> Demo:
    manifest = json.loads((pool_dir / "manifest.json").read_text())
    names = [e["model_name"] for e in manifest]
    items, max_new = {}, {}
    for e in manifest:
        rows = [json.loads(line) for line in (pool_dir / "data" / e["model_name"] / "test.jsonl").open()]
        # answer budget from the whole test set, as build_pool.py measured the adapters
        max_new[e["model_name"]] = max(len(tokenizer(r["targets"], add_special_tokens=False)["input_ids"])
                                       for r in rows) + 4
        items[e["model_name"]] = [Item(e["model_name"], e["cluster"], i, r["inputs"], r["targets"])
                                  for i, r in enumerate(rows[:limit])]
    return Demo(
        names=names, folders={e["model_name"]: pool_dir / e["adapter"] for e in manifest},
        ranks={e["model_name"]: int(e["rank"]) for e in manifest},
        cluster={e["model_name"]: e["cluster"] for e in manifest},
        samples={e["model_name"]: [s["inputs"] for s in e["sample"]] for e in manifest}, items=items, max_new=max_new,
    )


def load_engine(pool_dir: Path, limit: int, base_model: str | None = None) -> tuple[RoutedLM, Demo]:
    """The base model with every demo adapter registered, and the demo pool (``limit`` items per task)."""
    lm = RoutedLM.from_pretrained(base_model, max_slots=16)
    demo = load_demo(pool_dir, limit, lm.tokenizer)
    for name in demo.names:
        lm.add_adapter(name, str(demo.folders[name]))
    return lm, demo


@dataclass
class Unit:
    """One evaluation: a pool and the tasks scored against it, each marked seen or unseen."""

    setting: str
    fold: str
    pool: list[str]
    seen: list[str]
    unseen: list[str]
    seen_limit: int | None = None  # items per seen task (None: all loaded)


def make_units(demo: Demo, settings: list[str], seed: int, folds: list[str] | None,
               cross_seen_limit: int | None = None) -> list[Unit]:
    clusters = sorted(set(demo.cluster.values()))
    units = []
    if "within" in settings:
        rng = np.random.default_rng(seed)
        seen, unseen = [], []
        for c in clusters:
            tasks = [t for t in demo.names if demo.cluster[t] == c]
            order = rng.permutation(len(tasks))
            n_seen = math.ceil(len(tasks) / 2)
            seen += [tasks[i] for i in sorted(order[:n_seen])]
            unseen += [tasks[i] for i in sorted(order[n_seen:])]
        units.append(Unit("within", "all", [t for t in demo.names if t in seen], seen, unseen))
    if "cross" in settings:
        for c in clusters:
            if folds and c not in folds:
                continue
            pool = [t for t in demo.names if demo.cluster[t] != c]
            units.append(Unit("cross", c, pool, pool, [t for t in demo.names if demo.cluster[t] == c],
                              seen_limit=cross_seen_limit))
    return units


# ------------------------------------------------------------------------------------------- routing
@dataclass
class Context:
    """Everything a method needs to route one unit's queries."""

    lm: RoutedLM
    demo: Demo
    unit: Unit
    model: PoolModel
    query_emb: dict[tuple[str, int], np.ndarray]


def route(method: str, items: list[Item], ctx: Context, gamma: float = 0.4) -> list[RoutingPlan]:
    """One plan per item under ``method`` over the unit's pool."""
    pool, ranks = ctx.unit.pool, [ctx.demo.ranks[a] for a in ctx.unit.pool]
    if method == "base":
        return [RoutingPlan()] * len(items)
    if method == "oracle":
        return [RoutingPlan.single(it.task) for it in items]
    if method in ("hilora", "hilora_gs", "retriever"):
        z = np.stack([ctx.query_emb[(it.task, it.index)] for it in items])
        if method == "retriever":
            return make_plans(PolicyConfig("retriever"), pool, ranks, cosine=ctx.model.cosine(z))
        return make_plans(PolicyConfig(method, gamma=gamma), pool, ranks, scores=ctx.model.score(z))
    if method in ("hilora_roc", "arrow", "ensemble", "merged"):
        return make_plans(PolicyConfig(method), pool, ranks, n_queries=len(items))
    ids, mask = ctx.lm.encode([T.format_prompt(it.inputs) for it in items])
    if method == "logo":
        return logo_plans(logo_signals(ctx.lm, ids, mask, pool, LogoSettings()), pool, LogoSettings().top_k)
    if method == "qa_flora":
        settings = QaFloraSettings()
        return qa_flora_plans(layer_divergences(ctx.lm, ids, mask, pool, settings.divergence), pool, settings)
    raise ValueError(f"unknown method {method!r}")


@dataclass
class Run:
    """Predictions and timings of one (unit, method)."""

    correct: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    route_s: float = 0.0
    generate_s: float = 0.0
    n: int = 0
    plan_sizes: list[int] = field(default_factory=list)
    own_in_plan: list[bool] = field(default_factory=list)  # seen items only
    cluster_in_plan: list[bool] = field(default_factory=list)  # any planned adapter of the item's cluster


def unit_items(unit: Unit, demo: Demo) -> list[Item]:
    """The unit's items: every loaded item of its unseen tasks, ``seen_limit`` of each seen task."""
    return [it for t in unit.seen for it in demo.items[t][: unit.seen_limit]] + [
        it for t in unit.unseen for it in demo.items[t]]


def run_method(method: str, ctx: Context, batch_size: int, gamma: float = 0.4,
               cache: dict | None = None, router=None) -> Run:
    """Generate and score the unit's items under ``method`` (``router(items, ctx)`` overrides its plans)."""
    unit, demo = ctx.unit, ctx.demo
    items = unit_items(unit, demo)
    run = Run()
    # outputs by (method, task, item); base and oracle ignore the pool, so they share the caller's cache
    outputs = cache if cache is not None and method in POOL_INDEPENDENT else {}
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        todo = [it for it in batch if (method, it.task, it.index) not in outputs]
        if todo:
            t0 = time.perf_counter()
            plans = route(method, todo, ctx, gamma) if router is None else router(todo, ctx)
            t1 = time.perf_counter()
            outs = ctx.lm.generate([T.format_prompt(it.inputs) for it in todo], plans,
                                   max_new_tokens=[demo.max_new[it.task] for it in todo])
            run.route_s += t1 - t0
            run.generate_s += time.perf_counter() - t1
            run.n += len(todo)
            for it, plan, out in zip(todo, plans, outs, strict=True):
                outputs[(method, it.task, it.index)] = out
                run.plan_sizes.append(len(plan.adapters))
                if it.task in unit.pool:
                    run.own_in_plan.append(it.task in plan.adapters)
                if any(demo.cluster[a] == it.cluster for a in unit.pool):  # the cluster is represented
                    run.cluster_in_plan.append(any(demo.cluster[a] == it.cluster for a in plan.adapters))
        for it in batch:
            run.correct[it.task].append(T.exact_match(outputs[(method, it.task, it.index)], it.target))
    return run


# ------------------------------------------------------------------------------- sequence-level study
def llm_embed(lm: RoutedLM, texts: list[str], layer: int, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled hidden states of the base model's decoder ``layer`` for raw texts, (n, d)."""
    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask = lm.encode(texts[s:s + batch_size])
        with torch.inference_mode():
            hs = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
        m = mask.unsqueeze(-1).to(hs.dtype)
        out.append(((hs * m).sum(1) / m.sum(1)).float().numpy())
    return np.concatenate(out)


def sequence_metrics(model: PoolModel, unit: Unit, items: list[Item], emb: dict, demo: Demo) -> dict[str, float]:
    """Candidate-set statistics of HiLoRA's rule for ``items`` of the unit's tasks (no generation)."""
    keys = [(it.task, it.index, it.cluster) for it in items if it.task in unit.seen or it.task in unit.unseen]
    scores = model.score(np.stack([emb[(t, i)] for t, i, _ in keys]))
    own, size, top1_cluster, unseen_cluster = [], [], [], []
    for (task, _, cluster), row in zip(keys, scores, strict=True):
        cand = [unit.pool[j] for j in select_candidates(row)]
        size.append(len(cand))
        represented = any(demo.cluster[a] == cluster for a in unit.pool)
        if represented:
            top1_cluster.append(demo.cluster[cand[0]] == cluster)
        if task in unit.pool:
            own.append(task in cand)
        elif represented:
            unseen_cluster.append(any(demo.cluster[a] == cluster for a in cand))
    return {"own_in_C": float(np.mean(own)) if own else float("nan"), "mean_C": float(np.mean(size)),
            "top1_cluster": float(np.mean(top1_cluster)) if top1_cluster else float("nan"),
            "unseen_cluster_in_C": float(np.mean(unseen_cluster)) if unseen_cluster else float("nan"),
            "eps": model.eps}


# ---------------------------------------------------------------------------------------- reporting
def summarise(run: Run, unit: Unit) -> dict:
    per_task = {t: float(np.mean(v)) for t, v in run.correct.items()}
    seen = [per_task[t] for t in unit.seen]
    unseen = [per_task[t] for t in unit.unseen]
    return {
        "per_task": per_task, "seen": float(np.mean(seen)) if seen else None,
        "unseen": float(np.mean(unseen)) if unseen else None,
        "n": sum(len(v) for v in run.correct.values()), "n_generated": run.n,
        "route_s": run.route_s, "generate_s": run.generate_s,
        "mean_plan_size": float(np.mean(run.plan_sizes)) if run.plan_sizes else None,
        "own_in_plan": float(np.mean(run.own_in_plan)) if run.own_in_plan else None,
        "cluster_in_plan": float(np.mean(run.cluster_in_plan)) if run.cluster_in_plan else None,
    }


def setting_average(results: dict, setting: str, method: str) -> dict[str, float | None]:
    """Seen: mean over units of each unit's seen mean; unseen: mean over all unseen (task, unit) pairs."""
    rows = [r for (s, _, m), r in results.items() if s == setting and m == method]
    if not rows:
        return {}
    seen = [r["seen"] for r in rows if r["seen"] is not None]
    unseen_tasks = [r["per_task"][t] for (s, f, m), r in results.items() if s == setting and m == method
                    for t in r["unseen_tasks"]]
    n = sum(r["n"] for r in rows)
    n_gen = sum(r["n_generated"] for r in rows)
    return {"seen": float(np.mean(seen)) if seen else None,
            "unseen": float(np.mean(unseen_tasks)) if unseen_tasks else None,
            "route_ms_per_query": 1000 * sum(r["route_s"] for r in rows) / n_gen if n_gen else None,
            "gen_ms_per_query": 1000 * sum(r["generate_s"] for r in rows) / n_gen if n_gen else None, "n": n,
            "own_in_plan": _mean([r["own_in_plan"] for r in rows]),
            "cluster_in_plan": _mean([r["cluster_in_plan"] for r in rows]),
            "mean_plan_size": _mean([r["mean_plan_size"] for r in rows])}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def fmt(x, digits=3):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(out: Path, res: dict, args, units: list[Unit], demo: Demo) -> None:
    results = {tuple(k.split("|")): v for k, v in res["results"].items()}
    lines = ["# Routing methods on the demo pool\n",
             f"Generated by `{res['command']}` ({res['finished']}, {res['wall_s'] / 60:.1f} min, "
             f"{res['threads']} torch threads). The first {args.limit} test items of each task"
             + (f" ({args.cross_seen_limit} per seen task in the cross-cluster folds)" if args.cross_seen_limit else "")
             + f", greedy, batch {args.batch_size}, exact match. Raw numbers: `eval-demo-pool.json`.\n"]
    for u in units:
        lines.append(f"- {u.setting} / {u.fold}: pool {u.pool}; unseen {u.unseen}")
    lines.append("")
    for setting in ("within", "cross"):
        avgs = {m: setting_average(results, setting, m) for m in args.methods}
        avgs = {m: a for m, a in avgs.items() if a}
        if not avgs:
            continue
        lines += [f"## {setting}-cluster setting\n",
                  "| method | seen EM | unseen EM | own adapter in plan (seen) | an adapter of the item's cluster "
                  "in plan | adapters per plan | routing ms / query | generation ms / query | items |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, a in avgs.items():
            lines.append(f"| {LABELS[m]} | {fmt(a['seen'])} | {fmt(a['unseen'])} | {fmt(a['own_in_plan'], 2)} | "
                         f"{fmt(a['cluster_in_plan'], 2)} | {fmt(a['mean_plan_size'], 1)} | "
                         f"{fmt(a['route_ms_per_query'], 1)} | {fmt(a['gen_ms_per_query'], 0)} | {a['n']} |")
        lines.append("")
        lines += ["Per task (EM; a task's unseen folds are marked *):\n",
                  "| method | " + " | ".join(demo.names) + " |", "|---" * (len(demo.names) + 1) + "|"]
        for m in avgs:
            cells = []
            for t in demo.names:
                vals = [(r["per_task"][t], t in r["unseen_tasks"]) for (s, f, mm), r in results.items()
                        if s == setting and mm == m and t in r["per_task"]]
                if not vals:
                    cells.append("")
                    continue
                seen_v = [v for v, u in vals if not u]
                unseen_v = [v for v, u in vals if u]
                cell = fmt(np.mean(seen_v), 2) if seen_v else ""
                cell += (" / " if cell and unseen_v else "") + (f"{np.mean(unseen_v):.2f}*" if unseen_v else "")
                cells.append(cell)
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    if res.get("gamma"):
        lines += ["## Gamma sweep (HiLoRA)\n", "| setting | gamma | seen EM | unseen EM |",
                  "|---|---|---|---|"]
        for row in res["gamma"]:
            lines.append(f"| {row['setting']} | {row['gamma']} | {fmt(row['seen'])} | {fmt(row['unseen'])} |")
        lines.append("")
    if res.get("sequence"):
        lines += ["## Sequence-level sensitivity (no generation)\n",
                  "Candidate set C of HiLoRA's rule, averaged over the units of each setting.\n",
                  "| setting | embedder | eps | own adapter in C (seen) | mean \\|C\\| | top-1 cluster | "
                  "unseen: an adapter of its cluster in C |", "|---|---|---|---|---|---|---|"]
        for row in res["sequence"]:
            lines.append(f"| {row['setting']} | {row['embedder']} | {row['eps_label']} (mean {row['eps']:.3g}) | "
                         f"{fmt(row['own_in_C'])} | {fmt(row['mean_C'], 2)} | {fmt(row['top1_cluster'])} | "
                         f"{fmt(row['unseen_cluster_in_C'])} |")
        lines.append("\nTop-1 cluster counts only items whose cluster has an adapter in the pool (none of the "
                     "unseen cluster's items in the cross-cluster setting); the last column is empty there.")
        lines.append("")
    (out / "eval-demo-pool.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, res: dict, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {tuple(k.split("|")): v for k, v in res["results"].items()}
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    settings = [s for s in ("within", "cross") if any(k[0] == s for k in results)]
    fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        avgs = {m: setting_average(results, setting, m) for m in methods}
        ms = [m for m in methods if avgs[m]]
        x = np.arange(len(ms))
        ax.bar(x - 0.2, [avgs[m]["seen"] or 0 for m in ms], 0.4, label="seen")
        ax.bar(x + 0.2, [avgs[m]["unseen"] or 0 for m in ms], 0.4, label="unseen")
        ax.set_xticks(x, [LABELS[m] for m in ms], rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("exact match")
        ax.set_title(f"{setting}-cluster")
        ax.legend()
    fig.tight_layout()
    fig.savefig(img / "eval-accuracy.png", dpi=110)
    plt.close(fig)
    if res.get("gamma"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for setting in settings:
            rows = [r for r in res["gamma"] if r["setting"] == setting]
            if not rows:
                continue
            g = [r["gamma"] for r in rows]
            ax.plot(g, [r["seen"] for r in rows], "o-", label=f"{setting}: seen")
            ax.plot(g, [r["unseen"] for r in rows], "s--", label=f"{setting}: unseen")
        ax.set_xlabel("gamma (fraction of the candidates' ROCs activated)")
        ax.set_ylabel("exact match")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / "eval-gamma.png", dpi=110)
        plt.close(fig)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-dir", type=Path, default=ROOT / "examples" / "demo_pool")
    ap.add_argument("--limit", type=int, default=100, help="test items per task (the first N)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--settings", nargs="+", default=["within", "cross"], choices=["within", "cross"])
    ap.add_argument("--folds", nargs="*", default=None, help="cross-cluster folds (cluster names; default all)")
    ap.add_argument("--gammas", nargs="*", type=float, default=[0.2, 0.4, 0.6, 0.8, 1.0])
    ap.add_argument("--gamma-settings", nargs="*", default=["within"], choices=["within", "cross"])
    ap.add_argument("--no-sequence", action="store_true", help="skip the sequence-level eps / embedder study")
    ap.add_argument("--cross-seen-limit", type=int, default=None,
                    help="items per seen task in each cross-cluster fold (default: --limit)")
    ap.add_argument("--sequence-limit", type=int, default=100, help="items per task of the sequence-level study")
    ap.add_argument("--from-json", type=Path, default=None, help="only re-render the report of a saved run")
    ap.add_argument("--llm-embed-layer", type=int, default=20, help="SmolLM2 layer of the LLM embedder variant")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the within-cluster seen/unseen split")
    ap.add_argument("--base-model", default=None, help="base model (default: the embedded SmolLM2)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        from transformers import AutoTokenizer

        from hilora_core.base_model import resolve_base

        tok = AutoTokenizer.from_pretrained(resolve_base(None) if args.base_model is None else args.base_model)
        demo = load_demo(args.pool_dir, args.limit, tok)
        res = json.loads(args.from_json.read_text())
        write_report(args.out, res, args, make_units(demo, args.settings, args.seed, args.folds,
                                                     args.cross_seen_limit), demo)
        plot(args.out, res, args.methods)
        return res

    lm, demo = load_engine(args.pool_dir, args.limit, args.base_model)
    units = make_units(demo, args.settings, args.seed, args.folds, args.cross_seen_limit)

    embedder = SentenceEmbedder()
    t0 = time.perf_counter()
    all_items = [it for t in demo.names for it in demo.items[t]]
    q = embedder.encode([it.inputs for it in all_items])
    embed_ms = 1000 * (time.perf_counter() - t0) / len(all_items)
    query_emb = {(it.task, it.index): q[i] for i, it in enumerate(all_items)}
    sample_emb = {t: embedder.encode(demo.samples[t]) for t in demo.names}

    results: dict[str, dict] = {}
    gamma_rows: list[dict] = []
    cache: dict = {}
    for unit in units:
        model = fit_pool([sample_emb[a] for a in unit.pool], GaussianFitSettings())
        ctx = Context(lm, demo, unit, model, query_emb)
        for method in args.methods:
            t0 = time.perf_counter()
            r = summarise(run_method(method, ctx, args.batch_size, cache=cache), unit)
            r["unseen_tasks"] = unit.unseen
            results[f"{unit.setting}|{unit.fold}|{method}"] = r
            print(f"{unit.setting:6s} {unit.fold:8s} {method:11s} seen {fmt(r['seen'])} unseen {fmt(r['unseen'])} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if unit.setting in args.gamma_settings and args.gammas:
            for g in args.gammas:
                if g == 0.4 and "hilora" in args.methods:
                    r = results[f"{unit.setting}|{unit.fold}|hilora"]
                else:
                    r = summarise(run_method("hilora", ctx, args.batch_size, gamma=g), unit)
                    r["unseen_tasks"] = unit.unseen
                gamma_rows.append({"setting": unit.setting, "fold": unit.fold, "gamma": g, "seen": r["seen"],
                                   "unseen_per_task": {t: r["per_task"][t] for t in unit.unseen}})
                print(f"  gamma {g}: seen {fmt(r['seen'])} unseen {fmt(r['unseen'])}", flush=True)

    gamma_summary = []
    for setting in args.gamma_settings:
        for g in args.gammas:
            rows = [r for r in gamma_rows if r["setting"] == setting and r["gamma"] == g]
            if rows:
                unseen = [v for r in rows for v in r["unseen_per_task"].values()]
                gamma_summary.append({"setting": setting, "gamma": g, "seen": _mean([r["seen"] for r in rows]),
                                      "unseen": float(np.mean(unseen)) if unseen else None})

    sequence_rows = []
    if not args.no_sequence:
        seq_demo = load_demo(args.pool_dir, args.sequence_limit, lm.tokenizer)
        seq_items = [it for t in demo.names for it in seq_demo.items[t]]
        texts = [it.inputs for it in seq_items]
        embedders = {}
        for emb_name, encode in (
            ("MiniLM + instruction (default)", embedder.encode),
            ("MiniLM, no instruction", SentenceEmbedder(instruction="").encode),
            (f"SmolLM2 layer {args.llm_embed_layer}, mean-pooled",
             lambda xs: llm_embed(lm, xs, args.llm_embed_layer)),
        ):
            qe = encode(texts)
            embedders[emb_name] = ({(it.task, it.index): qe[i] for i, it in enumerate(seq_items)},
                                   {t: encode(demo.samples[t]) for t in demo.names})
        for setting in args.settings:
            s_units = [u for u in units if u.setting == setting]
            for emb_name, (qe, se) in embedders.items():
                variants = [("calibrated (default)", None)]
                if emb_name.endswith("(default)"):
                    variants += [(f"calibrated x {f}", f) for f in (0.25, 0.5, 2.0, 4.0)]
                for label, factor in variants:
                    rows = []
                    for u in s_units:
                        sets = [se[a] for a in u.pool]
                        model = fit_pool(sets, GaussianFitSettings())
                        if factor is not None:
                            model = fit_pool(sets, GaussianFitSettings(eps=model.eps * factor))
                        rows.append(sequence_metrics(model, u, seq_items, qe, demo))
                    sequence_rows.append({"setting": setting, "embedder": emb_name, "eps_label": label,
                                          **{k: _mean([r[k] for r in rows if not math.isnan(r[k])])
                                             for k in rows[0]}})
        for row in sequence_rows:  # JSON has no NaN
            for k, v in row.items():
                if isinstance(v, float) and math.isnan(v):
                    row[k] = None

    res = {
        "command": "python benchmarks/eval_routing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "finished": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(), "embed_ms_per_query": embed_ms,
        "units": [u.__dict__ for u in units], "results": results, "gamma": gamma_summary,
        "gamma_per_unit": gamma_rows, "sequence": sequence_rows,
    }
    (args.out / "eval-demo-pool.json").write_text(json.dumps(res, indent=1))
    write_report(args.out, res, args, units, demo)
    plot(args.out, res, args.methods)
    print((args.out / "eval-demo-pool.md").read_text())
    return res


if __name__ == "__main__":
    main()
