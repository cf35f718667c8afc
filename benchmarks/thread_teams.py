"""Why a model replica loads with one torch thread: OpenMP teams per OS thread.

torch's CPU thread count is per OS thread, and a thread that has run a parallel op keeps its
OpenMP team. A replica loads its model in one thread and generates in another (the continuous
loop's thread, or a worker of the static path). If the loading thread used N threads, two
N-thread teams share the cores; OpenMP then stops spinning and wakes its workers by syscall on
every op. This script times the same greedy generation (16 tokens, one adapter, base SmolLM2) on a
generation thread in fresh processes, in three set-ups:

- ``load N``: the loading thread keeps N torch threads (what replicas did before);
- ``load 1``: the loading thread uses one (what ``deployments.model.build_engine`` does now);
- ``same thread``: loading and generating in one thread (the reference).

    .venv/bin/python benchmarks/thread_teams.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, statistics, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
mode, n = sys.argv[2], int(sys.argv[3])
from hilora_core.engine import RoutedLM
from hilora_core.plan import RoutingPlan
from pathlib import Path
torch.set_num_threads(1 if mode == "load 1" else n)
lm = RoutedLM.from_pretrained(None, max_slots=4)
adapters = Path(sys.argv[1]) / "examples" / "demo_pool" / "adapters"
name = sorted(p.name for p in adapters.iterdir())[0]
lm.add_adapter(name, str(adapters / name))
plan = RoutingPlan.single(name)
prompt = "Please convert this list to uppercase and explain what you did: apple, pear, fig."
times = []

def run():
    torch.set_num_threads(n)
    lm.generate([prompt], [plan], max_new_tokens=16, chat=True, ignore_eos=True)  # warm-up
    for _ in range(6):
        t = time.perf_counter()
        lm.generate([prompt], [plan], max_new_tokens=16, chat=True, ignore_eos=True)
        times.append(time.perf_counter() - t)

if mode == "same thread":
    run()
else:
    th = threading.Thread(target=run)
    th.start()
    th.join()
print(json.dumps({"mode": mode, "median_s": statistics.median(times), "times": times}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the generating thread")
    args = ap.parse_args(argv)
    rows = []
    for mode in ("load N", "load 1", "same thread"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), mode, str(args.threads)], capture_output=True,
                             text=True, timeout=600, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    ref = rows[-1]["median_s"]
    print(f"\n16 greedy tokens, {args.threads} torch threads on the generating thread, median of 6:\n")
    print("| set-up | seconds | vs same thread |")
    print("|---|---|---|")
    for r in rows:
        label = r["mode"].replace("load N", f"loading thread kept {args.threads} threads").replace(
            "load 1", "loading thread used 1 thread").replace("same thread", "load and generate in one thread")
        print(f"| {label} | {r['median_s']:.3f} | {r['median_s'] / ref:.2f}x |")
    print(f"\n(spread: {statistics.pstdev(x for r in rows for x in r['times']):.3f} s over all runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
