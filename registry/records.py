"""What the registry stores per adapter (metadata; the sample embeddings travel beside it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from hilora_core.models.embedding import EmbedderIdentity

from .adapter_source import AdapterSource

STATUS_READY = "ready"


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter.

    Attributes:
        id: the adapter id (``[A-Za-z0-9._-]``, <= 128 characters).
        source: where the weights are (local folder or hub repo + revision).
        base_model: base model named by the adapter config (or given), if known.
        rank, alpha, targets: LoRA rank, lora_alpha, target module names.
        sample_count: m, the number of sample embeddings stored.
        embedder: identity of the embedder that made them.
        fit: the pool fit settings in force when the adapter was (re)registered.
        config_source: "local", "hub" or "explicit" (rank/alpha/targets given by the caller).
        texts_stored: the raw sample texts are kept in Redis too.
        created, updated: Unix times (seconds).
        status: lifecycle state ("ready").
        tags: labels given at registration (a manifest's cluster, a task family); shown, not used to route.
        epoch: pool epoch of the adapter's last change (set by the store).
    """

    id: str
    source: AdapterSource
    base_model: str | None
    rank: int
    alpha: float
    targets: tuple[str, ...]
    sample_count: int
    embedder: EmbedderIdentity
    fit: dict
    config_source: str
    texts_stored: bool = False
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    status: str = STATUS_READY
    epoch: int = 0
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "id": self.id, "source": self.source.to_dict(), "base_model": self.base_model,
            "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
            "sample_count": self.sample_count, "embedder": self.embedder.to_dict(), "fit": dict(self.fit),
            "config_source": self.config_source, "texts_stored": self.texts_stored,
            "created": self.created, "updated": self.updated, "status": self.status, "epoch": self.epoch,
            "tags": list(self.tags),
        }

    @classmethod
    def from_dict(cls, d: dict) -> AdapterRecord:
        return cls(
            id=d["id"], source=AdapterSource.from_dict(d["source"]), base_model=d.get("base_model"),
            rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
            sample_count=int(d["sample_count"]), embedder=EmbedderIdentity.from_dict(d["embedder"]),
            fit=dict(d.get("fit", {})), config_source=d.get("config_source", "explicit"),
            texts_stored=bool(d.get("texts_stored", False)), created=float(d["created"]),
            updated=float(d["updated"]), status=d.get("status", STATUS_READY), epoch=int(d.get("epoch", 0)),
            tags=tuple(d.get("tags", ())),
        )

    def with_epoch(self, epoch: int) -> AdapterRecord:
        return replace(self, epoch=int(epoch))


@dataclass(frozen=True)
class StoredAdapter:
    """A record with its (m, d) float32 sample embeddings."""

    record: AdapterRecord
    embeddings: np.ndarray


@dataclass(frozen=True)
class AdapterPage:
    """One page of :meth:`Registry.list`: ``records``, the pool size ``total``, and
    ``next_offset`` (None on the last page)."""

    records: list[AdapterRecord]
    total: int
    next_offset: int | None
