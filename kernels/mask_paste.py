"""Triton mask paste: every mask of a batch in one launch, float or straight to bool.

The pixel model is torchvision's ``paste_masks_in_image`` (see ``fastmask/ops/masks.py``, whose
``paste_masks_ref`` is the specification). Each program writes one tile of one output mask:
tiles that miss the mask's box only store zeros, tiles that touch it interpolate the pixels
inside the box from the [MH, MW] mask (a few KiB, cached) and zero the rest. Nothing but the
output is written, once, so the floor is the write of ``N * out_h * out_w`` elements (one byte
each with a threshold).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import div_rn, gpu_launch, round_to_bf16

# Tile of one output mask per program. Columns are the contiguous axis of the output, so
# the tile is wide (coalesced stores) and short (tiles outside the box skip the gathers).
# The tile holds BLOCK_ELEMS outputs (8 rows) whatever the output dtype: the work per
# element (two gathers of 2 taps, the weights) is the same for fp32 and bool, and the sm_90
# compile of a 32-row bool tile with 4 warps needed all 255 registers plus a 456-byte stack
# (spills), while 8 rows need 112 registers. Untuned starting point:
# benchmarks/bench_mask_paste.py is the place to choose them on a GPU.
BLOCK_W = 256
BLOCK_ELEMS = 2048
NUM_WARPS = 4
# Triton's interpreter (CPU tensors) pays per operation per program, not per element: there
# a canvas is covered by as few tiles as these caps allow. The tiling never changes a value.
INTERPRETER_BLOCK_H = 64
INTERPRETER_BLOCK_W = 128
# Expanded box coordinates are clamped to +-2**29 before the conversion to int32, so that
# box sizes and window ends stay within int32; only boxes reaching that far (where the
# reference's int64 boxes keep their size) can differ.
MAX_COORD = tl.constexpr(float(1 << 29))


@triton.jit
def _round_to(x, BOX_DTYPE: tl.constexpr, CT: tl.constexpr):
    """Round ``x`` (in ``CT``) to the boxes' dtype and back: the store of a torch elementwise op.

    bf16 rounds to nearest even through ``round_to_bf16`` (the same in the interpreter and on
    the GPU).
    """
    if BOX_DTYPE == tl.bfloat16:
        return round_to_bf16(x)
    else:
        return x.to(BOX_DTYPE).to(CT)


@triton.jit
def _expand_coord(lo, hi, scale, BOX_DTYPE: tl.constexpr, CT: tl.constexpr):
    """torchvision's expand_boxes along one axis; ``lo``, ``hi``, ``scale`` are in ``CT``.

    Each op is computed in ``CT`` (fp32, or fp64 for fp64 boxes: torch's compute type for
    the boxes' dtype) and rounded to the boxes' dtype, exactly as torch's elementwise ops do.
    Returns the expanded (lo, hi) truncated towards zero to int32, as ``.to(int64)`` does.
    """
    if BOX_DTYPE == CT:  # fp32 / fp64 boxes: every op is already in the boxes' dtype
        half = (hi - lo) * 0.5 * scale
        centre = (hi + lo) * 0.5
        e_lo = centre - half
        e_hi = centre + half
    else:
        half = _round_to(hi - lo, BOX_DTYPE, CT)
        half = _round_to(half * 0.5, BOX_DTYPE, CT)
        half = _round_to(half * scale, BOX_DTYPE, CT)
        centre = _round_to(hi + lo, BOX_DTYPE, CT)
        centre = _round_to(centre * 0.5, BOX_DTYPE, CT)
        e_lo = _round_to(centre - half, BOX_DTYPE, CT)
        e_hi = _round_to(centre + half, BOX_DTYPE, CT)
    e_lo = tl.minimum(tl.maximum(e_lo, -MAX_COORD), MAX_COORD)
    e_hi = tl.minimum(tl.maximum(e_hi, -MAX_COORD), MAX_COORD)
    return e_lo.to(tl.int32), e_hi.to(tl.int32)


@triton.jit
def _axis_taps(coord, box_lo, box_size, src_len, valid, padding, mask_len, CT: tl.constexpr):
    """Bilinear taps along one axis for image coordinates ``coord`` (torchvision's align_corners=False).

    Returns the two source indices into the unpadded mask, whether each lies on the mask
    (not on the zero padding) and their weights, in ``CT`` (the masks' compute dtype).
    """
    step = div_rn(src_len.to(CT), box_size.to(CT))
    src = step * ((coord - box_lo).to(CT) + 0.5) - 0.5
    src = tl.where(valid, tl.maximum(src, 0.0), 0.0)
    i0 = src.to(tl.int32)
    i1 = i0 + (i0 < src_len - 1).to(tl.int32)
    w1 = src - i0.to(CT)
    w0 = 1.0 - w1
    j0 = i0 - padding
    j1 = i1 - padding
    on0 = valid & (j0 >= 0) & (j0 < mask_len)
    on1 = valid & (j1 >= 0) & (j1 < mask_len)
    return j0, j1, on0, on1, w0, w1


# Sizes and the padding are not specialised (a size of 1 would otherwise become a constant):
# new image sizes, slab sizes or batch sizes reuse the compiled kernel.
@triton.jit(do_not_specialize=["mask_h", "mask_w", "im_h", "im_w", "out_h", "out_w", "padding", "threshold"])
def _paste_masks_kernel(
    masks_ptr, boxes_ptr, out_ptr,
    mask_h, mask_w, stride_mn, stride_mh, stride_mw, stride_bn, stride_bc,
    im_h, im_w, out_h, out_w, padding, threshold,
    CLIP: tl.constexpr, LOCAL: tl.constexpr, THRESHOLD: tl.constexpr, BOX_CT: tl.constexpr, CT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Paste mask ``n`` into its canvas, one tile of BLOCK_H x BLOCK_W pixels per program.

    masks_ptr: [N, MH, MW] float masks, any strides (``stride_m*``).
    boxes_ptr: [N, 4] boxes ``(x1, y1, x2, y2)`` in image pixels, any float dtype (``stride_b*``).
    out_ptr: [N, out_h, out_w] contiguous canvases: the masks' dtype, or uint8 (0/1, the
        bytes of a bool tensor) when THRESHOLD. Canvas pixel (i, j) is image pixel
        (i, j) or, when LOCAL, (i + y0, j + x0) with (x0, y0) the corner of the box's window.
    The window is the expanded box, clipped to the ``im_h`` x ``im_w`` image when CLIP.
    BOX_CT: the type torch computes the boxes' elementwise ops in (fp64 for fp64 boxes, else fp32);
    CT: the type the interpolation is computed in (fp64 for fp64 masks, else fp32).
    """
    n = tl.program_id(0)
    tile_h = tl.program_id(1)
    tile_w = tl.program_id(2)

    # Expanded integer box, computed here from the float box (no extra launches, no [N, 4]
    # int64 tensor written and read back), reproducing torch's elementwise results exactly.
    # The scale is the Python float (M + 2p) / M, which torch rounds to its compute type.
    scale = ((mask_w + 2 * padding).to(tl.float64) / mask_w.to(tl.float64)).to(BOX_CT)
    b = boxes_ptr + n.to(tl.int64) * stride_bn
    x1 = tl.load(b).to(BOX_CT)
    y1 = tl.load(b + stride_bc).to(BOX_CT)
    x2 = tl.load(b + 2 * stride_bc).to(BOX_CT)
    y2 = tl.load(b + 3 * stride_bc).to(BOX_CT)
    bx1, bx2 = _expand_coord(x1, x2, scale, boxes_ptr.dtype.element_ty, BOX_CT)
    by1, by2 = _expand_coord(y1, y2, scale, boxes_ptr.dtype.element_ty, BOX_CT)

    # The window of pixels the box covers, [wy0, wy1) x [wx0, wx1) in image coordinates, and
    # the image coordinate of the canvas origin.
    if CLIP:
        wx0 = tl.minimum(tl.maximum(bx1, 0), im_w)
        wy0 = tl.minimum(tl.maximum(by1, 0), im_h)
        wx1 = tl.minimum(tl.maximum(bx2 + 1, wx0), im_w)
        wy1 = tl.minimum(tl.maximum(by2 + 1, wy0), im_h)
    else:
        wx0 = bx1
        wy0 = by1
        wx1 = tl.maximum(bx2 + 1, bx1)
        wy1 = tl.maximum(by2 + 1, by1)
    if LOCAL:
        ox = wx0
        oy = wy0
    else:
        ox = 0
        oy = 0

    rows = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)
    dst = out_ptr + n.to(tl.int64) * out_h * out_w + rows[:, None] * out_w + cols[None, :]
    in_canvas = (rows < out_h)[:, None] & (cols < out_w)[None, :]
    ty0 = tile_h * BLOCK_H + oy
    tx0 = tile_w * BLOCK_W + ox
    touches_box = (ty0 < wy1) & (ty0 + BLOCK_H > wy0) & (tx0 < wx1) & (tx0 + BLOCK_W > wx0)
    if touches_box:
        # Tile touching the box: 4 gathers per pixel from the small mask (L1/L2 resident),
        # combined in CT in torchvision's order; pixels outside the window get 0.
        ys = rows + oy
        xs = cols + ox
        row_in = (ys >= wy0) & (ys < wy1)
        col_in = (xs >= wx0) & (xs < wx1)
        box_h = tl.maximum(by2 - by1 + 1, 1)
        box_w = tl.maximum(bx2 - bx1 + 1, 1)
        ry0, ry1, vy0, vy1, ly0, ly1 = _axis_taps(ys, by1, box_h, mask_h + 2 * padding, row_in, padding, mask_h, CT)
        cx0, cx1, vx0, vx1, lx0, lx1 = _axis_taps(xs, bx1, box_w, mask_w + 2 * padding, col_in, padding, mask_w, CT)
        m = masks_ptr + n.to(tl.int64) * stride_mn
        oy0 = (ry0 * stride_mh)[:, None]
        oy1 = (ry1 * stride_mh)[:, None]
        ox0 = (cx0 * stride_mw)[None, :]
        ox1 = (cx1 * stride_mw)[None, :]
        v00 = tl.load(m + oy0 + ox0, mask=vy0[:, None] & vx0[None, :], other=0.0).to(CT)
        v01 = tl.load(m + oy0 + ox1, mask=vy0[:, None] & vx1[None, :], other=0.0).to(CT)
        v10 = tl.load(m + oy1 + ox0, mask=vy1[:, None] & vx0[None, :], other=0.0).to(CT)
        v11 = tl.load(m + oy1 + ox1, mask=vy1[:, None] & vx1[None, :], other=0.0).to(CT)
        lx0 = lx0[None, :]
        lx1 = lx1[None, :]
        val = ly0[:, None] * (lx0 * v00 + lx1 * v01) + ly1[:, None] * (lx0 * v10 + lx1 * v11)
        val = tl.where(row_in[:, None] & col_in[None, :], val, 0.0)
        if THRESHOLD:
            tl.store(dst, (val > threshold).to(tl.uint8), mask=in_canvas)
        else:
            tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=in_canvas)
    else:
        # Tile wholly outside the box: only the write of zeros (the bulk of a full image),
        # no box arithmetic per pixel and no reads.
        zero = tl.zeros([BLOCK_H, BLOCK_W], dtype=CT)
        if THRESHOLD:
            tl.store(dst, (zero > threshold).to(tl.uint8), mask=in_canvas)
        else:
            tl.store(dst, zero.to(out_ptr.dtype.element_ty), mask=in_canvas)


def paste_masks_fwd(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int] | None, *,
                    padding: int = 1, threshold: float | None = None,
                    local_size: tuple[int, int] | None = None, out: torch.Tensor | None = None,
                    block_h: int | None = None, block_w: int | None = None,
                    num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Launch the paste over all N masks at once.

    masks: [N, MH, MW] any float dtype (fp64 computed in fp64, the others in fp32), any
        strides; boxes: [N, 4] float, any strides.
    image_size: (H, W), or None for box-local canvases that are not clipped to an image.
    local_size: None for full-image canvases [N, H, W]; (Hmax, Wmax) for box-local ones whose
        origin is each box's window corner.
    out: optional contiguous [N, out_h, out_w] output to write into (tests pass one filled
        with NaN or a sentinel byte to prove every element is written); allocated otherwise.
    block_h, block_w: the tile (powers of two); None picks BLOCK_ELEMS outputs per tile,
        BLOCK_W wide, on the GPU and one tile per canvas (up to the INTERPRETER_BLOCK_* caps)
        in the interpreter.
    Returns ``out``: the masks' dtype, or bool (``value > threshold``) with a threshold.
    Limits: one canvas under 2**31 pixels (its offsets are int32; the mask's and the
    canvas's own offsets are int64, so N masks may hold any number of pixels in all), and on
    the GPU at most 65535 tiles per canvas axis (524,280 rows, 16.7M columns); beyond,
    ValueError.
    """
    n, mask_h, mask_w = masks.shape
    out_h, out_w = image_size if local_size is None else local_size
    im_h, im_w = image_size if image_size is not None else (0, 0)
    if out_h * out_w >= 2**31:
        raise ValueError(f"paste_masks: canvases of {out_h} x {out_w} pixels; the Triton kernel takes fewer than "
                         "2**31 pixels per canvas (use backend='torch')")
    out_dtype = masks.dtype if threshold is None else torch.bool
    if out is None:
        out = torch.empty((n, out_h, out_w), dtype=out_dtype, device=masks.device)
    if out.shape != (n, out_h, out_w) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {(n, out_h, out_w)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if n == 0 or out_h == 0 or out_w == 0:
        return out
    on_cpu = not gpu_launch(masks.device)
    if block_w is None:
        block_w = min(triton.next_power_of_2(out_w), INTERPRETER_BLOCK_W) if on_cpu else BLOCK_W
    if block_h is None:
        block_h = (min(triton.next_power_of_2(out_h), INTERPRETER_BLOCK_H) if on_cpu
                   else max(1, BLOCK_ELEMS // block_w))
    # One program per (mask, tile of block_h rows x block_w columns of its canvas). The mask
    # count only sets the grid, so a new batch size does not recompile.
    grid = (n, triton.cdiv(out_h, block_h), triton.cdiv(out_w, block_w))
    if not on_cpu and max(grid[1:]) > 65535:  # CUDA's limit on the grid's second and third axes
        raise ValueError(f"paste_masks: canvases of {out_h} x {out_w} pixels need {grid[1]} x {grid[2]} tiles; "
                         "the GPU takes at most 65535 per axis")
    _paste_masks_kernel[grid](
        masks_ptr=masks, boxes_ptr=boxes, out_ptr=out.view(torch.uint8) if threshold is not None else out,
        mask_h=mask_h, mask_w=mask_w,
        stride_mn=masks.stride(0), stride_mh=masks.stride(1), stride_mw=masks.stride(2),
        stride_bn=boxes.stride(0), stride_bc=boxes.stride(1),
        im_h=im_h, im_w=im_w, out_h=out_h, out_w=out_w, padding=padding,
        threshold=0.0 if threshold is None else float(threshold),
        CLIP=image_size is not None, LOCAL=local_size is not None, THRESHOLD=threshold is not None,
        BOX_CT=tl.float64 if boxes.dtype == torch.float64 else tl.float32,
        CT=tl.float64 if masks.dtype == torch.float64 else tl.float32, BLOCK_H=block_h, BLOCK_W=block_w,
        num_warps=num_warps,
        # Separate multiplies and adds, as torch's elementwise ops do: a fused multiply-add
        # in the box expansion could move a truncated box edge by a pixel.
        enable_fp_fusion=False,
    )
    return out
