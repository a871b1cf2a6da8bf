"""Processes: closed forms against their definitions, and the VE-frame views against each other."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion import DDPM, NCSN, VE, VP, Denoiser, GaussianMixture, SubVP
from pipeline.diffusion.gmm import sliced_wasserstein, sliced_wasserstein_floor
from pipeline.diffusion.process import Process
from pipeline.sampling import sample


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("process", [DDPM.linear(), DDPM.cosine()], ids=["linear", "cosine"])
def test_closed_form_marginal_equals_iterating_the_chain(process):
    # Exact moments of iterating q(x_t | x_{t-1}) from a fixed x_0 ...
    mean, var = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for t in range(process.T):
        b = process.betas[t]
        mean, var = (1 - b).sqrt() * mean, (1 - b) * var + b
        a, s = process.marginal(t)
        assert torch.allclose(mean, a) and torch.allclose(var, s**2)
    # ... and Monte Carlo through ``step`` with fresh noise.
    g = _g(0)
    x0 = torch.full((20000,), 0.7, dtype=torch.float64)
    x = x0
    for t in range(300):
        x = process.step(x, t, torch.randn(x.shape, generator=g, dtype=x.dtype))
    a, s = process.marginal(299)
    se = s / math.sqrt(len(x))
    assert abs(float(x.mean() - 0.7 * a)) < 4 * se
    assert abs(float(x.var() / s**2) - 1) < 4 * math.sqrt(2 / len(x))


@pytest.mark.parametrize("process", [DDPM.linear(), DDPM.cosine()], ids=["linear", "cosine"])
def test_two_forms_of_the_posterior_mean_agree(process):
    g = _g(1)
    t = torch.randint(0, process.T, (64, 1), generator=g)
    x0 = torch.randn(64, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 5, generator=g, dtype=torch.float64)
    a, s = process.marginal(t)
    x_t = a * x0 + s * eps
    torch.testing.assert_close(process.posterior_mean(t, x_t, x0), process.posterior_mean_from_eps(t, x_t, eps))


def test_posterior_is_the_bayes_update_of_the_forward_step():
    # q(x_{t-1} | x_t, x_0) from Bayes' rule on two Gaussians, for one scalar example.
    p = DDPM.linear()
    t, x0, x_t = 500, 0.3, -1.1
    a_prev, s_prev = p.marginal(t - 1)
    b = p.betas[t]
    prec = 1 / s_prev**2 + (1 - b) / b
    mean = (a_prev * x0 / s_prev**2 + (1 - b).sqrt() * x_t / b) / prec
    torch.testing.assert_close(p.posterior_variance(t), 1 / prec)
    torch.testing.assert_close(p.posterior_mean(t, torch.tensor(x_t, dtype=torch.float64), x0), mean)


def test_cosine_schedule_follows_its_definition():
    p = DDPM.cosine(T=1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(p.betas.max()) <= 0.999
    for t in (0, 10, 500, 900):
        assert math.isclose(float(p.alphas_cumprod[t]), f(t + 1) / f(0), rel_tol=1e-9)


@pytest.mark.parametrize("T", [1000, 10000])
def test_vp_sde_is_the_continuum_limit_of_ddpm(T):
    vp = VP()
    ddpm = DDPM.linear(T, vp.beta_min / 1000, vp.beta_max / 1000)  # ends given at T = 1000, scaled by 1000 / T
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    err = (ddpm.alphas_cumprod.sqrt() - vp.marginal(t)[0]).abs().max()
    assert err < 5.0 / T  # O(1/T): one step of beta/T discretisation


@pytest.mark.parametrize("process", [VP(), SubVP(), VE()], ids=["vp", "subvp", "ve"])
def test_sde_coefficients_generate_the_marginals(process):
    # For dx = f x dt + g dw: d alpha/dt = f alpha and d sigma_t^2/dt = 2 f sigma_t^2 + g^2
    # (Sarkka & Solin 2019, eqs. 5.50-5.51).
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    (a_hi, s_hi), (a_lo, s_lo) = process.marginal(t + h), process.marginal(t - h)
    a, s = process.marginal(t)
    f, g = process.sde(t)
    torch.testing.assert_close((a_hi - a_lo) / (2 * h), f * a, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((s_hi**2 - s_lo**2) / (2 * h), 2 * f * s**2 + g**2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("process", [VP(), SubVP(), VE()], ids=["vp", "subvp", "ve"])
def test_time_and_ve_sigma_are_inverse(process):
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    sigma = process.sigma_ve(t)
    torch.testing.assert_close(process.t_of_sigma(sigma), t)
    alpha, sigma_t = process.marginal(t)
    torch.testing.assert_close(sigma, sigma_t / alpha)
    # The network sees alpha_t x for VP and sub-VP; VE's alpha_t = 1, so it gets EDM's c_in.
    c_in = alpha if not isinstance(process, VE) else (1 + sigma**2).rsqrt()
    torch.testing.assert_close(process.input_scale(sigma), c_in)


@pytest.mark.parametrize("process", [DDPM.linear(T=100), NCSN(levels=10)], ids=["ddpm", "ncsn"])
def test_discrete_time_of_sigma_recovers_the_index(process):
    table = process.sigma_ve(torch.arange(process.t_max + 1))
    assert torch.equal(process.t_of_sigma(table), torch.arange(len(table)))
    grid = process.sigmas()
    assert grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all()) and len(grid) == len(table) + 1


def _range(process):
    return process.sigma_ve(process.t_min), process.sigma_ve(process.t_max)


@pytest.mark.parametrize(
    "process", [DDPM.linear(), VP(), SubVP(), VE(), NCSN()], ids=["ddpm", "vp", "subvp", "ve", "ncsn"]
)
def test_training_sigmas_are_reproducible_and_in_range(process):
    a = process.training_sigmas(1000, _g(3))
    assert torch.equal(a, process.training_sigmas(1000, _g(3))) and a.dtype == torch.float64
    lo, hi = _range(process)
    assert lo * (1 - 1e-9) <= a.min() and a.max() <= hi * (1 + 1e-9)


@pytest.mark.parametrize(
    "process",
    [DDPM.linear(), DDPM.cosine(), VP(), SubVP(), VE(), NCSN()],
    ids=["ddpm", "cosine", "vp", "subvp", "ve", "ncsn"],
)
def test_every_process_satisfies_the_protocol(process):
    assert isinstance(process, Process)


@pytest.mark.parametrize("T", [100, 250, 1000])
def test_linear_schedule_ends_at_the_same_signal_level_for_any_T(T):
    # F1: iDDPM's 1000 / T scaling of both ends; unscaled, T = 100 ended at alphabar 0.36.
    alphabar_end = float(DDPM.linear(T).alphas_cumprod[-1])
    reference = float(DDPM.linear(1000).alphas_cumprod[-1])
    assert alphabar_end < 1e-4 and abs(math.log(alphabar_end / reference)) < math.log(2)


def _eps_network(gmm, process):
    """The mixture's exact eps-predictor under a DDPM process (network time = the index)."""

    def net(x_t, t):
        sigma = process.sigma_ve(t).to(x_t.dtype)[:, None]
        x = x_t * (1 + sigma**2).sqrt()
        return (x - gmm.denoiser(x, sigma)) / sigma

    return net


def test_ddim_on_the_process_grid_reaches_the_same_error_for_any_T():
    # F1 on the Gaussian-mixture oracle: 50 DDIM steps from x_T ~ N(0, I) on each process's own
    # (trailing) grid; T = 100 and 250 must do as well as T = 1000 at equal NFE.
    n, gmm = 2000, GaussianMixture.random(dim=2, components=3, generator=_g(0))
    latents = torch.randn(n, 2, generator=_g(1), dtype=torch.float64)
    reference = gmm.sample(n, _g(2))
    errors = {}
    for T in (100, 250, 1000):
        process = DDPM.linear(T)
        sigmas = process.sigmas(50)
        x = sample(
            Denoiser(_eps_network(gmm, process), process, "eps"), latents * (1 + sigmas[0] ** 2).sqrt(), sigmas, "ddim"
        )
        errors[T] = sliced_wasserstein(x, reference, generator=_g(3))
    floor = sliced_wasserstein_floor(gmm, n)
    assert all(err <= max(1.2 * errors[1000], floor) for err in errors.values()), errors


@pytest.mark.parametrize("process", [VP(), SubVP(), VE()], ids=["vp", "subvp", "ve"])
def test_continuous_network_time_spans_the_embeddings_range(process):
    # F3: 999 t (score_sde), not raw t in [1e-5, 1]; for VE, t is normalised log sigma.
    t = torch.tensor([1e-5, 1e-2, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(process.network_time(process.sigma_ve(t)), 999 * t)


def test_ncsn_and_ve_give_the_network_the_same_time_at_the_same_sigma():
    ncsn, ve = NCSN(0.01, 50.0, levels=11), VE(0.01, 50.0)
    torch.testing.assert_close(ncsn.network_time(ncsn.levels), 99.9 * torch.arange(11, dtype=torch.float64))
    torch.testing.assert_close(ncsn.network_time(ncsn.levels), ve.network_time(ncsn.levels))


@pytest.mark.parametrize("process", [DDPM.linear(), DDPM.cosine()], ids=["linear", "cosine"])
def test_forward_step_takes_one_timestep_per_sample(process):
    x = torch.randn(5, 3, generator=_g(4), dtype=torch.float64)
    noise = torch.randn(5, 3, generator=_g(5), dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 999])
    rows = torch.stack([process.step(x[i], int(t[i]), noise[i]) for i in range(5)])
    torch.testing.assert_close(process.step(x, t, noise), rows)


def test_ncsn_sampling_grid_honours_n():
    process = NCSN(levels=100)
    grid = process.sigmas(10)
    assert len(grid) == 11 and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
    assert grid[0] == process.levels[-1] and grid[-2] == process.levels[0]
    assert all(bool((process.levels == s).any()) for s in grid[:-1])  # levels the network was trained on
    assert len(process.sigmas()) == 101
