"""Triton kernels for multi-level RoI Align: forward, backward with atomics, deterministic backward.

One launch covers every FPN level (at most ``MAX_LEVELS``); the kernel computes each RoI's
level with torchvision's level mapper and reads that level's sizes, so no per-level masking,
sorting or launching happens on the host. Single-level RoI Align is the same kernel with
``NUM_LEVELS=1``.

Level descriptor: everything per level but the feature pointers (height, width, the four
strides, the scale, the gradient's offset in the flat buffer, the first tile of the
deterministic backward) is one int64 Tensor[MAX_LEVELS, DESC_FIELDS] on the device, which a
kernel reads with a few uniform scalar loads once it knows a RoI's level. A launch so takes
15 to 19 arguments instead of 53 to 59 (64 to 72 with the constexprs): the Python launch
(Triton's binder and C launcher) costs per argument, and on the H200 it was the op's floor.
The table is built once per geometry (shapes, strides, scales, layouts, tiling) and kept on
the device with the host constants derived with it (``_FWD_PLANS``, ``_BWD_PLANS``), so
repeated calls with the same feature shapes copy nothing; a new geometry costs one
asynchronous copy from pinned memory (no host sync). The forward keeps the five feature
pointers as arguments: their addresses change from call to call, so holding them in the
table (as element offsets from level 0) would mean a new table and a copy (about 100 us of
host time on the H200) on most calls, to save four pointer arguments (about 1 us); a pointer
argument also keeps the 16-byte alignment the JIT specialises on.

The semantics (sample positions, bilinear taps, adaptive grid) are those
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

Values that change with the image size (heights, widths, strides: in the descriptor) or the
number of RoIs (an argument, not specialised) do not recompile; strides are stored divided by
``STRIDE_ALIGN`` (the largest power of two, at most 16, dividing them) so that the compiler
still knows their alignment. Sizes and strides are 32-bit in the kernel, as the JIT typed
the former integer arguments, unless one needs 64 bits (``INDEX_64``).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._common import div_rn, gpu_launch, sqrt_rn

MAX_LEVELS = 5
# Largest power of two the launchers factor out of the feature strides: 16 elements is a
# 64-byte fp32 or 32-byte fp16 vector, more than the widest vector load.
MAX_STRIDE_ALIGN = 16

# The level descriptor: row l of an int64 Tensor[MAX_LEVELS, DESC_FIELDS] describes level l
# (rows past the last level repeat level 0). The kernels read the fields by these numbers
# (``_level_size``, ``_level_layout``, the atomic backward's sample loops, the deterministic
# backward's tile search), written there as literals: a global constexpr would add a check
# to every launch.
DESC_HEIGHT, DESC_WIDTH = 0, 1
DESC_STRIDE_N, DESC_STRIDE_C, DESC_STRIDE_H, DESC_STRIDE_W = 2, 3, 4, 5  # divided by STRIDE_ALIGN
DESC_SCALE = 6  # the level's spatial scale: its fp32 bits, or its fp64 bits for fp64 RoIs
DESC_OFFSET = 7  # backward: the level's first element in the flat gradient buffer (forward: 0)
DESC_TILE_START = 8  # deterministic backward: the level's first tile (program id)
DESC_FIELDS = 9
# Integers that change with the number of RoIs or the level mapping: not specialised.
_NO_SPEC = ["K", "N", "k_min", "k_max"]


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
def _level_size(desc_ptr, lvl, cdt: tl.constexpr, NUM_LEVELS: tl.constexpr):
    """Level ``lvl``'s row of the level descriptor, and its (scale, height, width); the scale
    in the compute dtype ``cdt`` (the RoIs': fp32, or fp64 for fp64 features).

    ``lvl``: a level index, scalar (one RoI per program, as on the GPU: uniform scalar loads of
    one cached row, 24 bytes here) or per column (a gather of the same rows). A level out of
    range reads row 0 (the caller masks its columns). Values read from memory occupy
    registers where arguments were operands from the constant bank, so the sizes and the
    layout (``_level_layout``) are read separately, each where it is first needed.
    """
    row = desc_ptr + tl.where((lvl >= 0) & (lvl < NUM_LEVELS), lvl, 0) * 9  # DESC_FIELDS
    if cdt == tl.float64:  # DESC_SCALE: fp64 bits
        scale = tl.load(row + 6).to(tl.float64, bitcast=True)
    else:  # fp32 bits: 32-bit work only (a 64-bit load and conversion cost up to 8 registers)
        scale = tl.load(row + 6).to(tl.int32).to(tl.float32, bitcast=True)
    height = tl.load(row + 0).to(tl.int32)  # DESC_HEIGHT
    width = tl.load(row + 1).to(tl.int32)  # DESC_WIDTH
    return row, scale, height, width


@triton.jit
def _level_layout(row, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr, INDEX_64: tl.constexpr):
    """A level's (offset, s_n, s_c, s_h, s_w), read from its descriptor ``row``.

    offset: the level's first element (int64); strides in elements, the stored values times
    STRIDE_ALIGN (so the compiler keeps their alignment), int32 unless INDEX_64 (as the JIT
    typed the former arguments); s_c is 1 when C_CONTIG (not read).
    """
    offset = tl.load(row + 7)  # DESC_OFFSET
    s_n = tl.load(row + 2)  # DESC_STRIDE_N
    s_h = tl.load(row + 4)  # DESC_STRIDE_H
    s_w = tl.load(row + 5)  # DESC_STRIDE_W
    if not INDEX_64:
        s_n = s_n.to(tl.int32)
        s_h = s_h.to(tl.int32)
        s_w = s_w.to(tl.int32)
    if C_CONTIG:
        s_c = 1
    else:
        s_c = tl.load(row + 3)  # DESC_STRIDE_C
        if not INDEX_64:
            s_c = s_c.to(tl.int32)
        s_c = s_c * STRIDE_ALIGN
    return offset, s_n * STRIDE_ALIGN, s_c, s_h * STRIDE_ALIGN, s_w * STRIDE_ALIGN


@triton.jit
def _load_rois(rois_ptr, k, col_ok, canonical_scale, canonical_level, k_min, k_max, NUM_LEVELS: tl.constexpr):
    """RoIs ``k`` (a vector, read where ``col_ok``): batch index, box and level index (0: finest).

    The level is torchvision's LevelMapper in the RoIs' dtype (fp32 or fp64), operation for
    operation: floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped to
    [k_min, k_max]; -1 (no level: the RoI pools zeros, as torchvision's) for a negative area.
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
        size = sqrt_rn((x2 - x1) * (y2 - y1))
        target = tl.floor(canonical_level + tl.log2(div_rn(size, canonical_scale))
                          + tl.full([], 1e-6, size.dtype))  # eps in the RoIs' dtype, as torchvision
        clamped = tl.minimum(tl.maximum(target, k_min.to(size.dtype)), k_max.to(size.dtype))
        lvl = tl.where(target == target, clamped.to(tl.int32) - k_min, -1)  # NaN: no level
    return b, x1, y1, x2, y2, lvl


@triton.jit
def _roi_grid(x1, y1, x2, y2, scale, PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr,
              ALIGNED: tl.constexpr):
    """Start, bin size and samples per bin of RoIs on their level (torchvision's rules).

    Returns (start_y, start_x, bin_h, bin_w, grid_h, grid_w, count); grid_* are int32 (the
    adaptive grid is ceil(roi size / output size) per RoI) and count = max(grid_h * grid_w, 1)
    in the RoIs' dtype.
    """
    offset = 0.5 if ALIGNED else 0.0
    start_x = x1 * scale - offset
    start_y = y1 * scale - offset
    roi_w = (x2 * scale - offset) - start_x
    roi_h = (y2 * scale - offset) - start_y
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = div_rn(roi_h, PH * 1.0)
    bin_w = div_rn(roi_w, PW * 1.0)
    if SAMPLING > 0:
        grid_h = tl.full(roi_h.shape, SAMPLING, tl.int32)
        grid_w = tl.full(roi_w.shape, SAMPLING, tl.int32)
    else:
        grid_h = tl.maximum(tl.ceil(bin_h), 0.0).to(tl.int32)
        grid_w = tl.maximum(tl.ceil(bin_w), 0.0).to(tl.int32)
    count = tl.maximum(grid_h * grid_w, 1).to(x1.dtype)
    return start_y, start_x, bin_h, bin_w, grid_h, grid_w, count


@triton.jit
def _taps(coord, size):
    """torchvision's bilinear rule along one axis for sample positions ``coord``.

    Returns (lo, hi, w_lo, w_hi, inside): the two neighbour indices and their weights; a
    sample outside [-1, size] is not inside (it contributes zero); one in [-1, 0] is clamped
    to 0 and one past size - 1 to the last index.
    """
    size_f = size.to(coord.dtype)
    inside = (coord >= -1.0) & (coord <= size_f)
    c = tl.minimum(tl.maximum(coord, 0.0), size_f)  # the upper clamp only changes outside samples
    lo = c.to(tl.int32)  # c >= 0: truncation is floor
    at_edge = lo >= size - 1
    lo = tl.where(at_edge, size - 1, lo)
    hi = tl.where(at_edge, size - 1, lo + 1)
    frac = tl.where(at_edge, 0.0, c - lo.to(coord.dtype))
    return lo, hi, 1.0 - frac, frac, inside


@triton.jit
def _columns(pid, K, C, PH: tl.constexpr, PW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_C: tl.constexpr, LAYOUT: tl.constexpr):
    """A program's columns (RoI k, bin p) and channels.

    LAYOUT 0 and 1 (a tile of columns x channels): channel blocks vary fastest, then bin
    blocks, so the programs of one RoI run side by side and share its feature rows in cache;
    ``offs_c`` is the tile's BLOCK_C channels. LAYOUT 2 (flat): one RoI per program, whose
    C x PH x PW (channel, bin) elements are cut into runs of BLOCK_P; column q is element q of
    the run and ``offs_c`` its channel, per column. Every lane works wherever BLOCK_P divides
    C x PH x PW (at 256 channels, any power of two up to 256), where a tile of bins idles the
    lanes past PH x PW (15 of 64 at 7x7).
    """
    if LAYOUT == 2:
        num_runs = tl.cdiv(C * (PH * PW), BLOCK_P)
        e = (pid % num_runs) * BLOCK_P + tl.arange(0, BLOCK_P)
        k = pid // num_runs + e * 0
        p = e % (PH * PW)
        offs_c = e // (PH * PW)
        col_ok = (k < K) & (e < C * (PH * PW))
    else:
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


@triton.jit
def _setup(pid, rois_ptr, desc_ptr, K, N, C, canonical_scale, canonical_level, k_min, k_max,
           PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
           NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr, INDEX_64: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, LAYOUT: tl.constexpr):
    """What the forward and the atomic backward compute before sampling, for program ``pid``.

    Returns (k, p, col_ok, offs_c, chan, c_ok, b, lvl_pick, row, height, width, y_bin, x_bin,
    bin_h, bin_w, grid_h, grid_w, count): the columns (``_columns``), whether each is pooled (a
    RoI whose batch index or level is out of range pools zeros), the channels and their element
    offsets in the level's layout (``chan``, ``c_ok``: broadcast against the columns as the
    tile's layout says), each column's image, its level (a scalar with one RoI per program,
    which keeps uniform loads and pointer alignment known), its descriptor row and map size,
    and its bin's start, size and sampling grid (``_roi_grid``).
    """
    Q_AXIS: tl.constexpr = 0 if LAYOUT > 0 else 1
    C_AXIS: tl.constexpr = Q_AXIS if LAYOUT == 2 else 1 - Q_AXIS
    k, p, col_ok, offs_c = _columns(pid, K, C, PH, PW, BLOCK_R, BLOCK_P, BLOCK_C, LAYOUT)
    b, x1, y1, x2, y2, lvl = _load_rois(rois_ptr, k, k < K, canonical_scale, canonical_level, k_min, k_max,
                                        NUM_LEVELS)
    if BLOCK_R == 1:
        lvl_pick = tl.max(lvl, axis=0)
    else:
        lvl_pick = lvl
    row, scale, height, width = _level_size(desc_ptr, lvl_pick, x1.dtype, NUM_LEVELS)
    _, _, s_c, _, _ = _level_layout(row, STRIDE_ALIGN, C_CONTIG, INDEX_64)
    col_ok = col_ok & (b >= 0) & (b < N) & (lvl >= 0) & (lvl < NUM_LEVELS)
    if C_CONTIG:
        chan = tl.expand_dims(offs_c, C_AXIS)
    else:
        chan = tl.expand_dims(offs_c, C_AXIS) * tl.expand_dims(s_c + lvl * 0, Q_AXIS)
    c_ok = tl.expand_dims(offs_c < C, C_AXIS)
    start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _roi_grid(x1, y1, x2, y2, scale, PH, PW, SAMPLING,
                                                                      ALIGNED)
    y_bin = start_y + (p // PW).to(bin_h.dtype) * bin_h
    x_bin = start_x + (p % PW).to(bin_w.dtype) * bin_w
    return k, p, col_ok, offs_c, chan, c_ok, b, lvl_pick, row, height, width, y_bin, x_bin, bin_h, bin_w, grid_h, \
        grid_w, count


# --------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=_NO_SPEC)
def _roi_align_fwd_kernel(
    out_ptr, rois_ptr, desc_ptr, K,
    feat0, feat1, feat2, feat3, feat4,
    N, C, canonical_scale, canonical_level, k_min, k_max,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, LAYOUT: tl.constexpr,
    OUT_CL: tl.constexpr,
):
    """RoI Align forward over all levels in one launch.

    out_ptr: Tensor[K, C, PH, PW], contiguous, or channels-last when OUT_CL; every element is
        written.
    rois_ptr: Tensor[K, 5], contiguous rows (batch_index, x1, y1, x2, y2); their dtype (fp32, or
        fp64 for fp64 features) is the compute and accumulation dtype.
    desc_ptr: the level descriptor, int64 Tensor[MAX_LEVELS, DESC_FIELDS] (offsets 0).
    feat0..feat4: level l's Tensor[N, C, height_l, width_l], its sizes and strides (divided by
        STRIDE_ALIGN; the channel stride is 1 when C_CONTIG) in row l of the descriptor;
        unused levels repeat level 0.
    LAYOUT: the program's tile (see ``_columns``): 0 columns x channels (channels-last), 1
        channels x columns (NCHW through the interpreter), 2 flat runs of one RoI's (channel,
        bin) elements (NCHW on the GPU).
    Grid: one program per (block of BLOCK_R RoIs, block of BLOCK_P bins, block of BLOCK_C
    channels), or with LAYOUT 2 per (RoI, run of BLOCK_P elements).
    """
    Q_AXIS: tl.constexpr = 0 if LAYOUT > 0 else 1  # where expand_dims puts the column axis
    C_AXIS: tl.constexpr = Q_AXIS if LAYOUT == 2 else 1 - Q_AXIS
    (k, p, col_ok, offs_c, chan, c_ok, b, lvl_pick, row, height, width, y_bin, x_bin, bin_h, bin_w, grid_h, grid_w,
     count) = _setup(tl.program_id(0), rois_ptr, desc_ptr, K, N, C, canonical_scale, canonical_level, k_min, k_max,
                     PH, PW, SAMPLING, ALIGNED, NUM_LEVELS, STRIDE_ALIGN, C_CONTIG, INDEX_64, BLOCK_R, BLOCK_P,
                     BLOCK_C, LAYOUT)
    # The column's level's map: its pointer by select among the arguments, its strides from
    # the descriptor row (scalar loads from cache).
    _, s_n, _, s_h, s_w = _level_layout(row, STRIDE_ALIGN, C_CONTIG, INDEX_64)
    base = _pick(lvl_pick, feat0, feat1, feat2, feat3, feat4, NUM_LEVELS) + b.to(tl.int64) * s_n
    grid_h_f = tl.maximum(grid_h, 1).to(bin_h.dtype)  # divisor only: a zero grid takes no samples
    grid_w_f = tl.maximum(grid_w, 1).to(bin_w.dtype)
    if SAMPLING > 0:
        n_y: tl.constexpr = SAMPLING
        n_x: tl.constexpr = SAMPLING
    else:  # the block's largest per-RoI grid (the RoI's own with BLOCK_R = 1); columns mask the rest
        n_y = tl.max(tl.where(col_ok, grid_h, 0), axis=0)
        n_x = tl.max(tl.where(col_ok, grid_w, 0), axis=0)

    if LAYOUT == 2:
        acc = tl.zeros((1, BLOCK_P), bin_h.dtype)
    elif LAYOUT == 1:
        acc = tl.zeros((BLOCK_C, BLOCK_R * BLOCK_P), bin_h.dtype)
    else:
        acc = tl.zeros((BLOCK_R * BLOCK_P, BLOCK_C), bin_h.dtype)
    # Sum of bilinear samples: each sample reads its 4 neighbours straight from the level's map
    # in its own layout (4 * BLOCK_C values per column) and accumulates in registers; no
    # per-level copy, no gathered intermediate (the reference materialises K*C*4*Gy*Gx*PH*PW).
    for iy in range(0, n_y):
        y = y_bin + div_rn((iy + 0.5) * bin_h, grid_h_f)
        y_lo, y_hi, wy_lo, wy_hi, y_in = _taps(y, height)
        y_in = y_in & (iy < grid_h) & col_ok
        row_lo = base + y_lo * s_h
        row_hi = base + y_hi * s_h
        for ix in range(0, n_x):
            x = x_bin + div_rn((ix + 0.5) * bin_w, grid_w_f)
            x_lo, x_hi, wx_lo, wx_hi, x_in = _taps(x, width)
            mask = tl.expand_dims(y_in & x_in & (ix < grid_w), Q_AXIS) & c_ok
            col_lo = x_lo * s_w
            col_hi = x_hi * s_w
            v = tl.load(tl.expand_dims(row_lo + col_lo, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_lo * wx_lo, Q_AXIS) * v.to(acc.dtype)
            v = tl.load(tl.expand_dims(row_lo + col_hi, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_lo * wx_hi, Q_AXIS) * v.to(acc.dtype)
            v = tl.load(tl.expand_dims(row_hi + col_lo, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_hi * wx_lo, Q_AXIS) * v.to(acc.dtype)
            v = tl.load(tl.expand_dims(row_hi + col_hi, Q_AXIS) + chan, mask=mask, other=0.0)
            acc += tl.expand_dims(wy_hi * wx_hi, Q_AXIS) * v.to(acc.dtype)
    acc = div_rn(acc, tl.expand_dims(count, Q_AXIS))

    # Write the tile once, in the output's dtype (zeros for masked-out RoIs).
    if OUT_CL:
        out_col = k.to(tl.int64) * (PH * PW * C) + p * C
        out_chan = offs_c
    else:  # in the flat layout, a run of contiguous elements
        out_col = k.to(tl.int64) * (PH * PW * C) + p
        out_chan = offs_c * (PH * PW)
    out_ptrs = out_ptr + tl.expand_dims(out_col, Q_AXIS) + tl.expand_dims(out_chan, C_AXIS)
    out_mask = tl.expand_dims((k < K) & (p < PH * PW), Q_AXIS) & c_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- backward (atomics)


@triton.jit(do_not_specialize=_NO_SPEC)
def _roi_align_bwd_kernel(
    grad_ptr, grad_out_ptr, rois_ptr, desc_ptr, K,
    go_stride_k, go_stride_c, go_stride_h, go_stride_w,
    N, C, canonical_scale, canonical_level, k_min, k_max,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, LAYOUT: tl.constexpr,
):
    """RoI Align backward over all levels in one launch, by atomic adds in the RoIs' dtype.

    grad_ptr: flat buffer in the RoIs' dtype (fp32 or fp64), zero-filled; level l's gradient
        Tensor[N, C, height_l, width_l] starts at the element its descriptor row's offset
        says, with its strides (times STRIDE_ALIGN).
    grad_out_ptr: Tensor[K, C, PH, PW], any strides (go_stride_*), any float dtype.
    rois_ptr: Tensor[K, 5], contiguous rows, fp32 or fp64 (the compute dtype).
    desc_ptr: the level descriptor, int64 Tensor[MAX_LEVELS, DESC_FIELDS].
    Grid and LAYOUT: as the forward.
    """
    (k, p, col_ok, offs_c, chan, c_ok, b, lvl_pick, row, _, _, y_bin, x_bin, bin_h, bin_w, grid_h, grid_w,
     count) = _setup(tl.program_id(0), rois_ptr, desc_ptr, K, N, C, canonical_scale, canonical_level, k_min, k_max,
                     PH, PW, SAMPLING, ALIGNED, NUM_LEVELS, STRIDE_ALIGN, C_CONTIG, INDEX_64, BLOCK_R, BLOCK_P,
                     BLOCK_C, LAYOUT)
    # The column's level's gradient: an offset into the flat buffer (its row and column
    # strides are read in the sample loops below).
    g_off, s_n, _, _, _ = _level_layout(row, STRIDE_ALIGN, C_CONTIG, INDEX_64)
    base = grad_ptr + g_off + b.to(tl.int64) * s_n
    # The tile's output gradient, read once and divided by the sample count.
    Q_AXIS: tl.constexpr = 0 if LAYOUT > 0 else 1  # as the forward
    C_AXIS: tl.constexpr = Q_AXIS if LAYOUT == 2 else 1 - Q_AXIS
    go_col = k.to(tl.int64) * go_stride_k + (p // PW) * go_stride_h + (p % PW) * go_stride_w
    go_ptrs = grad_out_ptr + tl.expand_dims(go_col, Q_AXIS) + tl.expand_dims(offs_c * go_stride_c, C_AXIS)
    go = tl.load(go_ptrs, mask=tl.expand_dims(col_ok, Q_AXIS) & c_ok, other=0.0).to(bin_h.dtype)
    g = div_rn(go, tl.expand_dims(count, Q_AXIS))
    grid_h_f = tl.maximum(grid_h, 1).to(bin_h.dtype)  # divisor only: a zero grid takes no samples
    grid_w_f = tl.maximum(grid_w, 1).to(bin_w.dtype)
    if SAMPLING > 0:
        n_y: tl.constexpr = SAMPLING
        n_x: tl.constexpr = SAMPLING
    else:
        n_y = tl.max(tl.where(col_ok, grid_h, 0), axis=0)
        n_x = tl.max(tl.where(col_ok, grid_w, 0), axis=0)
    # Each sample adds its 4 weighted taps straight into the level's gradient: one pass
    # over the output gradient, no per-sample or per-level intermediate in memory.
    # The level's height and row stride (and in the inner loop its width and column stride)
    # are read from its descriptor row again at each step: uniform loads that hit L1, which
    # the atomics keep the compiler from hoisting, rather than registers held through the
    # loops (the cost measured: benchmarks/NOTES.md, RoI Align version 1.3).
    for iy in range(0, n_y):
        y = y_bin + div_rn((iy + 0.5) * bin_h, grid_h_f)
        y_lo, y_hi, wy_lo, wy_hi, y_in = _taps(y, tl.load(row + 0).to(tl.int32))  # DESC_HEIGHT
        y_in = y_in & (iy < grid_h) & col_ok
        s_h = tl.load(row + 4)  # DESC_STRIDE_H
        if not INDEX_64:
            s_h = s_h.to(tl.int32)
        row_lo = base + y_lo * (s_h * STRIDE_ALIGN)
        row_hi = base + y_hi * (s_h * STRIDE_ALIGN)
        for ix in range(0, n_x):
            x = x_bin + div_rn((ix + 0.5) * bin_w, grid_w_f)
            x_lo, x_hi, wx_lo, wx_hi, x_in = _taps(x, tl.load(row + 1).to(tl.int32))  # DESC_WIDTH
            mask = tl.expand_dims(y_in & x_in & (ix < grid_w), Q_AXIS) & c_ok
            s_w = tl.load(row + 5)  # DESC_STRIDE_W
            if not INDEX_64:
                s_w = s_w.to(tl.int32)
            s_w = s_w * STRIDE_ALIGN
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
    acc = tl.zeros((cells.shape[0], bin_start.shape[0]), bin_start.dtype)
    for i in range(0, n_samples):
        coord = bin_start + div_rn((i + 0.5) * bin_size, grid_f)
        lo, hi, w_lo, w_hi, inside = _taps(coord, size)
        inside = inside & (i < grid) & col_ok
        w_lo = tl.where(inside, w_lo, 0.0)
        w_hi = tl.where(inside, w_hi, 0.0)
        acc += tl.where(cells[:, None] == lo[None, :], w_lo[None, :], 0.0)
        acc += tl.where(cells[:, None] == hi[None, :], w_hi[None, :], 0.0)
    return acc


@triton.jit
def _roi_tiles(rois_ptr, desc_ptr, k, ok, N, canonical_scale, canonical_level, k_min, k_max,
               PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr,
               TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The rectangle of gradient tiles RoIs ``k`` (read where ``ok``) can reach on their level.

    Returns (first, tiles_x, ty0, tx0, ny, nx): tile (ty0 + i, tx0 + j), i < ny, j < nx, is
    numbered ``first + (ty0 + i) * tiles_x + tx0 + j`` (``first``: the tile of the RoI's image's
    origin on its level); ny = nx = 0 for a RoI that pools zeros (batch index or level out of
    range, or a box wholly off its map). A sample lies between the scaled box's ends (up to
    rounding) and touches the two cells around it after clamping, so the cells from one
    before the box's first to two past its last cover every tap.
    """
    b, x1, y1, x2, y2, lvl = _load_rois(rois_ptr, k, ok, canonical_scale, canonical_level, k_min, k_max,
                                        NUM_LEVELS)
    row, scale, height, width = _level_size(desc_ptr, lvl, x1.dtype, NUM_LEVELS)
    start_y, start_x, bin_h, bin_w, _, _, _ = _roi_grid(x1, y1, x2, y2, scale, PH, PW, 1, ALIGNED)
    end_y = start_y + PH * bin_h
    end_x = start_x + PW * bin_w
    # Cell bounds clamped in floating point (boxes may lie far off the map) before the int cast.
    h_f = height.to(x1.dtype)
    w_f = width.to(x1.dtype)
    y_lo = tl.maximum(tl.floor(tl.minimum(start_y, end_y)) - 1.0, 0.0)
    y_hi = tl.minimum(tl.floor(tl.maximum(start_y, end_y)) + 2.0, h_f - 1.0)
    x_lo = tl.maximum(tl.floor(tl.minimum(start_x, end_x)) - 1.0, 0.0)
    x_hi = tl.minimum(tl.floor(tl.maximum(start_x, end_x)) + 2.0, w_f - 1.0)
    live = ok & (b >= 0) & (b < N) & (lvl >= 0) & (lvl < NUM_LEVELS) & (y_lo <= y_hi) & (x_lo <= x_hi)
    ty0 = tl.where(live, y_lo, 0.0).to(tl.int32) // TILE_H
    tx0 = tl.where(live, x_lo, 0.0).to(tl.int32) // TILE_W
    ny = tl.where(live, tl.where(live, y_hi, 0.0).to(tl.int32) // TILE_H - ty0 + 1, 0)
    nx = tl.where(live, tl.where(live, x_hi, 0.0).to(tl.int32) // TILE_W - tx0 + 1, 0)
    tiles_x = tl.cdiv(width, TILE_W)
    first = tl.load(row + 8).to(tl.int64) + b.to(tl.int64) * (tl.cdiv(height, TILE_H) * tiles_x)  # DESC_TILE_START
    return first, tiles_x, ty0, tx0, ny, nx


@triton.jit(do_not_specialize=_NO_SPEC + ["NB"])
def _roi_align_bin_kernel(
    rois_ptr, desc_ptr, cursor_ptr, list_ptr, K, N, NB, canonical_scale, canonical_level, k_min, k_max,
    PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, NUM_LEVELS: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, ROIS: tl.constexpr, BLOCK_T: tl.constexpr, FILL: tl.constexpr,
):
    """The deterministic backward's counting sort of RoIs into gradient tiles, one pass of two.

    cursor_ptr: int64 Tensor[tiles, NB]: entry (t, g) counts the RoIs of block g (RoIs
        g * ROIS ... g * ROIS + ROIS - 1) that reach tile t. Counting pass (FILL False): zeros
        in, counts out. Filling pass: in, the position in ``list_ptr`` of the entry's first
        RoI (the exclusive prefix sum of the counts, tile-major); each RoI k reaching tile t is
        written there as k, and the cursor advances.
    Grid: (NB,). A program takes its block's RoIs one after the other, each RoI's tiles as one
    vector of BLOCK_T, and a barrier between RoIs orders its cursor updates: every tile's list
    is so in increasing RoI order, whatever order the programs run in. The work is the
    (RoI, tile) pairs, not tiles x RoIs.
    """
    g = tl.program_id(0)
    j = tl.arange(0, BLOCK_T)
    # The block's RoIs as one vector; each is then taken out by a reduction (a scalar).
    r = tl.arange(0, ROIS)
    first_r, tiles_x_r, ty0_r, tx0_r, ny_r, nx_r = _roi_tiles(rois_ptr, desc_ptr, g * ROIS + r, g * ROIS + r < K, N,
                                                              canonical_scale, canonical_level, k_min, k_max, PH, PW,
                                                              ALIGNED, NUM_LEVELS, TILE_H, TILE_W)
    for i in range(0, ROIS):  # RoIs past K reach no tile (ny = nx = 0)
        k = g * ROIS + i
        first = tl.sum(tl.where(r == i, first_r, 0), axis=0)
        tiles_x = tl.sum(tl.where(r == i, tiles_x_r, 0), axis=0)
        ty0 = tl.sum(tl.where(r == i, ty0_r, 0), axis=0)
        tx0 = tl.sum(tl.where(r == i, tx0_r, 0), axis=0)
        ny = tl.sum(tl.where(r == i, ny_r, 0), axis=0)
        nx = tl.sum(tl.where(r == i, nx_r, 0), axis=0)
        for j0 in range(0, ny * nx, BLOCK_T):
            t_ok = j0 + j < ny * nx
            tile = first + ((ty0 + (j0 + j) // nx) * tiles_x + tx0 + (j0 + j) % nx)
            ptrs = cursor_ptr + tile * NB + g
            at = tl.load(ptrs, mask=t_ok, other=0)
            if FILL:
                tl.store(list_ptr + at, k + j * 0, mask=t_ok)
            tl.store(ptrs, at + 1, mask=t_ok)
        tl.debug_barrier()  # the next RoI's tiles may share this one's cursors


@triton.jit(do_not_specialize=["NB"])
def _roi_align_bwd_det_kernel(
    grad_ptr, grad_out_ptr, rois_ptr, desc_ptr, list_ptr, ends_ptr, NB,
    go_stride_k, go_stride_c, go_stride_h, go_stride_w, C,
    PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr,
    NUM_LEVELS: tl.constexpr, STRIDE_ALIGN: tl.constexpr, C_CONTIG: tl.constexpr, INDEX_64: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    P_CHUNK: tl.constexpr,
):
    """RoI Align backward, deterministic: every gradient cell is gathered by exactly one program.

    grad_ptr: flat buffer in the RoIs' dtype (need not be initialised); level l's gradient
        Tensor[N, C, height_l, width_l] starts at the element its descriptor row's offset says,
        with its strides (times STRIDE_ALIGN); every element of it is written.
    grad_out_ptr: Tensor[K, C, PH, PW], any strides (go_stride_*), any float dtype.
    rois_ptr: Tensor[K, 5], contiguous rows, fp32 or fp64 (the compute dtype).
    desc_ptr: the level descriptor, int64 Tensor[MAX_LEVELS, DESC_FIELDS].
    list_ptr, ends_ptr: the RoIs binned by ``_roi_align_bin_kernel``: tile t's RoIs are
        list[ends[t * NB - 1] : ends[t * NB + NB - 1]] (from 0 for t = 0), in increasing order;
        ends is the inclusive prefix sum of the counts.
    Grid: (tiles, channel blocks); tiles enumerate (level, image, TILE_H x TILE_W cells), level
    l's tiles numbered from its descriptor row's tile start.

    Bilinear weights are separable and a bin's samples form a product grid, so the gradient
    a column q = (RoI k, bin p) sends to cell t is Wy[t, q] * Wx[t, q] * grad_out[k, :, p] / count.
    A program walks its tile's list, BLOCK_R RoIs and P_CHUNK bins at a time, and adds one
    matrix product (Wy * Wx) @ grad_out per step: a fixed summation order, no float atomics,
    so the result is bitwise reproducible. The work is the (RoI, tile) pairs times the bins:
    a tile never looks at a RoI that cannot reach it.
    """
    # The program's level: how many levels' first tiles it is past (NUM_LEVELS - 1 uniform
    # scalar loads, independent of each other), then that level's row.
    pid = tl.program_id(0)
    lvl = pid * 0
    for l in tl.static_range(1, NUM_LEVELS):
        lvl += (pid >= tl.load(desc_ptr + l * 9 + 8).to(tl.int32)).to(tl.int32)  # DESC_TILE_START
    first_tile = tl.load(desc_ptr + lvl * 9 + 8).to(tl.int32)  # DESC_FIELDS, DESC_TILE_START
    row, scale, height, width = _level_size(desc_ptr, lvl, rois_ptr.dtype.element_ty, NUM_LEVELS)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C

    tiles_x = tl.cdiv(width, TILE_W)
    tiles_img = tl.cdiv(height, TILE_H) * tiles_x
    local = pid - first_tile
    n = local // tiles_img
    tile_y0 = (local % tiles_img) // tiles_x * TILE_H
    tile_x0 = (local % tiles_img) % tiles_x * TILE_W
    rows = tile_y0 + tl.arange(0, TILE_H)
    cols = tile_x0 + tl.arange(0, TILE_W)
    # The tile's slice of the list: [ends[pid * NB - 1], ends[pid * NB + NB - 1]).
    seg = ends_ptr + pid.to(tl.int64) * NB
    lo = tl.load(seg - 1, mask=pid > 0, other=0)
    hi = tl.load(seg + NB - 1)

    acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), scale.dtype)
    q = tl.arange(0, BLOCK_R * P_CHUNK)
    for r0 in range(lo, hi, BLOCK_R):
        # The step's RoIs: column q belongs to the list's entry r0 + q // P_CHUNK. All are
        # pooled from this tile's level and image (the binning computed their level).
        in_step = r0 + q // P_CHUNK < hi
        k = tl.load(list_ptr + r0 + q // P_CHUNK, mask=in_step, other=0)
        # Each bin chunk recomputes the geometry from the (cached) RoI rows rather than keep
        # it live across the chunk loop (registers).
        for p0 in range(0, PH * PW, P_CHUNK):
            p = p0 + q % P_CHUNK
            _, x1, y1, x2, y2, _ = _load_rois(rois_ptr, k, in_step, 0.0, 0.0, 0, 0, 1)  # 1 level: no mapping
            start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _roi_grid(x1, y1, x2, y2, scale, PH, PW,
                                                                              SAMPLING, ALIGNED)
            col_ok = in_step & (p < PH * PW)
            if SAMPLING > 0:
                n_y: tl.constexpr = SAMPLING
                n_x: tl.constexpr = SAMPLING
            else:  # the step's largest grid; other columns are masked
                n_y = tl.max(tl.where(col_ok, grid_h, 0), axis=0)
                n_x = tl.max(tl.where(col_ok, grid_w, 0), axis=0)
            # Per-axis weights [TILE_H, Q] and [TILE_W, Q], then their outer product over the
            # tile's cells (row-major, as the store below).
            wy = _axis_weights(rows, start_y + (p // PW).to(bin_h.dtype) * bin_h, bin_h, grid_h,
                               tl.maximum(grid_h, 1).to(bin_h.dtype), n_y, height, col_ok)
            wx = _axis_weights(cols, start_x + (p % PW).to(bin_w.dtype) * bin_w, bin_w, grid_w,
                               tl.maximum(grid_w, 1).to(bin_w.dtype), n_x, width, col_ok)
            w = tl.reshape(wy[:, None, :] * wx[None, :, :], (TILE_H * TILE_W, BLOCK_R * P_CHUNK))
            go_col = k.to(tl.int64) * go_stride_k + (p // PW) * go_stride_h + (p % PW) * go_stride_w
            go = tl.load(grad_out_ptr + go_col[:, None] + (offs_c * go_stride_c)[None, :],
                         mask=col_ok[:, None] & c_ok[None, :], other=0.0).to(acc.dtype)
            g = div_rn(go, count[:, None])
            if acc.dtype == tl.float64:
                # Triton 3.6 has no fp64 dot: the same product as a broadcast multiply and a
                # sum over the columns (P_CHUNK is small in fp64).
                acc += tl.sum(w[:, :, None] * g[None, :, :], axis=1)
            else:
                acc = tl.dot(w, g, acc, input_precision="ieee")

    # Every cell of the tile is written (zero where no RoI reaches it). The gradient's layout
    # is read only now, so that it does not hold registers through the RoI loop.
    g_off, s_n, s_c, s_h, s_w = _level_layout(row, STRIDE_ALIGN, C_CONTIG, INDEX_64)
    if C_CONTIG:
        c_off = offs_c
    else:
        c_off = offs_c * s_c
    cell_rows = tile_y0 + tl.arange(0, TILE_H * TILE_W) // TILE_W
    cell_cols = tile_x0 + tl.arange(0, TILE_H * TILE_W) % TILE_W
    ptrs = (grad_ptr + g_off + n.to(tl.int64) * s_n + (cell_rows * s_h + cell_cols * s_w)[:, None]
            + c_off[None, :])
    mask = ((cell_rows < height) & (cell_cols < width))[:, None] & c_ok[None, :]
    tl.store(ptrs, acc, mask=mask)


# --------------------------------------------------------------------------- launchers


# Host arithmetic in plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
# functions, whose host call costs a few microseconds each (five of them per launch).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


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


def _float_bits(x: float, f64: bool) -> int:
    """The bits of ``x`` in fp64, or rounded to fp32 (as the JIT passes a float argument)."""
    return struct.unpack("<q", struct.pack("<d", x))[0] if f64 else struct.unpack("<i", struct.pack("<f", x))[0]


def _level_rows(shapes, strides, scales, c_contig: bool, f64: bool, offsets=None, tile_starts=None):
    """The level descriptor's rows (see DESC_FIELDS), unused levels repeating level 0.

    Returns (rows, STRIDE_ALIGN, INDEX_64): strides are stored divided by STRIDE_ALIGN (the
    channel stride as 0 when ``c_contig``: the kernel does not read it); INDEX_64 is set when
    an element's offset inside one image (channel, row and column terms, computed in 32 bits
    otherwise) can reach 2**31; the image's offset (batch index times its stride) and the
    level's are int64 in the kernel either way.
    """
    align = _stride_align([v for st in strides for i, v in enumerate(st) if not (c_contig and i == 1)])
    rows = []
    for i, ((_, _, h, w), (sn, sc, sh, sw), scale) in enumerate(zip(shapes, strides, scales)):
        row = [0] * DESC_FIELDS
        row[DESC_HEIGHT], row[DESC_WIDTH] = int(h), int(w)
        row[DESC_STRIDE_N], row[DESC_STRIDE_H], row[DESC_STRIDE_W] = sn // align, sh // align, sw // align
        row[DESC_STRIDE_C] = 0 if c_contig else sc // align
        row[DESC_SCALE] = _float_bits(float(scale), f64)
        row[DESC_OFFSET] = offsets[i] if offsets else 0
        row[DESC_TILE_START] = tile_starts[i] if tile_starts else 0
        rows.append(row)
    index_64 = any((c - 1) * abs(sc) + (h - 1) * abs(sh) + (w - 1) * abs(sw) >= 2**31 or abs(sn) >= 2**31
                   for (_, c, h, w), (sn, sc, sh, sw) in zip(shapes, strides))
    return rows + [rows[0]] * (MAX_LEVELS - len(rows)), align, index_64


def _descriptor(rows, device: torch.device):
    """``rows`` as an int64 Tensor on ``device``, and the host tensor it is copied from.

    On CUDA the copy is one asynchronous copy from pinned memory on the current stream (no
    host sync); the caller keeps the pinned source alive with the descriptor, so that a copy
    captured in a CUDA graph replays the same values. Built outside inference mode, as
    ``fastmask.ops._device.device_constant``, so that a cached table is usable in any mode.
    """
    with torch.inference_mode(False):
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True), host


try:  # the current stream's handle, as Triton's launcher reads it (about 0.1 us)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # a torch build without CUDA: never called with a CUDA device
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def _stream_key(device: torch.device):
    """The current stream on a CUDA ``device`` (None elsewhere). Descriptors are cached per
    stream: a table copied on one stream is ordered before that stream's later kernels only,
    so another stream gets its own copy rather than a wait."""
    return _raw_stream(device.index) if device.type == "cuda" else None


# Launch plans (the level descriptor on the device and the host-side constants derived with
# it), keyed by everything they are computed from. A model calls the op with a handful of
# feature geometries, so a call almost always finds its plan; the bound only keeps a stream
# of new image sizes from growing the cache without limit (oldest plans are dropped first).
_PLAN_CACHE_SIZE = 256
_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}


def _keep(cache: dict, key, plan):
    """Store ``plan`` under ``key``, first dropping the oldest plan when the cache is full."""
    if len(cache) >= _PLAN_CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = plan
    return plan


def _fwd_plan(features, scales, f64: bool, device: torch.device):
    """(descriptor, pinned source, STRIDE_ALIGN, C_CONTIG, channels-last output, INDEX_64) for
    features of these shapes and strides at these scales."""
    shapes, strides = [f.shape for f in features], [f.stride() for f in features]
    c_contig = all(st[1] == 1 for st in strides)
    rows, align, index_64 = _level_rows(shapes, strides, scales, c_contig, f64)
    desc, host = _descriptor(rows, device)
    return desc, host, align, c_contig, all(is_channels_last(f) for f in features), index_64


# GPU NCHW: (channel, bin) elements per program of the flat layout (see ``_tile_config``).
FLAT_RUN = 256


def _tile_config(device: torch.device, k: int, c: int, n_bins: int, channels_last: bool, f64: bool = False,
                 block_r=None, block_p=None, block_c=None, layout=None):
    """(BLOCK_R, BLOCK_P, BLOCK_C, num_warps, LAYOUT) for the forward and atomic backward kernels.

    GPU, channels-last (LAYOUT 0): one program per (RoI, bin) with a contiguous vector of up
    to 256 channels, 2 warps. GPU, NCHW (LAYOUT 2, flat): one RoI per program, runs of
    FLAT_RUN of its (channel, bin) elements, one per thread (two per thread took twice the
    registers). fp64 (``f64``, gradcheck's dtype) takes runs half as long. Interpreter
    (CPU, LAYOUT 1 or 0): each operation costs the same whatever the block, so a program
    takes up to 32 whole RoIs with all their channels (up to 64). The register counts behind
    these shapes: benchmarks/NOTES.md, RoI Align.
    """
    if not gpu_launch(device):
        br, bp, bc, lay = min(32, _pow2(max(k, 1))), _pow2(n_bins), min(64, _pow2(c)), 0 if channels_last else 1
    elif channels_last:
        br, bp, bc, lay = 1, 1, min(256, _pow2(c)), 0
    else:
        br, bp, bc, lay = 1, FLAT_RUN // 2 if f64 else FLAT_RUN, 1, 2
    br, bp, bc = block_r or br, block_p or bp, block_c or bc
    lay = lay if layout is None else layout
    if lay == 2:
        warps = max(1, min(8, bp // 32))
    else:
        warps = max(1, min(8, br * bp * bc // (64 if f64 else 128)))
    return br, bp, bc, warps, lay


def roi_align_fwd(features: list[torch.Tensor], rois: torch.Tensor, output_size: tuple[int, int],
                  scales: list[float], sampling_ratio: int, aligned: bool, *, canonical_scale: float = 224.0,
                  canonical_level: int = 4, k_min: int = 0, k_max: int = 0, out: torch.Tensor | None = None,
                  block_r: int | None = None, block_p: int | None = None,
                  block_c: int | None = None, layout: int | None = None) -> torch.Tensor:
    """RoI Align over ``features`` (one Tensor[N, C, H_l, W_l] per level, finest first).

    ``rois``: Tensor[K, 5], contiguous, fp32 (fp64 for fp64 features: the compute dtype).
    With one level every RoI is pooled from it; with several, each RoI's level is computed in
    the kernel (canonical_scale/level, clamped to [k_min, k_max]). Returns Tensor[K, C, PH, PW] in
    the features' dtype, channels-last when the features are. ``out``: a preallocated output
    (contiguous or channels-last), e.g. NaN-filled by tests.
    ``block_r``/``block_p``/``block_c``/``layout``: override the block shape and layout (tests
    run the GPU's through the interpreter with them).
    """
    f0 = features[0]
    n, c = f0.shape[:2]
    k = rois.shape[0]
    ph, pw = output_size
    device = f0.device
    # The level descriptor and layout flags: computed and copied once per geometry, then a
    # dictionary lookup (the key is every input they are computed from).
    f64 = rois.dtype == torch.float64
    key = (device, _stream_key(device), f64, tuple(scales), tuple([(f.shape, f.stride()) for f in features]))
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _keep(_FWD_PLANS, key, _fwd_plan(features, scales, f64, device))
    desc, _, align, c_contig, channels_last, index_64 = plan
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((k, c, ph, pw), dtype=f0.dtype, device=device, memory_format=fmt)
    if k == 0 or c == 0:
        return out
    out_cl = not out.is_contiguous()
    if out_cl and not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("roi_align_fwd: out must be contiguous or channels-last")
    br, bp, bc, warps, layout = _tile_config(device, k, c, ph * pw, channels_last, f64, block_r, block_p, block_c,
                                             layout)
    feats = list(features) + [f0] * (MAX_LEVELS - len(features))
    grid = (_grid_size(k, c, ph * pw, br, bp, bc, layout),)
    _roi_align_fwd_kernel[grid](
        out, rois, desc, k,
        feats[0], feats[1], feats[2], feats[3], feats[4],
        n, c, float(canonical_scale), float(canonical_level), int(k_min), int(k_max),
        PH=ph, PW=pw, SAMPLING=max(int(sampling_ratio), 0), ALIGNED=bool(aligned), NUM_LEVELS=len(features),
        STRIDE_ALIGN=align, C_CONTIG=c_contig, INDEX_64=index_64,
        BLOCK_R=br, BLOCK_P=bp, BLOCK_C=bc, LAYOUT=layout, OUT_CL=out_cl, num_warps=warps,
    )
    return out


def _grid_size(k: int, c: int, n_bins: int, br: int, bp: int, bc: int, layout: int) -> int:
    """Programs of the forward / atomic backward: per (RoI block, bin block, channel block), or
    per (RoI, run of BLOCK_P (channel, bin) elements) in the flat layout; at most 2**31 - 1."""
    programs = k * _cdiv(c * n_bins, bp) if layout == 2 else _cdiv(k, br) * _cdiv(n_bins, bp) * _cdiv(c, bc)
    _check_grid(programs, k)
    return programs


def _check_grid(programs: int, k: int) -> None:
    """The one-axis grid must stay under CUDA's 2**31 programs (RoIs x bin blocks x channel blocks)."""
    if programs >= 2**31:
        raise ValueError(f"roi_align: {k} RoIs need {programs} programs, past the GPU's 2**31 - 1; "
                         "split the RoIs into several calls")


def _grad_layout(shapes, channels_last: list[bool]):
    """Strides and element offsets of the per-level gradients inside one flat buffer; each
    level is dense, channels-last where its input was."""
    strides, offsets, total = [], [], 0
    for (n, c, h, w), cl in zip(shapes, channels_last):
        strides.append((h * w * c, 1, w * c, c) if cl else (c * h * w, h * w, w, 1))
        offsets.append(total)
        total += n * c * h * w
    return strides, offsets, total


def _det_config(device: torch.device, shapes, k: int, c: int, n_bins: int, f64: bool = False):
    """(TILE_H, TILE_W, BLOCK_C, BLOCK_R, P_CHUNK) for the deterministic backward.

    GPU: 8x8 cells x 32 channels, one RoI and 32 bins per step (a 64x32x32 product), 8 warps:
    the largest tile that compiles without spills under Triton 3.6 (register counts and the
    shapes that spilled: benchmarks/NOTES.md, RoI Align). Interpreter: tiles of up to 16x32
    cells and up to 32 RoIs per step, so that few programs and few steps cover the levels.
    fp64 (``f64``, for gradcheck; not the model's dtype) multiplies by a broadcast and a sum,
    whose [cells, columns, channels] product is held whole: 4 bins per step.
    """
    if not gpu_launch(device):
        th = max(4, min(16, _pow2(max(s[2] for s in shapes))))
        tw = max(4, min(32, _pow2(max(s[3] for s in shapes))))
        bc = max(16, min(64, _pow2(c)))
        p_chunk = 4 if f64 else max(16, min(64, _pow2(n_bins)))
        return th, tw, bc, min(32, _pow2(max(k, 1))), p_chunk
    return 8, 8, 32, 1, 4 if f64 else 32


# The deterministic backward's counting sort. Each program of the binning kernel takes
# BIN_ROIS RoIs in order (more when the per-(tile, RoI block) counts would pass
# BIN_COUNTS_MAX entries); its vector of tiles is BIN_TILES wide on the GPU (a box-head RoI
# reaches about 2-40 tiles of 8x8 cells) and wider through the interpreter.
BIN_ROIS = 8
BIN_ROIS_INTERPRETER = 64
BIN_COUNTS_MAX = 1 << 22
BIN_TILES = 64
# The RoI list is allocated at its bound (every RoI reaching every tile of an image of its
# level), which needs no sync, up to this many entries; past it, the exact size is read back.
BIN_LIST_MAX = 1 << 26


def _tiles_per_image(shapes, th: int, tw: int) -> int:
    """The most tiles one image has on any level: the most one RoI can reach."""
    return max(_cdiv(s[2], th) * _cdiv(s[3], tw) for s in shapes)


def _bin_rois(rois: torch.Tensor, desc: torch.Tensor, k: int, n: int, num_tiles: int, tiles_per_image: int,
              geometry: tuple):
    """RoIs binned by the gradient tiles they reach: (list, ends, NB), as
    ``_roi_align_bwd_det_kernel`` reads them (tile t's RoIs are list[ends[t * NB - 1] :
    ends[t * NB + NB - 1]], in increasing order).

    Two launches of ``_roi_align_bin_kernel`` around a prefix sum: counts per (tile, block of
    RoIs), their inclusive sum, and the fill, each block's RoIs placed in order after the
    counts of the blocks before it. Bitwise the same lists on every run (integer work only).
    ``geometry``: (canonical_scale, canonical_level, k_min, k_max, PH, PW, ALIGNED,
    NUM_LEVELS, TILE_H, TILE_W).
    """
    device = rois.device
    per = BIN_ROIS if gpu_launch(device) else BIN_ROIS_INTERPRETER
    while num_tiles * _cdiv(k, per) > BIN_COUNTS_MAX:
        per *= 2
    nb = max(1, _cdiv(k, per))
    block_t = BIN_TILES if gpu_launch(device) else 256
    scale, level, k_min, k_max, ph, pw, aligned, levels, th, tw = geometry

    def launch(cursor, rois_list, fill):
        _roi_align_bin_kernel[(nb,)](
            rois, desc, cursor, rois_list, k, n, nb, scale, level, k_min, k_max,
            PH=ph, PW=pw, ALIGNED=aligned, NUM_LEVELS=levels, TILE_H=th, TILE_W=tw, ROIS=per, BLOCK_T=block_t,
            FILL=fill, num_warps=2 if gpu_launch(device) else 1,
        )

    counts = torch.zeros(num_tiles * nb, dtype=torch.int64, device=device)
    launch(counts, counts, False)
    ends = torch.cumsum(counts, 0)
    bound = k * tiles_per_image
    if bound > BIN_LIST_MAX:  # huge maps: allocate the exact size, at the cost of a host sync
        bound = int(ends[-1])
    rois_list = torch.empty(max(bound, 1), dtype=torch.int32, device=device)
    launch(ends - counts, rois_list, True)
    return rois_list, ends, nb


def _bwd_plan(shapes, channels_last, scales, tiling, f64: bool, device: torch.device):
    """(descriptor, pinned source, gradient strides, offsets, total size, tiles, STRIDE_ALIGN,
    C_CONTIG, INDEX_64) for gradients of these shapes and layouts; ``tiling``: the deterministic
    backward's (TILE_H, TILE_W), whose tile numbering the descriptor holds (None: atomic)."""
    strides, offsets, total = _grad_layout(shapes, channels_last)
    c_contig = all(channels_last)
    tile_starts, num_tiles = None, 0
    if tiling is not None:
        th, tw = tiling
        tiles = [s[0] * _cdiv(s[2], th) * _cdiv(s[3], tw) for s in shapes]
        tile_starts, num_tiles = [sum(tiles[:i]) for i in range(len(tiles))], sum(tiles)
    rows, align, index_64 = _level_rows(shapes, strides, scales, c_contig, f64, offsets, tile_starts)
    desc, host = _descriptor(rows, device)
    return desc, host, strides, offsets, total, num_tiles, align, c_contig, index_64


def roi_align_bwd(grad_out: torch.Tensor, rois: torch.Tensor, shapes: list[tuple[int, int, int, int]],
                  channels_last: list[bool], output_size: tuple[int, int], scales: list[float],
                  sampling_ratio: int, aligned: bool, *, canonical_scale: float = 224.0, canonical_level: int = 4,
                  k_min: int = 0, k_max: int = 0, deterministic: bool = False, grad_dtype: torch.dtype | None = None,
                  out: torch.Tensor | None = None, block_r: int | None = None, block_p: int | None = None,
                  block_c: int | None = None, layout: int | None = None) -> list[torch.Tensor]:
    """Gradients of RoI Align w.r.t. every level, in one launch (plus one cast for fp16/bf16).

    ``grad_out``: Tensor[K, C, PH, PW], any strides; ``shapes``: each level's (N, C, H, W);
    ``channels_last``: per level, the layout of its gradient. Accumulates in one flat buffer in
    ``rois``' dtype (fp32, or fp64) and returns per-level views of it, cast once to ``grad_dtype``
    (default: that dtype). ``out``: a preallocated buffer of the total size (the deterministic kernel writes all
    of it, so tests can fill it with NaN; the atomic kernel adds into it, so it must be zero).
    ``deterministic``: gather per gradient cell (bitwise reproducible) instead of atomic adds.
    """
    device = grad_out.device
    n, c = shapes[0][:2]
    k = rois.shape[0]
    ph, pw = output_size
    if deterministic:
        th, tw, bc, br, p_chunk = _det_config(device, shapes, k, c, ph * pw, rois.dtype == torch.float64)
        br, bc = block_r or br, block_c or bc
        tiling = (th, tw)
    else:
        tiling = None
    # The level descriptor (sizes, strides, gradient offsets, tile starts) and the gradient
    # layout: computed and copied once per geometry, then a dictionary lookup.
    f64 = rois.dtype == torch.float64
    key = (device, _stream_key(device), f64, tiling, tuple(scales), tuple(map(tuple, shapes)), tuple(channels_last))
    plan = _BWD_PLANS.get(key)
    if plan is None:
        plan = _keep(_BWD_PLANS, key, _bwd_plan(shapes, channels_last, scales, tiling, f64, device))
    desc, _, strides, offsets, total, num_tiles, align, c_contig, index_64 = plan
    if out is None:
        out = (torch.empty if deterministic else torch.zeros)(total, dtype=rois.dtype, device=device)
    gs = grad_out.stride()
    if total and deterministic:
        # RoIs binned into the tiles they reach (a counting sort on the device), then one
        # program per (level, image, TILE_H x TILE_W cell tile) x channel block walks its list.
        geometry = (float(canonical_scale), float(canonical_level), int(k_min), int(k_max), ph, pw, bool(aligned),
                    len(shapes), th, tw)
        rois_list, ends, nb = _bin_rois(rois, desc, k, n, num_tiles, _tiles_per_image(shapes, th, tw), geometry)
        grid = (num_tiles, _cdiv(c, bc))
        _roi_align_bwd_det_kernel[grid](
            out, grad_out, rois, desc, rois_list, ends, nb,
            gs[0], gs[1], gs[2], gs[3], c,
            PH=ph, PW=pw, SAMPLING=max(int(sampling_ratio), 0), ALIGNED=bool(aligned), NUM_LEVELS=len(shapes),
            STRIDE_ALIGN=align, C_CONTIG=c_contig, INDEX_64=index_64,
            TILE_H=th, TILE_W=tw, BLOCK_C=bc, BLOCK_R=br, P_CHUNK=p_chunk,
            num_warps=8 if gpu_launch(device) else 4,
        )
    elif total and k:
        br, bp, bc, warps, layout = _tile_config(device, k, c, ph * pw, c_contig, f64, block_r, block_p, block_c,
                                                 layout)
        grid = (_grid_size(k, c, ph * pw, br, bp, bc, layout),)
        _roi_align_bwd_kernel[grid](
            out, grad_out, rois, desc, k,
            gs[0], gs[1], gs[2], gs[3],
            n, c, float(canonical_scale), float(canonical_level), int(k_min), int(k_max),
            PH=ph, PW=pw, SAMPLING=max(int(sampling_ratio), 0), ALIGNED=bool(aligned), NUM_LEVELS=len(shapes),
            STRIDE_ALIGN=align, C_CONTIG=c_contig, INDEX_64=index_64,
            BLOCK_R=br, BLOCK_P=bp, BLOCK_C=bc, LAYOUT=layout, num_warps=warps,
        )
    flat = out if grad_dtype in (None, out.dtype) else out.to(grad_dtype)
    return [flat[o:o + s[0] * s[1] * s[2] * s[3]].as_strided(tuple(s), st)
            for s, st, o in zip(shapes, strides, offsets)]
