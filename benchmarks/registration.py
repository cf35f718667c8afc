"""Registration at scale: N adapters through the admin API and through ``hilora registry import``, in one run.

    .venv/bin/python -m benchmarks.make_pool var/pool1000 --n 1000
    .venv/bin/python -m benchmarks.registration var/pool1000 --n 1000 --md docs/registration.md

Phase 1, the service (embedded base, its own Redis, no seed pool): ``--batch`` adapters per
``POST /admin/adapters/batch`` call, ``--concurrency`` calls at a time, every adapter with all its sample
texts. Timed from the first call until ``--confirm`` readiness answers in a row report all N adapters
(each answer comes from one registry replica; with R replicas the chance that one was never asked is
R * (1 - 1/R) ** confirm), then a routed request per sampled adapter on one of its own samples
(``/v1/route``, its own adapter among the candidates: the pool routes, not only counts). Then, in this
process: Redis memory (``INFO memory``) and one full fit of the pool from its stored embeddings, as a
registry replica does when a recalibration comes due (eps calibrated by leave-one-out, whitening).

Phase 2, the CLI (the service stopped): ``python -m registry.cli registry import`` of the same
manifest into a fresh Redis, timed end to end (process start, embedder load, every registration).

Phase 0, the floor: the embedder alone in this process (the default embedder, every CPU) encodes
``--calibrate`` of the texts, spread over the pool, in one call; times the texts' count, that is the least
any registration path can take on this host, so both paths are also given as a ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import ADMIN_TOKEN, command_line, launch_service, service_env, table_head, table_row, write_lines


def _body(e: dict, pool: Path) -> dict:
    return {"id": e["model_name"], "source": str((pool / e["adapter"]).resolve()),
            "samples": [s["inputs"] for s in e["sample"]], "tags": [e["cluster"]]}


async def _register(url: str, entries: list[dict], pool: Path, batch: int, concurrency: int) -> list[float]:
    """POST every entry in calls of ``batch``, ``concurrency`` at a time; each call's seconds."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1800,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        async def one(chunk: list[dict]) -> float:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/admin/adapters/batch", json={"adapters": [_body(e, pool) for e in chunk]})
                if r.status_code != 201:
                    raise SystemExit(f"batch registration answered {r.status_code}: {r.text[:300]}")
                return time.perf_counter() - t0

        return list(await asyncio.gather(*(one(entries[i: i + batch]) for i in range(0, len(entries), batch))))


def _confirmed(url: str, n: int, confirm: int, timeout: float) -> float:
    """Seconds until ``confirm`` readiness answers in a row report ``n`` adapters."""
    t0, streak = time.perf_counter(), 0
    while time.perf_counter() - t0 < timeout:
        status = httpx.get(f"{url}/readyz", timeout=30).json()["registry"]
        streak = streak + 1 if int(status.get("adapters", -1)) >= n else 0
        if streak >= confirm:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise SystemExit(f"the registry did not report {n} adapters {confirm} times in a row within {timeout} s")


def _routes_to_own(url: str, entries: list[dict], k: int, rng: np.random.Generator) -> float:
    """Share of ``k`` sampled adapters whose own sample text is routed with the adapter among the candidates."""
    picks = rng.choice(len(entries), size=min(k, len(entries)), replace=False)
    hits = 0
    for i in picks:
        e = entries[int(i)]
        r = httpx.post(f"{url}/v1/route", json={"input": e["sample"][0]["inputs"]}, timeout=60)
        r.raise_for_status()
        hits += e["model_name"] in r.json()["data"][0]["candidates"]
    return hits / len(picks)


def _redis_and_fit(data_dir: str) -> tuple[float, float, int]:
    """(Redis used memory MiB, seconds of one full fit of the stored pool, adapters fitted)."""
    from registry import Registry, RegistryConfig, StoreSettings
    from registry.fitting import fit_registry_pool

    cfg = RegistryConfig(store=StoreSettings(embedded_dir=data_dir))
    reg = Registry(cfg)
    used = int(reg.store.client.info("memory")["used_memory"]) / 2**20
    samples = [reg.get_with_embeddings(r.id).embeddings for r in reg.list_all()]
    t0 = time.perf_counter()
    fit_registry_pool(samples, cfg.fit, cfg.scorer.fallback_eps)
    return used, time.perf_counter() - t0, len(samples)


def _embedding_floor(entries: list[dict], n: int) -> tuple[float, int]:
    """(seconds per text, texts timed): the default embedder encoding ``n`` of the texts in one call, here."""
    from hilora_core.models.embedding import SentenceEmbedder

    texts = [s["inputs"] for e in entries for s in e["sample"]]
    picked = texts[:: max(1, len(texts) // n)][:n]
    embedder = SentenceEmbedder()
    embedder.encode(picked[:64])  # first-call set-up
    t0 = time.perf_counter()
    embedder.encode(picked)
    return (time.perf_counter() - t0) / len(picked), len(picked)


def _cli_import(pool: Path, entries: list[dict], data_dir: str) -> tuple[float, dict]:
    """Seconds of ``registry import`` of ``entries`` into a fresh Redis, and its report's counts."""
    from registry.redis_server import RedisServer

    manifest = Path(data_dir) / "manifest.json"
    manifest.write_text(json.dumps(entries))
    server = RedisServer(Path(data_dir) / "cli-redis", persistence="none").start()
    try:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "registry.cli", "registry", "import", str(manifest),
                              "--source-pattern", str((pool / "adapters").resolve()) + "/{model_name}",
                              "--offline", "--redis-url", server.url], capture_output=True, text=True, timeout=3600)
        seconds = time.perf_counter() - t0
    finally:
        server.stop()
    if out.returncode != 0:
        raise SystemExit(f"registry import failed: {out.stderr[-2000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, {"registered": len(report["registered"]), "total": report["total"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pool", type=Path, help="a pool written by benchmarks.make_pool")
    ap.add_argument("--n", type=int, default=1000, help="adapters to register")
    ap.add_argument("--batch", type=int, default=100, help="adapters per admin call")
    ap.add_argument("--concurrency", type=int, default=2, help="admin calls at once")
    ap.add_argument("--confirm", type=int, default=10, help="readiness answers in a row that must report N")
    ap.add_argument("--route-checks", type=int, default=20, help="adapters routed on their own sample afterwards")
    ap.add_argument("--calibrate", type=int, default=2000, help="texts the embedder encodes alone (phase 0)")
    ap.add_argument("--skip-cli", action="store_true", help="leave out phase 2 (hilora registry import)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="every number as JSON")
    ap.add_argument("--md", type=Path, help="the table as markdown")
    args = ap.parse_args(argv)
    entries = json.loads((args.pool / "manifest.json").read_text())[: args.n]
    if len(entries) < args.n:
        raise SystemExit(f"the pool has {len(entries)} adapters; --n asks for {args.n}")
    texts = sum(len(e["sample"]) for e in entries)
    os.environ["HILORA_ADMIN_TOKEN"] = ADMIN_TOKEN
    service_env(HILORA_ADMIN_TOKEN=ADMIN_TOKEN)
    report: dict = {"command": command_line("registration", argv), "n": args.n, "texts": texts}
    per_text, timed = _embedding_floor(entries, args.calibrate)
    floor = per_text * texts
    report["embedding_floor"] = {"s_per_text": per_text, "texts_timed": timed, "floor_s": floor}
    print(f"embedder alone: {per_text * 1000:.2f} ms per text ({timed} timed): {floor:.1f} s for {texts}", flush=True)
    with tempfile.TemporaryDirectory() as data:
        url, stop = launch_service(data, seed_manifest=None, adapter_dirs=[str(args.pool)])
        try:
            t0 = time.perf_counter()
            calls = _register(url, entries, args.pool, args.batch, args.concurrency)
            call_s = asyncio.run(calls)
            answered = time.perf_counter() - t0
            confirmed = _confirmed(url, args.n, args.confirm, args.timeout)
            report["api"] = {"calls_s": call_s, "answered_s": answered, "routable_s": answered + confirmed,
                             "own_in_candidates": _routes_to_own(url, entries, args.route_checks,
                                                                 np.random.default_rng(args.seed))}
            print(f"admin API: {args.n} adapters answered in {answered:.1f} s, routable at "
                  f"{answered + confirmed:.1f} s", flush=True)
        finally:
            stop_data = data
            redis_mib, fit_s, fitted = _redis_and_fit(stop_data)
            stop()
        report["redis_used_mib"], report["full_fit_s"], report["fitted"] = redis_mib, fit_s, fitted
        if not args.skip_cli:
            cli_s, counts = _cli_import(args.pool, entries, data)
            report["cli"] = {"seconds": cli_s, **counts}
            print(f"registry import: {counts['registered']} adapters in {cli_s:.1f} s", flush=True)
    api = report["api"]
    lines = [f"`{report['command']}`", "",
             *table_head(["path", "adapters", "texts", "seconds until routable", "texts/s", "x embedding alone",
                          "notes"], "lrrrrr"),
             table_row(["embedding alone (floor)", args.n, texts, f"{floor:.1f}", f"{texts / floor:.0f}", "1.00",
                        f"the default embedder in one process, every CPU: {per_text * 1000:.2f} ms per text over "
                        f"{timed} of the texts, times {texts}"]),
             table_row(["admin API, batch", args.n, texts, f"{api['routable_s']:.1f}",
                        f"{texts / api['routable_s']:.0f}", f"{api['routable_s'] / floor:.2f}",
                        f"{args.batch} per call, {args.concurrency} at a time; calls answered after "
                        f"{api['answered_s']:.1f} s; call p50 {np.median(api['calls_s']):.1f} s; own adapter among "
                        f"the candidates for {api['own_in_candidates']:.2f} of {args.route_checks} sampled"])]
    if "cli" in report:
        cli_s = report["cli"]["seconds"]
        lines.append(table_row(["hilora registry import", report["cli"]["registered"], texts, f"{cli_s:.1f}",
                                f"{texts / cli_s:.0f}", f"{cli_s / floor:.2f}",
                                "one process: start, embedder load, every registration; the service stopped"]))
    lines += ["", f"- Redis used memory after registration: {report['redis_used_mib']:.1f} MiB "
                  f"({report['redis_used_mib'] * 1024 / args.n:.1f} KiB per adapter)",
              f"- one full fit of the {report['fitted']} stored adapters (eps calibration, whitening), in this "
              f"process: {report['full_fit_s']:.1f} s"]
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.md:
        write_lines(args.md, lines)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
