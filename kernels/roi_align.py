"""Triton kernels for multi-level RoI Align: forward, backward with atomics, deterministic backward.

One launch covers every FPN level. Each level arrives as its own pointer with its own height,
width and strides (at most ``MAX_LEVELS``); the kernel computes each RoI's level with
torchvision's level mapper and selects that level's pointer and sizes, so no per-level
masking, sorting or launching happens on the host. Single-level RoI Align is the same kernel
with ``NUM_LEVELS=1``. The semantics (sample positions, bilinear taps, adaptive grid) are those
of ``fastmask.ops.roi_align.roi_align_ref``, which is the specification.

Work is organised in "columns": a column is one (RoI, output bin) pair and a program handles
BLOCK_R RoIs x BLOCK_P bins x BLOCK_C channels. Everything about a RoI (level, box, sample
grid) is computed per column, so a block may mix RoIs of different levels and sizes. On the
GPU a program takes one RoI (BLOCK_R = 1), and the adaptive sample grid is that RoI's own
loop bound; through the interpreter, where every operation of every program costs the same
fixed overhead, a program takes many RoIs.

Layouts: features may have any strides (NCHW, channels-last, permuted) and are read in place.
A program's (column, channel) tile has channels along the fastest axis for channels-last
inputs (contiguous channel vectors) and columns along it for NCHW inputs (neighbouring bins
read neighbouring columns of one channel plane).

Integer arguments that change with the image size (heights, widths, strides) or the number of
RoIs are not specialised, so a new batch does not recompile; strides are passed divided by
``STRIDE_ALIGN`` (the largest power of two, at most 16, dividing them) so that the compiler
still knows their alignment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import gpu_launch

MAX_LEVELS = 5
# Largest power of two the launchers factor out of the feature strides: 16 elements is a
# 64-byte fp32 or 32-byte fp16 vector, more than the widest vector load.
MAX_STRIDE_ALIGN = 16

_LEVEL_INTS = [f"{name}{i}" for i in range(MAX_LEVELS)
               for name in ("height", "width", "stride_n", "stride_c", "stride_h", "stride_w")]
_FWD_NO_SPEC = _LEVEL_INTS + ["K", "N", "k_min", "k_max"]
_BWD_NO_SPEC = _FWD_NO_SPEC + [f"grad_offset{i}" for i in range(MAX_LEVELS)]
_DET_NO_SPEC = _BWD_NO_SPEC + [f"tile_start{i}" for i in range(MAX_LEVELS)]


# --------------------------------------------------------------------------- shared device code


@triton.jit
def _pick(lvl, v0, v1, v2, v3, v4, NUM_LEVELS: tl.constexpr):
    """The value of level ``lvl`` among v0..v4 (only the first NUM_LEVELS are real)."""
    v = v0
    if NUM_LEVELS > 1:
        v = tl.where(lvl == 1, v1, v)
    if NUM_LEVELS > 2:
        v = tl.where(lvl == 2, v2, v)
    if NUM_LEVELS > 3:
        v = tl.where(lvl == 3, v3, v)
    if NUM_LEVELS > 4:
        v = tl.where(lvl == 4, v4, v)
    return v


@triton.jit
def _level_geometry(
    lvl, base0, base1, base2, base3, base4, scale0, scale1, scale2, scale3, scale4,
    height0, width0, stride_n0, stride_c0, stride_h0, stride_w0,
    height1, width1, stride_n1, stride_c1, stride_h1, stride_w1,
    height2, width2, stride_n2, stride_c2, stride_h2, stride_w2,
    height3, width3, stride_n3, stride_c3, stride_h3, stride_w3,
    height4, width4, stride_n4, stride_c4, stride_h4, stride_w4,
    NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr,
):
    """Level ``lvl``'s geometry, chosen by select among the kernel's per-level arguments.

    ``lvl``: a level index, scalar or per column; base0..base4: each level's base (a pointer
    or an element offset into a flat buffer); only the first NUM_LEVELS levels are real.
    Returns (base, scale, height, width, s_n, s_c, s_h, s_w), strides in elements (the
    arguments times STRIDE_ALIGN); s_c is 1 when C_CONTIG (the channel strides are not passed).
    Written out inline rather than through ``_pick``: in the interpreter every call of a
    ``@triton.jit`` function costs about half a millisecond per program.
    """
    base, scale, height, width = base0, scale0, height0, width0
    s_n, s_c, s_h, s_w = stride_n0, stride_c0, stride_h0, stride_w0
    if NUM_LEVELS > 1:
        sel = lvl == 1
        base = tl.where(sel, base1, base)
        scale = tl.where(sel, scale1, scale)
        height = tl.where(sel, height1, height)
        width = tl.where(sel, width1, width)
        s_n = tl.where(sel, stride_n1, s_n)
        s_c = tl.where(sel, stride_c1, s_c)
        s_h = tl.where(sel, stride_h1, s_h)
        s_w = tl.where(sel, stride_w1, s_w)
    if NUM_LEVELS > 2:
        sel = lvl == 2
        base = tl.where(sel, base2, base)
        scale = tl.where(sel, scale2, scale)
        height = tl.where(sel, height2, height)
        width = tl.where(sel, width2, width)
        s_n = tl.where(sel, stride_n2, s_n)
        s_c = tl.where(sel, stride_c2, s_c)
        s_h = tl.where(sel, stride_h2, s_h)
        s_w = tl.where(sel, stride_w2, s_w)
    if NUM_LEVELS > 3:
        sel = lvl == 3
        base = tl.where(sel, base3, base)
        scale = tl.where(sel, scale3, scale)
        height = tl.where(sel, height3, height)
        width = tl.where(sel, width3, width)
        s_n = tl.where(sel, stride_n3, s_n)
        s_c = tl.where(sel, stride_c3, s_c)
        s_h = tl.where(sel, stride_h3, s_h)
        s_w = tl.where(sel, stride_w3, s_w)
    if NUM_LEVELS > 4:
        sel = lvl == 4
        base = tl.where(sel, base4, base)
        scale = tl.where(sel, scale4, scale)
        height = tl.where(sel, height4, height)
        width = tl.where(sel, width4, width)
        s_n = tl.where(sel, stride_n4, s_n)
        s_c = tl.where(sel, stride_c4, s_c)
        s_h = tl.where(sel, stride_h4, s_h)
        s_w = tl.where(sel, stride_w4, s_w)
    if C_CONTIG:
        s_c = 1
    else:
        s_c = s_c * STRIDE_ALIGN
    return base, scale, height, width, s_n * STRIDE_ALIGN, s_c, s_h * STRIDE_ALIGN, s_w * STRIDE_ALIGN


@triton.jit
def _load_rois(rois_ptr, k, col_ok, canonical_scale, canonical_level, k_min, k_max, NUM_LEVELS: tl.constexpr):
    """RoIs ``k`` (a vector, read where ``col_ok``): batch index, box and level index (0: finest).

    The level is torchvision's LevelMapper in fp32, operation for operation:
    floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped to [k_min, k_max].
    """
    row = rois_ptr + k.to(tl.int64) * 5
    b = tl.load(row, mask=col_ok, other=0.0).to(tl.int32)
    x1 = tl.load(row + 1, mask=col_ok, other=0.0)
    y1 = tl.load(row + 2, mask=col_ok, other=0.0)
    x2 = tl.load(row + 3, mask=col_ok, other=1.0)  # masked-out columns read a unit box
    y2 = tl.load(row + 4, mask=col_ok, other=1.0)
    if NUM_LEVELS == 1:
        lvl = b * 0
    else:
        size = tl.sqrt_rn((x2 - x1) * (y2 - y1))
        target = tl.floor(canonical_level + tl.log2(tl.div_rn(size, canonical_scale)) + 1e-6)
        target = tl.minimum(tl.maximum(target, k_min.to(tl.float32)), k_max.to(tl.float32))
        lvl = target.to(tl.int32) - k_min
    return b, x1, y1, x2, y2, lvl


@triton.jit
def _roi_grid(x1, y1, x2, y2, scale, PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr,
              ALIGNED: tl.constexpr):
    """Start, bin size and samples per bin of RoIs on their level (torchvision's rules).

    Returns (start_y, start_x, bin_h, bin_w, grid_h, grid_w, count); grid_* are int32 (the
    adaptive grid is ceil(roi size / output size) per RoI) and count = max(grid_h * grid_w, 1)
    as fp32.
    """
    offset = 0.5 if ALIGNED else 0.0
    start_x = x1 * scale - offset
    start_y = y1 * scale - offset
    roi_w = (x2 * scale - offset) - start_x
    roi_h = (y2 * scale - offset) - start_y
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = tl.div_rn(roi_h, PH * 1.0)
    bin_w = tl.div_rn(roi_w, PW * 1.0)
    if SAMPLING > 0:
        grid_h = tl.full(roi_h.shape, SAMPLING, tl.int32)
        grid_w = tl.full(roi_w.shape, SAMPLING, tl.int32)
    else:
        grid_h = tl.maximum(tl.ceil(bin_h), 0.0).to(tl.int32)
        grid_w = tl.maximum(tl.ceil(bin_w), 0.0).to(tl.int32)
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    return start_y, start_x, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _taps(coord, size):
    """torchvision's bilinear rule along one axis for sample positions ``coord``.

    Returns (lo, hi, w_lo, w_hi, inside): the two neighbour indices and their weights; a
    sample outside [-1, size] is not inside (it contributes zero); one in [-1, 0] is clamped
    to 0 and one past size - 1 to the last index.
    """
    size_f = size.to(tl.float32)
    inside = (coord >= -1.0) & (coord <= size_f)
    c = tl.minimum(tl.maximum(coord, 0.0), size_f)  # the upper clamp only changes outside samples
    lo = c.to(tl.int32)  # c >= 0: truncation is floor
    at_edge = lo >= size - 1
    lo = tl.where(at_edge, size - 1, lo)
    hi = tl.where(at_edge, size - 1, lo + 1)
    frac = tl.where(at_edge, 0.0, c - lo.to(tl.float32))
    return lo, hi, 1.0 - frac, frac, inside


@triton.jit
def _columns(pid, K, C, PH: tl.constexpr, PW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """A program's columns (RoI k, bin p) and channels. Channel blocks vary fastest, then bin
    blocks, so the programs of one RoI run side by side and share its feature rows in cache."""
    NUM_PB: tl.constexpr = (PH * PW + BLOCK_P - 1) // BLOCK_P
    num_cb = tl.cdiv(C, BLOCK_C)
    cb = pid % num_cb
    rest = pid // num_cb
    q = tl.arange(0, BLOCK_R * BLOCK_P)
    k = (rest // NUM_PB) * BLOCK_R + q // BLOCK_P
    p = (rest % NUM_PB) * BLOCK_P + q % BLOCK_P
    col_ok = (k < K) & (p < PH * PW)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return k, p, col_ok, offs_c


# --------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=_FWD_NO_SPEC)
def _roi_align_fwd_kernel(
    out_ptr, rois_ptr, K,
    feat0, feat1, feat2, feat3, feat4,
    scale0, scale1, scale2, scale3, scale4,
    height0, width0, stride_n0, stride_c0, stride_h0, stride_w0,
    height1, width1, stride_n1, stride_c1, stride_h1, stride_w1,
    height2, width2, stride_n2, stride_c2, stride_h2, stride_w2,
    height3, width3, stride_n3, stride_c3, stride_h3, stride_w3,
    height4, width4, stride_n4, stride_c4, stride_h4, stride_w4,
    out_stride_k, out_stride_c, out_stride_h, out_stride_w,
    N, C, canonical_scale, canonical_level, k_min, k_max,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BINS_INNER: tl.constexpr,
):
    """RoI Align forward over all levels in one launch.

    out_ptr: Tensor[K, C, PH, PW] (strides out_stride_*); every element is written.
    rois_ptr: fp32 Tensor[K, 5], contiguous rows (batch_index, x1, y1, x2, y2).
    feat0..feat4: level l's Tensor[N, C, height_l, width_l], strides stride_*_l * STRIDE_ALIGN
        (the channel stride is 1 when C_CONTIG); unused levels repeat level 0.
    Grid: one program per (block of BLOCK_R RoIs, block of BLOCK_P bins, block of BLOCK_C channels).
    """
    Q_AXIS: tl.constexpr = 0 if BINS_INNER else 1  # where expand_dims puts the column axis
    C_AXIS: tl.constexpr = 1 - Q_AXIS
    k, p, col_ok, offs_c = _columns(tl.program_id(0), K, C, PH, PW, BLOCK_R, BLOCK_P, BLOCK_C)
    b, x1, y1, x2, y2, lvl = _load_rois(rois_ptr, k, k < K, canonical_scale, canonical_level, k_min, k_max,
                                        NUM_LEVELS)
    if BLOCK_R == 1:  # one RoI: select its level by a scalar, which keeps pointer alignment known
        lvl_pick = tl.max(lvl, axis=0)
    else:
        lvl_pick = lvl

    # Each column's level: pointer, sizes and strides by select, no per-level launch. A RoI
    # whose batch index or level is out of range pools zeros.
    feat, scale, height, width, s_n, s_c, s_h, s_w = _level_geometry(
        lvl_pick, feat0, feat1, feat2, feat3, feat4, scale0, scale1, scale2, scale3, scale4,
        height0, width0, stride_n0, stride_c0, stride_h0, stride_w0,
        height1, width1, stride_n1, stride_c1, stride_h1, stride_w1,
        height2, width2, stride_n2, stride_c2, stride_h2, stride_w2,
        height3, width3, stride_n3, stride_c3, stride_h3, stride_w3,
        height4, width4, stride_n4, stride_c4, stride_h4, stride_w4,
        NUM_LEVELS, STRIDE_ALIGN, C_CONTIG)
    col_ok = col_ok & (b >= 0) & (b < N) & (lvl >= 0) & (lvl < NUM_LEVELS)
    base = feat + b.to(tl.int64) * s_n
    if C_CONTIG:
        chan = tl.expand_dims(offs_c, C_AXIS)
    else:
        chan = tl.expand_dims(offs_c, C_AXIS) * tl.expand_dims(s_c + lvl * 0, Q_AXIS)
    c_ok = tl.expand_dims(offs_c < C, C_AXIS)

    start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _roi_grid(x1, y1, x2, y2, scale, PH, PW, SAMPLING,
                                                                      ALIGNED)
    y_bin = start_y + (p // PW).to(tl.float32) * bin_h
    x_bin = start_x + (p % PW).to(tl.float32) * bin_w
    grid_h_f = tl.maximum(grid_h, 1).to(tl.float32)  # divisor only: a zero grid takes no samples
    grid_w_f = tl.maximum(grid_w, 1).to(tl.float32)
    if SAMPLING > 0:
        n_y: tl.constexpr = SAMPLING
        n_x: tl.constexpr = SAMPLING
    else:  # the block's largest per-RoI grid (the RoI's own with BLOCK_R = 1); columns mask the rest
        n_y = tl.max(tl.where(col_ok, grid_h, 0), axis=0)
        n_x = tl.max(tl.where(col_ok, grid_w, 0), axis=0)

    if BINS_INNER:
        acc = tl.zeros((BLOCK_C, BLOCK_R * BLOCK_P), tl.float32)
    else:
        acc = tl.zeros((BLOCK_R * BLOCK_P, BLOCK_C), tl.float32)
    # Sum of bilinear samples: each sample reads its 4 neighbours straight from the level's map
    # in its own layout (4 * BLOCK_C values per column) and accumulates in registers; no
    # per-level copy, no gathered intermediate (the reference materialises K*C*4*Gy*Gx*PH*PW).
    for iy in range(0, n_y):
        y = y_bin + tl.div_rn((iy + 0.5) * bin_h, grid_h_f)
        y_lo, y_hi, wy_lo, wy_hi, y_in = _taps(y, height)
        y_in = y_in & (iy < grid_h) & col_ok
        row_lo = base + y_lo * s_h
        row_hi = base + y_hi * s_h
        for ix in range(0, n_x):
            x = x_bin + tl.div_rn((ix + 0.5) * bin_w, grid_w_f)
            x_lo, x_hi, wx_lo, wx_hi, x_in = _taps(x, width)
            mask = tl.expand_dims(y_in & x_in & (ix < grid_w), Q_AXIS) & c_ok
            col_lo = x_lo * s_w
            col_hi = x_hi * s_w
            v = tl.load(tl.expand_dims(row_lo + col_lo, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_lo * wx_lo, Q_AXIS) * v.to(tl.float32)
            v = tl.load(tl.expand_dims(row_lo + col_hi, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_lo * wx_hi, Q_AXIS) * v.to(tl.float32)
            v = tl.load(tl.expand_dims(row_hi + col_lo, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_hi * wx_lo, Q_AXIS) * v.to(tl.float32)
            v = tl.load(tl.expand_dims(row_hi + col_hi, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_hi * wx_hi, Q_AXIS) * v.to(tl.float32)
    acc = tl.div_rn(acc, tl.expand_dims(count, Q_AXIS))

    # Write the tile once, in the output's dtype (zeros for masked-out RoIs).
    out_col = k.to(tl.int64) * out_stride_k + (p // PW) * out_stride_h + (p % PW) * out_stride_w
    out_ptrs = out_ptr + tl.expand_dims(out_col, Q_AXIS) + tl.expand_dims(offs_c * out_stride_c, C_AXIS)
    out_mask = tl.expand_dims((k < K) & (p < PH * PW), Q_AXIS) & c_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- backward (atomics)


@triton.jit(do_not_specialize=_BWD_NO_SPEC)
def _roi_align_bwd_kernel(
    grad_ptr, grad_out_ptr, rois_ptr, K,
    grad_offset0, grad_offset1, grad_offset2, grad_offset3, grad_offset4,
    scale0, scale1, scale2, scale3, scale4,
    height0, width0, stride_n0, stride_c0, stride_h0, stride_w0,
    height1, width1, stride_n1, stride_c1, stride_h1, stride_w1,
    height2, width2, stride_n2, stride_c2, stride_h2, stride_w2,
    height3, width3, stride_n3, stride_c3, stride_h3, stride_w3,
    height4, width4, stride_n4, stride_c4, stride_h4, stride_w4,
    go_stride_k, go_stride_c, go_stride_h, go_stride_w,
    N, C, canonical_scale, canonical_level, k_min, k_max,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BINS_INNER: tl.constexpr,
):
    """RoI Align backward over all levels in one launch, by fp32 atomic adds.

    grad_ptr: flat fp32 buffer, zero-filled; level l's gradient Tensor[N, C, height_l, width_l]
        starts at element grad_offset_l, strides stride_*_l * STRIDE_ALIGN.
    grad_out_ptr: Tensor[K, C, PH, PW], any strides (go_stride_*), any float dtype.
    rois_ptr: fp32 Tensor[K, 5], contiguous rows.
    Grid: one program per (block of BLOCK_R RoIs, block of BLOCK_P bins, block of BLOCK_C
    channels), as the forward.
    """
    Q_AXIS: tl.constexpr = 0 if BINS_INNER else 1
    C_AXIS: tl.constexpr = 1 - Q_AXIS
    k, p, col_ok, offs_c = _columns(tl.program_id(0), K, C, PH, PW, BLOCK_R, BLOCK_P, BLOCK_C)
    b, x1, y1, x2, y2, lvl = _load_rois(rois_ptr, k, k < K, canonical_scale, canonical_level, k_min, k_max,
                                        NUM_LEVELS)
    if BLOCK_R == 1:  # one RoI: select its level by a scalar, which keeps pointer alignment known
        lvl_pick = tl.max(lvl, axis=0)
    else:
        lvl_pick = lvl

    # Each column's level, as the forward (the base is an offset into the flat gradient).
    g_off, scale, height, width, s_n, s_c, s_h, s_w = _level_geometry(
        lvl_pick, grad_offset0, grad_offset1, grad_offset2, grad_offset3, grad_offset4,
        scale0, scale1, scale2, scale3, scale4,
        height0, width0, stride_n0, stride_c0, stride_h0, stride_w0,
        height1, width1, stride_n1, stride_c1, stride_h1, stride_w1,
        height2, width2, stride_n2, stride_c2, stride_h2, stride_w2,
        height3, width3, stride_n3, stride_c3, stride_h3, stride_w3,
        height4, width4, stride_n4, stride_c4, stride_h4, stride_w4,
        NUM_LEVELS, STRIDE_ALIGN, C_CONTIG)
    col_ok = col_ok & (b >= 0) & (b < N) & (lvl >= 0) & (lvl < NUM_LEVELS)
    base = grad_ptr + g_off.to(tl.int64) + b.to(tl.int64) * s_n
    if C_CONTIG:
        chan = tl.expand_dims(offs_c, C_AXIS)
    else:
        chan = tl.expand_dims(offs_c, C_AXIS) * tl.expand_dims(s_c + lvl * 0, Q_AXIS)
    c_ok = tl.expand_dims(offs_c < C, C_AXIS)

    start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _roi_grid(x1, y1, x2, y2, scale, PH, PW, SAMPLING,
                                                                      ALIGNED)
    # The tile's output gradient, read once and divided by the sample count.
    go_col = k.to(tl.int64) * go_stride_k + (p // PW) * go_stride_h + (p % PW) * go_stride_w
    go_ptrs = grad_out_ptr + tl.expand_dims(go_col, Q_AXIS) + tl.expand_dims(offs_c * go_stride_c, C_AXIS)
    go = tl.load(go_ptrs, mask=tl.expand_dims(col_ok, Q_AXIS) & c_ok, other=0.0).to(tl.float32)
    g = tl.div_rn(go, tl.expand_dims(count, Q_AXIS))

    y_bin = start_y + (p // PW).to(tl.float32) * bin_h
    x_bin = start_x + (p % PW).to(tl.float32) * bin_w
    grid_h_f = tl.maximum(grid_h, 1).to(tl.float32)  # divisor only: a zero grid takes no samples
    grid_w_f = tl.maximum(grid_w, 1).to(tl.float32)
    if SAMPLING > 0:
        n_y: tl.constexpr = SAMPLING
        n_x: tl.constexpr = SAMPLING
    else:
        n_y = tl.max(tl.where(col_ok, grid_h, 0), axis=0)
        n_x = tl.max(tl.where(col_ok, grid_w, 0), axis=0)
    # Each sample adds its 4 weighted taps straight into the level's fp32 gradient: one pass
    # over the output gradient, no per-sample or per-level intermediate in memory.
    for iy in range(0, n_y):
        y = y_bin + tl.div_rn((iy + 0.5) * bin_h, grid_h_f)
        y_lo, y_hi, wy_lo, wy_hi, y_in = _taps(y, height)
        y_in = y_in & (iy < grid_h) & col_ok
        row_lo = base + y_lo * s_h
        row_hi = base + y_hi * s_h
        for ix in range(0, n_x):
            x = x_bin + tl.div_rn((ix + 0.5) * bin_w, grid_w_f)
            x_lo, x_hi, wx_lo, wx_hi, x_in = _taps(x, width)
            mask = tl.expand_dims(y_in & x_in & (ix < grid_w), Q_AXIS) & c_ok
            col_lo = x_lo * s_w
            col_hi = x_hi * s_w
            tl.atomic_add(tl.expand_dims(row_lo + col_lo, Q_AXIS) + chan,
                          g * tl.expand_dims(wy_lo * wx_lo, Q_AXIS), mask=mask, sem="relaxed")
            tl.atomic_add(tl.expand_dims(row_lo + col_hi, Q_AXIS) + chan,
                          g * tl.expand_dims(wy_lo * wx_hi, Q_AXIS), mask=mask, sem="relaxed")
            tl.atomic_add(tl.expand_dims(row_hi + col_lo, Q_AXIS) + chan,
                          g * tl.expand_dims(wy_hi * wx_lo, Q_AXIS), mask=mask, sem="relaxed")
            tl.atomic_add(tl.expand_dims(row_hi + col_hi, Q_AXIS) + chan,
                          g * tl.expand_dims(wy_hi * wx_hi, Q_AXIS), mask=mask, sem="relaxed")


# --------------------------------------------------------------------------- backward (deterministic)


@triton.jit
def _axis_weights(cells, bin_start, bin_size, grid, grid_f, n_samples, size, col_ok):
    """W[i, q]: the weight with which column q's samples along this axis land on feature row
    (or column) ``cells[i]``, summed over the column's samples; zero where none lands."""
    acc = tl.zeros((cells.shape[0], bin_start.shape[0]), tl.float32)
    for i in range(0, n_samples):
        coord = bin_start + tl.div_rn((i + 0.5) * bin_size, grid_f)
        lo, hi, w_lo, w_hi, inside = _taps(coord, size)
        inside = inside & (i < grid) & col_ok
        w_lo = tl.where(inside, w_lo, 0.0)
        w_hi = tl.where(inside, w_hi, 0.0)
        acc += tl.where(cells[:, None] == lo[None, :], w_lo[None, :], 0.0)
        acc += tl.where(cells[:, None] == hi[None, :], w_hi[None, :], 0.0)
    return acc


@triton.jit
def _tile_rois(rois_ptr, k, K, n, lvl, tile_y0, tile_x0, scale, canonical_scale, canonical_level, k_min, k_max,
               PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
               NUM_LEVELS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Sampling grids of RoIs ``k`` (see ``_roi_grid``), and whether each RoI (k < K) is pooled
    from level ``lvl`` of image ``n`` and its samples can touch the TILE_H x TILE_W cells at
    (tile_y0, tile_x0): samples lie inside the (scaled) box and touch cells at most one away
    from it after clamping, hence a 2-cell margin."""
    b, x1, y1, x2, y2, roi_lvl = _load_rois(rois_ptr, k, k < K, canonical_scale, canonical_level, k_min, k_max,
                                            NUM_LEVELS)
    start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _roi_grid(x1, y1, x2, y2, scale, PH, PW, SAMPLING,
                                                                      ALIGNED)
    end_y = start_y + PH * bin_h
    end_x = start_x + PW * bin_w
    reach = ((k < K) & (b == n) & (roi_lvl == lvl)
             & (tl.maximum(start_y, end_y) >= tile_y0 - 2) & (tl.minimum(start_y, end_y) <= tile_y0 + TILE_H + 1)
             & (tl.maximum(start_x, end_x) >= tile_x0 - 2) & (tl.minimum(start_x, end_x) <= tile_x0 + TILE_W + 1))
    return reach, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count


@triton.jit(do_not_specialize=_DET_NO_SPEC)
def _roi_align_bwd_det_kernel(
    grad_ptr, grad_out_ptr, rois_ptr, K,
    tile_start0, tile_start1, tile_start2, tile_start3, tile_start4,
    grad_offset0, grad_offset1, grad_offset2, grad_offset3, grad_offset4,
    scale0, scale1, scale2, scale3, scale4,
    height0, width0, stride_n0, stride_c0, stride_h0, stride_w0,
    height1, width1, stride_n1, stride_c1, stride_h1, stride_w1,
    height2, width2, stride_n2, stride_c2, stride_h2, stride_w2,
    height3, width3, stride_n3, stride_c3, stride_h3, stride_w3,
    height4, width4, stride_n4, stride_c4, stride_h4, stride_w4,
    go_stride_k, go_stride_c, go_stride_h, go_stride_w,
    N, C, canonical_scale, canonical_level, k_min, k_max,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    P_CHUNK: tl.constexpr, SCAN: tl.constexpr,
):
    """RoI Align backward, deterministic: every gradient cell is gathered by exactly one program.

    grad_ptr: flat fp32 buffer (need not be initialised); level l's gradient
        Tensor[N, C, height_l, width_l] starts at element grad_offset_l, strides
        stride_*_l * STRIDE_ALIGN; every element of it is written.
    grad_out_ptr: Tensor[K, C, PH, PW], any strides (go_stride_*), any float dtype.
    rois_ptr: fp32 Tensor[K, 5], contiguous rows.
    Grid: (tiles, channel blocks); tiles enumerate (level, image, TILE_H x TILE_W cells), level
    l's tiles numbered from tile_start_l.

    Bilinear weights are separable and a bin's samples form a product grid, so the gradient
    a column q = (RoI k, bin p) sends to cell t is Wy[t, q] * Wx[t, q] * grad_out[k, :, p] / count.
    A program tests the RoIs against its tile SCAN at a time, walks the blocks with a hit in
    order, BLOCK_R RoIs and P_CHUNK bins at a time, keeps the columns of RoIs pooled from its
    level and image whose box reaches the tile, and adds one matrix product
    (Wy * Wx) @ grad_out per step: a fixed summation order, no float atomics, so the result is
    bitwise reproducible. The RoIs are read once per tile (K * 20 bytes, from L2), and again
    for the blocks with a hit.
    """
    pid = tl.program_id(0)
    lvl = pid * 0
    if NUM_LEVELS > 1:
        lvl += (pid >= tile_start1).to(tl.int32)
    if NUM_LEVELS > 2:
        lvl += (pid >= tile_start2).to(tl.int32)
    if NUM_LEVELS > 3:
        lvl += (pid >= tile_start3).to(tl.int32)
    if NUM_LEVELS > 4:
        lvl += (pid >= tile_start4).to(tl.int32)
    first_tile = _pick(lvl, tile_start0, tile_start1, tile_start2, tile_start3, tile_start4, NUM_LEVELS)
    g_off, scale, height, width, s_n, s_c, s_h, s_w = _level_geometry(
        lvl, grad_offset0, grad_offset1, grad_offset2, grad_offset3, grad_offset4,
        scale0, scale1, scale2, scale3, scale4,
        height0, width0, stride_n0, stride_c0, stride_h0, stride_w0,
        height1, width1, stride_n1, stride_c1, stride_h1, stride_w1,
        height2, width2, stride_n2, stride_c2, stride_h2, stride_w2,
        height3, width3, stride_n3, stride_c3, stride_h3, stride_w3,
        height4, width4, stride_n4, stride_c4, stride_h4, stride_w4,
        NUM_LEVELS, STRIDE_ALIGN, C_CONTIG)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if C_CONTIG:
        c_off = offs_c
    else:
        c_off = offs_c * s_c
    c_ok = offs_c < C

    tiles_x = tl.cdiv(width, TILE_W)
    tiles_img = tl.cdiv(height, TILE_H) * tiles_x
    local = pid - first_tile
    n = local // tiles_img
    tile_y0 = (local % tiles_img) // tiles_x * TILE_H
    tile_x0 = (local % tiles_img) % tiles_x * TILE_W
    rows = tile_y0 + tl.arange(0, TILE_H)
    cols = tile_x0 + tl.arange(0, TILE_W)

    acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), tl.float32)
    q = tl.arange(0, BLOCK_R * P_CHUNK)
    s = tl.arange(0, SCAN)
    for r_scan in range(0, K, SCAN):
        # Most RoIs miss most tiles (every RoI of another image or level does): test SCAN RoIs
        # at once, as one vector, and skip them all when none reaches the tile; only the
        # blocks with a hit are walked RoI by RoI.
        reach_any, _, _, _, _, grid_h_any, grid_w_any, _ = _tile_rois(
            rois_ptr, r_scan + s, K, n, lvl, tile_y0, tile_x0, scale, canonical_scale, canonical_level,
            k_min, k_max, PH, PW, SAMPLING, ALIGNED, NUM_LEVELS, TILE_H, TILE_W)
        if tl.max(reach_any.to(tl.int32), axis=0) > 0:
            for r0 in range(r_scan, tl.minimum(r_scan + SCAN, K), BLOCK_R):
                # The step's RoIs (column q belongs to RoI r0 + q // P_CHUNK): whether any
                # reaches the tile, and their largest sampling grid, read off the scan's vector.
                in_step = reach_any & (s >= r0 - r_scan) & (s < r0 - r_scan + BLOCK_R)
                if tl.max(in_step.to(tl.int32), axis=0) > 0:
                    k = r0 + q // P_CHUNK
                    if SAMPLING > 0:
                        n_y: tl.constexpr = SAMPLING
                        n_x: tl.constexpr = SAMPLING
                    else:  # the largest grid of the RoIs that reach the tile; other columns are masked
                        n_y = tl.max(tl.where(in_step, grid_h_any, 0), axis=0)
                        n_x = tl.max(tl.where(in_step, grid_w_any, 0), axis=0)
                    # Each bin chunk recomputes the geometry from the (cached) RoI rows rather
                    # than keep it live across the chunk loop (registers).
                    for p0 in range(0, PH * PW, P_CHUNK):
                        p = p0 + q % P_CHUNK
                        reach, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _tile_rois(
                            rois_ptr, k, K, n, lvl, tile_y0, tile_x0, scale, canonical_scale, canonical_level,
                            k_min, k_max, PH, PW, SAMPLING, ALIGNED, NUM_LEVELS, TILE_H, TILE_W)
                        col_ok = reach & (p < PH * PW)
                        # Per-axis weights [TILE_H, Q] and [TILE_W, Q], then their outer product over
                        # the tile's cells (row-major, as the store below).
                        wy = _axis_weights(rows, start_y + (p // PW).to(tl.float32) * bin_h, bin_h, grid_h,
                                           tl.maximum(grid_h, 1).to(tl.float32), n_y, height, col_ok)
                        wx = _axis_weights(cols, start_x + (p % PW).to(tl.float32) * bin_w, bin_w, grid_w,
                                           tl.maximum(grid_w, 1).to(tl.float32), n_x, width, col_ok)
                        w = tl.reshape(wy[:, None, :] * wx[None, :, :], (TILE_H * TILE_W, BLOCK_R * P_CHUNK))
                        go_col = k.to(tl.int64) * go_stride_k + (p // PW) * go_stride_h + (p % PW) * go_stride_w
                        go = tl.load(grad_out_ptr + go_col[:, None] + (offs_c * go_stride_c)[None, :],
                                     mask=col_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                        acc = tl.dot(w, tl.div_rn(go, count[:, None]), acc, input_precision="ieee")

    # Every cell of the tile is written (zero where no RoI reaches it).
    cell_rows = tile_y0 + tl.arange(0, TILE_H * TILE_W) // TILE_W
    cell_cols = tile_x0 + tl.arange(0, TILE_H * TILE_W) % TILE_W
    ptrs = (grad_ptr + g_off.to(tl.int64) + n.to(tl.int64) * s_n + (cell_rows * s_h + cell_cols * s_w)[:, None]
            + c_off[None, :])
    mask = ((cell_rows < height) & (cell_cols < width))[:, None] & c_ok[None, :]
    tl.store(ptrs, acc, mask=mask)


# --------------------------------------------------------------------------- launchers


def is_channels_last(t: torch.Tensor) -> bool:
    """True for a [N, C, H, W] tensor stored channels-last (C > 1, so the layout is unambiguous)."""
    return t.stride(1) == 1 and t.shape[1] > 1 and not t.is_contiguous()


def _stride_align(strides) -> int:
    """Largest power of two (at most MAX_STRIDE_ALIGN) dividing every stride given."""
    align = MAX_STRIDE_ALIGN
    for s in strides:
        while align > 1 and s % align:
            align //= 2
    return align


def _level_args(shapes, strides, scales, c_contig: bool):
    """Per-level keyword arguments (scale, sizes, strides), unused levels padded with level 0.

    Returns (kwargs, STRIDE_ALIGN); the channel stride is left out (0) when ``c_contig``.
    """
    def padded(values):
        return list(values) + [values[0]] * (MAX_LEVELS - len(values))

    align = _stride_align([s for st in strides for i, s in enumerate(st) if not (c_contig and i == 1)])
    kwargs = {}
    for i, (shape, st, scale) in enumerate(zip(padded(shapes), padded(strides), padded(list(scales)))):
        kwargs[f"scale{i}"] = float(scale)
        kwargs[f"height{i}"] = int(shape[2])
        kwargs[f"width{i}"] = int(shape[3])
        for name, s in zip(("stride_n", "stride_c", "stride_h", "stride_w"), st):
            kwargs[f"{name}{i}"] = 0 if (c_contig and name == "stride_c") else s // align
    return kwargs, align


def _roi_kwargs(rois, n, c, output_size, sampling_ratio, aligned, canonical_scale, canonical_level,
                k_min, k_max, num_levels):
    return dict(rois_ptr=rois, K=rois.shape[0], N=n, C=c, canonical_scale=float(canonical_scale),
                canonical_level=float(canonical_level), k_min=int(k_min), k_max=int(k_max),
                PH=output_size[0], PW=output_size[1], SAMPLING=max(int(sampling_ratio), 0),
                ALIGNED=bool(aligned), NUM_LEVELS=num_levels)


def _tile_config(device: torch.device, k: int, c: int, n_bins: int, channels_last: bool,
                 block_r=None, block_p=None, block_c=None):
    """(BLOCK_R, BLOCK_P, BLOCK_C, num_warps) for the forward and atomic backward kernels.

    GPU, channels-last: one program per (RoI, bin) with a contiguous vector of up to 256
    channels, 2 warps. GPU, NCHW: one RoI's bins (up to 1024) times as many channels as make
    1024 elements, 8 warps (4 elements per thread). Compiled for sm_90, 2048-element tiles
    on 4 warps (16 per thread) needed 164 registers with Triton 3.9 but 255 and a 24-byte
    spill stack with Triton 3.6; at 4 elements per thread both stay near 100, no spills.
    Interpreter (CPU): each operation costs the same whatever the block, so a program takes
    up to 32 whole RoIs with all their channels (up to 64).
    """
    if not gpu_launch(device):
        br, bp, bc = min(32, triton.next_power_of_2(max(k, 1))), triton.next_power_of_2(n_bins), \
            min(64, triton.next_power_of_2(c))
    elif channels_last:
        br, bp, bc = 1, 1, min(256, triton.next_power_of_2(c))
    else:
        br, bp = 1, min(1024, triton.next_power_of_2(n_bins))
        bc = max(1, min(triton.next_power_of_2(c), 1024 // bp))
    br, bp, bc = block_r or br, block_p or bp, block_c or bc
    warps = max(1, min(8, br * bp * bc // 128))
    return br, bp, bc, warps


def roi_align_fwd(features: list[torch.Tensor], rois: torch.Tensor, output_size: tuple[int, int],
                  scales: list[float], sampling_ratio: int, aligned: bool, *, canonical_scale: float = 224.0,
                  canonical_level: int = 4, k_min: int = 0, k_max: int = 0, out: torch.Tensor | None = None,
                  block_r: int | None = None, block_p: int | None = None,
                  block_c: int | None = None) -> torch.Tensor:
    """RoI Align over ``features`` (one Tensor[N, C, H_l, W_l] per level, finest first).

    ``rois``: fp32 Tensor[K, 5], contiguous. With one level every RoI is pooled from it; with
    several, each RoI's level is computed in the kernel (canonical_scale/level, clamped to
    [k_min, k_max]). Returns Tensor[K, C, PH, PW] in the features' dtype, channels-last when the
    features are. ``out``: a preallocated output (any strides), e.g. NaN-filled by tests.
    ``block_r``/``block_p``/``block_c``: override the block shape (tests run the GPU's shape
    through the interpreter with them).
    """
    f0 = features[0]
    n, c = f0.shape[:2]
    k = rois.shape[0]
    ph, pw = output_size
    channels_last = all(is_channels_last(f) for f in features)
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((k, c, ph, pw), dtype=f0.dtype, device=f0.device, memory_format=fmt)
    if k == 0 or c == 0:
        return out
    c_contig = all(f.stride(1) == 1 for f in features)
    level_kwargs, align = _level_args([f.shape for f in features], [f.stride() for f in features], scales, c_contig)
    br, bp, bc, warps = _tile_config(f0.device, k, c, ph * pw, channels_last, block_r, block_p, block_c)
    feats = list(features) + [f0] * (MAX_LEVELS - len(features))
    # Grid: one program per (RoI block, bin block, channel block).
    grid = (triton.cdiv(k, br) * triton.cdiv(ph * pw, bp) * triton.cdiv(c, bc),)
    _roi_align_fwd_kernel[grid](
        out_ptr=out, **{f"feat{i}": f for i, f in enumerate(feats)}, **level_kwargs,
        out_stride_k=out.stride(0), out_stride_c=out.stride(1), out_stride_h=out.stride(2),
        out_stride_w=out.stride(3),
        **_roi_kwargs(rois, n, c, output_size, sampling_ratio, aligned, canonical_scale, canonical_level,
                      k_min, k_max, len(features)),
        STRIDE_ALIGN=align, C_CONTIG=c_contig, BLOCK_R=br, BLOCK_P=bp, BLOCK_C=bc, BINS_INNER=not channels_last,
        num_warps=warps,
    )
    return out


def _grad_layout(shapes, channels_last: list[bool]):
    """Strides and element offsets of the per-level gradients inside one flat buffer; each
    level is dense, channels-last where its input was."""
    strides, offsets, total = [], [], 0
    for (n, c, h, w), cl in zip(shapes, channels_last):
        strides.append((h * w * c, 1, w * c, c) if cl else (c * h * w, h * w, w, 1))
        offsets.append(total)
        total += n * c * h * w
    return strides, offsets, total


# RoIs the deterministic backward tests together against a tile before walking them one
# step at a time (rounded up to a multiple of its BLOCK_R, 1 on the GPU and up to 32
# otherwise, so that no step straddles two scan blocks).
DET_SCAN = 32


def _det_config(device: torch.device, shapes, k: int, c: int, n_bins: int):
    """(TILE_H, TILE_W, BLOCK_C, BLOCK_R, P_CHUNK) for the deterministic backward.

    GPU: 8x8 cells x 32 channels, one RoI and 32 bins per step (a 64x32x32 product), with 8
    warps. Compiled for sm_90 (register report of the cubin): 64 channels on 4 warps needed
    255 registers and a 928-byte stack with Triton 3.9; with the bin chunks unrolled, 32
    channels on 8 warps needed 196 registers with Triton 3.9 but spilled with Triton 3.6.
    The chunks are now a loop of 32 bins (Triton 3.6 spilled a few bytes at 16 and at 64),
    inside the scan over blocks of DET_SCAN RoIs: 104 to 115 registers with either, no stack.
    The channel block stays 32 below 32 channels: 16 channels got a register cap (64 on 8
    warps, 80 on 4) and an 8-16 byte stack from Triton 3.6, on an H200 and in the compile
    check alike; the idle lanes cost only inputs of under 32 channels (not the model's 256).
    Interpreter: tiles of up to 16x32 cells and up to 32 RoIs per step, so that few programs
    and few steps cover the levels.
    """
    if not gpu_launch(device):
        th = max(4, min(16, triton.next_power_of_2(max(s[2] for s in shapes))))
        tw = max(4, min(32, triton.next_power_of_2(max(s[3] for s in shapes))))
        bc = max(16, min(64, triton.next_power_of_2(c)))
        p_chunk = max(16, min(64, triton.next_power_of_2(n_bins)))
        return th, tw, bc, min(32, triton.next_power_of_2(max(k, 1))), p_chunk
    return 8, 8, 32, 1, 32


def roi_align_bwd(grad_out: torch.Tensor, rois: torch.Tensor, shapes: list[tuple[int, int, int, int]],
                  channels_last: list[bool], output_size: tuple[int, int], scales: list[float],
                  sampling_ratio: int, aligned: bool, *, canonical_scale: float = 224.0, canonical_level: int = 4,
                  k_min: int = 0, k_max: int = 0, deterministic: bool = False, grad_dtype: torch.dtype | None = None,
                  out: torch.Tensor | None = None, block_r: int | None = None, block_p: int | None = None,
                  block_c: int | None = None) -> list[torch.Tensor]:
    """Gradients of RoI Align w.r.t. every level, in one launch (plus one cast for fp16/bf16).

    ``grad_out``: Tensor[K, C, PH, PW], any strides; ``shapes``: each level's (N, C, H, W);
    ``channels_last``: per level, the layout of its gradient. Accumulates in one flat fp32
    buffer and returns per-level views of it, cast once to ``grad_dtype`` (default fp32).
    ``out``: a preallocated fp32 buffer of the total size (the deterministic kernel writes all
    of it, so tests can fill it with NaN; the atomic kernel adds into it, so it must be zero).
    ``deterministic``: gather per gradient cell (bitwise reproducible) instead of atomic adds.
    """
    device = grad_out.device
    n, c = shapes[0][:2]
    k = rois.shape[0]
    ph, pw = output_size
    strides, offsets, total = _grad_layout(shapes, channels_last)
    if out is None:
        out = (torch.empty if deterministic else torch.zeros)(total, dtype=torch.float32, device=device)
    c_contig = all(channels_last)
    level_kwargs, align = _level_args(shapes, strides, scales, c_contig)
    offsets_kw = {f"grad_offset{i}": o for i, o in enumerate(offsets + [0] * (MAX_LEVELS - len(offsets)))}
    go_strides = dict(go_stride_k=grad_out.stride(0), go_stride_c=grad_out.stride(1),
                      go_stride_h=grad_out.stride(2), go_stride_w=grad_out.stride(3))
    roi_kwargs = _roi_kwargs(rois, n, c, output_size, sampling_ratio, aligned, canonical_scale, canonical_level,
                             k_min, k_max, len(shapes))
    if total and deterministic:
        th, tw, bc, br, p_chunk = _det_config(device, shapes, k, c, ph * pw)
        br, bc = block_r or br, block_c or bc
        tiles = [s[0] * triton.cdiv(s[2], th) * triton.cdiv(s[3], tw) for s in shapes]
        starts = [sum(tiles[:i]) for i in range(len(tiles))]
        starts += [sum(tiles)] * (MAX_LEVELS - len(starts))
        # Grid: one program per (level, image, TILE_H x TILE_W cell tile) x channel block.
        grid = (sum(tiles), triton.cdiv(c, bc))
        _roi_align_bwd_det_kernel[grid](
            grad_ptr=out, grad_out_ptr=grad_out, **{f"tile_start{i}": s for i, s in enumerate(starts)},
            **offsets_kw, **level_kwargs, **go_strides, **roi_kwargs,
            STRIDE_ALIGN=align, C_CONTIG=c_contig, TILE_H=th, TILE_W=tw, BLOCK_C=bc, BLOCK_R=br, P_CHUNK=p_chunk,
            SCAN=br * triton.cdiv(DET_SCAN, br), num_warps=8 if gpu_launch(device) else 4,
        )
    elif total and k:
        br, bp, bc, warps = _tile_config(device, k, c, ph * pw, c_contig, block_r, block_p, block_c)
        # Grid: one program per (RoI block, bin block, channel block), as the forward.
        grid = (triton.cdiv(k, br) * triton.cdiv(ph * pw, bp) * triton.cdiv(c, bc),)
        _roi_align_bwd_kernel[grid](
            grad_ptr=out, grad_out_ptr=grad_out, **offsets_kw, **level_kwargs, **go_strides, **roi_kwargs,
            STRIDE_ALIGN=align, C_CONTIG=c_contig, BLOCK_R=br, BLOCK_P=bp, BLOCK_C=bc, BINS_INNER=not c_contig,
            num_warps=warps,
        )
    flat = out if grad_dtype in (None, torch.float32) else out.to(grad_dtype)
    return [flat[o:o + s[0] * s[1] * s[2] * s[3]].as_strided(tuple(s), st)
            for s, st, o in zip(shapes, strides, offsets)]
