"""latentpipe's own KL autoencoder (pipeline.autoencoder.nets) as a diffusers ``AutoencoderKL``.

The two are the same LDM network (Rombach et al. 2022, App. G) under other names, when the first
level keeps the stem's width (channel_mult[0] == 1: diffusers' conv_in already outputs the first
level's width): ours has no quant_conv / post_quant_conv, which diffusers leaves out with
``use_quant_conv=False`` / ``use_post_quant_conv=False``; our fused 1x1-conv qkv is its to_q/to_k/
to_v; the decoder's learned ``log_scale`` is a training-loss parameter and not part of the
network. The VQ autoencoder is not converted: its codebook (EMA statistics, optional cosine
lookup and projections) has no exact diffusers form, and no diffusers pipeline decodes VQ latents
of a diffusion model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pipeline.autoencoder.nets import AttnBlock, Downsample, KLAutoencoder, ResnetBlock
from pipeline.errors import LatentpipeError
from pipeline.networks.layers import Upsample

_RESNET_LEAVES = {"skip": "conv_shortcut"}


def _copy(out: dict[str, Tensor], module: nn.Module, prefix: str, renames: dict[str, str] | None = None) -> None:
    for name, value in module.state_dict().items():
        head, dot, rest = name.partition(".")
        out[prefix + (renames or {}).get(head, head) + dot + rest] = value.detach().clone()


def _attention(out: dict[str, Tensor], block: AttnBlock, prefix: str) -> None:
    """Our fused 1x1-conv qkv and projection are diffusers' to_q/to_k/to_v/to_out linear layers."""
    state = {name: value.detach() for name, value in block.state_dict().items()}
    for name, weight, bias in zip("qkv", state["qkv.weight"][:, :, 0, 0].chunk(3), state["qkv.bias"].chunk(3)):
        out[f"{prefix}to_{name}.weight"], out[f"{prefix}to_{name}.bias"] = weight.clone(), bias.clone()
    out[f"{prefix}to_out.0.weight"] = state["proj.weight"][:, :, 0, 0].clone()
    out[f"{prefix}to_out.0.bias"] = state["proj.bias"].clone()
    _copy(out, block.norm, f"{prefix}group_norm.")


def _mid(out: dict[str, Tensor], mid: nn.Sequential, prefix: str) -> None:
    _copy(out, mid[0], f"{prefix}mid_block.resnets.0.", _RESNET_LEAVES)
    _copy(out, mid[2], f"{prefix}mid_block.resnets.1.", _RESNET_LEAVES)
    if isinstance(mid[1], AttnBlock):
        _attention(out, mid[1], f"{prefix}mid_block.attentions.0.")


def _levels(layers: nn.Sequential, prefix: str, out: dict[str, Tensor], resample: type) -> list[int]:
    """Copy one trunk's per-level blocks; returns each level's width."""
    level, index, widths = 0, 0, []
    for layer in layers:
        if isinstance(layer, ResnetBlock):
            _copy(out, layer, f"{prefix}.{level}.resnets.{index}.", _RESNET_LEAVES)
            index += 1
            width = layer.conv2.out_channels
        elif isinstance(layer, resample):
            _copy(out, layer, f"{prefix}.{level}.{'downsamplers' if resample is Downsample else 'upsamplers'}.0.")
            widths.append(width)
            level, index = level + 1, 0
    return [*widths, width]


def kl_to_diffusers(model: KLAutoencoder, scaling_factor: float) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(AutoencoderKL config, state dict) computing what ``model`` computes."""
    encoder, decoder = model.encoder, model.decoder
    out: dict[str, Tensor] = {}
    widths = _levels(encoder.down, "encoder.down_blocks", out, Downsample)
    if encoder.conv_in.out_channels != widths[0]:
        raise LatentpipeError(
            f"this autoencoder's stem has {encoder.conv_in.out_channels} channels and its first level "
            f"{widths[0]} (channel_mult[0] != 1); diffusers' AutoencoderKL has no such layer, so it does not export"
        )
    _levels(decoder.up, "decoder.up_blocks", out, Upsample)
    for prefix, trunk in (("encoder.", encoder), ("decoder.", decoder)):
        _copy(out, trunk.conv_in, f"{prefix}conv_in.")
        _copy(out, trunk.conv_out, f"{prefix}conv_out.")
        _copy(out, trunk.norm_out, f"{prefix}conv_norm_out.")
        _mid(out, trunk.mid, prefix)
    layers_per_block = sum(isinstance(layer, ResnetBlock) for layer in encoder.down) // len(widths)
    config = dict(
        in_channels=encoder.in_channels,
        out_channels=decoder.conv_out.out_channels,
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        latent_channels=decoder.conv_in.in_channels,
        norm_num_groups=encoder.norm_out.num_groups,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=isinstance(encoder.mid[1], AttnBlock),
    )
    return config, out
