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
        eps: fixed eps (in the standardised space when ``standardize``), or None to calibrate it by
            leave-one-out on the pool's own samples (:func:`calibrate_eps`).
        target_rate: with eps=None, the wanted leave-one-out rate of the criterion.
        criterion: calibration criterion, "candidates" (own adapter in the candidate set) or
            "own_score" (held-out sample scores > 0 under its own adapter).
        standardize: scale the space so that the pooled samples have unit RMS per coordinate
            (``sqrt(d)`` for unit-norm embeddings). A global scale shifts every score by a constant,
            so it decides where the 0 threshold of the candidate rule falls; see docs/routing-flan48.md.
        whiten: fit and score in the space whitened by all registered samples.
        shrinkage: whitening's shrinkage of the pooled covariance towards a multiple of I.
        dtype: precision of the stored bank ("float32" or "float64").
    """

    eps: float | None = None
    target_rate: float = 0.9
    criterion: str = "candidates"
    standardize: bool = True
    whiten: bool = False
    shrinkage: float = 0.1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.eps is not None and not self.eps > 0:
            raise InvalidInputError(f"eps must be > 0 or None (calibrate), got {self.eps!r}")
        if not 0 < self.target_rate <= 1:
            raise InvalidInputError(f"target_rate must be in (0, 1], got {self.target_rate!r}")
        if self.criterion not in ("candidates", "own_score"):
            raise InvalidInputError(f"criterion must be 'candidates' or 'own_score', got {self.criterion!r}")
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
        scale: the global scale applied after whitening (1.0 when not standardising).
        calibration: the leave-one-out result when eps was calibrated.
    """

    bank: GaussianBank
    means: np.ndarray
    eps: float
    whitener: Whitener | None
    calibration: EpsCalibration | None
    scale: float = 1.0

    def transform(self, z: np.ndarray) -> np.ndarray:
        """Map raw embeddings (n, d) into the space the Gaussians live in."""
        z = np.asarray(z, dtype=np.float64)
        return (z if self.whitener is None else self.whitener(z)) * self.scale

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
    scale = 1.0
    if settings.standardize:
        pooled = np.concatenate(space)
        scale = float(np.sqrt(pooled.shape[1] / max(float((pooled**2).sum(axis=1).mean()), 1e-300)))
        space = [s * scale for s in space]
    calibration = None
    if settings.eps is None:
        calibration = calibrate_eps(space, settings.target_rate, criterion=settings.criterion)
        eps = calibration.eps
    else:
        eps = float(settings.eps)
    bank = GaussianBank([fit_gaussian(s, eps) for s in space], dtype=np.dtype(settings.dtype))
    return PoolModel(bank=bank, means=means, eps=eps, whitener=whitener, calibration=calibration, scale=scale)
