"""Mask paste: resize each [M, M] mask to its box and place it in the image.

Pixel model (torchvision's ``paste_masks_in_image``), for a mask of ``MH`` x ``MW`` values
(``MH = MW = M`` in Mask R-CNN) and a box ``(x1, y1, x2, y2)`` in image pixels:

1. The mask is padded by ``padding`` zeros on every side and the box is grown about its
   centre by the same factor ``scale = (MW + 2p) / MW`` (torchvision takes it from the width
   for both axes), computed in the boxes' dtype with torchvision's order of operations, then
   truncated towards zero to int64: ``(bx1, by1, bx2, by2)``.
2. The padded mask is resized to ``h = max(by2 - by1 + 1, 1)`` rows and
   ``w = max(bx2 - bx1 + 1, 1)`` columns by bilinear interpolation with
   ``align_corners=False``: row ``r`` samples padded row ``src = (MH + 2p) / h * (r + 0.5) - 0.5``
   (clamped at 0) between ``floor(src)`` and the next row (the last row repeats); columns alike.
3. Image pixel ``(y, x)`` takes the resized value at ``(y - by1, x - bx1)`` when
   ``by1 <= y <= by2`` and ``bx1 <= x <= bx2``, and 0 elsewhere: the window is the box
   clipped to the image. A box whose expanded integer box is wholly outside the image, or
   has ``bx2 < bx1``, pastes nothing (torchvision raises on boxes wholly outside the image).
   The expanded box is truncated towards zero, so an inverted float box may still paste a
   column: ``(0, 0, -0.5, 3)`` expands to ``bx1 = bx2 = 0`` (as in torchvision).

Bilinear resizing is separable, so the reference computes every mask at once as
``out[n] = Ry[n] @ mask[n] @ Cx[n]^T``, with ``Ry[n]``: [H, M] and ``Cx[n]``: [W, M] holding two
weights per row inside the window and zero rows elsewhere (the padding taps are dropped
rather than padding the masks). It reads the ``N * M * M`` mask values and writes
``N * H * W`` outputs, but also does ``2 * N * H * W * M`` multiply-adds and, with a
threshold, makes a float image before comparing. The Triton kernel writes every output
pixel once, straight to bool when a threshold is given; it interpolates only inside each box's
window and writes the rest of the image, most of it, as flat ranges of zeros in 16-byte
vectors: its floor is the write of ``N * H * W`` output elements. The torch backend (the CPU
path, ``_paste_rows``) does the reference's two matmuls over only the rows the boxes span and
copies them into the image (see it); ``paste_masks_ref`` stays the specification.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ._backend import resolve_backend
from ._checks import FLOAT_DTYPES, check_boxes, check_same_device, check_tensor, compute_dtype, pair
from ._library import register

# Output pixels the reference computes at once (chunks of masks are processed in turn):
# 2**25 fp32 values are 128 MiB, so the float image made before thresholding (and the fp32
# image of fp16/bf16 masks) stays a bounded extra on top of the result.
REF_CHUNK_PIXELS = 1 << 25
# Pixels of window rows the torch backend's full-image paste computes at once, in one buffer
# reused chunk after chunk (16 MiB of fp32).
ROWS_CHUNK_PIXELS = 1 << 22



class BoxMasks(NamedTuple):
    """Masks resized to their own boxes, without the full image (see ``paste_masks_in_boxes``).

    ``masks``: Tensor[N, Hmax, Wmax]; mask ``i`` occupies ``masks[i, :y1 - y0, :x1 - x0]`` and
    the rest of its slab holds what a pixel outside the box holds: 0 (or ``0 > threshold``).
    ``windows``: int64 Tensor[N, 4] ``(x0, y0, x1, y1)``, half-open, in image pixels: where mask
    ``i`` lies in the image, ``image[y0:y1, x0:x1] = masks[i, :y1 - y0, :x1 - x0]``.
    """

    masks: Tensor
    windows: Tensor


# --------------------------------------------------------------------------- helpers


def expand_boxes_int(boxes: Tensor, mask_width: int, padding: int) -> Tensor:
    """torchvision's ``expand_boxes(boxes, (M + 2p) / M).to(int64)``: int64 Tensor[N, 4].

    Computed in the boxes' dtype with torchvision's order of operations, so that the
    truncation to integers lands on the same pixel.
    """
    scale = float(mask_width + 2 * padding) / mask_width
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1).to(torch.int64)


def box_windows(int_boxes: Tensor, image_size: tuple[int, int] | None) -> Tensor:
    """The pixels each expanded box covers, int64 Tensor[N, 4] ``(x0, y0, x1, y1)``, half-open.

    With ``image_size`` the window is clipped to the image (empty, with ``x1 == x0`` or
    ``y1 == y0``, for a box wholly outside it); a box with ``x2 < x1`` gets an empty window.
    """
    lo, hi = int_boxes[:, :2], int_boxes[:, 2:] + 1
    if image_size is None:
        return torch.cat([lo, torch.maximum(hi, lo)], dim=1)
    limit = torch.tensor([image_size[1], image_size[0]], dtype=torch.int64, device=int_boxes.device)
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.minimum(torch.maximum(hi, lo), limit)
    return torch.cat([lo, hi], dim=1)


def _interp_matrix(box_lo: Tensor, box_hi: Tensor, origin: Tensor, length: int, win_lo: Tensor, win_hi: Tensor,
                   mask_len: int, padding: int, cdt: torch.dtype) -> Tensor:
    """Bilinear weights along one axis: Tensor[N, length, mask_len].

    Output position ``p`` is image coordinate ``t = origin + p``. When ``t`` is in the window
    ``[win_lo, win_hi)`` it samples the padded mask, resized to the box's extent
    ``max(box_hi - box_lo + 1, 1)``, at ``t - box_lo`` (torchvision's align_corners=False
    rule, in ``cdt``); its row of the matrix holds the two source weights, and the taps that
    fall on the zero padding are dropped. Rows outside the window are zero.
    """
    n, device = box_lo.shape[0], box_lo.device
    src_len = mask_len + 2 * padding
    t = origin[:, None] + torch.arange(length, device=device)
    inside = (t >= win_lo[:, None]) & (t < win_hi[:, None])
    size = (box_hi - box_lo + 1).clamp(min=1)
    scale = torch.tensor(float(src_len), dtype=cdt, device=device) / size.to(cdt)
    src = (scale[:, None] * ((t - box_lo[:, None]).to(cdt) + 0.5) - 0.5).clamp(min=0)
    src = torch.where(inside, src, 0.0)
    i0 = src.to(torch.int64)
    i1 = i0 + (i0 < src_len - 1).to(torch.int64)
    w1 = src - i0.to(cdt)
    w0 = 1.0 - w1
    # Taps outside the window or on the padding go to a spare column ``mask_len``, cut below.
    weights = torch.zeros(n, length, mask_len + 1, dtype=cdt, device=device)
    for i, w in ((i0, w0), (i1, w1)):
        j = i - padding
        ok = inside & (j >= 0) & (j < mask_len)
        weights.scatter_add_(2, torch.where(ok, j, mask_len)[..., None], torch.where(ok, w, 0.0)[..., None])
    return weights[..., :mask_len]


def _paste_windows_ref(masks: Tensor, int_boxes: Tensor, windows: Tensor, origins: Tensor, out_size: tuple[int, int],
                       padding: int, threshold: float | None) -> Tensor:
    """Paste ``masks`` [N, MH, MW] into per-mask canvases [N, out_h, out_w].

    Canvas ``n`` pixel ``(i, j)`` is image pixel ``(origins[n, 1] + i, origins[n, 0] + j)``;
    pixels outside ``windows[n]`` are 0. Returns the masks' dtype, or bool with a threshold.
    """
    n, mh, mw = masks.shape
    out_h, out_w = out_size
    cdt = compute_dtype(masks.dtype)
    out_dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.empty((n, out_h, out_w), dtype=out_dtype, device=masks.device)
    chunk = max(1, REF_CHUNK_PIXELS // max(1, out_h * out_w))
    for s in range(0, n, chunk):  # loop over memory-bounded chunks of masks, not over masks
        e = min(n, s + chunk)
        b, win, org = int_boxes[s:e], windows[s:e], origins[s:e]
        ry = _interp_matrix(b[:, 1], b[:, 3], org[:, 1], out_h, win[:, 1], win[:, 3], mh, padding, cdt)
        cx = _interp_matrix(b[:, 0], b[:, 2], org[:, 0], out_w, win[:, 0], win[:, 2], mw, padding, cdt)
        img = torch.bmm(torch.bmm(ry, masks[s:e].to(cdt)), cx.transpose(1, 2))
        out[s:e] = img > threshold if threshold is not None else img
    return out


def _paste_rows(masks: Tensor, int_boxes: Tensor, windows: Tensor, out_size: tuple[int, int], padding: int,
                threshold: float | None) -> Tensor:
    """The torch backend's full-image paste: the reference's two matmuls, over window rows only.

    Every mask gets ``R`` rows, the height of the tallest window, starting at image row
    ``s = min(y0, H - R)``: they stay inside the image (windows are clipped to it, so R <= H)
    and cover the mask's window. ``rows = (Ry @ mask) @ Cx^T`` is [R, W] per mask (``Ry`` with
    those rows' weights, zero outside the window; ``Cx`` over the image's W columns), and the
    image is the value of a pixel outside every box (0, or ``0 > threshold``) with each mask's
    rows copied in by ``index_copy_``. The reference's ``N * H * W * MW`` multiply-adds become
    ``N * R * W * MW`` (R is under half of H for boxes under ~40% of the image side), and the
    rows go through one buffer of ``ROWS_CHUNK_PIXELS``, reused chunk after chunk, so that no
    other memory of the output's size is made (a fresh allocation's first touch, page by page,
    costs about as much as writing it). Same values as ``paste_masks_ref`` up to the order of
    the matmuls' sums.
    """
    n, mh, mw = masks.shape
    h, w = out_size
    device = masks.device
    cdt = compute_dtype(masks.dtype)
    if threshold is None:
        out = torch.zeros((n, h, w), dtype=masks.dtype, device=device)
    else:
        out = torch.full((n, h, w), 0.0 > threshold, dtype=torch.bool, device=device)
    # Host read of one integer (the rows' count sets the work's shape): nothing to wait for on
    # the CPU; on a GPU the Triton kernel is the path without it.
    r = _slab_size(windows)[0]
    if r == 0:
        return out
    top = torch.minimum(windows[:, 1], torch.tensor(h - r, device=device))
    ry = _interp_matrix(int_boxes[:, 1], int_boxes[:, 3], top, r, windows[:, 1], windows[:, 3], mh, padding, cdt)
    ry_mask = torch.bmm(ry, masks.to(cdt))  # [N, R, MW]: small
    # Row (k, i) of the rows is image row top[k] + i of mask k: its row in ``out.view(N * H, W)``.
    index = (torch.arange(n, device=device)[:, None] * h + top[:, None] + torch.arange(r, device=device)).flatten()
    chunk = min(n, max(1, ROWS_CHUNK_PIXELS // (r * w)))
    rows = torch.empty((chunk, r, w), dtype=cdt, device=device)
    cast = None if out.dtype == cdt else torch.empty((chunk, r, w), dtype=out.dtype, device=device)
    columns = torch.zeros_like(top)
    for s in range(0, n, chunk):  # loop over memory-bounded chunks of masks, not over masks
        e = min(n, s + chunk)
        win, b = windows[s:e], int_boxes[s:e]
        cx = _interp_matrix(b[:, 0], b[:, 2], columns[s:e], w, win[:, 0], win[:, 2], mw, padding, cdt)
        done = torch.bmm(ry_mask[s:e], cx.transpose(1, 2), out=rows[:e - s])
        if cast is not None:
            done = torch.gt(done, threshold, out=cast[:e - s]) if threshold is not None else cast[:e - s].copy_(done)
        out.view(n * h, w).index_copy_(0, index[s * r:e * r], done.view(-1, w))
    return out


# --------------------------------------------------------------------------- reference


def paste_masks_ref(masks: Tensor, boxes: Tensor, image_size, padding: int = 1,
                    threshold: float | None = None) -> Tensor:
    """Pure-PyTorch mask paste: the readable specification (see the module docstring).

    ``masks``: Tensor[N, 1, MH, MW] or Tensor[N, MH, MW]; ``boxes``: Tensor[N, 4];
    ``image_size``: (H, W). Returns Tensor[N, 1, H, W] in the masks' dtype (computed in fp32,
    fp64 for fp64 masks), or bool ``pixel > threshold`` when a threshold is given.
    """
    m = masks[:, 0] if masks.dim() == 4 else masks
    h, w = image_size
    int_boxes = expand_boxes_int(boxes, m.shape[-1], padding)
    windows = box_windows(int_boxes, (h, w))
    origins = torch.zeros_like(windows[:, :2])
    return _paste_windows_ref(m, int_boxes, windows, origins, (h, w), padding, threshold)[:, None]


def paste_masks_in_boxes_ref(masks: Tensor, boxes: Tensor, padding: int = 1, threshold: float | None = None,
                             image_size=None) -> BoxMasks:
    """Pure-PyTorch box-local paste (see ``paste_masks_in_boxes``)."""
    m = masks[:, 0] if masks.dim() == 4 else masks
    int_boxes = expand_boxes_int(boxes, m.shape[-1], padding)
    windows = box_windows(int_boxes, image_size)
    out_h, out_w = _slab_size(windows)
    return BoxMasks(_paste_windows_ref(m, int_boxes, windows, windows[:, :2], (out_h, out_w), padding, threshold),
                    windows)


def _slab_size(windows: Tensor) -> tuple[int, int]:
    """(Hmax, Wmax) of the box-local slabs."""
    if windows.shape[0] == 0:
        return 0, 0
    # Host sync: the output's shape depends on the largest box (one read of two integers).
    wh = (windows[:, 2:] - windows[:, :2]).amax(dim=0).tolist()
    return int(wh[1]), int(wh[0])


# --------------------------------------------------------------------------- public ops


def _check_args(masks, boxes, padding, threshold) -> Tensor:
    """Validate the shared arguments; returns the masks as a [N, MH, MW] view."""
    check_tensor("masks", masks, dtypes=FLOAT_DTYPES)
    if masks.dim() == 4 and masks.shape[1] != 1:
        raise ValueError(f"masks must have shape [N, 1, M, M] or [N, M, M], got {tuple(masks.shape)}")
    if masks.dim() not in (3, 4):
        raise ValueError(f"masks must have shape [N, 1, M, M] or [N, M, M], got {tuple(masks.shape)}")
    if masks.shape[-1] == 0 or masks.shape[-2] == 0:
        raise ValueError(f"masks must have a non-empty [M, M] grid, got shape {tuple(masks.shape)}")
    check_boxes("boxes", boxes)
    check_same_device(masks=masks, boxes=boxes)
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"boxes has {boxes.shape[0]} rows but masks has {masks.shape[0]} masks; give one box per mask")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be None or a real number, got {type(threshold).__name__}")
        if threshold != threshold or abs(float(threshold)) == float("inf"):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
    return masks[:, 0] if masks.dim() == 4 else masks


def _image_size(value) -> tuple[int, int]:
    if isinstance(value, int) or not hasattr(value, "__len__"):
        raise ValueError(f"image_size must be a pair (H, W) of positive ints, got {value!r}")
    return pair("image_size", value)


def paste_masks(masks: Tensor, boxes: Tensor, image_size, padding: int = 1, threshold: float | None = None, *,
                backend: str | None = None) -> Tensor:
    """Paste each mask into its box in a full image: torchvision's ``paste_masks_in_image``.

    Args:
        masks: Tensor[N, 1, MH, MW] (or Tensor[N, MH, MW]), fp16/bf16/fp32/fp64, e.g. the
            mask head's probabilities; any strides.
        boxes: Tensor[N, 4] ``(x1, y1, x2, y2)`` in image pixels, finite, on the masks' device.
        image_size: ``(H, W)`` of the image, positive ints.
        padding: zero border added to each mask before resizing (the box grows to match).
        threshold: None for float masks; a number for bool masks ``pixel > threshold``, the
            pixel computed in fp32 (fp64 for fp64 masks) and never stored as float by the
            Triton backend. Pixels outside the box are 0, so they are ``0 > threshold``.
        backend: None, "auto", "triton" or "torch" (see ``fastmask.ops``).

    Limits: the reference takes any size (in chunks of ``REF_CHUNK_PIXELS``); the Triton
    kernel any number of masks, but fewer than 2**31 - 64 pixels per canvas (ValueError beyond).

    Returns Tensor[N, 1, H, W] in the masks' dtype (bool with a threshold). Without a
    threshold it equals torchvision's result within float rounding; a box wholly outside
    the image gives an all-zero mask (torchvision raises there). N = 0 gives [0, 1, H, W].
    Not differentiable through the Triton backend (this is post-processing).
    """
    m = _check_args(masks, boxes, padding, threshold)
    h, w = _image_size(image_size)
    name = resolve_backend(backend, masks, "paste_masks")
    return torch.ops.fastmask.paste_masks(m, boxes, [h, w], padding, None if threshold is None else float(threshold),
                                          name)[:, None]


def _paste_masks_fake(masks, boxes, image_size, padding, threshold, backend):
    dtype = torch.bool if threshold is not None else masks.dtype
    return masks.new_empty((masks.shape[0], image_size[0], image_size[1]), dtype=dtype)


@register("paste_masks(Tensor masks, Tensor boxes, int[] image_size, int padding, float? threshold, str backend) "
          "-> Tensor", _paste_masks_fake)
def _paste_masks_op(masks: Tensor, boxes: Tensor, image_size: Sequence[int], padding: int, threshold: float | None,
                    backend: str) -> Tensor:
    """Registered op behind :func:`paste_masks`: ``masks`` Tensor[N, MH, MW] -> Tensor[N, H, W];
    the backend already resolved. Not differentiable, not autocast-aware (masks' dtype)."""
    h, w = image_size
    if backend == "triton":
        from fastmask.kernels.mask_paste import paste_masks_fwd

        return paste_masks_fwd(masks, boxes, (h, w), padding=padding, threshold=threshold)
    int_boxes = expand_boxes_int(boxes, masks.shape[-1], padding)
    windows = box_windows(int_boxes, (h, w))
    return _paste_rows(masks, int_boxes, windows, (h, w), padding, threshold)


def paste_masks_in_boxes(masks: Tensor, boxes: Tensor, padding: int = 1, threshold: float | None = None,
                         image_size=None, *, backend: str | None = None) -> BoxMasks:
    """Resize each mask to its own box only, so that no full-image mask is ever made.

    Same pixel values as ``paste_masks`` (see it for the arguments), returned box-local as
    ``BoxMasks(masks, windows)``: ``masks`` is Tensor[N, Hmax, Wmax] (masks' dtype, or bool
    with a threshold) where mask ``i`` fills ``masks[i, :y1 - y0, :x1 - x0]`` (beyond it, the
    value of a pixel outside the box: 0, or ``0 > threshold``), and ``windows`` is int64
    Tensor[N, 4] ``(x0, y0, x1, y1)``, half-open, the pixels of the image the mask covers.
    With ``image_size=(H, W)`` the windows are clipped to the image, so
    ``paste_masks(...)[i, 0, y0:y1, x0:x1]`` equals the mask's slab; without it each window
    is the whole expanded box (its coordinates may be negative).

    Use it to RLE-encode or crop masks without writing ``N * H * W`` pixels. Reads the
    largest window size back to the host once (the output's shape depends on it).
    """
    m = _check_args(masks, boxes, padding, threshold)
    if image_size is not None:
        image_size = _image_size(image_size)
    if resolve_backend(backend, masks, "paste_masks_in_boxes") == "triton":
        from fastmask.kernels.mask_paste import paste_masks_fwd

        windows = box_windows(expand_boxes_int(boxes, m.shape[-1], padding), image_size)
        slab = _slab_size(windows)
        out = paste_masks_fwd(m, boxes, image_size, padding=padding, threshold=threshold, local_size=slab)
        return BoxMasks(out, windows)
    return paste_masks_in_boxes_ref(m, boxes, padding, threshold, image_size)
