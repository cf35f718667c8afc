"""What the generation loop has done: counters, latency histograms, and a typed snapshot of them."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative buckets (Prometheus style): ``cumulative[i]`` observations <= ``buckets[i]`` (seconds)."""

    buckets: list[float]
    cumulative: list[int]
    sum: float
    count: int


class Histogram:
    """A cumulative-bucket histogram of seconds."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> HistogramSnapshot:
        cumulative, total = [], 0
        for c in self.counts[:-1]:
            total += c
            cumulative.append(total)
        return HistogramSnapshot(list(self.buckets), cumulative, self.sum, self.count)


@dataclass
class LoopMetrics:
    """Counters since the loop started (the loop's thread writes them)."""

    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    timed_out: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    torch_threads: int = 0  # the torch CPU threads the loop thread ran its last step with
    routing_builds: int = 0  # decode routings built (each time the running rows changed)
    stack_reuses: int = 0  # of those, how many reused the previous one's gathered adapter stacks
    kv_shifts: int = 0  # decode steps that moved the rows left to reuse KV columns instead of growing
    load_waits: int = 0  # admission passes a request waited for its adapters' read (loader threads)
    capacity_waits: int = 0  # admission passes a request waited for device adapter memory
    place_seconds: float = 0.0  # loop thread's time copying adapters from host memory into device rows
    ttft: Histogram = field(default_factory=lambda: Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)))
    itl: Histogram = field(default_factory=lambda: Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)))


@dataclass(frozen=True)
class LoopStats:
    """The queue and batch now, the counters since start, KV memory in use (bytes), latency histograms."""

    waiting: int
    running: int
    rows: int
    max_rows: int
    submitted: int
    finished: int
    cancelled: int
    rejected: int
    timed_out: int
    failed: int
    prompt_tokens: int
    generated_tokens: int
    steps: int
    torch_threads: int
    routing_builds: int
    stack_reuses: int
    kv_shifts: int
    load_waits: int
    capacity_waits: int
    place_seconds: float
    kv_bytes: int
    ttft_s: HistogramSnapshot
    itl_s: HistogramSnapshot
