"""Pool manifests: the one reader of the format shared by FLAN-48, the example pools and the registry.

    [{"model_name": str, "sample": [{"inputs": str, "targets": str}, ...],
      "cluster": str, "adapter": "adapters/<name>", "rank": int}, ...]

``model_name`` and ``sample[].inputs`` are required; ``cluster``, ``adapter`` (a folder relative to
the manifest) and ``rank`` are optional (the example pools have them, FLAN-48 has not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hilora_core.errors import InvalidInputError

MAX_MANIFEST_BYTES = 200_000_000


@dataclass(frozen=True)
class ManifestEntry:
    """One adapter of a manifest: its name, sample inputs, and the optional fields."""

    name: str
    samples: list[str]
    targets: list[str | None]
    cluster: str | None = None
    adapter: str | None = None
    rank: int | None = None


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read and check a manifest file: a non-empty list, unique names, sample inputs as strings."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"manifest {str(path)!r} does not exist")
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidInputError(f"manifest {str(path)!r} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"manifest {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise InvalidInputError(f"manifest {str(path)!r} must be a non-empty JSON list of adapters")
    entries, seen = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("model_name"), str) or "sample" not in item:
            raise InvalidInputError(f"manifest entry {i} needs 'model_name' and 'sample', got {str(item)[:80]!r}")
        name = item["model_name"]
        if name in seen:
            raise InvalidInputError(f"manifest names adapter {name!r} twice")
        seen.add(name)
        samples = item["sample"]
        if not isinstance(samples, list) or not all(
                isinstance(s, dict) and isinstance(s.get("inputs"), str) for s in samples):
            raise InvalidInputError(f"manifest entry {name!r}: 'sample' must be a list of objects with 'inputs'")
        rank = item.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise InvalidInputError(f"manifest entry {name!r}: rank must be an integer >= 1, got {rank!r}")
        entries.append(ManifestEntry(name, [s["inputs"] for s in samples], [s.get("targets") for s in samples],
                                     item.get("cluster"), item.get("adapter"), rank))
    return entries
