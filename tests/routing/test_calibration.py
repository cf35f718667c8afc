"""eps calibration by leave-one-out, whitening, and the pool fit."""

import numpy as np
import pytest

from hilora_core import GaussianBank, InvalidInputError, Whitener, calibrate_eps, fit_gaussian, select_candidates
from hilora_core.routing.calibration import candidate_stats
from hilora_core.routing.pool import GaussianFitSettings, fit_pool


def clustered_sets(n_sets=6, m=12, d=24, spread=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_sets, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return [c + spread * rng.normal(size=(m, d)) for c in centres]


def held_out_rate(sets, eps):
    hits = []
    for s in sets:
        for h in range(len(s)):
            g = fit_gaussian(np.delete(s, h, axis=0), eps)
            hits.append(GaussianBank([g]).score(s[h : h + 1])[0, 0] > 0)
    return float(np.mean(hits))


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_calibrated_eps_reaches_target_rate_and_is_the_smallest(target):
    sets = clustered_sets()
    cal = calibrate_eps(sets, target_rate=target, criterion="own_score")
    assert cal.reached
    # independently recomputed with plain refits
    assert held_out_rate(sets, cal.eps) >= target
    assert held_out_rate(sets, cal.eps * 0.9) < target
    assert cal.rate == pytest.approx(held_out_rate(sets, cal.eps))


def loo_candidate_rate(sets, eps):
    """Own adapter in select_candidates' set for each held-out sample, by plain refits."""
    hits, sizes = [], []
    for i, s in enumerate(sets):
        for h in range(len(s)):
            gs = [fit_gaussian(np.delete(t, h, axis=0) if j == i else t, eps) for j, t in enumerate(sets)]
            c = select_candidates(GaussianBank(gs).score(s[h : h + 1])[0])
            hits.append(i in c)
            sizes.append(len(c))
    return float(np.mean(hits)), float(np.mean(sizes))


def test_candidate_criterion_matches_plain_refits_and_minimises_the_set():
    sets = clustered_sets(n_sets=5, m=6, d=10, spread=0.3, seed=7)
    grid = np.logspace(-3, 0, 13)
    cal = calibrate_eps(sets, target_rate=0.8, grid=grid)
    assert cal.criterion == "candidates" and cal.reached
    rate, size = loo_candidate_rate(sets, cal.eps)
    assert cal.rate == pytest.approx(rate) and cal.mean_candidates == pytest.approx(size)
    for eps in grid:  # no other grid eps reaching the target has a smaller mean set
        r, c = loo_candidate_rate(sets, eps)
        assert r < 0.8 or c >= size - 1e-12


def test_candidate_stats_matches_select_candidates():
    rng = np.random.default_rng(8)
    scores = np.round(rng.normal(size=(200, 7)) * 2, 1)  # rounding makes ties
    own = rng.integers(0, 7, size=200)
    hit, size = candidate_stats(scores, own, max_candidates=4)
    for row, o, h, n in zip(scores, own, hit, size, strict=True):
        c = select_candidates(row, max_candidates=4)
        assert (o in c) == h and len(c) == n


def test_unreachable_target_is_reported():
    rng = np.random.default_rng(1)
    cal = calibrate_eps([rng.normal(size=(5, 8)) * 10 for _ in range(3)], target_rate=0.99, criterion="own_score")
    assert not cal.reached and cal.rate < 0.99


def test_calibration_rejects_bad_input():
    with pytest.raises(InvalidInputError, match="target_rate"):
        calibrate_eps(clustered_sets(), target_rate=0.0)
    with pytest.raises(InvalidInputError, match="at least 3"):
        calibrate_eps([np.zeros((2, 4))])
    with pytest.raises(InvalidInputError, match="none"):
        calibrate_eps([])


def test_whitener_whitens_and_keeps_total_variance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 6)) @ np.diag([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    w = Whitener.fit(x, shrinkage=0.0)
    y = w(x)
    cov = np.cov(y, rowvar=False)
    np.testing.assert_allclose(cov / cov[0, 0], np.eye(6), atol=1e-8)
    assert np.trace(cov) == pytest.approx(np.trace(np.cov(x, rowvar=False)))


def test_fit_pool_own_samples_score_highest():
    sets = clustered_sets(seed=3)
    for settings in (GaussianFitSettings(), GaussianFitSettings(whiten=True), GaussianFitSettings(eps=1e-3)):
        pool = fit_pool(sets, settings)
        for i, s in enumerate(sets):
            assert np.all(pool.score(s).argmax(axis=1) == i)
        assert pool.means.shape == (len(sets), sets[0].shape[1])
