"""The registry on a Redis Cluster: every key of a pool hashes to one slot, so its multi-key scripts
run (a real redis-server in cluster mode, owning all 16384 slots, enforces slots as a larger one does)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from hilora_core.models.embedding import EmbedderIdentity
from registry.redis_server import RedisServer

DIM = 16
IDENT = EmbedderIdentity("synthetic-test", None, DIM, "", True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("redis-cluster")
    srv = RedisServer(folder, "none", extra_args=("--cluster-enabled", "yes", "--cluster-config-file",
                                                  str(folder / "nodes.conf"))).start()
    client = srv.client()
    client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
    deadline = time.monotonic() + 20
    while client.cluster("info")["cluster_state"] != "ok":
        assert time.monotonic() < deadline, "the cluster did not become ok"
        time.sleep(0.1)
    yield srv
    srv.kill()


def test_the_cluster_enforces_slots(cluster):
    # the negative control: keys of an untagged prefix live in different slots and a script over them fails
    with pytest.raises(redis.ResponseError, match="same slot"):
        cluster.client().eval("return redis.call('MGET', KEYS[1], KEYS[2])", 2, "pool:ids", "pool:epoch")


def test_registry_and_scorers_work_on_a_cluster(cluster):
    from registry.config import AdmissionSettings, RegistryConfig, ScorerSettings, StoreSettings
    from registry.connection import pool_key_prefix
    from registry.registry import Registry
    from registry.scorer import PoolScorer

    assert pool_key_prefix("pool", True) == "{pool}" and pool_key_prefix("a{b}c", True) == "a{b}c"
    assert pool_key_prefix("pool", False) == "pool" and pool_key_prefix("{}x", True) == "{{}x}"
    cfg = RegistryConfig(
        store=StoreSettings(redis_url=f"redis+cluster://127.0.0.1:{cluster.port}", key_prefix="pool",
                            channel="pool:events"),
        admission=AdmissionSettings(hub_lookup=False),
        scorer=ScorerSettings(incremental_fit_min_pool=4, store_fit_every=2, poll_interval_s=0.2))
    reg = Registry(cfg, identity=IDENT)
    follower = PoolScorer(cfg, identity=IDENT)
    rng = np.random.default_rng(2)
    for i in range(8):
        z = (rng.standard_normal(DIM) * 2 + 0.3 * rng.standard_normal((6, DIM))).astype("f4")
        reg.register_embeddings(f"c{i}", "owner/repo", z, rank=8, alpha=16.0, targets=["q_proj"])
    reg.remove("c0")
    keys = {k.decode() for k in reg.store.client.keys("*")}
    assert keys and all(k.startswith("{pool}:") for k in keys)
    deadline = time.monotonic() + 20
    while follower.snapshot.ids != tuple(f"c{i}" for i in range(1, 8)):
        assert time.monotonic() < deadline, follower.snapshot.ids
        time.sleep(0.05)
    fresh = PoolScorer(cfg, identity=IDENT, follow=False)
    assert fresh.started_from_stored_fit and fresh.snapshot.ids == follower.snapshot.ids
    z = rng.standard_normal((3, DIM)).astype("f4")
    assert [d.to_dict() for d in fresh.route_embeddings(z)] == [d.to_dict() for d in follower.route_embeddings(z)]
    with pytest.raises(Exception, match="not on a Redis Cluster"):
        acked = RegistryConfig(store=StoreSettings(redis_url=cfg.store.redis_url, min_replica_acks=1))
        Registry(acked, identity=IDENT).store  # noqa: B018
    for s in (fresh, follower):
        s.close()
    reg.close()
