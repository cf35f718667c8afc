"""Autoscaling seen working: Serve scales Ingress, Embedder and LoRAModel up under load and back down after.

    python benchmarks/autoscaling_trace.py --out docs/autoscaling.json

The cluster is simulated with `ray.cluster_utils.Cluster`: a head node and two worker nodes, with logical
CPUs so that three model replicas fit. Every deployment starts at one replica and may grow to three.
The run is bounded, on loopback only:
- a closed-loop load of 12 clients for `--load-s` seconds;
- then idle time until every deployment is back at one replica, or `--idle-s` has passed.

Once a second, the trace records each deployment's RUNNING replicas from Serve's own status
(`serve.status()`), with the request rate and median latency of that second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

from benchmarks.common import closed_loop, load_prompts, print_table, service_env
from registry.redis_server import free_port

WATCHED = ("Ingress", "Embedder", "LoRAModel")


def running(serve) -> dict[str, int]:
    """RUNNING replicas per watched deployment, from Serve's status."""
    app = serve.status().applications.get("hilora")
    out = {}
    for name in WATCHED:
        dep = app.deployments.get(name) if app is not None else None
        states = dep.replica_states if dep is not None else {}
        out[name] = int(sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING"))
    return out


def run_trace(load_s: float, idle_s: float, clients: int) -> dict:
    env = service_env()
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import compose_app

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    for _ in range(2):
        cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    scale = {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 3, "downscale_delay_s": 15,
             "metrics_interval_s": 1, "look_back_period_s": 5}
    trace: list[dict] = []
    log: list[dict] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(compose_app({"model": {"torch_threads": 1, "loop": {"max_rows": 4, "max_waiting": 32}}}, deployments={
            "Ingress": {"autoscaling_config": {**scale, "target_ongoing_requests": 2},
                        "ray_actor_options": {"num_cpus": 0.5}},
            "Embedder": {"autoscaling_config": {**scale, "target_ongoing_requests": 0.25},  # embeds take ~10 ms
                         "ray_actor_options": {"num_cpus": 0.5}},
            "LoRAModel": {"autoscaling_config": {**scale, "target_ongoing_requests": 2},
                          "ray_actor_options": {"num_cpus": 1}},
        }), name="hilora", route_prefix="/")
        prompts = [t for _, t in load_prompts(6, 6)]
        t0 = time.perf_counter()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                now = time.perf_counter() - t0
                done = [r for r in log if now - 1 <= r["end_s"] < now]
                lat = [r["end_s"] - r["start_s"] for r in done if r["status"] == 200]
                trace.append({"t_s": round(now, 1), **running(serve), "req_per_s": len(done),
                              "latency_p50_s": round(statistics.median(lat), 2) if lat else None,
                              "errors": sum(1 for r in done if r["status"] != 200)})
                if now > load_s and all(trace[-1][n] == 1 for n in WATCHED) or now > load_s + idle_s:
                    stop.set()
                time.sleep(1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        asyncio.run(closed_loop(url, prompts, load_s, clients, log, t0))
        sampler.join(timeout=idle_s + 30)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    peak = {n: max(row[n] for row in trace) for n in WATCHED}
    return {"load_s": load_s, "clients": clients, "autoscaling": scale, "peak_replicas": peak,
            "final_replicas": {n: trace[-1][n] for n in WATCHED} if trace else {},
            "requests": len(log), "errors": sum(1 for r in log if r["status"] != 200), "trace": trace}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-s", type=float, default=60)
    ap.add_argument("--idle-s", type=float, default=90)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = run_trace(args.load_s, args.idle_s, args.clients)
    print_table(["t (s)", *WATCHED, "req/s", "p50 latency (s)", "errors"],
                [[row["t_s"], *(row[n] for n in WATCHED), row["req_per_s"], row["latency_p50_s"], row["errors"]]
                 for row in report["trace"][::3]])
    print({k: v for k, v in report.items() if k != "trace"})
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
