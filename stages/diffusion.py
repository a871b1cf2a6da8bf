"""Stage `diffusion`: a DiT or U-Net denoiser trained on the encode stage's latents.

The model learns the continuous, normalised latents (codebook vectors for VQ, posterior samples
for KL; see :mod:`pipeline.latents`) under the configured process and objective (DDPM L_simple
with eps / x0 / v prediction, or VP / sub-VP / VE denoising score matching), class-conditional
with label dropout for classifier-free guidance. It keeps an EMA of the weights, checkpoints
everything needed to continue bit for bit and resumes from the newest complete checkpoint,
stops cleanly (exit code 75) on SIGUSR1/SIGTERM or its time budget, skips steps whose loss or
gradient is not finite and, after several in a row, rolls back to the last checkpoint with a
lower learning rate. Periodic sample grids are decoded with the EMA weights. At the end:
``denoiser.safetensors`` (EMA weights) and the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from pipeline import artifacts, atomic, config, manifest, stage_registry
from pipeline.data.stream import ShardLoader, endless
from pipeline.diffusion.build import LOSSES, build_network, build_process, drop_labels, sampling_sigmas, sigma_range
from pipeline.diffusion.parameterization import Denoiser
from pipeline.errors import LatentpipeError, StageInterrupted
from pipeline.latents import LatentSpace
from pipeline.networks import training_flops
from pipeline.runtime import checkpoint
from pipeline.runtime.dist import Runtime
from pipeline.runtime.ema import EMA
from pipeline.runtime.logging import MetricsLog
from pipeline.runtime.optim import build_optimizer, lr_schedule, scale_learning_rate
from pipeline.runtime.preemption import StopSignal
from pipeline.sampling.generate import generate
from pipeline.seeding import derive_seed, generator

SPEC = stage_registry.get("diffusion")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs
# Changing these continues training from a checkpoint; any other change starts afresh.
RESUMABLE_CHANGES = tuple(f"diffusion.{key}" for key in (
    "max_steps", "time_budget_minutes", "log_every", "image_every", "checkpoint_every", "keep_checkpoints",
    "num_workers", "max_nonfinite_steps", "on_nonfinite", "rollback_lr_factor", "max_rollbacks", "peak_tflops"))
# The periodic sample grids: a fast, good sampler (tools/bench_samplers.py) at a fixed setting,
# so grids of different steps and runs compare.
PREVIEW_METHOD, PREVIEW_STEPS, PREVIEW_GUIDANCE, PREVIEW_ROWS = "dpmpp_2m", 20, 2.0, 10

log = logging.getLogger(__name__)


class NonFiniteLossError(LatentpipeError):
    """Training diverged: too many non-finite steps and no rollback left."""


def _num_classes(cfg: config.Config, prepared: artifacts.PreparedShards) -> int:
    if not cfg.diffusion.class_conditional:
        return 0
    classes = prepared.classes
    if not classes:
        raise LatentpipeError("diffusion.class_conditional=true needs labelled images, but the prepare stage found "
                              "no classes: set diffusion.class_conditional=false or label the data "
                              "(data.labels_from_subfolders=true)")
    return len(classes)


@torch.no_grad()
def _preview(net, ema: EMA, cfg: config.Config, space: LatentSpace, process, num_classes: int, shape, device):
    """A grid of decoded samples from the EMA weights (row r: class r mod C)."""
    ema_net = build_network(cfg.diffusion, shape[0], shape[1], num_classes).to(device).eval()
    ema.copy_to(ema_net)
    count = PREVIEW_ROWS * PREVIEW_ROWS
    labels = (torch.arange(count, device=device) // PREVIEW_ROWS) % num_classes if num_classes else None
    generators = [generator(cfg.experiment.seed, "preview", i) for i in range(count)]
    latents = generate(Denoiser(ema_net, process, cfg.diffusion.prediction), shape,
                       sampling_sigmas(process, "karras", PREVIEW_STEPS), generators, method=PREVIEW_METHOD,
                       labels=labels, null_class=num_classes, guidance_scale=PREVIEW_GUIDANCE, device=device)
    autoencoder = artifacts.load_autoencoder(cfg, device)
    return autoencoder.decode(space.to_decoder(latents, snap=True)).clamp(-1, 1)


def run(cfg: config.Config) -> Path:
    d = cfg.diffusion
    runtime = Runtime(precision=d.mixed_precision, deepspeed=d.deepspeed, grad_clip=d.grad_clip, batch_size=d.batch_size,
                      gradient_accumulation_steps=d.gradient_accumulation_steps)
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        prepared, encoded = artifacts.PreparedShards.from_stage_dir(cfg), artifacts.EncodedLatents.from_stage_dir(cfg)
        space, num_classes = encoded.latent_space(d.normalize), _num_classes(cfg, prepared)
        shape = (encoded.latent.channels, encoded.latent.resolution, encoded.latent.resolution)
        if d.flip and not encoded.latent.has_mirrors:
            raise LatentpipeError("diffusion.flip=true needs the mirrored latents: set encode.flip_twin=true and "
                                  "rerun `latentpipe encode`, or diffusion.flip=false")
        process = build_process(d)
        torch.manual_seed(derive_seed(cfg.experiment.seed, "diffusion-init"))  # modules draw init weights globally
        net = build_network(d, shape[0], shape[1], num_classes)
        flops_per_sample = training_flops(net.config)
        ema = EMA(net, decay=d.ema_decay, warmup_steps=d.ema_warmup_steps)
        optimizer = build_optimizer(net.parameters(), lr=d.learning_rate, betas=d.betas, weight_decay=d.weight_decay)
        scheduler = lr_schedule(optimizer, warmup_steps=d.warmup_steps, total_steps=d.max_steps, kind=d.lr_schedule)
        model, optimizer = runtime.prepare(net, optimizer)
        loader = ShardLoader(
            [str(path) for path in encoded.files("train")], batch_size=d.batch_size,
            rank=runtime.rank, world_size=runtime.world_size, num_workers=d.num_workers, seed=cfg.experiment.seed,
            samples_per_epoch=prepared.count("train"), shuffle_buffer=d.shuffle_buffer,
        )
        checkpoints = record.directory / "checkpoints"
        resume_key = config.section_hash(cfg, SECTIONS, ignore=RESUMABLE_CHANGES) + json.dumps(record.inputs, sort_keys=True)
        checkpoint.set_aside_if_stale(checkpoints, resume_key, runtime)
        progress = {"step": 0, "rollbacks": 0, "skipped_steps": 0}

        def save() -> None:
            shared, own = runtime.training_state(model, optimizer)
            shared.update(scheduler=scheduler.state_dict(), ema=ema.state_dict(), progress=dict(progress))
            own.update(loader=loader.state_dict())
            checkpoint.save(checkpoints, progress["step"], shared, own, runtime, d.keep_checkpoints, resume_key)

        def restore() -> Path | None:
            """Load the newest readable checkpoint, if any; its path."""
            if (found := checkpoint.load_latest(checkpoints, runtime)) is None:
                return None
            path, shared, own = found
            runtime.load_training_state(model, optimizer, shared, own)
            scheduler.load_state_dict(shared["scheduler"])
            ema.load_state_dict(shared["ema"])
            loader.load_state_dict(own["loader"])
            progress.update(shared["progress"])
            return path

        if (resumed := restore()) is not None:
            log.info("diffusion: resumed from %s (step %d)", resumed, progress["step"])

        metrics_log = MetricsLog(record.directory, enabled=runtime.is_main, start_step=progress["step"],
                                 wandb_project=cfg.experiment.wandb_project, config=config.to_dict(cfg))
        loss_fn = LOSSES[d.prediction]
        nonfinite_in_a_row, window = 0, _Window()
        budget = None if d.time_budget_minutes is None else d.time_budget_minutes * 60
        model.train()
        with StopSignal(budget) as stop, tqdm(total=d.max_steps, initial=progress["step"], desc="diffusion",
                                              disable=None if runtime.is_main else True, leave=False) as bar:
            batches = endless(loader)
            while progress["step"] < d.max_steps:
                step = progress["step"]
                if runtime.any(stop.reason() is not None):
                    save()
                    raise StageInterrupted(f"diffusion stopped at step {step} ({stop.reason() or 'another rank'}); "
                                           f"rerun the same command to resume")
                finite = True
                for micro in range(d.gradient_accumulation_steps):  # one optimiser step
                    waited = time.perf_counter()
                    batch = next(batches)
                    window.data_wait += time.perf_counter() - waited
                    step_generator = generator(cfg.experiment.seed, "diffusion-step", runtime.rank, step, micro)
                    mirrored = torch.rand(len(batch["key"]), generator=step_generator) < 0.5 if d.flip else None
                    x0 = space.from_batch(batch, mirrored, step_generator).to(runtime.device)
                    cond = {}
                    if num_classes:
                        cond["y"] = drop_labels(batch["label"], d.label_dropout, num_classes, step_generator).to(runtime.device)
                    with runtime.accumulate(model):
                        with runtime.autocast():
                            loss = loss_fn(model, process, x0, step_generator, **cond)
                        finite = finite and not runtime.any(not math.isfinite(loss.item()))
                        if finite:
                            runtime.backward(loss)
                    window.samples += x0.shape[0] * runtime.world_size
                if finite:
                    # grad_clip 0 measures without clipping (DeepSpeed: its config's gradient_clipping 0)
                    max_norm = d.grad_clip or (0.0 if runtime.zero_stage else math.inf)
                    grad_norm = runtime.clip_grad_norm(model.parameters(), max_norm, optimizer)
                    finite = runtime.scaler is not None or not runtime.any(not math.isfinite(float(grad_norm)))
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_in_a_row += 1
                    progress["skipped_steps"] += 1
                    log.warning("diffusion: non-finite loss or gradient at step %d, step skipped (%d in a row)",
                                step, nonfinite_in_a_row)
                    if nonfinite_in_a_row >= d.max_nonfinite_steps:
                        rollbacks, skipped = progress["rollbacks"] + 1, progress["skipped_steps"]
                        if d.on_nonfinite == "stop" or rollbacks > d.max_rollbacks or (found := restore()) is None:
                            raise NonFiniteLossError(
                                f"{nonfinite_in_a_row} non-finite steps in a row at step {step} after "
                                f"{rollbacks - 1} rollback(s): lower diffusion.learning_rate, use "
                                f"diffusion.mixed_precision=fp32, or check the latents")
                        progress.update(rollbacks=rollbacks, skipped_steps=skipped)
                        # the checkpoint may predate earlier rollbacks: scale to factor**rollbacks in all
                        target = d.learning_rate * d.rollback_lr_factor ** rollbacks
                        scale_learning_rate(optimizer, scheduler, target / scheduler.base_lrs[0])
                        batches, nonfinite_in_a_row = endless(loader), 0
                        bar.n = progress["step"]
                        bar.refresh()
                        log.warning("diffusion: rolled back to %s with the learning rate x%g", found,
                                    d.rollback_lr_factor ** rollbacks)
                    continue
                nonfinite_in_a_row = 0
                runtime.step(optimizer)
                optimizer.zero_grad(set_to_none=True)  # after the step: accumulation keeps gradients until then
                scheduler.step()
                with runtime.full_parameters(model):
                    ema.update(runtime.unwrap(model), step + 1)
                progress["step"] = step = step + 1
                window.steps += 1
                bar.update()
                if step % d.log_every == 0 or step == d.max_steps:
                    terms = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                             "skipped_steps": progress["skipped_steps"], **window.rates(flops_per_sample, d.peak_tflops, runtime.world_size)}
                    metrics_log.scalars(step, terms)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", img_s=f"{terms['images_per_s']:.0f}",
                                    step=f"{terms['step_time_ms']:.0f}ms", wait=f"{terms['data_wait_fraction']:.1%}",
                                    **({"mfu": f"{terms['mfu']:.1%}"} if "mfu" in terms else {}))
                    window = _Window()
                if step % d.checkpoint_every == 0 and step < d.max_steps:
                    save()
                if runtime.is_main and (step % d.image_every == 0 or step == d.max_steps):
                    images = _preview(model, ema, cfg, space, process, num_classes, shape, runtime.device)
                    metrics_log.images(step, "samples", images, nrow=PREVIEW_ROWS)
        save()
        metrics_log.close()
        if runtime.is_main:
            weights_path = record.directory / artifacts.TrainedDenoiser.WEIGHTS_FILE
            atomic.write_bytes(weights_path, safetensors_bytes(ema.averaged_state_dict()))
            record.add_output(weights_path)
            record.metrics.update(steps=progress["step"], skipped_steps=progress["skipped_steps"],
                                  rollbacks=progress["rollbacks"], final_loss=loss.item(),
                                  parameters=sum(p.numel() for p in net.parameters()))
            record.publish(artifacts.TrainedDenoiser(directory=record.directory, denoiser=artifacts.DenoiserInfo(
                backbone=d.backbone, network=asdict(net.config), num_classes=num_classes, latent_shape=shape,
                process=d.process, prediction=d.prediction, sigma_range=sigma_range(process),
                training_flops_per_sample=flops_per_sample)))
        runtime.barrier()
    return record.directory


class _Window:
    """Throughput of the steps since the last log line: images/s of the job, and this rank's
    model TFLOP/s, MFU and fraction of time spent waiting for data."""

    def __init__(self):
        self.start, self.steps, self.samples, self.data_wait = time.perf_counter(), 0, 0, 0.0

    def rates(self, flops_per_sample: int, peak_tflops: float | None, world_size: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        rates = {"images_per_s": self.samples / elapsed, "step_time_ms": 1000 * elapsed / max(self.steps, 1),
                 "data_wait_fraction": self.data_wait / elapsed,
                 "model_tflops": flops_per_sample * self.samples / world_size / elapsed / 1e12}
        if peak_tflops:
            rates["mfu"] = rates["model_tflops"] / peak_tflops
        return rates
