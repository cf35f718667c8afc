"""The off-pool reference requests, embedded once per embedder and shared through Redis.

The off-pool threshold (:mod:`hilora_core.routing.fallback`) is fitted against a fixed set of general
requests. Their embeddings are read from Redis, where the first scorer that could embed them stored
them, so every replica fits the same threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hilora_core.models.embedding import DEFAULT_INSTRUCTION, EmbedderIdentity, SentenceEmbedder
from hilora_core.models.offline_embedders import embedder_name
from hilora_core.routing.fallback import load_reference_requests

from .config import RegistryConfig
from .errors import EmbedderMismatchError
from .store import AdapterStore, identity_key


class ReferenceSet:
    """(R, d) reference embeddings per embedder identity, cached in this process.

    Args:
        store: the pool's store (where the embeddings are shared).
        config: the registry config (which embedder this process runs, the reference file).
        loaded: this process's embedder if it is loaded, else None (it is not loaded to check).
        embedder: loads (or returns) this process's embedder.
    """

    def __init__(self, store: AdapterStore, config: RegistryConfig, loaded: Callable[[], SentenceEmbedder | None],
                 embedder: Callable[[], SentenceEmbedder]) -> None:
        self.store, self.config = store, config
        self._loaded, self._embedder = loaded, embedder
        self._cache: dict[str, np.ndarray | None] = {}

    def can_embed(self, identity: EmbedderIdentity) -> bool:
        """Whether this process's embedder makes ``identity``'s embeddings (without loading a wrong one)."""
        loaded = self._loaded()
        if loaded is not None:
            return identity_key(loaded.identity) == identity_key(identity)
        name = embedder_name(self.config.embedder.model)
        instruction = DEFAULT_INSTRUCTION if self.config.embedder.instruction is None else \
            self.config.embedder.instruction
        return identity.name == name and identity.instruction == instruction

    def embeddings(self, identity: EmbedderIdentity) -> np.ndarray | None:
        """(R, d) embeddings of the reference requests for ``identity``; None when neither Redis has them
        nor this process can make them (the off-pool test then rests on the leave-one-out side alone)."""
        key = identity_key(identity)
        if key in self._cache:
            return self._cache[key]
        z = self.store.get_reference(identity)
        if z is None and self.can_embed(identity):
            try:
                texts = load_reference_requests(self.config.scorer.off_pool_reference_file)
                z = self.store.put_reference(identity, self._embedder().encode(texts))
            except EmbedderMismatchError:
                z = None
        self._cache[key] = z
        return z
