"""Redis Sentinel failover under registration load: real redis-server processes on loopback (a
primary, a replica, a sentinel), the primary killed with SIGKILL while adapters are registered.

``HILORA_FAILOVER_REPORT=docs/sentinel-failover.json`` writes the run's counts there."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from hilora_core.models.embedding import EmbedderIdentity
from registry.redis_server import RedisServer, SentinelServer

DIM = 16
IDENT = EmbedderIdentity("synthetic-test", None, DIM, "", True)
SERVICE = "hilora-primary"


def _wait(predicate, timeout_s: float, what: str, servers: tuple[RedisServer, ...] = ()) -> None:
    """Poll ``predicate`` until true; on timeout fail with the last lines of ``servers``' logs."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as err:
            last_error = err
        time.sleep(0.1)
    logs = "\n".join(f"--- port {srv.port}: {srv.log_tail()}" for srv in servers)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last error: {last_error!r})\n{logs}")


def _replication(server: RedisServer) -> dict:
    return server.client().info("replication")


def test_sentinel_url_is_parsed():
    from registry.connection import SentinelURL

    u = SentinelURL.parse("redis+sentinel://:s3cret@10.0.0.1:26379,sentinel-b:26380/pool/2?sentinel_password=x")
    assert u.sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380))
    assert (u.service, u.db, u.password, u.username, u.sentinel_password) == ("pool", 2, "s3cret", None, "x")
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/pool", "redis+sentinel://h:1/pool/x"):
        with pytest.raises(ValueError):
            SentinelURL.parse(bad)


def test_no_acknowledged_registration_is_lost_when_the_primary_is_killed(tmp_path):
    from registry.config import AdmissionSettings, RegistryConfig, ScorerSettings, StoreSettings
    from registry.errors import RegistryUnavailableError
    from registry.registry import Registry
    from registry.scorer import PoolScorer

    primary = RedisServer(tmp_path / "primary", "aof").start()
    replica = RedisServer(tmp_path / "replica", "aof",
                          extra_args=("--replicaof", "127.0.0.1", str(primary.port))).start()
    sentinel = SentinelServer(tmp_path / "sentinel", SERVICE, primary.port).start()
    servers = [primary, replica, sentinel]
    try:
        _wait(lambda: _replication(replica)["master_link_status"] == "up", 20, "the replica to sync")
        _wait(lambda: len(sentinel.client().execute_command("SENTINEL", "replicas", SERVICE)) == 1, 20,
              "the sentinel to discover the replica")
        cfg = RegistryConfig(
            store=StoreSettings(redis_url=f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}", key_prefix="sen",
                                channel="sen:events", socket_timeout_s=1.0, min_replica_acks=1,
                                replica_ack_timeout_ms=500),
            admission=AdmissionSettings(hub_lookup=False), scorer=ScorerSettings(poll_interval_s=0.2))
        reg = Registry(cfg, identity=IDENT)
        scorer = PoolScorer(cfg, identity=IDENT)  # a replica of the router, following the pool
        rng = np.random.default_rng(5)
        acked: list[str] = []
        acked_at: list[float] = []
        refused: list[str] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                adapter_id = f"s{i:05d}"
                i += 1
                z = (rng.standard_normal(DIM) * 2 + 0.3 * rng.standard_normal((6, DIM))).astype("f4")
                try:
                    reg.register_embeddings(adapter_id, "owner/repo", z, rank=8, alpha=16.0, targets=["q_proj"])
                    acked.append(adapter_id)
                    acked_at.append(time.monotonic())
                except RegistryUnavailableError:
                    refused.append(adapter_id)
                    time.sleep(0.05)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        _wait(lambda: len(acked) >= 40, 60, "40 registrations before the failover")
        primary.kill()  # SIGKILL under load
        t_kill, killed_at = time.monotonic(), len(acked)
        _wait(lambda: sentinel.primary() == ("127.0.0.1", replica.port), 30, "the sentinel to promote the replica",
              (sentinel, primary, replica))
        t_promoted = time.monotonic()
        # with no replica left, writes are refused (not acknowledged) rather than put at risk
        _wait(lambda: len(refused) >= 3, 30, "writes to be refused while no replica holds them")
        primary.start()  # the old primary comes back; the sentinel turns it into a replica of the new one
        t_restarted = time.monotonic()
        seen: list[dict] = []

        def rejoined() -> bool:
            info = _replication(primary)
            seen[:] = [{k: info.get(k) for k in ("role", "master_port", "master_link_status")}]
            return info["role"] == "slave" and info["master_link_status"] == "up"

        try:
            _wait(rejoined, 120, "the old primary to rejoin as replica", (sentinel, primary, replica))
        except AssertionError as err:
            raise AssertionError(f"{err}\nits last replication info: {seen}") from None
        _wait(lambda: len(acked) >= killed_at + 40, 120, "40 registrations after the failover")
        stop.set()
        thread.join(timeout=30)

        present = {i.decode() for i in replica.client().zrange("sen:ids", 0, -1)}
        assert set(acked) <= present, sorted(set(acked) - present)[:10]  # not one acknowledged write lost
        assert refused  # the outage was visible to the writer
        assert reg.store.client.connection_pool.get_master_address() == ("127.0.0.1", replica.port)
        _wait(lambda: set(acked) <= set(scorer.snapshot.ids), 30, "the following scorer to see every adapter")
        assert not scorer.degraded
        first_after = next(t for t in acked_at if t > t_kill)
        report = {
            "acknowledged_before_kill": killed_at, "acknowledged_after_kill": len(acked) - killed_at,
            "acknowledged": len(acked), "refused": len(refused), "present_after_failover": len(present),
            "acknowledged_missing": len(set(acked) - present), "failover_s": round(t_promoted - t_kill, 2),
            "write_outage_s": round(first_after - t_kill, 2),
            "old_primary_restarted_after_s": round(t_restarted - t_kill, 2),
            "min_replica_acks": cfg.store.min_replica_acks, "appendfsync": "always",
        }
        if os.environ.get("HILORA_FAILOVER_REPORT"):
            Path(os.environ["HILORA_FAILOVER_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
        scorer.close()
        reg.close()
    finally:
        for server in servers:
            server.kill()
