"""Keeping a scorer's :class:`hilora_core.pool.PoolModel` in step with a changing pool.

Small pools (< ``incremental_fit_min_pool``): every change refits the whole pool with
:func:`fit_registry_pool` (pool-wide eps calibration and whitening from all samples).

Large pools: a change fits only the changed adapter's Gaussian, in the space of the
last full fit (its whitening and standardising scale) and with its eps, and reassembles
the bank from the cached per-adapter factors (a memory copy, no SVDs). A full refit
(recalibrated eps, new whitening and scale) runs once the number of changes since the
last one exceeds ``recalibrate_fraction`` times the pool size (default 1: about when the
pool has doubled), so its cost (eps calibration scores a 256-adapter subset's samples on
a 91-value grid; minutes on a busy 2-core host) is amortised over many registrations.
With a fixed eps, no whitening and no standardisation the two paths give identical
Gaussians.
Adapters are always kept in sorted id order, so every scorer fits the same pool the
same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from hilora_core.gaussian import FactoredGaussian, GaussianBank, fit_gaussian
from hilora_core.pool import GaussianFitSettings, PoolModel, fit_pool


def fit_registry_pool(
    sample_sets: Sequence[np.ndarray], settings: GaussianFitSettings, fallback_eps: float
) -> PoolModel:
    """:func:`hilora_core.pool.fit_pool`, also for pools where some adapters have only 2 samples.

    Leave-one-out calibration needs 3 samples per adapter: eps is calibrated on the adapters
    that have them (with the same standardisation and whitening policy) and then used for
    the whole pool; with no such adapter, ``fallback_eps`` is used.
    """
    if settings.eps is not None or all(len(s) >= 3 for s in sample_sets):
        return fit_pool(sample_sets, settings)
    usable = [s for s in sample_sets if len(s) >= 3]
    calibration = fit_pool(usable, settings).calibration if usable else None
    eps = calibration.eps if calibration is not None else fallback_eps
    model = fit_pool(sample_sets, replace(settings, eps=eps))
    model.calibration = calibration
    return model


def _compact(g: FactoredGaussian) -> FactoredGaussian:
    """float32 copy of the large arrays (the bank computes in its own dtype anyway)."""
    return FactoredGaussian(g.mean.astype(np.float32), g.basis.astype(np.float32), g.variances, g.eps, g.n_samples)


def _gaussians_of(bank: GaussianBank) -> list[FactoredGaussian]:
    """Per-adapter views into a bank (padding directions have variance 0 and are dropped)."""
    ranks = (bank.variances > 0).sum(axis=1)
    return [
        FactoredGaussian(bank.means[i], bank.bases[i, : ranks[i]], bank.variances[i, : ranks[i]],
                         float(bank.eps[i]), int(bank.n_samples[i]))
        for i in range(len(bank))
    ]


class IncrementalPoolFit:
    """The samples of every adapter and the model fitted from them.

    Args:
        settings: pool fit policy (``RegistryConfig.fit``).
        fallback_eps: see :func:`fit_registry_pool`.
        incremental_min_pool: pool size from which changes are fitted incrementally.
        recalibrate_fraction: fraction of changed adapters that triggers a full refit.
    """

    def __init__(self, settings: GaussianFitSettings, fallback_eps: float, incremental_min_pool: int,
                 recalibrate_fraction: float) -> None:
        self.settings = settings
        self.fallback_eps = fallback_eps
        self.incremental_min_pool = incremental_min_pool
        self.recalibrate_fraction = recalibrate_fraction
        self.samples: dict[str, np.ndarray] = {}  # id -> (m, d) float32 raw embeddings
        self._gaussians: dict[str, FactoredGaussian] = {}  # id -> Gaussian in the model's space
        self._model: PoolModel | None = None
        self._changed_since_full: set[str] = set()
        self.full_fits = 0
        self.incremental_fits = 0

    def reset(self, samples: Mapping[str, np.ndarray]) -> None:
        self.samples = {k: np.asarray(v, dtype=np.float32) for k, v in samples.items()}
        self._gaussians, self._model, self._changed_since_full = {}, None, set()

    def apply(self, puts: Mapping[str, np.ndarray], removes: Sequence[str]) -> None:
        for adapter_id in removes:
            self.samples.pop(adapter_id, None)
            self._gaussians.pop(adapter_id, None)
            self._changed_since_full.add(adapter_id)
        for adapter_id, z in puts.items():
            self.samples[adapter_id] = np.asarray(z, dtype=np.float32)
            self._gaussians.pop(adapter_id, None)
            self._changed_since_full.add(adapter_id)

    def _needs_full_fit(self) -> bool:
        n = len(self.samples)
        if self._model is None or n < self.incremental_min_pool:
            return True
        return len(self._changed_since_full) > self.recalibrate_fraction * n

    def build(self, force_full: bool = False) -> tuple[list[str], PoolModel | None]:
        """(ids in sorted order, fitted model) for the current samples; (.., None) when empty."""
        ids = sorted(self.samples)
        if not ids:
            self._model, self._gaussians, self._changed_since_full = None, {}, set()
            return ids, None
        raw_means = np.stack([self.samples[i].mean(axis=0, dtype=np.float64) for i in ids])
        if force_full or self._needs_full_fit():
            model = fit_registry_pool([self.samples[i] for i in ids], self.settings, self.fallback_eps)
            self._gaussians = dict(zip(ids, _gaussians_of(model.bank), strict=True))
            self._changed_since_full = set()
            self.full_fits += 1
        else:
            prev = self._model
            assert prev is not None
            for i in ids:
                if i not in self._gaussians:
                    self._gaussians[i] = _compact(fit_gaussian(prev.transform(self.samples[i]), prev.eps))
                    self.incremental_fits += 1
            bank = GaussianBank([self._gaussians[i] for i in ids], dtype=np.dtype(self.settings.dtype))
            model = PoolModel(bank=bank, means=raw_means, eps=prev.eps, whitener=prev.whitener,
                              calibration=prev.calibration, scale=prev.scale)
            # views into the new bank: the old one can be freed
            self._gaussians = dict(zip(ids, _gaussians_of(bank), strict=True))
        self._model = model
        return ids, model
