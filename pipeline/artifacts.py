"""One typed object per stage output, loaded and verified in one place.

A stage publishes what it made as an artifact (``record.publish(artifact)`` puts
:meth:`Artifact.to_manifest` into its manifest, next to the files it recorded) and reads its
inputs only through :meth:`Artifact.from_stage_dir`, never through another stage's module.
Loading refuses, with the command that fixes it, an output that

- is missing or not ``complete`` (the stage never finished),
- was made with another config than the current one for that stage's sections,
- was made from another upstream output than the one now on disk (each recorded input
  manifest hash is compared with the current one).

Files are listed from the manifest's output entries (never by globbing the directory), and
a weights or samples file is checked against its recorded size and sha256 before it is read.
The on-disk JSON is the manifest format of :mod:`pipeline.manifest`: the keys are unchanged.
See docs/architecture.md for who reads what.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from pipeline import config, manifest, stage_registry
from pipeline.autoencoder.build import build_autoencoder
from pipeline.diffusion.build import build_network, build_process, sigma_range
from pipeline.diffusion.parameterization import Denoiser
from pipeline.latents import LatentSpace
from pipeline.manifest import StageInputError

A = TypeVar("A", bound="Artifact")


@dataclass(frozen=True)
class OutputFile:
    """One entry of a manifest's ``outputs``: a file relative to the stage directory."""

    path: str
    bytes: int
    sha256: str | None = None
    """Recorded for every file (manifests written before hashing every file lack it for large ones)."""
    split: str | None = None
    count: int | None = None

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> OutputFile:
        return cls(entry["path"], entry["bytes"], entry.get("sha256"), entry.get("split"), entry.get("count"))


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """What every stage output has: where it is, its recorded files and its metrics. Subclasses
    add their content fields, one per top-level manifest key they publish."""

    STAGE: ClassVar[str]
    directory: Path
    outputs: tuple[OutputFile, ...] = ()
    """Recorded by ``StageRecord.add_output`` as each file is written (not part of :meth:`to_manifest`)."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    """The manifest's ``metrics`` (written through ``StageRecord.metrics``)."""

    def to_manifest(self) -> dict[str, Any]:
        """The manifest keys this artifact publishes: its content fields as JSON values."""
        recorded = {f.name for f in dataclasses.fields(Artifact)}
        return {
            f.name: _json(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in recorded and not _absent(self, f)
        }

    @classmethod
    def _content(cls, found: Mapping[str, Any]) -> dict[str, Any]:
        """The subclass's content fields from the manifest dict."""
        raise NotImplementedError

    @classmethod
    def from_manifest(cls: type[A], directory: Path, found: Mapping[str, Any]) -> A:
        """The artifact described by an already verified manifest dict."""
        return cls(
            directory=Path(directory),
            outputs=tuple(OutputFile.from_manifest(o) for o in found["outputs"]),
            metrics=found.get("metrics", {}),
            **cls._content(found),
        )

    @classmethod
    def from_stage_dir(cls: type[A], cfg: config.Config) -> A:
        """The stage's output for ``cfg``, refused unless complete, made with ``cfg``'s sections of
        that stage, and made from the upstream outputs now on disk."""
        spec = stage_registry.get(cls.STAGE)
        directory = cfg.stage_dir(spec.name)
        found, _ = manifest.read_complete(cfg, spec.name)
        wanted = config.section_hash(cfg, spec.sections)
        if found.get("config_hash") != wanted:
            raise StageInputError(
                f"stage '{spec.name}' in {directory} was made with another config "
                f"({str(found.get('config_hash'))[:12]}, current {wanted[:12]}): rerun `latentpipe {spec.name}`"
            )
        manifest.check_upstreams(cfg, spec.name, found)
        return cls.from_manifest(directory, found)

    def files(self, split: str) -> list[Path]:
        """The recorded files of a split, in manifest order, each checked against its recorded
        size and sha256 (:meth:`verified`)."""
        return [self.verified(o.path) for o in self.outputs if o.split == split]

    def output(self, name: str) -> OutputFile:
        """The manifest entry of output ``name`` (a path relative to the stage directory)."""
        entry = next((o for o in self.outputs if o.path == name), None)
        if entry is None:
            raise StageInputError(
                f"stage '{self.STAGE}' recorded no output {name!r} in {self.directory}: rerun `latentpipe {self.STAGE}`"
            )
        return entry

    def verified(self, name: str) -> Path:
        """The path of recorded output ``name`` after checking its size and sha256 against the
        manifest (a file missing or changed after the stage finished is refused, naming the
        stage to rerun). Hashed once per process (``manifest.verify_file``)."""
        entry = self.output(name)
        return manifest.verify_file(self.directory / name, entry.bytes, entry.sha256, self.STAGE)


def _absent(instance: Any, f: dataclasses.Field) -> bool:
    """An optional field (default None) that is None: not written, so that the manifests of runs
    without it keep exactly the keys they always had (reading fills the default back in)."""
    return f.default is None and getattr(instance, f.name) is None


def _json(value: Any) -> Any:
    """Dataclasses -> dicts (less absent optional fields), tuples -> lists, recursively: what
    json.dumps writes and reads back."""
    if dataclasses.is_dataclass(value):
        return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value) if not _absent(value, f)}
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class SplitSummary:
    count: int
    shards: tuple[str, ...]
    class_counts: Mapping[str, int]


@dataclass(frozen=True)
class ImageSpec:
    resolution: int
    channels: int
    format: str


@dataclass(frozen=True, kw_only=True)
class PreparedShards(Artifact):
    """``prepare``: WebDataset shards ``{train,val}-%06d.tar`` (listed per split in ``outputs``)."""

    STAGE = "prepare"
    splits: Mapping[str, SplitSummary]
    classes: tuple[str, ...]
    skipped: tuple[Mapping[str, Any], ...]
    """Unreadable source images: position, key, source, error."""
    image: ImageSpec

    @classmethod
    def _content(cls, found: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "splits": {
                name: SplitSummary(s["count"], tuple(s["shards"]), s["class_counts"])
                for name, s in found["splits"].items()
            },
            "classes": tuple(found["classes"]),
            "skipped": tuple(found["skipped"]),
            "image": ImageSpec(**found["image"]),
        }

    def count(self, split: str) -> int:
        return self.splits[split].count

    def class_counts(self, split: str) -> list[int]:
        """Images of each class (in label order) in ``split``."""
        return [self.splits[split].class_counts.get(name, 0) for name in self.classes]

    def shard_hashes(self, split: str) -> list[str]:
        """What identifies a split's images: its shards' sha256s, sorted (path and size for a shard
        that a manifest from before every file was hashed recorded without one)."""
        return sorted(o.sha256 or f"{o.path}:{o.bytes}" for o in self.outputs if o.split == split)


# ------------------------------------------------------------------------------------ autoencoder


@dataclass(frozen=True)
class LatentShape:
    channels: int
    resolution: int
    kind: str
    """``vq`` or ``kl``."""


@dataclass(frozen=True)
class ImageShape:
    channels: int
    resolution: int


@dataclass(frozen=True, kw_only=True)
class TrainedAutoencoder(Artifact):
    """``autoencoder``: the trained weights ``autoencoder.safetensors`` and the shapes they map between;
    for ``kind=pretrained`` no weights file but ``pretrained``, the published autoencoder's
    description (source path, class, geometry, own scaling factor, sha256 of its weights)."""

    STAGE = "autoencoder"
    WEIGHTS_FILE: ClassVar[str] = "autoencoder.safetensors"
    latent: LatentShape
    image: ImageShape
    pretrained: Mapping[str, Any] | None = None
    """``PretrainedAutoencoder.describe()`` of a published autoencoder (None: trained here)."""

    @classmethod
    def _content(cls, found: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "latent": LatentShape(**found["latent"]),
            "image": ImageShape(**found["image"]),
            "pretrained": found.get("pretrained"),
        }

    @property
    def weights(self) -> OutputFile:
        return self.output(self.WEIGHTS_FILE)

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weights the latents come from (None: a manifest from before every file was hashed)."""
        if self.pretrained is not None:
            return next(iter(self.pretrained["weights_sha256"].values()))
        return self.weights.sha256

    @property
    def scaling_factor(self) -> float | None:
        """A published autoencoder's own latent scale (None: trained here, or none recorded)."""
        return None if self.pretrained is None else self.pretrained["scaling_factor"]

    @property
    def shift_factor(self) -> float | None:
        return None if self.pretrained is None else self.pretrained.get("shift_factor")

    def load_model(self, cfg: config.AutoencoderConfig, device: torch.device | str) -> nn.Module:
        """The autoencoder in eval mode (``cfg``: the config it was trained with, which
        :meth:`from_stage_dir` checked). A published one is read from its recorded path and
        refused if its weights are no longer the ones recorded."""
        if self.pretrained is not None:
            from pipeline.interop import load_pretrained_autoencoder  # diffusers only when asked for

            adapter = load_pretrained_autoencoder(
                self.pretrained["source"], scaling_factor=cfg.pretrained_scaling_factor
            )
            if adapter.weights != self.pretrained["weights_sha256"]:
                raise StageInputError(
                    f"the weights at {self.pretrained['source']} are not the ones stage 'autoencoder' recorded "
                    f"(sha256 {adapter.weights}, recorded {self.pretrained['weights_sha256']}): "
                    f"rerun `latentpipe autoencoder`"
                )
            return adapter.to(device).eval()
        model = build_autoencoder(cfg, self.image.channels)
        model.load_state_dict(load_file(self.verified(self.WEIGHTS_FILE)))
        return model.to(device).eval()


def load_autoencoder(cfg: config.Config, device: torch.device | str) -> nn.Module:
    """The verified autoencoder of ``cfg``'s run (trained here or published), in eval mode."""
    return TrainedAutoencoder.from_stage_dir(cfg).load_model(cfg.autoencoder, device)


# ----------------------------------------------------------------------------------------- encode


@dataclass(frozen=True)
class LatentStats:
    """The encode manifest's ``latent`` entry: the autoencoder's latent shape, the stored fields
    and the train-split statistics that normalise the latents (pipeline.latents)."""

    channels: int
    resolution: int
    kind: str
    fields: tuple[str, ...]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    scale: float
    autoencoder_sha256: str | None
    """sha256 of the autoencoder weights the latents were made with (None: a manifest from before
    every file was hashed)."""
    checkpoint_scale: float | None = None
    """A published autoencoder's own scaling_factor (``diffusion.normalize=checkpoint``); None: none."""
    checkpoint_shift: float | None = None
    """Its shift_factor, subtracted before scaling (None: none)."""

    @property
    def has_mirrors(self) -> bool:
        return any(name.endswith("_flip") for name in self.fields)


@dataclass(frozen=True, kw_only=True)
class EncodedLatents(Artifact):
    """``encode``: latent shards ``latents/{split}-%06d.tar``, their statistics and (VQ) the codebook."""

    STAGE = "encode"
    LATENT_DIR: ClassVar[str] = "latents"
    CODEBOOK_FILE: ClassVar[str] = "codebook.safetensors"
    latent: LatentStats

    @classmethod
    def _content(cls, found: Mapping[str, Any]) -> dict[str, Any]:
        latent = dict(found["latent"])
        for name in ("fields", "channel_mean", "channel_std"):
            latent[name] = tuple(latent[name])
        return {"latent": LatentStats(**latent)}

    def codebook(self) -> Tensor | None:
        """The (K, C) codebook table of a VQ latent (None for KL)."""
        if self.latent.kind != "vq":
            return None
        return load_file(self.verified(self.CODEBOOK_FILE))["embeddings"]

    def latent_space(self, normalize: Literal["channel", "scale", "checkpoint"]) -> LatentSpace:
        """The normalised space the denoiser works in: the measured statistics (``channel``,
        ``scale``), or the published autoencoder's own z -> (z - shift) * scaling_factor (``checkpoint``)."""
        if normalize != "checkpoint":
            return LatentSpace.from_manifest(_json(self.latent), normalize, self.codebook())
        latent = self.latent
        if latent.checkpoint_scale is None:
            raise StageInputError(
                "diffusion.normalize=checkpoint needs the autoencoder's own scaling_factor, and these latents have "
                "none: use autoencoder.kind=pretrained (an LDM checkpoint file without one takes "
                "autoencoder.pretrained_scaling_factor), or diffusion.normalize=scale (the measured scale)"
            )
        shift = torch.full((latent.channels,), float(latent.checkpoint_shift or 0.0))
        codebook = self.codebook()
        kind: Literal["vq", "kl"] = "vq" if latent.kind == "vq" else "kl"
        return LatentSpace(
            kind,
            "scale",
            shift,
            torch.full((latent.channels,), float(latent.checkpoint_scale)),
            None if codebook is None else codebook.float(),
        )


# -------------------------------------------------------------------------------------- diffusion


@dataclass(frozen=True)
class DenoiserInfo:
    backbone: str
    network: Mapping[str, Any]
    """The network config as JSON (``dataclasses.asdict`` of it)."""
    num_classes: int
    latent_shape: tuple[int, int, int]
    process: str
    prediction: str
    sigma_range: tuple[float, float]
    training_flops_per_sample: int
    init_from: Mapping[str, Any] | None = None
    """``diffusion.init_from``: the checkpoint's path and its weight files' sha256 (None: random init)."""


@dataclass(frozen=True)
class TrainedDiffusion:
    """What the later stages need of a trained diffusion model."""

    denoiser: Denoiser
    """D(x, sigma, y=None) -> x0_hat in the VE frame, with the EMA weights (eval mode)."""
    space: LatentSpace
    latent: LatentStats
    sigma_min: float
    sigma_max: float
    num_classes: int
    process: object

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.latent.channels, self.latent.resolution, self.latent.resolution

    def latents_from_batch(self, batch: dict) -> Tensor:
        """Latent-shard batch -> normalised model-space latents (KL: posterior means)."""
        return self.space.from_batch(batch, sample_posterior=False)


@dataclass(frozen=True, kw_only=True)
class TrainedDenoiser(Artifact):
    """``diffusion``: the EMA weights ``denoiser.safetensors`` and what they were trained on."""

    STAGE = "diffusion"
    WEIGHTS_FILE: ClassVar[str] = "denoiser.safetensors"
    denoiser: DenoiserInfo

    @classmethod
    def _content(cls, found: Mapping[str, Any]) -> dict[str, Any]:
        info = dict(found["denoiser"])
        info["latent_shape"], info["sigma_range"] = tuple(info["latent_shape"]), tuple(info["sigma_range"])
        return {"denoiser": DenoiserInfo(**info)}

    def load(self, cfg: config.Config, encoded: EncodedLatents, device: torch.device | str) -> TrainedDiffusion:
        """The EMA denoiser over ``encoded``'s latent space (``cfg``: the run's config, checked
        by :meth:`from_stage_dir`)."""
        latent, info = encoded.latent, self.denoiser
        if (latent.channels, latent.resolution) != info.latent_shape[:2]:
            raise StageInputError(
                f"the encode stage's latents ({latent.channels}x{latent.resolution}) are not the ones the denoiser "
                f"was trained on: rerun `latentpipe diffusion`"
            )
        net = build_network(cfg.diffusion, latent.channels, latent.resolution, info.num_classes)
        net.load_state_dict(load_file(self.verified(self.WEIGHTS_FILE)))
        process = build_process(cfg.diffusion)
        return TrainedDiffusion(
            Denoiser(net.to(device).eval(), process, cfg.diffusion.prediction),
            encoded.latent_space(cfg.diffusion.normalize),
            latent,
            *sigma_range(process),
            info.num_classes,
            process,
        )


def load_trained(cfg: config.Config, device: torch.device | str) -> TrainedDiffusion:
    """The verified trained diffusion model of ``cfg``'s run, over its verified latent space."""
    return TrainedDenoiser.from_stage_dir(cfg).load(cfg, EncodedLatents.from_stage_dir(cfg), device)


# ------------------------------------------------------------------------------ sample, evaluate


@dataclass(frozen=True)
class SamplerInfo:
    count: int
    method: str
    steps: int
    grid: str
    guidance_scale: float
    snap: bool
    nfe: float | None
    labels: str


@dataclass(frozen=True, kw_only=True)
class Samples(Artifact):
    """``sample``: ``samples.npz`` (uint8 images (N, H, W, C), labels), ``grid.png`` and how they were drawn."""

    STAGE = "sample"
    SAMPLES_FILE: ClassVar[str] = "samples.npz"
    GRID_FILE: ClassVar[str] = "grid.png"
    INPAINT_FILE: ClassVar[str] = "inpainting.png"
    samples: SamplerInfo

    @classmethod
    def _content(cls, found: Mapping[str, Any]) -> dict[str, Any]:
        return {"samples": SamplerInfo(**found["samples"])}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (N, H, W, C), labels (N,), -1 where unconditional)."""
        with np.load(self.verified(self.SAMPLES_FILE)) as data:
            return data["images"], data["labels"]


@dataclass(frozen=True, kw_only=True)
class Evaluation(Artifact):
    """``evaluate``: ``metrics.json`` (everything), ``report.md``; the scalars are its ``metrics``."""

    STAGE = "evaluate"
    METRICS_FILE: ClassVar[str] = "metrics.json"
    REPORT_FILE: ClassVar[str] = "report.md"

    @classmethod
    def _content(cls, found: Mapping[str, Any]) -> dict[str, Any]:
        return {}


ARTIFACTS: dict[str, type[Artifact]] = {
    cls.STAGE: cls for cls in (PreparedShards, TrainedAutoencoder, EncodedLatents, TrainedDenoiser, Samples, Evaluation)
}
"""The artifact class of each stage (every stage of pipeline.stage_registry has one)."""
