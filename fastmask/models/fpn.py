"""Feature Pyramid Network (Lin et al., 2017) on a ResNet, with torchvision's layout.

``inner_blocks[i]`` are the 1x1 lateral convolutions, ``layer_blocks[i]`` the 3x3 output
convolutions; each is wrapped in a one-element ``nn.Sequential`` so that the parameter
names (``fpn.inner_blocks.0.0.weight``) match torchvision's checkpoints. The extra level
``"pool"`` (P6) subsamples the coarsest output by 2 (a 1x1 max-pool with stride 2), as
torchvision's ``LastLevelMaxPool``; the RPN uses it, the RoI heads do not.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import GN_GROUPS, ResNet

FPN_CHANNELS = 256  # channels of every pyramid level (the FPN paper's d = 256)


HEAD_NORMS = (None, "gn")


def conv_norm(cin: int, cout: int, kernel: int, norm: str | None, relu: bool = False) -> nn.Sequential:
    """``Sequential(conv[, GroupNorm][, ReLU])``: a ``kernel``-sized 'same' convolution,
    followed by a GroupNorm when ``norm == "gn"`` (the convolution then has no bias)."""
    if norm not in HEAD_NORMS:
        raise ValueError(f"head_norm must be one of {HEAD_NORMS}, got {norm!r}")
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm is None)]
    if norm == "gn":
        layers.append(nn.GroupNorm(math.gcd(GN_GROUPS, cout), cout))  # 32 groups, fewer if 32 does not divide
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FeaturePyramidNetwork(nn.Module):
    """Top-down pathway with lateral connections, plus the max-pool level ``"pool"``.

    ``forward(OrderedDict of C2..C5, finest first) -> OrderedDict of P2..P5 (same names) + "pool"``.

    ``norm="gn"`` follows every convolution with a GroupNorm (and drops the convolution's
    bias), as torchvision's ``norm_layer`` option lays it out (``inner_blocks.0.1.weight``):
    normalised heads train from scratch much faster than plain ones.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = FPN_CHANNELS, extra_pool: bool = True,
                 norm: str | None = None):
        super().__init__()
        self.inner_blocks = nn.ModuleList(conv_norm(c, out_channels, 1, norm) for c in in_channels)
        self.layer_blocks = nn.ModuleList(conv_norm(out_channels, out_channels, 3, norm) for _ in in_channels)
        self.extra_pool = extra_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        names, feats = list(x.keys()), list(x.values())
        if len(feats) != len(self.inner_blocks):
            raise ValueError(f"the FPN expects {len(self.inner_blocks)} feature maps, got {len(feats)}")
        last = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last)]
        for i in range(len(feats) - 2, -1, -1):  # coarse to fine
            lateral = self.inner_blocks[i](feats[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[i](last))
        if self.extra_pool:
            names.append("pool")
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(names, results))


class ResNetFPN(nn.Module):
    """ResNet trunk (``body``) + FPN (``fpn``): ``forward(images[N, 3, H, W])`` -> OrderedDict
    ``"0"``..``"3"`` (strides 4..32) and ``"pool"`` (stride 64), each with ``out_channels`` channels.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", trainable_layers: int = 3,
                 out_channels: int = FPN_CHANNELS, frozen_bn_eps: float = 1e-5, fpn_norm: str | None = None):
        super().__init__()
        self.body = ResNet(depth, norm, frozen_bn_eps)
        self.body.freeze(trainable_layers)
        self.fpn = FeaturePyramidNetwork(self.body.stage_channels, out_channels, norm=fpn_norm)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))
