"""Prometheus metrics of an ingress replica (served at ``GET /metrics``).

Request-side metrics (latency, time to first token and between tokens of streams) are observed
by the ingress itself. Adapter-cache and generation-loop metrics come from the model replicas:
every generation result carries its replica's counters (queue depth, running rows, tokens,
cancellations, rejections, timeouts), and the ingress exports the latest seen per replica. A replica
not heard from for ``REPLICA_STALE_S`` while others are (one that was restarted or scaled away) leaves the
export, so sums over replicas count live ones only.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hilora_core.engine.metrics import LoopStats

from .contracts import ReplicaStats

REPLICA_STALE_S = 120.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram("hilora_request_latency_seconds", "end-to-end request latency",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("hilora_tokens_total", "tokens processed", ["kind"], registry=r)
        self.routing_latency = Histogram("hilora_routing_latency_seconds", "embed + score + plan latency",
                                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.candidates = Histogram("hilora_candidates_per_request", "adapters in the routing plan",
                                    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.cache_events = Gauge("hilora_adapter_cache_events", "adapter cache counters per model replica",
                                  ["replica", "tier", "event"], registry=r)
        self.resident = Gauge("hilora_adapters_resident", "adapters resident per model replica and tier",
                              ["replica", "tier"], registry=r)

        self.ttft = Histogram("hilora_time_to_first_token_seconds", "streams: request start to first text chunk",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("hilora_inter_token_latency_seconds", "streams: time between text chunks",
                             ["endpoint"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.adapter = Gauge("hilora_adapter", "per adapter of each model replica (the top adapters by requests and "
                             "'other'): requests, tokens, reads, placements, evictions, resident_device, resident_host",
                             ["replica", "adapter", "quantity"], registry=r)
        self._seen: dict[str, float] = {}  # replica -> when its counters last came (monotonic seconds)
        self.loop = Gauge("hilora_generation_loop", "generation loop of each model replica: queue, batch, counters",
                          ["replica", "quantity"], registry=r)

    def observe_replica(self, stats: ReplicaStats, now: float | None = None) -> None:
        """The replica counters a finished generation carries (``ModelReplica.stats``); ``now`` (monotonic
        seconds, default the clock) drops the series of replicas silent for ``REPLICA_STALE_S``."""
        now = time.monotonic() if now is None else now
        self._seen[stats.replica] = now
        for replica, seen in list(self._seen.items()):
            if now - seen > REPLICA_STALE_S:
                del self._seen[replica]
                for gauge in (self.cache_events, self.resident, self.adapter, self.loop):
                    for labels in [x for x in gauge._metrics if x[0] == replica]:  # noqa: SLF001 - no public listing
                        gauge.remove(*labels)
        self.observe_cache(stats.replica, stats.cache)
        self.observe_adapters(stats.replica, stats.adapters)
        if stats.loop is not None:
            self.observe_loop(stats.replica, stats.loop)

    def observe_loop(self, replica: str, stats: LoopStats) -> None:
        """The latest generation-loop numbers of a replica (``GenerationLoop.stats``)."""
        for key, value in vars(stats).items():
            if isinstance(value, (int, float)):
                self.loop.labels(replica, key).set(value)

    def observe_adapters(self, replica: str, usage: dict[str, dict[str, float]]) -> None:
        """The replica's per-adapter counters: its current top adapters replace the previous set (bounded labels)."""
        for labels in [x for x in self.adapter._metrics if x[0] == replica]:  # noqa: SLF001 - no public listing
            if labels[1] not in usage:
                self.adapter.remove(*labels)
        for adapter, row in usage.items():
            for quantity, value in row.items():
                self.adapter.labels(replica, adapter, quantity).set(value)

    def observe_cache(self, replica: str, stats: dict) -> None:
        for tier in ("device", "host", "loader"):
            tier_stats = stats.get(tier) or {}
            for event, value in tier_stats.items():
                if event in ("resident", "size", "used"):
                    self.resident.labels(replica, tier).set(value)
                elif isinstance(value, (int, float)):
                    self.cache_events.labels(replica, tier, event).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
