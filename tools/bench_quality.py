"""Sample quality against sampling cost for a trained run: FID, KID and classifier accuracy per
sampler and step count, and with snap-to-codebook on and off.

    python tools/bench_quality.py [--config X] [key=value ...] [--samples 500]
        [--settings ddpm:process:1000 ddim:process:10 ... dpmpp_2m:karras:20] [--snap-off dpmpp_2m:karras:20]

Every setting renders the same sample indices (same per-sample seeds and labels, i mod C) with
the run's guidance scale, decodes them with the run's autoencoder and compares them with the
real validation images (Inception features with the FID weights; the classifier of the evaluate
stage, trained on the real train digits). One table row per setting, in markdown.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline import artifacts, config
from pipeline.data.stream import sequential_batches
from pipeline.diffusion.build import sampling_sigmas
from pipeline.labels import labels_for
from pipeline.metrics import classifier
from pipeline.metrics.features import InceptionFeatures
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.kid import kernel_inception_distance
from pipeline.sampling.generate import generate
from pipeline.seeding import generator

DEFAULT_SETTINGS = (
    "ddpm:process:1000",
    "ddim:process:10",
    "ddim:process:20",
    "ddim:process:50",
    "ddim:process:100",
    "heun:karras:10",
    "heun:karras:20",
    "dpmpp_2m:karras:10",
    "dpmpp_2m:karras:20",
)


def render(
    trained,
    autoencoder,
    cfg,
    method: str,
    grid: str,
    steps: int,
    count: int,
    snap: bool,
    info: dict,
    data_absmax: float,
):
    """(decoded images, their labels, the fraction of samples off the data: a latent entry beyond
    twice the largest magnitude of the real validation latents)."""
    images, batch, off = [], 250, 0
    for start in range(0, count, batch):
        indices = range(start, min(start + batch, count))
        labels = labels_for(cfg.sample, indices, trained.num_classes, cfg.experiment.seed)
        generators = [generator(cfg.experiment.seed, "sample", i) for i in indices]
        latents = generate(
            trained.denoiser,
            trained.shape,
            sampling_sigmas(trained.process, grid, steps),
            generators,
            method=method,
            labels=labels,
            null_class=trained.num_classes,
            guidance_scale=cfg.sample.guidance_scale,
            info=info,
        )
        off += int((latents.flatten(1).abs().max(1).values > 2 * data_absmax).sum())
        with torch.no_grad():
            images.append(autoencoder.decode(trained.space.to_decoder(latents, snap=snap)).clamp(-1, 1))
    labels = labels_for(cfg.sample, range(count), trained.num_classes, cfg.experiment.seed)
    return torch.cat(images), labels, off / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="method:grid:steps")
    parser.add_argument("--snap-off", nargs="*", default=["dpmpp_2m:karras:20"], help="settings also run unsnapped")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "latentpipe-bench-quality")
    args = parser.parse_args()
    torch.manual_seed(0)

    cfg = config.load(args.config, args.overrides)
    encoded = artifacts.EncodedLatents.from_stage_dir(cfg)
    trained = artifacts.TrainedDenoiser.from_stage_dir(cfg).load(cfg, encoded, "cpu")
    autoencoder = artifacts.load_autoencoder(cfg, "cpu")
    inception = InceptionFeatures()
    prepared = artifacts.PreparedShards.from_stage_dir(cfg)
    train, val = ([str(path) for path in prepared.files(split)] for split in ("train", "val"))
    real = torch.cat([inception(b["image"]) for b in sequential_batches(val, 250)])
    real_stats = FeatureStats.of(real)
    source = {"shards": sorted(prepared.shard_hashes("train") + prepared.shard_hashes("val"))}
    digits = classifier.load_or_train(args.cache, source, train, val, trained.num_classes)
    latents = [str(path) for path in encoded.files("val")]
    data_absmax = max(float(trained.latents_from_batch(b).abs().max()) for b in sequential_batches(latents, 500))
    print(
        f"{args.samples} samples vs {len(real)} real val images; prediction {cfg.diffusion.prediction}; guidance "
        f"{cfg.sample.guidance_scale}; classifier accuracy on real val {digits.val_accuracy:.1%}\n"
    )
    print("| sampler | grid | steps | NFE/sample | snap | FID | KID x1e3 | accuracy | off-data | s/sample |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    runs = [(s, True) for s in args.settings] + [(s, False) for s in args.snap_off]
    for setting, snap in runs:
        method, grid, steps = setting.split(":")
        info: dict = {}
        start = time.perf_counter()
        images, labels, off = render(
            trained, autoencoder, cfg, method, grid, int(steps), args.samples, snap, info, data_absmax
        )
        seconds = (time.perf_counter() - start) / args.samples
        features = torch.cat([inception(images[i : i + 250]) for i in range(0, len(images), 250)])
        fid = frechet_distance(FeatureStats.of(features), real_stats)
        kid, _ = kernel_inception_distance(features, real, generator=torch.Generator().manual_seed(0), subsets=50)
        accuracy = classifier.accuracy(digits.model, images, labels)["accuracy"]
        nfe = info["nfe"]  # denoiser calls per batch = per sample (a guided call evaluates both branches)
        print(
            f"| {method} | {grid} | {steps} | {nfe:.0f} | {'on' if snap else 'off'} | {fid:.2f} | {kid * 1e3:.2f} | "
            f"{accuracy:.1%} | {off:.1%} | {seconds:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
