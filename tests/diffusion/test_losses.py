"""Losses: zero at the exact network, explicit weighting, and the closed-form VLB terms."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import config
from pipeline.config import ConfigError
from pipeline.diffusion import DDPM, NCSN, VE, VP, SubVP
from pipeline.diffusion.build import build_loss
from pipeline.diffusion.losses import constant, dsm_loss, eps_loss, min_snr, v_loss, vlb, vlb_term, x0_loss
from tests.diffusion.oracle import process_time

PROCESSES = {"ddpm": DDPM.linear(), "vp": VP(), "subvp": SubVP(), "ve": VE(), "ncsn": NCSN(levels=20)}
POINT = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)  # data = a single point: E[x_0 | x_t] = POINT


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _network_from_x0(process, target, x0_estimate):
    """The network whose x0 estimate at x_t is ``x0_estimate(x_t)``, reporting the target's
    prediction derived from it at x_t = alpha x_0 + s eps (alpha = input_scale, s = alpha sigma;
    the score network outputs the score times the marginal std, std grad log p = -eps)."""

    def net(x_t, time):
        sigma = process.sigma_ve(process_time(process, time)).to(x_t.dtype)[:, None]
        alpha = process.input_scale(sigma)
        s = alpha * sigma
        x0 = x0_estimate(x_t)
        eps = (x_t - alpha * x0) / s
        return {"eps": eps, "x0": x0, "v": alpha * eps - s * x0, "score": -eps}[target]

    return net


def _exact_network(process, target):
    """The Bayes-optimal network for data concentrated at POINT."""
    return _network_from_x0(process, target, lambda x_t: POINT.expand_as(x_t))


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("loss,target", [(eps_loss, "eps"), (x0_loss, "x0"), (v_loss, "v"), (dsm_loss, "score")])
def test_losses_vanish_at_the_exact_network_and_not_elsewhere(name, loss, target):
    process = PROCESSES[name]
    x0 = POINT.expand(64, 3)
    assert float(loss(_exact_network(process, target), process, x0, _g(0))) < 1e-16
    assert float(loss(lambda x, t: torch.zeros_like(x), process, x0, _g(0))) > 1e-3


@pytest.mark.parametrize("loss", [eps_loss, x0_loss, v_loss, dsm_loss])
def test_weighting_is_explicit(loss):
    process = VP()
    x0 = torch.randn(64, 3, generator=_g(1), dtype=torch.float64)
    net = lambda x, t: 0.5 * x  # noqa: E731
    base = loss(net, process, x0, _g(2), weighting=constant)
    assert torch.allclose(loss(net, process, x0, _g(2), weighting=lambda s: 3 * torch.ones_like(s)), 3 * base)
    # The weighting sees each sample's drawn level.
    seen = []
    loss(net, process, x0, _g(2), weighting=lambda s: seen.append(s) or torch.ones_like(s))
    torch.testing.assert_close(seen[0], process.training_sigmas(64, _g(2)))


def _one_x0_guess_in_every_parameterization(process, target):
    """A fixed, wrong x0 estimate (0.5 x_t) reported as the target's prediction."""
    return _network_from_x0(process, target, lambda x_t: 0.5 * x_t)


@pytest.mark.parametrize("name", ["ddpm", "vp", "ve"])
def test_min_snr_gives_one_loss_whatever_the_network_predicts(name):
    """Min-SNR-gamma weights the x0 error; its eps and v forms must turn an eps or v error back
    into the same weighted x0 error (exact where alpha^2 + s^2 = 1)."""
    process = PROCESSES[name]
    x0 = torch.randn(256, 3, generator=_g(5), dtype=torch.float64)
    weighted = {
        target: loss(
            _one_x0_guess_in_every_parameterization(process, target), process, x0, _g(6), weighting=min_snr(5.0, target)
        )
        for loss, target in [(eps_loss, "eps"), (x0_loss, "x0"), (v_loss, "v")]
    }
    torch.testing.assert_close(weighted["eps"], weighted["x0"])
    torch.testing.assert_close(weighted["v"], weighted["x0"])
    assert not torch.allclose(
        weighted["x0"], x0_loss(_one_x0_guess_in_every_parameterization(process, "x0"), process, x0, _g(6))
    )


@pytest.mark.parametrize("target,diffusers_prediction", [("eps", "epsilon"), ("v", "v_prediction")])
def test_min_snr_weights_equal_diffusers_snr_gamma(target, diffusers_prediction):
    """Ours == the weights of diffusers' training scripts (train_text_to_image.py, --snr_gamma 5)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    timesteps = torch.arange(0, 1000, 7)
    snr = compute_snr(DDPMScheduler(num_train_timesteps=1000), timesteps)
    theirs = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    theirs = theirs / snr if diffusers_prediction == "epsilon" else theirs / (snr + 1)
    ours = min_snr(5.0, target)(DDPM.linear(1000).sigma_ve(timesteps))
    # diffusers' alphas_cumprod is float32: 1 - abar at the first timesteps carries ~1e-4 of rounding
    torch.testing.assert_close(ours.float(), theirs, rtol=5e-4, atol=0)


def test_the_config_chooses_the_weighting():
    cfg = config.load(overrides=["diffusion.loss_weighting=min_snr", "diffusion.min_snr_gamma=2"]).diffusion
    process = DDPM.linear()
    x0 = torch.randn(64, 3, generator=_g(7), dtype=torch.float64)
    net = lambda x, t: 0.5 * x  # noqa: E731
    expected = v_loss(net, process, x0, _g(8), weighting=min_snr(2.0, "v"))
    torch.testing.assert_close(build_loss(cfg)(net, process, x0, _g(8)), expected)
    assert build_loss(config.load().diffusion)(net, process, x0, _g(8)) != expected
    with pytest.raises(ConfigError, match="loss_weighting"):
        config.load(
            overrides=["diffusion.loss_weighting=min_snr", "diffusion.process=ve", "diffusion.prediction=score"]
        )


def test_dsm_default_weighting_is_sigma_squared_on_ncsn_levels():
    process = NCSN(levels=10)
    x0 = torch.randn(256, 3, generator=_g(3), dtype=torch.float64)
    net = lambda x, i: -x  # noqa: E731
    assert torch.allclose(
        dsm_loss(net, process, x0, _g(4)), dsm_loss(net, process, x0, _g(4), weighting=lambda s: s**2)
    )


def test_vlb_kl_term_is_hos_weighted_eps_error():
    # Ho et al. 2020, eq. 12: with sigma_t^2 = beta~_t,
    # L_{t-1} = beta_t^2 / (2 beta~_t alpha_t (1 - abar_t)) ||eps - eps_theta||^2.
    process = DDPM.linear()
    x0 = torch.rand(16, 6, generator=_g(5), dtype=torch.float64) * 2 - 1
    noise = torch.randn(16, 6, generator=_g(6), dtype=torch.float64)
    net = lambda x, t: 0.9 * x  # noqa: E731
    for t in (1, 10, 400, 999):
        a, s = process.marginal(t)
        x_t = a * x0 + s * noise
        coef = process.betas[t] ** 2 / (
            2 * process.posterior_variance(t) * process.alphas[t] * (1 - process.alphas_cumprod[t])
        )
        expected = coef * (noise - net(x_t, t)).pow(2).sum(1)
        torch.testing.assert_close(vlb_term(net, process, x0, torch.tensor(t), noise), expected)
        assert (vlb_term(_exact_ddpm_eps(process, x0), process, x0, torch.tensor(t), noise).abs() < 1e-9).all()


def test_fixed_large_variance_at_t0_is_the_clipped_posterior_variance():
    # Ho et al.'s "fixedlarge": sigma_t^2 = append(beta~_1, betas[1:]), so at t = 0 both choices
    # of variance give the same decoder L_0.
    process = DDPM.linear()
    x0 = torch.rand(8, 6, generator=_g(9), dtype=torch.float64) * 2 - 1
    noise = torch.randn(8, 6, generator=_g(10), dtype=torch.float64)
    net = lambda x, t: 0.9 * x  # noqa: E731
    zero = torch.tensor(0)
    torch.testing.assert_close(
        vlb_term(net, process, x0, zero, noise, "beta"), vlb_term(net, process, x0, zero, noise, "posterior")
    )
    assert not torch.allclose(
        vlb_term(net, process, x0, torch.tensor(5), noise, "beta"),
        vlb_term(net, process, x0, torch.tensor(5), noise, "posterior"),
    )


def _exact_ddpm_eps(process, x0):
    def net(x_t, t):
        a, s = (c.to(x_t.dtype).reshape(-1, 1) for c in process.marginal(t))
        return (x_t - a * x0) / s

    return net


def test_vlb_full_sum_and_its_one_term_estimate():
    process = DDPM.linear(T=50)
    x0 = (torch.randint(0, 256, (8, 4), generator=_g(7)).double() / 127.5) - 1
    net = _exact_ddpm_eps(process, x0)  # the KL terms vanish; L_T and L_0 remain
    full = vlb(net, process, x0, _g(8), full=True)
    estimates = torch.stack([vlb(net, process, x0, _g(100 + i)) for i in range(400)])
    assert (full > 0).all()
    # The one-term estimate is unbiased: T * L_0 with probability 1/T plus L_T.
    se = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - full).abs() < 4 * se + 1e-9).all()
