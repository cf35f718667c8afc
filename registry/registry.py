"""The admin side: register, replace, refit, remove, get and list adapters; route through a scorer.

Every write validates everything first (id, samples, source, adapter config, embedder)
and then makes one atomic Redis write, so a refused call leaves the store unchanged.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from hilora_core.errors import InvalidInputError, UnknownAdapterError
from hilora_core.models.embedding import EmbedderIdentity, SentenceEmbedder
from hilora_core.policies import PolicyConfig

from .adapter_source import (
    AdapterSource,
    AdapterSpec,
    check_base_model,
    check_local_allowed,
    check_spec_limits,
    resolve_spec,
)
from .config import RegistryConfig, build_embedder
from .connection import connect
from .decision import Decision
from .errors import ConflictError
from .records import AdapterPage, AdapterRecord, StoredAdapter
from .scorer import PoolScorer
from .store import AdapterStore
from .validation import (
    check_identity,
    validate_adapter_id,
    validate_embeddings,
    validate_samples,
    validate_tags,
)

MAX_PAGE = 1_000


class Registry:
    """The adapter registry of one pool.

    Args:
        config: settings (Redis URL or embedded folder, fit policy, limits, prefilter).
        embedder: embeds sample texts and requests (default: built from the config on first use).
        identity: embedder identity for callers that only register precomputed embeddings
            (default: ``embedder.identity``).
    """

    def __init__(
        self,
        config: RegistryConfig | None = None,
        *,
        embedder: SentenceEmbedder | None = None,
        identity: EmbedderIdentity | None = None,
    ) -> None:
        self.config = config or RegistryConfig()
        client, self.url = connect(self.config)
        self.store = AdapterStore(client, self.config)
        self._embedder = embedder
        self._identity = identity or (embedder.identity if embedder is not None else None)
        self._scorer: PoolScorer | None = None
        self._written_epoch = 0
        self._hub_reachable = self.config.admission.hub_lookup

    # ---- embedder ----------------------------------------------------------------------------

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            self._embedder = build_embedder(self.config)
            if self._identity is not None:
                check_identity(self._identity, self._embedder.identity, "the configured embedder")
        return self._embedder

    @property
    def identity(self) -> EmbedderIdentity:
        if self._identity is None:
            self._identity = self.embedder.identity
        return self._identity

    # ---- writes ------------------------------------------------------------------------------

    def register(
        self,
        adapter_id: str,
        source: str,
        samples: Sequence[str],
        *,
        revision: str | None = None,
        rank: int | None = None,
        alpha: float | None = None,
        targets: Sequence[str] | None = None,
        base_model: str | None = None,
        replace: bool = False,
        tags: Sequence[str] = (),
    ) -> AdapterRecord:
        """Register an adapter from 2..1000 sample texts of its task.

        ``source`` is a local adapter folder or a hub repo id (with ``revision``). Its
        ``adapter_config.json`` is read when reachable; otherwise ``rank``, ``alpha`` and
        ``targets`` are required. Raises ConflictError for a taken id unless ``replace``.
        ``tags`` label it (shown with the pool, not used to route).
        """
        adapter_id = validate_adapter_id(adapter_id)
        labels = validate_tags(tags)
        texts = self._texts(samples)
        src, spec = self._resolve(adapter_id, source, revision, rank, alpha, targets, base_model)
        self._check_free(adapter_id, replace)
        z = self._embeddings(self.embedder.encode(texts))
        return self._write(adapter_id, src, spec, z, texts, "replace" if replace else "create", tags=labels)

    def register_embeddings(
        self,
        adapter_id: str,
        source: str,
        embeddings: np.ndarray,
        *,
        texts: Sequence[str] | None = None,
        revision: str | None = None,
        rank: int | None = None,
        alpha: float | None = None,
        targets: Sequence[str] | None = None,
        base_model: str | None = None,
        replace: bool = False,
        identity: EmbedderIdentity | None = None,
        tags: Sequence[str] = (),
    ) -> AdapterRecord:
        """Register an adapter from precomputed (m, d) sample embeddings made by ``identity``
        (default: this registry's embedder identity, which must then match)."""
        adapter_id = validate_adapter_id(adapter_id)
        labels = validate_tags(tags)
        if identity is not None:
            check_identity(self.identity, identity, f"embeddings for {adapter_id!r}")
        z = self._embeddings(embeddings)
        if texts is not None:
            texts = self._texts(texts)
            if len(texts) != z.shape[0]:
                raise InvalidInputError(f"{len(texts)} texts for {z.shape[0]} embeddings")
        src, spec = self._resolve(adapter_id, source, revision, rank, alpha, targets, base_model)
        self._check_free(adapter_id, replace)
        return self._write(adapter_id, src, spec, z, texts, "replace" if replace else "create", tags=labels)

    def refit(self, adapter_id: str, samples: Sequence[str]) -> AdapterRecord:
        """Replace an adapter's samples (re-embedded); everything else is kept."""
        adapter_id = validate_adapter_id(adapter_id)
        texts = self._texts(samples)
        old = self.get(adapter_id)
        z = self._embeddings(self.embedder.encode(texts))
        spec = AdapterSpec(old.rank, old.alpha, old.targets, old.base_model, old.config_source)
        return self._write(adapter_id, old.source, spec, z, texts, "update", created=old.created, tags=old.tags)

    def remove(self, adapter_id: str) -> int:
        """Delete an adapter; returns the new pool epoch. UnknownAdapterError if absent."""
        adapter_id = validate_adapter_id(adapter_id)
        epoch = self.store.remove(adapter_id)
        self._written_epoch = max(self._written_epoch, epoch)
        return epoch

    def _texts(self, samples: object) -> list[str]:
        adm = self.config.admission
        return validate_samples(samples, adm.min_samples, adm.max_samples, adm.max_sample_chars)

    def _embeddings(self, z: object) -> np.ndarray:
        adm = self.config.admission
        return validate_embeddings(z, self.identity, adm.min_samples, adm.max_samples)

    def _resolve(self, adapter_id: str, source: str, revision: str | None, rank: int | None, alpha: float | None,
                 targets: Sequence[str] | None, base_model: str | None) -> tuple[AdapterSource, AdapterSpec]:
        src = AdapterSource.parse(source, revision)
        check_local_allowed(src, self.config.allowed_local_dirs)
        hub = self._hub_reachable and src.kind == "hub"
        spec = resolve_spec(src, rank=rank, alpha=alpha, targets=targets, base_model=base_model,
                            hub_lookup=hub)
        check_spec_limits(spec, self.config.max_rank, self.config.admission.max_target_modules,
                          f"adapter {adapter_id!r}")
        if hub and spec.config_source != "hub":
            self._hub_reachable = False  # do not wait on the network again for every adapter of an import
        check_base_model(spec, self.config.admission.base_model, adapter_id)
        return src, spec

    def _check_free(self, adapter_id: str, replace: bool) -> None:
        if not replace and self.store.get_record(adapter_id) is not None:
            raise ConflictError(f"adapter {adapter_id!r} is already registered (pass replace=True)")

    def _write(self, adapter_id: str, src: AdapterSource, spec: AdapterSpec, z: np.ndarray,
               texts: Sequence[str] | None, mode: str, created: float | None = None,
               tags: tuple[str, ...] = ()) -> AdapterRecord:
        now = time.time()
        if created is None and mode == "replace":
            old = self.store.get_record(adapter_id)
            created = old.created if old is not None else None
        keep_texts = (texts is not None and self.config.admission.store_texts
                      and sum(len(t) for t in texts) <= self.config.admission.max_stored_text_chars)
        record = AdapterRecord(
            id=adapter_id, source=src, base_model=spec.base_model, rank=spec.rank, alpha=spec.alpha,
            targets=spec.targets, sample_count=int(z.shape[0]), embedder=self.identity,
            fit=asdict(self.config.fit), config_source=spec.config_source, texts_stored=keep_texts,
            created=created if created is not None else now, updated=now, tags=tags,
        )
        epoch = self.store.put(record, z, list(texts) if keep_texts and texts is not None else None, mode)
        self._written_epoch = max(self._written_epoch, epoch)
        return record.with_epoch(epoch)

    # ---- reads -------------------------------------------------------------------------------

    def get(self, adapter_id: str) -> AdapterRecord:
        """The record of ``adapter_id``; UnknownAdapterError if absent."""
        adapter_id = validate_adapter_id(adapter_id)
        rec = self.store.get_record(adapter_id)
        if rec is None:
            raise UnknownAdapterError(f"adapter {adapter_id!r} is not registered")
        return rec

    def get_with_embeddings(self, adapter_id: str) -> StoredAdapter:
        adapter_id = validate_adapter_id(adapter_id)
        item = self.store.get(adapter_id)
        if item is None:
            raise UnknownAdapterError(f"adapter {adapter_id!r} is not registered")
        return item

    def get_texts(self, adapter_id: str) -> list[str] | None:
        """The stored raw sample texts (None when they were not kept)."""
        self.get(adapter_id)
        return self.store.get_texts(validate_adapter_id(adapter_id))

    def list(self, offset: int = 0, limit: int = 100) -> AdapterPage:
        """One page of records in id order."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidInputError(f"offset must be an integer >= 0, got {offset!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInputError(f"limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
        return self.store.list_page(offset, limit)

    def list_all(self) -> builtins.list[AdapterRecord]:  # `list` in this class is the method above
        return list(self.store.iter_records())

    def count(self) -> int:
        return self.store.count()

    def epoch(self) -> int:
        return self.store.epoch()

    # ---- routing -----------------------------------------------------------------------------

    @property
    def scorer(self) -> PoolScorer:
        """This process's scorer (created on first use; follows the store)."""
        if self._scorer is None:
            self._scorer = PoolScorer(self.config, embedder=self._embedder, identity=self._identity,
                                      store=self.store)
        self._scorer.ensure_epoch(self._written_epoch)  # see our own writes
        return self._scorer

    def route(self, texts: Sequence[str], policy: PolicyConfig | None = None,
              explicit: Sequence[str] | None = None) -> builtins.list[Decision]:
        """Per text: candidates, scores, ROC allocation and scale (see :class:`Decision`)."""
        if isinstance(texts, str):
            raise InvalidInputError("route takes a list of texts, got a single string")
        z = self.embedder.encode(list(texts))
        return self.scorer.route_embeddings(z, policy, explicit=explicit, identity=self.identity)

    def route_embeddings(self, z: np.ndarray, policy: PolicyConfig | None = None,
                         **kwargs) -> builtins.list[Decision]:
        return self.scorer.route_embeddings(z, policy, **kwargs)

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
