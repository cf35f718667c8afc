"""Whitening the embedding space with the statistics of all registered samples.

Fitting every adapter's Gaussian as ``sample covariance + eps * I`` in a
whitened space is the same as shrinking each covariance towards the pooled
covariance of the whole pool (``eps * Sigma_pool`` in the original space),
while keeping the cheap factored form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hilora_core.errors import DimensionMismatchError, InvalidInputError


@dataclass(frozen=True)
class Whitener:
    """``z -> (z - center) @ matrix``; matrix (d, d) is the pooled covariance's inverse square root,
    scaled so that the total variance of the pooled samples is unchanged.

    Attributes:
        center: (d,) mean of all pooled samples.
        matrix: (d, d) symmetric whitening matrix.
    """

    center: np.ndarray
    matrix: np.ndarray

    @classmethod
    def fit(cls, samples: np.ndarray, shrinkage: float = 0.1) -> Whitener:
        """Fit on (N, d) pooled sample embeddings.

        ``shrinkage`` in [0, 1) mixes the covariance with ``mean variance * I``
        so that directions the pool never varies in are not blown up.
        """
        x = np.asarray(samples, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise InvalidInputError(f"whitening needs an (N >= 2, d) array, got shape {x.shape}")
        if not 0.0 <= shrinkage < 1.0:
            raise InvalidInputError(f"shrinkage must be in [0, 1), got {shrinkage!r}")
        center = x.mean(axis=0)
        cov = np.cov(x - center, rowvar=False)
        d = cov.shape[0]
        cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
        vals, vecs = np.linalg.eigh(cov)
        vals = np.maximum(vals, 1e-12 * vals.max())
        # keep the overall scale (total variance) of the space: a rescaled space would shift
        # every score by a constant and so move the seen/unseen threshold at score 0
        matrix = (vecs / np.sqrt(vals)) @ vecs.T * np.sqrt(np.trace(cov) / d)
        return cls(center=center, matrix=matrix)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, d) whitened."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape[-1] != self.center.shape[0]:
            raise DimensionMismatchError(f"expected dimension {self.center.shape[0]}, got shape {z.shape}")
        return (z - self.center) @ self.matrix
