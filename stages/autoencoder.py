"""Stage `autoencoder`: train a VQ-VAE (EMA codebook) or KL-VAE on the prepare shards.

Reads ``prepare``'s train shards through the streaming loader; optimises reconstruction
(+ LPIPS, + commitment / codebook loss for VQ, + KL for the KL-VAE, + optional PatchGAN);
checkpoints everything needed to continue exactly (model, codebook, optimisers, loader
position) and resumes from the newest complete checkpoint; stops cleanly (exit code 75) on
SIGUSR1/SIGTERM or its time budget. At the end: validation metrics on the val shards (PSNR,
SSIM, LPIPS, codebook usage), ``autoencoder.safetensors`` and the manifest.

With ``autoencoder.kind=pretrained`` nothing is trained: the published autoencoder at
``autoencoder.pretrained`` (pipeline.interop) is checked against the prepared images before any
batch, measured on the val shards like a trained one, and published with its description (source,
own scaling factor, weight sha256s) in place of a weights file.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save as safetensors_bytes

from pipeline import artifacts, atomic, config, manifest, stage_registry
from pipeline.autoencoder import (
    LPIPS,
    PatchDiscriminator,
    adaptive_weight,
    gan_factor,
    generator_loss,
    hinge_d_loss,
    lpips_input,
)
from pipeline.autoencoder.build import build_autoencoder
from pipeline.autoencoder.codebook import perplexity
from pipeline.autoencoder.nets import VQAutoencoder
from pipeline.autoencoder.objective import Objective
from pipeline.data.stream import ShardLoader, sequential_batches
from pipeline.errors import LatentpipeError
from pipeline.interop import load_pretrained_autoencoder
from pipeline.metrics.recon import psnr, ssim
from pipeline.runtime.dist import Runtime
from pipeline.runtime.optim import build_optimizer, lr_schedule
from pipeline.runtime.training import TrainingLoop, configure_backends, prepare_network, start_training, to_device
from pipeline.seeding import derive_seed, generator

SPEC = stage_registry.get("autoencoder")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs
# Changing these continues training from a checkpoint; any other change starts afresh.
RESUMABLE_CHANGES = (
    "autoencoder.max_steps",
    "autoencoder.time_budget_minutes",
    "autoencoder.log_every",
    "autoencoder.image_every",
    "autoencoder.checkpoint_every",
    "autoencoder.keep_checkpoints",
    "autoencoder.num_workers",
    "autoencoder.on_nonfinite",
    "autoencoder.rollback_lr_factor",
    "autoencoder.max_rollbacks",
    "autoencoder.compile",
    "autoencoder.tf32",
    "autoencoder.channels_last",
)

log = logging.getLogger(__name__)


def _image_spec(prepared: artifacts.PreparedShards, ae: config.AutoencoderConfig) -> tuple[int, int]:
    """(channels, resolution) of the prepared images, checked against the autoencoder."""
    channels, resolution = prepared.image.channels, prepared.image.resolution
    if resolution % ae.factor:
        raise LatentpipeError(
            f"autoencoder.channel_mult gives f={ae.factor}, which does not divide the "
            f"prepared resolution {resolution}: change data.resolution or autoencoder.channel_mult"
        )
    return channels, resolution


def _validate(model, kind: str, cfg: config.Config, lpips: LPIPS | None, device) -> dict:
    """Reconstruction metrics on every validation image (posterior mean for a KL autoencoder)."""
    model.eval()
    totals = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count, counts = 0, None
    val = [str(path) for path in artifacts.PreparedShards.from_stage_dir(cfg).files("val")]
    with torch.no_grad():
        for batch in sequential_batches(val, cfg.autoencoder.batch_size):
            x = batch["image"].to(device)
            if kind == "vq":
                quantized = model.encode(x)
                x_hat = model.decode(quantized.z_q)
                used = torch.bincount(quantized.indices.flatten(), minlength=model.codebook.num_codes)
                counts = used if counts is None else counts + used
            else:
                x_hat = model.decode(model.encode(x).mean)
            x_hat = x_hat.clamp(-1, 1)
            totals["psnr"] += float(psnr(x_hat, x).sum())
            side = min(x.shape[-2:])  # the standard 11-px window, shrunk (odd) for tiny images
            totals["ssim"] += float(ssim(x_hat, x, window=min(11, side - 1 + side % 2)).sum())
            if lpips is not None:
                totals["lpips"] += float(lpips(lpips_input(x_hat), lpips_input(x)).sum())
            count += x.shape[0]
    metrics = {f"val_{k}": v / count for k, v in totals.items() if k != "lpips" or lpips is not None}
    metrics["val_images"] = count
    if counts is not None:
        metrics["val_codebook_usage"] = float((counts > 0).float().mean())
        metrics["val_codebook_perplexity"] = float(perplexity(counts.float()))
    model.train()
    return metrics


def _use_pretrained(cfg: config.Config) -> Path:
    """kind=pretrained: check the published autoencoder against the prepared images (before any
    batch), measure it on the val split and publish it as the trained kinds are published."""
    ae = cfg.autoencoder
    runtime = Runtime()
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        prepared = artifacts.PreparedShards.from_stage_dir(cfg)
        channels, resolution = prepared.image.channels, prepared.image.resolution
        assert ae.pretrained is not None  # AutoencoderConfig.check requires it for kind=pretrained
        model = load_pretrained_autoencoder(ae.pretrained, scaling_factor=ae.pretrained_scaling_factor)
        model.check_images(channels, resolution)
        if runtime.is_main:
            lpips = LPIPS(ae.lpips).to(runtime.device) if ae.lpips != "none" else None
            metrics = _validate(model.to(runtime.device), model.kind, cfg, lpips, runtime.device)
            record.metrics.update(metrics)
            record.publish(
                artifacts.TrainedAutoencoder(
                    directory=record.directory,
                    image=artifacts.ImageShape(channels=channels, resolution=resolution),
                    latent=artifacts.LatentShape(
                        channels=model.latent_channels, resolution=resolution // model.factor, kind=model.kind
                    ),
                    pretrained=model.describe(),
                )
            )
            log.info(
                "autoencoder (pretrained %s): %s", ae.pretrained, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            )
        runtime.barrier()
    return record.directory


def run(cfg: config.Config) -> Path:
    ae = cfg.autoencoder
    if ae.kind == "pretrained":
        return _use_pretrained(cfg)
    runtime = Runtime(precision=ae.mixed_precision)
    configure_backends(runtime.device, ae.tf32)
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        prepared = artifacts.PreparedShards.from_stage_dir(cfg)
        channels, resolution = _image_spec(prepared, ae)
        lpips = LPIPS(ae.lpips).to(runtime.device) if ae.lpips != "none" else None  # fails early if weights are missing
        torch.manual_seed(derive_seed(cfg.experiment.seed, "autoencoder-init"))  # modules draw init weights globally
        model = prepare_network(
            build_autoencoder(
                ae,
                channels,
                seed=cfg.experiment.seed,
                all_reduce=runtime.all_reduce_sum,
                all_gather=runtime.all_gather_rows,
            ),
            runtime.device,
            compile=ae.compile,
            channels_last=ae.channels_last,
        )
        pairs = {"model": runtime.prepare(model, _adamw(model, ae))}
        if ae.gan_weight > 0:
            discriminator = prepare_network(
                PatchDiscriminator(in_channels=channels),
                runtime.device,
                compile=ae.compile,
                channels_last=ae.channels_last,
            )
            pairs["discriminator"] = runtime.prepare(discriminator, _adamw(discriminator, ae, weight_decay=0.01))
        (model, optimizer), (discriminator, d_optimizer) = pairs["model"], pairs.get("discriminator", (None, None))
        scheduler = lr_schedule(optimizer, warmup_steps=ae.warmup_steps, total_steps=ae.max_steps, kind=ae.lr_schedule)
        loader = ShardLoader(
            [str(path) for path in prepared.files("train")],
            batch_size=ae.batch_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            num_workers=ae.num_workers,
            seed=cfg.experiment.seed,
            samples_per_epoch=prepared.count("train"),
            shuffle_buffer=ae.shuffle_buffer,
            flip=ae.flip,
        )
        record.watch(loader)
        state, metrics_log = start_training(
            cfg,
            NAME,
            record.directory,
            record.inputs,
            runtime,
            resumable=RESUMABLE_CHANGES,
            keep=ae.keep_checkpoints,
            loader=loader,
            pairs=pairs,
            scheduler=scheduler,
        )
        objective = Objective(ae, lpips)
        with TrainingLoop(state, ae, NAME, metrics_log=metrics_log) as loop:
            for step in loop.steps():
                x = to_device(loop.next_batch()["image"], runtime.device, ae.channels_last)
                torch.manual_seed(derive_seed(cfg.experiment.seed, "dropout", runtime.rank, step))
                with runtime.autocast():
                    loss, x_hat, terms, counts = objective(
                        model, x, generator(cfg.experiment.seed, "posterior", runtime.rank, step)
                    )
                    gan_on = discriminator is not None and gan_factor(step, ae.gan_start_step) > 0
                    if gan_on:
                        g_loss = generator_loss(discriminator(x_hat))
                        weight = adaptive_weight(loss, g_loss, runtime.unwrap(model).decoder.last_layer)
                        loss, terms["gan_g"] = loss + ae.gan_weight * weight * g_loss, g_loss.detach()
                loop.backward(loss)
                if not loop.check(runtime.clip_grad_norm(model.parameters(), ae.grad_clip or math.inf, optimizer)):
                    continue
                runtime.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
                if gan_on:
                    with runtime.autocast():
                        d_loss = hinge_d_loss(discriminator(x), discriminator(x_hat.detach()))
                    d_optimizer.zero_grad(set_to_none=True)  # drop what the generator's loss put there
                    runtime.backward(d_loss)
                    runtime.step(d_optimizer)
                    terms["gan_d"] = d_loss.detach()
                loop.done(x.shape[0], partial(_logged, terms, x, x_hat, counts, runtime.unwrap(model), ae))
                if (step + 1) % ae.image_every == 0:
                    metrics_log.images(
                        step + 1, "reconstructions", torch.cat([x[:8], x_hat.detach()[:8]]), nrow=len(x[:8])
                    )
        state.save()
        metrics_log.close()
        unwrapped = runtime.unwrap(model)
        if runtime.is_main:
            metrics = _validate(unwrapped, ae.kind, cfg, lpips, runtime.device)
            if ae.kind == "vq":
                metrics["codebook_kl_nats"] = cast(VQAutoencoder, unwrapped).codebook.kl_nats
            weights_path = record.directory / artifacts.TrainedAutoencoder.WEIGHTS_FILE
            state_dict = {k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}
            atomic.write_bytes(weights_path, safetensors_bytes(state_dict))
            record.add_output(weights_path)
            record.metrics.update(
                metrics,
                steps=state.progress.step,
                skipped_steps=state.progress.skipped_steps,
                rollbacks=state.progress.rollbacks,
            )
            record.publish(
                artifacts.TrainedAutoencoder(
                    directory=record.directory,
                    image=artifacts.ImageShape(channels=channels, resolution=resolution),
                    latent=artifacts.LatentShape(
                        channels=ae.latent_channels, resolution=resolution // ae.factor, kind=ae.kind
                    ),
                )
            )
            log.info("autoencoder: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        runtime.barrier()
    return record.directory


def _adamw(module: torch.nn.Module, ae: config.AutoencoderConfig, weight_decay: float | None = None):
    """AdamW at the autoencoder's rate (the discriminator keeps torch's default decay 0.01, as before)."""
    return build_optimizer(
        module.parameters(),
        lr=ae.learning_rate,
        betas=ae.betas,
        weight_decay=ae.weight_decay if weight_decay is None else weight_decay,
    )


def _logged(terms: dict, x: torch.Tensor, x_hat: torch.Tensor, counts, model, ae: config.AutoencoderConfig) -> dict:
    """The step's metrics for the log (log steps only: these read values from the device)."""
    logged = {**terms, "psnr": psnr(x_hat.detach().float().clamp(-1, 1), x.float()).mean()}
    if ae.kind == "vq":
        logged.update(model.codebook.stats(counts, ae.dead_code_steps or ae.log_every))
    return logged
