"""Why a model replica loads with one torch thread, and why threads pin their count: OpenMP teams.

Every OS thread that has run a parallel op keeps its own OpenMP team. A replica loads its model in
one thread and generates in another (the continuous loop's thread, or a worker of the static path).
If the loading thread used N threads, two N-thread teams share the cores; OpenMP then stops
spinning and wakes its workers by syscall on every op. And a thread copies torch's process-wide
count at its first parallel op: a count it set before that is lost if another thread sets one in
between (``hilora_core/engine/threads.py``). This script times the same greedy generation (16
tokens, one adapter, base SmolLM2) on a generation thread in fresh processes, in five set-ups:

- ``load N``: the loading thread keeps N torch threads (what replicas did first);
- ``load 1``: the loading thread uses one (what ``deployments.model.build_engine`` does);
- ``same thread``: loading and generating in one thread (the reference);
- ``helper, plain set``: load 1; the generation thread calls ``torch.set_num_threads(N)``, then a
  helper thread sets 1 before the generation thread's first op (a replica's request thread did this);
- ``helper, pinned``: the same with ``use_torch_threads(N)`` (what the loop does now).

    .venv/bin/python benchmarks/thread_teams.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks.common import DEMO_POOL, print_table

CHILD = """
import json, statistics, sys, threading, time
import torch
mode, n = sys.argv[2], int(sys.argv[3])
from hilora_core.engine import RoutedLM
from hilora_core.plan import RoutingPlan
from pathlib import Path
from hilora_core.engine.threads import use_torch_threads
torch.set_num_threads(n if mode in ("load N", "same thread") else 1)
lm = RoutedLM.from_pretrained(None, max_slots=4)
adapters = Path(sys.argv[1]) / "adapters"
name = sorted(p.name for p in adapters.iterdir())[0]
lm.add_adapter(name, str(adapters / name))
plan = RoutingPlan.single(name)
prompt = "Please convert this list to uppercase and explain what you did: apple, pear, fig."
times = []

set_up, helper_done = threading.Event(), threading.Event()

def helper():
    set_up.wait()
    torch.set_num_threads(1)
    helper_done.set()

def run():
    (use_torch_threads if mode == "helper, pinned" else torch.set_num_threads)(n)
    if mode.startswith("helper"):
        set_up.set()
        helper_done.wait()
    lm.generate([prompt], [plan], max_new_tokens=16, chat=True, ignore_eos=True)  # warm-up
    for _ in range(6):
        t = time.perf_counter()
        lm.generate([prompt], [plan], max_new_tokens=16, chat=True, ignore_eos=True)
        times.append(time.perf_counter() - t)

if mode == "same thread":
    run()
else:
    threads = [threading.Thread(target=run)] + ([threading.Thread(target=helper)] if mode.startswith("helper") else [])
    for th in threads:
        th.start()
    for th in threads:
        th.join()
print(json.dumps({"mode": mode, "median_s": statistics.median(times), "times": times}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the generating thread")
    args = ap.parse_args(argv)
    rows = []
    for mode in ("load N", "load 1", "helper, plain set", "helper, pinned", "same thread"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(DEMO_POOL), mode, str(args.threads)],
                             capture_output=True, text=True, timeout=600, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    ref = next(r["median_s"] for r in rows if r["mode"] == "same thread")
    print(f"\n16 greedy tokens, {args.threads} torch threads on the generating thread, median of 6:\n")
    cells = []
    for r in rows:
        label = r["mode"].replace("load N", f"loading thread kept {args.threads} threads").replace(
            "load 1", "loading thread used 1 thread").replace("same thread", "load and generate in one thread").replace(
            "helper, plain set", "load 1, a helper set 1 after `set_num_threads`").replace(
            "helper, pinned", "load 1, a helper set 1 after `use_torch_threads`")
        cells.append([label, f"{r['median_s']:.3f}", f"{r['median_s'] / ref:.2f}x"])
    print_table(["set-up", "seconds", "vs same thread"], cells)
    print(f"\n(spread: {statistics.pstdev(x for r in rows for x in r['times']):.3f} s over all runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
