"""Feature Pyramid Network (Lin et al., 2017) on a ResNet, with torchvision's layout.

``inner_blocks[i]`` are the 1x1 lateral convolutions, ``layer_blocks[i]`` the 3x3 output
convolutions; each is wrapped in a one-element ``nn.Sequential`` so that the parameter
names (``fpn.inner_blocks.0.0.weight``) match torchvision's checkpoints. The extra level
``"pool"`` (P6) subsamples the coarsest output by 2 (a 1x1 max-pool with stride 2), as
torchvision's ``LastLevelMaxPool``; the RPN uses it, the RoI heads do not.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import ResNet

FPN_CHANNELS = 256  # channels of every pyramid level (the FPN paper's d = 256)


class FeaturePyramidNetwork(nn.Module):
    """Top-down pathway with lateral connections, plus the max-pool level ``"pool"``.

    ``forward(OrderedDict of C2..C5, finest first) -> OrderedDict of P2..P5 (same names) + "pool"``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = FPN_CHANNELS, extra_pool: bool = True):
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels)
        self.extra_pool = extra_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
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
                 out_channels: int = FPN_CHANNELS, frozen_bn_eps: float = 1e-5):
        super().__init__()
        self.body = ResNet(depth, norm, frozen_bn_eps)
        self.body.freeze(trainable_layers)
        self.fpn = FeaturePyramidNetwork(self.body.stage_channels, out_channels)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))
