"""A soak: Zipf traffic through the service for a while, with adapters registered and deleted and the model
replica restarted during it.

    .venv/bin/python -m benchmarks.make_pool var/pool1000 --n 1000
    .venv/bin/python -m benchmarks.soak var/pool1000 --minutes 20 --md docs/soak.md

``--pool-size`` adapters are registered first; then ``--clients`` closed-loop clients send streamed chat
requests (explicit to a Zipf(1) adapter of those registered, one in four routed with ``model: hilora``).
Between 10 % and 60 % of the run, ``--churn`` new adapters are registered and as many from the Zipf tail are
deleted, in ten rounds; at 50 % the model replica's actor is killed (Serve starts a new one). A client retries
a request that got 503 or lost its connection, as OpenAI clients do, for up to 120 s; a request counts as failed
only if it never succeeded, apart from explicit requests for deleted adapters, which must get 404.
Warm-up: before the clock starts, and again on the new replica after the kill, one request per adapter, so
that every tier has filled (the host cache holds fewer adapters than the pool). Checked at the end: no failed
request, every adapter that should be registered is, and the replica's RSS does not grow after warm-up by more
than 10 %: for each replica's life (the first until the kill, the new one from the end of its warm-up), its
largest RSS against its first sample. Beside RSS, the series gives what the replicas report holding (summed
over the replicas the ingress has heard from): KV memory, device adapter rows allocated, host cache bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import (
    ADMIN_TOKEN,
    command_line,
    launch_service,
    register_adapters,
    replica_rss_mib,
    scrape,
    service_env,
    wait_routable,
)

RETRY_S = 120


async def one_request(client: httpx.AsyncClient, model: str, text: str, deleted: set[str]) -> str:
    """'ok', 'gone' (404 for a deleted adapter) or a failure's description; retries 503 and lost connections."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "stream": True,
            "ignore_eos": True}
    t0 = time.monotonic()
    while True:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and '"error"' in line:
                            raise httpx.RemoteProtocolError("in-band stream error")
                    return "ok"
                if r.status_code == 404 and model in deleted:
                    return "gone"
                if r.status_code != 503:
                    return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        except httpx.HTTPError as err:
            if time.monotonic() - t0 > RETRY_S:
                return f"{type(err).__name__} for {RETRY_S} s"
        if time.monotonic() - t0 > RETRY_S:
            return "503 for 120 s"
        await asyncio.sleep(1.0)


def traffic(url: str, entries: list[dict], live: list[str], deleted: set[str], seconds: float, clients: int,
            log: list[tuple[float, str, str]], seed: int) -> None:
    """Closed-loop clients until ``seconds`` have passed; one (time, model, outcome) per request in ``log``."""
    samples = {e["model_name"]: [s["inputs"] for s in e["sample"]] for e in entries}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            async def worker(k: int) -> None:
                rng = np.random.default_rng(seed + k)
                while time.monotonic() < end:
                    names = list(live)
                    w = 1.0 / np.arange(1, len(names) + 1)
                    name = names[int(rng.choice(len(names), p=w / w.sum()))]
                    text = samples[name][int(rng.integers(len(samples[name])))]
                    model = "hilora" if rng.random() < 0.25 else name
                    log.append((time.monotonic(), model, await one_request(client, model, text, deleted)))
            await asyncio.gather(*(worker(k) for k in range(clients)))

    end = time.monotonic() + seconds
    asyncio.run(run())


def warm_up(url: str, entries: list[dict], names: list[str], deleted: set[str], clients: int) -> dict[str, int]:
    """One explicit request per adapter in ``names`` (``clients`` at a time): every adapter read once, so the
    host cache and the device rows have filled; the outcomes counted."""
    first = {e["model_name"]: e["sample"][0]["inputs"] for e in entries}

    async def run() -> list[str]:
        sem = asyncio.Semaphore(clients)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            async def one(name: str) -> str:
                async with sem:
                    return await one_request(client, name, first[name], deleted)
            return list(await asyncio.gather(*(one(n) for n in names)))

    outcomes: dict[str, int] = {}
    for o in asyncio.run(run()):
        outcomes[o] = outcomes.get(o, 0) + 1
    return outcomes


def kill_model_replica() -> int:
    import ray

    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "LoRAModel" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
            killed += 1
    return killed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pool", type=Path, help="a pool written by benchmarks.make_pool")
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--pool-size", type=int, default=300, help="adapters registered before the traffic")
    ap.add_argument("--churn", type=int, default=100, help="adapters registered, and as many deleted, during it")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--adapter-memory-mib", type=int, default=256)
    ap.add_argument("--host-cache-mib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--md", type=Path, help="the report as markdown")
    args = ap.parse_args(argv)
    entries = json.loads((args.pool / "manifest.json").read_text())
    n0, churn = args.pool_size, args.churn
    if n0 + churn > len(entries) or churn > n0:
        raise SystemExit("the pool is too small for --pool-size + --churn (and --churn <= --pool-size)")
    os.environ["HILORA_ADMIN_TOKEN"] = ADMIN_TOKEN
    service_env(HILORA_ADMIN_TOKEN=ADMIN_TOKEN)
    engine = {"adapter_memory_bytes": args.adapter_memory_mib << 20, "host_cache_bytes": args.host_cache_mib << 20}
    seconds = args.minutes * 60
    log: list[tuple[float, str, str]] = []
    events: list[str] = []
    rss: list[tuple[float, float | None]] = []
    held: list[tuple[float, float, float, float]] = []  # (t, KV, device rows allocated, host cache) MiB
    killed_at = float("inf")
    warmed: list = []  # the new replica's warm-up: (outcomes, seconds into the run when done)
    live = [e["model_name"] for e in entries[:n0]]
    deleted: set[str] = set()
    with tempfile.TemporaryDirectory() as data:
        url, stop = launch_service(data, model={"engine": engine}, threads=args.threads, seed_manifest=None,
                                   adapter_dirs=[str(args.pool)])
        try:
            secs, errors = register_adapters(url, entries[:n0], args.pool, 2, batch=100)
            wait_routable(url, n0)
            events.append(f"registered {n0} adapters in {secs:.0f} s ({errors} errors)")
            w0 = time.monotonic()
            outcomes0 = warm_up(url, entries, list(live), deleted, args.clients)
            events.append(f"warm-up before the clock: every adapter once in {time.monotonic() - w0:.0f} s {outcomes0}")
            t0 = time.monotonic()
            runner = threading.Thread(target=traffic, args=(url, entries, live, deleted, seconds, args.clients,
                                                            log, args.seed))
            runner.start()
            rounds, killed = 10, False
            adds = [entries[n0 + i * churn // rounds: n0 + (i + 1) * churn // rounds] for i in range(rounds)]
            tail = [e["model_name"] for e in entries[n0 - churn: n0]]  # the least popular of the first pool
            dels = [tail[i * churn // rounds: (i + 1) * churn // rounds] for i in range(rounds)]
            done_rounds = 0
            while runner.is_alive():
                elapsed = time.monotonic() - t0
                if not rss or elapsed - rss[-1][0] >= 15:
                    rss.append((elapsed, replica_rss_mib()))
                    held.append((elapsed, *_held_mib(url)))
                if done_rounds < rounds and elapsed >= seconds * (0.1 + 0.05 * done_rounds):
                    _, err = register_adapters(url, adds[done_rounds], args.pool, 1, batch=len(adds[done_rounds]))
                    live.extend(e["model_name"] for e in adds[done_rounds])
                    for name in dels[done_rounds]:
                        deleted.add(name)
                        live.remove(name)
                        r = httpx.delete(f"{url}/admin/adapters/{name}", timeout=60,
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                        err += r.status_code != 200
                    events.append(f"{elapsed:.0f} s: +{len(adds[done_rounds])} -{len(dels[done_rounds])} adapters "
                                  f"({err} errors)")
                    done_rounds += 1
                if not killed and elapsed >= seconds * 0.5:
                    events.append(f"{elapsed:.0f} s: killed {kill_model_replica()} model replica actor(s)")
                    killed, killed_at = True, elapsed
                    rewarm = threading.Thread(target=lambda: (warmed.append(warm_up(
                        url, entries, list(live), deleted, args.clients)), warmed.append(time.monotonic() - t0)))
                    rewarm.start()
                time.sleep(1)
            runner.join()
            if killed:
                rewarm.join()
                events.append(f"new replica warmed up (every live adapter once) by {warmed[1]:.0f} s: {warmed[0]}")
            listed = httpx.get(f"{url}/admin/adapters", params={"limit": 1000}, timeout=60,
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
            registered = {a["id"] for a in listed["adapters"]}
        finally:
            stop()
    expected = set(live)
    outcomes: dict[str, int] = {}
    for _, _, outcome in log:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    failed = sum(n for k, n in outcomes.items() if k not in ("ok", "gone"))
    new_since = warmed[1] if len(warmed) == 2 else killed_at + seconds * 0.2
    lives = [("first replica", 0.0, killed_at), ("new replica", new_since, float("inf"))]
    growths = []
    for label, since, until in lives:
        warm = [m for t, m in rss if m is not None and since <= t < until]
        if len(warm) >= 2:
            growths.append((label, warm[0], max(warm), max(warm) / warm[0] - 1))
    growth = max((g for *_, g in growths), default=float("nan"))
    kept = {round(t): h for t, *h in held}
    lines = [f"`{command_line('soak', argv)}`", "",
             f"{len(log)} requests in {args.minutes:g} min, {args.clients} clients: "
             + ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items())), "",
             f"- failed (never answered, not a 404 for a deleted adapter): **{failed}**",
             f"- adapters registered at the end: {len(registered)}, expected {len(expected)}; missing "
             f"{sorted(expected - registered)[:5]}, unexpected {sorted(registered - expected)[:5]}",
             *(f"- {label}: RSS after warm-up {first:.0f} MiB first, {top:.0f} MiB at most: growth **{g * 100:.1f} %**"
               for label, first, top, g in growths),
             "- events: " + "; ".join(events), "",
             "| t (s) | replica RSS (MiB) | KV (MiB) | adapter rows (MiB) | host cache (MiB) |",
             "|---|---|---|---|---|",
             *(f"| {t:.0f} | {m:.0f} | " + " | ".join(f"{v:.0f}" for v in kept.get(round(t), ())) + " |"
               for t, m in rss if m is not None)]
    print("\n".join(lines))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")
    return 0 if failed == 0 and registered == expected and growth <= 0.10 else 1


def _held_mib(url: str) -> tuple[float, float, float]:
    """(KV memory, device adapter rows allocated, host cache bytes) the model replicas report, MiB (NaN if none)."""
    try:
        m = scrape(url)
    except Exception:  # noqa: BLE001 - a replica restarting: a gap in the series, not a failure
        return (float("nan"),) * 3
    get = lambda key: m.get(key, float("nan")) / 2**20  # noqa: E731
    return (get(("hilora_generation_loop", "", "kv_bytes")),
            get(("hilora_adapter_cache_events", "device", "allocated_bytes")),
            get(("hilora_adapter_cache_events", "host", "bytes")))


if __name__ == "__main__":
    raise SystemExit(main())
