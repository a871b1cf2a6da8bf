"""Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers", sec. 3.2 and fig. 3).

Latent (B, C, H, W) -> p x p patches -> tokens + fixed 2-D sin-cos positions -> N adaLN-Zero
blocks conditioned on c = embed(t) + embed(y) -> final adaLN layer -> unpatchify to
(B, C or 2C, H, W). The network knows nothing about noise schedules: ``t`` is whatever float
time input the denoiser wrapper chooses to feed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed
from torch import Tensor, nn

from pipeline.networks.embeddings import ConditionEmbedder, TimestepEmbedder, sincos_pos_embed_2d
from pipeline.networks.layers import SelfAttention, check_backend, run_block


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    input_size: int = 32
    """Side length of the square latent the network sees (H = W)."""
    in_channels: int = 4
    """Latent channels."""
    patch_size: int = 2
    """Side of the square patches that become tokens: 1, 2, 4 or 8; must divide input_size."""
    width: int = 384
    """Token width (the paper's hidden size)."""
    depth: int = 12
    """Number of adaLN-Zero transformer blocks."""
    num_heads: int = 6
    """Attention heads per block; must divide width."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP, as a multiple of width."""
    num_classes: int = 0
    """Number of class labels; 0 makes the network unconditional. One more row is the null class."""
    learn_sigma: bool = False
    """Also output the per-pixel variance interpolation v (Nichol & Dhariwal 2021): 2C outputs."""
    time_embedding: Literal["dit", "diffusers"] = "dit"
    """Sinusoid of the time input: 'dit' w_i = 10000^(-i/128), the DiT reference code's; 'diffusers'
    w_i = 10000^(-i/127), what diffusers' DiTTransformer2DModel computes (downscale_freq_shift=1).
    A checkpoint gives its outputs only under the convention it was trained with."""
    mlp_norm_eps: float = 1e-6
    """eps of the layer norm before each block's MLP: 1e-6 in the DiT reference code; diffusers'
    DiTTransformer2DModel uses its config's norm_eps there (1e-5 by default)."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the residual branches (0 in the paper)."""
    attention_backend: str = "sdpa"
    """'sdpa', 'xformers' (optional extra) or 'math'; see pipeline.networks.layers."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""

    def __post_init__(self) -> None:
        if self.patch_size not in (1, 2, 4, 8):
            raise ValueError(f"patch_size must be 1, 2, 4 or 8, got {self.patch_size}")
        if self.input_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide input_size {self.input_size}")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} does not divide width {self.width}")
        if self.width % 4:
            raise ValueError(f"width must be divisible by 4 for the 2-D position embedding, got {self.width}")
        if self.time_embedding not in ("dit", "diffusers"):
            raise ValueError(f"time_embedding must be 'dit' or 'diffusers', got {self.time_embedding!r}")
        check_backend(self.attention_backend)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


TIME_FREQUENCY_DIM = 256
"""Sinusoidal features of the time input before its MLP (the reference code's choice)."""

# Paper table 1: model sizes (width, depth, heads); every size comes with patch sizes 1, 2, 4, 8.
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_PRESETS = {
    f"{size}/{patch}": dict(width=w, depth=d, num_heads=h, patch_size=patch)
    for size, (w, d, h) in DIT_SIZES.items()
    for patch in (1, 2, 4, 8)
}


def diffusers_time_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim/2 - 1)): diffusers'
    ``get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=1)``, the one its
    DiTTransformer2DModel uses, computed with its operations in its order so that converted
    checkpoints give the same outputs (the reference code divides by dim/2: sinusoidal_embedding)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    args = t[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiffusersTimestepEmbedder(TimestepEmbedder):
    """The time MLP on :func:`diffusers_time_features` (``DiTConfig.time_embedding='diffusers'``)."""

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(diffusers_time_features(t, self.frequency_dim).to(self.mlp.fc1.weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer-norm modulation x * (1 + scale) + shift, per sample (paper sec. 3.2)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class DiTBlock(nn.Module):
    """Transformer block whose layer norms are modulated by the conditioning (adaLN-Zero).

    The six vectors (shift, scale, gate for attention and for the MLP) are regressed from the
    conditioning; the regression is zero-initialised, so every gate is 0 and the block is the
    identity at initialisation.
    """

    def __init__(
        self, width: int, num_heads: int, mlp_ratio: float, drop_path: float, backend: str, mlp_norm_eps: float = 1e-6
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, num_heads, backend=backend)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=mlp_norm_eps)
        # timm annotates act_layer as type[nn.Module] but only calls it, as its own ViTs do with partials
        tanh_gelu = partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=tanh_gelu)  # type: ignore[arg-type]
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ada_ln = nn.Linear(width, 6 * width)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        """``c_act`` is SiLU(c), computed once for all blocks by the caller."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada_ln(c_act).chunk(6, dim=1)
        x = x + self.drop_path(gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a)))
        return x + self.drop_path(gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm and a linear map from tokens to patch pixels (zero-initialised)."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_ln = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        shift, scale = self.ada_ln(c_act).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """``net(x, t, y=None) -> out``.

    x: (B, in_channels, input_size, input_size) latents. t: (B,) or scalar float time input.
    y: (B,) long class labels in [0, num_classes], where num_classes is the null class; None
    means "all null" for a class-conditional network and is required for an unconditional one.
    out: (B, out_channels, input_size, input_size); with learn_sigma the first in_channels
    channels are the prediction and the rest the variance output.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        w, p = config.width, config.patch_size
        self.patch_embed = PatchEmbed(config.input_size, p, config.in_channels, w, bias=True)
        grid = config.input_size // p
        self.register_buffer("pos_embed", sincos_pos_embed_2d(w, grid, grid)[None], persistent=False)
        self.cond = ConditionEmbedder(w, num_classes=config.num_classes, frequency_dim=TIME_FREQUENCY_DIM)
        if config.time_embedding == "diffusers":  # same parameters, diffusers' frequencies
            self.cond.time = DiffusersTimestepEmbedder(w, frequency_dim=TIME_FREQUENCY_DIM)
        # Stochastic depth grows linearly with depth (Huang et al. 2016), as in timm's ViT.
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            DiTBlock(w, config.num_heads, config.mlp_ratio, rate, config.attention_backend, config.mlp_norm_eps)
            for rate in rates
        )
        self.final = FinalLayer(w, p, config.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation (its reference code's ``initialize_weights``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj  # a conv: initialise like the linear map it is
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        if proj.bias is not None:  # built with bias=True
            nn.init.zeros_(proj.bias)
        if self.cond.label is not None:
            nn.init.normal_(self.cond.label.table.weight, std=0.02)
        nn.init.normal_(self.cond.time.mlp.fc1.weight, std=0.02)
        nn.init.normal_(self.cond.time.mlp.fc2.weight, std=0.02)
        ada_lns = [block.ada_ln for block in self.blocks if isinstance(block, DiTBlock)]  # every block
        for layer in [*ada_lns, self.final.ada_ln, self.final.linear]:
            for param in layer.parameters():  # weight and bias
                nn.init.zeros_(param)

    @property
    def null_class(self) -> int | None:
        """Label index that means "no class" (classifier-free guidance); None if unconditional."""
        return self.cond.null_class

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), patches in row-major order."""
        p, c, g = self.config.patch_size, self.config.out_channels, self.config.input_size // self.config.patch_size
        x = tokens.reshape(tokens.shape[0], g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        tokens = self.patch_embed(x) + self.pos_embed
        c_act = F.silu(self.cond(t, y, x.shape[0]))
        for block in self.blocks:
            tokens = run_block(block, tokens, c_act, checkpoint=self.gradient_checkpointing)
        return self.unpatchify(self.final(tokens, c_act))
