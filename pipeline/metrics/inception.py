"""A faster CPU copy of the TorchScript FID InceptionV3: batch norms folded into the convolutions.

The TorchScript export (pipeline.metrics.features) runs every one of its 94 ``Conv2dLayer`` as
``relu(batch_norm(conv2d(x, w), mean, var, beta, eps=1e-3))`` (no BN scale) and makes each
branch output ``contiguous()`` before concatenating, which throws away a channels-last layout.
This module rebuilds the same graph in eager PyTorch from the export's own tensors, with

- each batch norm folded into its convolution (Ioffe & Szegedy 2015, Sec. 3.2: at inference a
  BN is an affine map per channel): ``w' = w / sqrt(var + eps)``, ``b' = beta - mean / sqrt(var + eps)``,
  so a layer is ``relu(conv2d(x, w', b'))``;
- activations kept channels-last (NHWC), the layout oneDNN's CPU convolutions run fastest in.

The math is the same; only the float32 rounding differs (folding reorders one multiply-add per
activation). tests/metrics/test_inception.py checks the features against the export's on real
images to 1e-4. Structure (block types, pools, padding) is read off the export's modules; the
pools' sizes, which the export keeps only in its code, are those of its ``code`` (InceptionV3 as
in the TF FID graph: 3 x 3 average pools without the padded cells, a max pool in the last block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3
"""The export's batch-norm epsilon (TF's default for the 2015 Inception graph)."""


class FoldedConv(nn.Module):
    """One ``Conv2dLayer`` of the export: relu(conv2d(x, w / s, beta - mean / s)), s = sqrt(var + eps)."""

    def __init__(self, layer):
        super().__init__()
        scale = (layer.var.double() + BN_EPS).rsqrt()
        weight = layer.weight.double() * scale[:, None, None, None]
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = nn.Parameter((layer.beta.double() - layer.mean.double() * scale).float(), requires_grad=False)
        self.stride = int(layer.stride)
        self.padding = tuple(layer.padding) if isinstance(layer.padding, list) else int(layer.padding)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding), inplace=True)


def _branch(module) -> nn.Module:
    """A branch of an Inception A-D block: a conv layer, a tower (Sequential) or a pool."""
    kind = module.original_name
    if kind == "Conv2dLayer":
        return FoldedConv(module)
    if kind == "Sequential":
        return nn.Sequential(*(_branch(child) for _, child in module.named_children()))
    if kind == "MaxPool2d":  # the reduction blocks' pool (InceptionB, D): 3 x 3, stride 2
        return nn.MaxPool2d(3, stride=2)
    if kind == "AvgPool2d":  # the pool towers of InceptionA, C: 3 x 3, stride 1, padded cells not counted
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"unexpected module {kind} in the Inception export")


class Concat(nn.Module):
    """InceptionA-D: the branches side by side, concatenated over channels (in the export's order)."""

    def __init__(self, block):
        super().__init__()
        self.branches = nn.ModuleList(_branch(child) for _, child in block.named_children())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class InceptionE(nn.Module):
    """The last two blocks: 1x3 and 3x1 convolutions side by side on two towers, and a pool tower
    (3 x 3 average without padded cells in the first block, 3 x 3 max in the second: the TF graph's quirk)."""

    def __init__(self, block):
        super().__init__()
        layers = dict(block.named_children())
        names = [name for name, child in layers.items() if child.original_name == "Conv2dLayer"]
        self.convs = nn.ModuleDict({name: FoldedConv(layers[name]) for name in names})
        if layers["tower_2_pool"].original_name == "MaxPool2d":
            self.pool: nn.Module = nn.MaxPool2d(3, stride=1, padding=1)
        else:
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: Tensor) -> Tensor:
        c = self.convs
        a = c["tower_conv"](x)
        b = c["tower_1_conv_1"](c["tower_1_conv"](x))
        return torch.cat(
            [
                c["conv"](x),
                c["tower_mixed_conv"](a),
                c["tower_mixed_conv_1"](a),
                c["tower_1_mixed_conv"](b),
                c["tower_1_mixed_conv_1"](b),
                c["tower_2_conv"](self.pool(x)),
            ],
            1,
        )


class FoldedInception(nn.Module):
    """The export's network (``net.layers`` of the TorchScript archive), folded: (N, 3, 299, 299)
    network input -> (N, 2048) pool features."""

    def __init__(self, export):
        super().__init__()
        blocks: list[nn.Module] = []
        for name, module in export.net.layers.named_children():
            kind = module.original_name
            if kind == "InceptionE":
                blocks.append(InceptionE(module))
            elif kind.startswith("Inception"):
                blocks.append(Concat(module))
            elif name == "pool2":  # the final 8 x 8 average pool
                blocks.append(nn.AvgPool2d(8, stride=8))
            else:
                blocks.append(_branch(module))
        self.layers = nn.Sequential(*blocks)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.contiguous(memory_format=torch.channels_last)).reshape(-1, 2048)
