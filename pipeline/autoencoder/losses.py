"""Adversarial part of the VQGAN objective (Esser et al. 2021, "Taming Transformers", Sec. 3.2).

- PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional
  Adversarial Networks", Sec. 3.2.2): a stack of stride-2 4x4 convs that scores overlapping
  patches, one logit per patch (pix2pix's NLayerDiscriminator, as VQGAN uses it).
- Hinge loss (Lim & Ye 2017, "Geometric GAN"; VQGAN's ``hinge_d_loss``):
  L_D = 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]), generator L_GAN = -E[D(x_hat)].
- Adaptive weight (VQGAN Eq. 7): lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta),
  delta = 1e-4, G_L the decoder's last layer; the loss is L_rec + factor * lambda * L_GAN with
  factor 0 before ``start_step`` (VQGAN's ``disc_start``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTIVE_DELTA = 1e-4
ADAPTIVE_MAX = 1e4
"""VQGAN clamps lambda to [0, 1e4] and detaches it."""


class PatchDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator: conv(4, s2) + LeakyReLU(0.2), then ``n_layers - 1`` blocks of
    conv(4, s2) + BatchNorm + LeakyReLU with doubling width (capped at 8x), one stride-1 block,
    and a stride-1 conv to one logit per patch. Weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, n_layers + 1):
            prev, width = width, channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(prev, width, 4, stride, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> patch logits (N, 1, h, w)."""
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """L_GAN = -E[D(x_hat)]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to [0, 1e4] and
    detached. Both losses must still hold their graphs (they are backpropagated later)."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + ADAPTIVE_DELTA)).clamp(0.0, ADAPTIVE_MAX).detach()


def gan_factor(step: int, start_step: int) -> float:
    """1 once ``step >= start_step``, else 0 (the adversarial terms are off during warm-up)."""
    return 1.0 if step >= start_step else 0.0
