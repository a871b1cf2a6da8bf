"""Stage `sample`: latents from the EMA denoiser, decoded to images.

Sample i is drawn from its own generator (seed, i) with class label i mod C (or random /
given labels), so the images do not depend on the batch size, the number of ranks or the
number of array tasks. The samples are rendered in chunks of ``sample.chunk_size``; each chunk
is written atomically and skipped on a rerun, so an interrupted job resumes. Ranks of one job,
and the tasks of a SLURM array job (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT), take
disjoint chunks; a task of a multi-task array writes only its chunks, and the next plain run
(one job, any number of ranks) renders whatever is missing and assembles the outputs:
``samples.npz`` (uint8 images (N, H, W, C) and labels), ``grid.png``, optional WebDataset
shards, and with ``sample.inpaint`` the inpainting of masked validation images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torchvision.utils
from tqdm import tqdm

from pipeline import artifacts, atomic, config, manifest, stage_registry
from pipeline.data.shards import ShardWriter, make_sample
from pipeline.data.stream import sequential_batches
from pipeline.diffusion.build import sampling_sigmas
from pipeline.labels import labels_for
from pipeline.latents import point_latent
from pipeline.metrics.images import to_uint8
from pipeline.runtime.dist import Runtime
from pipeline.sampling import SOLVERS
from pipeline.sampling import sample as run_sampler
from pipeline.sampling.generate import generate
from pipeline.sampling.inverse import inpainting
from pipeline.seeding import generator

SPEC = stage_registry.get("sample")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs
# The result of a chunk depends on these keys only (not on batch or chunk bookkeeping).
RENDER_IRRELEVANT = (
    "sample.batch_size",
    "sample.write_shards",
    "sample.grid_rows",
    "sample.inpaint",
    "sample.inpaint_mask",
    "sample.inpaint_count",
)

log = logging.getLogger(__name__)


def array_task() -> tuple[int, int]:
    """(index, count) of this SLURM array task; (0, 1) outside an array job."""
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if count <= 1:
        return 0, 1
    return int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0")), count


def _render(
    trained: artifacts.TrainedDiffusion,
    autoencoder,
    cfg: config.Config,
    indices: range,
    device,
    info: dict,
    class_counts: list[int],
) -> tuple[np.ndarray, np.ndarray]:
    s = cfg.sample
    labels = labels_for(s, indices, trained.num_classes, cfg.experiment.seed, class_counts)
    generators = [generator(cfg.experiment.seed, "sample", i) for i in indices]
    options = {"eta": s.eta} if "eta" in SOLVERS[s.method].options else {}
    latents = generate(
        trained.denoiser,
        trained.shape,
        sampling_sigmas(trained.process, s.grid, s.steps),
        generators,
        method=s.method,
        labels=None if labels is None else labels.to(device),
        null_class=trained.num_classes,
        guidance_scale=s.guidance_scale,
        guidance_interval=tuple(s.guidance_interval) or None,
        device=device,
        info=info,
        **options,
    )
    with torch.no_grad():
        images = autoencoder.decode(trained.space.to_decoder(latents, snap=s.snap))
    return to_uint8(images), (labels if labels is not None else torch.full((len(indices),), -1)).numpy()


def _chunks(s: config.SampleConfig) -> list[range]:
    return [range(start, min(start + s.chunk_size, s.num_samples)) for start in range(0, s.num_samples, s.chunk_size)]


def _write_chunk(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels.astype(np.int64))
    atomic.write_bytes(path, buffer.getvalue())


def _inpaint(trained: artifacts.TrainedDiffusion, autoencoder, cfg: config.Config, device) -> torch.Tensor:
    """Rows of (masked input, inpainted, original) for the first validation images, solved in
    latent space by posterior sampling (pipeline.sampling.inverse)."""
    s = cfg.sample
    val = artifacts.PreparedShards.from_stage_dir(cfg).files("val")
    batch = next(iter(sequential_batches([str(path) for path in val], s.inpaint_count)))
    images = batch["image"].to(device)
    with torch.no_grad():
        z = point_latent(autoencoder.encode(images), trained.latent.kind)
    known = trained.space.to_model(z)
    mask = torch.zeros_like(known)
    h, w = known.shape[-2:]
    region = {
        "left": (slice(None), slice(0, w // 2)),
        "right": (slice(None), slice(w // 2, None)),
        "top": (slice(0, h // 2), slice(None)),
        "bottom": (slice(h // 2, None), slice(None)),
        "center": (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)),
    }[s.inpaint_mask]
    mask[..., region[0], region[1]] = 1
    mask = 1 - mask  # 1 where the latent is known
    denoiser = trained.denoiser
    if trained.num_classes and "label" in batch:
        labels = batch["label"].to(device)
        denoiser = lambda x, sigma: trained.denoiser(x, sigma, y=labels)  # noqa: E731
    conditional = inpainting(denoiser, known, mask)
    generators = [generator(cfg.experiment.seed, "inpaint", i) for i in range(images.shape[0])]
    sigmas = sampling_sigmas(trained.process, s.grid, s.steps).to(device)
    noise = torch.stack([torch.randn(trained.shape, generator=g) for g in generators]).to(device) * sigmas[0]
    with torch.no_grad():  # the posterior denoiser enables gradients inside for its own VJPs
        latents = run_sampler(conditional, noise, sigmas, method=s.method, generator=generators)
        filled = autoencoder.decode(trained.space.to_decoder(latents, snap=s.snap)).clamp(-1, 1)
    pixel_mask = torch.nn.functional.interpolate(mask[:, :1], size=images.shape[-2:], mode="nearest")
    return torch.stack([images * pixel_mask, filled, images], 1).flatten(0, 1)


def run(cfg: config.Config) -> Path:
    s = cfg.sample
    runtime = Runtime()
    task, tasks = array_task()
    made_from = _made_from(cfg)
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]
    chunk_dir = cfg.stage_dir(NAME) / "chunks" / key
    if tasks > 1:  # one task of an array job: render this task's chunks, no manifest
        _render_chunks(cfg, chunk_dir, runtime, task * runtime.world_size + runtime.rank, tasks * runtime.world_size)
        return cfg.stage_dir(NAME)
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        if runtime.is_main:  # chunks of other configs or inputs are never reused
            for other in (record.directory / "chunks").glob("*"):
                if other.name != key:
                    shutil.rmtree(other)
        runtime.barrier()
        info = _render_chunks(cfg, chunk_dir, runtime, runtime.rank, runtime.world_size)
        runtime.barrier()
        if runtime.is_main:
            parts = [np.load(chunk_dir / f"chunk-{c:06d}.npz") for c in range(len(_chunks(s)))]
            images = np.concatenate([p["images"] for p in parts])
            labels = np.concatenate([p["labels"] for p in parts])
            buffer = io.BytesIO()
            np.savez(buffer, images=images, labels=labels)
            atomic.write_bytes(record.directory / artifacts.Samples.SAMPLES_FILE, buffer.getvalue())
            record.add_output(record.directory / artifacts.Samples.SAMPLES_FILE, count=len(images))
            _save_grid(record.directory / artifacts.Samples.GRID_FILE, images[: s.grid_rows**2], s.grid_rows)
            record.add_output(record.directory / artifacts.Samples.GRID_FILE)
            if s.write_shards:
                _write_shards(record.directory / "shards", images, labels)
                for shard in sorted((record.directory / "shards").glob("*.tar")):
                    record.add_output(shard)
            if s.inpaint:
                trained = artifacts.load_trained(cfg, runtime.device)
                grid = _inpaint(trained, artifacts.load_autoencoder(cfg, runtime.device), cfg, runtime.device)
                _save_grid(record.directory / artifacts.Samples.INPAINT_FILE, to_uint8(grid), 3)
                record.add_output(record.directory / artifacts.Samples.INPAINT_FILE)
            record.publish(
                artifacts.Samples(
                    directory=record.directory,
                    samples=artifacts.SamplerInfo(
                        count=len(images),
                        method=s.method,
                        steps=s.steps,
                        grid=s.grid,
                        guidance_scale=s.guidance_scale,
                        snap=s.snap,
                        nfe=info.get("nfe"),
                        labels=s.labels,
                    ),
                )
            )
            record.metrics.update(samples=len(images), nfe=info.get("nfe"))
        runtime.barrier()
    return record.directory


def _made_from(cfg: config.Config) -> dict:
    """Everything a chunk's images depend on (the chunk cache key): the upstream manifests, the
    sections of every stage that made the models (refused here when the config changed since),
    both weights' recorded sha256 (verified when the models load) and the render-relevant
    sample options."""
    autoencoder = artifacts.TrainedAutoencoder.from_stage_dir(cfg)
    denoiser = artifacts.TrainedDenoiser.from_stage_dir(cfg)
    artifacts.EncodedLatents.from_stage_dir(cfg)
    return {
        "inputs": manifest.check_inputs(cfg, INPUTS),
        "config": config.section_hash(cfg, SECTIONS, ignore=RENDER_IRRELEVANT),
        "upstream_config": {
            name: config.section_hash(cfg, stage_registry.get(name).sections)
            for name in ("autoencoder", "encode", "diffusion")
        },
        "weights": {
            "autoencoder": autoencoder.weights_sha256,
            "diffusion": denoiser.output(denoiser.WEIGHTS_FILE).sha256,
        },
    }


def _render_chunks(cfg: config.Config, chunk_dir: Path, runtime: Runtime, worker: int, workers: int) -> dict:
    """Render this worker's missing chunks (chunk c belongs to worker c mod workers)."""
    s = cfg.sample
    mine = [
        (c, r)
        for c, r in enumerate(_chunks(s))
        if c % workers == worker and not (chunk_dir / f"chunk-{c:06d}.npz").is_file()
    ]
    info: dict = {}
    if not mine:
        return info
    trained = artifacts.load_trained(cfg, runtime.device)
    autoencoder = artifacts.load_autoencoder(cfg, runtime.device)
    # only labels=data needs the train split's class counts (the prepare manifest)
    class_counts = artifacts.PreparedShards.from_stage_dir(cfg).class_counts("train") if s.labels == "data" else []
    for c, indices in tqdm(mine, desc="sample", unit="chunk", disable=None if runtime.is_main else True, leave=False):
        parts = [
            _render(trained, autoencoder, cfg, indices[i : i + s.batch_size], runtime.device, info, class_counts)
            for i in range(0, len(indices), s.batch_size)
        ]
        _write_chunk(
            chunk_dir / f"chunk-{c:06d}.npz",
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )
    return info


def _save_grid(path: Path, images: np.ndarray, nrow: int) -> None:
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    grid = torchvision.utils.make_grid(tensor, nrow=nrow, padding=2)
    with atomic.atomic_open(path) as handle:
        torchvision.utils.save_image(grid, handle, format="png")


def _write_shards(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    with ShardWriter(directory, "samples", max_count=1000, max_bytes=1 << 30) as writer:
        for i, (image, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="png")
            writer.write(
                make_sample(f"{i:08d}", buffer.getvalue(), "png", None if label < 0 else int(label), {"index": i})
            )
