"""Factored Gaussians against the dense float64 formula."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hilora_core import (
    DimensionMismatchError,
    EmptyPoolError,
    GaussianBank,
    InvalidInputError,
    fit_gaussian,
)


def dense_log_density(z: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Reference log N(z; mean, cov) with a dense (d, d) covariance. z (n, d) -> (n,)."""
    z = np.asarray(z, dtype=np.float64)
    d = mean.shape[0]
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (z - mean).T)  # (d, n)
    logdet = 2.0 * np.log(np.diag(chol)).sum()
    return -0.5 * (d * np.log(2.0 * np.pi) + logdet + (sol**2).sum(axis=0))


def dense_score(z, samples, eps):
    """(1/d) log N(z; mean, sample cov + eps I), computed densely from the spec's formula."""
    m, d = samples.shape
    mu = samples.mean(axis=0)
    xc = samples - mu
    cov = xc.T @ xc / (m - 1) + eps * np.eye(d)
    return dense_log_density(z, mu, cov) / d


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(2, 40),
    m=st.integers(2, 25),
    eps=st.floats(1e-4, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_bank_matches_dense_formula(d, m, eps, seed):
    rng = np.random.default_rng(seed)
    sets = [rng.normal(scale=rng.uniform(0.05, 1.0), size=(m, d)) + rng.normal(size=d) for _ in range(3)]
    bank = GaussianBank([fit_gaussian(s, eps) for s in sets], dtype=np.float64)
    z = rng.normal(size=(5, d))
    got = bank.score(z)
    want = np.stack([dense_score(z, s, eps) for s in sets], axis=1)
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_factor_is_low_rank_and_never_dense():
    rng = np.random.default_rng(1)
    g = fit_gaussian(rng.normal(size=(20, 384)), 1e-3)
    assert g.basis.shape == (19, 384)  # rank m - 1: centred samples lose one dimension
    np.testing.assert_allclose(g.basis @ g.basis.T, np.eye(19), atol=1e-10)
    bank = GaussianBank([g] * 10, dtype=np.float32)
    # factored storage: about d * (m + 1) floats per adapter, far below d * d
    assert bank.nbytes / 10 < 4 * 384 * (20 + 2) + 512


def test_near_duplicate_samples_stay_exact():
    """A rank-deficient sample set (3 identical rows) still scores exactly like the dense formula."""
    rng = np.random.default_rng(2)
    s = np.repeat(rng.normal(size=(1, 8)), 4, axis=0)
    s[1] += 1e-3
    g = fit_gaussian(s, 1e-2)
    assert g.rank == 1
    z = rng.normal(size=(3, 8))
    out = GaussianBank([g]).score(z)[:, 0]
    np.testing.assert_allclose(out, dense_score(z, s, 1e-2), rtol=1e-9)


def test_subset_scoring_matches_full():
    rng = np.random.default_rng(3)
    bank = GaussianBank([fit_gaussian(rng.normal(size=(6, 10)), 0.1) for _ in range(7)])
    z = rng.normal(size=(4, 10))
    full = bank.score(z)
    sub = np.array([5, 0, 3])
    np.testing.assert_allclose(bank.score(z, subset=sub), full[:, sub], rtol=1e-12)


def test_take_reorders_without_refit():
    rng = np.random.default_rng(6)
    bank = GaussianBank([fit_gaussian(rng.normal(size=(4, 5)), 0.2) for _ in range(4)])
    z = rng.normal(size=(3, 5))
    np.testing.assert_allclose(bank.take(np.array([2, 0])).score(z), bank.score(z)[:, [2, 0]], rtol=1e-12)


def test_with_eps_equals_refit():
    rng = np.random.default_rng(4)
    sets = [rng.normal(size=(5, 6)) for _ in range(3)]
    z = rng.normal(size=(2, 6))
    a = GaussianBank([fit_gaussian(s, 0.01) for s in sets]).with_eps(0.3).score(z)
    b = GaussianBank([fit_gaussian(s, 0.3) for s in sets]).score(z)
    np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize(
    "samples, eps, match",
    [
        (np.zeros((1, 4)), 0.1, "at least 2 samples"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), 0.1, "non-finite"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), 0.1, "non-finite"),
        (np.zeros((3, 4)), 0.0, "eps must be"),
        (np.zeros((3, 4)), -1.0, "eps must be"),
        (np.zeros(4), 0.1, "2-D"),
    ],
)
def test_fit_rejects_bad_input(samples, eps, match):
    with pytest.raises(InvalidInputError, match=match):
        fit_gaussian(samples, eps)


def test_bank_rejects_bad_input():
    rng = np.random.default_rng(5)
    g4 = fit_gaussian(rng.normal(size=(3, 4)), 0.1)
    g5 = fit_gaussian(rng.normal(size=(3, 5)), 0.1)
    with pytest.raises(EmptyPoolError):
        GaussianBank([])
    with pytest.raises(DimensionMismatchError, match=r"\[4, 5\]"):
        GaussianBank([g4, g5])
    bank = GaussianBank([g4])
    with pytest.raises(DimensionMismatchError, match=r"\(n, 4\)"):
        bank.score(np.zeros((2, 5)))
    with pytest.raises(InvalidInputError, match="non-finite"):
        bank.score(np.array([[0.0, 0.0, np.nan, 0.0]]))
