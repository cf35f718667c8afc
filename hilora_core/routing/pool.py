"""The sequence-level model of a whole adapter pool, fitted from sample embeddings.

:func:`fit_pool` turns each adapter's (m_i, d) sample embeddings into the
Gaussians that score requests, applying the pool-wide choices in one place:
the eps policy (fixed or calibrated by leave-one-out) and optional whitening
with the pooled statistics of all samples. Callers (the registry, the
benchmarks) keep the raw samples and refit when the pool changes; refitting
is cheap (one small SVD per adapter).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from hilora_core.errors import DimensionMismatchError, EmptyPoolError
from hilora_core.routing.calibration import EpsCalibration, LeaveOneOutScores, calibrate_eps, subset_for_calibration
from hilora_core.routing.fallback import OffPoolThreshold, calibrate_off_pool
from hilora_core.routing.gaussian import GaussianBank, fit_gaussian
from hilora_core.routing.whitening import Whitener


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class GaussianFitSettings:
    """How a pool's Gaussians are fitted: a pydantic dataclass, built by keyword and validated on
    construction (a bad value raises ``pydantic.ValidationError``, a ``ValueError`` naming the field).
    The scale set by ``standardize`` decides where the 0 threshold of the candidate rule falls; see
    docs/routing-flan48.md. The off-pool quantiles are read by :mod:`hilora_core.routing.fallback`."""

    eps: float | None = Field(default=None, gt=0, description="fixed eps (in the standardised space when "
                              "standardize), or None to calibrate it by leave-one-out on the pool's own samples")
    target_rate: float = Field(default=0.9, gt=0, le=1, description="with eps=None, the wanted leave-one-out rate "
                               "of the criterion")
    criterion: Literal["candidates", "own_score"] = Field(
        default="candidates", description="calibration criterion: 'candidates' (own adapter in the candidate set) "
        "or 'own_score' (held-out sample scores > 0 under its own adapter)")
    standardize: bool = Field(default=True, description="scale the space so that the pooled samples have unit RMS "
                              "per coordinate (sqrt(d) for unit-norm embeddings)")
    whiten: bool = Field(default=False, description="fit and score in the space whitened by all registered samples")
    shrinkage: float = Field(default=0.1, ge=0, lt=1, description="whitening's shrinkage of the pooled covariance "
                             "towards a multiple of I")
    dtype: Literal["float32", "float64"] = Field(default="float32", description="precision of the stored bank")
    fallback_sample_quantile: float = Field(default=0.01, ge=0, le=1, description="quantile of the adapters' "
                                            "held-out sample scores that sets the off-pool threshold")
    fallback_reference_quantile: float = Field(default=0.99, ge=0, le=1, description="quantile of the general "
                                               "reference requests' scores that sets the off-pool threshold")


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
        off_pool: the off-pool threshold (None: no reference set and no leave-one-out samples, so
            every request is routed to adapters, the paper's behaviour).
    """

    bank: GaussianBank
    means: np.ndarray
    eps: float
    whitener: Whitener | None
    calibration: EpsCalibration | None
    scale: float = 1.0
    off_pool: OffPoolThreshold | None = None

    def transform(self, z: np.ndarray) -> np.ndarray:
        """Map raw embeddings (n, d) into the space the Gaussians live in."""
        return _to_space(z, self.whitener, self.scale)

    def score(self, z: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
        """(n, d) raw query embeddings -> (n, I) HiLoRA scores (or (n, I') for ``subset``)."""
        return self.bank.score(self.transform(np.atleast_2d(z)), subset=subset)

    def off_pool_rows(self, best_scores: np.ndarray) -> np.ndarray:
        """(n,) best adapter scores -> (n,) True where the request should go to the base model."""
        best = np.asarray(best_scores, dtype=np.float64)
        return np.zeros(best.shape, dtype=bool) if self.off_pool is None else self.off_pool.off_pool(best)


@dataclass(frozen=True)
class PoolParameters:
    """The pool-wide part of a fit, everything but the per-adapter Gaussians: eps, the space
    (whitening, scale) and the off-pool threshold. Stored by the registry so that every replica
    fits its Gaussians with the same numbers (:func:`fit_with_parameters`).
    """

    eps: float
    scale: float
    whitener: Whitener | None
    off_pool: OffPoolThreshold | None
    calibration: EpsCalibration | None = None

    @classmethod
    def of(cls, model: PoolModel) -> PoolParameters:
        return cls(model.eps, model.scale, model.whitener, model.off_pool, model.calibration)

    def to_dict(self) -> dict:
        """JSON-able form (the whitener's arrays as nested lists; the calibration's summary only)."""
        w = self.whitener
        c = self.calibration
        return {
            "eps": self.eps, "scale": self.scale,
            "whitener": None if w is None else {"center": w.center.tolist(), "matrix": w.matrix.tolist()},
            "off_pool": None if self.off_pool is None else self.off_pool.to_dict(),
            "calibration": None if c is None else {
                "eps": c.eps, "rate": c.rate, "target_rate": c.target_rate, "criterion": c.criterion,
                "reached": c.reached, "mean_candidates": c.mean_candidates},
        }

    @cached_property
    def digest(self) -> str:
        """A stable hash of :meth:`to_dict` (equal parameters, equal digest)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @cached_property
    def space_digest(self) -> str:
        """A hash of the space alone (scale and whitening): the Gaussians' means move when it changes."""
        w = self.whitener
        parts = [repr(self.scale).encode()]
        if w is not None:
            parts += [np.ascontiguousarray(w.center).tobytes(), np.ascontiguousarray(w.matrix).tobytes()]
        return hashlib.sha1(b"|".join(parts)).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> PoolParameters:
        w, c, o = d.get("whitener"), d.get("calibration"), d.get("off_pool")
        whitener = None if w is None else Whitener(np.asarray(w["center"]), np.asarray(w["matrix"]))
        calibration = None if c is None else EpsCalibration(
            float(c["eps"]), float(c["rate"]), float(c["target_rate"]), str(c["criterion"]), bool(c["reached"]),
            np.zeros(0), np.zeros(0), c.get("mean_candidates"))
        return cls(float(d["eps"]), float(d["scale"]), whitener, None if o is None else OffPoolThreshold.from_dict(o),
                   calibration)


def fit_with_parameters(sample_sets: Sequence[np.ndarray], params: PoolParameters,
                        dtype: str = "float32") -> PoolModel:
    """Fit every adapter's Gaussian in the space and with the eps of ``params`` (no calibration)."""
    if len(sample_sets) == 0:
        raise EmptyPoolError("cannot fit an empty pool")
    raw = [np.asarray(s, dtype=np.float64) for s in sample_sets]
    space = [_to_space(s, params.whitener, params.scale) for s in raw]
    bank = GaussianBank([fit_gaussian(s, params.eps) for s in space], dtype=np.dtype(dtype))
    return PoolModel(bank=bank, means=np.stack([s.mean(axis=0) for s in raw]), eps=params.eps,
                     whitener=params.whitener, calibration=params.calibration, scale=params.scale,
                     off_pool=params.off_pool)


def _to_space(z: np.ndarray, whitener: Whitener | None, scale: float) -> np.ndarray:
    """Raw embeddings (n, d) -> the space the Gaussians live in (whitened, then scaled)."""
    z = np.asarray(z, dtype=np.float64)
    return (z if whitener is None else whitener(z)) * scale


def fit_pool(
    sample_sets: Sequence[np.ndarray],
    settings: GaussianFitSettings | None = None,
    reference: np.ndarray | None = None,
) -> PoolModel:
    """Fit every adapter's Gaussian with the pool-wide eps and whitening policy, and the off-pool threshold.

    Args:
        sample_sets: one (m_i, d) array of sample embeddings per adapter (m_i >= 2; >= 3 to calibrate).
        settings: the fit policy (default: calibrated eps, no whitening).
        reference: (R, d) raw embeddings of general requests (:func:`hilora_core.routing.fallback.
            load_reference_requests`, same embedder as the samples), or None.
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
    # leave-one-out fits of (a subset of) the samples: eps calibration and the off-pool threshold share them
    usable = [z for z in space if len(z) >= 3]
    loo = LeaveOneOutScores(subset_for_calibration(usable, 128, seed=0)) if usable else None
    calibration = None
    if settings.eps is None:
        calibration = calibrate_eps(space, settings.target_rate, criterion=settings.criterion, loo=loo)
        eps = calibration.eps
    else:
        eps = float(settings.eps)
    bank = GaussianBank([fit_gaussian(s, eps) for s in space], dtype=np.dtype(settings.dtype))
    model = PoolModel(bank=bank, means=means, eps=eps, whitener=whitener, calibration=calibration, scale=scale)
    model.off_pool = fit_off_pool(model, loo, settings, reference)
    return model


def fit_off_pool(
    model: PoolModel, loo: LeaveOneOutScores | None, settings: GaussianFitSettings, reference: np.ndarray | None
) -> OffPoolThreshold | None:
    """The off-pool threshold of a fitted pool (:mod:`hilora_core.routing.fallback`).

    Args:
        model: the fitted pool.
        loo: leave-one-out fits of the pool's samples in the model's space (None: no adapter has 3 samples).
        settings: the quantiles.
        reference: (R, d) raw reference embeddings, or None.
    """
    sample_best = None if loo is None else loo.scores(model.eps).max(axis=1)
    reference_best = None
    if reference is not None:
        ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
        if ref.shape[1] != model.bank.dim:
            raise DimensionMismatchError(
                f"reference embeddings have dimension {ref.shape[1]}, the pool's samples {model.bank.dim}"
            )
        reference_best = model.score(ref).max(axis=1)
    return calibrate_off_pool(sample_best, reference_best, settings.fallback_sample_quantile,
                              settings.fallback_reference_quantile)
