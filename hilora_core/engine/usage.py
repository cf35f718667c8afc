"""Per-adapter counters of one engine: the pool's heat, for operators (exported by the service's ``/metrics``).

Counted per adapter name: ``requests`` and ``tokens`` (generated) of finished requests that used it,
``reads`` (disk or hub into host memory), ``placements`` (host memory into device rows) and ``evictions``
(left the device). :meth:`AdapterUsage.top` keeps the label set bounded: the ``k`` adapters with the most
requests, each on its own, and every other adapter summed under ``"other"``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping

QUANTITIES = ("requests", "tokens", "reads", "placements", "evictions")
OTHER = "other"


class AdapterUsage:
    """Thread-safe counters per adapter name (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {q: Counter() for q in QUANTITIES}

    def add(self, quantity: str, names: Iterable[str], amount: int = 1) -> None:
        """Add ``amount`` to ``quantity`` (one of :data:`QUANTITIES`) of each adapter in ``names``."""
        with self._lock:
            counter = self._counts[quantity]
            for name in names:
                counter[name] += amount

    def forget(self, name: str) -> None:
        """Drop a removed adapter's counters (so that removed names do not accumulate)."""
        with self._lock:
            for counter in self._counts.values():
                counter.pop(name, None)

    def top(self, k: int, residency: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
        """``{adapter or "other": {quantity: value, "resident_device", "resident_host"}}`` for the ``k`` adapters with
        the most requests, the rest summed under ``"other"`` (residency: adapter -> "device" / "host")."""
        residency = residency or {}
        with self._lock:
            names = set().union(*self._counts.values()) | set(residency)
            ranked = sorted(names, key=lambda n: (-self._counts["requests"][n], n))
            out: dict[str, dict[str, float]] = {}
            for i, name in enumerate(ranked):
                key = name if i < k else OTHER
                row = out.setdefault(key, dict.fromkeys((*QUANTITIES, "resident_device", "resident_host"), 0.0))
                for q in QUANTITIES:
                    row[q] += self._counts[q][name]
                where = residency.get(name)
                if where is not None:
                    row[f"resident_{where}"] += 1
            return out
