"""The sequence-level model of a whole adapter pool, fitted from sample embeddings.

:func:`fit_pool` turns each adapter's (m_i, d) sample embeddings into the
Gaussians that score requests, applying the pool-wide choices in one place:
the eps policy (fixed or calibrated by leave-one-out) and optional whitening
with the pooled statistics of all samples. Callers (the registry, the
benchmarks) keep the raw samples and refit when the pool changes; refitting
is cheap (one small SVD per adapter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .calibration import EpsCalibration, calibrate_eps
from .errors import EmptyPoolError, InvalidInputError
from .gaussian import GaussianBank, fit_gaussian
from .policies import cosine_similarity
from .whitening import Whitener


@dataclass(frozen=True)
class GaussianFitSettings:
    """How a pool's Gaussians are fitted.

    Attributes:
        eps: fixed eps, or None to calibrate it by leave-one-out on the pool's own samples.
        target_rate: with eps=None, the wanted fraction of held-out samples scoring > 0.
        whiten: fit and score in the space whitened by all registered samples.
        shrinkage: whitening's shrinkage of the pooled covariance towards a multiple of I.
        dtype: precision of the stored bank ("float32" or "float64").
    """

    eps: float | None = None
    target_rate: float = 0.9
    whiten: bool = False
    shrinkage: float = 0.1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.eps is not None and not self.eps > 0:
            raise InvalidInputError(f"eps must be > 0 or None (calibrate), got {self.eps!r}")
        if not 0 < self.target_rate <= 1:
            raise InvalidInputError(f"target_rate must be in (0, 1], got {self.target_rate!r}")
        if self.dtype not in ("float32", "float64"):
            raise InvalidInputError(f"dtype must be float32 or float64, got {self.dtype!r}")


@dataclass
class PoolModel:
    """Fitted pool: scores queries against every adapter.

    Attributes:
        bank: the Gaussians (in whitened space when ``whitener`` is set).
        means: (I, d) adapter mean embeddings in the original space (for cosine rules and indexes).
        eps: the eps in force.
        whitener: the whitening transform, or None.
        calibration: the leave-one-out result when eps was calibrated.
    """

    bank: GaussianBank
    means: np.ndarray
    eps: float
    whitener: Whitener | None
    calibration: EpsCalibration | None

    def transform(self, z: np.ndarray) -> np.ndarray:
        """Map raw embeddings (n, d) into the space the Gaussians live in."""
        return z if self.whitener is None else self.whitener(z)

    def score(self, z: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
        """(n, d) raw query embeddings -> (n, I) HiLoRA scores (or (n, I') for ``subset``)."""
        return self.bank.score(self.transform(np.atleast_2d(z)), subset=subset)

    def cosine(self, z: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, I) cosine to each adapter's mean sample embedding (the Retriever rule)."""
        return cosine_similarity(z, self.means)


def fit_pool(sample_sets: Sequence[np.ndarray], settings: GaussianFitSettings | None = None) -> PoolModel:
    """Fit every adapter's Gaussian with the pool-wide eps and whitening policy.

    Args:
        sample_sets: one (m_i, d) array of sample embeddings per adapter (m_i >= 2; >= 3 to calibrate).
        settings: the fit policy (default: calibrated eps, no whitening).
    """
    settings = settings or GaussianFitSettings()
    if len(sample_sets) == 0:
        raise EmptyPoolError("cannot fit an empty pool")
    raw = [np.asarray(s, dtype=np.float64) for s in sample_sets]
    means = np.stack([s.mean(axis=0) for s in raw])
    whitener = Whitener.fit(np.concatenate(raw), settings.shrinkage) if settings.whiten else None
    space = [whitener(s) for s in raw] if whitener is not None else raw
    calibration = None
    if settings.eps is None:
        calibration = calibrate_eps(space, settings.target_rate)
        eps = calibration.eps
    else:
        eps = float(settings.eps)
    bank = GaussianBank([fit_gaussian(s, eps) for s in space], dtype=np.dtype(settings.dtype))
    return PoolModel(bank=bank, means=means, eps=eps, whitener=whitener, calibration=calibration)
