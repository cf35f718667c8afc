"""The base model as a routing outcome: the off-pool threshold, its use by every policy, and its
sharing between scorers (real Redis, real MiniLM embedder, demo-pool samples)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hilora_core.errors import InvalidInputError
from hilora_core.plan import RoutingPlan
from hilora_core.policies import POLICIES, PolicyConfig, make_plans
from hilora_core.routing.fallback import OffPoolThreshold, calibrate_off_pool, load_reference_requests
from hilora_core.routing.pool import GaussianFitSettings, PoolParameters, fit_pool, fit_with_parameters
from tests.scorer_process import route_in_new_process

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo_pool"
POOL = ("uppercase", "iso_to_us_date", "list_max", "number_to_words", "reverse_words")
GENERAL = ["What is the capital of France?", "Who wrote Romeo and Juliet?", "Any tips for a job interview?",
           "Why do cats purr?", "Write a haiku about rain."]
# in-pool requests phrased unlike the pool's templates
IN_POOL = {"uppercase": "could you put 'silver river' in capital letters please",
           "iso_to_us_date": "I have the date 2004-11-30, how would an American write it (MM/DD/YYYY)?",
           "list_max": "out of 12, 85, 3 and 40, which number is biggest?"}


# ------------------------------------------------------------------------------------- the threshold
def test_threshold_is_the_lower_side_and_each_side_is_a_quantile():
    samples = np.linspace(-2.0, 0.0, 101)  # leave-one-out best scores of registered samples
    reference = np.linspace(-9.0, -3.0, 101)  # best scores of general requests
    t = calibrate_off_pool(samples, reference, sample_quantile=0.01, reference_quantile=0.99)
    assert t.sample_threshold == pytest.approx(-1.98) and t.reference_threshold == pytest.approx(-3.06)
    assert t.threshold == t.reference_threshold  # far apart: just above the general requests
    overlap = calibrate_off_pool(samples, samples + 1.0, sample_quantile=0.01, reference_quantile=0.99)
    assert overlap.threshold == overlap.sample_threshold  # overlapping: the samples bound the fallback rate
    assert list(t.off_pool(np.array([-3.1, -3.0, 0.0]))) == [True, False, False]
    only = calibrate_off_pool(None, reference)
    assert only.sample_threshold is None and only.threshold == only.reference_threshold
    assert calibrate_off_pool(None, None) is None
    assert OffPoolThreshold.from_dict(t.to_dict()) == t
    with pytest.raises(InvalidInputError):
        calibrate_off_pool(samples, reference, sample_quantile=1.5)
    with pytest.raises(InvalidInputError):
        calibrate_off_pool(np.array([np.nan]), None)


def test_reference_file_is_read_without_comments(tmp_path):
    texts = load_reference_requests()
    assert len(texts) >= 150 and not any(t.startswith("#") for t in texts)
    f = tmp_path / "few.txt"
    f.write_text("# comment\none\ntwo\n")
    with pytest.raises(InvalidInputError, match="at least 10"):
        load_reference_requests(f)


def test_fallback_plan_replaces_any_routing_policy_but_not_explicit_or_base():
    names, ranks = ["a", "b", "c"], [4, 8, 4]
    scores = np.array([[1.0, -1.0, -2.0], [-9.0, -8.0, -9.5]])
    cosine = np.array([[0.9, 0.1, 0.2], [0.1, 0.2, 0.0]])
    off = np.array([False, True])
    for name in POLICIES:
        kw = dict(scores=scores, cosine=cosine, explicit=["b"], n_queries=2, off_pool=off)
        with_fb = make_plans(PolicyConfig(name), names, ranks, **kw)
        without = make_plans(PolicyConfig(name, fallback=False), names, ranks, **kw)
        assert with_fb[0] == without[0], name
        if name in ("explicit", "base"):
            assert with_fb[1] == without[1], name
        else:
            assert with_fb[1] == RoutingPlan() and not without[1].is_base, name
    with pytest.raises(InvalidInputError):
        make_plans(PolicyConfig(), names, ranks, scores=scores, off_pool=np.array([True]))


# ------------------------------------------------------------------ a real pool, the real embedder
@pytest.fixture(scope="module")
def embedder():
    from hilora_core.models.embedding import SentenceEmbedder

    return SentenceEmbedder()


@pytest.fixture(scope="module")
def demo_samples():
    manifest = {e["model_name"]: e for e in json.loads((DEMO / "manifest.json").read_text())}
    return {n: [s["inputs"] for s in manifest[n]["sample"]] for n in POOL}


def test_real_pool_separates_general_requests_from_rephrased_tasks(embedder, demo_samples):
    sets = [embedder.encode(demo_samples[n]) for n in POOL]
    model = fit_pool(sets, GaussianFitSettings(), embedder.encode(load_reference_requests()))
    t = model.off_pool
    assert t.n_reference >= 150 and t.n_samples == 20 * len(POOL)
    general = model.score(embedder.encode(GENERAL)).max(axis=1)
    in_pool = model.score(embedder.encode(list(IN_POOL.values()))).max(axis=1)
    assert model.off_pool_rows(general).all(), (general, t)
    assert not model.off_pool_rows(in_pool).any(), (in_pool, t)
    # the parameters round-trip through JSON and refit to the same scores and threshold
    params = PoolParameters.from_dict(json.loads(json.dumps(PoolParameters.of(model).to_dict())))
    again = fit_with_parameters(sets, params)
    z = embedder.encode(GENERAL + list(IN_POOL.values()))
    np.testing.assert_allclose(again.score(z), model.score(z), rtol=1e-5, atol=1e-5)
    assert again.off_pool == model.off_pool


def _config(redis_url: str, name: str, **scorer):
    from registry.config import AdmissionSettings, RegistryConfig, ScorerSettings, StoreSettings

    prefix = "off-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return RegistryConfig(store=StoreSettings(redis_url=redis_url, key_prefix=prefix, channel=f"{prefix}:events"),
                          admission=AdmissionSettings(hub_lookup=False),
                          scorer=ScorerSettings(poll_interval_s=0.2, **scorer))


def test_registry_falls_back_with_override_and_stores_the_threshold(redis_url, embedder, demo_samples):
    from registry.registry import Registry

    reg = Registry(_config(redis_url, "fallback"), embedder=embedder)
    for n in POOL:
        reg.register(n, str(DEMO / "adapters" / n), demo_samples[n])
    reg.scorer.refresh()
    decisions = reg.scorer.route(GENERAL + list(IN_POOL.values()))
    for d in decisions[: len(GENERAL)]:
        assert d.plan.is_base and d.fell_back and d.off_pool.best_score < d.off_pool.threshold
        assert d.candidates  # the candidate rule's view stays visible
    for d, task in zip(decisions[len(GENERAL):], IN_POOL, strict=True):
        assert not d.fell_back and d.plan.adapters[0] == task
    # per request: the paper's behaviour; and the fallback applies to a baseline policy too
    paper = reg.scorer.route(GENERAL, PolicyConfig(fallback=False))
    assert all(d.plan.adapters and not d.fell_back and d.off_pool.enabled is False for d in paper)
    retriever = reg.scorer.route(GENERAL, PolicyConfig("retriever"))
    assert all(d.plan.is_base and d.fell_back for d in retriever)
    # the threshold is part of the stored fit, computed at the current epoch
    stored = reg.store.get_parameters()
    assert stored.epoch == reg.epoch() and stored.params.off_pool == reg.scorer.snapshot.model.off_pool
    assert reg.store.get_reference(embedder.identity).shape == (len(load_reference_requests()), embedder.dim)
    reg.close()


def test_two_scorer_processes_decide_alike_after_incremental_registrations(redis_url, tmp_path):
    from hilora_core.models.embedding import EmbedderIdentity
    from registry.registry import Registry

    dim = 16
    ident = EmbedderIdentity("synthetic-test", None, dim, "", True)
    cfg = _config(redis_url, "two-processes", incremental_fit_min_pool=4, recalibrate_fraction=1.0)
    reg = Registry(cfg, identity=ident)  # its scorer follows every registration as it happens
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((12, dim)) * 2
    spec = {"rank": 8, "alpha": 16.0, "targets": ["q_proj"]}
    for i, c in enumerate(centers):
        reg.register_embeddings(f"ad{i:02d}", "owner/repo", (c + 0.3 * rng.standard_normal((8, dim))).astype("f4"),
                                **spec)
        reg.scorer.refresh()
    status = reg.scorer.status()
    assert status["incremental_fits"] > 0  # the running scorer did not refit the whole pool every time
    stored = reg.store.get_parameters()
    assert stored.epoch < reg.epoch()  # parameters from an earlier full fit are still the fresh ones
    queries = np.concatenate([centers + 0.4 * rng.standard_normal(centers.shape),
                              rng.standard_normal((6, dim)) * 6]).astype("f4")
    np.save(tmp_path / "q.npy", queries)
    other = route_in_new_process(cfg, tmp_path / "q.npy")
    mine = [d.to_dict() for d in reg.scorer.route_embeddings(queries)]
    assert other["status"]["full_fits"] == 0  # the new process fitted nothing pool-wide itself
    assert [d["plan"] for d in other["decisions"]] == [d["plan"] for d in mine]
    assert [d["off_pool"]["fallback"] for d in other["decisions"]] == [d["off_pool"]["fallback"] for d in mine]
    assert any(d["off_pool"]["fallback"] for d in mine) and not all(d["off_pool"]["fallback"] for d in mine)
    # a fresh full fit of the same pool would have chosen other parameters: sharing is what aligns them
    fresh = fit_pool([reg.scorer._fit.samples[i] for i in sorted(reg.scorer._fit.samples)], cfg.fit)
    assert fresh.eps != pytest.approx(stored.params.eps, rel=1e-6)
    reg.close()
