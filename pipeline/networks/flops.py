"""Analytic FLOP counts of the denoisers, for throughput and model-FLOPs utilisation (MFU).

Convention: FLOPs = 2 x multiply-accumulates (MACs) of the matrix multiplications and
convolutions (linear layers, qkv/projections, the two attention matmuls q k^T and a v,
convolutions); normalisations, activations, softmax, biases and embedding look-ups are not
counted. The DiT paper's "Gflops" (Peebles & Xie 2023, table 4) count MACs, so our forward
figure is twice the paper's: DiT-XL/2 at 32x32x4 is 118.6 GMACs there, ~237 GFLOPs here.

Training FLOPs = 3 x forward: the backward pass costs two forward passes (gradients with respect
to activations and to weights; Kaplan et al. 2020, sec. 2.1). Activation checkpointing adds a
recomputed forward that MFU deliberately does not count (it is not model work).
"""

from __future__ import annotations

from pipeline.networks.dit import TIME_FREQUENCY_DIM, DiTConfig
from pipeline.networks.unet import Attn, Down, Res, UNetConfig, Up, unet_layout

TRAINING_MULTIPLIER = 3


def dit_forward_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one DiT forward pass for one sample."""
    n, d, p = config.num_tokens, config.width, config.patch_size
    mlp_hidden = int(d * config.mlp_ratio)
    macs = n * (p * p * config.in_channels) * d  # patch embedding
    macs += TIME_FREQUENCY_DIM * d + d * d  # time MLP
    block = (
        6 * d * d  # adaLN regression of shift/scale/gate (once per sample)
        + n * d * 3 * d  # qkv
        + 2 * n * n * d  # q k^T and attention-weighted sum of v
        + n * d * d  # attention output projection
        + 2 * n * d * mlp_hidden  # MLP
    )
    macs += config.depth * block
    macs += 2 * d * d + n * d * (p * p * config.out_channels)  # final adaLN + linear
    return macs


def unet_forward_macs(config: UNetConfig) -> int:
    """Multiply-accumulates of one U-Net forward pass for one sample, walked from its layout."""
    layout = unet_layout(config)
    mc, e, s = config.model_channels, config.embed_dim, config.input_size
    macs = mc * e + e * e  # time MLP
    macs += s * s * 9 * config.in_channels * layout.stem_channels
    macs += s * s * 9 * layout.stem_channels * config.out_channels  # head
    specs = [spec for group in [*layout.encoder, layout.middle, *layout.decoder] for spec in group]
    for spec in specs:
        if isinstance(spec, Res):
            area = spec.size**2
            macs += area * 9 * spec.cin * spec.cout + e * 2 * spec.cout + area * 9 * spec.cout**2
            macs += area * spec.cin * spec.cout if spec.cin != spec.cout else 0
        elif isinstance(spec, Attn):
            n, c = spec.size**2, spec.channels
            macs += n * c * 3 * c + 2 * n * n * c + n * c * c
        elif isinstance(spec, Down):
            macs += (spec.size // 2) ** 2 * 9 * spec.channels**2
        elif isinstance(spec, Up):
            macs += (2 * spec.size) ** 2 * 9 * spec.channels**2
    return macs


def forward_flops(config: DiTConfig | UNetConfig) -> int:
    """FLOPs (= 2 x MACs) of one forward pass for one sample."""
    if isinstance(config, DiTConfig):
        return 2 * dit_forward_macs(config)
    if isinstance(config, UNetConfig):
        return 2 * unet_forward_macs(config)
    raise TypeError(f"no FLOP count for {type(config).__name__}")


def training_flops(config: DiTConfig | UNetConfig) -> int:
    """FLOPs of one training step (forward + backward) for one sample: 3 x forward."""
    return TRAINING_MULTIPLIER * forward_flops(config)


def mfu(config: DiTConfig | UNetConfig, samples_per_second: float, peak_flops_per_second: float) -> float:
    """Model-FLOPs utilisation of training: achieved model FLOP/s over the hardware's peak FLOP/s."""
    return training_flops(config) * samples_per_second / peak_flops_per_second
