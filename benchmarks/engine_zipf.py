"""Many adapters in one process, no HTTP: the engine's generation loop under the Zipf traffic of many_adapters.py.

    .venv/bin/python -m benchmarks.engine_zipf var/pool1000 --sizes 12 1000 12

The same requests as ``benchmarks/many_adapters.py`` (explicit: ``model: <adapter>``, the adapter's own sample
texts in the chat template, Zipf(alpha) popularity, ``--concurrency`` clients, ``--max-tokens`` tokens each,
EOS ignored) and the same memory (256 MiB of adapter rows, 1 GiB host cache), sent straight to a
:class:`RoutedLM`'s loop from client threads. Without the service around it (Ray, HTTP, the embedder and
the registry on the same cores) the engine's own cost of a larger pool shows undiluted, and a size repeated
later in ``--sizes`` shows whether the process got slower for good (this is how issue 27's drift was found:
reading threads with OpenMP teams of their own). Every adapter of the largest N is registered first; each run
reports tok/s, the loop's decode and prefill seconds and the seconds spent placing adapters.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import fmt, print_table
from benchmarks.many_adapters import zipf_jobs
from hilora_core.engine.requests import SequenceRequest
from hilora_core.engine.routed_lm import RoutedLM
from hilora_core.engine.settings import EngineSettings, LoopSettings
from hilora_core.plan import RoutingPlan


def run(lm: RoutedLM, entries: list[dict], args: argparse.Namespace) -> dict:
    """One run over ``entries``: (tok/s, distinct adapters, wall s, loop seconds by part)."""
    jobs, distinct = zipf_jobs(entries, args.requests, args.alpha, "explicit", np.random.default_rng(args.seed))
    pending = iter(jobs)
    lock = threading.Lock()
    loop = lm.loop
    before = loop.stats()

    def client() -> None:
        while True:
            with lock:
                job = next(pending, None)
            if job is None:
                return
            ids = lm.prompt_ids([job[1]], chat=True)[0]
            handle = loop.submit(SequenceRequest(ids, RoutingPlan.single(job[0]), max_new_tokens=args.max_tokens,
                                                 ignore_eos=True))
            for _ in handle.events():
                pass

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = loop.stats()
    return {"n": len(entries), "distinct": distinct, "wall_s": wall,
            "tok_per_s": (after.generated_tokens - before.generated_tokens) / wall,
            "place_s": after.place_seconds - before.place_seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pool", type=Path, help="a pool written by benchmarks.make_pool")
    ap.add_argument("--sizes", type=int, nargs="+", default=[12, 1000, 12])
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--adapter-memory-mib", type=int, default=256)
    ap.add_argument("--host-cache-mib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the loop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    entries = json.loads((args.pool / "manifest.json").read_text())
    torch.set_num_threads(1)  # this thread only registers; the loop sets its own count
    lm = RoutedLM.from_pretrained(None, settings=EngineSettings(adapter_memory_bytes=args.adapter_memory_mib << 20,
                                                                host_cache_bytes=args.host_cache_mib << 20))
    for e in entries[:max(args.sizes)]:
        lm.add_adapter(e["model_name"], str(args.pool / e["adapter"]))
    lm.start_loop(LoopSettings(), threads=args.threads)
    rows = []
    base = None  # tok/s of the first run at the smallest N
    for n in args.sizes:
        r = run(lm, entries[:n], args)
        if base is None and n == min(args.sizes):
            base = r["tok_per_s"]
        rows.append([n, r["distinct"], fmt(r["tok_per_s"], 1), fmt(r["tok_per_s"] / base if base else None, 2),
                     fmt(r["wall_s"], 1), fmt(r["place_s"], 1)])
        print(f"N={n}: {r}", flush=True)
    lm.close()
    print_table(["N", "distinct", "tok/s", "x first smallest N", "wall s", "placing s"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
