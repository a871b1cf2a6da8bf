"""Stage `diffusion`: a DiT or U-Net denoiser trained on the encode stage's latents.

The model learns the continuous, normalised latents (codebook vectors for VQ, posterior samples
for KL; see :mod:`pipeline.latents`) under the configured process and objective (DDPM L_simple
with eps / x0 / v prediction, or VP / sub-VP / VE denoising score matching), class-conditional
with label dropout for classifier-free guidance. It keeps an EMA of the weights, checkpoints
everything needed to continue bit for bit and resumes from the newest complete checkpoint,
stops cleanly (exit code 75) on SIGUSR1/SIGTERM or its time budget, skips steps whose loss or
gradient is not finite and, after several in a row, rolls back to the last checkpoint with a
lower learning rate. Periodic sample grids are decoded with the EMA weights. At the end:
``denoiser.safetensors`` (EMA weights) and the manifest. ``diffusion.init_from`` starts the DiT
from a published checkpoint (pipeline.interop) instead of random weights; its sha256 is recorded
and part of the resume identity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from pipeline import artifacts, atomic, config, manifest, stage_registry
from pipeline.data.stream import ShardLoader
from pipeline.diffusion.build import build_loss, build_network, build_process, drop_labels, sampling_sigmas, sigma_range
from pipeline.diffusion.parameterization import Denoiser
from pipeline.errors import LatentpipeError
from pipeline.interop import checkpoint_sha256, load_dit
from pipeline.latents import LatentSpace
from pipeline.networks import training_flops
from pipeline.runtime.dist import Runtime
from pipeline.runtime.ema import EMA
from pipeline.runtime.optim import build_optimizer, lr_schedule
from pipeline.runtime.training import TrainingLoop, configure_backends, prepare_network, start_training, to_device
from pipeline.sampling.generate import generate
from pipeline.seeding import derive_seed, generator

SPEC = stage_registry.get("diffusion")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs
# Changing these continues training from a checkpoint; any other change starts afresh.
RESUMABLE_CHANGES = tuple(
    f"diffusion.{key}"
    for key in (
        "max_steps",
        "time_budget_minutes",
        "log_every",
        "image_every",
        "checkpoint_every",
        "keep_checkpoints",
        "num_workers",
        "max_nonfinite_steps",
        "on_nonfinite",
        "rollback_lr_factor",
        "max_rollbacks",
        "peak_tflops",
        "compile",
        "tf32",
        "channels_last",
    )
)
# The periodic sample grids: a fast, good sampler (tools/bench_samplers.py) at a fixed setting,
# so grids of different steps and runs compare.
PREVIEW_METHOD, PREVIEW_STEPS, PREVIEW_GUIDANCE, PREVIEW_ROWS = "dpmpp_2m", 20, 2.0, 10

log = logging.getLogger(__name__)


def _num_classes(cfg: config.Config, prepared: artifacts.PreparedShards) -> int:
    if not cfg.diffusion.class_conditional:
        return 0
    classes = prepared.classes
    if not classes:
        raise LatentpipeError(
            "diffusion.class_conditional=true needs labelled images, but the prepare stage found "
            "no classes: set diffusion.class_conditional=false or label the data "
            "(data.labels_from_subfolders=true)"
        )
    return len(classes)


@torch.no_grad()
def _preview(net, ema: EMA, cfg: config.Config, space: LatentSpace, process, num_classes: int, shape, device):
    """A grid of decoded samples from the EMA weights (row r: class r mod C)."""
    ema_net = build_network(cfg.diffusion, shape[0], shape[1], num_classes).to(device).eval()
    ema.copy_to(ema_net)
    count = PREVIEW_ROWS * PREVIEW_ROWS
    labels = (torch.arange(count, device=device) // PREVIEW_ROWS) % num_classes if num_classes else None
    generators = [generator(cfg.experiment.seed, "preview", i) for i in range(count)]
    latents = generate(
        Denoiser(ema_net, process, cfg.diffusion.prediction),
        shape,
        sampling_sigmas(process, "karras", PREVIEW_STEPS),
        generators,
        method=PREVIEW_METHOD,
        labels=labels,
        null_class=num_classes,
        guidance_scale=PREVIEW_GUIDANCE,
        device=device,
    )
    autoencoder = artifacts.load_autoencoder(cfg, device)
    return autoencoder.decode(space.to_decoder(latents, snap=True)).clamp(-1, 1)


def _init_from(net, path: str) -> dict:
    """Load the DiT checkpoint at ``path`` into ``net`` (a tensor of another shape is refused,
    named); returns what the manifest records of it."""
    net.load_state_dict(load_dit(path, net.config).state_dict())
    return {"path": path, "sha256": checkpoint_sha256(path)}


def run(cfg: config.Config) -> Path:
    d = cfg.diffusion
    runtime = Runtime(
        precision=d.mixed_precision,
        deepspeed=d.deepspeed,
        grad_clip=d.grad_clip,
        batch_size=d.batch_size,
        gradient_accumulation_steps=d.gradient_accumulation_steps,
    )
    configure_backends(runtime.device, d.tf32)
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        prepared, encoded = artifacts.PreparedShards.from_stage_dir(cfg), artifacts.EncodedLatents.from_stage_dir(cfg)
        space, num_classes = encoded.latent_space(d.normalize), _num_classes(cfg, prepared)
        shape = (encoded.latent.channels, encoded.latent.resolution, encoded.latent.resolution)
        if d.flip and not encoded.latent.has_mirrors:
            raise LatentpipeError(
                "diffusion.flip=true needs the mirrored latents: set encode.flip_twin=true and "
                "rerun `latentpipe encode`, or diffusion.flip=false"
            )
        process = build_process(d)
        torch.manual_seed(derive_seed(cfg.experiment.seed, "diffusion-init"))  # modules draw init weights globally
        channels_last = d.channels_last and d.backbone == "unet"  # NHWC helps convolutions, not a DiT's linears
        net = build_network(d, shape[0], shape[1], num_classes)
        init = _init_from(net, d.init_from) if d.init_from else None
        net = prepare_network(net, runtime.device, compile=d.compile, channels_last=channels_last)
        ema = EMA(net, decay=d.ema_decay, warmup_steps=d.ema_warmup_steps)  # on the device: no copies per step
        optimizer = build_optimizer(net.parameters(), lr=d.learning_rate, betas=d.betas, weight_decay=d.weight_decay)
        scheduler = lr_schedule(optimizer, warmup_steps=d.warmup_steps, total_steps=d.max_steps, kind=d.lr_schedule)
        model, optimizer = runtime.prepare(net, optimizer)
        loader = ShardLoader(
            [str(path) for path in encoded.files("train")],
            batch_size=d.batch_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            num_workers=d.num_workers,
            seed=cfg.experiment.seed,
            samples_per_epoch=prepared.count("train"),
            shuffle_buffer=d.shuffle_buffer,
        )
        record.watch(loader)
        state, metrics_log = start_training(
            cfg,
            NAME,
            record.directory,
            record.inputs,
            runtime,
            resumable=RESUMABLE_CHANGES,
            keep=d.keep_checkpoints,
            loader=loader,
            pairs={"model": (model, optimizer)},
            scheduler=scheduler,
            ema=ema,
            identity=init,
        )
        loss_fn, flops_per_sample = build_loss(d), training_flops(net.config)
        # grad_clip 0 measures without clipping (DeepSpeed: its config's gradient_clipping 0)
        max_norm = d.grad_clip or (0.0 if runtime.zero_stage else math.inf)
        with TrainingLoop(
            state, d, NAME, metrics_log=metrics_log, flops_per_sample=flops_per_sample, peak_tflops=d.peak_tflops
        ) as loop:
            for step in loop.steps():
                for micro in range(d.gradient_accumulation_steps):  # one optimiser step
                    batch = loop.next_batch()
                    step_generator = generator(cfg.experiment.seed, "diffusion-step", runtime.rank, step, micro)
                    mirrored = torch.rand(len(batch["key"]), generator=step_generator) < 0.5 if d.flip else None
                    x0 = to_device(space.from_batch(batch, mirrored, step_generator), runtime.device, channels_last)
                    cond = {}
                    if num_classes:
                        cond["y"] = to_device(
                            drop_labels(batch["label"], d.label_dropout, num_classes, step_generator), runtime.device
                        )
                    with runtime.accumulate(model):
                        with runtime.autocast():
                            loss = loss_fn(model, process, x0, step_generator, **cond)
                        loop.backward(loss)
                if not loop.check(runtime.clip_grad_norm(model.parameters(), max_norm, optimizer)):
                    continue
                runtime.step(optimizer)
                optimizer.zero_grad(set_to_none=True)  # after the step: accumulation keeps gradients until then
                loop.done(x0.shape[0] * d.gradient_accumulation_steps)
                if runtime.is_main and loop.every(d.image_every):
                    images = _preview(model, ema, cfg, space, process, num_classes, shape, runtime.device)
                    metrics_log.images(step + 1, "samples", images, nrow=PREVIEW_ROWS)
        state.save()
        metrics_log.close()
        if runtime.is_main:
            weights_path = record.directory / artifacts.TrainedDenoiser.WEIGHTS_FILE
            atomic.write_bytes(weights_path, safetensors_bytes(ema.averaged_state_dict()))
            record.add_output(weights_path)
            record.metrics.update(
                steps=state.progress.step,
                skipped_steps=state.progress.skipped_steps,
                rollbacks=state.progress.rollbacks,
                parameters=sum(p.numel() for p in net.parameters()),
            )
            if loop.last_loss is not None:  # None when the job resumed from its final checkpoint
                record.metrics["final_loss"] = loop.last_loss.item()
            record.publish(
                artifacts.TrainedDenoiser(
                    directory=record.directory,
                    denoiser=artifacts.DenoiserInfo(
                        backbone=d.backbone,
                        network=asdict(net.config),
                        num_classes=num_classes,
                        latent_shape=shape,
                        process=d.process,
                        prediction=d.prediction,
                        sigma_range=sigma_range(process),
                        training_flops_per_sample=flops_per_sample,
                        init_from=init,
                    ),
                )
            )
        runtime.barrier()
    return record.directory
