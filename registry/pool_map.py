"""A 2-D picture of the pool: the adapters' mean embeddings on their first two principal axes.

Only for showing the pool (the playground, ``GET /v1/pool``); routing never uses it. The projection is
refitted whenever the pool changes (one SVD of the (I, d) means, milliseconds for thousands of adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PoolMap:
    """``project(z) = (z - center) @ axes.T``.

    Attributes:
        center: (d,) the mean of the adapters' means.
        axes: (2, d) unit principal axes (a zero row where the pool has fewer than 3 adapters' spread).
        explained: (2,) the share of the means' variance along each axis, in [0, 1].
    """

    center: np.ndarray
    axes: np.ndarray
    explained: np.ndarray

    def project(self, z: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n, 2) map coordinates."""
        return (np.atleast_2d(np.asarray(z, dtype=np.float64)) - self.center) @ self.axes.T


def fit_pool_map(means: np.ndarray) -> PoolMap:
    """The map of (I, d) adapter means (I >= 1)."""
    m = np.atleast_2d(np.asarray(means, dtype=np.float64))
    center = m.mean(axis=0)
    axes = np.zeros((2, m.shape[1]))
    explained = np.zeros(2)
    if m.shape[0] > 1:
        _, s, vt = np.linalg.svd(m - center, full_matrices=False)
        k = min(2, vt.shape[0])
        axes[:k] = vt[:k]
        total = float((s ** 2).sum())
        if total > 0:
            explained[:k] = (s[:k] ** 2) / total
    return PoolMap(center=center, axes=axes, explained=explained)
