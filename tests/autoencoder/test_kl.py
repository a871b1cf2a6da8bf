import math

import torch

from pipeline.autoencoder.build import build_autoencoder
from pipeline.autoencoder.kl import DiagonalGaussian, gaussian_nll, negative_elbo
from pipeline.autoencoder.objective import Objective
from pipeline.config import AutoencoderConfig


def posterior(seed=0, shape=(3, 2, 4, 4)) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.5)


def test_kl_matches_torch_distributions():
    q = posterior()
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(q.kl(), ref.flatten(1).sum(1))
    zero = DiagonalGaussian(torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 1, 1))
    assert torch.equal(zero.kl(), torch.zeros(2))


def test_reparameterised_samples_have_the_posterior_moments_and_gradients():
    q = DiagonalGaussian(
        torch.full((20000, 1, 1, 1), 2.0, requires_grad=True),
        torch.full((20000, 1, 1, 1), math.log(0.25), requires_grad=True),
    )
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean() - 2.0) < 0.02 and abs(z.std() - 0.5) < 0.01
    z.sum().backward()
    assert torch.all(q.mean.grad == 1.0) and q.logvar.grad.abs().sum() > 0


def test_gaussian_nll_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    log_scale = torch.tensor(-0.7)
    ref = -torch.distributions.Normal(x_hat, log_scale.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_nll(x, x_hat, log_scale), ref)


def test_negative_elbo_terms():
    q = posterior()
    x = torch.zeros(3, 1, 8, 8)
    terms = negative_elbo(x, x + 0.1, q, torch.tensor(0.0), kl_weight=1e-6)
    torch.testing.assert_close(terms["nelbo"], terms["nll"] + terms["kl"])
    torch.testing.assert_close(terms["loss"], (terms["nll"] + 1e-6 * terms["kl"]).mean())


def test_training_logs_the_bound_in_nats_per_dimension_not_as_bits_per_dim():
    """Training sees undequantised images, so the bound is on the continuous density: logged as
    nelbo / dims in nats, and nothing claims to be bits/dim of 8-bit data."""
    cfg = AutoencoderConfig(kind="kl", channels=8, channel_mult=(1, 2), norm_groups=4, latent_channels=2, lpips="none")
    model = build_autoencoder(cfg, 1)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, x_hat, terms, _ = Objective(cfg, None)(model, x, torch.Generator().manual_seed(1))
    posterior = model.encode(x)  # the same posterior; the step's sample came from generator 1
    z = posterior.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_hat, model.decode(z))
    nelbo = negative_elbo(x, x_hat, posterior, model.log_scale)["nelbo"]
    torch.testing.assert_close(terms["nelbo_nats_per_dim"], nelbo.mean().detach() / x[0].numel())
    assert not [name for name in terms if "bpd" in name or "bits" in name]
