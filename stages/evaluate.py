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
Results: the manifest's metrics (scalars), ``metrics.json`` (everything) and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import artifacts, atomic, config, manifest, stage_registry, weights
from pipeline.data.stream import sequential_batches
from pipeline.diffusion.likelihood import log_likelihood
from pipeline.metrics import classifier
from pipeline.metrics.features import PREPROCESS, InceptionFeatures
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.metrics.images import as_network_input, to_uint8
from pipeline.metrics.kid import kernel_inception_distance
from pipeline.metrics.precision_recall import precision_recall
from pipeline.metrics.reference import Reference, reference_features
from pipeline.runtime.dist import Runtime
from pipeline.seeding import generator

SPEC = stage_registry.get("evaluate")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs
REPORTED_SECTIONS = {"prepare": "data", "autoencoder": "autoencoder", "encode": "encode", "diffusion": "diffusion",
                     "sample": "sample"}
"""The config section of each upstream stage that the report shows, read from that stage's own
saved config.yaml (what actually produced the artifact, whatever the current config says)."""

log = logging.getLogger(__name__)


def _shards(prepared: artifacts.PreparedShards, split: str) -> dict:
    """What identifies a split's images: its shards' hashes."""
    return {"split": split, "shards": prepared.shard_hashes(split)}


def _features(inception, images: np.ndarray | torch.Tensor, batch_size: int) -> torch.Tensor:
    """Inception features of uint8 (N, H, W, C) or float (N, C, H, W) images, in batches."""
    return torch.cat([inception(as_network_input(images[i:i + batch_size])).cpu()
                      for i in range(0, len(images), batch_size)])


def _real_reference(cfg: config.Config, inception, prepared: artifacts.PreparedShards, split: str, cache: Path,
                    count: int | None = None) -> Reference:
    """Cached features of ``count`` (None: all) real images of a split, spread evenly over it
    (image floor(i * total / count)): shards written in source order can hold one class each,
    so the first ``count`` would not be a fair sample."""
    shards = [str(path) for path in prepared.files(split)]
    total = prepared.count(split)
    count = total if count is None else min(count, total)
    wanted = {i * total // count for i in range(count)}
    source = {**_shards(prepared, split), "count": count, "selection": "evenly spread"}

    def batches():
        seen = 0
        for batch in sequential_batches(shards, cfg.evaluate.batch_size):
            keep = [j for j in range(len(batch["image"])) if seen + j in wanted]
            seen += len(batch["image"])
            if keep:
                yield batch["image"][keep]

    return reference_features(cache, source, inception, batches)


def _sample_quality(cfg: config.Config, inception, images: np.ndarray, val: Reference, prepared: artifacts.PreparedShards,
                    cache: Path) -> dict:
    e = cfg.evaluate
    real, generated = torch.from_numpy(val.features), _features(inception, images, e.batch_size)
    kid, kid_std = kernel_inception_distance(generated, real, generator=generator(cfg.experiment.seed, "kid"),
                                             subsets=e.kid_subsets, subset_size=e.kid_subset_size)
    precision, recall = precision_recall(real, generated, k=e.nearest_k)
    floor_count = min(len(images), prepared.count("train"))
    train = _real_reference(cfg, inception, prepared, "train", cache, floor_count)
    return {"fid": frechet_distance(FeatureStats.of(generated), val.stats), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall, "fid_train_vs_val": frechet_distance(train.stats, val.stats),
            "fid_train_images": floor_count, "fid_val_images": len(real)}


def _classifier_accuracy(cfg: config.Config, images: np.ndarray, labels: np.ndarray,
                         prepared: artifacts.PreparedShards, cache: Path) -> dict:
    source = {"train": _shards(prepared, "train"), "val": _shards(prepared, "val")}
    train, val = ([str(path) for path in prepared.files(split)] for split in ("train", "val"))
    trained = classifier.load_or_train(cache, source, train, val, len(prepared.classes),
                                       classifier.Settings(steps=cfg.evaluate.classifier_steps))
    scores = classifier.accuracy(trained.model, images, torch.from_numpy(labels))
    return {"classifier_accuracy": scores["accuracy"], "classifier_real_val_accuracy": trained.val_accuracy,
            "classifier_accuracy_per_class": {str(c): a for c, a in sorted(scores["per_class"].items())}}


@torch.no_grad()
def _reconstruction(cfg: config.Config, inception, val: Reference, prepared: artifacts.PreparedShards,
                    device) -> dict:
    trained = artifacts.TrainedAutoencoder.from_stage_dir(cfg)
    autoencoder = trained.load_model(cfg.autoencoder, device)
    reconstructions = []
    for batch in sequential_batches([str(path) for path in prepared.files("val")], cfg.evaluate.batch_size):
        encoded = autoencoder.encode(batch["image"].to(device))
        x_hat = autoencoder.decode(encoded.z_q if trained.latent.kind == "vq" else encoded.mean)
        reconstructions.append(to_uint8(x_hat))  # as a PNG would store them, like the samples
    features = _features(inception, np.concatenate(reconstructions), cfg.evaluate.batch_size)
    from_manifest = {f"autoencoder_{k}": v for k, v in trained.metrics.items()
                     if k.startswith("val_") and isinstance(v, (int, float))}
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
    logp = log_likelihood(trained.denoiser, x, trained.sigma_min, trained.sigma_max,
                          generator=generator(cfg.experiment.seed, "likelihood", device=device),
                          rtol=cfg.evaluate.likelihood_rtol, atol=cfg.evaluate.likelihood_rtol, info=info)
    bits = -logp.double().cpu() / (x[0].numel() * math.log(2))
    return {"latent_bits_per_dim": float(bits.mean()), "latent_bits_per_dim_sem": float(bits.std() / math.sqrt(len(bits))),
            "likelihood_latents": len(bits), "likelihood_nfe": int(info.get("nfe", 0))}


def _report(cfg: config.Config, metrics: dict) -> str:
    def value(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [f"| {k} | {value(v)} |" for k, v in metrics.items() if not isinstance(v, dict)]
    per_class = metrics.get("classifier_accuracy_per_class", {})
    sections = {section: yaml.safe_load((cfg.stage_dir(stage) / "config.yaml").read_text())[section]
                for stage, section in REPORTED_SECTIONS.items()}
    sections["evaluate"] = config.to_dict(cfg.evaluate)
    lines = [f"# {cfg.experiment.name}: evaluation", "", "![samples](../sample/grid.png)", "",
             "| metric | value |", "|---|---|", *rows, ""]
    if per_class:
        lines += ["Classifier accuracy per class (of the samples generated for that class):", "",
                  "| class | " + " | ".join(per_class) + " |", "|---" * (len(per_class) + 1) + "|",
                  "| accuracy | " + " | ".join(f"{a:.3f}" for a in per_class.values()) + " |", ""]
    lines += [f"Sampler: {json.dumps(metrics['sampler'])}.", "",
              f"FID/KID/precision-recall: samples against the real validation images; Inception input: {PREPROCESS}. "
              "fid_train_vs_val is the floor: as many real train images as samples, against the same val images. "
              "latent_bits_per_dim: in the diffusion model's normalised latent space (a continuous density; "
              "not comparable to pixel-space bits/dim).", "",
              "## Configuration (each section as saved by the stage that used it)", "",
              "```yaml", yaml.safe_dump(sections, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


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
            metrics["sampler"] = {k: getattr(sampled.samples, k) for k in ("method", "steps", "guidance_scale", "snap", "nfe")}
            atomic.write_text(record.directory / artifacts.Evaluation.METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
            atomic.write_text(record.directory / artifacts.Evaluation.REPORT_FILE, _report(cfg, metrics))
            record.add_output(record.directory / artifacts.Evaluation.METRICS_FILE)
            record.add_output(record.directory / artifacts.Evaluation.REPORT_FILE)
            record.metrics.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})
            log.info("evaluate: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        runtime.barrier()
    return record.directory
