"""Training transforms on ``(image, target)`` pairs; boxes and masks follow the image.

Each transform is called as ``t(image, target, rng)`` with ``image`` a uint8 Tensor[3, H, W],
``target`` the dict of :class:`fastmask.data.coco.CocoDetection` and ``rng`` a
``numpy.random.Generator``: every random choice comes from ``rng``, which the training
sampler seeds per sample, so an interrupted and resumed run sees the same augmentations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``: x -> W - x for boxes, masks flipped along W."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng):
        if rng.random() >= self.p:
            return image, target
        w = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, 0], boxes[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
        target["boxes"] = boxes
        target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h', w') with the shorter side ``short`` unless that makes the longer one exceed ``max_size``."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class ResizeShortestEdge:
    """Resize so the shorter side is one of ``min_sizes`` (drawn uniformly) and the longer at most ``max_size``.

    The image is resized bilinearly (with antialiasing when shrinking), masks by nearest
    neighbour, boxes by the same per-axis scale.
    """

    def __init__(self, min_sizes, max_size: int):
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)
        if not self.min_sizes or min(self.min_sizes) <= 0 or self.max_size <= 0:
            raise ValueError(f"ResizeShortestEdge needs positive sizes, got min_sizes={min_sizes}, max_size={max_size}")

    def __call__(self, image, target, rng):
        h, w = image.shape[-2:]
        short = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        nh, nw = resized_shape(h, w, short, self.max_size)
        if (nh, nw) == (h, w):
            return image, target
        out = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=nh < h or nw < w)[0]
        image = out.round_().clamp_(0, 255).to(torch.uint8)
        target = dict(target)
        scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
        masks = target["masks"]
        if masks.shape[0]:
            target["masks"] = F.interpolate(masks[None], size=(nh, nw), mode="nearest")[0]
        else:
            target["masks"] = masks.new_zeros((0, nh, nw))
        if "area" in target:
            target["area"] = target["area"] * (nh * nw) / (h * w)
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_sizes={self.min_sizes}, max_size={self.max_size})"


def build_train_transforms(min_sizes, max_size: int, hflip_prob: float) -> Compose:
    steps = []
    if min_sizes:
        steps.append(ResizeShortestEdge(min_sizes, max_size))
    if hflip_prob > 0:
        steps.append(RandomHorizontalFlip(hflip_prob))
    return Compose(steps)
