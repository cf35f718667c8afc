"""The fitted pool stored in Redis: new scorers start from it, and every replica decides alike
(real Redis; synthetic embeddings, so no model is needed)."""

from __future__ import annotations

import numpy as np

from hilora_core.models.embedding import EmbedderIdentity
from tests.scorer_process import route_in_new_process

DIM = 16
IDENT = EmbedderIdentity("synthetic-test", None, DIM, "", True)
SPEC = {"rank": 8, "alpha": 16.0, "targets": ["q_proj"]}


def _config(redis_url: str, prefix: str, prefilter_min_pool: int = 2_000, **scorer):
    from registry.config import AdmissionSettings, PrefilterSettings, RegistryConfig, ScorerSettings, StoreSettings

    return RegistryConfig(store=StoreSettings(redis_url=redis_url, key_prefix=prefix, channel=f"{prefix}:events"),
                          admission=AdmissionSettings(hub_lookup=False),
                          prefilter=PrefilterSettings(min_pool=prefilter_min_pool),
                          scorer=ScorerSettings(poll_interval_s=0.2, **scorer))


def _samples(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    return (center + 0.3 * rng.standard_normal((8, DIM))).astype("f4")


def test_fitted_pool_round_trips_in_chunks_and_older_fits_are_refused(redis_url, monkeypatch):
    import registry.fitted_pool as fp
    from registry.fitted_pool import FittedHeader, FittedPoolStore
    from registry.registry import Registry

    reg = Registry(_config(redis_url, "fp-roundtrip", store_fit_every=0), identity=IDENT)
    rng = np.random.default_rng(0)
    for i in range(5):
        reg.register_embeddings(f"a{i}", "owner/repo", _samples(rng, rng.standard_normal(DIM) * 2), **SPEC)
    reg.scorer.refresh()
    snap = reg.scorer.snapshot
    bank, ids = snap.model.bank, list(snap.ids)
    records = [snap.records[i] for i in ids]
    store = FittedPoolStore(reg.store.client, "fp-roundtrip")
    monkeypatch.setattr(fp, "CHUNK_BYTES", 1)  # one adapter per chunk
    assert store.write(FittedHeader(10, "k", "d"), ids, records, bank, snap.model.means)
    back = store.read()
    assert back.header == FittedHeader(10, "k", "d") and back.ids == ids and back.records == records
    for name in ("means", "bases", "variances", "eps", "n_samples"):
        assert np.array_equal(getattr(back.bank, name), getattr(bank, name)), name
    assert np.array_equal(back.raw_means, snap.model.means)
    z = rng.standard_normal((4, DIM))
    assert np.array_equal(back.bank.score(z), bank.score(z))
    token = reg.store.client.hget(store.header_key, "token").decode()
    # an older fit under the same key and parameters is refused, and leaves nothing behind
    assert not store.write(FittedHeader(9, "k", "d"), ids, records, bank, snap.model.means)
    assert len(reg.store.client.keys("fp-roundtrip:fitted:*")) == len(ids) + 0  # chunks of the stored fit only
    # a newer one replaces it; the replaced chunks expire instead of vanishing under a reader
    assert store.write(FittedHeader(11, "k", "d"), ids, records, bank, snap.model.means)
    ttl = reg.store.client.ttl(f"fp-roundtrip:fitted:{token}:0")
    assert 0 < ttl <= fp.STALE_TTL_S
    # a reader whose chunks vanished gets None, not a partial pool
    new_token = reg.store.client.hget(store.header_key, "token").decode()
    reg.store.client.delete(f"fp-roundtrip:fitted:{new_token}:2")
    assert store.read() is None
    reg.close()


def test_replicas_decide_alike_after_100_incremental_registrations(redis_url, tmp_path):
    from dataclasses import replace

    from registry.registry import Registry

    cfg = _config(redis_url, "fp-replicas", incremental_fit_min_pool=8, recalibrate_fraction=1.0, store_fit_every=40,
                  prefilter_min_pool=50)  # the FAISS prefilter is on from 50 adapters
    reg = Registry(cfg, identity=IDENT)  # its scorer follows every registration, as a running replica does
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((120, DIM)) * 2
    for i, c in enumerate(centers[:20]):
        reg.register_embeddings(f"ad{i:03d}", "owner/repo", _samples(rng, c), **SPEC)
        reg.scorer.refresh()
    fits_before = reg.scorer.status()["full_fits"]
    for i, c in enumerate(centers[20:], start=20):  # 100 incremental registrations
        reg.register_embeddings(f"ad{i:03d}", "owner/repo", _samples(rng, c), **SPEC)
        reg.scorer.refresh()
    mine_status = reg.scorer.status()
    assert mine_status["full_fits"] == fits_before  # no pool-wide refit during the 100
    assert mine_status["fits_stored"] >= 2  # rewritten every 40 changes
    header = reg.store.fitted_header()
    assert reg.epoch() - 40 < header.epoch < reg.epoch()  # some changes are left to replay

    queries = np.concatenate([centers[::4] + 0.4 * rng.standard_normal(centers[::4].shape),
                              rng.standard_normal((8, DIM)) * 6]).astype("f4")
    np.save(tmp_path / "q.npy", queries)
    started = route_in_new_process(cfg, tmp_path / "q.npy")  # a new replica: starts from the stored fit
    no_stored_fit = replace(cfg, scorer=replace(cfg.scorer, store_fit_every=0))
    fitted_itself = route_in_new_process(no_stored_fit, tmp_path / "q.npy")  # fits every Gaussian
    assert started["status"]["started_from_stored_fit"] and not fitted_itself["status"]["started_from_stored_fit"]
    assert started["status"]["full_fits"] == 0 and fitted_itself["status"]["full_fits"] == 0
    assert started["status"]["incremental_fits"] == reg.epoch() - header.epoch  # only the replayed changes
    assert fitted_itself["status"]["incremental_fits"] == len(centers)

    # the new replica's prefilter uses the IVF cells stored with the fit, not cells of its own
    stored_cells = reg.store.get_fitted().centroids
    assert started["cells"] == stored_cells.tobytes().hex() == reg.scorer.snapshot.index.centroids().tobytes().hex()
    mine = [d.to_dict() for d in reg.scorer.route_embeddings(queries)]
    assert all(d["prefiltered"] for d in mine)
    my_scores = reg.scorer.snapshot.model.score(queries)
    for other in (started, fitted_itself):
        assert np.array_equal(np.asarray(other["scores"]), my_scores)  # bit for bit
        assert [d["plan"] for d in other["decisions"]] == [d["plan"] for d in mine]
        assert [d["off_pool"] for d in other["decisions"]] == [d["off_pool"] for d in mine]
    assert any(d["off_pool"]["fallback"] for d in mine) and not all(d["off_pool"]["fallback"] for d in mine)
    reg.close()


def test_stored_fit_is_not_used_under_another_fit_policy_and_refits_fetch_samples(redis_url):
    from dataclasses import replace

    from hilora_core.routing.pool import GaussianFitSettings
    from registry.registry import Registry
    from registry.scorer import PoolScorer

    cfg = _config(redis_url, "fp-policy", incremental_fit_min_pool=4, store_fit_every=1)
    reg = Registry(cfg, identity=IDENT)
    rng = np.random.default_rng(3)
    for i in range(6):
        reg.register_embeddings(f"p{i}", "owner/repo", _samples(rng, rng.standard_normal(DIM) * 2), **SPEC)
    reg.scorer.refresh()
    assert reg.store.fitted_header() is not None
    with PoolScorer(cfg, identity=IDENT, follow=False) as same:
        assert same.started_from_stored_fit and not same._fit.samples  # no samples held
        same.recalibrate()  # a full refit fetches the samples it needs
        assert len(same._fit.samples) == 6 and same.status()["full_fits"] == 1
        assert same.snapshot.ids == reg.scorer.snapshot.ids
    other_policy = replace(cfg, fit=GaussianFitSettings(eps=0.05))
    with PoolScorer(other_policy, identity=IDENT, follow=False) as other:
        assert not other.started_from_stored_fit and len(other.snapshot.ids) == 6
        assert other.snapshot.model.eps == 0.05
    reg.close()
