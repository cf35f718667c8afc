"""Importing a pool manifest: ``[{"model_name": str, "sample": [{"inputs": str, "targets": str}, ...]}, ...]``.

Each entry becomes an adapter with id ``model_name``, source ``source_pattern`` formatted
with ``model_name``, and the ``inputs`` of its samples as sample texts. The whole
manifest is validated before the first write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from hilora_core.errors import InvalidInputError

from .errors import ConflictError
from .registry import Registry
from .validation import validate_adapter_id, validate_samples

MAX_MANIFEST_BYTES = 200_000_000


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    samples: list[str]


@dataclass
class ImportReport:
    """What :func:`import_manifest` did: ``registered`` and ``skipped`` (already present) ids."""

    registered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"registered": self.registered, "skipped": self.skipped}


def load_manifest(path: str, min_samples: int = 2, max_samples: int = 1_000,
                  max_chars: int = 8_000) -> list[ManifestEntry]:
    """Read and validate a manifest file (every entry, before anything is written)."""
    if not os.path.isfile(path):
        raise InvalidInputError(f"manifest {path!r} does not exist")
    if os.path.getsize(path) > MAX_MANIFEST_BYTES:
        raise InvalidInputError(f"manifest {path!r} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"manifest {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise InvalidInputError(f"manifest {path!r} must be a non-empty JSON list of adapters")
    entries, seen = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "model_name" not in item or "sample" not in item:
            raise InvalidInputError(f"manifest entry {i} needs 'model_name' and 'sample', got {str(item)[:80]!r}")
        name = validate_adapter_id(item["model_name"])
        if name in seen:
            raise InvalidInputError(f"manifest names adapter {name!r} twice")
        seen.add(name)
        samples = item["sample"]
        if not isinstance(samples, list) or not all(isinstance(s, dict) and "inputs" in s for s in samples):
            raise InvalidInputError(f"manifest entry {name!r}: 'sample' must be a list of objects with 'inputs'")
        texts = validate_samples([s["inputs"] for s in samples], min_samples, max_samples, max_chars)
        entries.append(ManifestEntry(name, texts))
    return entries


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
) -> ImportReport:
    """Register every adapter of a manifest (see the module docstring).

    ``replace`` overwrites existing ids; ``skip_existing`` leaves them as they are;
    otherwise an existing id stops the import with ConflictError (earlier entries stay).
    """
    cfg = registry.config
    entries = load_manifest(path, cfg.min_samples, cfg.max_samples, cfg.max_sample_chars)
    sources = {e.name: format_source(source_pattern, e.name) for e in entries}
    report = ImportReport()
    for entry in entries:
        try:
            registry.register(entry.name, sources[entry.name], entry.samples, revision=revision, rank=rank,
                              alpha=alpha, targets=targets, base_model=base_model, replace=replace)
        except ConflictError:
            if not skip_existing:
                raise
            report.skipped.append(entry.name)
            continue
        report.registered.append(entry.name)
    return report
