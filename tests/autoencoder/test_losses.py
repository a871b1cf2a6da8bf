import torch

from pipeline.autoencoder.losses import PatchDiscriminator, adaptive_weight, gan_factor, generator_loss, hinge_d_loss


def test_patch_discriminator_scores_patches():
    d = PatchDiscriminator(in_channels=1, channels=8, n_layers=3)
    assert d(torch.randn(2, 1, 64, 64)).shape == (2, 1, 6, 6)  # pix2pix 70x70 PatchGAN layout
    assert d(torch.randn(2, 1, 32, 32)).shape == (2, 1, 2, 2)


def test_hinge_loss():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -3.0)) == 0  # both margins met
    torch.testing.assert_close(hinge_d_loss(torch.zeros(4), torch.zeros(4)), torch.tensor(1.0))
    torch.testing.assert_close(hinge_d_loss(torch.tensor([0.5]), torch.tensor([0.5])), torch.tensor(1.0))
    assert generator_loss(torch.tensor([1.0, 3.0])) == -2.0


def test_adaptive_weight_balances_gradient_norms_at_the_last_layer():
    layer = torch.nn.Conv2d(2, 1, 1)
    x = torch.randn(3, 2, 4, 4)
    out = layer(x)
    rec, gan = out.pow(2).mean(), out.mean()
    lam = adaptive_weight(rec, gan, layer.weight)
    (g_rec,) = torch.autograd.grad(rec, layer.weight, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan, layer.weight, retain_graph=True)
    torch.testing.assert_close(lam, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert not lam.requires_grad
    # scaling L_GAN by s scales lambda by ~1/s (up to delta): lambda * L_GAN is invariant
    torch.testing.assert_close(adaptive_weight(rec, 10 * gan, layer.weight) * 10, lam, rtol=1e-2, atol=0)
    (rec + lam * gan).backward()  # graphs survive for the real backward


def test_gan_factor_starts_at_the_start_step():
    assert [gan_factor(s, 3) for s in range(5)] == [0, 0, 0, 1, 1]
