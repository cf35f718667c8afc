"""Registry against a real redis-server: CRUD, atomicity, conflicts, bad input, persistence,
pub/sub refresh, degraded mode, prefilter. Synthetic embeddings (the embedder is covered in
test_registry_cli.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from hilora_core.errors import (
    AdapterLoadError,
    DimensionMismatchError,
    InvalidInputError,
    UnknownAdapterError,
)
from hilora_core.models.embedding import EmbedderIdentity
from hilora_core.policies import POLICIES, PolicyConfig
from hilora_core.routing.pool import GaussianFitSettings
from hilora_core.routing.sequence_routing import select_candidates
from registry import (
    AdmissionSettings,
    ConflictError,
    EmbedderMismatchError,
    IncompatibleAdapterError,
    PoolScorer,
    PrefilterSettings,
    Registry,
    RegistryConfig,
    RegistryUnavailableError,
    ScorerSettings,
    StoreSettings,
)
from registry.redis_server import RedisServer

DIM = 16
IDENT = EmbedderIdentity("synthetic-test", None, DIM, "", True)
FIT = GaussianFitSettings(eps=0.02)
SPEC = {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}


def _samples(rng: np.random.Generator, center: np.ndarray, m: int = 8, spread: float = 0.1) -> np.ndarray:
    return (center + spread * rng.standard_normal((m, center.size))).astype(np.float32)


def _wait(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _store_state(reg: Registry) -> dict:
    """Every key of the pool with its serialized value: equal states mean nothing changed."""
    client = reg.store.client
    return {k: client.dump(k) for k in sorted(client.keys(f"{reg.config.store.key_prefix}:*"))}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"), persistence="aof").start()
    yield srv
    srv.stop()


@pytest.fixture
def config(server, request):
    # a key prefix per test: tests share one server but not one pool
    prefix = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return RegistryConfig(
        store=StoreSettings(redis_url=server.url, key_prefix=prefix, channel=f"{prefix}:events", socket_timeout_s=1.0),
        fit=FIT, admission=AdmissionSettings(hub_lookup=False), scorer=ScorerSettings(poll_interval_s=0.2))


@pytest.fixture
def reg(config):
    r = Registry(config, identity=IDENT)
    yield r
    r.close()


def _fill(reg: Registry, n: int, seed: int = 0, prefix: str = "ad") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        z = _samples(rng, rng.standard_normal(DIM))
        reg.register_embeddings(f"{prefix}{i:03d}", "owner/repo", z, **SPEC)
        out[f"{prefix}{i:03d}"] = z
    return out


def test_register_list_get_remove_round_trip(reg):
    data = _fill(reg, 5)
    assert reg.count() == 5 and reg.epoch() == 5
    rec = reg.get("ad002")
    assert (rec.rank, rec.alpha, rec.targets, rec.sample_count) == (8, 16.0, ("q_proj", "v_proj"), 8)
    assert rec.embedder == IDENT and rec.source.kind == "hub" and rec.config_source == "explicit"
    assert rec.fit["eps"] == FIT.eps and rec.epoch == 3
    np.testing.assert_array_equal(reg.get_with_embeddings("ad002").embeddings, data["ad002"])

    page1 = reg.list(0, 2)
    page2 = reg.list(page1.next_offset, 2)
    page3 = reg.list(page2.next_offset, 2)
    assert page1.total == 5 and page3.next_offset is None
    assert [r.id for r in page1.records + page2.records + page3.records] == sorted(data)

    assert reg.remove("ad002") == 6
    assert reg.count() == 4
    with pytest.raises(UnknownAdapterError, match="ad002"):
        reg.get("ad002")
    assert [r.id for r in reg.list_all()] == ["ad000", "ad001", "ad003", "ad004"]


def test_conflict_and_replace(reg):
    rng = np.random.default_rng(1)
    first = reg.register_embeddings("dup", "owner/repo", _samples(rng, np.zeros(DIM)), **SPEC)
    state = _store_state(reg)
    with pytest.raises(ConflictError, match="dup"):
        reg.register_embeddings("dup", "owner/repo", _samples(rng, np.ones(DIM)), **SPEC)
    assert _store_state(reg) == state
    z = _samples(rng, np.ones(DIM), m=5)
    second = reg.register_embeddings("dup", "owner/other", z, replace=True, rank=4, alpha=8, targets=["q_proj"])
    got = reg.get("dup")
    assert got.rank == 4 and got.sample_count == 5 and got.source.location == "owner/other"
    assert got.created == first.created and got.updated >= first.updated and second.epoch == first.epoch + 1


def test_a_create_sent_again_is_its_own_success_not_a_conflict(reg):
    """redis-py sends a command again when its connection breaks (a Sentinel failover); if the first attempt was
    applied, the second finds the id taken by that very write. The store answers it with that write's epoch, and
    nothing changes; any other write to a taken id is still a conflict (issue 27's soak under failover)."""
    rng = np.random.default_rng(3)
    record = reg.register_embeddings("again", "owner/repo", _samples(rng, np.zeros(DIM)), **SPEC)
    stored = reg.get_with_embeddings("again")
    state = _store_state(reg)
    sent = dataclasses.replace(stored.record, epoch=0)  # the record as the first attempt sent it
    epoch = reg.store.put(sent, stored.embeddings, None, "create")  # the same bytes again: a resent create
    assert epoch == record.epoch and _store_state(reg) == state
    with pytest.raises(ConflictError, match="again"):  # the same adapter registered anew (new timestamps)
        reg.register_embeddings("again", "owner/repo", stored.embeddings, **SPEC)
    assert _store_state(reg) == state


def test_routes_every_policy_with_the_fit_of_hilora_core(reg):
    from hilora_core.routing.pool import fit_pool

    data = _fill(reg, 6, seed=2)
    z = np.stack([data["ad001"][0], data["ad004"][1], np.full(DIM, 5.0, np.float32)])
    ids = sorted(data)
    model = fit_pool([data[i] for i in ids], FIT)  # the registry fits what the library fits
    decisions = reg.route_embeddings(z, PolicyConfig())
    for q, d in enumerate(decisions):
        scores = model.score(z[q])[0]
        assert list(d.candidates) == [ids[i] for i in select_candidates(scores)]
        np.testing.assert_allclose(d.candidate_scores, scores[select_candidates(scores)], rtol=1e-5)
        assert d.epoch == reg.epoch() and not d.degraded and not d.prefiltered
    # a sample of an adapter routes to it first, with the ROC budget over its candidates
    for d, own in zip(decisions[:2], ("ad001", "ad004"), strict=True):
        assert d.candidates[0] == own == d.plan.adapters[0] and not d.fell_back
        assert set(d.plan.adapters) <= set(d.candidates)
        assert sum(d.plan.rocs) == max(1, round(0.4 * 8 * len(d.candidates)))  # every rank is 8
    # the third query is far from every adapter: the base model serves it, and the decision says why
    assert decisions[2].plan.is_base and decisions[2].fell_back
    assert decisions[2].off_pool.best_score < decisions[2].off_pool.threshold
    for name in POLICIES:
        out = reg.route_embeddings(z, PolicyConfig(name=name), explicit=["ad003"])
        assert len(out) == 3, name
    retr = reg.route_embeddings(z, PolicyConfig(name="retriever"))
    assert retr[0].candidates[0] == "ad001" and len(retr[0].candidate_scores) == 3


def test_registration_is_atomic_for_readers(reg):
    """A reader in a loop never sees a record whose parts disagree (meta vs embeddings vs index)."""
    rng = np.random.default_rng(3)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader():
        client, key = reg.store.client, reg.store.adapter_key("hot")
        while not stop.is_set():
            meta, emb, epoch = client.hmget(key, "meta", "emb", "epoch")
            if meta is None:
                if emb is not None or epoch is not None:
                    problems.append("hash without meta")
                continue
            m = json.loads(meta)
            if emb is None or len(emb) != 4 * m["sample_count"] * DIM or epoch is None:
                problems.append(f"partial record: {m['sample_count']} samples, {len(emb or b'')} bytes")
            if float(np.frombuffer(emb, "<f4")[0]) != m["sample_count"]:  # first value encodes m
                problems.append("embeddings from another write")
            pipe = client.pipeline(transaction=True)  # index and hashes seen at one instant
            pipe.zrange(f"{reg.config.store.key_prefix}:ids", 0, -1)
            pipe.keys(reg.store.adapter_key("*"))
            indexed, hashes = pipe.execute()
            if {reg.store.adapter_key(i.decode()) for i in indexed} != {h.decode() for h in hashes}:
                problems.append(f"index {indexed} and records {hashes} disagree")
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(150):
            m = 2 + i % 40
            z = _samples(rng, np.zeros(DIM), m=m)
            z[0, 0] = m
            reg.register_embeddings("hot", "owner/repo", z, replace=True, **SPEC)
            if i % 10 == 0:
                reg.register_embeddings(f"side{i}", "owner/repo", z, **SPEC)
                reg.remove(f"side{i}")
    finally:
        stop.set()
        thread.join()
    assert reads[0] > 20, "the reader did not get to run"
    assert problems == []


BAD_CALLS = {
    "empty id": (InvalidInputError, lambda r, z: r.register_embeddings("", "owner/repo", z, **SPEC)),
    "id with slash": (InvalidInputError, lambda r, z: r.register_embeddings("a/b", "owner/repo", z, **SPEC)),
    "id with space": (InvalidInputError, lambda r, z: r.register_embeddings("a b", "owner/repo", z, **SPEC)),
    "id too long": (InvalidInputError, lambda r, z: r.register_embeddings("a" * 129, "owner/repo", z, **SPEC)),
    "id starts with dot": (InvalidInputError, lambda r, z: r.register_embeddings(".a", "owner/repo", z, **SPEC)),
    "id not a string": (InvalidInputError, lambda r, z: r.register_embeddings(5, "owner/repo", z, **SPEC)),
    "one sample": (InvalidInputError, lambda r, z: r.register_embeddings("x", "owner/repo", z[:1], **SPEC)),
    "too many samples": (InvalidInputError,
                         lambda r, z: r.register_embeddings("x", "owner/repo", np.tile(z, (201, 1)), **SPEC)),
    "identical samples": (InvalidInputError,
                          lambda r, z: r.register_embeddings("x", "owner/repo", np.tile(z[:1], (4, 1)), **SPEC)),
    "nan sample": (InvalidInputError,
                   lambda r, z: r.register_embeddings("x", "owner/repo", np.where(z > 1, np.nan, z), **SPEC)),
    "wrong dimension": (DimensionMismatchError,
                        lambda r, z: r.register_embeddings("x", "owner/repo", z[:, :5], **SPEC)),
    "1-d embeddings": (InvalidInputError, lambda r, z: r.register_embeddings("x", "owner/repo", z[0], **SPEC)),
    "other embedder": (EmbedderMismatchError, lambda r, z: r.register_embeddings(
        "x", "owner/repo", z, identity=EmbedderIdentity("other", None, DIM, "", True), **SPEC)),
    "missing source": (InvalidInputError, lambda r, z: r.register_embeddings("x", "/no/such/dir", z, **SPEC)),
    "source not a string": (InvalidInputError, lambda r, z: r.register_embeddings("x", None, z, **SPEC)),
    "bad revision": (InvalidInputError,
                     lambda r, z: r.register_embeddings("x", "owner/repo", z, revision="../x", **SPEC)),
    "unreachable hub, no rank": (AdapterLoadError, lambda r, z: r.register_embeddings(
        "x", "owner/repo", z, alpha=16, targets=["q_proj"])),
    "rank zero": (InvalidInputError, lambda r, z: r.register_embeddings(
        "x", "owner/repo", z, rank=0, alpha=16, targets=["q_proj"])),
    "alpha negative": (InvalidInputError, lambda r, z: r.register_embeddings(
        "x", "owner/repo", z, rank=8, alpha=-1, targets=["q_proj"])),
    "targets a string": (InvalidInputError, lambda r, z: r.register_embeddings(
        "x", "owner/repo", z, rank=8, alpha=16, targets="q_proj")),
    "texts count mismatch": (InvalidInputError, lambda r, z: r.register_embeddings(
        "x", "owner/repo", z, texts=["a", "b"], **SPEC)),
    "duplicate id": (ConflictError, lambda r, z: r.register_embeddings("base0", "owner/repo", z, **SPEC)),
    "remove unknown": (UnknownAdapterError, lambda r, z: r.remove("nope")),
    "remove bad id": (InvalidInputError, lambda r, z: r.remove("../x")),
    "get unknown": (UnknownAdapterError, lambda r, z: r.get("nope")),
    "refit unknown": (UnknownAdapterError, lambda r, z: r.refit("nope", ["a", "b"])),
    "refit one sample": (InvalidInputError, lambda r, z: r.refit("base0", ["only one"])),
    "refit identical": (InvalidInputError, lambda r, z: r.refit("base0", ["same", "same", " same"])),
    "refit empty text": (InvalidInputError, lambda r, z: r.refit("base0", ["a", ""])),
    "refit long text": (InvalidInputError, lambda r, z: r.refit("base0", ["a", "x" * 9000])),
    "refit not a list": (InvalidInputError, lambda r, z: r.refit("base0", "a text")),
    "refit non-string": (InvalidInputError, lambda r, z: r.refit("base0", ["a", 3])),
    "list negative offset": (InvalidInputError, lambda r, z: r.list(-1, 10)),
    "list zero limit": (InvalidInputError, lambda r, z: r.list(0, 0)),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_typed_error_and_changes_nothing(reg, case):
    rng = np.random.default_rng(4)
    reg.register_embeddings("base0", "owner/repo", _samples(rng, np.zeros(DIM)), **SPEC)
    state = _store_state(reg)
    error, call = BAD_CALLS[case]
    with pytest.raises(error):
        call(reg, _samples(rng, np.ones(DIM), m=5))
    assert _store_state(reg) == state


def test_local_adapter_config_is_read_and_checked(reg, config, tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"],
         "base_model_name_or_path": "org/base"}))
    rec = reg.register_embeddings("local1", str(folder), _samples(rng, np.zeros(DIM)))
    assert (rec.rank, rec.alpha, rec.targets, rec.base_model) == (4, 8.0, ("q_proj", "v_proj"), "org/base")
    assert rec.config_source == "local" and rec.source.location == str(folder)
    state = _store_state(reg)
    z = _samples(rng, np.ones(DIM))
    with pytest.raises(IncompatibleAdapterError, match="rank"):
        reg.register_embeddings("local2", str(folder), z, rank=8)
    strict = Registry(replace(config, admission=replace(config.admission, base_model="org/other")), identity=IDENT)
    with pytest.raises(IncompatibleAdapterError, match="org/other"):
        strict.register_embeddings("local3", str(folder), z)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="JSON"):
        reg.register_embeddings("local4", str(tmp_path / "broken"), z)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        reg.register_embeddings("local5", str(tmp_path / "empty"), z, **SPEC)
    assert _store_state(reg) == state


def test_second_scorer_follows_changes(reg, config):
    _fill(reg, 3, seed=6)
    other = PoolScorer(config, identity=IDENT)
    try:
        assert other.snapshot.ids == ("ad000", "ad001", "ad002")
        rng = np.random.default_rng(6)
        z = _samples(rng, np.full(DIM, 3.0))
        reg.register_embeddings("late", "owner/repo", z, **SPEC)
        assert _wait(lambda: "late" in other.snapshot.ids, 2.0), other.status()
        assert other.route_embeddings(z[:1])[0].candidates[0] == "late"
        reg.remove("ad001")
        assert _wait(lambda: "ad001" not in other.snapshot.ids, 2.0)
        assert other.epoch == reg.epoch() and other.status()["full_reloads"] == 1
    finally:
        other.close()


def test_scorer_that_missed_trimmed_changes_reloads(reg, config):
    small_log = replace(config, store=replace(config.store, changelog_max=3))
    writer = Registry(small_log, identity=IDENT)
    _fill(writer, 2, seed=7)
    stale = PoolScorer(small_log, identity=IDENT, follow=False)
    _fill(writer, 8, seed=8, prefix="more")
    writer.remove("ad000")
    assert stale.snapshot.ids == ("ad000", "ad001")
    stale.refresh()
    assert stale.status()["full_reloads"] == 2
    assert stale.snapshot.ids == ("ad001", *(f"more{i:03d}" for i in range(8)))
    assert stale.epoch == writer.epoch() == 11


def test_degraded_mode_and_recovery(tmp_path):
    srv = RedisServer(tmp_path / "r", persistence="aof").start()
    try:
        cfg = RegistryConfig(store=StoreSettings(redis_url=srv.url, socket_timeout_s=1.0), fit=FIT,
                             admission=AdmissionSettings(hub_lookup=False), scorer=ScorerSettings(poll_interval_s=0.2))
        reg = Registry(cfg, identity=IDENT)
        _fill(reg, 4, seed=9)
        scorer = PoolScorer(cfg, identity=IDENT)
        z = np.random.default_rng(9).standard_normal((3, DIM)).astype(np.float32)
        before = scorer.route_embeddings(z)
        srv.stop()
        assert _wait(lambda: scorer.degraded, 5.0)
        assert scorer.status()["error"]
        during = scorer.route_embeddings(z)
        assert all(d.degraded for d in during)
        assert [d.plan for d in during] == [d.plan for d in before]
        with pytest.raises(RegistryUnavailableError):
            reg.register_embeddings("new", "owner/repo", _samples(np.random.default_rng(1), np.zeros(DIM)), **SPEC)
        with pytest.raises(RegistryUnavailableError):
            reg.remove("ad000")
        srv.start()
        assert _wait(lambda: not scorer.degraded, 5.0)
        reg.register_embeddings("new", "owner/repo", _samples(np.random.default_rng(1), np.zeros(DIM)), **SPEC)
        assert _wait(lambda: "new" in scorer.snapshot.ids, 3.0)
        scorer.close()
        reg.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("persistence", ["aof", "rdb"])
def test_restart_keeps_pool_and_scores(tmp_path, persistence):
    srv = RedisServer(tmp_path / persistence, persistence=persistence).start()
    try:
        cfg = RegistryConfig(store=StoreSettings(redis_url=srv.url), fit=GaussianFitSettings(),  # calibrated eps
                             admission=AdmissionSettings(hub_lookup=False))
        reg = Registry(cfg, identity=IDENT)
        _fill(reg, 6, seed=10)
        reg.remove("ad003")
        z = np.random.default_rng(10).standard_normal((5, DIM)).astype(np.float32)
        records, epoch = reg.list_all(), reg.epoch()
        scores = reg.scorer.snapshot.model.score(z)
        reg.close()
        srv.stop()
        srv.start()
        again = Registry(cfg, identity=IDENT)
        assert again.list_all() == records and again.epoch() == epoch
        np.testing.assert_array_equal(again.scorer.snapshot.model.score(z), scores)
        again.close()
    finally:
        srv.stop()


def _clustered(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n // 10, DIM)) * 3
    return {f"c{i:04d}": _samples(rng, centers[i % len(centers)] + 0.8 * rng.standard_normal(DIM), m=6, spread=0.1)
            for i in range(n)}


@pytest.mark.parametrize("whiten", [False, True])
def test_prefilter_matches_exact_candidates_above_threshold(config, whiten):
    cfg = replace(config, prefilter=PrefilterSettings(min_pool=100, k=8),
                  scorer=replace(config.scorer, incremental_fit_min_pool=50),
                  fit=GaussianFitSettings(eps=0.02, whiten=whiten))
    reg = Registry(cfg, identity=IDENT)
    data = _clustered(300, seed=11)
    for name, z in data.items():
        reg.register_embeddings(name, "owner/repo", z, **SPEC)
    scorer = reg.scorer
    assert scorer.status()["prefilter"] and scorer.status()["whitened"] == whiten
    rng = np.random.default_rng(12)
    ids = sorted(data)
    seen = [data[ids[i]][rng.integers(6)] + 0.02 * rng.standard_normal(DIM) for i in rng.integers(0, 300, 24)]
    unseen = [data[ids[i]].mean(0) + 1.0 * rng.standard_normal(DIM) for i in rng.integers(0, 300, 8)]
    z = np.stack(seen + unseen).astype(np.float32)
    fast = scorer.route_embeddings(z)
    exact = scorer.route_embeddings(z, use_prefilter=False)
    assert all(d.prefiltered for d in fast) and not any(d.prefiltered for d in exact)
    for f, e in zip(fast, exact, strict=True):
        assert set(f.candidates) == set(e.candidates)
        assert f.plan.adapters == e.plan.adapters and f.plan.rocs == e.plan.rocs
        np.testing.assert_allclose(f.candidate_scores, e.candidate_scores, rtol=1e-4, atol=1e-4)
    # the index follows the store: a new adapter is found through the prefilter
    znew = _samples(rng, np.full(DIM, 7.0), m=6, spread=0.1)
    reg.register_embeddings("zz-new", "owner/repo", znew, **SPEC)
    assert reg.route_embeddings(znew[:2])[0].candidates[0] == "zz-new"
    assert scorer.status()["incremental_fits"] >= 1
    reg.close()


def test_incremental_fit_equals_full_fit_with_fixed_eps(config):
    from hilora_core.routing.pool import fit_pool

    fixed = GaussianFitSettings(eps=0.02, standardize=False)  # the space does not move with the pool
    cfg = replace(config, scorer=replace(config.scorer, incremental_fit_min_pool=5, recalibrate_fraction=1.0),
                  fit=fixed)
    reg = Registry(cfg, identity=IDENT)
    data = _fill(reg, 8, seed=13)
    reg.route_embeddings(np.zeros((1, DIM), np.float32))
    rng = np.random.default_rng(13)
    data["zz"] = _samples(rng, np.ones(DIM))
    reg.register_embeddings("zz", "owner/repo", data["zz"], **SPEC)
    z = rng.standard_normal((4, DIM)).astype(np.float32)
    got = reg.scorer.snapshot.model.score(z)
    assert reg.scorer.status()["incremental_fits"] == 1
    want = fit_pool([data[i] for i in sorted(data)], fixed).score(z)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    reg.close()


def test_scorer_refuses_other_embedder(reg, config):
    _fill(reg, 2, seed=14)
    other = PoolScorer(config, identity=EmbedderIdentity("other", None, DIM, "", True), follow=False)
    with pytest.raises(EmbedderMismatchError, match="refusing"):
        other.route_embeddings(np.zeros((1, DIM), np.float32))
    with pytest.raises(DimensionMismatchError):
        reg.route_embeddings(np.zeros((1, DIM + 1), np.float32))


def test_calibrated_eps_copes_with_two_sample_adapters():
    from registry.fitting import fit_registry_pool

    rng = np.random.default_rng(15)
    sets = [_samples(rng, rng.standard_normal(DIM), m=m) for m in (2, 6, 6, 2)]
    model = fit_registry_pool(sets, GaussianFitSettings(), fallback_eps=0.5)
    assert model.calibration is not None and model.eps == model.calibration.eps and model.eps != 0.5
    assert len(model.bank) == 4
    only_pairs = fit_registry_pool([sets[0], sets[3]], GaussianFitSettings(), fallback_eps=0.5)
    assert only_pairs.eps == 0.5 and only_pairs.calibration is None


def test_recalibrate_refits_the_pool_and_shares_the_new_parameters(config):
    cfg = replace(config, scorer=replace(config.scorer, incremental_fit_min_pool=4), fit=GaussianFitSettings())
    reg = Registry(cfg, identity=IDENT)
    data = {}
    for i in range(10):  # the scorer follows each registration: pool-wide fits only while the pool is small
        data.update(_fill(reg, 1, seed=21 + i, prefix=f"ad{i}-"))
        reg.scorer.refresh()
    before = reg.store.get_parameters()
    assert before.epoch < reg.epoch()  # incremental registrations kept older parameters
    fits = reg.scorer.status()["full_fits"]
    reg.scorer.recalibrate()
    after = reg.store.get_parameters()
    assert reg.scorer.status()["full_fits"] == fits + 1 and after.epoch == reg.epoch()
    from hilora_core.routing.pool import fit_pool

    fresh = fit_pool([data[i] for i in sorted(data)], cfg.fit)
    assert reg.scorer.snapshot.model.eps == pytest.approx(fresh.eps) == pytest.approx(after.params.eps)
    reg.close()


def test_prefilter_index_drops_removed_adapters(config):
    cfg = replace(config, prefilter=PrefilterSettings(min_pool=20, index="flat", k=4),
                  scorer=replace(config.scorer, incremental_fit_min_pool=10))
    reg = Registry(cfg, identity=IDENT)
    data = _clustered(40, seed=22)
    for name, z in data.items():
        reg.register_embeddings(name, "owner/repo", z, **SPEC)
    reg.scorer.refresh()
    gone = "c0007"
    size = reg.scorer.snapshot.index.size
    assert reg.route_embeddings(data[gone][:1])[0].candidates[0] == gone
    reg.remove(gone)
    reg.scorer.refresh()
    snap = reg.scorer.snapshot
    assert snap.index.size == size - 1 and gone not in snap.ids
    d = reg.route_embeddings(data[gone][:1])[0]
    assert d.prefiltered and gone not in d.candidates and gone not in d.plan.adapters
    reg.close()


def test_seeded_routing_is_reproducible_with_and_without_the_prefilter(config):
    cfg = replace(config, prefilter=PrefilterSettings(min_pool=20, index="flat"),
                  scorer=replace(config.scorer, incremental_fit_min_pool=10))
    reg = Registry(cfg, identity=IDENT)
    data = _clustered(30, seed=23)
    for name, z in data.items():
        reg.register_embeddings(name, "owner/repo", z, **SPEC)
    reg.scorer.refresh()
    rng = np.random.default_rng(23)
    z = np.stack([data[k].mean(0) + 0.05 * rng.standard_normal(DIM) for k in ("c0003", "c0011", "c0020")])
    seeded = PolicyConfig(seed=5)
    for prefilter in (True, False):
        first = reg.route_embeddings(z.astype(np.float32), seeded, use_prefilter=prefilter)
        again = reg.route_embeddings(z.astype(np.float32), seeded, use_prefilter=prefilter)
        assert [d.plan for d in first] == [d.plan for d in again]
    # the two paths differ by design: the prefilter draws each query with seed + q, the exact path one
    # Generator for the whole batch; a query routed alone is drawn with the seed itself on both
    for q in range(3):
        alone = [reg.route_embeddings(z[q:q + 1].astype(np.float32), PolicyConfig(seed=5 + q), use_prefilter=p)[0]
                 for p in (True, False)]
        batched = reg.route_embeddings(z.astype(np.float32), seeded, use_prefilter=True)[q]
        assert alone[0].plan == alone[1].plan == batched.plan
    reg.close()


def test_tags_are_stored_and_validated(reg):
    rng = np.random.default_rng(7)
    rec = reg.register_embeddings("tagged", "owner/repo", _samples(rng, np.ones(DIM)), tags=[" numbers ", "demo",
                                                                                         "numbers"], **SPEC)
    assert rec.tags == ("numbers", "demo")  # stripped, duplicates dropped, order kept
    assert reg.get("tagged").tags == ("numbers", "demo")  # through Redis and back
    assert reg.list().records[0].to_dict()["tags"] == ["numbers", "demo"]
    for bad in (["x" * 41], [""], ["a\nb"], [f"t{i}" for i in range(9)], "numbers"):
        with pytest.raises(InvalidInputError):
            reg.register_embeddings("bad-tags", "owner/repo", _samples(rng, np.ones(DIM)), tags=bad, **SPEC)
    with pytest.raises(UnknownAdapterError):
        reg.get("bad-tags")  # nothing written


def test_pool_map_projects_means_on_their_principal_axes():
    from registry.pool_map import fit_pool_map

    means = np.array([[0.0, 0, 0], [2, 0, 0], [4, 0, 0.1]])
    pmap = fit_pool_map(means)
    xy = pmap.project(means)
    assert xy.shape == (3, 2) and pmap.explained[0] > 0.99
    assert np.allclose(sorted(np.abs(xy[:, 0])), [0.0, 2.0, 2.0], atol=0.01)  # spread along x, centred
    assert np.allclose(pmap.project(means.mean(axis=0)), 0.0)
    one = fit_pool_map(np.ones((1, 3)))  # a pool of one adapter sits at the origin
    assert np.allclose(one.project(np.ones((2, 3))), 0.0) and one.explained.tolist() == [0.0, 0.0]


def _local_adapter(folder, rank: int = 8) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    return str(folder)


def test_local_sources_only_from_allowed_folders(config, tmp_path):
    from dataclasses import replace

    from registry import ForbiddenSourceError

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    inside = _local_adapter(allowed / "a")
    elsewhere = _local_adapter(outside / "b")
    (allowed / "link").symlink_to(outside / "b")  # a link inside the allowed folder pointing out of it
    rng = np.random.default_rng(3)
    with Registry(replace(config, allowed_local_dirs=(str(allowed),)), identity=IDENT) as reg:
        assert reg.register_embeddings("inside", inside, _samples(rng, np.ones(DIM))).source.location == inside
        for source in (elsewhere, str(allowed / "link"), str(allowed / ".." / "outside" / "b")):
            with pytest.raises(ForbiddenSourceError, match="outside the allowed folders"):
                reg.register_embeddings("escape", source, _samples(rng, np.ones(DIM)))
        reg.register_embeddings("hub", "owner/repo", _samples(rng, np.ones(DIM)), **SPEC)  # hub ids are not local
        assert sorted(r.id for r in reg.list().records) == ["hub", "inside"]
    with Registry(config, identity=IDENT) as anywhere:  # None: the library and CLI default
        anywhere.register_embeddings("elsewhere", elsewhere, _samples(rng, np.ones(DIM)))


def test_rank_and_target_limits(config, tmp_path):
    from dataclasses import replace

    rng = np.random.default_rng(4)
    limited = replace(config, max_rank=16, admission=replace(config.admission, max_target_modules=2))
    with Registry(limited, identity=IDENT) as reg:
        with pytest.raises(InvalidInputError, match="rank 32 is above the limit 16"):
            reg.register_embeddings("big", _local_adapter(tmp_path / "big", rank=32), _samples(rng, np.ones(DIM)))
        with pytest.raises(InvalidInputError, match="3 target modules; the limit is 2"):
            reg.register_embeddings("wide", "owner/repo", _samples(rng, np.ones(DIM)), rank=8, alpha=16,
                                    targets=["q_proj", "k_proj", "v_proj"])
        assert reg.register_embeddings("ok", "owner/repo", _samples(rng, np.ones(DIM)), **SPEC).rank == 8
