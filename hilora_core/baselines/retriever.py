"""LoraRetriever: the top-k adapters by cosine between the request and each adapter's mean sample
embedding, mixed uniformly (all ROCs of each)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hilora_core.errors import DimensionMismatchError
from hilora_core.plan import Routed, RoutingPlan


def cosine_similarity(z: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(n, d) queries x (I, d) adapter mean embeddings -> (n, I) cosine similarity."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    m = np.asarray(means, dtype=np.float64)
    if z.shape[1] != m.shape[1]:
        raise DimensionMismatchError(f"query dimension {z.shape[1]} != adapter mean dimension {m.shape[1]}")
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    mn = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return zn @ mn.T


def retriever_route(cosine: np.ndarray, names: Sequence[str], k: int = 3) -> list[Routed]:
    """One plan per query: (n, I) cosine -> the top ``k`` adapters, weight 1/k each."""
    k = min(k, len(names))
    out = []
    for row in np.atleast_2d(cosine):
        top = np.lexsort((np.arange(len(names)), -row))[:k]
        sims = tuple(float(row[i]) for i in top)
        plan = RoutingPlan(adapters=tuple(names[i] for i in top), weights=(1.0 / k,) * k, normalize=False,
                           scores=sims)
        out.append(Routed(plan, tuple(int(i) for i in top), sims))
    return out
