"""Checks on what a caller registers: adapter ids, sample texts, precomputed embeddings.

Each check raises :class:`hilora_core.errors.InvalidInputError` quoting the bad value
(shortened) before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from hilora_core.errors import DimensionMismatchError, InvalidInputError
from hilora_core.models.embedding import EmbedderIdentity

from .errors import EmbedderMismatchError

ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_adapter_id(adapter_id: object) -> str:
    """An id is 1-128 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        raise InvalidInputError(
            f"invalid adapter id {_short(adapter_id)}: use 1-128 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return adapter_id


MAX_TAGS, MAX_TAG_CHARS = 8, 40


def validate_tags(tags: object) -> tuple[str, ...]:
    """Up to 8 labels (a cluster, a task family), each 1-40 printable characters; duplicates dropped."""
    if tags is None:
        return ()
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise InvalidInputError(f"tags must be a list of strings, got {type(tags).__name__}")
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not 1 <= len(t.strip()) <= MAX_TAG_CHARS or not t.strip().isprintable():
            raise InvalidInputError(f"a tag is 1-{MAX_TAG_CHARS} printable characters, got {str(t)[:60]!r}")
        if t.strip() not in out:
            out.append(t.strip())
    if len(out) > MAX_TAGS:
        raise InvalidInputError(f"{len(out)} tags; the limit is {MAX_TAGS}")
    return tuple(out)


def validate_samples(samples: object, min_samples: int, max_samples: int, max_chars: int) -> list[str]:
    """Sample texts: a list of ``min_samples..max_samples`` non-empty strings of at most
    ``max_chars`` characters, not all identical."""
    if isinstance(samples, str) or not isinstance(samples, Sequence):
        raise InvalidInputError(f"samples must be a list of texts, got {type(samples).__name__}")
    n = len(samples)
    if not min_samples <= n <= max_samples:
        raise InvalidInputError(f"need {min_samples}..{max_samples} sample texts, got {n}")
    for i, text in enumerate(samples):
        if not isinstance(text, str):
            raise InvalidInputError(f"sample {i} is not a string: {_short(text)}")
        if not text.strip():
            raise InvalidInputError(f"sample {i} is empty: {_short(text)}")
        if len(text) > max_chars:
            raise InvalidInputError(f"sample {i} has {len(text)} characters; the limit is {max_chars}")
    if len({t.strip() for t in samples}) == 1:
        raise InvalidInputError(f"all {n} samples are the same text {_short(samples[0])}; a Gaussian needs spread")
    return list(samples)


def validate_embeddings(
    embeddings: object, identity: EmbedderIdentity, min_samples: int, max_samples: int
) -> np.ndarray:
    """Precomputed sample embeddings (m, d) -> float32, checked like texts (count, spread) and
    against the embedder's dimension."""
    z = np.asarray(embeddings)
    if z.ndim != 2:
        raise InvalidInputError(f"embeddings must be a 2-D (m, d) array, got shape {z.shape}")
    if not np.issubdtype(z.dtype, np.number):
        raise InvalidInputError(f"embeddings must be numeric, got dtype {z.dtype}")
    m, d = z.shape
    if d != identity.dim:
        raise DimensionMismatchError(
            f"embeddings have dimension {d} but the embedder {identity.name!r} makes {identity.dim}"
        )
    if not min_samples <= m <= max_samples:
        raise InvalidInputError(f"need {min_samples}..{max_samples} sample embeddings, got {m}")
    if not np.all(np.isfinite(z)):
        bad = np.argwhere(~np.isfinite(z))[0].tolist()
        raise InvalidInputError(f"embeddings contain a non-finite value at index {bad}: {z[tuple(bad)]!r}")
    z = z.astype(np.float32)
    if np.all(z == z[0]):
        raise InvalidInputError(f"all {m} sample embeddings are identical; a Gaussian needs spread")
    return z


def check_identity(expected: EmbedderIdentity, got: EmbedderIdentity, what: str) -> None:
    """Refuse to mix embeddings of two embedders."""
    if expected != got:
        raise EmbedderMismatchError(
            f"{what}: embedder {got.to_dict()} differs from the pool's embedder {expected.to_dict()}"
        )
