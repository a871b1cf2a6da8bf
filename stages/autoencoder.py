"""Stage `autoencoder`: train a VQ-VAE (EMA codebook) or KL-VAE on the prepare shards.

Reads ``prepare``'s train shards through the streaming loader; optimises reconstruction
(+ LPIPS, + commitment / codebook loss for VQ, + KL for the KL-VAE, + optional PatchGAN);
checkpoints everything needed to continue exactly (model, codebook, optimisers, loader
position) and resumes from the newest complete checkpoint; stops cleanly (exit code 75) on
SIGUSR1/SIGTERM or its time budget. At the end: validation metrics on the val shards (PSNR,
SSIM, LPIPS, codebook usage), ``autoencoder.safetensors`` and the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from pipeline import artifacts, atomic, config, manifest, stage_registry
from pipeline.autoencoder import LPIPS, PatchDiscriminator, lpips_input, adaptive_weight, gan_factor, generator_loss, hinge_d_loss
from pipeline.autoencoder.build import build_autoencoder
from pipeline.autoencoder.codebook import perplexity
from pipeline.autoencoder.kl import bits_per_dim, negative_elbo
from pipeline.data.stream import ShardLoader, endless, sequential_batches
from pipeline.errors import LatentpipeError, StageInterrupted
from pipeline.metrics.recon import psnr, ssim
from pipeline.runtime import checkpoint
from pipeline.runtime.dist import Runtime
from pipeline.runtime.logging import MetricsLog
from pipeline.runtime.preemption import StopSignal
from pipeline.seeding import derive_seed, generator

SPEC = stage_registry.get("autoencoder")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs
# Changing these continues training from a checkpoint; any other change starts afresh.
RESUMABLE_CHANGES = ("autoencoder.max_steps", "autoencoder.time_budget_minutes", "autoencoder.log_every",
                     "autoencoder.image_every", "autoencoder.checkpoint_every", "autoencoder.keep_checkpoints",
                     "autoencoder.num_workers")

log = logging.getLogger(__name__)


class NonFiniteLossError(LatentpipeError):
    """Too many non-finite losses in a row."""


def _image_spec(prepared: artifacts.PreparedShards, ae: config.AutoencoderConfig) -> tuple[int, int]:
    """(channels, resolution) of the prepared images, checked against the autoencoder."""
    channels, resolution = prepared.image.channels, prepared.image.resolution
    if resolution % ae.factor:
        raise LatentpipeError(
            f"autoencoder.channel_mult gives f={ae.factor}, which does not divide the "
            f"prepared resolution {resolution}: change data.resolution or autoencoder.channel_mult")
    return channels, resolution


class Objective:
    """The training loss of either autoencoder kind, with its logged terms (and, for VQ, the
    step's code counts)."""

    def __init__(self, cfg: config.AutoencoderConfig, lpips: LPIPS | None):
        self.cfg, self.lpips = cfg, lpips

    def __call__(self, model, x: torch.Tensor, step_generator: torch.Generator):
        cfg, terms, counts = self.cfg, {}, None
        if cfg.kind == "vq":
            x_hat, quantized = model(x)
            pixel = F.mse_loss(x_hat, x) if cfg.reconstruction_loss == "l2" else F.l1_loss(x_hat, x)
            loss = pixel + quantized.loss
            counts = quantized.counts
            terms.update(commitment=quantized.commitment.item(), codebook_loss=quantized.codebook_loss.item(),
                         perplexity=perplexity(quantized.counts).item())
        else:
            x_hat, posterior = model(x, generator=step_generator)
            unwrapped = getattr(model, "module", model)
            elbo = negative_elbo(x, x_hat, posterior, unwrapped.log_scale, cfg.kl_weight)
            dims = x[0].numel()
            pixel = elbo["loss"] / dims  # per-dimension scale, like the pixel losses
            loss = pixel
            terms.update(kl=elbo["kl"].mean().item(), nelbo_bpd=bits_per_dim(elbo["nelbo"].mean(), dims).item())
        if self.lpips is not None and cfg.lpips_weight > 0:
            perceptual = self.lpips(lpips_input(x_hat.float()), lpips_input(x.float())).mean()
            loss = loss + cfg.lpips_weight * perceptual
            terms["lpips"] = perceptual.item()
        terms["reconstruction"] = pixel.item()
        return loss, x_hat, terms, counts


def _validate(model, cfg: config.Config, lpips: LPIPS | None, device) -> dict:
    """Reconstruction metrics on every validation image (posterior mean for the KL-VAE)."""
    model.eval()
    totals = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count, counts = 0, None
    val = [str(path) for path in artifacts.PreparedShards.from_stage_dir(cfg).files("val")]
    with torch.no_grad():
        for batch in sequential_batches(val, cfg.autoencoder.batch_size):
            x = batch["image"].to(device)
            if cfg.autoencoder.kind == "vq":
                quantized = model.encode(x)
                x_hat = model.decode(quantized.z_q)
                used = torch.bincount(quantized.indices.flatten(), minlength=model.codebook.num_codes)
                counts = used if counts is None else counts + used
            else:
                x_hat, _ = model(x, generator=None)
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
        metrics["codebook_kl_nats"] = model.codebook.kl_nats
    model.train()
    return metrics


def run(cfg: config.Config) -> Path:
    ae = cfg.autoencoder
    runtime = Runtime(precision=ae.mixed_precision)
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        prepared = artifacts.PreparedShards.from_stage_dir(cfg)
        channels, resolution = _image_spec(prepared, ae)
        lpips = LPIPS(ae.lpips).to(runtime.device) if ae.lpips != "none" else None  # fails early if weights are missing
        torch.manual_seed(derive_seed(cfg.experiment.seed, "autoencoder-init"))  # modules draw init weights globally
        model = build_autoencoder(ae, channels, seed=cfg.experiment.seed,
                                  all_reduce=runtime.all_reduce_sum, all_gather=runtime.all_gather_rows)
        optimizer = torch.optim.AdamW(model.parameters(), lr=ae.learning_rate, betas=ae.betas, weight_decay=ae.weight_decay)
        discriminator = d_optimizer = None
        if ae.gan_weight > 0:
            discriminator = PatchDiscriminator(in_channels=channels)
            d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=ae.learning_rate, betas=ae.betas)
            discriminator, d_optimizer = runtime.prepare(discriminator, d_optimizer)
        model, optimizer = runtime.prepare(model, optimizer)
        loader = ShardLoader(
            [str(path) for path in prepared.files("train")], batch_size=ae.batch_size, rank=runtime.rank,
            world_size=runtime.world_size, num_workers=ae.num_workers, seed=cfg.experiment.seed,
            samples_per_epoch=prepared.count("train"), shuffle_buffer=ae.shuffle_buffer, flip=ae.flip,
        )
        checkpoints = record.directory / "checkpoints"
        resume_key = config.section_hash(cfg, SECTIONS, ignore=RESUMABLE_CHANGES) + json.dumps(record.inputs, sort_keys=True)
        checkpoint.set_aside_if_stale(checkpoints, resume_key, runtime)
        step = 0
        if (found := checkpoint.latest(checkpoints)) is not None:
            shared, own = checkpoint.load(found, runtime.rank, runtime.world_size)
            runtime.unwrap(model).load_state_dict(shared["model"])
            optimizer.load_state_dict(shared["optimizer"])
            if discriminator is not None:
                runtime.unwrap(discriminator).load_state_dict(shared["discriminator"])
                d_optimizer.load_state_dict(shared["d_optimizer"])
            loader.load_state_dict(own["loader"])
            runtime.load_state_dict(shared["runtime"])
            step = int(shared["step"])
            log.info("autoencoder: resumed from %s (step %d)", found, step)

        def save() -> None:
            shared = {"model": runtime.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                      "runtime": runtime.state_dict()}
            if discriminator is not None:
                shared.update(discriminator=runtime.unwrap(discriminator).state_dict(), d_optimizer=d_optimizer.state_dict())
            checkpoint.save(checkpoints, step, shared, {"loader": loader.state_dict()}, runtime, ae.keep_checkpoints,
                            resume_key)

        metrics_log = MetricsLog(record.directory, enabled=runtime.is_main, start_step=step,
                                 wandb_project=cfg.experiment.wandb_project, config=config.to_dict(cfg))
        objective = Objective(ae, lpips)
        nonfinite_in_a_row = skipped_steps = 0
        budget = None if ae.time_budget_minutes is None else ae.time_budget_minutes * 60
        images_seen, window_start = 0, time.perf_counter()
        model.train()
        with StopSignal(budget) as stop, tqdm(total=ae.max_steps, initial=step, desc="autoencoder",
                                              disable=None if runtime.is_main else True, leave=False) as bar:
            batches = endless(loader)
            while step < ae.max_steps:
                if runtime.any(stop.reason() is not None):
                    save()
                    raise StageInterrupted(f"autoencoder stopped at step {step} ({stop.reason() or 'another rank'}); "
                                           f"rerun the same command to resume")
                batch = next(batches)
                x = batch["image"].to(runtime.device)
                torch.manual_seed(derive_seed(cfg.experiment.seed, "dropout", runtime.rank, step))
                with runtime.autocast():
                    loss, x_hat, terms, counts = objective(model, x, generator(cfg.experiment.seed, "posterior", runtime.rank, step))
                    gan_on = discriminator is not None and gan_factor(step, ae.gan_start_step) > 0
                    if gan_on:
                        g_loss = generator_loss(discriminator(x_hat))
                        weight = adaptive_weight(loss, g_loss, runtime.unwrap(model).decoder.last_layer)
                        loss = loss + ae.gan_weight * weight * g_loss
                        terms["gan_g"] = g_loss.item()
                if runtime.any(not math.isfinite(loss.item())):
                    nonfinite_in_a_row += 1
                    skipped_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("autoencoder: non-finite loss at step %d, step skipped (%d in a row)", step, nonfinite_in_a_row)
                    if nonfinite_in_a_row >= ae.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_a_row} non-finite losses in a row at step {step}: lower "
                            f"autoencoder.learning_rate, use mixed_precision=fp32, or check the data")
                    continue
                nonfinite_in_a_row = 0
                optimizer.zero_grad(set_to_none=True)
                runtime.backward(loss)
                if ae.grad_clip > 0:
                    runtime.clip_grad_norm(model.parameters(), ae.grad_clip, optimizer)
                runtime.step(optimizer)
                if gan_on:
                    d_optimizer.zero_grad(set_to_none=True)
                    with runtime.autocast():
                        d_loss = hinge_d_loss(discriminator(x), discriminator(x_hat.detach()))
                    runtime.backward(d_loss)
                    runtime.step(d_optimizer)
                    terms["gan_d"] = d_loss.item()
                step += 1
                images_seen += x.shape[0] * runtime.world_size
                bar.update()
                if step % ae.log_every == 0 or step == ae.max_steps:
                    elapsed = time.perf_counter() - window_start
                    terms.update(loss=loss.item(), psnr=psnr(x_hat.detach().clamp(-1, 1), x).mean().item(),
                                 images_per_s=images_seen / elapsed, skipped_steps=skipped_steps)
                    if ae.kind == "vq":
                        terms.update(runtime.unwrap(model).codebook.stats(counts, ae.dead_code_steps or ae.log_every))
                    metrics_log.scalars(step, terms)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", psnr=f"{terms['psnr']:.1f}")
                    images_seen, window_start = 0, time.perf_counter()
                if step % ae.image_every == 0:
                    shown = x[:8]
                    metrics_log.images(step, "reconstructions", torch.cat([shown, x_hat.detach()[:8]]), nrow=shown.shape[0])
                if step % ae.checkpoint_every == 0 and step < ae.max_steps:
                    save()
        save()
        metrics_log.close()
        unwrapped = runtime.unwrap(model)
        if runtime.is_main:
            metrics = _validate(unwrapped, cfg, lpips, runtime.device)
            weights_path = record.directory / artifacts.TrainedAutoencoder.WEIGHTS_FILE
            state = {k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()}
            atomic.write_bytes(weights_path, safetensors_bytes(state))
            record.add_output(weights_path)
            record.metrics.update(metrics, steps=step, skipped_steps=skipped_steps)
            record.publish(artifacts.TrainedAutoencoder(
                directory=record.directory, image=artifacts.ImageShape(channels=channels, resolution=resolution),
                latent=artifacts.LatentShape(channels=ae.latent_channels, resolution=resolution // ae.factor,
                                             kind=ae.kind)))
            log.info("autoencoder: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        runtime.barrier()
    return record.directory
