"""First-stage autoencoders: networks, VQ codebook, Gaussian posterior, LPIPS, GAN loss."""

from pipeline.autoencoder.codebook import Codebook, Quantized, perplexity, usage
from pipeline.autoencoder.kl import DiagonalGaussian, gaussian_nll, negative_elbo
from pipeline.autoencoder.losses import PatchDiscriminator, adaptive_weight, gan_factor, generator_loss, hinge_d_loss
from pipeline.autoencoder.lpips import LPIPS, lpips_input
from pipeline.autoencoder.nets import Decoder, Encoder, KLAutoencoder, VQAutoencoder

__all__ = [
    "LPIPS",
    "Codebook",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "KLAutoencoder",
    "PatchDiscriminator",
    "Quantized",
    "VQAutoencoder",
    "adaptive_weight",
    "gan_factor",
    "gaussian_nll",
    "generator_loss",
    "hinge_d_loss",
    "lpips_input",
    "negative_elbo",
    "perplexity",
    "usage",
]
