"""The autoencoder's training objective: reconstruction (+ commitment / codebook loss for VQ,
+ KL for the KL-VAE) + LPIPS, with the terms the training loop logs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.autoencoder.codebook import perplexity
from pipeline.autoencoder.kl import negative_elbo
from pipeline.autoencoder.lpips import LPIPS, lpips_input


class Objective:
    """The training loss of either autoencoder kind, with its logged terms (and, for VQ, the
    step's code counts). The terms stay on the device: the training loop reads them on log
    steps only."""

    def __init__(self, cfg: config.AutoencoderConfig, lpips: LPIPS | None):
        self.cfg, self.lpips = cfg, lpips

    def __call__(self, model, x: torch.Tensor, step_generator: torch.Generator):
        cfg, counts = self.cfg, None
        terms: dict[str, torch.Tensor] = {}
        if cfg.kind == "vq":
            x_hat, quantized = model(x)
            pixel = F.mse_loss(x_hat, x) if cfg.reconstruction_loss == "l2" else F.l1_loss(x_hat, x)
            loss = pixel + quantized.loss
            counts = quantized.counts
            terms.update(
                commitment=quantized.commitment.detach(),
                codebook_loss=quantized.codebook_loss.detach(),
                perplexity=perplexity(quantized.counts),
            )
        else:
            x_hat, posterior = model(x, generator=step_generator)
            unwrapped = getattr(model, "module", model)
            elbo = negative_elbo(x, x_hat, posterior, unwrapped.log_scale, cfg.kl_weight)
            dims = x[0].numel()
            pixel = elbo["loss"] / dims  # per-dimension scale, like the pixel losses
            loss = pixel
            # the continuous density's bound per dimension; not bits/dim of 8-bit images (kl.py)
            terms.update(kl=elbo["kl"].mean().detach(), nelbo_nats_per_dim=(elbo["nelbo"].mean() / dims).detach())
        if self.lpips is not None and cfg.lpips_weight > 0:
            perceptual = self.lpips(lpips_input(x_hat.float()), lpips_input(x.float())).mean()
            loss = loss + cfg.lpips_weight * perceptual
            terms["lpips"] = perceptual.detach()
        terms["reconstruction"] = pixel.detach()
        return loss, x_hat, terms, counts
