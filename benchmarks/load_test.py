"""Bounded load test of a running service on loopback: routed (`model: hilora`) vs explicit single adapter.

    make serve                       # in another terminal (or any running deployment)
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 32 --concurrency 1 8 32

Prompts are drawn round-robin from several tasks of the demo pool's test sets (examples/demo_pool/data),
so a batch mixes tasks. The explicit baseline sends the same prompts with `model` set to each prompt's own
adapter. Every request streams, so time to first token (TTFT) is measured too. The loop is bounded: a fixed
number of requests per run and a timeout per request; it only talks to the given URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

POOL_DATA = Path(__file__).resolve().parent.parent / "examples" / "demo_pool" / "data"


def load_prompts(n_tasks: int, per_task: int) -> list[tuple[str, str]]:
    """(task, input) pairs, round-robin over tasks."""
    by_task = []
    for f in sorted(POOL_DATA.glob("*/test.jsonl"))[:n_tasks]:
        rows = [json.loads(x) for x in f.read_text().splitlines()[:per_task]]
        by_task.append([(r["task"], r["inputs"]) for r in rows])
    if not by_task:
        raise SystemExit(f"no test sets under {POOL_DATA}")
    return [t[i] for i in range(per_task) for t in by_task if i < len(t)]


async def one(client: httpx.AsyncClient, model: str, text: str, max_tokens: int, stream: bool = True) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    t0 = time.perf_counter()
    if not stream:  # one JSON response: TTFT is the whole latency
        try:
            r = await client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as err:
            return {"ok": False, "status": type(err).__name__}
        total = time.perf_counter() - t0
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        return {"ok": True, "latency": total, "ttft": total, "tokens": r.json()["usage"]["completion_tokens"]}
    ttft, tokens, ok = None, 0, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": "stream-error"}
                if ttft is None and chunk["choices"] and chunk["choices"][0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        return {"ok": False, "status": type(err).__name__}
    total = time.perf_counter() - t0
    return {"ok": ok, "latency": total, "ttft": ttft if ttft is not None else total, "tokens": tokens}


async def run(url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int, timeout: float,
              stream: bool = True) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        async def guarded(model, text):
            async with sem:
                return await one(client, model, text, max_tokens, stream)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(m, t) for m, t in jobs))
        wall = time.perf_counter() - t0
    good = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in good) or [float("nan")]
    ttft = sorted(r["ttft"] for r in good) or [float("nan")]

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    return {"requests": len(jobs), "errors": len(results) - len(good), "wall_s": wall,
            "req_per_s": len(good) / wall, "tok_per_s": sum(r["tokens"] for r in good) / wall,
            "p50": statistics.median(lat), "p99": pct(lat, 0.99), "ttft_p50": statistics.median(ttft),
            "ttft_p99": pct(ttft, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=32, help="requests per (mode, concurrency) run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--no-stream", action="store_true",
                    help="plain JSON requests, merged into mixed batches by the model replicas")
    args = ap.parse_args()
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("the load test only targets loopback addresses")
    prompts = load_prompts(args.tasks, max(1, args.requests // args.tasks + 1))[: args.requests]
    asyncio.run(run(args.url, [("hilora", prompts[0][1])], 1, 4, args.timeout))  # warm-up
    stream = not args.no_stream
    print(f"{len(prompts)} requests per run, {args.max_tokens} new tokens each, tasks round-robin, "
          f"{'streaming' if stream else 'non-streaming'}\n")
    print("| concurrency | mode | req/s | tok/s | p50 s | p99 s | TTFT p50 s | TTFT p99 s | errors | "
          "routed/explicit req/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        explicit = asyncio.run(run(args.url, [(t, x) for t, x in prompts], c, args.max_tokens, args.timeout, stream))
        routed = asyncio.run(run(args.url, [("hilora", x) for _, x in prompts], c, args.max_tokens, args.timeout,
                                 stream))
        for mode, r in (("explicit", explicit), ("hilora", routed)):
            ratio = f"{routed['req_per_s'] / explicit['req_per_s']:.2f}" if mode == "hilora" else ""
            print(f"| {c} | {mode} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} "
                  f"| {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['errors']} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
