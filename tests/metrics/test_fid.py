import numpy as np
import pytest
import torch

from pipeline.metrics.fid import FeatureStats, frechet_distance


def rng(seed=0):
    return np.random.default_rng(seed)


def orthogonal(d, seed=0):
    q, r = np.linalg.qr(rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def spd(d, seed):
    a = rng(seed).standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def gaussian(mean, cov, count=100):
    return FeatureStats(mean=np.asarray(mean, float), cov=np.asarray(cov, float), count=count)


def closed_form(m1, a, m2, b):
    """Frechet distance of Gaussians whose covariances share eigenvectors, eigenvalues a and b."""
    return float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_diagonal_covariances_match_the_closed_form():
    r = rng(1)
    m1, m2 = r.standard_normal(16), r.standard_normal(16)
    a, b = r.uniform(0.1, 3, 16), r.uniform(0.1, 3, 16)
    got = frechet_distance(gaussian(m1, np.diag(a)), gaussian(m2, np.diag(b)))
    assert got == pytest.approx(closed_form(m1, a, m2, b), rel=1e-10)


def test_commuting_covariances_match_the_closed_form():
    r, q = rng(2), orthogonal(12, seed=3)
    m1, m2 = r.standard_normal(12), r.standard_normal(12)
    a, b = r.uniform(0.0, 2, 12), r.uniform(0.0, 2, 12)
    a[:3] = 0  # singular: no eps offset needed
    got = frechet_distance(gaussian(m1, q @ np.diag(a) @ q.T), gaussian(m2, q @ np.diag(b) @ q.T))
    assert got == pytest.approx(closed_form(m1, a, m2, b), rel=1e-10)


def test_general_covariances_match_the_scipy_sqrtm_form():
    """The TTUR / pytorch-fid computation: scipy.linalg.sqrtm of the product, real part."""
    linalg = pytest.importorskip("scipy.linalg")
    r = rng(4)
    m1, m2, c1, c2 = r.standard_normal(20), r.standard_normal(20), spd(20, 5), spd(20, 6)
    covmean = linalg.sqrtm(c1 @ c2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    got = frechet_distance(gaussian(m1, c1), gaussian(m2, c2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(frechet_distance(gaussian(m2, c2), gaussian(m1, c1)), rel=1e-9)


def test_a_set_against_itself_and_against_its_translate():
    """Fewer samples than dimensions (singular covariance, as with few images): d(X, X) = 0 and
    d(X, X + c) = |c|^2."""
    x = rng(7).standard_normal((10, 64))
    c = rng(8).standard_normal(64)
    stats = FeatureStats.of(x)
    scale = np.trace(stats.cov)
    assert abs(frechet_distance(stats, stats)) < 1e-6 * scale
    assert frechet_distance(stats, FeatureStats.of(x + c)) == pytest.approx(c @ c, abs=1e-6 * scale)


def test_feature_stats_are_the_unbiased_mean_and_covariance():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    stats = FeatureStats.of(x)
    xd = x.double().numpy()
    np.testing.assert_allclose(stats.mean, xd.mean(0))
    np.testing.assert_allclose(stats.cov, (xd - xd.mean(0)).T @ (xd - xd.mean(0)) / 49)
    assert stats.count == 50 and stats.cov.dtype == np.float64
    with pytest.raises(ValueError):
        FeatureStats.of(x[:1])
