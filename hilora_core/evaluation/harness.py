"""The generation harness of the routing evaluations: example pools, settings, methods, runs.

The benchmarks (``benchmarks/eval_*.py``) are thin command-line scripts over this module:

- :func:`load_pool` reads an example pool (manifest, adapters, test sets) and
  :func:`load_engine` registers its adapters on a :class:`RoutedLM`;
- :func:`make_units` builds the paper's settings: within-cluster (a seeded half of each
  cluster's tasks seen) and cross-cluster (one cluster left out in turn);
- :func:`route` gives one plan per item for a method (the policy table, the oracle, the
  base model, or the instance-level baselines LoGo and qa-FLoRA);
- :func:`run_method` generates greedily in batches and scores exact match;
- :func:`summarise` / :func:`setting_average` aggregate, :func:`sequence_metrics` measures
  HiLoRA's candidate sets without generating.

Prompts are the base model's chat template for one user turn (:func:`chat_prompt`).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hilora_core.baselines.logo import LogoSettings, logo_plans, logo_signals
from hilora_core.baselines.qa_flora import QaFloraSettings, layer_divergences, qa_flora_plans
from hilora_core.baselines.retriever import cosine_similarity
from hilora_core.engine import RoutedLM
from hilora_core.errors import InvalidInputError
from hilora_core.evaluation.route_eval import candidate_statistics
from hilora_core.evaluation.scoring import exact_match
from hilora_core.manifest import ManifestEntry, read_manifest
from hilora_core.plan import RoutingPlan
from hilora_core.policies import PolicyConfig, make_plans
from hilora_core.routing.pool import PoolModel

POOL_INDEPENDENT = ("base", "oracle")


def chat_prompt(tokenizer, text: str) -> str:
    """The model prompt for one user turn: the tokenizer's chat template with the generation header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Item:
    task: str
    cluster: str
    index: int
    inputs: str
    target: str


@dataclass
class PoolData:
    """An example pool: adapters (name -> folder, rank, cluster, samples) and the test items."""

    names: list[str]
    folders: dict[str, Path]
    ranks: dict[str, int]
    cluster: dict[str, str]
    samples: dict[str, list[str]]
    items: dict[str, list[Item]]
    max_new: dict[str, int]


def _example_entry(e: ManifestEntry, path: Path) -> tuple[str, str, int]:
    """Cluster, adapter folder and rank of an example pool's entry (optional in a manifest, needed here)."""
    if e.cluster is None or e.adapter is None or e.rank is None:
        raise InvalidInputError(f"{path}: {e.name!r} needs a cluster, an adapter folder and a rank")
    return e.cluster, e.adapter, e.rank


def load_pool(pool_dir: Path, limit: int, tokenizer, offset: int = 0) -> PoolData:
    """An example pool (``manifest.json`` with cluster, adapter and rank; ``data/<task>/test.jsonl``),
    ``limit`` test items of each task from item ``offset`` on (reports use offset 0; a later offset is a
    development split that tuning may read without touching the reported items)."""
    manifest = read_manifest(pool_dir / "manifest.json")
    entries = {e.name: _example_entry(e, pool_dir / "manifest.json") for e in manifest}
    items, max_new = {}, {}
    for e in manifest:
        rows = [json.loads(line) for line in (pool_dir / "data" / e.name / "test.jsonl").open()]
        # answer budget from the whole test set, as build_pool.py measured the adapters
        max_new[e.name] = max(len(tokenizer(r["targets"], add_special_tokens=False)["input_ids"]) for r in rows) + 4
        items[e.name] = [Item(e.name, entries[e.name][0], i, r["inputs"], r["targets"]) for i, r in enumerate(rows)
                         if offset <= i < offset + limit]
    return PoolData(
        names=list(entries), folders={name: pool_dir / adapter for name, (_, adapter, _) in entries.items()},
        ranks={name: rank for name, (_, _, rank) in entries.items()},
        cluster={name: cluster for name, (cluster, _, _) in entries.items()},
        samples={e.name: e.samples for e in manifest}, items=items, max_new=max_new,
    )


def slots_for(*pool_dirs: Path) -> int:
    """Device slots an engine needs to run any plan over these example pools (methods such as Merged or
    Ensemble put every adapter of a pool in one batch): at least 16, else the largest pool's size."""
    return max([16] + [len(read_manifest(d / "manifest.json")) for d in pool_dirs])


def load_engine(pool_dir: Path, limit: int, base_model: str | None = None) -> tuple[RoutedLM, PoolData]:
    """The base model with every demo adapter registered, and the demo pool (``limit`` items per task)."""
    lm = RoutedLM.from_pretrained(base_model, max_slots=slots_for(pool_dir))
    demo = load_pool(pool_dir, limit, lm.tokenizer)
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


def make_units(demo: PoolData, settings: list[str], seed: int, folds: list[str] | None,
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
    demo: PoolData
    unit: Unit
    model: PoolModel
    query_emb: dict[tuple[str, int], np.ndarray]


INSTANCE_LEVEL = ("logo", "qa_flora")  # baselines that need the model itself (not in the policy table)


def route(method: str, items: list[Item], ctx: Context, gamma: float = 0.4) -> list[RoutingPlan]:
    """One plan per item under ``method`` over the unit's pool.

    ``method``: ``oracle`` (the item's own adapter), an instance-level baseline (``logo``,
    ``qa_flora``), or any policy of :data:`hilora_core.policies.POLICY_TABLE` (``base`` included),
    run as the paper defines it (no off-pool gate; ``benchmarks/eval_offpool.py`` adds it).
    """
    pool, ranks = ctx.unit.pool, [ctx.demo.ranks[a] for a in ctx.unit.pool]
    if method == "oracle":
        return [RoutingPlan.single(it.task) for it in items]
    if method in INSTANCE_LEVEL:
        ids, mask = ctx.lm.encode([chat_prompt(ctx.lm.tokenizer, it.inputs) for it in items])
        if method == "logo":
            return logo_plans(logo_signals(ctx.lm, ids, mask, pool, LogoSettings()), pool, LogoSettings().top_k)
        settings = QaFloraSettings()
        return qa_flora_plans(layer_divergences(ctx.lm, ids, mask, pool, settings.divergence), pool, settings)
    cfg = PolicyConfig(method, gamma=gamma, fallback=False)
    scores = cosine = None
    if cfg.spec.input:
        z = np.stack([ctx.query_emb[(it.task, it.index)] for it in items])
        scores = ctx.model.score(z) if cfg.needs_gaussian_scores else None
        cosine = cosine_similarity(z, ctx.model.means) if cfg.needs_cosine else None
    return make_plans(cfg, pool, ranks, scores=scores, cosine=cosine, n_queries=len(items))


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


def unit_items(unit: Unit, demo: PoolData) -> list[Item]:
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
            outs = ctx.lm.generate([chat_prompt(ctx.lm.tokenizer, it.inputs) for it in todo], plans,
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
            run.correct[it.task].append(exact_match(outputs[(method, it.task, it.index)], it.target))
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


def sequence_metrics(model: PoolModel, unit: Unit, items: list[Item], emb: dict, demo: PoolData) -> dict[str, float]:
    """Candidate-set statistics of HiLoRA's rule for ``items`` of the unit's tasks (no generation)."""
    keys = [(it.task, it.index, it.cluster) for it in items if it.task in unit.seen or it.task in unit.unseen]
    scores = model.score(np.stack([emb[(t, i)] for t, i, _ in keys]))
    own = np.array([unit.pool.index(t) if t in unit.pool else -1 for t, _, _ in keys])
    adapter_clusters = np.array([demo.cluster[a] for a in unit.pool])
    st = candidate_statistics(scores, own, adapter_clusters, np.array([c for _, _, c in keys]))
    represented = np.isin([c for _, _, c in keys], adapter_clusters)
    unseen = (own < 0) & represented

    def mean(values: np.ndarray, where: np.ndarray) -> float:
        return float(values[where].mean()) if where.any() else float("nan")

    return {"own_in_C": mean(st["own_in_candidates"], own >= 0), "mean_C": float(st["candidates"].mean()),
            "top1_cluster": mean(st["cluster_top1"], represented),
            "unseen_cluster_in_C": mean(st["cluster_in_candidates"], unseen), "eps": model.eps}


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
            "own_in_plan": mean_or_none([r["own_in_plan"] for r in rows]),
            "cluster_in_plan": mean_or_none([r["cluster_in_plan"] for r in rows]),
            "mean_plan_size": mean_or_none([r["mean_plan_size"] for r in rows])}


def mean_or_none(xs: list) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


