"""Triton kernels for greedy NMS over boxes sorted into runs, entirely on the GPU.

Every box gets one int64 sort key (``_nms_key_kernel``)::

    key = image << (32 + CLS_BITS) | (class mod 2**CLS_BITS) << 32 | descending score (32 bits)

and one ``torch.sort(key, stable=True)`` puts the boxes in the order the greedy walk needs:
by image, then class, then decreasing score, equal keys (tied scores) in input order. The
32 score bits are the fp32 score's bits made order-preserving (fp16/bf16 widen exactly;
``-0.0`` counts as ``+0.0``); fp64 scores are first sorted stably by ``torch.sort`` and their
rank takes the 32 bits. Padding boxes (``valid`` False) get the largest int64, so they sort
after every real box and form one run of their own that the kernels skip. A run is a stretch
of sorted positions with the same key prefix ``key >> 32`` (image and class bits); box ``j >
i`` can only be suppressed by box ``i`` of its own run. When the class does not fit in
CLS_BITS (int32/int64 classes) two classes may share a run, interleaved by score; the mask
kernels then also compare the classes themselves (``EXACT``), and greedy NMS over the run
with that pair test is per-class greedy NMS, since each class keeps its own score order.

The kernels read the input boxes and classes through the sort's permutation (``src``) and
find run boundaries from the sorted keys themselves (a run starts where the prefix changes;
its end is found by a 64-way search of the sorted keys), so there is no gather pass, no
segment table (the old ~20 scan/where/flip ops) and no scatter back to input order: the
reduce kernel writes the keep flags at ``src[pos]``. For the RPN, whose candidates are
already grouped by FPN level and sorted by score inside each level (``PRESORTED``: no key,
no sort), a run is a stretch of equal (image, level) in input order and positions are input
positions.

The sorted boxes are processed in chunks of ``C`` positions, which bounds the memory at
``C * C / 8`` bytes of suppression bits. Up to ``SINGLE_CHUNK_MAX`` boxes are one chunk;
above, ``_nms_gather_kernel`` first copies the boxes (and EXACT classes) into sorted order
once, since the cross-chunk kernel reads every earlier row of a run for each 64 columns:

1. ``_nms_cross_kernel`` (chunks after the first): for every box of the chunk, whether a
   box already kept in an earlier chunk of its run suppresses it. Those decisions are
   final, so this is one parallel OR over rows: one program per (64 columns, CROSS_SPAN
   earlier rows), each ORing its word into the chunk's "removed" words with an atomic (an
   OR of bits is the same in any order, so the result is deterministic).
2. ``_nms_mask_kernel``: the suppression bits of every pair (row i < column j) of the
   chunk in the same run, packed into 64-bit words; tiles whose rows and columns share no
   run are skipped (with 80 classes nearly all of them).
3. ``_nms_reduce_kernel``: the greedy walk over a window of up to WALK_WINDOW positions of
   the chunk. One program per run start (runs are independent), walking its boxes 64 at a
   time: the block's 64 diagonal words are resolved in registers, then the rows kept are
   ORed into a "removed" bit-vector of the window's words, held in registers. Nothing goes
   back to the host.
4. ``_nms_push_kernel`` (windows before the chunk's last): the window's kept rows ORed into
   the removed words of every later column of the chunk, from the mask bits, by many
   programs at once (atomically), so the next window's walk starts from them. The walk's
   serial steps stay one per 64 boxes, but each touches one window's words, not the chunk's.

Launches per call at up to WALK_WINDOW boxes: the key kernel, the sort, the mask and the
reduce kernel (one more sort for fp64 scores); presorted: mask and reduce only. Above, one
zero fill of the removed words, and a push and a reduce launch per further window; past
SINGLE_CHUNK_MAX, one gather (keyed) and a cross-chunk, mask and reduce launch per further
chunk of MAX_CHUNK.

IoU is computed as torchvision's CPU kernel computes it, in fp32 (fp64 for fp64 boxes,
fp16/bf16 upcast on load), with fused multiply-add turned off at launch. The test
``iou > thr`` of torchvision (fp32 IoU compared with a double threshold) is made without
a division: it holds exactly when ``inter / union > m``, with ``m`` the midpoint between
the smallest fp32 above ``thr`` and its predecessor, and ``inter > m * union`` is exact in
fp64 (a 25-bit times a 24-bit significand). A quotient of two fp32 numbers is never
exactly ``m`` (its odd part would need 25 bits), so no tie rule is needed. The kernels keep
bit for bit the boxes torchvision's CPU kernel keeps.
fp64 boxes divide (the same test would need a 107-bit product).
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from ._common import gpu_launch

# Boxes processed as one chunk: up to 32768 fp16/bf16/fp32 boxes (at most 32768 x 512 words,
# 128 MiB of suppression bits, in practice T x ceil(T / 64) words: 50 MB at 20k boxes), so
# NMS of 1k-20k boxes is 4 launches with no cross-chunk pass. fp64 boxes stay at 8192: their
# IoU test divides, and a chunk boundary saves IoU tests (rows of earlier chunks are tested
# only where kept). Above the single-chunk size, chunks of MAX_CHUNK (8 MiB of bits each).
SINGLE_CHUNK_MAX = 32768
SINGLE_CHUNK_MAX_F64 = 8192
MAX_CHUNK = 8192
# Boxes per mask word (one int64 word holds the bits of 64 columns); WORD is its constexpr
# for the kernels.
WORD_BITS = 64
WORD = tl.constexpr(WORD_BITS)
# Sort key layout: the low SCORE_BITS hold the descending score (or its rank), the bits above
# the class and image; valid keys stay below 2**62, and padding boxes get INVALID_KEY.
SCORE_BITS = tl.constexpr(32)
KEY_BITS = 62
INVALID_KEY = tl.constexpr(2**63 - 1)
INVALID_RUN = tl.constexpr((2**63 - 1) >> 32)
# Rows per step of each kernel. On the GPU: [64 rows, 64 columns] pair tiles at 8 warps
# (32 rows for fp64), and the reduce kernel's [SUB_ROWS <= 16, W] word tiles (at most
# REDUCE_TILE words), compile for sm_90 under Triton 3.6 with no spills. Under Triton's
# interpreter each operation of each program costs a fixed overhead, so its tiles are tall
# (the push's [256 rows, 64 words] is what its bit-wise OR fits in 2**20 elements).
GPU_ROWS = {"mask": 64, "cross": 64, "reduce": 16, "push": 64}
GPU_ROWS_F64 = {"mask": 32, "cross": 32, "reduce": 16, "push": 64}
INTERPRETER_ROWS = {"mask": 512, "cross": 512, "reduce": 64, "push": 256}
# Pushing kept rows: unrolled (all row groups' loads in flight) up to W = 128 at 4 warps; a
# loop over row groups above (unrolled, W = 256 spilled under Triton 3.6) at 8 warps, which
# halves the groups (measured on the H200 at 20k boxes of one class, W = 512: 3.81 ms
# against 4.25 at 4 warps; at 8192 boxes, W = 128 unrolled: 0.95 ms at 4 warps, 1.07 at 8).
UNROLL_MAX_W = 128
REDUCE_TILE = {True: 4096, False: 8192}
REDUCE_WARPS = {True: 4, False: 8}
# Positions one reduce launch walks. Past it the chunk's mask is walked window by window,
# each window's kept rows pushed into the later columns by _nms_push_kernel (parallel), so
# the walk's removed vector spans a window: W = 128, the unrolled 4-warp form (measured on
# the H200 at 8192 boxes: 0.95 ms; the chunk-wide W = 512 loop took 3.81 ms at 20k boxes).
WALK_WINDOW = 8192
# The reduce kernel's W (words of its "removed" vector, a constexpr) is the smallest of these
# that holds a window's words, not the chunk's own power of two: 2 compiled variants per flag
# set for every size (the power of two gave 10, W = 1 ... 512). Words past the window are
# never loaded (the push masks them by each row's run end), so a wider W costs register
# work, not memory traffic: up to 1024 boxes W = 16, above W = 128.
W_BUCKETS = (16, 128)
# Boxes per program of the key and gather kernels, and positions probed per step of the
# run-boundary search (ceil(log_64(T)) dependent loads: 3 up to 262144 boxes).
KEY_BLOCK = {"gpu": 1024, "interpreter": 8192}
# Earlier rows per cross-chunk program (at most one chunk): on the GPU 16 tiles of 64 rows, so
# the last chunk at 40k boxes has 128 x 32 programs and at 100k 128 x 90 (a 132-SM GPU full
# several times over), where one program per 64 columns gave 128 programs looping over up to
# 92k rows each. Under the interpreter, programs cost a fixed overhead each: spans are long.
CROSS_SPAN = {"gpu": 1024, "interpreter": 8192}
GATHER_BLOCK = {"gpu": 512, "interpreter": 8192}
PROBES = 64


# --------------------------------------------------------------------------- shared pieces


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _or_rows(x, BY_BITS: tl.constexpr):
    """Bitwise OR of int64 ``x`` over axis 0 (Tensor[R] -> scalar, Tensor[R, W] -> Tensor[W]).

    BY_BITS (the interpreter): as a max over the 64 bits, since Triton's interpreter runs
    ``tl.reduce`` with a custom combine element by element in Python. Both give the same bits.
    """
    if BY_BITS:
        shift = tl.arange(0, WORD).to(tl.int64)
        if len(x.shape) == 1:
            bits = tl.max((x[:, None] >> shift[None, :]) & 1, axis=0)
            return tl.sum(bits << shift, axis=0)
        else:
            bits = tl.max((x[:, :, None] >> shift[None, None, :]) & 1, axis=0)
            return tl.sum(bits << shift[None, :], axis=1)
    else:
        return tl.reduce(x, 0, _bit_or)


@triton.jit
def _input_index(src_ptr, pos, ok, n, SRC: tl.constexpr):
    """(image, index in the image) of the input box at sorted positions ``pos`` (int32).

    SRC: through the sort's permutation ``src`` (flat indices into [B, N]), so the boxes are
    read where they lie instead of being gathered into a sorted copy first (a launch and
    T * 16 bytes written and read again saved). Else the position itself (presorted input, or
    the sorted copy ``_nms_gather_kernel`` makes for several chunks, as one image of T).
    """
    if SRC:
        flat = tl.load(src_ptr + pos, mask=ok, other=0).to(tl.int32)
    else:
        flat = pos
    img = flat // n
    return img, flat - img * n


@triton.jit
def _load_boxes(boxes_ptr, img, j, ok, s_bb, s_bn, s_bc, CDT: tl.constexpr):
    # (x1, y1, x2, y2) and area of input boxes (img, j) (strided [B, N, 4]), in the compute dtype.
    p = boxes_ptr + img.to(tl.int64) * s_bb + j.to(tl.int64) * s_bn
    x1 = tl.load(p, mask=ok, other=0.0).to(CDT)
    y1 = tl.load(p + s_bc, mask=ok, other=0.0).to(CDT)
    x2 = tl.load(p + 2 * s_bc, mask=ok, other=0.0).to(CDT)
    y2 = tl.load(p + 3 * s_bc, mask=ok, other=0.0).to(CDT)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


@triton.jit
def _load_class(cls_ptr, img, j, ok, s_cb, s_cn):
    # The class (KEYED) or group (presorted) of input boxes (img, j), widened to int64.
    return tl.load(cls_ptr + img.to(tl.int64) * s_cb + j.to(tl.int64) * s_cn, mask=ok, other=0).to(tl.int64)


@triton.jit
def _run_ids(key_ptr, cls_ptr, pos, ok, n, s_cb, s_cn, KEYED: tl.constexpr):
    """The run holding each sorted position, as a pair (a, b): see ``_same_run``.

    KEYED: the key prefix (image and class bits, < 2**31: int32, so pair tests compare 32-bit
    ids) from the sorted keys (padding: INVALID_RUN); ``b`` is unused. Presorted: (image,
    int64 group), from the input. Runs are contiguous stretches of positions; the kernels
    find their boundaries from these ids instead of from segment tables (no scan launches).
    """
    if KEYED:
        a = (tl.load(key_ptr + pos, mask=ok, other=INVALID_KEY) >> SCORE_BITS).to(tl.int32)
        b = a
    else:
        img = pos // n
        a = img
        b = _load_class(cls_ptr, img, pos - img * n, ok, s_cb, s_cn)
    return a, b


@triton.jit
def _same_run(a, b, xa, xb, KEYED: tl.constexpr):
    # Whether run ids (a, b) and (xa, xb) (broadcast) are the same run.
    if KEYED:
        return a == xa
    else:
        return (a == xa) & (b == xb)


@triton.jit
def _span_reaches(key_ptr, cls_ptr, col, last_row, n, s_cb, s_cn, KEYED: tl.constexpr):
    """(share, xa, xb): whether the row at ``last_row`` (the last of a span of sorted rows
    ending before position ``col``) is of position ``col``'s run, and that run's ids. Runs are
    contiguous in sorted order, so a span whose last row is of another run has no row of it."""
    xa, xb = _run_ids(key_ptr, cls_ptr, col, col >= 0, n, s_cb, s_cn, KEYED)
    la, lb = _run_ids(key_ptr, cls_ptr, last_row, last_row >= 0, n, s_cb, s_cn, KEYED)
    share = _same_run(la, lb, xa, xb, KEYED)
    if KEYED:
        share = share & (xa != INVALID_RUN)
    return share, xa, xb


@triton.jit
def _search(key_ptr, cls_ptr, xa, xb, lo, hi, n, s_cb, s_cn, SAME: tl.constexpr, KEYED: tl.constexpr,
            PROBES: tl.constexpr):
    """First position q in [lo, hi) whose run is (SAME) / is not (not SAME) the run (xa, xb);
    ``hi`` if there is none. The test must be false, then true over [lo, hi), which holds
    since runs are contiguous. Each step loads PROBES evenly spaced positions at once and
    keeps the gap after the last false one: ceil(log_PROBES(hi - lo)) dependent loads."""
    probe = tl.arange(0, PROBES)
    while lo < hi:
        step = (hi - lo + PROBES - 1) // PROBES
        q = lo + probe * step
        ok = q < hi
        a, b = _run_ids(key_ptr, cls_ptr, q, ok, n, s_cb, s_cn, KEYED)
        same = _same_run(a, b, xa, xb, KEYED)
        if SAME:
            miss = ok & ~same
        else:
            miss = ok & same
        before = tl.sum(miss.to(tl.int32), axis=0)  # the probes before the answer
        new_lo = tl.where(before > 0, lo + (before - 1) * step + 1, lo)
        hi = tl.minimum(lo + before * step, hi)
        lo = new_lo
    return lo


@triton.jit
def _push_rows(removed, mask_ptr, kept, sub, k, c0, e, ws, starts_p, pos_p, offs_w, SUB_ROWS: tl.constexpr,
               OR_BY_BITS: tl.constexpr):
    """``removed`` ORed with the mask words of the kept rows among rows ``sub * SUB_ROWS ...``
    of block k, from the word after the block to the word holding the end of each row's run.

    A row's run ends at the next run start of block p after it (``starts_p`` at ``pos_p``: runs
    begun in the owner's block), else at ``e`` (the owner's end). Words past a row's run may
    belong to tiles the mask kernel skipped (unwritten), so they are never read.
    """
    offs = sub * SUB_ROWS + tl.arange(0, SUB_ROWS)
    rkept = ((kept >> offs.to(tl.int64)) & 1) != 0
    rpos = c0 + k * WORD + offs
    run_end = tl.min(tl.where(starts_p[None, :] & (pos_p[None, :] > rpos[:, None]), pos_p[None, :], e), axis=1)
    last_w = (run_end - 1 - c0) // WORD
    ld = rkept[:, None] & (offs_w[None, :] > k) & (offs_w[None, :] <= last_w[:, None])
    words = tl.load(mask_ptr + (rpos - c0)[:, None] * ws + offs_w[None, :], mask=ld, other=0)
    return removed | _or_rows(words, OR_BY_BITS)


@triton.jit
def _suppresses(ax1, ay1, ax2, ay2, a_area, bx1, by1, bx2, by2, b_area, thr, F64: tl.constexpr):
    """torchvision's ``inter / (area_a + area_b - inter) > thr`` for broadcast blocks of boxes.

    ``thr``: for fp32 the decision boundary ``m`` (fp64) described in the module docstring;
    for fp64 the threshold itself.
    """
    w = tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
    h = tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0)
    inter = w * h
    union = (a_area + b_area) - inter
    if F64:
        # 0 / 0 is NaN (kept) and x / 0 is +inf (suppressed), as in torchvision; the
        # division itself avoids 0 / 0 (a floating-point warning under the interpreter).
        zero = union == 0
        return tl.where(zero, inter > 0, inter / tl.where(zero, 1.0, union) > thr)
    else:
        i = inter.to(tl.float64)
        u = union.to(tl.float64)
        mu = thr * u  # exact
        # union < 0 (boxes with x2 < x1) flips the inequality; inter / 0 is +inf when inter > 0.
        return ((u > 0) & (i > mu)) | ((u < 0) & (i < mu)) | ((u == 0) & (i > 0))


@triton.jit
def _threshold(thr_bits):
    # The fp64 decision value, passed as its bit pattern: a scalar argument costs no launch
    # (unlike a device tensor), and a Python float argument would be rounded to fp32.
    return thr_bits.to(tl.int64).to(tl.float64, bitcast=True)


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["n", "total", "img_shift", "cls_mask"])
def _nms_key_kernel(scores_ptr, idxs_ptr, valid_ptr, order_ptr, key_ptr, count_ptr, n, total,
                    s_sb, s_sn, s_ib, s_in, s_vb, s_vn, img_shift, cls_mask,
                    HAS_IDXS: tl.constexpr, HAS_VALID: tl.constexpr, RANKED: tl.constexpr,
                    COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """The sort key of BLOCK boxes (see the module docstring), in input order.

    scores_ptr: Tensor[B, N] float (strided; unused when RANKED). idxs_ptr: integer
    Tensor[B, N] classes (HAS_IDXS). valid_ptr: uint8 Tensor[B, N] (HAS_VALID; 0 = padding).
    order_ptr: int64 Tensor[B, N] contiguous, each image's indices by decreasing score
    (RANKED, fp64 scores): box ``order[b, r]`` takes rank ``r`` as its score bits.
    key_ptr: int64 Tensor[B * N] out. count_ptr: int32 Tensor[1], zeroed here for the reduce
    kernel's kept count (COUNT): no separate fill launch.
    One pass: every input read once, 8 bytes written per box, in place of the old two sorts,
    two gathers and ~20 scan/where ops over the sorted order.
    """
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = f < total
    img = f // n
    r = f - img * n
    img64 = img.to(tl.int64)
    if RANKED:
        j = tl.load(order_ptr + f, mask=ok, other=0).to(tl.int32)
        low = r.to(tl.int64)
    else:
        j = r
        s = tl.load(scores_ptr + img64 * s_sb + j.to(tl.int64) * s_sn, mask=ok, other=0.0).to(tl.float32)
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        # -0.0 ties with +0.0, as in a float sort (on the bits: a float compare could flush
        # denormals to zero on the GPU).
        bits = tl.where(bits == -2147483648, 0, bits)
        # fp32 bits as an int ordered like the float (negative floats: magnitude bits flipped),
        # then reversed into [0, 2**32) so that higher scores sort first.
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        low = 0x7FFFFFFF - bits
    key = (img64 << img_shift) | low
    if HAS_IDXS:
        cls = tl.load(idxs_ptr + img64 * s_ib + j.to(tl.int64) * s_in, mask=ok, other=0).to(tl.int64)
        key = key | ((cls & cls_mask) << SCORE_BITS)
    if HAS_VALID:
        v = tl.load(valid_ptr + img64 * s_vb + j.to(tl.int64) * s_vn, mask=ok, other=0)
        key = tl.where(v != 0, key, INVALID_KEY)
    tl.store(key_ptr + img64 * n + j, key, mask=ok)
    if COUNT:
        if tl.program_id(0) == 0:
            tl.store(count_ptr, 0)


@triton.jit(do_not_specialize=["n", "total"])
def _nms_gather_kernel(boxes_ptr, cls_ptr, src_ptr, out_boxes_ptr, out_cls_ptr, n, total,
                       s_bb, s_bn, s_bc, s_cb, s_cn, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    """Sorted copies of the boxes (Tensor[T, 4], input dtype) and, when EXACT, classes (int64
    Tensor[T]), for inputs of several chunks only: there the cross-chunk kernel reads every
    earlier row of a run once per 64 columns, and contiguous rows beat a chain of gathers
    (one launch and T * 24 bytes, against T * 8 gathered loads per column block)."""
    pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = pos < total
    img, j = _input_index(src_ptr, pos, ok, n, True)
    p = boxes_ptr + img.to(tl.int64) * s_bb + j.to(tl.int64) * s_bn
    out = out_boxes_ptr + pos.to(tl.int64) * 4
    for c in tl.static_range(4):
        tl.store(out + c, tl.load(p + c * s_bc, mask=ok, other=0.0), mask=ok)
    if EXACT:
        tl.store(out_cls_ptr + pos, _load_class(cls_ptr, img, j, ok, s_cb, s_cn), mask=ok)


@triton.jit(do_not_specialize=["c0", "chunk_len", "thr_bits"])
def _nms_mask_kernel(boxes_ptr, key_ptr, src_ptr, cls_ptr, mask_ptr, thr_bits, c0, chunk_len, n, ws,
                     s_bb, s_bn, s_bc, s_cb, s_cn,
                     KEYED: tl.constexpr, SRC: tl.constexpr, EXACT: tl.constexpr, F64: tl.constexpr,
                     ROWS: tl.constexpr):
    """Suppression bits of one [ROWS rows, 64 columns] tile of a chunk (upper triangle only).

    boxes_ptr: Tensor[B, N, 4] input boxes (fp16/bf16/fp32/fp64, strided), read through
        ``src_ptr`` (SRC: int64 Tensor[T] input index of each sorted position), or already in
        sorted order (Tensor[1, T, 4] for several chunks; presorted input).
    key_ptr: int64 Tensor[T] sorted keys (KEYED). cls_ptr: Tensor[B, N] classes, indexed as the
        boxes (KEYED and EXACT: compared pair by pair) or groups (presorted: they define the runs).
    thr_bits: the decision value's fp64 bits (see ``_suppresses``).
    mask_ptr: int64 Tensor[C, ws] out; bit b of word w of row r is set when sorted box
        ``c0 + r`` suppresses box ``c0 + 64 * w + b`` (same run, later, IoU > thr).
        Words of tiles that share no run are not written (never read).
    """
    CDT: tl.constexpr = tl.float64 if F64 else tl.float32
    w = tl.program_id(0)
    rb = tl.program_id(1)
    c_end = c0 + chunk_len
    first_row = c0 + rb * ROWS
    first_col = c0 + w * WORD
    last_row = tl.minimum(first_row + ROWS, c_end) - 1
    if first_col + WORD - 1 > first_row:  # some pair has column > row
        # Runs are contiguous: rows before the columns share one only if the last row's run
        # is the first column's. Skipping the rest is what makes 80 classes cheap: their mask
        # is block diagonal. Padding (KEYED) sorts last: columns from it on are never tested.
        la, lb = _run_ids(key_ptr, cls_ptr, last_row, last_row >= 0, n, s_cb, s_cn, KEYED)
        fa, fb = _run_ids(key_ptr, cls_ptr, first_col, first_col >= 0, n, s_cb, s_cn, KEYED)
        share = (first_col <= last_row) | _same_run(la, lb, fa, fb, KEYED)
        if KEYED:
            share = share & (fa != INVALID_RUN)
        if share:
            offs = tl.arange(0, WORD)
            rows = first_row + tl.arange(0, ROWS)
            cols = first_col + offs
            row_ok = rows < c_end
            col_ok = cols < c_end
            # ROWS + 64 boxes read once per tile (through src), ROWS * 64 pairs tested in registers.
            ri, rj = _input_index(src_ptr, rows, row_ok, n, SRC)
            ci, cj = _input_index(src_ptr, cols, col_ok, n, SRC)
            rx1, ry1, rx2, ry2, r_area = _load_boxes(boxes_ptr, ri, rj, row_ok, s_bb, s_bn, s_bc, CDT)
            cx1, cy1, cx2, cy2, c_area = _load_boxes(boxes_ptr, ci, cj, col_ok, s_bb, s_bn, s_bc, CDT)
            ra, rb_ = _run_ids(key_ptr, cls_ptr, rows, row_ok, n, s_cb, s_cn, KEYED)
            ca, cb_ = _run_ids(key_ptr, cls_ptr, cols, col_ok, n, s_cb, s_cn, KEYED)
            same = _same_run(ra[:, None], rb_[:, None], ca[None, :], cb_[None, :], KEYED)
            if EXACT:
                r_cls = _load_class(cls_ptr, ri, rj, row_ok, s_cb, s_cn)
                c_cls = _load_class(cls_ptr, ci, cj, col_ok, s_cb, s_cn)
                same = same & (r_cls[:, None] == c_cls[None, :])
            sup = _suppresses(rx1[:, None], ry1[:, None], rx2[:, None], ry2[:, None], r_area[:, None],
                              cx1[None, :], cy1[None, :], cx2[None, :], cy2[None, :], c_area[None, :],
                              _threshold(thr_bits), F64)
            sup = sup & same & (cols[None, :] > rows[:, None]) & col_ok[None, :]
            # Pack each row's 64 bits into one word: 1 bit per pair written instead of 1 byte.
            bit = tl.full([WORD], 1, tl.int64) << offs.to(tl.int64)
            words = tl.sum(tl.where(sup, bit[None, :], 0), axis=1)
            tl.store(mask_ptr + (rows - c0) * ws + w, words, mask=row_ok)


@triton.jit(do_not_specialize=["c0", "chunk_len", "span", "thr_bits"])
def _nms_cross_kernel(boxes_ptr, key_ptr, cls_ptr, keep_ptr, removed_ptr, thr_bits, c0, chunk_len, span, n,
                      s_bb, s_bn, s_bc, s_cb, s_cn,
                      KEYED: tl.constexpr, EXACT: tl.constexpr, F64: tl.constexpr, ROWS: tl.constexpr,
                      PROBES: tl.constexpr):
    """Whether boxes kept in rows ``[span * rb, span * (rb + 1))`` of earlier chunks suppress 64
    columns of this chunk.

    boxes_ptr, key_ptr, cls_ptr: as in ``_nms_mask_kernel``, in sorted order (the sorted copy,
        or presorted input): each row is one contiguous read, not a chain of dependent gathers.
    keep_ptr: uint8 Tensor[T], keep flags in sorted order (final for positions < c0).
    removed_ptr: int64 Tensor[W], zeroed before the launch; bit b of word q is ORed in
        (atomically) when box ``c0 + 64 * q + b`` is suppressed by a row of this span.
    """
    CDT: tl.constexpr = tl.float64 if F64 else tl.float32
    q = tl.program_id(0)
    lo = tl.program_id(1) * span
    hi = tl.minimum(lo + span, c0)
    # Only rows of the first column's run can share a run with the columns (runs are
    # contiguous and the rows come first), and the span holds some exactly when its last
    # row is of that run: one load decides, and spans of other runs exit here (with 80
    # classes nearly all of them).
    col0 = c0 + q * WORD
    share, xa, xb = _span_reaches(key_ptr, cls_ptr, col0, hi - 1, n, s_cb, s_cn, KEYED)
    if share:
        offs = tl.arange(0, WORD)
        cols = col0 + offs
        col_ok = cols < c0 + chunk_len
        ci, cj = _input_index(boxes_ptr, cols, col_ok, n, False)
        cx1, cy1, cx2, cy2, c_area = _load_boxes(boxes_ptr, ci, cj, col_ok, s_bb, s_bn, s_bc, CDT)
        ca, cb = _run_ids(key_ptr, cls_ptr, cols, col_ok, n, s_cb, s_cn, KEYED)
        if EXACT:
            c_cls = _load_class(cls_ptr, ci, cj, col_ok, s_cb, s_cn)
        thr = _threshold(thr_bits)
        hit = tl.zeros([WORD], dtype=tl.int32)
        # The run's first row in the span: a search of the sorted runs (a few dependent
        # loads). The rows' keep flags are final, so this is an OR over rows with no
        # sequential part, and no earlier-chunk bits are ever stored.
        # (while loops rather than range() over loaded bounds: Triton 3.6's interpreter cannot
        # take a loaded value as a range bound.)
        r0 = _search(key_ptr, cls_ptr, xa, xb, lo + 0 * col0, hi, n, s_cb, s_cn, True, KEYED, PROBES)
        while r0 < hi:
            rows = r0 + tl.arange(0, ROWS)
            in_range = rows < hi
            ri, rj = _input_index(boxes_ptr, rows, in_range, n, False)
            kept = tl.load(keep_ptr + rows, mask=in_range, other=0) != 0
            rx1, ry1, rx2, ry2, r_area = _load_boxes(boxes_ptr, ri, rj, kept, s_bb, s_bn, s_bc, CDT)
            ra, rb = _run_ids(key_ptr, cls_ptr, rows, kept, n, s_cb, s_cn, KEYED)
            same = _same_run(ra[:, None], rb[:, None], ca[None, :], cb[None, :], KEYED)
            if EXACT:
                r_cls = _load_class(cls_ptr, ri, rj, kept, s_cb, s_cn)
                same = same & (r_cls[:, None] == c_cls[None, :])
            sup = _suppresses(rx1[:, None], ry1[:, None], rx2[:, None], ry2[:, None], r_area[:, None],
                              cx1[None, :], cy1[None, :], cx2[None, :], cy2[None, :], c_area[None, :],
                              thr, F64)
            sup = sup & kept[:, None] & same
            hit = tl.maximum(hit, tl.max(sup.to(tl.int32), axis=0))
            r0 += ROWS
        bit = tl.full([WORD], 1, tl.int64) << offs.to(tl.int64)
        word = tl.sum(tl.where(hit != 0, bit, 0), axis=0)
        if word != 0:
            tl.atomic_or(removed_ptr + q, word)


@triton.jit(do_not_specialize=["c0", "win_start", "win_end", "chunk_len"])
def _nms_push_kernel(mask_ptr, key_ptr, cls_ptr, keep_ptr, removed_ptr, c0, win_start, win_end, chunk_len, n, ws,
                     s_cb, s_cn, KEYED: tl.constexpr, ROWS: tl.constexpr, OR_BY_BITS: tl.constexpr):
    """The mask words of the rows kept in positions ``[win_start, win_end)`` of a chunk, ORed
    into the removed words of 64 of the chunk's columns after them.

    mask_ptr: int64 Tensor[C, ws], the chunk's suppression bits (``_nms_mask_kernel``).
    key_ptr, cls_ptr: run ids, as in ``_nms_reduce_kernel``.
    keep_ptr: uint8 Tensor[T], keep flags in sorted order (final in the window).
    removed_ptr: int64 Tensor[>= C / 64], the chunk's removed words, ORed atomically.
    Grid: one program per (64 words after the window, ROWS rows of the window).
    """
    q = (win_end - c0) // WORD + tl.program_id(0) * WORD + tl.arange(0, WORD)
    q_ok = q < (chunk_len + WORD - 1) // WORD
    r_lo = win_start + tl.program_id(1) * ROWS
    r_hi = tl.minimum(r_lo + ROWS, win_end)
    # A row's word q was written, and can hold its bits, only if the row's run reaches the
    # word's first column (rows come first, runs are contiguous): then the tile's last row is
    # of the run of the first column of these 64 words, which one load checks.
    first = c0 + (win_end - c0) // WORD * WORD + tl.program_id(0) * WORD * WORD
    share, _, _ = _span_reaches(key_ptr, cls_ptr, first, r_hi - 1, n, s_cb, s_cn, KEYED)
    if share:
        rows = r_lo + tl.arange(0, ROWS)
        kept = tl.load(keep_ptr + rows, mask=rows < r_hi, other=0) != 0
        ra, rb = _run_ids(key_ptr, cls_ptr, rows, kept, n, s_cb, s_cn, KEYED)
        qa, qb = _run_ids(key_ptr, cls_ptr, c0 + q * WORD, q_ok, n, s_cb, s_cn, KEYED)
        ld = kept[:, None] & q_ok[None, :] & _same_run(ra[:, None], rb[:, None], qa[None, :], qb[None, :], KEYED)
        words = _or_rows(tl.load(mask_ptr + (rows - c0)[:, None] * ws + q[None, :], mask=ld, other=0), OR_BY_BITS)
        tl.atomic_or(removed_ptr + q, words, mask=q_ok & (words != 0))


@triton.jit(do_not_specialize=["c0", "chunk_len"])
def _nms_reduce_kernel(mask_ptr, removed_ptr, key_ptr, src_ptr, cls_ptr, valid_ptr, keep_ptr, sorted_keep_ptr,
                       rank_ptr, count_ptr, c0, chunk_len, n, ws, s_cb, s_cn, s_vb, s_vn,
                       W: tl.constexpr, HAS_REMOVED: tl.constexpr, KEYED: tl.constexpr, SORTED_KEEP: tl.constexpr,
                       HAS_VALID: tl.constexpr, RANKS: tl.constexpr, SUB_ROWS: tl.constexpr, UNROLL: tl.constexpr,
                       OR_BY_BITS: tl.constexpr, PROBES: tl.constexpr):
    """Greedy NMS walk over the runs that start in one 64-box block of a window of a chunk
    (positions ``[c0, c0 + chunk_len)``).

    mask_ptr: int64 Tensor[C, ws], the chunk's suppression bits (``_nms_mask_kernel``), a view
        whose row 0 and word 0 are the window's first position.
    removed_ptr: int64 Tensor[W], boxes of the window suppressed by earlier chunks and windows
        (read when HAS_REMOVED).
    key_ptr, src_ptr, cls_ptr: as in ``_nms_mask_kernel`` (run boundaries, input indices).
    valid_ptr: uint8 Tensor[B, N] strided, 0 for padding boxes (presorted with HAS_VALID;
        KEYED padding is recognised by its key). Padding is never kept and suppresses nothing.
    keep_ptr: uint8 Tensor[B * N] out, 1 = kept, written in input order (``src[pos]``): no
        scatter launch. This program writes the positions it owns.
    sorted_keep_ptr: uint8 Tensor[T] out (SORTED_KEEP: KEYED with several windows), the same
        flags in sorted order, for the push and the next chunks' cross pass.
    rank_ptr: int64 Tensor[B * N] out (RANKS): the key's score bits where kept, INVALID_KEY
        elsewhere, in input order: one stable sort of it lists the kept boxes by decreasing
        score. count_ptr: int32 Tensor[1], the number kept, accumulated (RANKS).
    SUB_ROWS, UNROLL: how kept rows are pushed (row groups of SUB_ROWS; unrolled, or a loop).
    """
    p = tl.program_id(0)
    c_end = c0 + chunk_len
    blk0 = c0 + p * WORD
    blk_end = tl.minimum(blk0 + WORD, c_end)
    offs = tl.arange(0, WORD)
    offs64 = offs.to(tl.int64)
    # Run starts in block p, from the run ids of each position and its predecessor (a table
    # of starts is not stored: no scan launches).
    pos_p = blk0 + offs
    in_p = pos_p < blk_end
    a, b = _run_ids(key_ptr, cls_ptr, pos_p, in_p, n, s_cb, s_cn, KEYED)
    pa, pb = _run_ids(key_ptr, cls_ptr, pos_p - 1, in_p & (pos_p > 0), n, s_cb, s_cn, KEYED)
    starts_p = in_p & ((pos_p == 0) | ~_same_run(a, b, pa, pb, KEYED))
    # This program owns the runs starting in block p, up to the next run start after the
    # block (program 0 also owns the tail of a run begun in an earlier chunk). Runs never
    # suppress each other, so the owners run in parallel.
    s = tl.where(p == 0, c0, tl.min(tl.where(starts_p, pos_p, blk_end), axis=0))
    if s < blk_end:
        # The end of the block's last run: the first later position of another run.
        xa, xb = _run_ids(key_ptr, cls_ptr, blk_end - 1, blk_end > 0, n, s_cb, s_cn, KEYED)
        e = _search(key_ptr, cls_ptr, xa, xb, blk_end, c_end, n, s_cb, s_cn, False, KEYED, PROBES)
        last_blk = (e - 1 - c0) // WORD
        offs_w = tl.arange(0, W)
        if HAS_REMOVED:
            removed = tl.load(removed_ptr + offs_w)
        else:
            removed = tl.zeros([W], dtype=tl.int64)
        bit = tl.full([WORD], 1, tl.int64) << offs64
        SUB_MASK: tl.constexpr = (1 << SUB_ROWS) - 1 if SUB_ROWS < WORD else -1
        k = p
        while k <= last_blk:
            pos = c0 + k * WORD + offs
            mine = (pos >= s) & (pos < e)
            # Where the block's flags go in input order, loaded first: its latency overlaps
            # the diagonal words' instead of holding up the stores after the walk.
            ii, ij = _input_index(src_ptr, pos, mine, n, KEYED)
            if HAS_VALID:
                if KEYED:
                    usable = tl.load(key_ptr + pos, mask=mine, other=INVALID_KEY) != INVALID_KEY
                else:
                    vi = pos // n
                    usable = tl.load(valid_ptr + vi.to(tl.int64) * s_vb + (pos - vi * n).to(tl.int64) * s_vn,
                                     mask=mine, other=0) != 0
                mine_valid = mine & usable
            else:
                mine_valid = mine
            # Removed bits of block k: earlier blocks' kept rows, plus positions that are
            # padding or belong to another program.
            r = tl.sum(tl.where(offs_w == k, removed, 0), axis=0) | tl.sum(tl.where(mine_valid, 0, bit), axis=0)
            # Resolve the block in order: kept[i] = not removed[i] and no kept j < i of the
            # block suppresses i. Iterating kept <- F(kept) fixes one more box per round at
            # worst (box i depends only on boxes before it), so it reaches greedy NMS in at
            # most 64 rounds, in practice a few: each round is one OR-reduction over the 64
            # diagonal words, loaded once. This is the only sequential work of the NMS.
            rows = k * WORD + offs
            diag = tl.load(mask_ptr + rows * ws + k, mask=c0 + rows < e, other=0)
            kept = ~r
            new = ~(r | _or_rows(tl.where(((kept >> offs64) & 1) != 0, diag, 0), OR_BY_BITS))
            while new != kept:
                kept = new
                new = ~(r | _or_rows(tl.where(((kept >> offs64) & 1) != 0, diag, 0), OR_BY_BITS))
            # Keep flags straight into input order.
            flag = (kept >> offs64) & 1
            dst = ii * n + ij
            tl.store(keep_ptr + dst, flag.to(tl.uint8), mask=mine)
            if SORTED_KEEP:
                tl.store(sorted_keep_ptr + pos, flag.to(tl.uint8), mask=mine)
            if RANKS:
                low = tl.load(key_ptr + pos, mask=mine, other=0) & 0xFFFFFFFF
                tl.store(rank_ptr + dst, tl.where(flag != 0, low, INVALID_KEY), mask=mine)
                tl.atomic_add(count_ptr, tl.sum(tl.where(mine, flag, 0), axis=0).to(tl.int32))
            # Push the kept rows' words (to the end of each row's run) into `removed`;
            # removed rows are not read at all.
            if UNROLL:
                # W <= 128: all row groups at once, their loads in flight together.
                for sub in tl.static_range(WORD // SUB_ROWS):
                    removed = _push_rows(removed, mask_ptr, kept, sub, k, c0, e, ws, starts_p, pos_p, offs_w,
                                         SUB_ROWS, OR_BY_BITS)
            else:
                # Wider rows: a loop (unrolled, W = 256 spilled under Triton 3.6), one [SUB_ROWS,
                # W] tile live at a time, skipping row groups with nothing kept.
                for sub in range(WORD // SUB_ROWS):
                    if ((kept >> (sub * SUB_ROWS)) & SUB_MASK) != 0:
                        removed = _push_rows(removed, mask_ptr, kept, sub, k, c0, e, ws, starts_p, pos_p, offs_w,
                                             SUB_ROWS, OR_BY_BITS)
            k += 1


# --------------------------------------------------------------------------- launcher


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]  # rounds to nearest, as a C cast


def _f32_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _f32_step(bits: int, up: bool) -> int:
    """The bits of the next fp32 towards +inf (``up``) or -inf."""
    if bits in (0, 0x80000000):
        return 1 if up else 0x80000001
    return bits + 1 if (bits >> 31 == 0) == up else bits - 1


@functools.lru_cache(maxsize=256)
def fp32_decision_value(iou_threshold: float) -> float:
    """``m`` such that, for fp32 ``inter`` and ``union > 0``, torchvision's
    ``float32(inter / union) > iou_threshold`` holds exactly when ``inter > m * union``.

    ``m`` is the midpoint between the smallest fp32 above the threshold and its predecessor:
    a correctly rounded quotient reaches that float exactly when the true quotient passes
    the midpoint. (It never equals it: see the module docstring. This holds for thresholds
    in fp32's normal range, i.e. above 1.2e-38 in magnitude or zero.) Pure Python and cached
    per threshold: no CPU tensor work per call.
    """
    thr = float(iou_threshold)
    try:
        bits = _f32_bits(thr)
    except OverflowError:  # rounds to an fp32 infinity: no IoU is above it / all are
        return math.inf if thr > 0 else -math.inf
    if _f32_value(bits) <= thr:
        bits = _f32_step(bits, up=True)
    return (_f32_value(bits) + _f32_value(_f32_step(bits, up=False))) / 2  # exact: 25 significant bits


@functools.lru_cache(maxsize=256)
def threshold_bits(iou_threshold: float, f64: bool) -> int:
    """The int64 bit pattern of the kernels' fp64 decision value (cached per threshold)."""
    value = float(iou_threshold) if f64 else fp32_decision_value(iou_threshold)
    return struct.unpack("<q", struct.pack("<d", value))[0]


# Most boxes (all images together) one call takes: positions are int32 in the kernels.
MAX_BOXES = 2**31 - 1


def _check_size(t: int) -> None:
    if t > MAX_BOXES:
        raise ValueError(f"NMS over {t} boxes in one call: the Triton kernels take at most {MAX_BOXES} "
                         "(positions are int32); split the boxes, or use backend='torch'")


def scratch_bytes(t: int, f64: bool = False) -> int:
    """An upper bound of the device memory one call over ``t`` boxes allocates besides its
    inputs and output: the suppression bits of one chunk (T x ceil(T / 64) words up to
    SINGLE_CHUNK_MAX boxes, at most 128 MiB; MAX_CHUNK x 128 words, 8 MiB, beyond) and at
    most 64 bytes per box (the sort keys and their sort, sorted copies of the boxes and
    classes, the per-box ranks and flags)."""
    rows, ws = _mask_shape(t, _chunk_size(t, f64, None))
    return rows * ws * 8 + 64 * t


def _mask_shape(t: int, chunk: int) -> tuple[int, int]:
    """(rows, words per row) of the suppression bits: rows only for the positions a chunk has,
    and what the longest chunk needs rounded up to 16 words (aligned rows) but never past
    chunk / 64 (T x ceil(T / 64) words for one chunk instead of C x C / 64)."""
    w = chunk // WORD_BITS
    return min(chunk, t), min(w, triton.cdiv(triton.cdiv(min(chunk, t), WORD_BITS), 16) * 16)


def _chunk_size(t: int, f64: bool, max_chunk: int | None) -> int:
    """Positions per chunk: a power of two >= 64, at most SINGLE_CHUNK_MAX."""
    whole = triton.next_power_of_2(max(t, WORD_BITS))
    if max_chunk is not None:
        if max_chunk > SINGLE_CHUNK_MAX:
            raise ValueError(f"max_chunk {max_chunk}: at most {SINGLE_CHUNK_MAX}")
        return min(whole, max_chunk)
    return whole if t <= (SINGLE_CHUNK_MAX_F64 if f64 else SINGLE_CHUNK_MAX) else MAX_CHUNK


def _window(chunk: int, max_window: int | None) -> int:
    """Positions per reduce launch: WALK_WINDOW, or ``max_window`` (a multiple of 64 up to it; tests use small
    windows), at most the chunk."""
    if max_window is not None and (max_window % WORD_BITS or not WORD_BITS <= max_window <= WALK_WINDOW):
        raise ValueError(f"max_window {max_window}: a multiple of {WORD_BITS} up to {WALK_WINDOW}")
    return min(chunk, WALK_WINDOW if max_window is None else max_window)


def _width(window: int) -> int:
    """The reduce kernel's W for windows of ``window`` positions: a bucket of W_BUCKETS."""
    return next(w for w in W_BUCKETS if w * WORD_BITS >= window)


def _alloc(shape, dtype, device, poison, poison_value):
    # Poisoned outputs and scratch (tests): a position a kernel leaves unwritten shows.
    if poison:
        return torch.full(shape, poison_value, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _keep_out(b: int, n: int, device, poison: bool) -> torch.Tensor:
    # The bool output, which the reduce kernel writes as uint8 0/1 (poison: 2, not a bool value).
    keep = torch.empty((b, n), dtype=torch.bool, device=device)
    if poison:
        keep.view(torch.uint8).fill_(2)
    return keep


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


def _greedy(boxes: torch.Tensor, t: int, n: int, iou_threshold: float, keep: torch.Tensor, *,
            key: torch.Tensor | None, src: torch.Tensor | None, cls: torch.Tensor | None, exact: bool,
            padded: bool, valid: torch.Tensor | None, rank: torch.Tensor | None, count: torch.Tensor | None,
            max_chunk: int | None, max_window: int | None, poison: bool, or_by_bits: bool | None,
            unroll: bool | None) -> None:
    """Launch the mask / cross-chunk / reduce / push kernels over ``t`` positions: 2 launches
    for one window; past one window, one zero fill and 2 more per further window; past one
    chunk, 3 more per further chunk and (keyed) one gather into sorted copies.

    KEYED when ``key`` is given (sorted keys and their permutation ``src``; ``cls``: the classes
    when ``exact``; ``padded``: padding keys may occur), else presorted (``cls``: the groups;
    ``valid``: uint8 padding flags or None). ``keep`` (uint8 [B * N]) and, when given,
    ``rank`` / ``count`` are written by the reduce kernel. ``unroll``: how the reduce kernel
    pushes kept rows (see its UNROLL); default: unrolled on the GPU up to W = 128.
    """
    dev = boxes.device
    f64 = boxes.dtype == torch.float64
    keyed = key is not None
    chunk = _chunk_size(t, f64, max_chunk)
    window = _window(chunk, max_window)
    w = _width(window)
    rows, ws = _mask_shape(t, chunk)
    # Scratch poisoned with all bits set: reading an unwritten word would remove boxes.
    mask = _alloc((rows, ws), torch.int64, dev, poison, -1)
    # The removed words of each chunk, which the cross-chunk and push programs OR into and
    # each window's walk reads W of: zeroed once (one fill launch for the whole call).
    removed = torch.zeros((triton.cdiv(t, chunk), chunk // WORD_BITS + w), dtype=torch.int64,
                          device=dev) if t > window else mask
    placeholder = keep  # any tensor, for the pointers a variant does not read
    thr_bits = threshold_bits(iou_threshold, f64)
    on_gpu = gpu_launch(dev)
    rows = (GPU_ROWS_F64 if f64 else GPU_ROWS) if on_gpu else INTERPRETER_ROWS
    if unroll is None:
        unroll = on_gpu and w <= UNROLL_MAX_W
    # The reduce kernel's [SUB_ROWS, W] word tiles: at most REDUCE_TILE words, as W grows.
    sub_rows = min(rows["reduce"], max(1, REDUCE_TILE[unroll] // w)) if on_gpu else rows["reduce"]
    if or_by_bits is None:
        or_by_bits = not on_gpu
    s_bb, s_bn, s_bc = boxes.stride()
    s_cb, s_cn = _strides(cls, 2)
    s_vb, s_vn = _strides(valid, 2)
    # Keyed kernels split flat input indices into (image, index) by n; with one image they
    # read the input as [N, 1, 4] and n = 1, so that integer division per box folds away at
    # compile time. (Presorted runs need the true n: the image is part of a run.)
    idx_n = n
    if keyed and t == n:
        idx_n, s_bb, s_cb = 1, s_bn, s_cn
    # What the pair kernels read: the input (through src when keyed), or for several chunks
    # of sorted boxes, sorted copies (see _nms_gather_kernel, read as [T, 1, 4] with n = 1)
    # and the keep flags in sorted order.
    pair_boxes, pair_strides, pair_cls, pair_cls_strides = boxes, (s_bb, s_bn, s_bc), cls, (s_cb, s_cn)
    pair_n, read_src, sorted_keep = idx_n, keyed, keep
    if keyed and t > window:  # the cross-chunk and push kernels read it
        sorted_keep = _alloc((t,), torch.uint8, dev, poison, 2)
    if keyed and t > chunk:
        pair_boxes = torch.empty((t, 4), dtype=boxes.dtype, device=dev)
        pair_cls = torch.empty((t,), dtype=torch.int64, device=dev) if exact else None
        block = GATHER_BLOCK["gpu" if on_gpu else "interpreter"]
        _nms_gather_kernel[(triton.cdiv(t, block),)](
            boxes_ptr=boxes, cls_ptr=cls if exact else placeholder, src_ptr=src, out_boxes_ptr=pair_boxes,
            out_cls_ptr=pair_cls if exact else placeholder, n=idx_n, total=t, s_bb=s_bb, s_bn=s_bn, s_bc=s_bc,
            s_cb=s_cb, s_cn=s_cn, EXACT=exact, BLOCK=block, num_warps=4)
        pair_strides, pair_cls_strides, pair_n, read_src = (4, 4, 1), (1, 1), 1, False
    pair = dict(boxes_ptr=pair_boxes, key_ptr=key if keyed else placeholder,
                cls_ptr=pair_cls if pair_cls is not None else placeholder, thr_bits=thr_bits, n=pair_n,
                s_bb=pair_strides[0], s_bn=pair_strides[1], s_bc=pair_strides[2], s_cb=pair_cls_strides[0],
                s_cn=pair_cls_strides[1], KEYED=keyed, EXACT=exact, F64=f64)
    span = min(chunk, CROSS_SPAN["gpu" if on_gpu else "interpreter"])
    for c0 in range(0, t, chunk):
        nc = min(chunk, t - c0)
        nw = triton.cdiv(nc, WORD_BITS)
        chunk_removed = removed[c0 // chunk] if t > window else removed
        if c0 > 0:
            # One program per (64 columns of the chunk, span of earlier rows).
            _nms_cross_kernel[(nw, triton.cdiv(c0, span))](
                **pair, keep_ptr=sorted_keep, removed_ptr=chunk_removed, c0=c0, chunk_len=nc, span=span,
                ROWS=rows["cross"], PROBES=PROBES, num_warps=8, enable_fp_fusion=False)
        # One program per (column word, block of ROWS rows) of the chunk; tiles wholly
        # below the diagonal exit at once.
        _nms_mask_kernel[(nw, triton.cdiv(nc, rows["mask"]))](
            **pair, src_ptr=src if read_src else placeholder, mask_ptr=mask, c0=c0, chunk_len=nc, ws=ws,
            SRC=read_src, ROWS=rows["mask"], num_warps=8, enable_fp_fusion=False)
        for a in range(0, nc, window):
            na = min(window, nc - a)
            # One program per 64-box block of the window; only blocks where a run starts (and
            # block 0) work. The window's bits and removed words are views starting at it.
            _nms_reduce_kernel[(triton.cdiv(na, WORD_BITS),)](
                mask_ptr=mask[a:, a // WORD_BITS:], removed_ptr=chunk_removed[a // WORD_BITS:] if t > window else mask,
                key_ptr=key if keyed else placeholder, src_ptr=src if keyed else placeholder,
                cls_ptr=cls if cls is not None else placeholder, valid_ptr=valid if valid is not None else placeholder,
                keep_ptr=keep, sorted_keep_ptr=sorted_keep, rank_ptr=rank if rank is not None else placeholder,
                count_ptr=count if count is not None else placeholder, c0=c0 + a, chunk_len=na, n=idx_n, ws=ws,
                s_cb=s_cb, s_cn=s_cn, s_vb=s_vb, s_vn=s_vn, W=w, HAS_REMOVED=c0 + a > 0, KEYED=keyed,
                SORTED_KEEP=keyed and t > window, HAS_VALID=padded, RANKS=rank is not None, SUB_ROWS=sub_rows,
                UNROLL=unroll, OR_BY_BITS=or_by_bits, PROBES=PROBES, num_warps=REDUCE_WARPS[unroll])
            if a + na < nc:
                # One program per (64 later words of the chunk, ROWS rows of the window); 8 warps
                # (at 4 the presorted variant spilled 8 bytes under Triton 3.6).
                _nms_push_kernel[(triton.cdiv(nw - (a + na) // WORD_BITS, WORD_BITS), triton.cdiv(na, rows["push"]))](
                    mask_ptr=mask, key_ptr=key if keyed else placeholder,
                    cls_ptr=cls if cls is not None else placeholder, keep_ptr=sorted_keep,
                    removed_ptr=chunk_removed, c0=c0, win_start=c0 + a, win_end=c0 + a + na, chunk_len=nc,
                    n=idx_n, ws=ws, s_cb=s_cb, s_cn=s_cn, KEYED=keyed, ROWS=rows["push"], OR_BY_BITS=or_by_bits,
                    num_warps=8)


def _key_layout(b: int, idxs: torch.Tensor | None) -> tuple[int, int, bool]:
    """(image shift, class mask, exact) of the sort key for ``b`` images.

    The image takes the bits it needs below bit 62, the class the rest above the 32 score
    bits. ``exact``: the class dtype is wider than its field, so runs may hold several
    classes and the kernels compare classes pair by pair.
    """
    image_bits = max(b - 1, 0).bit_length()
    if image_bits > KEY_BITS - SCORE_BITS.value:
        raise ValueError(f"NMS over {b} images: at most 2**30 images fit the sort key")
    cls_bits = KEY_BITS - SCORE_BITS.value - image_bits
    exact = idxs is not None and (idxs.element_size() * 8 > cls_bits)
    return SCORE_BITS.value + cls_bits, (1 << cls_bits) - 1, exact


def keep_mask(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, idxs: torch.Tensor | None,
              valid: torch.Tensor | None, *, ranks: bool = False, max_chunk: int | None = None,
              max_window: int | None = None, poison: bool = False, or_by_bits: bool | None = None,
              unroll: bool | None = None):
    """Greedy NMS keep mask of a padded batch, in input order, with no host synchronisation.

    ``boxes``: Tensor[B, N, 4] (strided); ``scores``: float Tensor[B, N]; ``idxs``: optional
    integer Tensor[B, N] classes; ``valid``: optional bool Tensor[B, N] (False = padding).
    Boxes suppress only boxes of their own image and class. Returns bool Tensor[B, N], or with
    ``ranks`` (B = 1) also int64 Tensor[B * N] ``rank`` (the kept boxes' score bits, INVALID_KEY
    elsewhere: a stable sort of it lists the kept boxes by decreasing score, ties in input
    order) and int32 Tensor[1] the number kept.
    Launches: key kernel, one ``torch.sort`` (two for fp64 scores), then ``_greedy`` (2 for
    one window). ``max_chunk``: a power of two >= 64, ``max_window``: a multiple of 64 (tests use small chunks
    and windows to exercise the cross-chunk pass and the push). ``poison``: fill the outputs
    and scratch with values that fail the tests if a kernel leaves them unwritten.
    ``or_by_bits``: how the reduce kernel ORs words (see
    ``_or_rows``); default: by bits under the interpreter, ``tl.reduce`` on the GPU.
    ``unroll``: see ``_greedy``.
    """
    b, n = scores.shape
    t = b * n
    _check_size(t)
    dev = boxes.device
    keep = _keep_out(b, n, dev, poison)
    rank = _alloc((t,), torch.int64, dev, poison, -1) if ranks else None
    count = _alloc((1,), torch.int32, dev, poison, -1) if ranks else None
    if t == 0:
        if ranks:
            count.zero_()
        return (keep, rank, count) if ranks else keep
    img_shift, cls_mask, exact = _key_layout(b, idxs)
    ranked = scores.dtype == torch.float64  # 53-bit scores: their stable sort's rank is the key
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices if ranked else None
    valid_u8 = valid.view(torch.uint8) if valid is not None else None
    key = torch.empty(t, dtype=torch.int64, device=dev)
    block = KEY_BLOCK["gpu" if gpu_launch(dev) else "interpreter"]
    s_sb, s_sn = scores.stride()
    s_ib, s_in = _strides(idxs, 2)
    s_vb, s_vn = _strides(valid_u8, 2)
    _nms_key_kernel[(triton.cdiv(t, block),)](
        scores_ptr=scores, idxs_ptr=idxs if idxs is not None else key, valid_ptr=valid_u8 if valid is not None else key,
        order_ptr=order if ranked else key, key_ptr=key, count_ptr=count if ranks else key, n=n, total=t,
        s_sb=s_sb, s_sn=s_sn, s_ib=s_ib, s_in=s_in, s_vb=s_vb, s_vn=s_vn, img_shift=img_shift, cls_mask=cls_mask,
        HAS_IDXS=idxs is not None, HAS_VALID=valid is not None, RANKED=ranked, COUNT=ranks, BLOCK=block,
        num_warps=4)
    # The one sort: by image, class bits, decreasing score; equal keys keep input order.
    sorted_key, src = torch.sort(key, stable=True)
    _greedy(boxes, t, n, iou_threshold, keep.view(torch.uint8), key=sorted_key, src=src,
            cls=idxs if exact else None, exact=exact, padded=valid is not None, valid=None, rank=rank, count=count,
            max_chunk=max_chunk, max_window=max_window, poison=poison, or_by_bits=or_by_bits, unroll=unroll)
    return (keep, rank, count) if ranks else keep


def keep_mask_presorted(boxes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor | None, iou_threshold: float,
                        *, max_chunk: int | None = None, max_window: int | None = None, poison: bool = False,
                        or_by_bits: bool | None = None, unroll: bool | None = None) -> torch.Tensor:
    """``keep_mask`` for boxes already in the walk's order: along each image's row, ``groups``
    (integer Tensor[B, N]) is non-decreasing and the scores do not increase within a group.

    No key and no sort: the runs are the stretches of equal (image, group), positions are
    input positions, ``valid`` (bool Tensor[B, N] or None) is read in place. Launches: the
    mask and reduce kernels (one window). Returns bool Tensor[B, N].
    """
    b, n = groups.shape
    t = b * n
    _check_size(t)
    keep = _keep_out(b, n, boxes.device, poison)
    if t == 0:
        return keep
    if t >= 2**31:
        raise ValueError(f"NMS over {t} boxes: the kernels index positions in int32")
    _greedy(boxes, t, n, iou_threshold, keep.view(torch.uint8), key=None, src=None, cls=groups, exact=False,
            padded=valid is not None, valid=valid.view(torch.uint8) if valid is not None else None, rank=None,
            count=None, max_chunk=max_chunk, max_window=max_window, poison=poison, or_by_bits=or_by_bits,
            unroll=unroll)
    return keep
