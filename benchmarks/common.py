"""What the benchmark scripts share; each script is a thin ``main`` over this and the project's packages.

- paths: :data:`ROOT`, :data:`DOCS`, :data:`DEMO_POOL`, :func:`pool_dir`;
- workload: :func:`load_prompts` (the demo pool's test prompts, tasks round-robin), :func:`demo_adapters`,
  :func:`load_demo_engine` (``RoutedLM`` with every demo adapter, loaded as a replica loads it);
  :class:`SyntheticPool` (sentence-embedding-like adapter samples for registry and prefilter runs);
- the service on loopback: :func:`launch_service` (Ray and the Serve app in this process),
  :func:`service_env`, :func:`require_loopback`; Redis is :class:`registry.redis_server.RedisServer`;
- clients: :func:`chat_request`, :func:`run_requests` (a bounded burst at a fixed concurrency),
  :func:`closed_loop` (clients that send one request after another for a while), :func:`percentile`;
- command lines: :func:`parse_report_args` (``--out``, ``--threads``);
- reports: :func:`table_head`, :func:`table_row`, :func:`print_table` (markdown), :func:`fmt` (a cell),
  :func:`command_line`, :func:`write_lines`.

Scripts import from here and never from each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import httpx

    from hilora_core.engine import RoutedLM

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEMO_POOL = ROOT / "examples" / "demo_pool"
POOL_DATA = DEMO_POOL / "data"


def pool_dir(name: str) -> Path:
    """The folder of an example pool: ``demo`` or ``transfer``."""
    return ROOT / "examples" / f"{name}_pool"


# --- workload -------------------------------------------------------------------------------------------------


def load_prompts(n_tasks: int, per_task: int) -> list[tuple[str, str]]:
    """(task, input) pairs from the demo pool's test sets, round-robin over the first ``n_tasks`` tasks."""
    by_task = []
    for f in sorted(POOL_DATA.glob("*/test.jsonl"))[:n_tasks]:
        rows = [json.loads(x) for x in f.read_text().splitlines()[:per_task]]
        by_task.append([(r["task"], r["inputs"]) for r in rows])
    if not by_task:
        raise SystemExit(f"no test sets under {POOL_DATA}")
    return [t[i] for i in range(per_task) for t in by_task if i < len(t)]


def demo_adapters() -> dict[str, str]:
    """{adapter name: folder} of the demo pool, in manifest order."""
    from hilora_core.manifest import read_manifest

    manifest = DEMO_POOL / "manifest.json"
    return {e.name: str(manifest.parent / e.adapter) for e in read_manifest(manifest)}


def load_demo_engine() -> tuple[RoutedLM, list[str]]:
    """The embedded base model with every demo adapter, loaded on one torch thread as a replica loads it
    (a thread that loads with N threads keeps an N-thread OpenMP team: ``thread_teams.py``)."""
    from hilora_core.engine import RoutedLM
    from hilora_core.engine.threads import use_torch_threads

    use_torch_threads(1)
    lm = RoutedLM.from_pretrained(None)
    adapters = demo_adapters()
    for name, folder in adapters.items():
        lm.add_adapter(name, folder)
    return lm, list(adapters)


D, M, CLUSTER = 384, 20, 20  # embedding width, samples per adapter, adapters per cluster of a SyntheticPool


class SyntheticPool:
    """Adapter samples clustered like sentence embeddings (d = 384, m = 20): unit-norm samples; clusters of
    ~20 adapters around random unit centres; within an adapter, a 16-direction decaying spread plus
    isotropic noise, smaller than the distance between clusters. Adapter i's samples come from a seed of
    its own, so a pool is never held whole."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        rng = np.random.default_rng(seed)
        self.n_clusters = max(1, n // CLUSTER)
        self.centers = rng.standard_normal((self.n_clusters, D))
        self.centers /= np.linalg.norm(self.centers, axis=1, keepdims=True)
        self.assign = rng.integers(0, self.n_clusters, n)
        self.spectrum = np.sqrt(0.2 / 16 * np.linspace(2, 0.1, 16) / np.linspace(2, 0.1, 16).mean())

    def mean_direction(self, i: int, rng: np.random.Generator) -> np.ndarray:
        mu = self.centers[self.assign[i]] + 0.6 * rng.standard_normal(D) / np.sqrt(D)
        return mu / np.linalg.norm(mu)

    def samples(self, i: int, m: int = M, extra_seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        mu = self.mean_direction(i, rng)
        dirs = rng.standard_normal((16, D)) / np.sqrt(D)
        if extra_seed:
            rng = np.random.default_rng((self.seed, i, extra_seed))
        x = mu + (rng.standard_normal((m, 16)) * self.spectrum) @ dirs + np.sqrt(0.1 / D) * rng.standard_normal((m, D))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def queries(self, n_seen: int = 24, n_unseen: int = 8, seed: int = 1) -> np.ndarray:
        """``n_seen`` fresh samples of random adapters, then ``n_unseen`` points near a cluster centre but
        off every adapter (wide candidate sets)."""
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, self.n, n_seen)
        seen = [self.samples(int(i), m=1, extra_seed=1000 + k)[0] for k, i in enumerate(picks)]
        unseen = []
        for c in rng.integers(0, self.n_clusters, n_unseen):
            x = self.centers[c] + 0.6 * rng.standard_normal(D) / np.sqrt(D)
            unseen.append(x / np.linalg.norm(x))
        return np.asarray(seen + unseen, dtype=np.float32)


# --- the service on loopback ----------------------------------------------------------------------------------


def service_env(**extra: str) -> dict[str, str]:
    """Environment of Ray's workers (and of this process): local Ray without token auth, as
    ``scripts/serve.sh`` runs it, and quiet tokenizers; ``extra`` is added."""
    env = {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **extra}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


def require_loopback(url: str) -> None:
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("the benchmarks only target loopback addresses")


def launch_service(data_dir: str, model: dict | None = None, threads: int = 2,
                   num_cpus: int = 2, seed_manifest: str | None = "demo",
                   adapter_dirs: Sequence[str] = (), embedder: dict | None = None) -> tuple[str, Callable[[], None]]:
    """Start Ray (``num_cpus`` logical CPUs) and the application on a free loopback port, with the embedded
    Redis under ``data_dir``, the ``seed_manifest`` pool (None: empty), the ``model`` settings given
    (``torch_threads``: ``threads``) and the ``embedder`` settings given, local adapters allowed under
    ``adapter_dirs``;
    returns (url, stop). ``stop()`` shuts Serve and Ray down, then the embedded Redis (a daemon that
    outlives the replicas otherwise)."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from registry.redis_server import free_port

    env = service_env()
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"model": {"torch_threads": threads, **(model or {})},
              "registry": {"store": {"embedded_dir": data_dir}, "seed_manifest": seed_manifest,
                           "adapter_dirs": [str(Path(d).resolve()) for d in adapter_dirs]},
              **({"embedder": embedder} if embedder else {})}
    serve.run(build_app(config), name="hilora", route_prefix="/")

    def stop() -> None:
        from registry.connection import EmbeddedRedis

        serve.shutdown()
        ray.shutdown()
        EmbeddedRedis(data_dir).stop()

    return f"http://127.0.0.1:{port}", stop


# --- the admin API and the replica -----------------------------------------------------------------------------

ADMIN_TOKEN = "bench-admin-token"  # set as HILORA_ADMIN_TOKEN before launch_service by the scripts that register


def register_adapters(url: str, entries: list[dict], pool: Path, concurrency: int, batch: int = 0) -> tuple[float, int]:
    """Register every entry over the admin API, ``concurrency`` calls at a time: one adapter per call
    (``POST /admin/adapters``), or ``batch`` adapters per call (``POST /admin/adapters/batch``); (seconds, errors)."""
    import httpx

    def body(e: dict) -> dict:
        return {"id": e["model_name"], "source": str((pool / e["adapter"]).resolve()),
                "samples": [s["inputs"] for s in e["sample"]], "tags": [e["cluster"]]}

    async def run() -> int:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            async def one(chunk: list[dict]) -> int:
                async with sem:
                    if batch:
                        r = await client.post("/admin/adapters/batch", json={"adapters": [body(e) for e in chunk]})
                    else:
                        r = await client.post("/admin/adapters", json=body(chunk[0]))
                if r.status_code == 201:
                    return 0
                print(f"{chunk[0]['model_name']}...: HTTP {r.status_code} {r.text[:300]}", flush=True)
                return len(r.json().get("errors", chunk)) if r.status_code == 207 else len(chunk)
            size = batch or 1
            chunks = [entries[i: i + size] for i in range(0, len(entries), size)]
            return sum(await asyncio.gather(*(one(c) for c in chunks)))
    t0 = time.perf_counter()
    errors = asyncio.run(run())
    return time.perf_counter() - t0, errors


def wait_routable(url: str, n: int, timeout: float = 600) -> float:
    """Seconds until the registry reports ``n`` adapters."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        status = httpx.get(f"{url}/readyz", timeout=30).json()["registry"]
        if int(status.get("adapters", -1)) >= n:
            return time.perf_counter() - t0
        time.sleep(0.2)
    raise SystemExit(f"the registry did not reach {n} adapters in {timeout} s")


_SAMPLE = re.compile(r'^(hilora_\w+)\{([^}]*)\} ([0-9.eE+-]+|NaN)$')


def scrape(url: str) -> dict[tuple[str, str, str], float]:
    """The ingress's /metrics, summed over replicas: (metric, tier or "", event or quantity) -> value."""
    import httpx

    out: dict[tuple[str, str, str], float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
            key = (m[1], labels.get("tier", ""), labels.get("event", labels.get("quantity", "")))
            out[key] = out.get(key, 0.0) + float(m[3])
    return out


def replica_rss_mib(deployment: str = "LoRAModel") -> float | None:
    """RSS (MiB) of the first replica process of ``deployment`` on this machine (its Ray process title names it)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any(deployment in part for part in (p.info["cmdline"] or [])):
            return p.memory_info().rss / 2**20
    return None


# --- clients --------------------------------------------------------------------------------------------------


def percentile(xs: Sequence[float], p: float) -> float:
    """The ``p`` quantile (0-1) of sorted ``xs``, nearest rank."""
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


async def chat_request(client: httpx.AsyncClient, model: str, text: str, max_tokens: int, stream: bool = True,
                       ignore_eos: bool = False) -> dict[str, Any]:
    """One chat completion: {ok, latency, ttft, tokens} or {ok: False, status}. Streamed requests time the
    first content token (TTFT); a non-streamed one's TTFT is its whole latency."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {}),
            **({"ignore_eos": True} if ignore_eos else {})}
    t0 = time.perf_counter()
    if not stream:
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


async def run_requests(url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int, timeout: float,
                       stream: bool = True, ignore_eos: bool = False) -> dict[str, Any]:
    """Send every (model, text) job, at most ``concurrency`` at a time; the run's counts, rates and
    latency percentiles."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        async def guarded(model: str, text: str) -> dict[str, Any]:
            async with sem:
                return await chat_request(client, model, text, max_tokens, stream, ignore_eos)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(m, t) for m, t in jobs))
        wall = time.perf_counter() - t0
    good = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in good) or [float("nan")]
    ttft = sorted(r["ttft"] for r in good) or [float("nan")]
    kinds = sorted({str(r["status"]) for r in results if not r["ok"]})
    return {"requests": len(jobs), "errors": len(results) - len(good), "error_kinds": kinds, "wall_s": wall,
            "req_per_s": len(good) / wall if good else float("nan"), "tok_per_s": sum(r["tokens"] for r in good) / wall,
            "p50": statistics.median(lat), "p99": percentile(lat, 0.99), "ttft_p50": statistics.median(ttft),
            "ttft_p99": percentile(ttft, 0.99)}


async def closed_loop(url: str, prompts: list[str], seconds: float, clients: int, log: list[dict],
                      t0: float) -> None:
    """``clients`` closed-loop clients (``model: hilora``, 16 tokens) until ``seconds`` after ``t0`` have
    passed; one record per request appended to ``log``: {start_s, end_s, status, detail}."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() - t0 < seconds:
                text = prompts[i % len(prompts)]
                i += clients
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json={
                        "model": "hilora", "max_tokens": 16, "messages": [{"role": "user", "content": text}]})
                    status: int | str = r.status_code
                    detail = "" if status == 200 else r.text[:160]
                except httpx.HTTPError as err:
                    status, detail = type(err).__name__, str(err)[:160]
                log.append({"start_s": start - t0, "end_s": time.perf_counter() - t0, "status": status,
                            "detail": detail})
        await asyncio.gather(*(worker(k) for k in range(clients)))


# --- reports --------------------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table cell: ``digits`` decimals; empty for None or NaN (nothing measured)."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table_row(cells: Iterable[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head(columns: Sequence[str], align: str = "") -> list[str]:
    """The header and separator lines of a markdown table; ``align`` has one letter per column, ``l`` (the
    default for columns it does not reach) or ``r``."""
    marks = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(columns))]
    return [table_row(columns), "|" + "|".join(marks) + "|"]


def print_table(columns: Sequence[str], rows: Iterable[Iterable[object]], align: str = "") -> None:
    print("\n".join(table_head(columns, align) + [table_row(r) for r in rows]), flush=True)


def parse_report_args(ap: argparse.ArgumentParser, argv: list[str] | None = None,
                      threads: bool = True) -> argparse.Namespace:
    """Parse ``argv`` with ``--out`` (the reports' folder, ``docs/`` by default) added to ``ap`` and, with
    ``threads``, ``--threads`` (torch's intra-op threads, set here when given)."""
    if threads:
        ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=DOCS, help="folder of the reports (default: docs/)")
    args = ap.parse_args(argv)
    if threads and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How a report says it was made: ``python benchmarks/SCRIPT.py ARGS`` (``argv``: this run's, by default)."""
    return f"python benchmarks/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])


def write_lines(path: Path, lines: list[str], echo: bool = True) -> Path:
    """Write a markdown report (its folder made first) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))
    return path
