"""Seen, unseen and off-pool requests, every method with and without the base-model fallback.

    .venv/bin/python benchmarks/eval_offpool.py --limit 10 --cross-seen-limit 5 --threads 2 \\
        --flan48 ../shared/data/flan48          # what docs/eval-offpool.md reports

Three kinds of request (the off-pool issue's protocol):

- seen tasks: test items of tasks whose adapter is in the pool;
- unseen tasks: within-cluster (a seeded half of each cluster is seen) and cross-cluster (a whole
  cluster left out in turn), as ``eval_routing.py`` builds them;
- off-pool requests: ``benchmarks/data/offpool_requests.txt``, everyday instructions written for this
  project and never used to fit or tune anything, routed against the whole pool. Reported: how many
  are answered exactly as the base model answers them (greedy, ``--offpool-tokens`` new tokens) and
  how many get any adapter at all.

Every routing method runs twice: as the paper defines it (``fallback=False``) and with the pool's
off-pool test in front (``+fb``: :meth:`hilora_core.routing.pool.PoolModel.off_pool_rows`, the rule the
service applies). Generation is cached by (request, plan), so a fallback variant costs only its
changed plans. ``--flan48 DIR`` adds routing-only fallback rates on the FLAN-48 dev split: seen-task
inputs against the whole pool, and each cluster's inputs against the pool without that cluster.
Writes ``<out>/eval-offpool.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ROOT, command_line, fmt, parse_report_args, pool_dir
from hilora_core.engine import RoutedLM
from hilora_core.evaluation.harness import (
    Context,
    Item,
    Unit,
    chat_prompt,
    load_pool,
    make_units,
    route,
    slots_for,
)
from hilora_core.evaluation.scoring import exact_match
from hilora_core.manifest import read_manifest
from hilora_core.models.embedding import SentenceEmbedder
from hilora_core.plan import RoutingPlan
from hilora_core.routing.fallback import load_reference_requests
from hilora_core.routing.pool import GaussianFitSettings, PoolModel, fit_pool

ROUTED = ("hilora", "hilora_gs", "retriever", "arrow", "merged")
LABELS = {"base": "Base", "oracle": "Oracle (own LoRA)", "hilora": "HiLoRA", "hilora_gs": "HiLoRA-GS",
          "retriever": "Retriever (k=3)", "arrow": "Arrow (k=3)", "merged": "Merged"}
POOLS = {name: pool_dir(name) for name in ("demo", "transfer")}
OFFPOOL_FILE = ROOT / "benchmarks" / "data" / "offpool_requests.txt"
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2 (default)"  # what reports call SentenceEmbedder(None)


def variants(methods: list[str]) -> list[tuple[str, bool]]:
    """(method, fallback) pairs: base and oracle once, every routed method with and without fallback."""
    out = []
    for m in methods:
        out.append((m, False))
        if m in ROUTED:
            out.append((m, True))
    return out


def label(method: str, fallback: bool) -> str:
    return LABELS[method] + (" +fb" if fallback else "")


class Generator:
    """Greedy outputs cached by (request key, plan): a plan met twice is generated once."""

    def __init__(self, lm: RoutedLM, batch_size: int) -> None:
        self.lm, self.batch_size, self.cache = lm, batch_size, {}
        self.generated = 0

    def run(self, keys: list, prompts: list[str], plans: list[RoutingPlan], max_new: list[int]) -> list[str]:
        todo = [i for i, (k, p) in enumerate(zip(keys, plans, strict=True)) if (k, p) not in self.cache]
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s:s + self.batch_size]
            outs = self.lm.generate([chat_prompt(self.lm.tokenizer, prompts[i]) for i in idx], [plans[i] for i in idx],
                                    max_new_tokens=[max_new[i] for i in idx])
            for i, out in zip(idx, outs, strict=True):
                self.cache[(keys[i], plans[i])] = out
            self.generated += len(idx)
        return [self.cache[(k, p)] for k, p in zip(keys, plans, strict=True)]


def plans_for(method: str, fallback: bool, items: list[Item], ctx: Context) -> tuple[list[RoutingPlan], np.ndarray]:
    """The method's plans for ``items`` and the (n,) off-pool flags of the pool's test."""
    plans = route(method, items, ctx)
    z = np.stack([ctx.query_emb[(it.task, it.index)] for it in items])
    off = ctx.model.off_pool_rows(ctx.model.score(z).max(axis=1))
    if fallback:
        plans = [RoutingPlan() if o else p for p, o in zip(plans, off, strict=True)]
    return plans, off


def eval_unit(unit: Unit, ctx: Context, gen: Generator, methods: list[str], limit_seen: int | None) -> dict:
    items = [it for t in unit.seen for it in ctx.demo.items[t][:limit_seen]] + \
        [it for t in unit.unseen for it in ctx.demo.items[t]]
    out = {}
    for method, fb in variants(methods):
        plans, off = plans_for(method, fb, items, ctx)
        preds = gen.run([(it.task, it.index) for it in items], [it.inputs for it in items], plans,
                        [ctx.demo.max_new[it.task] for it in items])
        per_task: dict[str, list[bool]] = {}
        fell = {"seen": [], "unseen": []}
        for it, pred, o in zip(items, preds, off, strict=True):
            per_task.setdefault(it.task, []).append(exact_match(pred, it.target))
            fell["seen" if it.task in unit.seen else "unseen"].append(bool(o))
        em = {t: float(np.mean(v)) for t, v in per_task.items()}
        out[f"{method}|{int(fb)}"] = {
            "per_task": em, "seen": float(np.mean([em[t] for t in unit.seen])),
            "unseen": float(np.mean([em[t] for t in unit.unseen])) if unit.unseen else None,
            "off_pool_seen": float(np.mean(fell["seen"])), "off_pool_unseen": float(np.mean(fell["unseen"]))
            if fell["unseen"] else None,
        }
    return out


def eval_offpool_requests(texts: list[str], ctx: Context, gen: Generator, methods: list[str],
                          tokens: int) -> dict:
    items = [Item("offpool", "offpool", i, t, "") for i, t in enumerate(texts)]
    keys = [("offpool", i) for i in range(len(texts))]
    base = gen.run(keys, texts, [RoutingPlan()] * len(texts), [tokens] * len(texts))
    out = {}
    for method, fb in variants([m for m in methods if m in ROUTED]):
        plans, off = plans_for(method, fb, items, ctx)
        preds = gen.run(keys, texts, plans, [tokens] * len(texts))
        out[f"{method}|{int(fb)}"] = {
            "same_as_base": float(np.mean([p == b for p, b in zip(preds, base, strict=True)])),
            "any_adapter": float(np.mean([not p.is_base for p in plans])),
            "flagged": float(np.mean(off)),
            "examples": [{"request": texts[i], "base": base[i], "answer": preds[i],
                          "adapters": list(plans[i].adapters)} for i in range(3)],
        }
    return out


def flan48_rates(flan_dir: Path, embedder: SentenceEmbedder, reference: np.ndarray) -> dict:
    """Routing-only fallback rates on the FLAN-48 dev split (seen tasks; held-out clusters)."""
    pool = read_manifest(flan_dir / "pool_samples.json")
    dev = [json.loads(line) for line in (flan_dir / "dev.jsonl").read_text().splitlines() if line.strip()]
    names = [e.name for e in pool]
    samples = {e.name: embedder.encode(e.samples) for e in pool}
    z = embedder.encode([r["inputs"] for r in dev])
    cluster_of = {r["task"]: r["domain"] for r in dev}
    full = fit_pool([samples[n] for n in names], GaussianFitSettings(), reference)
    seen_off = full.off_pool_rows(full.score(z).max(axis=1))
    held = {}
    for c in sorted(set(cluster_of.values())):
        keep = [n for n in names if cluster_of.get(n) != c]
        rows = np.array([cluster_of[r["task"]] == c for r in dev])
        model = fit_pool([samples[n] for n in keep], GaussianFitSettings(), reference)
        flags = model.off_pool_rows(model.score(z[rows]).max(axis=1))
        held[c] = {"n": int(rows.sum()), "fallback": float(flags.mean())}
    n_held = sum(v["n"] for v in held.values())
    return {"seen_fallback": float(seen_off.mean()), "n_seen": len(dev), "threshold": full.off_pool.to_dict(),
            "held_out_cluster_fallback": sum(v["n"] * v["fallback"] for v in held.values()) / n_held,
            "per_cluster": held}


def average(units: dict, setting: str, key: str, field: str) -> float | None:
    vals = [u[key][field] for (s, _), u in units.items() if s == setting and u[key][field] is not None]
    return float(np.mean(vals)) if vals else None


def write_report(path: Path, res: dict) -> None:
    lines = ["# Seen, unseen and off-pool requests\n",
             f"Generated by `{res['command']}` ({res['finished']}, {res['wall_s'] / 60:.1f} min, "
             f"{res['threads']} torch threads; embedder {res.get('embedder', DEFAULT_EMBEDDER)}). "
             "Greedy, exact match; `+fb` = with the base-model fallback "
             "(the service's default), no suffix = the method as published (always routes). Off-pool: "
             f"{res['n_offpool']} requests of `{res['offpool_file']}` against the whole pool, "
             f"{res['offpool_tokens']} new tokens compared with the base model's. Raw numbers: the JSON file "
             "of the same name.\n"]
    for pool, r in res["pools"].items():
        units = {tuple(k.split("|")): v for k, v in r["units"].items()}
        lines += [f"## {pool} pool\n", f"Off-pool threshold of the whole pool: `{r['threshold']}`\n",
                  "| method | within seen | within unseen | cross seen | cross unseen | off-pool = base | "
                  "off-pool with any adapter | seen inputs flagged off-pool |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in r["variants"]:
            method, fb = key.split("|")
            off = r["offpool"].get(key, {})
            flagged = _flag_rate(units)
            lines.append(
                f"| {label(method, fb == '1')} | {fmt(average(units, 'within', key, 'seen'))} | "
                f"{fmt(average(units, 'within', key, 'unseen'))} | {fmt(average(units, 'cross', key, 'seen'))} | "
                f"{fmt(average(units, 'cross', key, 'unseen'))} | {fmt(off.get('same_as_base'), 2)} | "
                f"{fmt(off.get('any_adapter'), 2)} | {fmt(flagged, 3) if fb == '1' else ''} |")
        lines.append("")
        within = units.get(("within", "all"))
        if within:
            unseen = [t for t in next(iter(within.values()))["per_task"] if t not in _seen_tasks(r)]
            lines += ["Within-cluster unseen tasks, exact match per task:\n",
                      "| method | " + " | ".join(unseen) + " |", "|---" * (len(unseen) + 1) + "|"]
            for key in r["variants"]:
                method, fb = key.split("|")
                lines.append(f"| {label(method, fb == '1')} | "
                             + " | ".join(fmt(within[key]["per_task"][t], 2) for t in unseen) + " |")
            lines.append("")
        folds = sorted(f for s, f in units if s == "cross")
        if folds:
            lines += ["Cross-cluster unseen tasks, exact match per left-out cluster (the rest of the pool "
                      "registered):\n", "| method | " + " | ".join(folds) + " |", "|---" * (len(folds) + 1) + "|"]
            for key in r["variants"]:
                method, fb = key.split("|")
                lines.append(f"| {label(method, fb == '1')} | "
                             + " | ".join(fmt(units[("cross", f)][key]["unseen"], 2) for f in folds) + " |")
            lines.append("")
        ex = r["offpool"].get("hilora|0", {}).get("examples", [])
        if ex:
            lines += ["Off-pool examples (HiLoRA without fallback; with it, these get the base answer):\n"]
            for e in ex:
                lines.append(f"- {e['request']!r}: base {e['base']!r}; HiLoRA {e['answer']!r} via {e['adapters']}")
            lines.append("")
    if res.get("flan48"):
        f = res["flan48"]
        lines += ["## FLAN-48 dev split (routing only)\n",
                  f"- seen-task inputs sent to the base model: **{f['seen_fallback']:.3f}** of {f['n_seen']} "
                  f"(threshold `{f['threshold']}`)",
                  f"- held-out-cluster inputs (each cluster's inputs against the pool without it) sent to the "
                  f"base model: **{f['held_out_cluster_fallback']:.3f}**", "",
                  "| held-out cluster | inputs | sent to base |", "|---|---|---|"]
        for c, v in f["per_cluster"].items():
            lines.append(f"| {c} | {v['n']} | {v['fallback']:.3f} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _seen_tasks(pool_result: dict) -> list[str]:
    return pool_result.get("within_seen", [])


def _flag_rate(units: dict) -> float | None:
    vals = [u["hilora|1"]["off_pool_seen"] for u in units.values() if "hilora|1" in u]
    return float(np.mean(vals)) if vals else None


def _shown_path(path: Path) -> str:
    """A path as the reports show it: relative to the project when inside it (no machine paths)."""
    full = path.resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else path.name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    ap.add_argument("--limit", type=int, default=10, help="test items per task")
    ap.add_argument("--offset", type=int, default=0,
                    help="first test item of each task (0 for reports; e.g. 50 for a development split)")
    ap.add_argument("--target-rate", type=float, default=None,
                    help="eps calibration's leave-one-out target (default: GaussianFitSettings' own)")
    ap.add_argument("--cross-seen-limit", type=int, default=5, help="items per seen task in cross folds")
    ap.add_argument("--settings", nargs="*", default=["within", "cross"], choices=["within", "cross"],
                    help="harness settings to run (none: off-pool requests only)")
    ap.add_argument("--no-offpool", action="store_true", help="skip the off-pool requests")
    ap.add_argument("--name", default="eval-offpool", help="output file stem in --out")
    ap.add_argument("--methods", nargs="+", default=["base", "oracle", *ROUTED], choices=list(LABELS))
    ap.add_argument("--offpool-file", type=Path, default=OFFPOOL_FILE)
    ap.add_argument("--offpool-tokens", type=int, default=24)
    ap.add_argument("--offpool-limit", type=int, default=None)
    ap.add_argument("--flan48", type=Path, default=None, help="folder with pool_samples.json and dev.jsonl")
    ap.add_argument("--reference-file", type=Path, default=None,
                    help="general requests of the off-pool threshold (default: the set shipped with hilora_core)")
    ap.add_argument("--embedder", default=None,
                    help="sentence embedder (name or folder; default: the offline all-MiniLM-L6-v2); "
                    "e.g. hkunlp/instructor-base, the paper's")
    ap.add_argument("--batch-size", type=int, default=32)
    args = parse_report_args(ap, argv)
    t0 = time.perf_counter()
    embedder = SentenceEmbedder(args.embedder)
    reference = embedder.encode(load_reference_requests(args.reference_file))
    offpool = load_reference_requests(args.offpool_file)[: args.offpool_limit]
    fit_settings = GaussianFitSettings(**({} if args.target_rate is None else {"target_rate": args.target_rate}))
    lm = RoutedLM.from_pretrained(None, max_slots=slots_for(*(POOLS[p] for p in args.pools)))
    gen = Generator(lm, args.batch_size)
    res = {"command": command_line("eval_offpool", argv),
           "pools": {}, "n_offpool": len(offpool), "offpool_tokens": args.offpool_tokens,
           "offpool_file": _shown_path(args.offpool_file), "embedder": args.embedder or DEFAULT_EMBEDDER}
    for pool in args.pools:
        demo = load_pool(POOLS[pool], args.limit, lm.tokenizer, args.offset)
        for name in demo.names:
            lm.add_adapter(name, str(demo.folders[name]))
        items = [it for t in demo.names for it in demo.items[t]]
        q = embedder.encode([it.inputs for it in items] + offpool)
        query_emb = {(it.task, it.index): q[i] for i, it in enumerate(items)}
        query_emb.update({("offpool", i): q[len(items) + i] for i in range(len(offpool))})
        samples = {t: embedder.encode(demo.samples[t]) for t in demo.names}
        gen.cache.clear()  # adapter names may repeat across pools

        def ctx_for(unit: Unit, demo=demo, samples=samples, query_emb=query_emb) -> Context:
            model: PoolModel = fit_pool([samples[a] for a in unit.pool], fit_settings, reference)
            return Context(lm, demo, unit, model, query_emb)

        units, within_seen = {}, []
        for unit in make_units(demo, args.settings, 0, None, args.cross_seen_limit):
            if unit.setting == "within":
                within_seen = list(unit.seen)
            limit_seen = args.cross_seen_limit if unit.setting == "cross" else None
            units[f"{unit.setting}|{unit.fold}"] = eval_unit(unit, ctx_for(unit), gen, args.methods, limit_seen)
            print(pool, unit.setting, unit.fold, {k: (fmt(v["seen"]), fmt(v["unseen"]))
                                                  for k, v in units[f"{unit.setting}|{unit.fold}"].items()},
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        whole = ctx_for(Unit("all", "all", demo.names, demo.names, []))
        off = {} if args.no_offpool else eval_offpool_requests(offpool, whole, gen, args.methods, args.offpool_tokens)
        print(pool, "offpool", {k: (v["same_as_base"], v["any_adapter"]) for k, v in off.items()}, flush=True)
        res["pools"][pool] = {"units": units, "offpool": off, "threshold": whole.model.off_pool.to_dict(),
                              "within_seen": within_seen,
                              "variants": [f"{m}|{int(fb)}" for m, fb in variants(args.methods)]}
    if args.flan48 is not None:
        res["flan48"] = flan48_rates(args.flan48, embedder, reference)
        print("flan48", {k: v for k, v in res["flan48"].items() if k != "per_cluster"}, flush=True)
    res.update(finished=time.strftime("%Y-%m-%d %H:%M"), wall_s=time.perf_counter() - t0,
               threads=torch.get_num_threads(), generated=gen.generated)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    write_report(args.out / f"{args.name}.md", res)
    print((args.out / f"{args.name}.md").read_text())
    return res


if __name__ == "__main__":
    main()
