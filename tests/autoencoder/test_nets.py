import pytest
import torch

from pipeline.autoencoder.codebook import Codebook
from pipeline.autoencoder.nets import Decoder, Encoder, KLAutoencoder, VQAutoencoder

MULTS = {2: (1, 2), 4: (1, 2, 2), 8: (1, 1, 2, 2), 16: (1, 1, 2, 2, 2)}


def nets(f: int, image_channels: int, latent: int, enc_out: int | None = None):
    kw = dict(channels=16, channel_mult=MULTS[f], num_res_blocks=1, norm_groups=8)
    return (
        Encoder(in_channels=image_channels, out_channels=enc_out or latent, **kw),
        Decoder(in_channels=latent, out_channels=image_channels, **kw),
    )


@pytest.mark.parametrize("f", [2, 4, 8, 16])
@pytest.mark.parametrize("image_channels", [1, 3])
def test_shapes_for_every_downsampling_factor(f, image_channels):
    enc, dec = nets(f, image_channels, 4)
    x = torch.randn(2, image_channels, 32, 32)
    z = enc(x)
    assert enc.factor == dec.factor == f and z.shape == (2, 4, 32 // f, 32 // f)
    assert dec(z).shape == x.shape


def test_mnist_size_with_f4():
    enc, dec = nets(4, 1, 3)
    x = torch.randn(2, 1, 28, 28)
    assert dec(enc(x)).shape == x.shape


def test_encoder_is_per_image():
    """No mixing across the batch (GroupNorm, not BatchNorm): a batch equals its parts."""
    enc, _ = nets(4, 3, 4)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(enc(x), torch.cat([enc(x[:1]), enc(x[1:])]), rtol=1e-4, atol=1e-5)


def test_wrong_channels_or_size_name_the_fix():
    enc, _ = nets(8, 1, 4)
    with pytest.raises(ValueError, match="1 channel"):
        enc(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by f=8"):
        enc(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="factor 32"):
        Encoder(in_channels=1, out_channels=4, channel_mult=(1, 1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="norm_groups"):
        Encoder(in_channels=1, out_channels=4, channels=12, norm_groups=8)


def test_vq_autoencoder_trains_every_part():
    enc, dec = nets(4, 1, 4)
    model = VQAutoencoder(enc, dec, Codebook(16, 4, ema=False, kmeans_batches=1, dead_after=0)).train()
    x = torch.randn(4, 1, 16, 16)
    x_hat, q = model(x)
    ((x - x_hat).pow(2).mean() + q.loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model.decode_indices(model.encode(x).indices), model(x)[0])


def test_kl_autoencoder_samples_with_the_given_generator():
    enc, dec = nets(4, 3, 4, enc_out=8)
    model = KLAutoencoder(enc, dec)
    x = torch.randn(2, 3, 16, 16)
    a, q = model(x, generator=torch.Generator().manual_seed(0))
    b, _ = model(x, generator=torch.Generator().manual_seed(0))
    c, _ = model(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(model(x, generator=None)[0], model.decode(q.mean))


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_channels_last_gives_the_same_reconstruction(kind):
    """The autoencoders run in channels-last layout (``model.to(memory_format=torch.channels_last)``
    and a channels-last batch, cuDNN's fast layout) with the same numbers as contiguous."""
    torch.manual_seed(0)
    enc, dec = nets(4, 3, 4, enc_out=8 if kind == "kl" else None)
    model = (
        KLAutoencoder(enc, dec)
        if kind == "kl"
        else VQAutoencoder(enc, dec, Codebook(16, 4, kmeans_batches=0, dead_after=0))
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    run = (lambda m, v: m(v, generator=None)[0]) if kind == "kl" else (lambda m, v: m(v)[0])
    reference = run(model, x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        run(model, x.contiguous(memory_format=torch.channels_last)), reference, atol=1e-5, rtol=1e-5
    )
