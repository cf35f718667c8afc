"""Bounded load test on loopback: routed (`model: hilora`) vs explicit single adapter, streaming and not.

Against a running service (`make serve` in another terminal):

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 32 --concurrency 1 8 32

Or in one run that starts the service itself, between two measurements of the engine alone (``--label``
names the run's rows, e.g. the commit, when runs of two checkouts are compared):

    python benchmarks/load_test.py --launch --label after --out docs/load-test.json

Prompts are drawn round-robin from several tasks of the demo pool's test sets (examples/demo_pool/data),
so a batch mixes tasks. The explicit baseline sends the same prompts with `model` set to each prompt's own
adapter. Streamed requests measure time to first token (TTFT). `--launch` also measures what happens after
a client abandons a long stream: the latency of the next request. The loop is bounded: a fixed number of
requests per run and a timeout per request; it only talks to loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import (
    chat_request,
    launch_service,
    load_demo_engine,
    load_prompts,
    require_loopback,
    run_requests,
    table_head,
    table_row,
)


async def abandoned_stream(url: str, hold_s: float = 1.0, max_tokens: int = 500, ignore_eos: bool = False) -> dict:
    """Open a long stream, read it for ``hold_s``, drop the connection; time the next request."""
    body = {"model": "base", "max_tokens": max_tokens, "stream": True, "messages": [
        {"role": "user", "content": "Write a very long story about a lighthouse keeper, chapter by chapter."}]}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            t0 = time.perf_counter()
            async for _ in r.aiter_lines():
                if time.perf_counter() - t0 > hold_s:
                    break
        t1 = time.perf_counter()
        nxt = await chat_request(client, "base", "Say hello.", 8, stream=False, ignore_eos=ignore_eos)
        return {"next_request_s": time.perf_counter() - t1, "ok": nxt["ok"]}


class EngineAlone:
    """The engine without the service: one static batch of ``batch`` chat prompts (own adapters).

    Set up as a replica is: loaded with one torch thread, generating on ``threads`` pinned ones.
    :meth:`tok_per_s` is the median of ``repeats`` timed batches (generated tokens / s, prefill
    included); the load test takes it before and after the served runs, so that a host that changes
    speed during the run shows.
    """

    def __init__(self, prompts: list[tuple[str, str]], batch: int, max_tokens: int, threads: int) -> None:
        from hilora_core.engine.threads import use_torch_threads
        from hilora_core.plan import RoutingPlan

        self.lm, _ = load_demo_engine()
        use_torch_threads(threads)
        jobs = (prompts * (batch // len(prompts) + 1))[:batch]
        self.texts, self.plans = [x for _, x in jobs], [RoutingPlan.single(t) for t, _ in jobs]
        self.max_tokens = max_tokens
        self.lm.generate(self.texts[:2], self.plans[:2], max_new_tokens=2, chat=True)  # warm-up

    def tok_per_s(self, repeats: int = 3) -> float:
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = self.lm.generate_detailed(self.texts, self.plans, max_new_tokens=self.max_tokens, chat=True)
            rates.append(sum(r.completion_tokens for r in out) / (time.perf_counter() - t0))
        return statistics.median(rates)


def measure(url: str, prompts: list[tuple[str, str]], args, stream: bool, label: str) -> list[dict]:
    rows = []
    for c in args.concurrency:
        explicit = asyncio.run(run_requests(url, list(prompts), c, args.max_tokens, args.timeout, stream,
                                            args.ignore_eos))
        routed = asyncio.run(run_requests(url, [("hilora", x) for _, x in prompts], c, args.max_tokens, args.timeout,
                                          stream, args.ignore_eos))
        for mode, r in (("explicit", explicit), ("hilora", routed)):
            r.update(concurrency=c, mode=mode, stream=stream, run=label)
            if mode == "hilora":
                r["routed_over_explicit"] = routed["req_per_s"] / explicit["req_per_s"]
            rows.append(r)
            print_row(r, flush=True)
    return rows


COLUMNS = ("run", "stream", "concurrency", "mode", "req/s", "tok/s", "p50 s", "p99 s", "TTFT p50 s",
           "TTFT p99 s", "errors", "routed/explicit")


def print_row(r: dict, flush: bool = False) -> None:
    ratio = f"{r['routed_over_explicit']:.2f}" if "routed_over_explicit" in r else ""
    print(table_row([r.get("run", ""), "yes" if r["stream"] else "no", r["concurrency"], r["mode"],
                     f"{r['req_per_s']:.2f}", f"{r['tok_per_s']:.1f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                     f"{r['ttft_p50']:.2f}", f"{r['ttft_p99']:.2f}", r["errors"], ratio]), flush=flush)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--launch", action="store_true", help="start the service here")
    ap.add_argument("--label", default="", help="the first column of every row (which checkout or setting ran)")
    ap.add_argument("--requests", type=int, default=32, help="requests per (mode, concurrency) run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the model replica and the engine run")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--no-stream", action="store_true", help="only non-streaming requests")
    ap.add_argument("--stream-only", action="store_true", help="only streaming requests")
    ap.add_argument("--ignore-eos", action="store_true", help="answers run to --max-tokens (as guidellm's)")
    ap.add_argument("--out", type=Path, help="write every number as JSON here")
    args = ap.parse_args()
    require_loopback(args.url)
    prompts = load_prompts(args.tasks, max(1, args.requests // args.tasks + 1))[: args.requests]
    modes = [m for m in (True, False) if not (m and args.no_stream) and not (not m and args.stream_only)]
    report: dict = {"requests": len(prompts), "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                    "rows": [], "abandoned": {}}
    print(f"{len(prompts)} requests per run, {args.max_tokens} new tokens each, tasks round-robin\n")
    targets: list[tuple[str, str | None]] = [(args.label, None if args.launch else args.url)]
    engine = None
    if args.launch:
        batch = max(args.concurrency)
        engine = EngineAlone(prompts, batch, args.max_tokens, args.threads)
        report["engine_before_tok_per_s"] = engine.tok_per_s()
        print(f"engine alone, one static batch of {batch}: {report['engine_before_tok_per_s']:.1f} generated tok/s\n")
    print(*table_head(COLUMNS), sep="\n")
    for label, url in targets:
        stop = None
        with tempfile.TemporaryDirectory() as data_dir:
            if url is None:
                url, stop = launch_service(os.path.join(data_dir, "redis"), {}, args.threads)
            try:
                # warm-up: every adapter of the workload loaded once, and the routed path; then one burst at
                # the highest concurrency, so the loop's KV memory has grown to that many rows, as in a
                # service that has run (the first such burst took ~1.3x as long, whichever run came first)
                warm = [(t, x) for t, x in dict(prompts).items()] + [("hilora", prompts[0][1])]
                asyncio.run(run_requests(url, warm, 1, 4, args.timeout, ignore_eos=args.ignore_eos))
                asyncio.run(run_requests(url, list(prompts), max(args.concurrency), args.max_tokens, args.timeout,
                                         ignore_eos=args.ignore_eos))
                for stream in modes:
                    report["rows"] += measure(url, prompts, args, stream, label)
                if args.launch:
                    report["abandoned"][label] = asyncio.run(abandoned_stream(url, ignore_eos=args.ignore_eos))
            finally:
                if stop is not None:
                    stop()
    if engine is not None:
        report["engine_after_tok_per_s"] = engine.tok_per_s()
        # the served runs are compared with the engine's better measurement (the harder bar)
        report["engine_tok_per_s"] = max(report["engine_before_tok_per_s"], report["engine_after_tok_per_s"])
        print(f"\nengine alone again, after the served runs: {report['engine_after_tok_per_s']:.1f} generated tok/s")
    summarise(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def summarise(report: dict) -> None:
    rows = report["rows"]

    def get(label, stream, c, mode="hilora"):
        for r in rows:
            if (r["run"], r["stream"], r["concurrency"], r["mode"]) == (label, stream, c, mode):
                return r
        return None

    print()
    for label in dict.fromkeys(r["run"] for r in rows):
        cs = sorted({r["concurrency"] for r in rows})
        lo, hi = cs[0], cs[-1]
        s_lo, s_hi = get(label, True, lo), get(label, True, hi)
        if s_lo and s_hi:
            print(f"{label or 'service'}: streaming req/s at concurrency {hi} / {lo}: "
                  f"{s_hi['req_per_s'] / s_lo['req_per_s']:.2f}x; TTFT p50 at {hi}: {s_hi['ttft_p50']:.2f} s")
        if "engine_tok_per_s" in report:
            for stream in (True, False):
                r = get(label, stream, hi)
                if r:
                    print(f"  {'streaming' if stream else 'non-streaming'} served tok/s at {hi} / engine batch {hi}: "
                          f"{r['tok_per_s'] / report['engine_tok_per_s']:.2f}")
        ratios = [r["routed_over_explicit"] for r in rows
                  if r["run"] == label and "routed_over_explicit" in r]
        if ratios:
            print(f"  routed / explicit req/s: {min(ratios):.2f} to {max(ratios):.2f}")
        ab = report["abandoned"].get(label)
        if ab:
            print(f"  next request after an abandoned 500-token stream: {ab['next_request_s']:.2f} s (ok={ab['ok']})")


if __name__ == "__main__":
    main()
