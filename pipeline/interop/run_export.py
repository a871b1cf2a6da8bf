"""``latentpipe export``: a finished run's models, read and verified through pipeline.artifacts,
written in formats other tools load (pipeline.interop.export says what maps and what is refused).

- ``--format diffusers`` (``--part pipeline``, the default): a DiTPipeline folder of the trained DiT,
  the run's KL autoencoder and a DDIM scheduler of the training process; ``--part transformer``:
  the DiT alone as a DiTTransformer2DModel folder; ``--part autoencoder``: the KL autoencoder as an
  AutoencoderKL folder (latentpipe's own with the encode stage's measured scale);
- ``--format dit``: a facebookresearch/DiT state dict file (``.pt`` or ``.safetensors``).

Every refusal comes before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import artifacts, config
from pipeline.errors import LatentpipeError
from pipeline.interop.export import (
    export_autoencoder_kl,
    export_dit_pipeline,
    export_dit_transformer,
    export_reference_dit,
)
from pipeline.networks.dit import DiT

FORMATS = ("diffusers", "dit")
PARTS = ("pipeline", "transformer", "autoencoder")


def _dit(trained: artifacts.TrainedDiffusion) -> DiT:
    net = trained.denoiser.net
    if not isinstance(net, DiT):
        raise LatentpipeError(
            f"the run's denoiser is a {type(net).__name__}; only a DiT (diffusion.backbone=dit) "
            f"exports to diffusers or the DiT format"
        )
    return net


def export_run(cfg: config.Config, format: str, out: str | Path, part: str = "pipeline") -> Path:
    """Write ``part`` of ``cfg``'s finished run to ``out`` in ``format``; returns the path written."""
    if format not in FORMATS or part not in PARTS:
        raise LatentpipeError(f"export --format takes {FORMATS} and --part {PARTS}, got {format!r}, {part!r}")
    if format == "dit":
        if part != "pipeline":
            raise LatentpipeError("--format dit writes the DiT only; leave out --part")
        return export_reference_dit(_dit(artifacts.load_trained(cfg, "cpu")), out)
    if part == "autoencoder":
        trained = artifacts.TrainedAutoencoder.from_stage_dir(cfg)
        own_scale = None if trained.pretrained else artifacts.EncodedLatents.from_stage_dir(cfg).latent.scale
        return export_autoencoder_kl(trained.load_model(cfg.autoencoder, "cpu"), out, own_scale)
    diffusion = artifacts.load_trained(cfg, "cpu")
    if part == "transformer":
        return export_dit_transformer(_dit(diffusion), out)
    classes = artifacts.PreparedShards.from_stage_dir(cfg).classes if diffusion.num_classes else ()
    d = cfg.diffusion
    return export_dit_pipeline(
        _dit(diffusion),
        artifacts.load_autoencoder(cfg, "cpu"),
        diffusion.space,
        out,
        process=d.process,
        beta_schedule=d.beta_schedule,
        timesteps=d.timesteps,
        prediction=d.prediction,
        id2label=dict(enumerate(classes)) or None,
    )
