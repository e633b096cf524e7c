"""Box helpers and the box coder, with torchvision's semantics.

Boxes are ``(x1, y1, x2, y2)`` in image pixels. A box is encoded relative to a reference
box (an anchor or a proposal) as ``(dx, dy, dw, dh)``: the centre shift in units of the
reference's width and height, and the log of the size ratio, each multiplied by its weight
(``weights = (wx, wy, ww, wh)``; the RPN uses ``(1, 1, 1, 1)``, the box head
``(10, 10, 5, 5)``). Decoding clamps ``dw, dh`` at ``bbox_xform_clip`` before ``exp``.

``decode_boxes_ref`` and ``encode_boxes_ref`` follow torchvision's ``BoxCoder`` operation by
operation, so on the same device they give the same bits. The reference decode reads the
codes and boxes once but writes about ten [N, K] temporaries (each centre, size and corner
is a separate tensor); the Triton kernel reads ``N*4K + N*4`` values and writes ``N*4K``,
and can clip to the image in the same pass (``clip_to``), which the box head needs next.

``encode_boxes`` has no kernel: it is a handful of elementwise ops used once per training
step on a few thousand boxes, so every backend runs the torch code.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from ._backend import check_backend_name, resolve_backend
from ._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from ._device import cached_table, device_constant
from ._library import register

# Largest log-scale change decoded: a box at most 1000 px wide from a 16 px anchor.
# Clamping dw, dh here keeps exp() finite for wild early-training deltas (torchvision's value).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

_NUMERIC = FLOAT_DTYPES + (torch.int32, torch.int64)


def _upcast(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 and small ints -> int32 before multiplying, as torchvision does."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


# --------------------------------------------------------------------------- helpers


def box_area(boxes: Tensor) -> Tensor:
    """Area of Tensor[..., 4] boxes; fp16/bf16 are computed and returned in fp32."""
    check_tensor("boxes", boxes, last_dim=4, dtypes=None)
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU, Tensor[..., N, 4] x Tensor[..., M, 4] -> Tensor[..., N, M] (``torchvision.ops.box_iou``).

    Boxes with no overlap give 0; two empty boxes give NaN (0 / 0), as in torchvision.
    """
    check_tensor("boxes1", boxes1, last_dim=4, dtypes=None)
    check_tensor("boxes2", boxes2, last_dim=4, dtypes=None)
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = _upcast(rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Clamp x to ``[0, w]`` and y to ``[0, h]``: Tensor[..., 4] boxes, ``size = (h, w)``."""
    check_tensor("boxes", boxes, last_dim=4, dtypes=None)
    height, width = _image_size("size", size)
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64 Tensor[K]) of the boxes whose width and height are both >= ``min_size``.

    Like torchvision it returns indices, so on CUDA it waits for the device (``torch.where``).
    """
    check_tensor("boxes", boxes, last_dim=4, dtypes=None)
    ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def _image_size(name: str, size) -> tuple[float, float]:
    if isinstance(size, Tensor) or not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0 for v in size):
        raise ValueError(f"{name} must be a pair (height, width) of non-negative numbers, got {size!r}")
    return size[0], size[1]


def _check_weights(weights) -> tuple[float, float, float, float]:
    ok = isinstance(weights, (tuple, list)) and len(weights) == 4 and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights)
    if not ok:
        raise ValueError(f"weights must be 4 positive finite numbers (wx, wy, ww, wh), got {weights!r}")
    return tuple(float(w) for w in weights)


# --------------------------------------------------------------------------- reference


def decode_boxes_ref(rel_codes: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0),
                     bbox_xform_clip: float = BBOX_XFORM_CLIP, clip_to=None) -> Tensor:
    """Reference decode, operation for operation ``BoxCoder(weights, clip).decode_single``.

    ``rel_codes``: Tensor[N, 4K] ``(dx, dy, dw, dh)`` per class; ``boxes``: Tensor[N, 4]
    reference boxes. Returns Tensor[N, 4K] in ``rel_codes``' dtype (computed in that dtype,
    as torchvision does). ``clip_to``: None, ``(h, w)`` or Tensor[N, 2] of per-row ``(h, w)``;
    when given the boxes are then clipped like ``clip_boxes_to_image``.
    """
    boxes = boxes.to(rel_codes.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights

    wx, wy, ww, wh = weights
    dx = rel_codes[:, 0::4] / wx
    dy = rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=bbox_xform_clip)

    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    half = device_constant((0.5,), pred_w.dtype, pred_w.device)[0]  # torchvision's 0-dim tensor, cached
    half_w = half * pred_w
    half_h = half * pred_h
    out = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
    if clip_to is None:
        return out.flatten(1)
    if isinstance(clip_to, Tensor):
        hw = clip_to.to(out.dtype)[:, None, :]  # [N, 1, 2] (h, w)
        x = torch.minimum(out[..., 0::2].clamp(min=0), hw[..., 1:2])
        y = torch.minimum(out[..., 1::2].clamp(min=0), hw[..., 0:1])
        return torch.stack((x, y), dim=-1).reshape(out.shape).flatten(1)
    return clip_boxes_to_image(out, clip_to).flatten(1)


def encode_boxes_ref(reference_boxes: Tensor, proposals: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Reference encode, operation for operation ``BoxCoder(weights).encode_single``.

    ``reference_boxes`` (targets) and ``proposals``: Tensor[N, 4]. Returns Tensor[N, 4]
    ``(dx, dy, dw, dh)`` in ``reference_boxes``' dtype.
    """
    # The weights as a tensor in the targets' dtype, as torchvision has them: with mixed dtypes
    # (e.g. fp32 targets, fp16 proposals) this rounds them as torchvision does, which Python
    # floats would not. Cached per device: no host-to-device copy per call.
    w = device_constant(tuple(float(v) for v in weights), reference_boxes.dtype, reference_boxes.device)
    ex_widths = proposals[:, 2:3] - proposals[:, 0:1]
    ex_heights = proposals[:, 3:4] - proposals[:, 1:2]
    ex_ctr_x = proposals[:, 0:1] + 0.5 * ex_widths
    ex_ctr_y = proposals[:, 1:2] + 0.5 * ex_heights

    gt_widths = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
    gt_heights = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
    gt_ctr_x = reference_boxes[:, 0:1] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[:, 1:2] + 0.5 * gt_heights

    dx = w[0] * (gt_ctr_x - ex_ctr_x) / ex_widths
    dy = w[1] * (gt_ctr_y - ex_ctr_y) / ex_heights
    dw = w[2] * torch.log(gt_widths / ex_widths)
    dh = w[3] * torch.log(gt_heights / ex_heights)
    return torch.cat((dx, dy, dw, dh), dim=1)


# --------------------------------------------------------------------------- public ops


def per_row_image_sizes(image_sizes: Sequence[Sequence[int]], rows_per_image: Sequence[int],
                        device: torch.device | str) -> Tensor:
    """Float Tensor[sum(rows_per_image), 2] of ``(h, w)``: image i's size repeated for its rows.

    Builds the per-row ``clip_to`` of :func:`decode_boxes` for a batch of images without a
    device sync or a per-call copy: the sizes (and uneven row counts) are cached device tables
    (``_device.cached_table``), expanded on the device; an even count (a padded batch) is a
    broadcast, so a CUDA graph can hold it. Treat the result as read-only.
    """
    if len(image_sizes) != len(rows_per_image):
        raise ValueError(f"image_sizes has {len(image_sizes)} entries but rows_per_image has {len(rows_per_image)}")
    values = tuple(v for i, s in enumerate(image_sizes) for v in _image_size(f"image_sizes[{i}]", s))
    sizes = cached_table(values, torch.float32, device).view(-1, 2)
    rows = [int(r) for r in rows_per_image]
    if len(set(rows)) <= 1:
        return sizes[:, None].expand(-1, rows[0] if rows else 0, 2).reshape(-1, 2)
    return sizes.repeat_interleave(cached_table(tuple(rows), torch.int64, device), dim=0, output_size=sum(rows))


def _check_clip_to(clip_to, n: int, device: torch.device):
    if clip_to is None:
        return None
    if isinstance(clip_to, Tensor):
        check_tensor("clip_to", clip_to, ndim=2, last_dim=2, dtypes=_NUMERIC)
        if clip_to.shape[0] != n:
            raise ValueError(f"clip_to must have one (h, w) row per box ({n}), got shape {tuple(clip_to.shape)}")
        if clip_to.device != device:
            raise ValueError(f"clip_to is on {clip_to.device} but rel_codes is on {device}")
        return clip_to
    return _image_size("clip_to", clip_to)


def decode_boxes(rel_codes: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0),
                 bbox_xform_clip: float = BBOX_XFORM_CLIP, *, clip_to=None, backend: str | None = None) -> Tensor:
    """Apply box deltas to reference boxes: ``BoxCoder(weights, bbox_xform_clip).decode_single``.

    Args:
        rel_codes: Tensor[N, 4K] deltas ``(dx, dy, dw, dh)``, K boxes (e.g. classes) per row.
        boxes: Tensor[N, 4] reference boxes ``(x1, y1, x2, y2)`` (anchors or proposals).
        weights: ``(wx, wy, ww, wh)`` dividing the deltas.
        bbox_xform_clip: upper clamp of ``dw, dh`` before ``exp`` (default ``log(1000 / 16)``).
        clip_to: optional clipping fused into the decode: ``(h, w)`` for every row, or a
            Tensor[N, 2] of per-row ``(h, w)`` (see :func:`per_row_image_sizes`); the result
            then equals ``clip_boxes_to_image`` applied to the decoded boxes of each row.
        backend: None, "auto", "triton" or "torch" (see ``fastmask.ops``).

    Returns Tensor[N, 4K] ``(x1, y1, x2, y2)`` per box in ``rel_codes``' dtype. The torch
    backend computes in that dtype like torchvision; the Triton kernel computes fp16/bf16 in
    fp32 and rounds once. Not differentiable (decoded boxes are never back-propagated through).
    """
    check_tensor("rel_codes", rel_codes, ndim=2)
    check_tensor("boxes", boxes, ndim=2, last_dim=4)
    if rel_codes.shape[1] % 4 != 0:
        raise ValueError(f"rel_codes must have shape [N, 4K], got {tuple(rel_codes.shape)}")
    if rel_codes.shape[0] != boxes.shape[0]:
        raise ValueError(f"rel_codes has {rel_codes.shape[0]} rows but boxes has {boxes.shape[0]}; they must match")
    check_same_device(rel_codes=rel_codes, boxes=boxes)
    check_finite("boxes", boxes)
    weights = _check_weights(weights)
    if not isinstance(bbox_xform_clip, (int, float)) or isinstance(bbox_xform_clip, bool):
        raise TypeError(f"bbox_xform_clip must be a float, got {type(bbox_xform_clip).__name__}")
    clip_to = _check_clip_to(clip_to, rel_codes.shape[0], rel_codes.device)
    name = resolve_backend(backend, rel_codes, "decode_boxes")
    clip_t = clip_to if isinstance(clip_to, Tensor) else None
    clip_hw = [float(v) for v in clip_to] if clip_to is not None and clip_t is None else None
    return torch.ops.fastmask.decode_boxes(rel_codes.detach(), boxes.detach(), list(weights), float(bbox_xform_clip),
                                           clip_t, clip_hw, name)


def _decode_boxes_fake(rel_codes, boxes, weights, bbox_xform_clip, clip_to, clip_size, backend):
    return torch.empty_like(rel_codes, memory_format=torch.contiguous_format)


@register("decode_boxes(Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip, Tensor? clip_to, "
          "float[]? clip_size, str backend) -> Tensor", _decode_boxes_fake)
def _decode_boxes_op(rel_codes: Tensor, boxes: Tensor, weights: Sequence[float], bbox_xform_clip: float,
                     clip_to: Tensor | None, clip_size: Sequence[float] | None, backend: str) -> Tensor:
    """Registered op behind :func:`decode_boxes`: ``clip_to`` a per-row Tensor or ``clip_size``
    one (h, w) (at most one given); the backend already resolved. Not autocast-aware."""
    clip = clip_to if clip_to is not None else (tuple(clip_size) if clip_size is not None else None)
    if backend == "triton":
        from fastmask.kernels.box_decode import decode_boxes as decode_boxes_kernel
        return decode_boxes_kernel(rel_codes, boxes, tuple(weights), bbox_xform_clip, clip_to=clip)
    return decode_boxes_ref(rel_codes, boxes, tuple(weights), bbox_xform_clip, clip).contiguous()


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights=(1.0, 1.0, 1.0, 1.0), *,
                 backend: str | None = None) -> Tensor:
    """Regression targets of ``reference_boxes`` w.r.t. ``proposals``: ``BoxCoder(weights).encode_single``.

    Args:
        reference_boxes: Tensor[N, 4] target boxes (matched ground truth).
        proposals: Tensor[N, 4] boxes they are encoded against (anchors or proposals).
        weights: ``(wx, wy, ww, wh)`` multiplying the targets.
        backend: accepted for a uniform API; every backend runs the torch code (see module docs).

    Returns Tensor[N, 4] ``(dx, dy, dw, dh)`` in ``reference_boxes``' dtype.
    """
    check_backend_name(backend)
    check_tensor("reference_boxes", reference_boxes, ndim=2, last_dim=4)
    check_tensor("proposals", proposals, ndim=2, last_dim=4)
    if reference_boxes.shape[0] != proposals.shape[0]:
        raise ValueError(f"reference_boxes has {reference_boxes.shape[0]} rows but proposals has "
                         f"{proposals.shape[0]}; they must match")
    check_same_device(reference_boxes=reference_boxes, proposals=proposals)
    return encode_boxes_ref(reference_boxes, proposals, _check_weights(weights))
