"""One Gaussian per adapter over sentence embeddings, stored in factored form.

For adapter ``i`` with ``m`` sample embeddings ``Z`` (m, d):

    mu    = mean(Z)                                  (d,)
    Sigma = Xc^T Xc / (m - 1) + eps * I,  Xc = Z - mu

The sample covariance has rank ``k <= m - 1``. A thin SVD ``Xc = P S Q`` gives
``Sigma = Q^T diag(lam) Q + eps * I`` with ``Q`` (k, d) orthonormal rows and
``lam = S**2 / (m - 1)``. We keep ``mu``, ``Q`` and ``lam``: ``d * (k + 1) + k``
numbers instead of ``d * d``.

With ``w = lam / (lam + eps)`` and ``delta = z - mu`` (Woodbury, determinant lemma):

    delta^T Sigma^-1 delta = (|delta|^2 - sum_j w_j (q_j . delta)^2) / eps
    log det Sigma          = d log eps + sum_j log(1 + lam_j / eps)

and the HiLoRA score is ``(1/d) * log N(z; mu, Sigma)``.

:class:`GaussianBank` stacks many such Gaussians and scores ``n`` queries
against all ``I`` of them with two matrix products: ``Z @ M^T`` (n, I) and
``Z @ Q_all^T`` (n, I*K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hilora_core.errors import DimensionMismatchError, EmptyPoolError, InvalidInputError

LOG_2PI = math.log(2.0 * math.pi)


def woodbury_terms(variances: np.ndarray, eps: np.ndarray | float, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The eps-dependent constants of factored Gaussians (the formula in the module docstring).

    Args:
        variances: (..., K) variances along each factor direction (0 for padding).
        eps: (...) isotropic variance of each Gaussian.
        dim: d.

    Returns:
        weights (..., K) ``lam / (lam + eps)`` and const (...) ``-(d log 2 pi + log det Sigma) / 2``.
    """
    var = np.asarray(variances, dtype=np.float64)
    e = np.asarray(eps, dtype=np.float64)[..., None]
    logdet = dim * np.log(e[..., 0]) + np.log1p(var / e).sum(axis=-1)
    return var / (var + e), -0.5 * (dim * LOG_2PI + logdet)


def score_from_terms(delta_sq: np.ndarray, proj_sq: np.ndarray, weights: np.ndarray, const: np.ndarray,
                     eps: np.ndarray | float, dim: int) -> np.ndarray:
    """HiLoRA scores ``(1/d) log N(z; mu, Sigma)``: the one place the log-density is written.

    Args:
        delta_sq: (...) ``|z - mu|^2``.
        proj_sq: (..., K) ``(q_j . (z - mu))^2`` on each factor direction.
        weights, const: :func:`woodbury_terms` of the Gaussians (broadcast against the above).
        eps: (...) their eps; dim: d.
    """
    explained = np.einsum("...k,...k->...", proj_sq, np.broadcast_to(weights, proj_sq.shape))
    return (const - 0.5 * (delta_sq - explained) / eps) / dim


def _check_finite(name: str, arr: np.ndarray) -> None:
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InvalidInputError(f"{name} contains a non-finite value at index {bad}: {arr[tuple(bad)]!r}")


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise InvalidInputError(f"eps must be a finite number > 0, got {eps!r}")
    return eps


@dataclass(frozen=True)
class FactoredGaussian:
    """``N(mean, basis^T diag(variances) basis + eps * I)``.

    Attributes:
        mean: (d,) the sample mean.
        basis: (k, d) orthonormal rows spanning the centred samples, k <= m - 1.
        variances: (k,) sample variance along each basis row (> 0).
        eps: isotropic variance added in every direction.
        n_samples: m, the number of samples fitted.
    """

    mean: np.ndarray
    basis: np.ndarray
    variances: np.ndarray
    eps: float
    n_samples: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def with_eps(self, eps: float) -> FactoredGaussian:
        """The same fit with another ``eps`` (the factor does not depend on eps)."""
        return FactoredGaussian(self.mean, self.basis, self.variances, _check_eps(eps), self.n_samples)


def fit_gaussian(samples: np.ndarray, eps: float, *, rel_tol: float = 1e-10) -> FactoredGaussian:
    """Fit one adapter's Gaussian from its sample embeddings.

    Args:
        samples: (m, d) embeddings, m >= 2, finite.
        eps: isotropic variance added to the sample covariance (> 0).
        rel_tol: singular values below ``rel_tol * max`` are dropped from the factor.

    Returns:
        The Gaussian in factored form (computed in float64).
    """
    z = np.asarray(samples, dtype=np.float64)
    if z.ndim != 2:
        raise InvalidInputError(f"samples must be a 2-D (m, d) array, got shape {z.shape}")
    m, d = z.shape
    if m < 2:
        raise InvalidInputError(f"need at least 2 samples to fit a Gaussian, got m={m}")
    if d < 1:
        raise InvalidInputError(f"samples have dimension d={d}")
    _check_finite("samples", z)
    eps = _check_eps(eps)
    mean = z.mean(axis=0)
    centred = z - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = s > rel_tol * max(float(s[0]) if s.size else 0.0, 1e-300)
    basis = vt[keep]
    variances = s[keep] ** 2 / (m - 1)
    return FactoredGaussian(mean=mean, basis=basis, variances=variances, eps=eps, n_samples=m)


class GaussianBank:
    """Many factored Gaussians of one dimension, scored together.

    Factors of different rank are zero-padded to ``K = max rank`` (a padded
    direction gets weight 0, so it changes nothing). Memory: about
    ``I * d * (K + 1)`` numbers of ``dtype``.

    Args:
        gaussians: the adapters' Gaussians, all of the same dimension.
        dtype: storage and compute precision (float32 for large pools,
            float64 for exactness).
    """

    def __init__(self, gaussians: Sequence[FactoredGaussian], dtype: np.dtype | type = np.float64) -> None:
        if len(gaussians) == 0:
            raise EmptyPoolError("GaussianBank needs at least one Gaussian, got an empty pool")
        dims = {g.dim for g in gaussians}
        if len(dims) != 1:
            raise DimensionMismatchError(f"all Gaussians must share one dimension, got dimensions {sorted(dims)}")
        self.dtype = np.dtype(dtype)
        self.dim = dims.pop()
        n = len(gaussians)
        k = max(1, max(g.rank for g in gaussians))
        self.means = np.stack([g.mean for g in gaussians]).astype(self.dtype)  # (I, d)
        self.bases = np.zeros((n, k, self.dim), dtype=self.dtype)  # (I, K, d)
        variances = np.zeros((n, k), dtype=np.float64)  # (I, K)
        for i, g in enumerate(gaussians):
            self.bases[i, : g.rank] = g.basis
            variances[i, : g.rank] = g.variances
        self.eps = np.array([g.eps for g in gaussians], dtype=np.float64)  # (I,)
        self.n_samples = np.array([g.n_samples for g in gaussians], dtype=np.int64)
        self.variances = variances
        self._precompute()

    @classmethod
    def from_arrays(cls, means: np.ndarray, bases: np.ndarray, variances: np.ndarray, eps: np.ndarray,
                    n_samples: np.ndarray) -> GaussianBank:
        """A bank from the arrays another bank holds (no copy where dtypes already match).

        Args:
            means: (I, d); bases: (I, K, d), same dtype as ``means``; variances: (I, K), 0 for
                padding; eps: (I,); n_samples: (I,).
        """
        n, k, d = bases.shape
        if n == 0:
            raise EmptyPoolError("GaussianBank needs at least one Gaussian, got an empty pool")
        if means.shape != (n, d) or variances.shape != (n, k) or eps.shape != (n,) or n_samples.shape != (n,):
            raise DimensionMismatchError(
                f"inconsistent bank arrays: means {means.shape}, bases {bases.shape}, variances {variances.shape}, "
                f"eps {eps.shape}, n_samples {n_samples.shape}"
            )
        bank = object.__new__(cls)
        bank.dtype = np.dtype(means.dtype)
        bank.dim = int(d)
        bank.means = means
        bank.bases = bases.astype(bank.dtype, copy=False)
        bank.variances = variances.astype(np.float64, copy=False)
        bank.eps = eps.astype(np.float64, copy=False)
        bank.n_samples = n_samples.astype(np.int64, copy=False)
        bank._precompute()
        return bank

    def _precompute(self) -> None:
        # weight of each basis direction in the Woodbury correction (0 for padding), constant term
        weights, self._const = woodbury_terms(self.variances, self.eps, self.dim)  # (I, K), (I,)
        self._weights = weights.astype(self.dtype)
        self._mean_sq = (self.means.astype(np.float64) ** 2).sum(axis=1)  # (I,)
        self._basis_dot_mean = np.einsum("ikd,id->ik", self.bases, self.means)  # (I, K)
        self._flat_bases = self.bases.reshape(-1, self.dim)  # (I*K, d)

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def with_eps(self, eps: float) -> GaussianBank:
        """A copy of this bank with one eps for every adapter (cheap: no refit)."""
        other = object.__new__(GaussianBank)
        other.__dict__.update(self.__dict__)
        other.eps = np.full(len(self), _check_eps(eps), dtype=np.float64)
        other._precompute()
        return other

    def take(self, indices: np.ndarray) -> GaussianBank:
        """A bank of the adapters at ``indices`` (I',), in that order (no refit)."""
        idx = np.asarray(indices, dtype=np.int64)
        other = object.__new__(GaussianBank)
        other.__dict__.update(self.__dict__)
        other.means, other.bases = self.means[idx], self.bases[idx]
        other.variances, other.eps, other.n_samples = self.variances[idx], self.eps[idx], self.n_samples[idx]
        other._precompute()
        return other

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors (means, bases, variances, precomputed terms)."""
        arrays = (self.means, self.bases, self.variances, self._weights, self._basis_dot_mean)
        return int(sum(a.nbytes for a in arrays))

    def score(self, z: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
        """HiLoRA scores ``(1/d) * log N(z; mu_i, Sigma_i)``.

        Args:
            z: (n, d) query embeddings (or (d,) for one query).
            subset: optional (I',) adapter indices; only those are scored.

        Returns:
            (n, I) scores (or (n, I') with ``subset``), float64.
        """
        return self.score_from_terms(*self.distance_terms(z, subset), subset=subset)

    def distance_terms(self, z: np.ndarray, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The eps-independent part of the scores: two matrix products.

        Returns:
            delta_sq (n, I): ``|z - mu_i|^2``; proj_sq (n, I, K): ``(q_ij . (z - mu_i))^2``.
        """
        z = np.asarray(z)
        if z.ndim == 1:
            z = z[None, :]
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise DimensionMismatchError(
                f"queries must have shape (n, {self.dim}), got {tuple(z.shape)}"
            )
        _check_finite("queries", z)
        z = z.astype(self.dtype, copy=False)
        if subset is None:
            means, bases, bdm, mean_sq = self.means, self._flat_bases, self._basis_dot_mean, self._mean_sq
        else:
            subset = np.asarray(subset, dtype=np.int64)
            means, bases = self.means[subset], self.bases[subset].reshape(-1, self.dim)
            bdm, mean_sq = self._basis_dot_mean[subset], self._mean_sq[subset]
        n, n_adapters, k = z.shape[0], means.shape[0], bdm.shape[1]
        z_sq = (z.astype(np.float64) ** 2).sum(axis=1)  # (n,)
        delta_sq = z_sq[:, None] - 2.0 * (z @ means.T) + mean_sq[None, :]  # (n, I)
        proj = (z @ bases.T).reshape(n, n_adapters, k) - bdm[None]  # (n, I, K): q_j . (z - mu)
        return delta_sq, proj.astype(np.float64) ** 2

    def score_from_terms(self, delta_sq: np.ndarray, proj_sq: np.ndarray,
                         subset: np.ndarray | None = None) -> np.ndarray:
        """Scores from :meth:`distance_terms` (possibly of another bank of the same fit with another eps)."""
        weights, const, eps = self._weights, self._const, self.eps
        if subset is not None:
            subset = np.asarray(subset, dtype=np.int64)
            weights, const, eps = weights[subset], const[subset], eps[subset]
        return score_from_terms(delta_sq, proj_sq, weights, const, eps, self.dim)
