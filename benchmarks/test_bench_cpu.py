"""CPU benchmarks of the pure-PyTorch references against torchvision's CPU ops.

Run with ``pytest benchmarks --benchmark-only`` (pytest-benchmark). Sizes are moderate so
the whole file runs in about a minute on two cores; the GPU benchmarks live in
``bench_*.py`` and run through ``python -m benchmarks.run``.
"""

import math

import pytest
import torch
import torchvision

from fastmask import ops

PROVIDERS = ["torchvision", "reference"]


def _pyramid(n=2, c=64, hw=(256, 384)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, math.ceil(hw[0] / s), math.ceil(hw[1] / s), generator=g) for s in (4, 8, 16, 32)]


def _boxes(k, hw, seed=0, max_side=200.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * torch.tensor([hw[1], hw[0]]) * 0.8
    wh = torch.rand(k, 2, generator=g) * max_side + 4
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_multiscale_roi_align_box_head(benchmark, provider):
    feats, hw = _pyramid(), (256, 384)
    boxes = [_boxes(256, hw, 1), _boxes(256, hw, 2)]
    if provider == "torchvision":
        names = ["0", "1", "2", "3"]
        m = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
        fn = lambda: m(dict(zip(names, feats)), boxes, [hw, hw])  # noqa: E731
    else:
        fn = lambda: ops.multiscale_roi_align(feats, boxes, 7, [hw, hw], 2, backend="torch")  # noqa: E731
    assert benchmark(fn).shape == (512, 64, 7, 7)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_batched_nms_2k_boxes_80_classes(benchmark, provider):
    g = torch.Generator().manual_seed(0)
    boxes = _boxes(2000, (600, 800), 3, 120.0)
    scores = torch.rand(2000, generator=g)
    idxs = torch.randint(0, 80, (2000,), generator=g)
    impl = torchvision.ops.batched_nms if provider == "torchvision" else (
        lambda *a: ops.batched_nms(*a, backend="torch"))
    assert benchmark(impl, boxes, scores, idxs, 0.5).dim() == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode_boxes_box_head(benchmark, provider):
    from torchvision.models.detection._utils import BoxCoder

    g = torch.Generator().manual_seed(0)
    codes = torch.randn(1000, 91 * 4, generator=g)
    boxes = _boxes(1000, (800, 1333), 4)
    weights = (10.0, 10.0, 5.0, 5.0)
    impl = BoxCoder(weights).decode_single if provider == "torchvision" else (
        lambda c, b: ops.decode_boxes(c, b, weights, backend="torch"))
    assert benchmark(impl, codes, boxes).shape == (1000, 91 * 4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_paste_50_masks_480x640(benchmark, provider):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(50, 1, 28, 28, generator=g)
    boxes = _boxes(50, (480, 640), 5, 300.0)
    impl = paste_masks_in_image if provider == "torchvision" else (
        lambda m, b, s: ops.paste_masks(m, b, s, backend="torch"))
    assert benchmark(impl, masks, boxes, (480, 640)).shape == (50, 1, 480, 640)
