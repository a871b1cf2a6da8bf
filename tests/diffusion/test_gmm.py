"""The Gaussian-mixture oracle against autograd, Monte Carlo and brute-force conditioning."""

from __future__ import annotations

import torch

from pipeline.diffusion.gmm import GaussianMixture, sliced_wasserstein


def _g(seed):
    return torch.Generator().manual_seed(seed)


GMM = GaussianMixture.random(dim=3, components=4, generator=_g(0))


def test_score_is_the_gradient_of_the_log_density_and_tweedie_gives_the_denoiser():
    x = GMM.sample(32, _g(1), sigma=0.5).requires_grad_(True)
    sigma = torch.rand(32, generator=_g(2), dtype=torch.float64) * 2 + 0.01  # per-sample levels
    grad = torch.autograd.grad(GMM.log_prob(x, sigma).sum(), x)[0]
    x = x.detach()
    torch.testing.assert_close(GMM.score(x, sigma), grad)
    torch.testing.assert_close(GMM.denoiser(x, sigma), x + sigma[:, None] ** 2 * grad)


def test_per_sample_sigma_equals_one_call_per_sample():
    x = GMM.sample(8, _g(1), sigma=1.0)
    sigma = torch.linspace(0.1, 3, 8, dtype=torch.float64)
    one_by_one = torch.cat([GMM.denoiser(x[i : i + 1], sigma[i]) for i in range(8)])
    torch.testing.assert_close(GMM.denoiser(x, sigma), one_by_one)


def test_samples_have_the_mixture_moments_at_every_sigma():
    for sigma in (0.0, 0.7):
        x = GMM.sample(200_000, _g(3), sigma=sigma)
        w = GMM.weights[:, None]
        mean = (w * GMM.means).sum(0)
        centred = GMM.means - mean
        cov = (w[:, :, None] * (GMM.covs + centred[:, :, None] * centred[:, None, :])).sum(0) + sigma**2 * torch.eye(
            3, dtype=torch.float64
        )
        torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
        torch.testing.assert_close(torch.cov(x.T), cov, atol=0.03, rtol=0.02)


def test_log_density_normalises():
    gmm = GaussianMixture.random(dim=2, components=3, generator=_g(4))
    grid = torch.linspace(-6, 6, 601, dtype=torch.float64)
    xx = torch.cartesian_prod(grid, grid)
    mass = GMM_mass = gmm.log_prob(xx, 0.3).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1) < 1e-3, GMM_mass


def test_condition_matches_brute_force_bayes():
    gmm = GaussianMixture.random(dim=2, components=3, generator=_g(5))
    y, noise = 0.4, 0.2
    cond = gmm.condition(torch.tensor([0]), torch.tensor([y], dtype=torch.float64), noise_std=noise)
    grid = torch.linspace(-5, 5, 4001, dtype=torch.float64)
    # p(x1 | y) proportional to int p(x0, x1) N(y; x0, noise^2) dx0, by quadrature over x0.
    x0 = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    pts = torch.cartesian_prod(x0, grid)
    lik = torch.distributions.Normal(pts[:, 0], noise).log_prob(torch.tensor(y, dtype=torch.float64))
    joint = (gmm.log_prob(pts) + lik).exp().reshape(len(x0), len(grid)).sum(0)
    density = joint / (joint.sum() * (grid[1] - grid[0]))
    torch.testing.assert_close(cond.log_prob(grid[:, None]).exp(), density, atol=2e-3, rtol=0)


def test_sliced_wasserstein_is_zero_on_itself_and_sees_a_shift():
    a = GMM.sample(1000, _g(6))
    assert sliced_wasserstein(a, a) == 0
    assert sliced_wasserstein(a, a + 0.5, generator=_g(1)) > 0.2


def test_per_element_sigma_with_a_clean_coordinate_is_the_conditional_denoiser():
    gmm = GaussianMixture.random(dim=3, components=3, generator=_g(7))
    y = torch.tensor([0.2], dtype=torch.float64)
    cond = gmm.condition(torch.tensor([1]), y)
    x_rest = gmm.sample(16, _g(8), sigma=0.6)[:, [0, 2]]
    x = torch.stack([x_rest[:, 0], y.expand(16), x_rest[:, 1]], 1)
    sigma = torch.tensor([0.6, 0.0, 0.6], dtype=torch.float64).expand(16, 3)
    torch.testing.assert_close(gmm.denoiser(x, sigma)[:, [0, 2]], cond.denoiser(x_rest, 0.6))
    torch.testing.assert_close(gmm.denoiser(x, sigma)[:, 1], y.expand(16))
    # and a per-element sigma that is constant equals the per-sample path
    torch.testing.assert_close(gmm.denoiser(x, torch.full((16, 3), 0.6, dtype=torch.float64)), gmm.denoiser(x, 0.6))


def test_mmd_to_the_mixture_is_near_zero_for_its_samples_and_sees_a_small_shift():
    gmm = GaussianMixture.random(dim=2, components=3, generator=_g(9))
    exact = [gmm.mmd(gmm.sample(2000, _g(20 + i)), bandwidth=0.3) for i in range(3)]
    shifted = gmm.mmd(gmm.sample(2000, _g(30)) + 0.05, bandwidth=0.3)
    assert max(abs(e) for e in exact) < 0.2 * shifted
    # A wrong closed-form term (E_qp or E_pp) would leave a bias at every bandwidth.
    for bandwidth in (0.1, 1.0):
        assert abs(gmm.mmd(gmm.sample(4000, _g(40)), bandwidth=bandwidth)) < 0.01
