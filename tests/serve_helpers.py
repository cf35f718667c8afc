"""Start the real Ray Serve application for a test module: a real Redis, the real base model, PEFT adapters.

    with running_service(tmp, config) as url:   # config: AppConfig fields (the registry's redis_url is added)
        httpx.get(f"{url}/health")
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from registry.redis_server import RedisServer, free_port

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def seed_pool(folder: Path, adapters: dict[str, dict]) -> Path:
    """Write PEFT adapters and a manifest: ``{name: {"seed", "r", "target_modules", "samples"}}``."""
    from transformers import AutoModelForCausalLM

    from hilora_core.models.base_model import resolve_base
    from tests.engine_helpers import make_adapter

    base = AutoModelForCausalLM.from_pretrained(resolve_base(None))
    entries = []
    for name, spec in adapters.items():
        make_adapter(base, folder / "adapters" / name, seed=spec["seed"], r=spec["r"],
                     target_modules=spec["target_modules"])
        entries.append({"model_name": name, "sample": [{"inputs": t, "targets": ""} for t in spec["samples"]]})
    (folder / "manifest.json").write_text(json.dumps(entries))
    return folder / "manifest.json"


@contextmanager
def running_service(tmp: Path, config: dict, num_cpus: int = 2,
                    deployments: dict[str, dict] | None = None) -> Iterator[tuple[str, RedisServer]]:
    """Redis, Ray (``num_cpus`` logical CPUs, admin token set) and the Serve app on free loopback ports;
    yields (url, redis). ``deployments``: Serve options per deployment (see ``compose_app``)."""
    import ray
    from ray import serve

    from deployments.app import compose_app

    redis_srv = RedisServer(str(tmp / "redis")).start()
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HILORA_ADMIN_TOKEN": TOKEN, "RAY_AUTH_MODE": "disabled",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        registry = config.get("registry", {})
        registry = {**registry, "store": {**registry.get("store", {}), "redis_url": redis_srv.url}}
        serve.run(compose_app({**config, "registry": registry}, deployments), name="hilora", route_prefix="/")
        yield f"http://127.0.0.1:{port}", redis_srv
    finally:
        serve.shutdown()
        ray.shutdown()
        redis_srv.stop()
