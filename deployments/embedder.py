"""Embedder deployment: batches texts from concurrent requests into one encode call; a registration's
many texts are encoded apart, in one call, with more threads."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from hilora_core.engine.threads import use_torch_threads
from hilora_core.models.embedding import DEFAULT_INSTRUCTION, SentenceEmbedder

from .config import AppConfig


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class EmbedderReplica:
    """An embedding replica (the plain class; :data:`Embedder` is its Serve deployment).

    Two paths, by size of the call:

    - up to ``embedder.max_batch_size`` texts (requests being routed): each text joins a shared
      :func:`serve.batch`, so concurrent requests are encoded together, with the replica's torch threads;
    - more (a registration's samples, thousands at a time): one encode call over the whole list, on a
      thread of its own with ``embedder.bulk_threads`` torch threads (sentence-transformers sorts the texts
      by length, so a batch pads little). Bulk calls run one at a time; Ray gives a 0.2-CPU replica one
      thread, which made registering 1,000 adapters embedding-bound on one core (``docs/many-adapters.md``).

    Args:
        config: the application config (``AppConfig`` as a dict).
        embedder: the :class:`SentenceEmbedder` to serve (default: built from ``config``).
    """

    def __init__(self, config: dict, embedder: SentenceEmbedder | None = None) -> None:
        cfg = AppConfig.model_validate(config)
        instruction = DEFAULT_INSTRUCTION if cfg.embedder.instruction is None else cfg.embedder.instruction
        self.embedder = embedder if embedder is not None else SentenceEmbedder(
            cfg.embedder.model, instruction=instruction, revision=cfg.embedder.revision)
        self.max_batch_size = cfg.embedder.max_batch_size
        self.bulk_threads = cfg.embedder.bulk_threads or usable_cpus()
        self._bulk = ThreadPoolExecutor(1, thread_name_prefix="embed-bulk",
                                        initializer=use_torch_threads, initargs=(self.bulk_threads,))
        # serve.batch's wrapper has these setters; ray annotates it as a plain callable
        self._embed_batch.set_max_batch_size(cfg.embedder.max_batch_size)  # type: ignore[attr-defined]
        self._embed_batch.set_batch_wait_timeout_s(cfg.embedder.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def identity(self) -> dict:
        return self.embedder.identity.to_dict()

    async def embed(self, texts: list[str]) -> np.ndarray:
        """(n,) texts -> (n, d) float32: with concurrent requests' texts (n <= max_batch_size), else in bulk."""
        if len(texts) > self.max_batch_size:
            return await asyncio.get_running_loop().run_in_executor(self._bulk, self.embedder.encode, list(texts))
        rows = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        return np.stack(rows) if rows else np.zeros((0, self.embedder.dim), np.float32)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        z = await asyncio.to_thread(self.embedder.encode, list(texts))
        return list(z)


Embedder = serve.deployment(EmbedderReplica, name="Embedder")
