"""Stage `evaluate`: how good the samples, the autoencoder and the density model are.

- FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and precision/recall (Kynkaanniemi et
  al. 2019, k-NN manifolds) of the samples against the real validation images, on InceptionV3
  pool features with the standard TF FID weights (``latentpipe weights fetch``). Inception
  input convention (pipeline.metrics.features): images rounded to 8-bit levels, gray repeated
  to RGB, TF1 bilinear resize to 299 x 299, then (v - 128) / 128. Alongside, the floor: FID of
  as many real train images as there are samples against the same val set (FID is biased
  upwards for small sets; a model cannot be expected to beat real images of the same count).
- For labelled data and class-conditional samples: accuracy of a small classifier trained on
  the real train images (pipeline.metrics.classifier, cached with its own real-val accuracy,
  reported alongside), overall and per class, against the class each sample was generated for.
- The autoencoder on the val images: rFID of its reconstructions (VQ: through the codebook;
  KL: the posterior mean) computed here, with PSNR/SSIM/LPIPS and codebook usage from its
  manifest.
- Bits per dimension of ``evaluate.likelihood_count`` val latents under the diffusion model
  (its unconditional, null-class branch) through the probability-flow ODE (Song et al. 2021,
  Appendix D.2), in the model's normalised latent space (for VQ: the normalised codebook vector
  of every position): a continuous density, so it can be negative and is not comparable to
  pixel-space bits/dim.

Caches: the val/train reference features under ``<cache>/fid-reference`` and the classifier
under ``<cache>/classifier``, where ``<cache>`` is the weights cache (``$LATENTPIPE_CACHE`` or
``~/.cache/latentpipe``). Their keys hash the shards' content (sha256s from the prepare
manifest) and the settings, not a path, so every experiment and runs directory on the same data
shares them, and deleting a run directory does not throw away a reference another run uses.
Results: the manifest's metrics (scalars) and ``metrics.json`` (everything, the recorded output);
then the report (pipeline.report: ``report.md``, a self-contained ``report.html`` and the plots
under ``plots/``), a view of recorded files that ``latentpipe report`` rebuilds. Each phase
logs its start, its progress with an ETA and its end, also when the output is a file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from pipeline import artifacts, atomic, config, manifest, report, stage_registry, weights
from pipeline.data.stream import sequential_batches
from pipeline.diffusion.likelihood import log_likelihood
from pipeline.latents import point_latent
from pipeline.metrics import classifier
from pipeline.metrics.features import InceptionFeatures
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.images import as_network_input, to_uint8
from pipeline.metrics.kid import kernel_inception_distance
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.reference import Reference, evenly_spread, reference_features
from pipeline.runtime.dist import Runtime
from pipeline.runtime.progress import Countdown
from pipeline.seeding import generator

SPEC = stage_registry.get("evaluate")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs

log = logging.getLogger(__name__)


def _shards(prepared: artifacts.PreparedShards, split: str) -> dict:
    """What identifies a split's images: its shards' hashes."""
    return {"split": split, "shards": prepared.shard_hashes(split)}


def _features(inception, images: np.ndarray | torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """Inception features of uint8 (N, H, W, C) or float (N, C, H, W) images, in batches."""
    progress, features = Countdown(f"evaluate: Inception features of the {what}", len(images), "images"), []
    for i in range(0, len(images), batch_size):
        features.append(inception(as_network_input(images[i : i + batch_size])).cpu())
        progress.update(i + len(features[-1]))
    progress.finish()
    return torch.cat(features)


def _real_reference(
    cfg: config.Config, inception, prepared: artifacts.PreparedShards, split: str, cache: Path, count: int | None = None
) -> Reference:
    """Cached features of ``count`` (None: all) real images of a split, spread evenly over it
    (``evenly_spread``)."""
    shards = [str(path) for path in prepared.files(split)]
    total = prepared.count(split)
    wanted = evenly_spread(total, total if count is None else count)
    count = len(wanted)
    source = {**_shards(prepared, split), "count": count, "selection": "evenly spread"}

    def batches():  # called only when the features are not cached
        seen, progress = 0, Countdown(f"evaluate: Inception features of {count} real {split} images", total, "read")
        for batch in sequential_batches(shards, cfg.evaluate.batch_size):
            keep = [j for j in range(len(batch["image"])) if seen + j in wanted]
            seen += len(batch["image"])
            progress.update(seen)
            if keep:
                yield batch["image"][keep]
        progress.finish("cached for later runs")

    return reference_features(cache, source, inception, batches)


def _sample_quality(
    cfg: config.Config, inception, images: np.ndarray, val: Reference, prepared: artifacts.PreparedShards, cache: Path
) -> dict:
    e = cfg.evaluate
    real, generated = torch.from_numpy(val.features), _features(inception, images, e.batch_size, "samples")
    kid, kid_std = kernel_inception_distance(
        generated,
        real,
        generator=generator(cfg.experiment.seed, "kid"),
        subsets=e.kid_subsets,
        subset_size=e.kid_subset_size,
    )
    precision, recall = precision_recall(real, generated, k=e.nearest_k)
    floor_count = min(len(images), prepared.count("train"))
    train = _real_reference(cfg, inception, prepared, "train", cache, floor_count)
    return {
        "fid": frechet_distance(FeatureStats.of(generated), val.stats),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "fid_train_vs_val": frechet_distance(train.stats, val.stats),
        "fid_train_images": floor_count,
        "fid_val_images": len(real),
    }


def _classifier_accuracy(
    cfg: config.Config, images: np.ndarray, labels: np.ndarray, prepared: artifacts.PreparedShards, cache: Path
) -> dict:
    source = {"train": _shards(prepared, "train"), "val": _shards(prepared, "val")}
    train, val = ([str(path) for path in prepared.files(split)] for split in ("train", "val"))
    progress = Countdown(
        "evaluate: classifier (trained on the real train images once, then cached)",
        cfg.evaluate.classifier_steps,
        "steps at most",
    )
    trained = classifier.load_or_train(
        cache, source, train, val, len(prepared.classes), classifier.Settings(steps=cfg.evaluate.classifier_steps)
    )
    scores = classifier.accuracy(trained.model, images, torch.from_numpy(labels))
    progress.finish(f"accuracy {scores['accuracy']:.3f} on the samples, {trained.val_accuracy:.3f} on real val")
    return {
        "classifier_accuracy": scores["accuracy"],
        "classifier_real_val_accuracy": trained.val_accuracy,
        "classifier_accuracy_per_class": {str(c): a for c, a in sorted(scores["per_class"].items())},
    }


@torch.no_grad()
def _reconstruction(cfg: config.Config, inception, val: Reference, prepared: artifacts.PreparedShards, device) -> dict:
    trained = artifacts.TrainedAutoencoder.from_stage_dir(cfg)
    autoencoder = trained.load_model(cfg.autoencoder, device)
    reconstructions, progress = (
        [],
        Countdown("evaluate: autoencoder reconstructions", prepared.count("val"), "val images"),
    )
    for batch in sequential_batches([str(path) for path in prepared.files("val")], cfg.evaluate.batch_size):
        encoded = autoencoder.encode(batch["image"].to(device))
        x_hat = autoencoder.decode(point_latent(encoded, trained.latent.kind))
        reconstructions.append(to_uint8(x_hat))  # as a PNG would store them, like the samples
        progress.update(sum(map(len, reconstructions)))
    progress.finish()
    features = _features(inception, np.concatenate(reconstructions), cfg.evaluate.batch_size, "reconstructions")
    from_manifest = {
        f"autoencoder_{k}": v
        for k, v in trained.metrics.items()
        if k.startswith("val_") and isinstance(v, (int, float))
    }
    return {"rfid": frechet_distance(FeatureStats.of(features), val.stats), **from_manifest}


def _bits_per_dim(cfg: config.Config, device) -> dict:
    """-log2 p(x) / d of val latents x in the normalised latent space, via the PF-ODE."""
    encoded = artifacts.EncodedLatents.from_stage_dir(cfg)
    trained = artifacts.TrainedDenoiser.from_stage_dir(cfg).load(cfg, encoded, device)
    wanted = cfg.evaluate.likelihood_count
    latents, taken = [], 0
    for batch in sequential_batches([str(path) for path in encoded.files("val")], wanted):
        latents.append(trained.latents_from_batch(batch))
        taken += len(latents[-1])
        if taken >= wanted:
            break
    x = torch.cat(latents)[:wanted].float().to(device)
    info: dict = {}
    # The N latents travel through one adaptive ODE solve together, so progress is its position
    # in log sigma (from sigma_min to sigma_max), read off the noise levels the solver asks for.
    span = math.log(trained.sigma_max / trained.sigma_min)
    progress = Countdown(
        f"evaluate: likelihood of {len(x)} val latents (PF-ODE from sigma_min to sigma_max)",
        1.0,
        "of the log-sigma range",
    )

    def denoiser(x_t, sigma, **cond):
        progress.update(math.log(float(sigma.reshape(-1)[0]) / trained.sigma_min) / span)
        return trained.denoiser(x_t, sigma, **cond)

    logp = log_likelihood(
        denoiser,
        x,
        trained.sigma_min,
        trained.sigma_max,
        generator=generator(cfg.experiment.seed, "likelihood"),
        rtol=cfg.evaluate.likelihood_rtol,
        atol=cfg.evaluate.likelihood_rtol,
        info=info,
    )
    progress.finish(f"{info.get('nfe', 0)} network evaluations")
    bits = -logp.double().cpu() / (x[0].numel() * math.log(2))
    return {
        "latent_bits_per_dim": float(bits.mean()),
        "latent_bits_per_dim_sem": float(bits.std() / math.sqrt(len(bits))),
        "likelihood_latents": len(bits),
        "likelihood_nfe": int(info.get("nfe", 0)),
    }


def run(cfg: config.Config) -> Path:
    e = cfg.evaluate
    runtime = Runtime()
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        if runtime.is_main:  # the metrics are cheap next to training: one rank computes them all
            prepared, sampled = artifacts.PreparedShards.from_stage_dir(cfg), artifacts.Samples.from_stage_dir(cfg)
            images, labels = sampled.arrays()
            cache, device = weights.cache_dir(), runtime.device
            metrics: dict = {"samples": len(images)}
            if e.fid or e.reconstruction:
                inception = InceptionFeatures().to(device)  # fails early, naming the fetch command, without weights
                val = _real_reference(cfg, inception, prepared, "val", cache / "fid-reference")
            if e.fid:
                metrics.update(_sample_quality(cfg, inception, images, val, prepared, cache / "fid-reference"))
            if e.classifier and prepared.classes and (labels >= 0).all():
                metrics.update(_classifier_accuracy(cfg, images, labels, prepared, cache / "classifier"))
            elif e.classifier:
                log.info("evaluate: no classifier accuracy (it needs labelled data and class-conditional samples)")
            if e.reconstruction:
                metrics.update(_reconstruction(cfg, inception, val, prepared, device))
            if e.likelihood_count:
                metrics.update(_bits_per_dim(cfg, device))
            metrics["sampler"] = {
                k: getattr(sampled.samples, k) for k in ("method", "steps", "guidance_scale", "snap", "nfe")
            }
            atomic.write_text(
                record.directory / artifacts.Evaluation.METRICS_FILE, json.dumps(metrics, indent=2) + "\n"
            )
            record.add_output(record.directory / artifacts.Evaluation.METRICS_FILE)
            # a view of recorded files, not an output: `latentpipe report` may rewrite it
            log.info("evaluate: report in %s", report.build(cfg.run_dir))
            record.metrics.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
            log.info("evaluate: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        runtime.barrier()
    return record.directory
