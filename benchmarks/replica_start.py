"""Scorer (registry replica) start-up at 10k and 100k adapters: from the stored fitted pool
against fitting every Gaussian from the samples, in the same run, on the same pool.

For each size: register N synthetic adapters (d = 384, m = 20, ``benchmarks.common.SyntheticPool``)
in a redis-server without persistence (``registry.redis_server``); store pool parameters computed on a
256-adapter subset (what a full fit of a pool this size would store; the full fit itself
is not what is measured); start one scorer process that fits every Gaussian with them and
stores the fitted pool (the first replica). Then start fresh scorer processes, one per path:

- ``samples``: ``store_fit_every=0``, the path before the stored fit: fetch every adapter's
  samples, fit its Gaussian with the stored parameters;
- ``stored fit``: read the fitted pool, replay the changelog since it.

Each child process reports the constructor's wall time (until it can route), the
first routed batch (32 queries), its peak and final resident memory (VmHWM, VmRSS),
and the plans, which must be equal.

    .venv/bin/python benchmarks/replica_start.py --sizes 10000 100000 --json docs/replica-start.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import D, M, SyntheticPool, print_table  # noqa: E402
from hilora_core.models.embedding import EmbedderIdentity  # noqa: E402
from hilora_core.routing.pool import PoolParameters, fit_pool  # noqa: E402
from registry import Registry  # noqa: E402
from registry.config import AdmissionSettings, RegistryConfig, StoreSettings  # noqa: E402
from registry.fitting import IncrementalPoolFit, StoredParameters  # noqa: E402
from registry.redis_server import RedisServer  # noqa: E402

IDENT = EmbedderIdentity("synthetic", None, D, "", True)

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from hilora_core.models.embedding import EmbedderIdentity
from registry.config import RegistryConfig
from registry.scorer import PoolScorer
imported = time.perf_counter() - t0
cfg = RegistryConfig(**json.loads(sys.argv[1]))
z = np.load(sys.argv[2])
t = time.perf_counter()
scorer = PoolScorer(cfg, identity=EmbedderIdentity("synthetic", None, z.shape[1], "", True), follow=False)
start = time.perf_counter() - t
t = time.perf_counter()
decisions = scorer.route_embeddings(z)
route = time.perf_counter() - t
# VmHWM, not ru_maxrss: the latter keeps the forking parent's resident size across exec
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(json.dumps({"import_s": imported, "start_s": start, "first_route_s": route,
                  "max_rss_gib": hwm / 2**20, "rss_gib": rss / 2**20,
                  "status": scorer.status(), "plans": [d.plan.to_dict() for d in decisions]}))
"""


def child(cfg: RegistryConfig, queries: Path) -> dict:
    args = json.dumps(asdict(cfg))
    out = subprocess.run([sys.executable, "-c", CHILD, args, str(queries)], capture_output=True,
                         text=True, timeout=3600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(n: int, tmp: str) -> dict:
    pool = SyntheticPool(n, seed=7)
    server = RedisServer(os.path.join(tmp, f"redis-{n}"), "none", unix_socket=True).start()
    cfg = RegistryConfig(store=StoreSettings(redis_url=server.url, key_prefix=f"start{n}", channel=f"start{n}:events"),
                         admission=AdmissionSettings(hub_lookup=False))
    no_stored_fit = replace(cfg, scorer=replace(cfg.scorer, store_fit_every=0))
    row: dict = {"adapters": n, "samples_per_adapter": M, "dim": D}
    try:
        reg = Registry(no_stored_fit, identity=IDENT)
        t = time.perf_counter()
        for i in range(n):
            reg.register_embeddings(f"a{i:06d}", "owner/repo", pool.samples(i), rank=8, alpha=16,
                                    targets=["q_proj"])
        row["register_s"] = time.perf_counter() - t
        # the pool parameters a full fit stores, computed on a subset (as bench_prefilter.fit_synthetic)
        pick = np.random.default_rng(0).choice(n, size=min(256, n), replace=False)
        params = PoolParameters.of(fit_pool([pool.samples(int(i)) for i in pick], cfg.fit))
        key = IncrementalPoolFit(cfg.fit, cfg.scorer.fallback_eps, cfg.scorer.incremental_fit_min_pool,
                                 cfg.scorer.recalibrate_fraction).key()  # no reference set: synthetic embedder
        reg.store.put_parameters(StoredParameters(reg.epoch(), key, params))
        info = reg.store.client.info("memory")
        row["redis_used_gib_before_fit"] = int(info["used_memory"]) / 2**30
        queries = Path(tmp) / f"q{n}.npy"
        np.save(queries, pool.queries())
        row["writer"] = child(cfg, queries)  # fits every Gaussian, stores the fitted pool
        assert row["writer"]["status"]["fits_stored"] == 1, row["writer"]["status"]
        row["redis_used_gib"] = int(reg.store.client.info("memory")["used_memory"]) / 2**30
        row["samples"] = child(no_stored_fit, queries)
        row["stored_fit"] = child(cfg, queries)
        row["same_plans"] = row["samples"]["plans"] == row["stored_fit"]["plans"] == row["writer"]["plans"]
        for path in ("writer", "samples", "stored_fit"):
            row[path].pop("plans")
        reg.close()
    finally:
        server.kill()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hilora-start-") as tmp:
        for n in args.sizes:
            rows.append(run(n, tmp))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print()
    cells = []
    for r in rows:
        a, b = r["samples"], r["stored_fit"]
        cells.append([r["adapters"], f"{a['start_s']:.1f} s", f"{b['start_s']:.1f} s",
                      f"{a['start_s'] / b['start_s']:.1f}x", f"{a['max_rss_gib']:.2f} / {a['rss_gib']:.2f} GiB",
                      f"{b['max_rss_gib']:.2f} / {b['rss_gib']:.2f} GiB", f"{1e3 * b['first_route_s']:.0f} ms",
                      r["same_plans"], f"{r['redis_used_gib']:.2f} GiB"])
    print_table(["adapters", "start from samples", "start from stored fit", "speed-up",
                 "peak / after-start RSS, samples", "peak / after-start RSS, stored fit", "first route (stored fit)",
                 "same plans", "Redis memory"], cells)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
