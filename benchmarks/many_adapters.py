"""Many adapters through the service (HTTP), in one run: pools of N = 12, 100, 1,000 under Zipf(1) traffic.

    .venv/bin/python -m benchmarks.make_pool var/pool1000 --n 1000
    .venv/bin/python -m benchmarks.many_adapters var/pool1000 --sizes 12 100 1000 \\
        --out docs/many-adapters.json --md docs/many-adapters.md

One service (embedded base, its own Redis, no seed pool) with device adapter memory and a host cache
smaller than the 1,000-adapter pool. The pool is registered over the admin API (``--register-concurrency``
at a time) up to each N, timed until the registry reports it routable; then, for each N, explicit
requests (``model: <adapter>``) and routed ones (``model: hilora``, the adapter's own sample texts) with
Zipf(alpha) popularity over the N adapters, ``--concurrency`` streaming clients, ``--max-tokens`` tokens each
(``ignore_eos``). Per run: req/s, tok/s, TTFT p50 / p99, adapter reads and placements per second, hit
rates of the device and host tiers, read latency p50 / p99 (loader histogram buckets: upper bounds), the
loop thread's share of wall time spent placing adapters (host to device copies; it never reads), the
admission passes that waited on a read, and the model replica's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import (
    ADMIN_TOKEN,
    command_line,
    fmt,
    launch_service,
    register_adapters,
    replica_rss_mib,
    run_requests,
    scrape,
    service_env,
    table_head,
    table_row,
    wait_routable,
)


def cache(snap: dict, tier: str, event: str) -> float:
    return snap.get(("hilora_adapter_cache_events", tier, event), 0.0)


def loop_value(snap: dict, quantity: str) -> float:
    return snap.get(("hilora_generation_loop", "", quantity), 0.0)


def read_quantiles(before: dict, after: dict, qs=(0.5, 0.99)) -> list[float | None]:
    """Read-latency quantiles (bucket upper bounds, seconds) of the reads between two scrapes."""
    bounds = sorted({float(k[2][len("read_le_"):]) for k in after
                     if k[:2] == ("hilora_adapter_cache_events", "loader") and k[2].startswith("read_le_")})
    cum = [cache(after, "loader", f"read_le_{b:g}") - cache(before, "loader", f"read_le_{b:g}") for b in bounds]
    total = cache(after, "loader", "reads") - cache(before, "loader", "reads")
    out: list[float | None] = []
    for q in qs:
        if total <= 0:
            out.append(None)
            continue
        out.append(next((b for b, c in zip(bounds, cum, strict=True) if c >= q * total), float("inf")))
    return out


def pool_ms(url: str, calls: int = 7) -> float:
    """Median milliseconds of ``GET /v1/pool`` (the playground's first page, every map point)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        httpx.get(f"{url}/v1/pool", timeout=60).raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def zipf_jobs(entries: list[dict], n_requests: int, alpha: float, mode: str,
              rng: np.random.Generator) -> tuple[list[tuple[str, str]], int]:
    """(model, text) jobs with Zipf(alpha) popularity over ``entries``; the distinct adapters drawn."""
    weights = 1.0 / np.arange(1, len(entries) + 1) ** alpha
    picks = rng.choice(len(entries), size=n_requests, p=weights / weights.sum())
    jobs = []
    for i in picks:
        e = entries[int(i)]
        text = e["sample"][int(rng.integers(len(e["sample"])))]["inputs"]
        jobs.append((e["model_name"] if mode == "explicit" else "hilora", text))
    return jobs, len(set(picks.tolist()))


def measure(url: str, entries: list[dict], mode: str, args, rng: np.random.Generator) -> dict:
    jobs, distinct = zipf_jobs(entries, args.requests, args.alpha, mode, rng)
    before = scrape(url)
    res = asyncio.run(run_requests(url, jobs, args.concurrency, args.max_tokens, args.timeout, stream=True,
                                   ignore_eos=True))
    after = scrape(url)
    wall = res["wall_s"]

    def diff(tier: str, event: str) -> float:
        return cache(after, tier, event) - cache(before, tier, event)

    def rate(tier: str) -> float | None:
        hits, misses = diff(tier, "hits"), diff(tier, "misses")
        return hits / (hits + misses) if hits + misses else None

    p50, p99 = read_quantiles(before, after)
    return {**res, "mode": mode, "n": len(entries), "distinct": distinct,
            "reads_per_s": diff("loader", "reads") / wall, "placements_per_s": diff("device", "misses") / wall,
            "device_hit": rate("device"), "host_hit": rate("host"), "read_p50_s": p50, "read_p99_s": p99,
            "place_share": (loop_value(after, "place_seconds") - loop_value(before, "place_seconds")) / wall,
            "load_waits": loop_value(after, "load_waits") - loop_value(before, "load_waits"),
            "capacity_waits": loop_value(after, "capacity_waits") - loop_value(before, "capacity_waits"),
            "rss_mib": replica_rss_mib()}


COLUMNS = ["N", "mode", "distinct", "errors", "req/s", "tok/s", "TTFT p50 s", "TTFT p99 s", "reads/s",
           "placements/s", "device hit", "host hit", "read p50 s", "read p99 s", "placing share", "read waits",
           "memory waits", "RSS MiB"]


def row(r: dict) -> list:
    return [r["n"], r["mode"] + (", again" if r.get("again") else ""), r["distinct"], r["errors"],
            fmt(r["req_per_s"]), fmt(r["tok_per_s"], 1),
            fmt(r["ttft_p50"]), fmt(r["ttft_p99"]), fmt(r["reads_per_s"], 2), fmt(r["placements_per_s"], 2),
            fmt(r["device_hit"]), fmt(r["host_hit"]), fmt(r["read_p50_s"]), fmt(r["read_p99_s"]),
            fmt(r["place_share"]), int(r["load_waits"]), int(r["capacity_waits"]),
            fmt(r["rss_mib"], 0)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pool", type=Path, help="a pool written by benchmarks.make_pool")
    ap.add_argument("--sizes", type=int, nargs="+", default=[12, 100, 1000])
    ap.add_argument("--requests", type=int, default=192, help="requests per run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    ap.add_argument("--adapter-memory-mib", type=int, default=256, help="device adapter memory budget")
    ap.add_argument("--host-cache-mib", type=int, default=1024, help="host cache budget")
    ap.add_argument("--register-concurrency", type=int, default=8, help="admin calls at once")
    ap.add_argument("--register-batch", type=int, default=0,
                    help="adapters per POST /admin/adapters/batch call (0: one POST /admin/adapters per adapter)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--again", action="store_true",
                    help="after the largest N, repeat the smallest N's explicit run (the same requests): the host's "
                         "speed drifts over a run, so explicit ratios are taken against the mean of both")
    ap.add_argument("--out", type=Path, help="every number as JSON")
    ap.add_argument("--md", type=Path, help="the tables as markdown")
    args = ap.parse_args(argv)
    entries = json.loads((args.pool / "manifest.json").read_text())
    if max(args.sizes) > len(entries):
        raise SystemExit(f"the pool has {len(entries)} adapters; sizes ask for {max(args.sizes)}")
    os.environ["HILORA_ADMIN_TOKEN"] = ADMIN_TOKEN
    service_env(HILORA_ADMIN_TOKEN=ADMIN_TOKEN)
    rng = np.random.default_rng(args.seed)
    engine = {"adapter_memory_bytes": args.adapter_memory_mib << 20, "host_cache_bytes": args.host_cache_mib << 20}
    report: dict = {"command": command_line("many_adapters", argv), "registrations": [], "runs": []}
    with tempfile.TemporaryDirectory() as data:
        url, stop = launch_service(data, model={"engine": engine}, threads=args.threads, seed_manifest=None,
                                   adapter_dirs=[str(args.pool)])
        try:
            done = 0
            for n in sorted(args.sizes):
                seconds, errors = register_adapters(url, entries[done:n], args.pool, args.register_concurrency,
                                           args.register_batch)
                if errors:
                    raise SystemExit(f"{errors} registrations failed")
                routable = wait_routable(url, n)
                report["registrations"].append({"from": done, "to": n, "seconds": seconds, "errors": errors,
                                                "then_routable_s": routable, "pool_ms": pool_ms(url)})
                print(f"registered {done}..{n}: {seconds:.1f} s ({errors} errors), routable {routable:.1f} s later",
                      flush=True)
                done = n
                for mode in ("explicit", "routed"):
                    r = measure(url, entries[:n], mode, args, rng)
                    report["runs"].append(r)
                    print(table_row(row(r)), flush=True)
            if args.again:  # a fresh generator with the seed draws the first run's requests again
                r = measure(url, entries[:min(args.sizes)], "explicit", args, np.random.default_rng(args.seed))
                report["runs"].append({**r, "again": True})
                print(table_row(row(r)), flush=True)
        finally:
            stop()
    lines = [f"`{report['command']}`", "", *table_head(COLUMNS), *(table_row(row(r)) for r in report["runs"]), ""]
    small = min(args.sizes)
    for mode in ("explicit", "routed"):
        bases = [r for r in report["runs"] if r["n"] == small and r["mode"] == mode]
        tok = float(np.mean([b["tok_per_s"] for b in bases]))
        ttft = float(np.mean([b["ttft_p50"] for b in bases]))
        each = ", ".join(fmt(b["tok_per_s"], 1) for b in bases)
        label = f"N={small}" + (f" (mean of {len(bases)} runs: {each} tok/s)" if len(bases) > 1 else "")
        for r in report["runs"]:
            if r["mode"] == mode and r["n"] != small:
                lines.append(f"- N={r['n']} {mode}: tok/s {r['tok_per_s'] / tok:.2f}x, TTFT p50 "
                             f"{r['ttft_p50'] / ttft:.2f}x of {label}")
    lines += ["", "| registered | seconds | errors | then routable (s) | GET /v1/pool (ms, median) |",
              "|---|---|---|---|---|"]
    lines += [f"| {g['from']}..{g['to']} | {g['seconds']:.1f} | {g['errors']} | {g['then_routable_s']:.1f} | "
              f"{g['pool_ms']:.0f} |" for g in report["registrations"]]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
