import numpy as np
import pytest
import torch

from pipeline.metrics import precision_recall as pr


def normal(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def brute_force(real, gen, k):
    """Loops over points in numpy: radius = k-th smallest distance to the other points."""
    real, gen = real.double().numpy(), gen.double().numpy()

    def radii(s):
        return np.array(
            [np.sort([np.linalg.norm(p - q) for j, q in enumerate(s) if j != i])[k - 1] for i, p in enumerate(s)]
        )

    def covered(queries, support, r):
        return np.mean([any(np.linalg.norm(q - s) <= ri for s, ri in zip(support, r)) for q in queries])

    return covered(gen, real, radii(real)), covered(real, gen, radii(gen))


def test_knn_radii_by_hand():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(pr.knn_radii(points, 1), torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(pr.knn_radii(points, 2), torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        pr.knn_radii(points, 4)


def test_identical_sets_have_precision_and_recall_one():
    x = normal(50, 8, 0)
    assert pr.precision_recall(x, x.clone()) == (1.0, 1.0)


def test_disjoint_sets_have_precision_and_recall_zero():
    assert pr.precision_recall(normal(40, 8, 0), normal(30, 8, 1, shift=100.0)) == (0.0, 0.0)


def test_mode_dropping_keeps_precision_and_loses_recall():
    real = torch.cat([normal(40, 4, 0), normal(40, 4, 1, shift=50.0)])
    precision, recall = pr.precision_recall(real, real[:40].clone())
    assert precision == 1.0 and recall == pytest.approx(0.5)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_a_brute_force_computation(k, monkeypatch):
    monkeypatch.setattr(pr, "BLOCK_ELEMENTS", 64)  # several row blocks
    real, gen = normal(30, 5, 2), normal(25, 5, 3, shift=0.7)
    assert pr.precision_recall(real, gen, k=k) == pytest.approx(brute_force(real, gen, k), abs=1e-12)
