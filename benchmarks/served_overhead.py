"""Where the served time goes: one burst of chat requests through the model replica alone and through the
launched service, side by side in one run.

    .venv/bin/python benchmarks/served_overhead.py [--bursts 3] [--competitor 0.4] [--budgets 512 1024]

For each prefill budget (``model.prefill_tokens_per_step``), on the load test's 32 prompts (16 new tokens,
greedy, EOS ends a request):

1. **replica alone**: the model replica class (``deployments.model.ModelReplica``) in this process, with no
   Ray and no HTTP; the burst's requests go to its ``stream`` at once, each with its own adapter;
2. **replica alone + competitor**: the same while another process keeps ``--competitor`` of one core busy
   (10 ms periods), a stand-in for the Serve processes that share the cores with the generation loop;
3. **served**: the service started as ``load_test.py --launch`` starts it; the same burst over HTTP,
   explicit and routed (``hilora``), with the CPU seconds each process used during the burst.

Every number is the median over ``--bursts`` bursts, after one warm-up burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import demo_adapters, launch_service, load_prompts, print_table, run_requests

# keeps a share of one core busy in 10 ms periods: argv = share, seconds
COMPETITOR = """
import sys, time
share, end = float(sys.argv[1]), time.time() + float(sys.argv[2])
while time.time() < end:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.01 * share:
        pass
    time.sleep(0.01 * (1 - share))
"""

GROUPS = (("LoRAModel", "model replica"), ("Ingress", "ingress"), ("Embedder", "embedder"),
          ("RegistryService", "registry"), ("ProxyActor", "HTTP proxy"), ("ServeController", "Serve controller"))


def group_of(proc_name: str, pid: int) -> str:
    if pid == os.getpid():
        return "client (this process)"
    return next((label for key, label in GROUPS if key in proc_name), "Ray, Redis and the rest")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (group, user + system CPU seconds)} for every process readable now."""
    out = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            t = p.cpu_times()
            name = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
            out[p.pid] = (group_of(name, p.pid), t.user + t.system)
        except (psutil.Error, OSError):
            continue
    return out


def cpu_by_group(before: dict, after: dict) -> dict[str, float]:
    totals: dict[str, float] = {}
    for pid, (group, t) in after.items():
        used = t - before.get(pid, (group, 0.0))[1]
        if used > 0:
            totals[group] = totals.get(group, 0.0) + used
    return totals


def burst_summary(runs: list[dict]) -> dict:
    """Medians of per-burst {wall_s, tok_per_s, ttft_p50}."""
    return {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "tok_per_s", "ttft_p50")}


def replica_alone(budget: int, threads: int, prompts: list[tuple[str, str]], bursts: int,
                  competitor: float) -> dict[str, dict]:
    """Bursts through ``ModelReplica.stream`` in this process, without and with the competing process."""
    from deployments.contracts import AdapterLocation, GenerateCall
    from deployments.model import ModelReplica
    from hilora_core.plan import RoutingPlan

    where = demo_adapters()
    replica = ModelReplica({"model": {"torch_threads": threads, "loop": {"prefill_tokens_per_step": budget}}})

    def call(task: str, text: str) -> GenerateCall:
        return GenerateCall(plan=RoutingPlan.single(task),
                            sources={task: AdapterLocation(location=where[task])},
                            messages=[{"role": "user", "content": text}], max_tokens=16)

    async def one(task: str, text: str, t0: float) -> tuple[float, int]:
        first, tokens = None, 0
        async for item in replica.stream(call(task, text)):
            if item.get("delta") and first is None:
                first = time.perf_counter() - t0
            tokens = item.get("completion_tokens", tokens)
        return (first if first is not None else time.perf_counter() - t0), tokens

    async def burst() -> dict:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(t, x, t0) for t, x in prompts))
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tok_per_s": sum(n for _, n in out) / wall,
                "ttft_p50": statistics.median(f for f, _ in out)}

    async def bursts_now() -> list[dict]:
        return [await burst() for _ in range(bursts)]

    try:
        asyncio.run(burst())  # warm-up
        rows = {"replica alone": burst_summary(asyncio.run(bursts_now()))}
        busy = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(competitor), "600"])
        try:
            time.sleep(0.5)
            rows[f"replica alone + competitor ({competitor:.0%} of a core)"] = burst_summary(asyncio.run(bursts_now()))
        finally:
            busy.kill()
            busy.wait()
    finally:
        replica.loop.close()
    return rows


def served(budget: int, threads: int, prompts: list[tuple[str, str]], bursts: int) -> tuple[dict, dict]:
    """Bursts over HTTP against the launched service: ({set-up: summary}, {group: CPU s per burst, hilora})."""
    rows, cpu = {}, {}
    with tempfile.TemporaryDirectory() as data_dir:
        url, stop = launch_service(os.path.join(data_dir, "redis"),
                                   {"loop": {"prefill_tokens_per_step": budget}}, threads)
        try:
            warm = [(t, x) for t, x in dict(prompts).items()] + [("hilora", prompts[0][1])]
            asyncio.run(run_requests(url, warm, 1, 4, 600))
            for mode in ("explicit", "hilora"):
                jobs = list(prompts) if mode == "explicit" else [("hilora", x) for _, x in prompts]
                asyncio.run(run_requests(url, jobs, len(jobs), 16, 600))  # warm-up burst
                runs, groups = [], []
                for _ in range(bursts):
                    before = cpu_seconds()
                    r = asyncio.run(run_requests(url, jobs, len(jobs), 16, 600))
                    groups.append(cpu_by_group(before, cpu_seconds()))
                    if r["errors"]:
                        raise SystemExit(f"{r['errors']} requests failed: {r['error_kinds']}")
                    runs.append(r)
                rows[f"served, {mode}"] = burst_summary(runs)
                if mode == "hilora":
                    cpu = {g: statistics.median(x.get(g, 0.0) for x in groups) for g in {g for x in groups for g in x}}
        finally:
            stop()
    return rows, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--competitor", type=float, default=0.4, help="share of one core the competing process uses")
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024], help="prefill tokens per step")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the generation loop")
    ap.add_argument("--out", type=Path, help="write every number as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prompts = load_prompts(6, 6)[:32]
    report: dict = {"requests": len(prompts), "bursts": args.bursts, "budgets": {}}
    for budget in args.budgets:
        rows = replica_alone(budget, args.threads, prompts, args.bursts, args.competitor)
        served_rows, cpu = served(budget, args.threads, prompts, args.bursts)
        rows.update(served_rows)
        report["budgets"][budget] = {"rows": rows, "served_hilora_cpu_s": cpu}

    print(f"\n{len(prompts)} chat requests per burst, 16 new tokens, median of {args.bursts} bursts\n")
    rows = []
    for budget, rep in report["budgets"].items():
        base = rep["rows"]["replica alone"]["tok_per_s"]
        rows += [[budget, name, f"{r['wall_s']:.2f}", f"{r['tok_per_s']:.1f}", f"{r['ttft_p50']:.2f}",
                  f"{r['tok_per_s'] / base:.2f}"] for name, r in rep["rows"].items()]
    print_table(["prefill budget", "set-up", "wall s", "tok/s", "TTFT p50 s", "tok/s vs replica alone"], rows)
    for budget, rep in report["budgets"].items():
        cpu = rep["served_hilora_cpu_s"]
        wall = rep["rows"]["served, hilora"]["wall_s"]
        print(f"\nCPU seconds per served `hilora` burst, prefill budget {budget} (wall {wall:.2f} s, "
              f"{psutil.cpu_count()} cores)\n")
        total = sum(cpu.values())
        print_table(["process", "CPU s", "share"],
                    [[group, f"{s:.2f}", f"{s / total:.0%}"] for group, s in sorted(cpu.items(), key=lambda kv: -kv[1])]
                    + [["**total**", f"{total:.2f}", f"{total / wall:.2f} cores busy"]])
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
