"""FAISS prefilter vs exact Gaussian scoring: latency of routing a batch, recall of the exact
candidate set, memory per adapter; plus registration / start-up through Redis.

Synthetic pools (d = 384, m = 20) are clustered like sentence embeddings: unit-norm
samples; clusters of ~20 adapters around random unit centres; within an adapter, a
16-direction decaying spread plus isotropic noise, smaller than the distance between
clusters. Queries: 24 fresh samples of random adapters ("seen") + 8 points near a
cluster centre but off every adapter ("unseen", wide candidate sets).

    .venv/bin/python benchmarks/bench_prefilter.py --sizes 1000 10000 100000 \\
        --flan ../shared/data/flan48/pool_samples.json --flan-dev ../shared/data/flan48/dev.jsonl \\
        --redis-size 10000

Routing runs single-threaded (BLAS and FAISS), the setting a busy 2-core host needs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import D, M, SyntheticPool  # noqa: E402
from hilora_core.policies import PolicyConfig  # noqa: E402
from hilora_core.routing.gaussian import FactoredGaussian, GaussianBank, fit_gaussian  # noqa: E402
from hilora_core.routing.pool import GaussianFitSettings, PoolModel, fit_pool  # noqa: E402
from hilora_core.routing.sequence_routing import select_candidates  # noqa: E402
from registry.config import AdmissionSettings, RegistryConfig, StoreSettings  # noqa: E402
from registry.prefilter import MeanIndex, prefilter_scores  # noqa: E402
from registry.routing import PoolSnapshot, route_on_snapshot, single_blas_thread  # noqa: E402


def fit_synthetic(pool: SyntheticPool, settings: GaussianFitSettings) -> PoolModel:
    """Fit like the registry's scorer does for a large pool: a full fit (eps calibration,
    standardising scale, whitening) on up to 256 adapters, then every adapter fitted alone in
    that space with that eps (bounded memory: samples are generated one adapter at a time)."""
    pick = np.random.default_rng(0).choice(pool.n, size=min(256, pool.n), replace=False)
    base = fit_pool([pool.samples(int(i)) for i in pick], settings)
    gaussians, means = [], np.empty((pool.n, D), dtype=np.float64)
    for i in range(pool.n):
        z = pool.samples(i)
        g = fit_gaussian(base.transform(z), base.eps)
        gaussians.append(FactoredGaussian(g.mean.astype(np.float32), g.basis.astype(np.float32), g.variances,
                                          base.eps, g.n_samples))
        means[i] = z.mean(axis=0)
    bank = GaussianBank(gaussians, dtype=np.float32)
    del gaussians
    return PoolModel(bank=bank, means=means, eps=base.eps, whitener=base.whitener, calibration=base.calibration,
                     scale=base.scale)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time (ms) over ``repeats`` runs after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def measure(name: str, model: PoolModel, z: np.ndarray, config: RegistryConfig, repeats: int) -> dict:
    n = len(model.bank)
    ids = tuple(f"a{i:06d}" for i in range(n))
    ranks = np.full(n, 8, dtype=np.int64)
    t = time.perf_counter()
    slots = np.arange(n, dtype=np.int64)
    pf = config.prefilter
    index = MeanIndex.build(model.bank.means, slots, pf.index, pf.nprobe, pf.gpu)
    build_s = time.perf_counter() - t
    snap = PoolSnapshot(0, ids, ranks, {}, model, index, slots)
    policy = PolicyConfig()
    exact_ms, exact = timed(lambda: route_on_snapshot(snap, z, policy, config, use_prefilter=False), repeats)
    pref_ms, pref = timed(lambda: route_on_snapshot(snap, z, policy, config, use_prefilter=True), repeats)

    def score_exact():
        scores = model.score(z)
        return [select_candidates(row) for row in scores]

    def score_prefiltered():
        lists = prefilter_scores(model, index, slots, z, pf.k, pf.max_k, pf.tail, pf.factor)
        return [sl.indices[select_candidates(sl.scores)] for sl in lists]

    with single_blas_thread():
        exact_score_ms, _ = timed(score_exact, repeats)
        pref_score_ms, _ = timed(score_prefiltered, repeats)
    recalls = [len(set(p.candidates) & set(e.candidates)) / len(e.candidates) for p, e in zip(pref, exact, strict=True)]
    same_plan = np.mean([p.plan.adapters == e.plan.adapters and p.plan.rocs == e.plan.rocs
                         for p, e in zip(pref, exact, strict=True)])
    return {
        "pool": name, "adapters": n, "exact_score_ms": exact_score_ms, "prefilter_score_ms": pref_score_ms,
        "exact_ms": exact_ms, "prefilter_ms": pref_ms,
        "speedup": exact_ms / pref_ms, "recall": float(np.mean(recalls)), "min_recall": float(np.min(recalls)),
        "same_plan": float(same_plan), "mean_C": float(np.mean([len(e.candidates) for e in exact])),
        "mean_shortlist": float(np.mean([p.shortlist_size for p in pref])),
        "bank_bytes_per_adapter": model.bank.nbytes / n, "index_bytes_per_adapter": index.nbytes / n,
        "index_build_s": build_s, "index": f"{index.kind}{'-gpu' if index.on_gpu else ''}", "eps": model.eps,
    }


def flan_model(pool_path: str, dev_path: str | None, settings: GaussianFitSettings, n_queries: int):
    import torch

    from hilora_core.manifest import read_manifest
    from hilora_core.models.embedding import SentenceEmbedder

    torch.set_num_threads(1)
    pool = read_manifest(pool_path)
    emb = SentenceEmbedder()
    sets = [emb.encode(a.samples) for a in pool]
    model = fit_pool(sets, settings)
    rng = np.random.default_rng(0)
    if dev_path:
        with open(dev_path) as fh:
            dev = [json.loads(line)["inputs"] for line in fh if line.strip()]
        texts = [dev[i] for i in rng.choice(len(dev), n_queries, replace=False)]
    else:
        texts = [pool[i % len(pool)].samples[-1] for i in range(n_queries)]
    return model, emb.encode(texts)


def redis_round_trip(n: int, config: RegistryConfig) -> dict:
    """Register n synthetic adapters through an embedded Redis, start a scorer, add one more."""
    from hilora_core.models.embedding import EmbedderIdentity
    from registry import EmbeddedRedis, PoolScorer, Registry

    pool = SyntheticPool(n, seed=7)
    ident = EmbedderIdentity("synthetic", None, D, "", True)
    with tempfile.TemporaryDirectory(prefix="hilora-bench-") as tmp:
        server = EmbeddedRedis(os.path.join(tmp, "redis"))
        cfg = replace(config, store=StoreSettings(redis_url=server.ensure_running()),
                      admission=AdmissionSettings(hub_lookup=False))
        try:
            reg = Registry(cfg, identity=ident)
            sets = [pool.samples(i) for i in range(n)]
            t = time.perf_counter()
            for i, z in enumerate(sets):
                reg.register_embeddings(f"a{i:06d}", "owner/repo", z, rank=8, alpha=16, targets=["q_proj"])
            register_s = time.perf_counter() - t
            used = int(reg.store.client.info("memory")["used_memory"])
            t = time.perf_counter()
            scorer = PoolScorer(cfg, identity=ident)
            start_s = time.perf_counter() - t
            extra = SyntheticPool(1, seed=99).samples(0)
            t = time.perf_counter()
            reg.register_embeddings("zz-extra", "owner/repo", extra, rank=8, alpha=16, targets=["q_proj"])
            while "zz-extra" not in scorer.snapshot.ids and time.perf_counter() - t < 60:
                time.sleep(0.005)
            follow_s = time.perf_counter() - t
            status = scorer.status()
            scorer.close()
            reg.close()
        finally:
            server.stop()
    return {"adapters": n, "register_s": register_s, "per_adapter_ms": 1e3 * register_s / n,
            "redis_bytes_per_adapter": used / n, "scorer_start_s": start_s, "one_more_visible_s": follow_s,
            "incremental_fits": status["incremental_fits"], "prefilter": status["prefilter"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--flan", help="pool_samples.json of FLAN-48 (embedded with MiniLM)")
    ap.add_argument("--flan-dev", help="dev.jsonl: FLAN queries (default: pool samples)")
    ap.add_argument("--redis-size", type=int, default=0, help="also time registration through Redis for this many")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, help="initial shortlist size (default: PrefilterSettings.k)")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)
    config = RegistryConfig()
    if args.k:
        config = replace(config, prefilter=replace(config.prefilter, k=args.k))
    settings = config.fit
    rows = []
    if args.flan:
        model, z = flan_model(args.flan, args.flan_dev, settings, args.batch)
        small = replace(config, prefilter=replace(config.prefilter, k=8, index="flat"))  # force the shortlist
        rows.append(measure("FLAN-48 (MiniLM)", model, z, small, args.repeats))
        print(json.dumps(rows[-1]), file=sys.stderr)
    for n in args.sizes:
        pool = SyntheticPool(n)
        t = time.perf_counter()
        model = fit_synthetic(pool, settings)
        fit_s = time.perf_counter() - t
        z = pool.queries(n_seen=args.batch * 3 // 4, n_unseen=args.batch - args.batch * 3 // 4)
        row = measure(f"synthetic {n // 1000}k", model, z, config, args.repeats)
        row["fit_s"] = fit_s
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del model
    print(f"\nBatch of {args.batch} queries, HiLoRA policy; times are medians of {args.repeats} runs, "
          f"single-threaded; prefilter: {config.prefilter.index} (nprobe {config.prefilter.nprobe}), "
          f"k={config.prefilter.k} growing to <= {config.prefilter.max_k}.\n")
    print("| pool | adapters | score+C exact ms | score+C prefiltered ms | route exact ms | route prefiltered ms "
          "| speed-up (route) | recall of exact C (min) | same plan | mean abs C | mean shortlist | bank B/adapter "
          "| index B/adapter | 4d(m+1) B | index |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pool']} | {r['adapters']} | {r['exact_score_ms']:.1f} | {r['prefilter_score_ms']:.1f} | "
              f"{r['exact_ms']:.1f} | {r['prefilter_ms']:.1f} | "
              f"{r['speedup']:.1f}x | {r['recall']:.4f} ({r['min_recall']:.2f}) | {r['same_plan']:.2f} | "
              f"{r['mean_C']:.1f} | {r['mean_shortlist']:.0f} | {r['bank_bytes_per_adapter']:.0f} | "
              f"{r['index_bytes_per_adapter']:.0f} | {4 * D * (M + 1)} | {r['index']} |")
    if args.redis_size:
        rr = redis_round_trip(args.redis_size, config)
        print(json.dumps(rr), file=sys.stderr)
        print("\n| through Redis | register all | per adapter | Redis bytes/adapter | scorer start-up "
              "| one more adapter visible in scorer | incremental fits |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {rr['adapters']} adapters | {rr['register_s']:.1f} s | {rr['per_adapter_ms']:.2f} ms | "
              f"{rr['redis_bytes_per_adapter']:.0f} | {rr['scorer_start_s']:.1f} s | "
              f"{rr['one_more_visible_s'] * 1e3:.0f} ms | {rr['incremental_fits']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
