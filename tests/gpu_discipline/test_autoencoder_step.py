"""Autoencoder training and encoding on the GPU stand-ins.

The VQ step (meta): k-means initialisation on the first batch, straight-through lookup, codebook
EMA update, LPIPS, PatchGAN with VQGAN's adaptive weight, backward and AdamW steps. The KL step
(meta): posterior sample with the step's CPU generator, negative ELBO, LPIPS, backward, step.

Data-dependent exception: whether any code is dead (``bool(dead.any())``, one read-back per
step) cannot be answered by a stand-in, so the training step runs with ``dead_code_steps=0``
and the restart itself (:meth:`Codebook.restart`, branch-free) runs on the stand-in directly;
tests/autoencoder/test_codebook.py checks the decision on real tensors.
"""

import pytest
import torch

from pipeline import seeding
from pipeline.autoencoder import LPIPS, PatchDiscriminator, adaptive_weight, generator_loss, lpips_input
from pipeline.autoencoder.build import build_autoencoder
from pipeline.autoencoder.codebook import Codebook
from pipeline.autoencoder.kl import negative_elbo
from pipeline.config import AutoencoderConfig

TINY = {
    "channels": 8,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "norm_groups": 4,
    "latent_channels": 4,
    "num_codes": 16,
}


def _autoencoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AutoencoderConfig(kind=kind, dead_code_steps=0, kmeans_init=True, **TINY)
    return build_autoencoder(cfg, image_channels=3, seed=0).train()


def _images() -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_vq_training_step_with_kmeans_lpips_and_gan_on_meta(meta, lpips_cache):
    model = meta.module(_autoencoder("vq"))
    lpips, disc = meta.module(LPIPS("alex", cache=lpips_cache)), meta.module(PatchDiscriminator(3, 8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = meta.tensor(_images())
    with meta.running():
        x_hat, q = model(x)
        rec = (x_hat - x).abs().mean() + lpips(lpips_input(x_hat), lpips_input(x)).mean()
        gan = generator_loss(disc(x_hat))
        loss = rec + q.loss + adaptive_weight(rec, gan, model.decoder.last_layer) * gan
        loss.backward()
        optimizer.step()
    assert bool(model.codebook._host_initialised) and model.codebook._host_step == 1
    state = model.codebook.state_dict()
    assert all(v.device == meta.device for v in state.values())
    assert q.indices.dtype == torch.long and q.counts.shape == (16,)


def test_kl_training_step_with_lpips_on_meta(meta, lpips_cache):
    model = meta.module(_autoencoder("kl"))
    lpips = meta.module(LPIPS("alex", cache=lpips_cache))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = meta.tensor(_images())
    with meta.running():
        x_hat, posterior = model(x, generator=seeding.generator(0, "autoencoder-step", 0, 0))
        loss = negative_elbo(x, x_hat, posterior, model.log_scale, 1e-6)["loss"] / x[0].numel()
        loss = loss + lpips(lpips_input(x_hat), lpips_input(x)).mean()
        loss.backward()
        optimizer.step()
    assert x_hat.device == meta.device and model.log_scale.grad is not None


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_on_the_stand_in(stand_in, ema):
    codebook = stand_in.module(Codebook(16, 4, ema=ema, kmeans_batches=0, dead_after=3).train())
    dead = stand_in.tensor(torch.arange(16) % 3 == 0)
    pool = stand_in.tensor(torch.randn(10, 4))  # fewer rows than codes: drawn with repeats
    with stand_in.running():
        codebook.restart(dead, pool)
    assert codebook.codes.device == stand_in.device and codebook.restarts.device == stand_in.device


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_encoding_a_batch_as_the_encode_stage_stores_it(stand_in, kind):
    model = stand_in.module(_autoencoder(kind).eval())
    x = stand_in.tensor(_images())
    with stand_in.running(), torch.no_grad():
        if kind == "vq":
            stored = {"codes": model.encode(x).indices.to(torch.int16)}
        else:
            q = model.encode(x)
            stored = {"mean": q.mean.half(), "logvar": q.logvar.half()}
    assert all(v.device == stand_in.device and v.shape[-1] == 8 for v in stored.values())
