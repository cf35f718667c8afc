"""What an embedder costs and decides in the served application: each embedder in turn, the same service
(``launch_service``: the demo pool seeded with that embedder's fit), the same requests.

    .venv/bin/python benchmarks/embedder_cost.py --embedders all-MiniLM-L6-v2 all-mpnet-base-v2

Per embedder:

- **cost**: ``POST /v1/route`` (embed + score, no generation) at concurrency 1 and 32, latency p50 / p99
  and requests per second; a routed chat completion (``model: hilora``, 16 tokens) at concurrency 1 for
  scale; the Embedder replica's RSS; the start-up time (Ray, the models, the demo pool's registration);
  the installed packages' size and, for a split-archive model, the one-off assembly time.
- **decisions** (through the same endpoint, with the service's fallback): the demo pool's test items
  (first ``--per-task`` of each task) and ``benchmarks/data/rephrased_requests.jsonl`` (36 requests
  phrased unlike the pool's templates): share whose top adapter is their task's, share sent to the base
  model; the off-pool sets (``offpool_requests.txt``, ``offpool_requests_heldout.txt``): share sent to
  the base model.

Writes ``<out>/embedder-cost.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    command_line,
    fmt,
    launch_service,
    load_prompts,
    parse_report_args,
    percentile,
    replica_rss_mib,
    table_head,
    table_row,
    write_lines,
)
from hilora_core.models.offline_embedders import (
    MINILM,
    archive_pieces,
    assemble_split_archive,
    known_embedder,
)
from hilora_core.routing.fallback import load_reference_requests

DATA = ROOT / "benchmarks" / "data"


def install_cost(name: str) -> dict[str, Any]:
    """Bytes the embedder's packages install, and for a split archive the assembled folder and the time to
    assemble it into an empty cache (what a fresh machine pays once)."""
    e = known_embedder(name)
    if e is None:
        return {}
    packages = [e.package.replace("_", "-")] if e.package else list(e.archive.packages if e.archive else [])
    size = 0
    for p in packages:
        files = importlib.metadata.distribution(p).files or []
        size += sum(Path(str(f.locate())).stat().st_size for f in files if Path(str(f.locate())).is_file())
    out: dict[str, Any] = {"packages": len(packages), "installed_mb": size / 1e6}
    if e.archive is not None:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            folder = assemble_split_archive(e.archive, archive_pieces(e.archive), Path(tmp), e.install)
            out["assemble_s"] = time.perf_counter() - t0
            out["assembled_mb"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    return out


async def route_latencies(url: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    """Each text alone through ``POST /v1/route``, ``concurrency`` at a time: latency percentiles (ms), req/s."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(text: str) -> float:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post("/v1/route", json={"input": text})
                r.raise_for_status()
                return time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = sorted(await asyncio.gather(*(one(t) for t in texts)))
        wall = time.perf_counter() - t0
    return {"n": len(texts), "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * percentile(lat, 0.99),
            "req_per_s": len(texts) / wall}


def decisions(url: str, texts: list[str]) -> list[dict]:
    """The routing summaries of ``texts`` (64 per call)."""
    import httpx

    out: list[dict] = []
    for i in range(0, len(texts), 64):
        r = httpx.post(f"{url}/v1/route", json={"input": texts[i:i + 64]}, timeout=300)
        r.raise_for_status()
        out += r.json()["data"]
    return out


def decision_rates(url: str, per_task: int) -> dict[str, dict[str, float]]:
    """Own-task top-1 and fallback shares of the labelled sets, fallback shares of the off-pool sets."""
    labelled = {"demo test items": load_prompts(12, per_task),
                "rephrased": [(r["task"], r["text"]) for r in map(json.loads, (DATA / "rephrased_requests.jsonl")
                                                                   .read_text().splitlines())]}
    out: dict[str, dict[str, float]] = {}
    for name, pairs in labelled.items():
        ds = decisions(url, [t for _, t in pairs])
        out[name] = {"n": len(pairs),
                     "own_top1": sum(bool(d["adapters"]) and d["adapters"][0] == task
                                     for d, (task, _) in zip(ds, pairs, strict=True)) / len(pairs),
                     "to_base": sum(not d["adapters"] for d in ds) / len(pairs)}
    for f in ("offpool_requests.txt", "offpool_requests_heldout.txt"):
        texts = load_reference_requests(DATA / f)
        ds = decisions(url, texts)
        out[f] = {"n": len(texts), "to_base": sum(not d["adapters"] for d in ds) / len(texts)}
    return out


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.common import run_requests

    res: dict[str, Any] = {"embedder": name, "install": install_cost(name)}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as data_dir:
        url, stop = launch_service(data_dir, threads=args.threads or 2, embedder={"model": name})
        try:
            res["start_s"] = time.perf_counter() - t0
            prompts = [t for _, t in load_prompts(12, 40)]
            asyncio.run(route_latencies(url, prompts[:8], 1))  # warm-up
            res["route_c1"] = asyncio.run(route_latencies(url, prompts[:args.requests_c1], 1))
            res["route_c32"] = asyncio.run(route_latencies(url, prompts[:args.requests_c32], 32))
            chat = asyncio.run(run_requests(url, [("hilora", t) for t in prompts[:args.chats]], 1, 16, 300))
            res["chat_c1"] = {"p50_ms": 1e3 * chat["p50"], "errors": chat["errors"]}
            res["embedder_rss_mib"] = replica_rss_mib("Embedder")
            res["rates"] = decision_rates(url, args.per_task)
        finally:
            stop()
    print(json.dumps(res), flush=True)
    return res


def report(res: dict, path: Path) -> None:
    runs = res["runs"]
    names = [r["embedder"] for r in runs]
    lines = ["# Embedders in the served application: cost and decisions", "",
             f"Generated by `{res['command']}` ({res['finished']}, {res['wall_s'] / 60:.1f} min, this machine: "
             "2 CPU cores, the model replica and the embedder sharing them). Each embedder in turn, the same "
             "launched service with the demo pool fitted on that embedder (off-pool threshold included), the "
             "same requests. Raw numbers: `embedder-cost.json`.", "",
             "## Cost", "", *table_head(["", *names], "l" + "r" * len(names))]

    def row(label: str, get) -> str:
        return table_row([label, *(get(r) for r in runs)])

    lines += [
        row("`/v1/route` p50 ms, concurrency 1", lambda r: fmt(r["route_c1"]["p50_ms"], 1)),
        row("`/v1/route` p99 ms, concurrency 1", lambda r: fmt(r["route_c1"]["p99_ms"], 1)),
        row("`/v1/route` p50 ms, concurrency 32", lambda r: fmt(r["route_c32"]["p50_ms"], 1)),
        row("`/v1/route` p99 ms, concurrency 32", lambda r: fmt(r["route_c32"]["p99_ms"], 1)),
        row("`/v1/route` req/s, concurrency 32", lambda r: fmt(r["route_c32"]["req_per_s"], 1)),
        row("routed chat, 16 tokens, p50 ms (concurrency 1)", lambda r: fmt(r["chat_c1"]["p50_ms"], 0)),
        row("Embedder replica RSS (MiB)", lambda r: fmt(r["embedder_rss_mib"], 0)),
        row("service start with the demo pool (s)", lambda r: fmt(r["start_s"], 0)),
        row("installed packages (MB)", lambda r: fmt(r["install"].get("installed_mb"), 0)),
        row("assembled model folder (MB), once", lambda r: fmt(r["install"].get("assembled_mb"), 0)),
        row("assembly into an empty cache (s), once", lambda r: fmt(r["install"].get("assemble_s"), 1)),
    ]
    lines += ["", "## Decisions (the service's default policy, fallback on)", "",
              *table_head(["set", "requests", *(f"{n}: {m}" for n in names for m in ("own top-1", "to base"))])]
    for set_name, first in runs[0]["rates"].items():
        cells = [set_name, first["n"]]
        for r in runs:
            rate = r["rates"][set_name]
            cells += [fmt(rate.get("own_top1"), 3) if "own_top1" in rate else "", fmt(rate["to_base"], 3)]
        lines.append(table_row(cells))
    write_lines(path, lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedders", nargs="+", default=[MINILM.aliases[0], "all-mpnet-base-v2"])
    ap.add_argument("--requests-c1", type=int, default=64)
    ap.add_argument("--requests-c32", type=int, default=256)
    ap.add_argument("--chats", type=int, default=12)
    ap.add_argument("--per-task", type=int, default=10, help="demo test items per task for the decision rates")
    args = parse_report_args(ap, argv)
    t0 = time.perf_counter()
    res = {"command": command_line("embedder_cost", argv), "runs": [measure(n, args) for n in args.embedders]}
    res.update(finished=time.strftime("%Y-%m-%d %H:%M"), wall_s=time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embedder-cost.json").write_text(json.dumps(res, indent=1))
    report(res, args.out / "embedder-cost.md")
    return res


if __name__ == "__main__":
    main()
