"""Reading adapters from disk or the hub into host memory on threads of their own, off the decode path.

The engine calls :meth:`AdapterLoader.prefetch` as soon as it knows a request's adapters (at submission,
right after routing decided); the loop's scheduler asks :meth:`AdapterLoader.ready` before admitting a
request and lets it wait in the queue while its adapters load, so the running rows keep decoding. Only
the copy from host memory into the device rows (``slots.py``) happens on the loop's thread.

    loader = AdapterLoader(fetch=lambda name: host_cache.get(source(name)), is_ready=lambda name: ...)
    loader.prefetch(["sst2"])             # returns at once
    loader.ready(["sst2"])                # False while reading, True after; a failed read raises its error
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from hilora_core.engine.metrics import Histogram
from hilora_core.engine.threads import use_torch_threads
from hilora_core.engine.usage import AdapterUsage

LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class AdapterLoader:
    """Background reads of adapters into host memory (see the module docstring).

    Args:
        fetch: reads one adapter by name into the host cache (disk or hub I/O); its result is not used here.
        is_ready: whether an adapter needs no read now (in host memory, or already on the device).
        workers: reading threads.
        usage: per-adapter counters to add reads to.
    """

    def __init__(self, fetch: Callable[[str], object], is_ready: Callable[[str], bool], workers: int = 2,
                 usage: AdapterUsage | None = None) -> None:
        self._fetch, self._is_ready = fetch, is_ready
        self.usage = usage or AdapterUsage()
        # one torch thread each: a read converts and checks tensors (parallel ops), and a reading thread left at
        # the process-wide count would keep an OpenMP team of its own beside the generation loop's for the rest
        # of the process, slowing every forward pass after the first large read (threads.py)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-loader",
                                        initializer=use_torch_threads, initargs=(1,))
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self.loads = 0
        self.failures = 0
        self.latency = Histogram(LOAD_BUCKETS)  # seconds from prefetch to the adapter in host memory

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading every adapter of ``names`` that is neither ready nor already being read."""
        for name in dict.fromkeys(names):
            with self._lock:
                if name in self._pending or self._is_ready(name):
                    continue
                self._pending[name] = self._pool.submit(self._read, name, time.monotonic())

    def _read(self, name: str, asked_at: float) -> None:
        try:
            self._fetch(name)
        except BaseException:
            with self._lock:
                self.failures += 1
            raise
        with self._lock:
            self.loads += 1
            self.latency.observe(time.monotonic() - asked_at)
        self.usage.add("reads", [name])

    def ready(self, names: Iterable[str]) -> bool:
        """True when every adapter of ``names`` can be placed without a read; else starts the missing
        reads and returns False. A read that failed raises its error here (once; a later call retries)."""
        ok = True
        for name in dict.fromkeys(names):
            if self._is_ready(name):
                continue
            with self._lock:
                future = self._pending.get(name)
                if future is not None and future.done():
                    del self._pending[name]
                    err = future.exception()
                    if err is not None:
                        raise err
                    future = None  # read, then evicted from host memory before it was placed: read again
            if future is None:
                self.prefetch([name])
            ok = False
        return ok

    def forget(self, name: str) -> None:
        """Drop the record of ``name``'s read (the adapter was removed or replaced)."""
        with self._lock:
            self._pending.pop(name, None)

    def loading(self) -> int:
        with self._lock:
            return sum(1 for f in self._pending.values() if not f.done())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
