"""Host tier: an LRU of adapter tensors in CPU memory, filled from disk or the hub on first use.

Concurrent requests for the same adapter collapse into one load: the first caller
loads, the others wait on its future (and see its error if it fails; a failed load
is not cached, so a later call retries).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

from hilora_core.engine.adapter_files import HostAdapter, InspectedAdapter
from hilora_core.errors import InvalidInputError


class HostAdapterCache:
    """LRU of :class:`HostAdapter` keyed by adapter name, within ``capacity_bytes`` (and ``capacity`` entries).

    Args:
        capacity: the most adapters kept in host memory (None: no count limit).
        loader: reads one :class:`InspectedAdapter` into a :class:`HostAdapter` (disk I/O).
        capacity_bytes: the most bytes of tensors kept (the most recent adapter is kept even when larger).
    """

    def __init__(self, capacity: int | None, loader: Callable[[InspectedAdapter], HostAdapter],
                 capacity_bytes: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise InvalidInputError(f"host_cache_size must be >= 1, got {capacity!r}")
        if capacity_bytes is not None and capacity_bytes < 1:
            raise InvalidInputError(f"host_cache_bytes must be >= 1, got {capacity_bytes!r}")
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._loader = loader
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, HostAdapter] = OrderedDict()  # least recently used first
        self._loading: dict[str, Future[HostAdapter]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.loads = 0  # completed reads from disk

    def peek(self, source: InspectedAdapter) -> HostAdapter | None:
        """The adapter's tensors if cached (a hit, made most recent), else None: never reads."""
        with self._lock:
            entry = self._entries.get(source.name)
            if entry is None or entry.source is not source:
                return None
            self._entries.move_to_end(source.name)
            self.hits += 1
            return entry

    def get(self, source: InspectedAdapter) -> HostAdapter:
        """The adapter's tensors, loading them once if they are not cached."""
        with self._lock:
            entry = self._entries.get(source.name)
            if entry is not None and entry.source is source:
                self._entries.move_to_end(source.name)
                self.hits += 1
                return entry
            future = self._loading.get(source.name)
            owner = future is None
            if owner:
                self.misses += 1
                future = Future()
                self._loading[source.name] = future
            else:
                self.hits += 1  # served by a load already in flight
        assert future is not None
        if not owner:
            return future.result()
        try:
            adapter = self._loader(source)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(source.name, None)
            future.set_exception(exc)
            raise
        with self._lock:
            self._loading.pop(source.name, None)
            self.loads += 1
            old = self._entries.pop(source.name, None)
            self.bytes -= old.nbytes if old is not None else 0
            self._entries[source.name] = adapter
            self.bytes += adapter.nbytes
            while len(self._entries) > 1 and self._over():
                _, gone = self._entries.popitem(last=False)
                self.bytes -= gone.nbytes
                self.evictions += 1
        future.set_result(adapter)
        return adapter

    def _over(self) -> bool:
        return ((self.capacity is not None and len(self._entries) > self.capacity)
                or (self.capacity_bytes is not None and self.bytes > self.capacity_bytes))

    def cached(self, name: str) -> bool:
        """Whether ``name``'s tensors are in host memory now (no load needed)."""
        with self._lock:
            return name in self._entries

    def drop(self, name: str) -> bool:
        """Forget ``name``; True if it was cached."""
        with self._lock:
            gone = self._entries.pop(name, None)
            self.bytes -= gone.nbytes if gone is not None else 0
            return gone is not None

    def names(self) -> list[str]:
        """Cached adapter names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict[str, int | None]:
        with self._lock:
            return {
                "size": len(self._entries),
                "capacity": self.capacity,
                "capacity_bytes": self.capacity_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "loads": self.loads,
                "bytes": self.bytes,
            }
