"""Triton mask paste: every mask of a batch in one launch, float or straight to bool.

The pixel model is torchvision's ``paste_masks_in_image`` (see ``fastmask/ops/masks.py``, whose
``paste_masks_ref`` is the specification). A few programs share each output mask (its canvas).
Only the pixels of the box's window interpolate, from the [MH, MW] mask (a few KiB, cached), in
small 2-D tiles; the rest of the canvas, most of a full image, is zeros: as the canvas is one
contiguous range of the output, the zeros are the flat range before the window, one range
between each two window rows and the range after it, stored in aligned 16-byte vectors whatever
the canvas width. Nothing but the output is written, once, so the floor is the write of
``N * out_h * out_w`` elements (one byte each with a threshold).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import div_rn, gpu_launch, round_to_bf16

# Box tiles: the pixels inside the box's window, the only ones that interpolate, are covered
# by tiles of BLOCK_H x BLOCK_W (4 pixels per thread with 4 warps), near-square so that boxes
# of a few dozen pixels waste few lanes. Each pixel keeps 4 gathers and their weights live, so
# the registers grow with the pixels per thread (the figures: benchmarks/NOTES.md, mask paste).
# Untuned starting point: benchmarks/bench_mask_paste.py is the place to choose them on a GPU.
BLOCK_H = 16
BLOCK_W = 32
NUM_WARPS = 4
# Everything else of a canvas holds the outside value (0, or ``0 > threshold``) and is written
# as flat ranges of the contiguous output, each thread storing VECTOR_BYTES contiguous, aligned
# bytes at a time (one 128-bit store: 16 bools or 4 fp32 where a scalar store wrote one),
# FLAT_VECTORS of them per loop step.
VECTOR_BYTES = 16
FLAT_VECTORS = 2
# Programs per canvas: one per PROGRAM_PIXELS pixels (32 KiB of bool, 128 KiB of fp32), each
# taking every parts-th step of its canvas's loops. 100 masks at 800 x 1333 are 3,300 programs
# (one program per 8 x 256 tile launched 60,000). Untuned, as the tiles.
PROGRAM_PIXELS = 1 << 15
MAX_PARTS = 65535  # CUDA's limit on the grid's second axis; the loops take any canvas size
# Triton's interpreter (CPU tensors) pays per operation per program, not per element: there
# one program covers a canvas, with tiles and steps as large as these caps allow (and every
# gap of a step's rows in one store). The tiling never changes a value.
INTERPRETER_BLOCK_H = 64
INTERPRETER_BLOCK_W = 128
# Offsets within a canvas are int32, and the flat stores' offsets reach 30 elements past its
# end (the shift back to a 16-byte boundary, then one vector of masked lanes).
MAX_CANVAS_PIXELS = 2**31 - 64
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


@triton.jit
def _fill_ranges(ptr, lo, hi, fill, step0, steps, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """Store ``fill`` at ``ptr[lo[i]:hi[i]]`` for every i: R flat ranges (int32 offsets, lo <= hi).

    With ``ptr`` 16-byte aligned, the VEC-aligned body of each range goes in steps of BLOCK
    elements, every store covering whole aligned vectors (the mask is constant over each,
    both body ends being multiples of VEC): the compiler emits 16-byte stores. This program
    takes steps ``step0, step0 + steps, ...``. The unaligned ends, under VEC elements each,
    are one short masked store by the program taking step 0.
    """
    body_lo = tl.multiple_of((lo + VEC - 1) // VEC * VEC, VEC)
    body_hi = tl.multiple_of(hi // VEC * VEC, VEC)
    j = tl.arange(0, BLOCK)[None, :]
    for k in range(step0, tl.cdiv(tl.max(body_hi - body_lo, axis=0), BLOCK), steps):
        offs = (body_lo + k * BLOCK)[:, None] + j
        tl.store(ptr + offs, fill, mask=offs < body_hi[:, None])
    if step0 == 0:
        e = tl.arange(0, 2 * VEC)[None, :]
        offs = tl.where(e < VEC, body_lo[:, None] - VEC + e, body_hi[:, None] - VEC + e)
        tl.store(ptr + offs, fill, mask=(offs >= lo[:, None]) & (offs < hi[:, None]))


# Sizes and the padding are not specialised (a size of 1 would otherwise become a constant):
# new image sizes, slab sizes or batch sizes reuse the compiled kernel.
@triton.jit(do_not_specialize=["mask_h", "mask_w", "im_h", "im_w", "out_h", "out_w", "padding", "threshold"])
def _paste_masks_kernel(
    masks_ptr, boxes_ptr, out_ptr,
    mask_h, mask_w, stride_mn, stride_mh, stride_mw, stride_bn, stride_bc,
    im_h, im_w, out_h, out_w, padding, threshold,
    CLIP: tl.constexpr, LOCAL: tl.constexpr, THRESHOLD: tl.constexpr, BOX_CT: tl.constexpr, CT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, VEC: tl.constexpr, FLAT_BLOCK: tl.constexpr,
    GAP_ROWS: tl.constexpr,
):
    """Paste mask ``n`` into its canvas; program ``part`` of the canvas's ``parts`` does every
    ``parts``-th step of each of its loops.

    masks_ptr: [N, MH, MW] float masks, any strides (``stride_m*``).
    boxes_ptr: [N, 4] boxes ``(x1, y1, x2, y2)`` in image pixels, any float dtype (``stride_b*``).
    out_ptr: [N, out_h, out_w] contiguous canvases: the masks' dtype, or uint8 (0/1, the
        bytes of a bool tensor) when THRESHOLD. Canvas pixel (i, j) is image pixel
        (i, j) or, when LOCAL, (i + y0, j + x0) with (x0, y0) the corner of the box's window.
    The window is the expanded box, clipped to the ``im_h`` x ``im_w`` image when CLIP.
    BOX_CT: the type torch computes the boxes' elementwise ops in (fp64 for fp64 boxes, else fp32);
    CT: the type the interpolation is computed in (fp64 for fp64 masks, else fp32).
    VEC: the elements of one 16-byte vector of the output; FLAT_BLOCK: elements per store of
    zeros, over the two ranges around the window or over GAP_ROWS gaps.
    """
    n = tl.program_id(0)
    part = tl.program_id(1)
    parts = tl.num_programs(1)

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
    # The window in canvas pixels, [r0, r1) x [c0, c1) (r0, c0 >= 0: the image's or the slab's
    # corner), cut to the canvas.
    r0 = wy0 - oy
    c0 = wx0 - ox
    r1 = tl.minimum(wy1 - oy, out_h)
    c1 = tl.minimum(wx1 - ox, out_w)
    empty = (r1 <= r0) | (c1 <= c0)

    # The zeros: a canvas is one flat range of the output, so what lies outside the window is
    # the range before its first row's pixels, one range from each window row's end to the next
    # row's start (the gaps), and the range after its last row's pixels (the whole canvas for
    # an empty window). Offsets are taken from the canvas start moved back to a 16-byte
    # boundary, so that they say which vectors are aligned (an output that does not start on
    # one, a view, compiles to scalar stores: the JIT specialises on the pointer's alignment).
    if THRESHOLD:
        fill = (tl.full([], 0.0, tl.float32) > threshold).to(tl.uint8)  # a pixel outside the box
    else:
        fill = tl.full([], 0, out_ptr.dtype.element_ty)
    hw = out_h * out_w
    base = n.to(tl.int64) * hw
    shift = (base % VEC).to(tl.int32)
    flat_ptr = out_ptr + tl.multiple_of(base - shift, VEC)
    # Before and after the window: one pair of ranges whose steps are spread over the programs.
    ends = tl.arange(0, 2)
    end_lo = shift + tl.where(ends == 0, 0, tl.where(empty, hw, (r1 - 1) * out_w + c1))
    end_hi = shift + tl.where(ends == 0, tl.where(empty, hw, r0 * out_w + c0), hw)
    _fill_ranges(flat_ptr, end_lo, end_hi, fill, part, parts, VEC, FLAT_BLOCK // 2)
    # The gaps, equally long, GAP_ROWS window rows per step; none for a window as wide as the canvas.
    gap_len = out_w - (c1 - c0)
    gap_rows = tl.where(empty | (gap_len == 0), 0, r1 - 1 - r0)
    for g in range(part, tl.cdiv(gap_rows, GAP_ROWS), parts):
        gap = tl.minimum(g * GAP_ROWS + tl.arange(0, GAP_ROWS), gap_rows)  # gap i follows window row r0 + i
        gap_lo = shift + (r0 + gap) * out_w + c1
        gap_hi = tl.where(gap < gap_rows, gap_lo + gap_len, gap_lo)
        _fill_ranges(flat_ptr, gap_lo, gap_hi, fill, 0, 1, VEC, FLAT_BLOCK // GAP_ROWS)

    # The window: 4 gathers per pixel from the small mask (L1/L2 resident), combined in CT in
    # torchvision's order.
    tiles_w = tl.cdiv(c1 - c0, BLOCK_W)
    tiles = tl.where(empty, 0, tl.cdiv(r1 - r0, BLOCK_H) * tiles_w)
    box_h = tl.maximum(by2 - by1 + 1, 1)
    box_w = tl.maximum(bx2 - bx1 + 1, 1)
    m = masks_ptr + n.to(tl.int64) * stride_mn
    canvas_ptr = out_ptr + base
    for t in range(part, tiles, parts):
        rows = r0 + (t // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = c0 + (t % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        row_in = rows < r1
        col_in = cols < c1
        ry0, ry1, vy0, vy1, ly0, ly1 = _axis_taps(rows + oy, by1, box_h, mask_h + 2 * padding, row_in, padding,
                                                  mask_h, CT)
        cx0, cx1, vx0, vx1, lx0, lx1 = _axis_taps(cols + ox, bx1, box_w, mask_w + 2 * padding, col_in, padding,
                                                  mask_w, CT)
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
        dst = canvas_ptr + rows[:, None] * out_w + cols[None, :]
        inside = row_in[:, None] & col_in[None, :]
        if THRESHOLD:
            tl.store(dst, (val > threshold).to(tl.uint8), mask=inside)
        else:
            tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=inside)


def paste_masks_fwd(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int] | None, *,
                    padding: int = 1, threshold: float | None = None,
                    local_size: tuple[int, int] | None = None, out: torch.Tensor | None = None,
                    block_h: int | None = None, block_w: int | None = None, flat_block: int | None = None,
                    gap_rows: int | None = None, parts: int | None = None, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Launch the paste over all N masks at once.

    masks: [N, MH, MW] any float dtype (fp64 computed in fp64, the others in fp32), any
        strides; boxes: [N, 4] float, any strides.
    image_size: (H, W), or None for box-local canvases that are not clipped to an image.
    local_size: None for full-image canvases [N, H, W]; (Hmax, Wmax) for box-local ones whose
        origin is each box's window corner.
    out: optional contiguous [N, out_h, out_w] output to write into (tests pass one filled
        with NaN or a sentinel byte to prove every element is written); allocated otherwise.
    block_h, block_w: the box tile; flat_block: elements per store of zeros; gap_rows: window
        rows whose gaps are stored at once; parts: programs per canvas (all powers of two but
        parts, flat_block at least 2 * gap_rows). None picks the GPU's (BLOCK_H x BLOCK_W,
        FLAT_VECTORS vectors per thread, a warp's vectors per gap row, one program per
        PROGRAM_PIXELS) or, in the interpreter, one program per canvas with the largest steps.
    Returns ``out``: the masks' dtype, or bool (``value > threshold``) with a threshold.
    Limits: one canvas under MAX_CANVAS_PIXELS = 2**31 - 64 pixels (its offsets are int32; the
    mask's and the canvas's own offsets are int64, so N masks may hold any number of pixels in
    all); beyond, ValueError.
    """
    n, mask_h, mask_w = masks.shape
    out_h, out_w = image_size if local_size is None else local_size
    im_h, im_w = image_size if image_size is not None else (0, 0)
    if out_h * out_w >= MAX_CANVAS_PIXELS:
        raise ValueError(f"paste_masks: canvases of {out_h} x {out_w} pixels; the Triton kernel takes fewer than "
                         "2**31 - 64 pixels per canvas (use backend='torch')")
    out_dtype = masks.dtype if threshold is None else torch.bool
    if out is None:
        out = torch.empty((n, out_h, out_w), dtype=out_dtype, device=masks.device)
    if out.shape != (n, out_h, out_w) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {(n, out_h, out_w)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if n == 0 or out_h == 0 or out_w == 0:
        return out
    on_cpu = not gpu_launch(masks.device)
    vec = VECTOR_BYTES // out.element_size()
    if on_cpu:
        block_h = block_h or min(triton.next_power_of_2(out_h), INTERPRETER_BLOCK_H)
        block_w = block_w or min(triton.next_power_of_2(out_w), INTERPRETER_BLOCK_W)
        gap_rows = gap_rows or min(triton.next_power_of_2(out_h), INTERPRETER_BLOCK_H)
        flat_block = flat_block or gap_rows * max(triton.next_power_of_2(out_w), vec)  # a gap in one step
        parts = parts or 1
    else:
        block_h, block_w = block_h or BLOCK_H, block_w or BLOCK_W
        gap_rows = gap_rows or 2 * num_warps
        flat_block = flat_block or vec * 32 * num_warps * FLAT_VECTORS
        parts = parts or min(triton.cdiv(out_h * out_w, PROGRAM_PIXELS), MAX_PARTS)
    if flat_block < 2 * gap_rows:
        raise ValueError(f"flat_block ({flat_block}) must hold at least two elements per gap row ({gap_rows})")
    # One program per (mask, part of its canvas). The mask count only sets the grid, so a new
    # batch size does not recompile.
    _paste_masks_kernel[(n, parts)](
        masks_ptr=masks, boxes_ptr=boxes, out_ptr=out.view(torch.uint8) if threshold is not None else out,
        mask_h=mask_h, mask_w=mask_w,
        stride_mn=masks.stride(0), stride_mh=masks.stride(1), stride_mw=masks.stride(2),
        stride_bn=boxes.stride(0), stride_bc=boxes.stride(1),
        im_h=im_h, im_w=im_w, out_h=out_h, out_w=out_w, padding=padding,
        threshold=0.0 if threshold is None else float(threshold),
        CLIP=image_size is not None, LOCAL=local_size is not None, THRESHOLD=threshold is not None,
        BOX_CT=tl.float64 if boxes.dtype == torch.float64 else tl.float32,
        CT=tl.float64 if masks.dtype == torch.float64 else tl.float32, BLOCK_H=block_h, BLOCK_W=block_w,
        VEC=vec, FLAT_BLOCK=flat_block, GAP_ROWS=gap_rows,
        num_warps=num_warps,
        # Separate multiplies and adds, as torch's elementwise ops do: a fused multiply-add
        # in the box expansion could move a truncated box edge by a pixel.
        enable_fp_fusion=False,
    )
    return out
