"""CompVis latent-diffusion / taming-transformers first-stage checkpoints <-> diffusers' layout.

An LDM checkpoint names the autoencoder's parameters ``encoder.down.{i}.block.{j}.conv1.weight``,
``encoder.mid.attn_1.q.weight`` (1x1 convs), ``decoder.up.{i}.upsample.conv.weight`` (levels
counted from the lowest resolution), ``quant_conv``, ``post_quant_conv`` and, for VQ,
``quantize.embedding.weight``; inside a full latent-diffusion checkpoint they carry the prefix
``first_stage_model.``. diffusers' ``AutoencoderKL`` / ``VQModel`` hold the same tensors under
other names (the table diffusers' own ``convert_ldm_vae_checkpoint`` applies; tests/interop checks
ours against it). The architecture is read off the tensor shapes: LDM's ``ch``, ``ch_mult``,
``num_res_blocks``, ``z_channels``, ``embed_dim``, ``n_embed``; its GroupNorms have 32 groups.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from pipeline.errors import LatentpipeError

PREFIX = "first_stage_model."
PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
"""The first stage's parameters; anything else in a checkpoint (loss.*, model_ema.*) is not read."""
LDM_GROUPS = 32
"""LDM's ``Normalize`` is GroupNorm(32, C, eps=1e-6) everywhere."""

# diffusers name -> LDM name, for the names that do not depend on the number of levels.
_RENAMES = [
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def ldm_name(name: str, levels: int) -> str:
    """The LDM name of the diffusers autoencoder parameter ``name`` (``levels`` resolution levels)."""
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    name = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
    # diffusers counts decoder levels from the lowest resolution up, LDM from the highest down.
    name = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name
    )
    return re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name
    )


def _is_attention_matrix(ldm: str) -> bool:
    return bool(re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", ldm))


def first_stage(checkpoint: dict[str, Tensor]) -> tuple[dict[str, Tensor], str, float | None]:
    """(the first-stage tensors without prefix, the prefix they had, the checkpoint's own
    ``scale_factor`` when it stores one: LatentDiffusion keeps it as a buffer with scale_by_std)."""
    prefix = PREFIX if any(key.startswith(PREFIX) for key in checkpoint) else ""
    tensors = {
        key[len(prefix) :]: value
        for key, value in checkpoint.items()
        if key.startswith(prefix) and key[len(prefix) :].startswith(PARTS)
    }
    if not tensors:
        raise LatentpipeError(
            f"the checkpoint holds no autoencoder weights: expected keys starting with {PREFIX!r} (a CompVis "
            f"latent-diffusion checkpoint) or with {', '.join(PARTS)} (a first-stage checkpoint)"
        )
    scale = checkpoint.get("scale_factor")
    return tensors, prefix, None if scale is None else float(scale)


def _shape(tensors: dict[str, Tensor], key: str, prefix: str) -> tuple[int, ...]:
    if key not in tensors:
        raise LatentpipeError(f"the autoencoder checkpoint lacks {prefix}{key}")
    return tuple(tensors[key].shape)


def diffusers_config(tensors: dict[str, Tensor], prefix: str = "") -> tuple[str, dict[str, Any]]:
    """("kl" or "vq", the diffusers AutoencoderKL / VQModel config) read off the tensor shapes."""
    for key in tensors:
        if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", key):
            raise LatentpipeError(
                f"{prefix}{key}: attention inside the resolution levels (LDM attn_resolutions) has no "
                f"equivalent in diffusers' DownEncoderBlock2D/UpDecoderBlock2D autoencoders"
            )
        if key == "quantize.used":
            raise LatentpipeError(f"{prefix}{key}: a VQ codebook with index remapping is not supported")
    levels = 1 + max((int(m[1]) for key in tensors if (m := re.match(r"encoder\.down\.(\d+)\.", key))), default=-1)
    if levels == 0:
        raise LatentpipeError(f"the autoencoder checkpoint lacks {prefix}encoder.down.0.block.0.conv1.weight")
    widths = [_shape(tensors, f"encoder.down.{i}.block.0.conv1.weight", prefix)[0] for i in range(levels)]
    if any(width % LDM_GROUPS for width in widths):
        raise LatentpipeError(
            f"widths {widths} of {prefix}encoder.down.*: an LDM autoencoder normalises with "
            f"{LDM_GROUPS} groups, which must divide every width"
        )
    layers = len({m[1] for key in tensors if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))})
    latent = _shape(tensors, "decoder.conv_in.weight", prefix)[1]
    config: dict[str, Any] = dict(
        in_channels=_shape(tensors, "encoder.conv_in.weight", prefix)[1],
        out_channels=_shape(tensors, "decoder.conv_out.weight", prefix)[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=LDM_GROUPS,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in tensors,
    )
    if "quantize.embedding.weight" in tensors:
        codes, dim = _shape(tensors, "quantize.embedding.weight", prefix)
        return "vq", {**config, "num_vq_embeddings": codes, "vq_embed_dim": dim}
    quant = _shape(tensors, "quant_conv.weight", prefix)
    if quant[0] != 2 * latent:
        raise LatentpipeError(
            f"{prefix}quant_conv.weight has shape {quant}: an LDM embed_dim ({quant[0] // 2}) different from "
            f"z_channels ({latent}) has no equivalent in diffusers' AutoencoderKL"
        )
    return "kl", config


def to_diffusers(
    tensors: dict[str, Tensor], expected: dict[str, Tensor], levels: int, prefix: str = ""
) -> dict[str, Tensor]:
    """LDM-named ``tensors`` -> the names and shapes of ``expected`` (a diffusers state dict).

    Refuses, naming the LDM keys, a checkpoint that lacks parameters, has ones the diffusers
    model has no place for, or has a tensor of another shape."""
    names = {ldm_name(name, levels): name for name in expected}
    missing = sorted(set(names) - set(tensors))
    if missing:
        listed = ", ".join(prefix + key for key in missing[:8])
        raise LatentpipeError(
            f"the autoencoder checkpoint lacks {len(missing)} key(s) its architecture needs: "
            f"{listed}{' ...' if len(missing) > 8 else ''}"
        )
    unexpected = sorted(set(tensors) - set(names))
    if unexpected:
        raise LatentpipeError(
            f"the autoencoder checkpoint has key(s) diffusers' model has no place for: "
            f"{', '.join(prefix + key for key in unexpected[:8])}"
        )
    out = {}
    for ldm, name in names.items():
        value = tensors[ldm]
        if _is_attention_matrix(ldm) and value.dim() == 4:
            value = value[:, :, 0, 0]  # LDM's 1x1 conv is diffusers' linear layer
        if value.shape != expected[name].shape:
            raise LatentpipeError(
                f"{prefix}{ldm} has shape {tuple(value.shape)}, the autoencoder read off "
                f"the other tensors needs {tuple(expected[name].shape)}"
            )
        out[name] = value
    return out


def from_diffusers(state: dict[str, Tensor], levels: int) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL / VQModel state dict under LDM's names and shapes (the inverse
    of :func:`to_diffusers`)."""
    out = {}
    for name, value in state.items():
        ldm = ldm_name(name, levels)
        out[ldm] = value[:, :, None, None] if _is_attention_matrix(ldm) and value.dim() == 2 else value
    return out
