"""The read side: a process-local copy of the pool that scores and routes requests.

A :class:`PoolScorer` loads every adapter from Redis at start-up, then follows the
store: each change publishes ``{"epoch", "op", "id"}``; the scorer reads the
changelog since its own epoch and fetches only the changed adapters (once per burst).
If it missed more changes than the changelog keeps (or the store's epoch went backwards),
it reloads the whole pool. It polls the epoch every ``poll_interval_s`` (lost messages).

Each refresh builds a new immutable :class:`PoolSnapshot` (fitted model, FAISS
prefilter index, names, ranks) off the request path and swaps it in; requests use
whatever snapshot is current. When Redis is down the scorer keeps serving its last
snapshot and reports ``degraded=True`` with the error, retrying in the background.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

import numpy as np

from hilora_core.errors import DimensionMismatchError, InvalidInputError
from hilora_core.models.embedding import EmbedderIdentity, SentenceEmbedder
from hilora_core.policies import PolicyConfig
from hilora_core.routing.pool import PoolModel

from .config import RegistryConfig, build_embedder
from .connection import REDIS_ERRORS, connect
from .decision import Decision
from .errors import EmbedderMismatchError, RegistryUnavailableError
from .fitted_pool import FittedHeader
from .fitting import IncrementalPoolFit, StoredParameters
from .prefilter import IndexKeeper, MeanIndex
from .records import AdapterRecord, StoredAdapter
from .reference_set import ReferenceSet
from .routing import PoolSnapshot, route_on_snapshot
from .store import AdapterStore, Change, identity_key


class _RedisParameters:
    """The store as the fit's shared parameter place; Redis errors leave the fit to this process."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def load(self) -> StoredParameters | None:
        try:
            return self.store.get_parameters()
        except RegistryUnavailableError:
            return None

    def save(self, stored: StoredParameters) -> None:
        with contextlib.suppress(RegistryUnavailableError):
            self.store.put_parameters(stored)


def _drain_burst(pubsub, quiet_s: float = 0.05, longest_s: float = 1.0) -> None:
    """Take change messages until none came for ``quiet_s`` (at most ``longest_s``): a batch registration writes
    adapters ms apart, and each catch-up refits, so one catch-up per burst keeps fits off the embedder's cores."""
    end, quiet_until = time.monotonic() + longest_s, time.monotonic() + quiet_s
    while time.monotonic() < min(end, quiet_until):
        if pubsub.get_message(timeout=0.005) is not None:
            quiet_until = time.monotonic() + quiet_s


class PoolScorer:
    """Scores and routes requests against the registered pool.

    Args:
        config: registry settings (Redis URL, fit policy, prefilter).
        embedder: embeds request texts (default: built from the config on first use).
        identity: the embedder identity queries are made with, for callers that pass
            embeddings only (default: ``embedder.identity``).
        follow: run the background thread that follows the store.
        store: an existing :class:`AdapterStore` to share (default: connect by ``config``).
    """

    def __init__(
        self,
        config: RegistryConfig | None = None,
        *,
        embedder: SentenceEmbedder | None = None,
        identity: EmbedderIdentity | None = None,
        follow: bool = True,
        store: AdapterStore | None = None,
    ) -> None:
        self.config = config or RegistryConfig()
        self._embedder = embedder
        self._identity = identity or (embedder.identity if embedder is not None else None)
        self.url: str | None = None
        if store is None:
            client, self.url = connect(self.config)
            store = AdapterStore(client, self.config)
        self.store = store
        sc = self.config.scorer
        self._fit = IncrementalPoolFit(self.config.fit, sc.fallback_eps, sc.incremental_fit_min_pool,
                                       sc.recalibrate_fraction, shared=_RedisParameters(store))
        self._fit.sample_loader = self._load_samples
        self.started_from_stored_fit = False
        self.fits_stored = 0
        self._stored_cells = 0  # self._index.trained when this scorer last stored the fit
        self._records: dict[str, AdapterRecord] = {}
        self._epoch = 0
        self._snapshot = PoolSnapshot(0, (), np.zeros(0, np.int64), {}, None)
        pf = self.config.prefilter
        self._index = IndexKeeper(pf.min_pool, pf.index, pf.nprobe, pf.gpu)
        self._references = ReferenceSet(store, self.config, lambda: self._embedder, lambda: self.embedder)
        self._lock = threading.RLock()  # guards the mutable state above (not the snapshot)
        self.degraded = False
        self.last_error: str | None = None
        self.full_reloads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._full_reload()
        except RegistryUnavailableError as exc:
            self._mark_degraded(exc)
        if follow:
            self._thread = threading.Thread(target=self._follow, name="hilora-pool-follower", daemon=True)
            self._thread.start()

    # ---- public ------------------------------------------------------------------------------

    @property
    def snapshot(self) -> PoolSnapshot:
        return self._snapshot

    @property
    def epoch(self) -> int:
        return self._snapshot.epoch

    @property
    def identity(self) -> EmbedderIdentity:
        if self._identity is None:
            self._identity = self.embedder.identity
        return self._identity

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            self._embedder = build_embedder(self.config)
            if self._identity is not None and self._identity != self._embedder.identity:
                raise EmbedderMismatchError(
                    f"the configured embedder {self._embedder.identity.to_dict()} differs from the scorer's "
                    f"identity {self._identity.to_dict()}"
                )
        return self._embedder

    def refresh(self) -> int:
        """Catch up with the store now; returns the new epoch. Raises RegistryUnavailableError."""
        try:
            self._catch_up()
        except RegistryUnavailableError as exc:
            self._mark_degraded(exc)
            raise
        self._mark_healthy()
        return self.epoch

    def ensure_epoch(self, epoch: int) -> None:
        """Catch up if this copy is older than ``epoch`` (best effort: degraded on failure)."""
        if self.epoch < epoch:
            with contextlib.suppress(RegistryUnavailableError):
                self.refresh()

    def recalibrate(self) -> None:
        """Refit the whole pool now (eps calibration, whitening) from the samples held."""
        with self._lock:
            self._rebuild(force_full=True)

    def status(self) -> dict:
        snap = self._snapshot
        model = snap.model
        return {
            "epoch": snap.epoch, "adapters": len(snap.ids), "degraded": self.degraded, "error": self.last_error,
            "eps": None if model is None else model.eps, "whitened": bool(model and model.whitener is not None),
            "prefilter": snap.index is not None, "prefilter_gpu": bool(snap.index and snap.index.on_gpu),
            "full_reloads": self.full_reloads, "full_fits": self._fit.full_fits,
            "incremental_fits": self._fit.incremental_fits,
            "started_from_stored_fit": self.started_from_stored_fit, "fits_stored": self.fits_stored,
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> PoolScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def route(self, texts: Sequence[str], policy: PolicyConfig | None = None,
              explicit: Sequence[str] | None = None) -> list[Decision]:
        """Embed ``texts`` and route them (see :meth:`route_embeddings`)."""
        if isinstance(texts, str):
            raise InvalidInputError("route takes a list of texts, got a single string")
        z = self.embedder.encode(list(texts))
        return self.route_embeddings(z, policy, explicit=explicit, identity=self.embedder.identity)

    def route_embeddings(
        self,
        z: np.ndarray,
        policy: PolicyConfig | None = None,
        *,
        explicit: Sequence[str] | None = None,
        identity: EmbedderIdentity | None = None,
        use_prefilter: bool | None = None,
    ) -> list[Decision]:
        """Route (n, d) query embeddings with ``policy`` (default: HiLoRA).

        Args:
            z: (n, d) embeddings made by ``identity`` (default: the scorer's identity).
            policy: any policy of :func:`hilora_core.policies.make_plans`.
            explicit: adapter names for the explicit policy.
            use_prefilter: force the FAISS shortlist on/off (default: on from
                ``prefilter.min_pool`` adapters).

        Returns:
            one :class:`Decision` per row of ``z``.
        """
        cfg = policy or PolicyConfig()
        snap = self._snapshot
        degraded = self.degraded
        self._check_pool_identity(snap, identity or self.identity)
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        dim = (identity or self.identity).dim
        if z.ndim != 2 or z.shape[1] != dim:
            raise DimensionMismatchError(f"query embeddings must have shape (n, {dim}), got {tuple(z.shape)}")
        if not np.all(np.isfinite(z)):
            raise InvalidInputError("query embeddings contain a non-finite value")
        return route_on_snapshot(snap, z, cfg, self.config, explicit=explicit, use_prefilter=use_prefilter,
                                 degraded=degraded)

    def _check_pool_identity(self, snap: PoolSnapshot, identity: EmbedderIdentity) -> None:
        key = identity_key(identity)
        if all(identity_key(other) == key for other in snap.identities):  # a set of one, usually
            return
        bad = [i for i, r in snap.records.items() if identity_key(r.embedder) != key]
        other = snap.records[bad[0]].embedder
        raise EmbedderMismatchError(
            f"{len(bad)} adapter(s) (e.g. {bad[:5]}) were embedded with {other.to_dict()}, "
            f"but queries are embedded with {identity.to_dict()}; refusing to score"
        )

    # ---- following the store -----------------------------------------------------------------

    def _mark_degraded(self, exc: Exception) -> None:
        self.degraded = True
        self.last_error = str(exc)

    def _mark_healthy(self) -> None:
        self.degraded = False
        self.last_error = None

    def _full_reload(self) -> None:
        with self._lock:
            self._index.reset()
            self.full_reloads += 1
            if not self._start_from_stored_fit():
                epoch, ids = self.store.snapshot_ids()
                fetched = self.store.fetch(ids)
                self._records = {k: v.record for k, v in fetched.items()}
                self._fit.reset({k: v.embeddings for k, v in fetched.items()})
                self._epoch = epoch
                self._rebuild()
            self._catch_up()  # changes made while we were reading

    def _start_from_stored_fit(self) -> bool:
        """Take the fitted pool stored in Redis, if it is usable; True if taken (caller holds the lock).

        Usable: fitted with the stored pool parameters, under this scorer's fit key, and with the
        changelog still complete since its epoch (the caller replays those changes).
        """
        if self.config.scorer.store_fit_every == 0:
            return False
        header = self.store.fitted_header()
        stored = self.store.get_parameters()
        if header is None or stored is None or stored.params.digest != header.digest or stored.key != header.key:
            return False
        if not self.store.changes_since(header.epoch)[1]:
            return False
        fitted = self.store.get_fitted()
        if fitted is None or fitted.header != header or len(fitted.ids) < self.config.scorer.incremental_fit_min_pool:
            return False
        self._records = dict(zip(fitted.ids, fitted.records, strict=True))
        self._fit.reference = self._reference_for_pool()
        if header.key != self._fit.key():  # another fit policy or reference set than this scorer's
            return False
        self._fit.load_fitted(fitted, stored)
        self._index.use_centroids(fitted.centroids)  # the writer's IVF cells: every replica shortlists alike
        self._epoch = header.epoch
        self.started_from_stored_fit = True
        self._rebuild()
        return True

    def _maybe_store_fit(self, ids: list[str], model: PoolModel, index: MeanIndex | None) -> None:
        """Store the fitted pool for new scorers when none is, or the stored one is outdated (older than
        ``store_fit_every`` changes, other parameters, or this scorer rebuilt its prefilter's cells since)."""
        every = self.config.scorer.store_fit_every
        digest = self._fit.params_digest()
        if every == 0 or len(ids) < self.config.scorer.incremental_fit_min_pool or digest is None:
            return
        key = self._fit.key()
        with contextlib.suppress(RegistryUnavailableError):
            h = self.store.fitted_header()
            new_cells = self._index.trained != self._stored_cells
            if (h is not None and h.key == key and h.digest == digest and self._epoch - h.epoch < every
                    and not new_cells):
                return
            header = FittedHeader(self._epoch, key, digest)
            centroids = None if index is None else index.centroids()
            if self.store.put_fitted(header, ids, [self._records[i] for i in ids], model.bank, model.means,
                                     centroids):
                self.fits_stored += 1
                self._stored_cells = self._index.trained

    def _load_samples(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """(m, d) samples of ``ids`` from the store (for a refit after starting from a stored fit)."""
        return {k: v.embeddings for k, v in self.store.fetch(list(ids)).items()}

    def _catch_up(self) -> None:
        # one catch-up at a time (follower thread vs. refresh() from a request thread);
        # requests never take this lock: they read the current snapshot
        with self._lock:
            changes, complete = self.store.changes_since(self._epoch)
            if not complete:
                self._full_reload()
                return
            if not changes:
                return
            last: dict[str, Change] = {}
            for ch in changes:
                last[ch.id] = ch
            put_ids = [i for i, ch in last.items() if ch.op == "put"]
            fetched: dict[str, StoredAdapter] = self.store.fetch(put_ids) if put_ids else {}
            removes = [i for i, ch in last.items() if ch.op == "remove" or i not in fetched]
            for i in removes:
                self._records.pop(i, None)
            for i, item in fetched.items():
                self._records[i] = item.record
            self._fit.apply({i: item.embeddings for i, item in fetched.items()}, removes)
            self._index.mark_changed(list(last))
            self._epoch = max(self._epoch, changes[-1].epoch)
            self._rebuild()

    def _reference_for_pool(self) -> np.ndarray | None:
        """(R, d) embeddings of the off-pool reference requests for the pool's embedder (:class:`ReferenceSet`)."""
        if not self._records:
            return None
        return self._references.embeddings(next(iter(self._records.values())).embedder)

    def _rebuild(self, force_full: bool = False) -> None:
        """Fit the current samples and swap in a new snapshot (caller holds the lock)."""
        # stored parameters fitted with another reference set are not fresh (the fit's key differs)
        self._fit.reference = self._reference_for_pool()
        space_before = self._fit.space_digest()
        ids, model = self._fit.build(force_full=force_full, epoch=self._epoch)
        if self._fit.space_digest() != space_before:
            self._index.mark_space_changed()  # a new whitening or scale moves every mean
        records = {i: self._records[i] for i in ids}
        ranks = np.array([records[i].rank for i in ids], dtype=np.int64)
        index, slot_to_pos = self._index.update(ids, None if model is None else model.bank.means)
        identities = frozenset(r.embedder for r in records.values())
        self._snapshot = PoolSnapshot(self._epoch, tuple(ids), ranks, records, model, index, slot_to_pos,
                                      identities=identities)
        if model is not None:
            self._maybe_store_fit(ids, model, index)

    def _follow(self) -> None:
        pubsub = None
        last_poll = time.monotonic()
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.store.pubsub()
                    self._catch_up()
                    self._mark_healthy()
                msg = pubsub.get_message(timeout=self.config.scorer.poll_interval_s)
                if msg is not None:
                    _drain_burst(pubsub)
                    self._catch_up()
                    last_poll = time.monotonic()
                elif time.monotonic() - last_poll >= self.config.scorer.poll_interval_s:
                    if self.store.epoch() != self.epoch:
                        self._catch_up()
                    last_poll = time.monotonic()
                self._mark_healthy()
            except (RegistryUnavailableError, *REDIS_ERRORS) as exc:
                self._mark_degraded(exc)
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                pubsub = None
                self._stop.wait(self.config.scorer.poll_interval_s)
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()
