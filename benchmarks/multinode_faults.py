"""Fault run on a simulated multi-node Ray cluster on this machine (ray.cluster_utils.Cluster).

    python benchmarks/multinode_faults.py --out docs/multinode-faults.json

The cluster has three raylets:
- a head node, with the proxy, `Ingress`, `Embedder` and `RegistryService`;
- two worker nodes, each holding one `LoRAModel` replica (a custom resource pins one replica per node).

Redis is a separate `redis-server` process. The run is bounded, on loopback only:
1. Closed-loop load (`model: hilora`, 4 clients).
2. After a few seconds, one worker node is removed with its replica. Every request's outcome and
   time is recorded: in-flight requests on that replica must end with a clean 5xx (never hang), and
   new requests must be served by the remaining replica.
3. Redis is stopped. Routing goes on from the router's last copy (`/readyz` says degraded), and a
   registration is refused with 503. Redis is restarted; readiness and registration come back.
4. The adapters registered before and after are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import DEMO_POOL, closed_loop, load_prompts, service_env
from registry.redis_server import RedisServer, free_port

TOKEN = "multinode-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def adapters(url: str) -> list[str]:
    page = httpx.get(f"{url}/admin/adapters", params={"limit": 1000}, headers=AUTH, timeout=30).json()
    return sorted(a["id"] for a in page["adapters"])


def summarise(log: list[dict], cut_s: float, end_s: float) -> dict:
    """Outcomes before the node removal, in flight at it, after it, and in the last half after it."""
    def count(rows: list[dict]) -> dict:
        ok = sum(1 for r in rows if r["status"] == 200)
        return {"sent": len(rows), "succeeded": ok, "failed": len(rows) - ok,
                "failures": sorted({str(r["status"]) for r in rows if r["status"] != 200})}
    settled = (cut_s + end_s) / 2
    return {"before_removal": count([r for r in log if r["end_s"] < cut_s]),
            "in_flight_at_removal": count([r for r in log if r["start_s"] < cut_s <= r["end_s"]]),
            "after_removal": count([r for r in log if r["start_s"] >= cut_s]),
            "after_removal_second_half": count([r for r in log if r["start_s"] >= settled])}


def run_faults(seconds: float = 40, remove_at: float = 12, clients: int = 4) -> dict:
    """The whole scenario (module docstring); returns the report."""
    os.environ["HILORA_ADMIN_TOKEN"] = TOKEN
    env = service_env(HILORA_ADMIN_TOKEN=TOKEN)
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import compose_app

    tmp = tempfile.mkdtemp(prefix="hilora-multinode-")
    redis_srv = RedisServer(tmp, "aof").start()  # restarted below on the same port
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 100}})
    workers = [cluster.add_node(num_cpus=1, resources={"model_node": 1}) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    report: dict = {"nodes": 3, "model_replicas": 2, "seconds": seconds, "clients": clients}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        on_head = {"ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 1}}}
        config = {"model": {"torch_threads": 1, "loop": {"max_rows": 8, "max_waiting": 32}},
                  "registry": {"store": {"redis_url": redis_srv.url}}}
        serve.run(compose_app(config, deployments={
            "Ingress": on_head, "Embedder": on_head, "RegistryService": on_head,
            "LoRAModel": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5, "resources": {"model_node": 1}}},
        }), name="hilora", route_prefix="/")
        prompts = [t for _, t in load_prompts(6, 4)]
        before = adapters(url)
        report["adapters_before"] = len(before)
        asyncio.run(closed_loop(url, prompts, 6, clients, [], time.perf_counter()))  # warm both replicas

        log: list[dict] = []
        t0 = time.perf_counter()

        async def run_with_removal() -> None:
            task = asyncio.create_task(closed_loop(url, prompts, seconds, clients, log, t0))
            await asyncio.sleep(remove_at)
            report["removed_at_s"] = time.perf_counter() - t0
            await asyncio.to_thread(cluster.remove_node, workers[0])
            report["removal_took_s"] = time.perf_counter() - t0 - report["removed_at_s"]
            await task
        asyncio.run(run_with_removal())
        report["load"] = summarise(log, report["removed_at_s"], seconds)
        report["latency_after_removal_max_s"] = max((r["end_s"] - r["start_s"] for r in log
                                                     if r["start_s"] >= report["removed_at_s"]), default=None)
        report["failure_details"] = sorted({r["detail"] for r in log if r["status"] != 200})[:5]

        # Redis down: routing from the last copy, writes refused; Redis back: recovered
        redis_srv.stop(timeout_s=30)
        time.sleep(6)
        ready = httpx.get(f"{url}/readyz", timeout=30)
        routed = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "hilora", "max_tokens": 8, "messages": [{"role": "user", "content": prompts[0]}]})
        body = {"id": "during_outage", "source": str(DEMO_POOL / "adapters" / "list_min"),
                "samples": ["Which is the smallest: 4, 9, 2?", "Give the least of 10, 3, 7."]}
        write = httpx.post(f"{url}/admin/adapters", json=body, headers=AUTH, timeout=60)
        report["redis_down"] = {"readyz": ready.status_code, "routed_request": routed.status_code,
                                "registration": write.status_code, "message": write.json()["error"]["message"]}
        redis_srv.start()
        deadline = time.time() + 60
        while time.time() < deadline and httpx.get(f"{url}/readyz", timeout=30).status_code != 200:
            time.sleep(1)
        write = httpx.post(f"{url}/admin/adapters", json={**body, "id": "after_outage"}, headers=AUTH, timeout=60)
        report["redis_back"] = {"readyz": httpx.get(f"{url}/readyz", timeout=30).status_code,
                                "registration": write.status_code}
        after = adapters(url)
        report["adapters_after"] = len(after)
        report["adapters_lost"] = sorted(set(before) - set(after))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        redis_srv.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40, help="load duration")
    ap.add_argument("--remove-at", type=float, default=12, help="seconds into the load when a node is removed")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = run_faults(args.seconds, args.remove_at, args.clients)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
