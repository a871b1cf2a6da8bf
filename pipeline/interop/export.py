"""Writing latentpipe models in formats other tools load, exactly or not at all.

- :func:`export_dit_pipeline`: a folder ``diffusers.DiTPipeline.from_pretrained`` loads: the DiT as
  ``transformer/``, the KL autoencoder as ``vae/`` (its ``scaling_factor`` set to the latent scale
  the DiT was trained with), a DDIM ``scheduler/`` whose betas, step count and prediction type are
  the training process's, and ``id2label`` in model_index.json;
- :func:`export_dit_transformer`: the DiT alone as a ``DiTTransformer2DModel`` folder;
- :func:`export_autoencoder_kl`: a KL autoencoder as an ``AutoencoderKL`` folder;
- :func:`export_reference_dit`: a facebookresearch/DiT state dict (.pt or .safetensors).

What maps: a DiT with ``time_embedding='diffusers'`` and MLP ratio 4 (diffusers computes its own
time sinusoid; the 'dit' convention goes to the reference format instead), a pretrained
``AutoencoderKL`` and latentpipe's own KL autoencoder when channel_mult[0] == 1
(pipeline.interop.own_autoencoder), the discrete DDPM process with linear or cosine betas and
eps / v / x0 prediction, and a latent normalisation by one scale factor (z * scale). What does
not, refused with the reason: VQ autoencoders (no diffusers pipeline decodes VQ latents of a
diffusion model), the continuous VP / sub-VP / VE processes and score prediction (DiTPipeline
feeds integer DDPM timesteps), per-channel latent normalisation (DiTPipeline only divides by
scaling_factor). An output folder is written whole or not at all.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from pipeline import atomic
from pipeline.autoencoder.nets import KLAutoencoder
from pipeline.errors import LatentpipeError
from pipeline.interop import dit_weights
from pipeline.interop.own_autoencoder import kl_to_diffusers
from pipeline.interop.pretrained import PretrainedKL, diffusers_module
from pipeline.latents import LatentSpace
from pipeline.networks.dit import DiT

BETA_SCHEDULES: dict[str, dict[str, Any]] = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
"""Our DDPM betas (pipeline.diffusion.schedules.DDPM.linear / .cosine) in diffusers' names."""
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler_config(*, process: str, beta_schedule: str, timesteps: int, prediction: str) -> dict[str, Any]:
    """The DDIMScheduler config of a DDPM process (the diffusion config's fields of those names).
    DDIM with eta = 0 on the "leading" timesteps and alphabar = 1 after the last step is
    latentpipe's ``ddim`` on ``ddpm_timesteps(T, n)`` (tests/sampling/test_diffusers_equivalence)."""
    if process != "ddpm":
        raise LatentpipeError(
            f"a {process!r} process has no diffusers scheduler that DiTPipeline drives with "
            f"integer timesteps; only process=ddpm exports"
        )
    if prediction not in PREDICTION_TYPES:
        raise LatentpipeError(
            f"prediction={prediction!r} has no diffusers prediction_type; exportable: {sorted(PREDICTION_TYPES)}"
        )
    if beta_schedule not in BETA_SCHEDULES:
        raise LatentpipeError(f"beta_schedule={beta_schedule!r} is not one of {sorted(BETA_SCHEDULES)}")
    return dict(
        num_train_timesteps=timesteps,
        **BETA_SCHEDULES[beta_schedule],
        prediction_type=PREDICTION_TYPES[prediction],
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        thresholding=False,
    )


def latent_scale(latents: LatentSpace) -> float:
    """The single factor of a latent space normalised as z * scale (DiTPipeline's convention)."""
    if latents.kind != "kl":
        raise LatentpipeError("DiTPipeline decodes KL latents only; a VQ latent space does not export")
    if latents.shift.abs().max() > 0 or latents.scale.min() != latents.scale.max():
        raise LatentpipeError(
            "the latents are normalised per channel; DiTPipeline only divides by one "
            "scaling_factor. Train with diffusion.normalize=scale or checkpoint to export a pipeline"
        )
    return float(latents.scale[0])


def _empty_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LatentpipeError(f"{out} exists and is not an empty folder; choose a new output path")


def _write_folder(out: Path, write) -> Path:
    """Run ``write(tmp)`` in a temporary sibling and move it to ``out`` when complete."""
    out = Path(out)
    _empty_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def diffusers_transformer(net: DiT):
    """The diffusers ``DiTTransformer2DModel`` computing what ``net`` computes."""
    config, state = dit_weights.to_diffusers(net)
    model = diffusers_module().DiTTransformer2DModel.from_config(config)
    model.load_state_dict(state)
    return model.eval()


def _diffusers_vae(autoencoder, scaling_factor: float | None):
    """The diffusers AutoencoderKL of a pretrained one or of latentpipe's own KL autoencoder."""
    AutoencoderKL = diffusers_module().AutoencoderKL
    if isinstance(autoencoder, KLAutoencoder):
        if scaling_factor is None:
            raise LatentpipeError(
                "latentpipe's own autoencoder has no latent scale of its own: pass the one the "
                "encode stage measured (its manifest's latent.scale)"
            )
        config, state = kl_to_diffusers(autoencoder, scaling_factor)
    elif isinstance(autoencoder, PretrainedKL):
        config = {**autoencoder.config, **({} if scaling_factor is None else {"scaling_factor": scaling_factor})}
        state = autoencoder.model.state_dict()
    else:
        raise LatentpipeError(
            f"a {type(autoencoder).__name__} does not export to diffusers: only KL autoencoders map exactly "
            f"(a pretrained AutoencoderKL, or latentpipe's own KL with channel_mult[0] == 1); no diffusers "
            f"pipeline decodes the VQ latents of a diffusion model"
        )
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(state)
    return vae.eval()


def export_dit_transformer(net: DiT, out: str | Path) -> Path:
    """``net`` as a DiTTransformer2DModel folder (config.json + safetensors)."""
    model = diffusers_transformer(net)
    return _write_folder(Path(out), lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def export_autoencoder_kl(autoencoder, out: str | Path, scaling_factor: float | None = None) -> Path:
    """A KL autoencoder as an AutoencoderKL folder. ``scaling_factor``: the latent scale to record
    (None: a pretrained one's own; latentpipe's own autoencoder needs the measured one)."""
    vae = _diffusers_vae(autoencoder, scaling_factor)
    return _write_folder(Path(out), lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))


def export_dit_pipeline(
    net: DiT,
    autoencoder,
    latents: LatentSpace,
    out: str | Path,
    *,
    process: str,
    beta_schedule: str,
    timesteps: int,
    prediction: str,
    id2label: Mapping[int, str] | None = None,
) -> Path:
    """A DiTPipeline folder: the DiT, the autoencoder's decoder with our latent scale, a DDIM scheduler
    of our process. Everything is checked before anything is written."""
    diffusers = diffusers_module()
    scheduler = diffusers.DDIMScheduler.from_config(
        scheduler_config(process=process, beta_schedule=beta_schedule, timesteps=timesteps, prediction=prediction)
    )
    vae = _diffusers_vae(autoencoder, latent_scale(latents))
    if vae.config.latent_channels != net.config.in_channels:
        raise LatentpipeError(
            f"the DiT takes {net.config.in_channels} latent channels, the autoencoder makes "
            f"{vae.config.latent_channels}"
        )
    if id2label is not None and set(map(int, id2label)) != set(range(net.config.num_classes)):
        raise LatentpipeError(f"id2label must name the classes 0..{net.config.num_classes - 1}")
    pipeline = diffusers.DiTPipeline(transformer=diffusers_transformer(net), vae=vae, scheduler=scheduler)

    def write(tmp: Path) -> None:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if id2label is not None:  # DiTPipeline.__init__ takes it from model_index.json
            index = json.loads((tmp / "model_index.json").read_text())
            index["id2label"] = {str(k): v for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

    return _write_folder(Path(out), write)


def export_reference_dit(net: DiT, path: str | Path) -> Path:
    """A facebookresearch/DiT state dict: ``.pt`` (torch.save of tensors only, what its sample.py
    loads) or ``.safetensors``."""
    path = Path(path)
    if path.suffix not in (".pt", ".safetensors"):
        raise LatentpipeError(f"{path}: a DiT-format checkpoint is written as .pt or .safetensors")
    state = {name: value.contiguous() for name, value in dit_weights.to_reference(net).items()}
    if path.exists():
        raise LatentpipeError(f"{path} exists; choose a new output path")
    if path.suffix == ".safetensors":
        data = safetensors_bytes(state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)
    return path
