import math

import torch

from pipeline.autoencoder.kl import DiagonalGaussian, bits_per_dim, gaussian_nll, negative_elbo


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


def test_negative_elbo_and_bits_per_dim():
    q = posterior()
    x = torch.zeros(3, 1, 8, 8)
    terms = negative_elbo(x, x + 0.1, q, torch.tensor(0.0), kl_weight=1e-6)
    torch.testing.assert_close(terms["nelbo"], terms["nll"] + terms["kl"])
    torch.testing.assert_close(terms["loss"], (terms["nll"] + 1e-6 * terms["kl"]).mean())
    # a uniform density over [-1, 1]^D (nats = D log 2) is exactly 8 bits per 8-bit dimension
    assert bits_per_dim(torch.tensor(64 * math.log(2.0)), 64) == torch.tensor(8.0)
