"""ResNet backbones (18/34/50/101) with a choice of normalisation, as torchvision builds them.

The module and parameter names follow torchvision's ``resnet*`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.{0,1}``, ...) so that its checkpoints load
unchanged. The classifier (``avgpool``, ``fc``) is left out: the detector only needs the
four stage outputs C2..C5, returned as an ``OrderedDict`` named ``"0"``..``"3"``.

Normalisation (``norm``):
- ``"frozen_bn"`` (default, and torchvision's choice for detection): BatchNorm with fixed
  statistics and affine terms, all four held as buffers, so nothing is trained and the
  batch size does not matter;
- ``"bn"``: ordinary trainable ``nn.BatchNorm2d`` (batch statistics in training);
- ``"gn"``: ``nn.GroupNorm`` with :data:`GN_GROUPS` groups, for training from scratch with
  small batches.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

NORMS = ("frozen_bn", "bn", "gn")
# Groups per GroupNorm layer: the value of the GroupNorm paper (Wu & He, 2018), which
# divides every ResNet width (64 .. 2048).
GN_GROUPS = 32
# torchvision's stage names, from the last stage to the stem: trainable_layers=k trains the
# first k of them (torchvision's ``_resnet_fpn_extractor``); with 5 the stem norm trains too.
STAGES_LAST_FIRST = ("layer4", "layer3", "layer2", "layer1", "conv1")

# depth -> (block type, blocks per stage)
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms (all four are buffers).

    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, the same arithmetic as torchvision's
    ``FrozenBatchNorm2d`` so that results are bitwise equal. torchvision's COCO-trained
    Mask R-CNN checkpoint was made with ``eps=0.0``.

    ``scale`` and ``shift`` are kept between calls until a buffer changes (replaced, moved, or
    modified in place): 2 launches per call instead of 7 (a ResNet-50 has 53 of these layers).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self._affine_cache = None  # (buffers, their versions, (scale, shift))
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint saved with trainable BatchNorm carries a step counter; it means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._affine()
        return x * scale + shift

    def _compute_affine(self) -> tuple[Tensor, Tensor]:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return scale, shift

    def _affine(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) as Tensor[1, C, 1, 1], from the cache while the buffers are the same
        objects at the same versions (the cache holds them, so their ids cannot be reused)."""
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        if torch.compiler.is_compiling() or any(t.is_inference() for t in buffers):
            return self._compute_affine()  # traced into the graph / no version counter to read
        versions = tuple(t._version for t in buffers)
        cache = self._affine_cache
        if cache is None or cache[1] != versions or any(a is not b for a, b in zip(cache[0], buffers)):
            # Outside inference mode and autograd: usable by any later call, training included.
            with torch.inference_mode(False), torch.no_grad():
                self._affine_cache = cache = (buffers, versions, self._compute_affine())
        return cache[2]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(norm: str, channels: int, frozen_bn_eps: float = 1e-5) -> nn.Module:
    """The normalisation layer named by ``norm`` (one of :data:`NORMS`) for ``channels`` channels."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(channels, eps=frozen_bn_eps)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(GN_GROUPS, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, norm):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided: "ResNet v1.5"), 1x1 expand by 4, and a shortcut (ResNet-50/101)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, norm):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet trunk returning the outputs of its four stages (strides 4, 8, 16, 32).

    ``forward(x: Tensor[N, 3, H, W]) -> OrderedDict("0": C2, "1": C3, "2": C4, "3": C5)``.
    ``stage_channels`` lists the channels of C2..C5.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", frozen_bn_eps: float = 1e-5):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        kind, blocks = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck

        def norm_layer(c):
            return make_norm(norm, c, frozen_bn_eps)

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = 64
        self.stage_channels = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            cout = planes * block.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(_conv1x1(cin, cout, stride), norm_layer(cout))
            layers = [block(cin, planes, stride, downsample, norm_layer)]
            layers += [block(cout, planes, 1, None, norm_layer) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.stage_channels.append(cout)
            cin = cout

        # torchvision's initialisation (He normal, fan-out; unit norm scale, zero shift).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def freeze(self, trainable_layers: int) -> None:
        """Train only the last ``trainable_layers`` stages (0..5) as torchvision does.

        Parameters of the other stages get ``requires_grad=False``; ``5`` trains everything,
        the stem's normalisation included.
        """
        if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be an int in [0, 5], got {trainable_layers!r}")
        train = list(STAGES_LAST_FIRST[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
        for name, p in self.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in train))

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = OrderedDict()
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            out[str(i)] = x
        return out
