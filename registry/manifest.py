"""Importing a pool manifest: ``[{"model_name": str, "sample": [{"inputs": str, "targets": str}, ...]}, ...]``.

Each entry becomes an adapter with id ``model_name``, source ``source_pattern`` formatted
with ``model_name``, the ``inputs`` of its samples as sample texts, and its ``cluster`` (if any) as a tag. The whole
manifest is validated before the first write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hilora_core.errors import InvalidInputError
from hilora_core.manifest import read_manifest

from .errors import ConflictError
from .registry import Registry
from .validation import validate_adapter_id, validate_samples, validate_tags


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    samples: list[str]
    tags: tuple[str, ...] = ()


@dataclass
class ImportReport:
    """What :func:`import_manifest` did: ``registered`` and ``skipped`` (already present) ids."""

    registered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"registered": self.registered, "skipped": self.skipped}


def load_manifest(path: str, min_samples: int = 2, max_samples: int = 1_000,
                  max_chars: int = 8_000) -> list[ManifestEntry]:
    """Read a manifest (:func:`hilora_core.manifest.read_manifest`) and check every id and sample set
    against the registry's rules, before anything is written."""
    return [ManifestEntry(validate_adapter_id(e.name), validate_samples(e.samples, min_samples, max_samples,
                                                                         max_chars),
                          validate_tags([e.cluster] if e.cluster else []))
            for e in read_manifest(path)]


def format_source(pattern: str, name: str) -> str:
    if "{model_name}" not in pattern:
        raise InvalidInputError(f"source pattern {pattern!r} must contain '{{model_name}}'")
    try:
        return pattern.format(model_name=name)
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidInputError(f"source pattern {pattern!r} is malformed: {exc}") from None


def import_manifest(
    registry: Registry,
    path: str,
    source_pattern: str,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    revision: str | None = None,
    base_model: str | None = None,
    replace: bool = False,
    skip_existing: bool = False,
    embed_batch: int = 64,
) -> ImportReport:
    """Register every adapter of a manifest (see the module docstring), embedding the samples of
    ``embed_batch`` adapters in one call.

    ``replace`` overwrites existing ids; ``skip_existing`` leaves them as they are;
    otherwise an existing id stops the import with ConflictError (earlier entries stay).
    """
    cfg = registry.config.admission
    entries = load_manifest(path, cfg.min_samples, cfg.max_samples, cfg.max_sample_chars)
    sources = {e.name: format_source(source_pattern, e.name) for e in entries}
    report = ImportReport()
    for start in range(0, len(entries), embed_batch):
        todo, conflict = [], None
        for entry in entries[start: start + embed_batch]:
            if replace or registry.store.get_record(entry.name) is None:
                todo.append(entry)
            elif skip_existing:
                report.skipped.append(entry.name)
            else:
                conflict = entry.name  # stop here; the entries before it are still registered
                break
        if todo:  # one encode call for the chunk: the embedder sorts its texts by length and pads little
            z = registry.embedder.encode([t for e in todo for t in e.samples])
            at = 0
            for entry in todo:
                rows, at = z[at: at + len(entry.samples)], at + len(entry.samples)
                registry.register_embeddings(entry.name, sources[entry.name], rows, texts=entry.samples,
                                             revision=revision, rank=rank, alpha=alpha, targets=targets,
                                             base_model=base_model, replace=replace, tags=entry.tags)
                report.registered.append(entry.name)
        if conflict is not None:
            raise ConflictError(f"adapter {conflict!r} is already registered (pass replace=True or skip_existing)")
    return report
