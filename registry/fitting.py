"""Keeping a scorer's :class:`hilora_core.routing.pool.PoolModel` in step with a changing pool.

Small pools (< ``incremental_fit_min_pool``): every change refits the whole pool with
:func:`fit_registry_pool` (pool-wide eps calibration and whitening from all samples).

Large pools: a change fits only the changed adapter's Gaussian, in the space of the
last full fit (its whitening and standardising scale) and with its eps, and reassembles
the bank from the cached per-adapter factors (a memory copy, no SVDs). A full refit
(recalibrated eps, new whitening and scale, new off-pool threshold) runs once the number
of changes since the last one exceeds ``recalibrate_fraction`` times the pool size
(default 1: about when the pool has doubled), so its cost (eps calibration scores a
256-adapter subset's samples on a 91-value grid; minutes on a busy 2-core host) is
amortised over many registrations. With a fixed eps, no whitening and no
standardisation the two paths give identical Gaussians.

The pool-wide parameters of the last full fit are stored in Redis next to the records
(:class:`SharedParameters`), with the epoch they were computed at: every scorer uses the
stored ones while they are fresh, so replicas route alike whatever their history.
Adapters are always kept in sorted id order, so every scorer fits the same pool the
same way.

Large pools also start from a stored fit (:mod:`registry.fitted_pool`): the Gaussians
themselves are loaded (:meth:`IncrementalPoolFit.load_fitted`) and the samples are
fetched only if a full refit comes due.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np

from hilora_core.routing.gaussian import FactoredGaussian, GaussianBank
from hilora_core.routing.pool import GaussianFitSettings, PoolModel, PoolParameters, fit_pool, fit_with_parameters

from .fitted_pool import FittedPool


def fit_registry_pool(
    sample_sets: Sequence[np.ndarray], settings: GaussianFitSettings, fallback_eps: float,
    reference: np.ndarray | None = None,
) -> PoolModel:
    """:func:`hilora_core.routing.pool.fit_pool`, also for pools where some adapters have only 2 samples.

    Leave-one-out calibration needs 3 samples per adapter: eps is calibrated on the adapters
    that have them (with the same standardisation and whitening policy) and then used for
    the whole pool; with no such adapter, ``fallback_eps`` is used. ``reference``: (R, d) raw
    embeddings of the general requests that set the off-pool threshold, or None.
    """
    if settings.eps is not None or all(len(s) >= 3 for s in sample_sets):
        return fit_pool(sample_sets, settings, reference)
    usable = [s for s in sample_sets if len(s) >= 3]
    calibration = fit_pool(usable, settings).calibration if usable else None
    eps = calibration.eps if calibration is not None else fallback_eps
    model = fit_pool(sample_sets, replace(settings, eps=eps), reference)
    model.calibration = calibration
    return model


def _raw_mean(z: np.ndarray) -> np.ndarray:
    """(m, d) samples -> (d,) float64 mean, computed as :func:`fit_pool` computes ``PoolModel.means``."""
    return np.asarray(z, dtype=np.float64).mean(axis=0)


def _gaussians_of(bank: GaussianBank) -> list[FactoredGaussian]:
    """Per-adapter views into a bank (padding directions have variance 0 and are dropped)."""
    ranks = (bank.variances > 0).sum(axis=1)
    return [
        FactoredGaussian(bank.means[i], bank.bases[i, : ranks[i]], bank.variances[i, : ranks[i]],
                         float(bank.eps[i]), int(bank.n_samples[i]))
        for i in range(len(bank))
    ]


@dataclass(frozen=True)
class StoredParameters:
    """Pool parameters as shared between scorers: computed at ``epoch`` under ``key`` (settings,
    embedder and reference set); see :class:`SharedParameters`."""

    epoch: int
    key: str
    params: PoolParameters


SampleLoader = Callable[[Sequence[str]], Mapping[str, np.ndarray]]  # ids -> (m, d) samples of those still stored


class SharedParameters(Protocol):
    """Where scorers share the pool parameters (the registry's Redis; absent in plain unit use)."""

    def load(self) -> StoredParameters | None: ...

    def save(self, stored: StoredParameters) -> None: ...


class IncrementalPoolFit:
    """The samples of every adapter and the model fitted from them.

    The pool-wide parameters (eps, space, off-pool threshold: :class:`PoolParameters`) are
    computed by a full fit and, when ``shared`` is given, stored for every scorer. A scorer
    uses the stored parameters while they are fresh for its epoch and fits only the
    Gaussians itself, so all scorers at one epoch decide alike:

    - pools below ``incremental_min_pool``: fresh only when computed at this very epoch (every
      change recalibrates);
    - larger pools: fresh while fewer than ``recalibrate_fraction`` times the pool size changes
      (epochs) separate them from this epoch; a changed adapter's Gaussian is fitted alone.

    Args:
        settings: pool fit policy (``RegistryConfig.fit``).
        fallback_eps: see :func:`fit_registry_pool`.
        incremental_min_pool: pool size from which changes are fitted incrementally.
        recalibrate_fraction: fraction of changed adapters that triggers a full refit.
        shared: the shared parameter store (None: this process keeps its own).
    """

    def __init__(self, settings: GaussianFitSettings, fallback_eps: float, incremental_min_pool: int,
                 recalibrate_fraction: float, shared: SharedParameters | None = None) -> None:
        self.settings = settings
        self.fallback_eps = fallback_eps
        self.incremental_min_pool = incremental_min_pool
        self.recalibrate_fraction = recalibrate_fraction
        self.shared = shared
        self.samples: dict[str, np.ndarray] = {}  # id -> (m, d) float32 raw embeddings, where held
        self._unloaded: set[str] = set()  # ids taken from a stored fit whose samples are not held
        self.sample_loader: SampleLoader | None = None  # fetches samples of unloaded ids for a refit
        self._raw_means: dict[str, np.ndarray] = {}  # id -> (d,) float64 mean of its raw samples
        self._gaussians: dict[str, FactoredGaussian] = {}  # id -> Gaussian fitted with self._stored
        self._bank: tuple[tuple[str, ...], str, GaussianBank, np.ndarray] | None = None  # ids, digest, bank, means
        self._stored: StoredParameters | None = None  # the parameters of the current model
        self._changes = 0  # changes applied, the epoch stand-in when build() is given none
        self._reference: np.ndarray | None = None
        self._key = self._make_key()
        self.full_fits = 0
        self.incremental_fits = 0

    def reset(self, samples: Mapping[str, np.ndarray]) -> None:
        self.samples = {k: np.asarray(v, dtype=np.float32) for k, v in samples.items()}
        self._raw_means = {k: _raw_mean(v) for k, v in self.samples.items()}
        self._unloaded = set()
        self._gaussians, self._stored, self._bank = {}, None, None

    def load_fitted(self, fitted: FittedPool, stored: StoredParameters) -> None:
        """Take the Gaussians of a stored fit (made with ``stored``'s parameters) instead of fitting.

        Samples are not held afterwards; a later full refit fetches them with ``sample_loader``.
        """
        ids = list(fitted.ids)
        self.samples, self._unloaded = {}, set(ids)
        self._raw_means = dict(zip(ids, fitted.raw_means, strict=True))
        self._gaussians = dict(zip(ids, _gaussians_of(fitted.bank), strict=True))
        self._stored = stored
        self._bank = (tuple(ids), stored.params.digest, fitted.bank, fitted.raw_means)

    def apply(self, puts: Mapping[str, np.ndarray], removes: Sequence[str]) -> None:
        for adapter_id in removes:
            self.samples.pop(adapter_id, None)
            self._unloaded.discard(adapter_id)
            self._raw_means.pop(adapter_id, None)
            self._gaussians.pop(adapter_id, None)
            self._changes += 1
        for adapter_id, z in puts.items():
            self.samples[adapter_id] = np.asarray(z, dtype=np.float32)
            self._unloaded.discard(adapter_id)
            self._raw_means[adapter_id] = _raw_mean(self.samples[adapter_id])
            self._gaussians.pop(adapter_id, None)
            self._changes += 1

    def ids(self) -> list[str]:
        """Every adapter of the pool, sorted."""
        return sorted(self.samples.keys() | self._unloaded)

    def _load_samples(self, ids: Sequence[str]) -> None:
        """Fetch the samples of ``ids`` not held; ids the loader no longer knows leave the fit
        (they were removed from the store; the changelog will say so)."""
        missing = [i for i in ids if i not in self.samples]
        if not missing:
            return
        if self.sample_loader is None:
            raise RuntimeError(f"{len(missing)} adapters have no samples in memory and no sample_loader is set")
        got = self.sample_loader(missing)
        for i in missing:
            self._unloaded.discard(i)
            if i in got:
                self.samples[i] = np.asarray(got[i], dtype=np.float32)
            else:
                self._raw_means.pop(i, None)
                self._gaussians.pop(i, None)

    @property
    def reference(self) -> np.ndarray | None:
        """(R, d) raw embeddings of the general requests that set the off-pool threshold, or None."""
        return self._reference

    @reference.setter
    def reference(self, z: np.ndarray | None) -> None:
        if z is not self._reference:
            self._reference = z
            self._key = self._make_key()

    def _make_key(self) -> str:
        ref = b"" if self._reference is None else np.ascontiguousarray(self._reference, dtype="<f4").tobytes()
        settings = json.dumps({**asdict(self.settings), "fallback_eps": self.fallback_eps}, sort_keys=True)
        return hashlib.sha1(settings.encode() + hashlib.sha1(ref).digest()).hexdigest()[:20]

    def key(self) -> str:
        """What stored parameters must have been computed under: fit settings and reference set."""
        return self._key

    def space_digest(self) -> str | None:
        """Identifies the space the current Gaussians live in (whitening and scale); None before a fit."""
        return None if self._stored is None else self._stored.params.space_digest

    def params_digest(self) -> str | None:
        """The digest of the parameters the current Gaussians were fitted with; None before a fit."""
        return None if self._stored is None else self._stored.params.digest

    def _fresh(self, stored: StoredParameters | None, epoch: int, n: int) -> bool:
        if stored is None or stored.key != self.key():
            return False
        if n < self.incremental_min_pool:
            return stored.epoch == epoch
        return abs(epoch - stored.epoch) <= self.recalibrate_fraction * n

    def build(self, force_full: bool = False, epoch: int | None = None) -> tuple[list[str], PoolModel | None]:
        """(ids in sorted order, fitted model) for the current samples at pool ``epoch``; (.., None) when empty."""
        ids = self.ids()
        if not ids:
            self._gaussians, self._stored, self._bank = {}, None, None
            return ids, None
        epoch = self._changes if epoch is None else epoch
        stored = None
        if not force_full:
            stored = self.shared.load() if self.shared is not None else None
            if not self._fresh(stored, epoch, len(ids)):
                stored = self._stored if self._fresh(self._stored, epoch, len(ids)) else None
        if stored is None:
            self._load_samples(ids)
            ids = sorted(self.samples)
            model = fit_registry_pool([self.samples[i] for i in ids], self.settings, self.fallback_eps,
                                      self.reference)
            stored = StoredParameters(epoch, self.key(), PoolParameters.of(model))
            if self.shared is not None:
                self.shared.save(stored)
            self._gaussians = dict(zip(ids, _gaussians_of(model.bank), strict=True))
            self._bank = (tuple(ids), stored.params.digest, model.bank, model.means)
            self.full_fits += 1
        else:
            if self._stored is None or stored.params.digest != self._stored.params.digest:
                self._gaussians = {}  # other parameters: every Gaussian is refitted with them
            params = stored.params
            todo = [i for i in ids if i not in self._gaussians]
            self._load_samples(todo)
            ids = self.ids()
            for i in todo:
                if i in self.samples:
                    one = fit_with_parameters([self.samples[i]], params, dtype="float32").bank
                    self._gaussians[i] = _gaussians_of(one)[0]
                    self.incremental_fits += 1
            cached = self._bank
            if cached is not None and cached[0] == tuple(ids) and cached[1] == params.digest and not todo:
                bank, raw_means = cached[2], cached[3]
            else:
                bank = GaussianBank([self._gaussians[i] for i in ids], dtype=np.dtype(self.settings.dtype))
                raw_means = np.stack([self._raw_means[i] for i in ids])
                self._gaussians = dict(zip(ids, _gaussians_of(bank), strict=True))  # views: the old bank can go
                self._bank = (tuple(ids), params.digest, bank, raw_means)
            model = PoolModel(bank=bank, means=raw_means, eps=params.eps, whitener=params.whitener,
                              calibration=params.calibration, scale=params.scale, off_pool=params.off_pool)
        self._stored = stored
        return ids, model
