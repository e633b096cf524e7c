"""Input checks, the input transform and the output mapping, as torchvision's
``GeneralizedRCNNTransform`` does them.

- normalise each image: ``(image - mean) / std`` per channel;
- resize it so that its short side becomes ``min_size`` unless the long side would then
  exceed ``max_size`` (scale ``min(min_size / short, max_size / long)``), by bilinear
  interpolation called exactly as torchvision calls it (``scale_factor`` with
  ``recompute_scale_factor=True``: the new size is ``floor(side * scale)`` and the sampling
  grid follows from the rounded size); target boxes are scaled by the ratio of the sizes,
  target masks resized by nearest-neighbour interpolation the same way;
- batch the images into one zero-padded tensor whose height and width are multiples of
  ``size_divisible`` (32: the stride of the coarsest FPN level P5);
- after detection, map boxes back to the original image size and paste the masks there.

In training, one of ``min_size`` (a tuple for multi-scale training) is drawn per image
with torch's RNG, consuming it as torchvision does, so seeded runs agree with torchvision.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmask import ops
from fastmask.ops._checks import data_checks_enabled
from fastmask.ops._device import cached_table, device_constant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32  # stride of the coarsest FPN level (P5), so every level tiles the batch exactly
MASK_PASTE_PADDING = 1  # torchvision pastes each 28x28 mask with a 1-cell zero border (paste_masks_in_image)


@dataclass
class ImageList:
    """A batch of images of different sizes: ``tensors`` Tensor[N, C, H, W] (zero-padded) and
    ``image_sizes``, the (h, w) of each image inside the padding."""

    tensors: Tensor
    image_sizes: list[tuple[int, int]]

    def to(self, device) -> "ImageList":
        return ImageList(self.tensors.to(device), self.image_sizes)


@dataclass
class TransformConfig:
    min_size: int | Sequence[int] = 800
    max_size: int = 1333
    image_mean: Sequence[float] = field(default_factory=lambda: IMAGENET_MEAN)
    image_std: Sequence[float] = field(default_factory=lambda: IMAGENET_STD)
    size_divisible: int = SIZE_DIVISIBLE
    fixed_size: tuple[int, int] | None = None  # (w, h) to resize every image to, as torchvision's


# --------------------------------------------------------------------------- input checks


def check_images(images) -> None:
    """Raise ValueError/TypeError unless ``images`` is a non-empty list of finite float [3, H, W] tensors.

    The finiteness test reads the images; it runs where the ops' data checks run
    (``fastmask.ops._checks.data_checks_enabled``: CPU tensors, or ``FASTMASK_CHECKS=1``), as
    one host sync for all images, and never while tracing.
    """
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of Tensor[3, H, W], got {type(images).__name__}"
                         + (" (pass list(batch) for a batched tensor)" if isinstance(images, Tensor) else ""))
    if len(images) == 0:
        raise ValueError("images is an empty list; pass at least one Tensor[3, H, W]")
    for i, im in enumerate(images):
        if not isinstance(im, Tensor):
            raise TypeError(f"images[{i}] must be a torch.Tensor, got {type(im).__name__}")
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"images[{i}] must have shape [3, H, W] (RGB, channels first), got {tuple(im.shape)}")
        if not im.is_floating_point():
            raise TypeError(f"images[{i}] must be a float tensor with values in [0, 1], got dtype {im.dtype}")
        if im.shape[1] == 0 or im.shape[2] == 0:
            raise ValueError(f"images[{i}] is empty: shape {tuple(im.shape)}")
        if im.device != images[0].device:
            raise ValueError(f"images[{i}] is on {im.device} but images[0] is on {images[0].device}")
    if not data_checks_enabled(images[0]):
        return
    finite = torch.stack([torch.isfinite(im).all() for im in images])
    if not bool(finite.all()):  # host sync: input validation
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise ValueError(f"images {bad} hold NaN or infinite values")


def check_targets(targets, images, need_masks: bool = True) -> None:
    """Raise ValueError/TypeError unless ``targets`` matches ``images`` (one dict per image) with
    ``boxes`` float Tensor[N, 4] of finite boxes with x2 > x1 and y2 > y1, ``labels`` int64
    Tensor[N] and, when ``need_masks``, ``masks`` Tensor[N, H, W] of the image's size.

    One host sync for all boxes of the batch.
    """
    if targets is None:
        raise ValueError("targets must be given in training mode (a list with one dict per image)")
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        got = f"{len(targets)} entries" if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"targets must be a list with one dict per image ({len(images)}), got {got}")
    keys = ("boxes", "labels", "masks") if need_masks else ("boxes", "labels")
    for i, (t, im) in enumerate(zip(targets, images)):
        if not isinstance(t, dict):
            raise ValueError(f"targets[{i}] must be a dict with keys {keys}, got {type(t).__name__}")
        missing = [k for k in keys if k not in t]
        if missing:
            raise ValueError(f"targets[{i}] has no {missing}; each target needs {keys}")
        boxes, labels = t["boxes"], t["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f'targets[{i}]["boxes"] must be a Tensor[N, 4] (x1, y1, x2, y2), got {shape}')
        if not boxes.is_floating_point():
            raise TypeError(f'targets[{i}]["boxes"] must be a float tensor, got {boxes.dtype}')
        n = boxes.shape[0]
        if not isinstance(labels, Tensor) or labels.shape != (n,):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f'targets[{i}]["labels"] must be a Tensor[{n}] (one label per box), got {shape}')
        if labels.dtype != torch.int64:
            raise TypeError(f'targets[{i}]["labels"] must be int64, got {labels.dtype}')
        if need_masks:
            masks = t["masks"]
            want = (n, im.shape[-2], im.shape[-1])
            if not isinstance(masks, Tensor) or tuple(masks.shape) != want:
                shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
                raise ValueError(f'targets[{i}]["masks"] must have shape [N, H, W] = {list(want)} '
                                 f"(one mask per box, the image's size), got {shape}")
        for k in keys:
            if t[k].device != im.device:
                raise ValueError(f'targets[{i}]["{k}"] is on {t[k].device} but images[{i}] is on {im.device}')
    ok = torch.stack([(torch.isfinite(t["boxes"]).all(1) & (t["boxes"][:, 2] > t["boxes"][:, 0])
                       & (t["boxes"][:, 3] > t["boxes"][:, 1])).all() for t in targets])
    if not bool(ok.all()):  # host sync: input validation (torchvision makes the same check)
        for i, t in enumerate(targets):
            b = t["boxes"]
            bad = ~(torch.isfinite(b).all(1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(f'targets[{i}]["boxes"][{j}] = {b[j].tolist()} is not a valid box: boxes must be '
                                 "finite (x1, y1, x2, y2) with x2 > x1 and y2 > y1")


# --------------------------------------------------------------------------- transform


def _ratios(new_size: Sequence[int], original_size: Sequence[int]) -> tuple[float, float]:
    """(h, w) scale factors as torchvision computes them, float32 quotients, as Python floats.

    Pure Python (no tensor, so nothing to trace): the quotient in float64 rounded to float32
    is the correctly rounded float32 quotient, since float64 carries more than 2 * 24 + 2 bits
    (double rounding is then innocuous for a division)."""
    return tuple(struct.unpack("f", struct.pack("f", float(s) / float(o)))[0]
                 for s, o in zip(new_size, original_size))


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale boxes Tensor[N, 4] from an image of ``original_size`` (h, w) to ``new_size``.

    The ratios are float32 quotients, as torchvision computes them, so results agree bitwise.
    They are computed on the host (a float32 quotient is exactly a Python float) and the
    columns multiplied by them in place on a copy: no host-to-device copy. The result has
    the dtype ``boxes * float32 tensor`` has (fp16/bf16 boxes give fp32).
    """
    rh, rw = _ratios(new_size, original_size)
    out = boxes.to(torch.promote_types(boxes.dtype, torch.float32), copy=True)
    out[:, 0::2] *= rw
    out[:, 1::2] *= rh
    return out


class RCNNTransform(nn.Module):
    """Normalise, resize and batch the inputs; map the detections back (see the module docs)."""

    def __init__(self, cfg: TransformConfig, backend: str | None = None):
        super().__init__()
        min_size = cfg.min_size
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        if not self.min_size or any(not isinstance(s, int) or s <= 0 for s in self.min_size):
            raise ValueError(f"min_size must be a positive int or a non-empty tuple of them, got {min_size!r}")
        if not isinstance(cfg.max_size, int) or cfg.max_size <= 0:
            raise ValueError(f"max_size must be a positive int, got {cfg.max_size!r}")
        if len(cfg.image_mean) != 3 or len(cfg.image_std) != 3:
            raise ValueError("image_mean and image_std must each hold 3 values (R, G, B)")
        self.max_size = cfg.max_size
        self.image_mean = tuple(float(v) for v in cfg.image_mean)
        self.image_std = tuple(float(v) for v in cfg.image_std)
        self.size_divisible = cfg.size_divisible
        self.fixed_size = cfg.fixed_size
        self.backend = backend

    def _draw_min_size(self) -> int:
        # torchvision draws with torch's RNG even when there is a single choice; doing the same
        # keeps seeded training runs identical to torchvision's. A CPU scalar: no device sync.
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def _resize(self, image: Tensor, target: dict | None):
        h, w = image.shape[-2:]
        short = self._draw_min_size() if self.training else self.min_size[-1]
        if self.fixed_size is not None:
            kwargs = dict(size=[self.fixed_size[1], self.fixed_size[0]])
        else:
            scale = min(short / min(h, w), self.max_size / max(h, w))
            kwargs = dict(scale_factor=scale, recompute_scale_factor=True)
        image = F.interpolate(image[None], mode="bilinear", align_corners=False, **kwargs)[0]
        if target is None:
            return image, None
        target = dict(target)
        target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        if "masks" in target:
            masks = target["masks"]
            target["masks"] = F.interpolate(masks[:, None].float(), **kwargs)[:, 0].byte()
        return image, target

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad to one Tensor[N, C, H, W] with H, W rounded up to ``size_divisible``."""
        stride = self.size_divisible
        h = int(math.ceil(max(im.shape[1] for im in images) / stride) * stride)
        w = int(math.ceil(max(im.shape[2] for im in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for i, im in enumerate(images):  # one copy per image (images differ in size)
            batch[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        return batch

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        """-> (ImageList, resized targets or None). Inputs are not modified."""
        dtype, device = images[0].dtype, images[0].device
        # Cached per (values, dtype, device): no host-to-device copy per forward.
        mean = device_constant(self.image_mean, dtype, device)[:, None, None]
        std = device_constant(self.image_std, dtype, device)[:, None, None]
        out_images, out_targets = [], []
        for i, image in enumerate(images):  # images differ in size: each is resized on its own
            image = (image - mean) / std
            image, target = self._resize(image, targets[i] if targets is not None else None)
            out_images.append(image)
            out_targets.append(target)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in out_images]
        return ImageList(self.batch_images(out_images), sizes), (out_targets if targets is not None else None)

    def postprocess(self, detections: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]], mask_threshold: float | None = None, *,
                    paste: bool = True) -> dict[str, Tensor]:
        """Map padded detections (``boxes`` Tensor[B, D, 4], ``masks`` Tensor[B, D, 1, M, M]) back
        to the original image sizes: boxes scaled, masks pasted into Tensor[B, D, 1, H, W]
        with (H, W) the largest original size (image i's masks fill its top-left
        ``original_sizes[i]``; zeros elsewhere). Masks are float probabilities, or, with
        ``mask_threshold``, bool ``probability > mask_threshold`` (``paste_masks`` thresholds
        as it pastes). Static shapes, no host sync; the other entries pass through.
        ``paste=False`` leaves the masks as they are (only the boxes are scaled).
        """
        out = dict(detections)
        boxes = detections["boxes"]
        # The ratios as torchvision computes them (float32 quotients, see resize_boxes) in
        # one cached [B, 1, 4] table: one multiply for the batch, bitwise per-image results.
        ratios = [_ratios(orig, size) for size, orig in zip(image_sizes, original_sizes)]
        table = cached_table(tuple(v for rh, rw in ratios for v in (rw, rh, rw, rh)), torch.float32, boxes.device)
        out["boxes"] = boxes * table.view(-1, 1, 4)
        if "masks" not in detections or not paste:
            return out
        masks, boxes = detections["masks"], out["boxes"]
        b, d = masks.shape[:2]
        paste = dict(padding=MASK_PASTE_PADDING, threshold=mask_threshold, backend=self.backend)
        if len(set(original_sizes)) == 1:  # one paste for the batch
            pasted = ops.paste_masks(masks.flatten(0, 1), boxes.flatten(0, 1), original_sizes[0], **paste)
            out["masks"] = pasted.view(b, d, 1, *original_sizes[0])
        else:  # images differ in size: one paste each, into the shared canvas
            h, w = (max(s[0] for s in original_sizes), max(s[1] for s in original_sizes))
            canvas = masks.new_zeros((b, d, 1, h, w), dtype=torch.bool if mask_threshold is not None else masks.dtype)
            for i, (oh, ow) in enumerate(original_sizes):
                canvas[i, :, :, :oh, :ow] = ops.paste_masks(masks[i], boxes[i], (oh, ow), **paste)
            out["masks"] = canvas
        return out

    def extra_repr(self) -> str:
        return (f"min_size={self.min_size}, max_size={self.max_size}, mean={self.image_mean}, "
                f"std={self.image_std}, size_divisible={self.size_divisible}")
