"""Embedder deployment: batches texts from concurrent requests into one encode call."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from hilora_core.models.embedding import DEFAULT_INSTRUCTION, SentenceEmbedder

from .config import AppConfig


class EmbedderReplica:
    """An embedding replica (the plain class; :data:`Embedder` is its Serve deployment).

    Args:
        config: the application config (``AppConfig`` as a dict).
        embedder: the :class:`SentenceEmbedder` to serve (default: built from ``config``).
    """

    def __init__(self, config: dict, embedder: SentenceEmbedder | None = None) -> None:
        cfg = AppConfig.model_validate(config)
        instruction = DEFAULT_INSTRUCTION if cfg.embedder.instruction is None else cfg.embedder.instruction
        self.embedder = embedder if embedder is not None else SentenceEmbedder(
            cfg.embedder.model, instruction=instruction, revision=cfg.embedder.revision)
        # serve.batch's wrapper has these setters; ray annotates it as a plain callable
        self._embed_batch.set_max_batch_size(cfg.embedder.max_batch_size)  # type: ignore[attr-defined]
        self._embed_batch.set_batch_wait_timeout_s(cfg.embedder.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def identity(self) -> dict:
        return self.embedder.identity.to_dict()

    async def embed(self, texts: list[str]) -> np.ndarray:
        """(n,) texts -> (n, d) float32; each text joins the shared batch."""
        rows = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        return np.stack(rows) if rows else np.zeros((0, self.embedder.dim), np.float32)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, texts: list[str]) -> list[np.ndarray]:
        z = await asyncio.to_thread(self.embedder.encode, list(texts))
        return list(z)


Embedder = serve.deployment(EmbedderReplica, name="Embedder")
