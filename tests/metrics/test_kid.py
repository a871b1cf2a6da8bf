import itertools

import pytest
import torch

from pipeline.metrics.kid import kernel_inception_distance, mmd2_unbiased


def normal(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def naive_mmd2_unbiased(x, y):
    """Pair by pair, with the kernel written out: (x.y / d + 1)^3."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_matches_the_pairwise_definition():
    x, y = normal(6, 4, 0), normal(7, 4, 1, shift=0.5)
    assert float(mmd2_unbiased(x, y)) == pytest.approx(naive_mmd2_unbiased(x, y), rel=1e-12)


def test_mmd2_estimator_is_unbiased_where_the_v_statistic_is_not():
    """Over many independent pairs of samples of one distribution the U-statistic averages to 0
    (within 4 standard errors); the biased V-statistic (diagonal kept) is clearly positive."""
    u, v = [], []
    for seed in range(200):
        x, y = normal(10, 8, 2 * seed), normal(10, 8, 2 * seed + 1)
        u.append(mmd2_unbiased(x, y))
        k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
        v.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    u, v = torch.stack(u), torch.stack(v)
    assert abs(u.mean()) < 4 * u.std() / len(u) ** 0.5
    assert v.mean() > 10 * v.std() / len(v) ** 0.5


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    x, y, z = normal(300, 16, 0), normal(300, 16, 1), normal(300, 16, 2, shift=0.5)

    def kid(a, b):
        return kernel_inception_distance(a, b, generator=torch.Generator().manual_seed(0), subsets=20, subset_size=100)

    (same, same_std), (diff, diff_std) = kid(x, y), kid(x, z)
    assert abs(same) < 3 * same_std
    assert diff > 5 * diff_std and diff > 50 * abs(same)


def test_whole_set_subsets_do_not_depend_on_the_generator():
    x, y = normal(9, 5, 3), normal(9, 5, 4, shift=0.2)
    full = float(mmd2_unbiased(x, y))
    for seed in (0, 1):
        mean, std = kernel_inception_distance(x, y, generator=torch.Generator().manual_seed(seed), subsets=3)
        assert mean == pytest.approx(full, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_same_generator_same_kid():
    x, y = normal(40, 5, 5), normal(40, 5, 6)

    def run():
        return kernel_inception_distance(x, y, generator=torch.Generator().manual_seed(7), subsets=5, subset_size=10)

    assert run() == run()
