"""Copy a pool to another key prefix, its adapters' stored sample texts embedded by another embedder.

A pool's Gaussians belong to the embedder that made its sample embeddings, and a scorer refuses queries
embedded by any other (:class:`registry.errors.EmbedderMismatchError`). Switching the service's embedder
(MiniLM to all-mpnet-base-v2, say) therefore needs the pool embedded again: :func:`reembed_pool` copies
it adapter by adapter into a new key prefix of the same Redis, leaving the source pool untouched, so
the switch is one setting (``registry.store.key_prefix``) and can be undone the same way.

Adapters registered without their texts kept (``admission.store_texts`` off, or more text than
``max_stored_text_chars``) cannot be embedded again; they are reported as skipped, with the reason,
as are adapters the target already holds and adapters whose files no longer resolve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from hilora_core.errors import HiLoRAError, InvalidInputError

from .registry import Registry


@dataclass
class ReembedReport:
    """What a copy did: adapter ids copied, ids skipped with why, seconds taken (embedding included)."""

    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"copied": len(self.copied), "skipped": self.skipped, "seconds": round(self.seconds, 2)}


def reembed_pool(source: Registry, target: Registry, chunk: int = 512) -> ReembedReport:
    """Register every adapter of ``source`` in ``target`` (another key prefix), embedded by ``target``'s
    embedder from the texts ``source`` stored. Texts are embedded ``chunk`` at a time across adapters."""
    if (source.url, source.config.store.key_prefix) == (target.url, target.config.store.key_prefix):
        raise InvalidInputError("the target pool is the source pool; give another key prefix")
    t0 = time.perf_counter()
    report = ReembedReport()
    todo: list[tuple[str, list[str]]] = []
    for record in source.list_all():
        texts = source.store.get_texts(record.id)
        if texts is None:
            report.skipped[record.id] = "its sample texts were not stored (admission.store_texts)"
        elif target.store.get_record(record.id) is not None:
            report.skipped[record.id] = "the target pool already has it"
        else:
            todo.append((record.id, texts))
    flat = [t for _, texts in todo for t in texts]
    parts = [target.embedder.encode(flat[i:i + chunk]) for i in range(0, len(flat), chunk)]
    z = np.concatenate(parts) if parts else np.zeros((0, target.identity.dim), np.float32)
    start = 0
    for adapter_id, texts in todo:
        rows = z[start:start + len(texts)]
        start += len(texts)
        rec = source.store.get_record(adapter_id)
        if rec is None:
            report.skipped[adapter_id] = "deleted from the source pool during the copy"
            continue
        try:
            target.register_embeddings(
                adapter_id, rec.source.location, rows, texts=texts, revision=rec.source.revision, rank=rec.rank,
                alpha=rec.alpha, targets=list(rec.targets), base_model=rec.base_model, tags=rec.tags)
        except HiLoRAError as exc:  # its files moved, a limit of the target's config, a race on the id
            report.skipped[adapter_id] = f"{type(exc).__name__}: {exc}"
            continue
        report.copied.append(adapter_id)
    report.seconds = time.perf_counter() - t0
    return report
