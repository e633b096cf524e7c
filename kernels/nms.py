"""Triton kernels for greedy NMS over boxes sorted into segments, entirely on the GPU.

The caller sorts the boxes so that each group (image x class) is one contiguous segment,
by decreasing score inside it; box ``j > i`` can then only be suppressed by box ``i``
of its own segment. The sorted boxes are processed in chunks of ``C`` positions (a power
of two), which bounds the memory at ``C * C / 8`` bytes of suppression bits for any N:

1. ``_nms_cross_kernel`` (chunks after the first): for every box of the chunk, whether a
   box already kept in an earlier chunk of its segment suppresses it. Those decisions
   are final, so this is one parallel OR over rows, written as one word per 64 columns.
2. ``_nms_mask_kernel``: the suppression bits of every pair (row i < column j) of the
   chunk in the same segment, packed into 64-bit words; tiles whose rows and columns
   share no segment are skipped (with 80 classes nearly all of them).
3. ``_nms_reduce_kernel``: the greedy walk. One program per segment start (segments are
   independent), walking its boxes 64 at a time: the block's 64 diagonal words are
   resolved in registers, then the rows kept are ORed into a "removed" bit-vector held
   in registers. Nothing goes back to the host.

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

import torch
import triton
import triton.language as tl

from ._common import gpu_launch

# Largest chunk of sorted boxes whose suppression bits are held at once: 8192 x 8192 bits
# is 8 MiB, and the reduce kernel holds a 128-word removed vector in registers. Up to 8192
# boxes need a single chunk (no cross-chunk pass). Not yet tuned on a GPU: 4096 and 16384
# are the candidates to compare with benchmarks/bench_nms.py (20k and 100k boxes).
MAX_CHUNK = 8192
# Boxes per mask word (one int64 word holds the bits of 64 columns); WORD is its constexpr
# for the kernels.
WORD_BITS = 64
WORD = tl.constexpr(WORD_BITS)
# Rows per step of each kernel. On the GPU: [64 rows, 64 columns] pair tiles at 8 warps
# (32 rows for fp64) and [16, W] word tiles at 4 warps compile for sm_90 to at most ~150
# registers per thread with no spills. Under Triton's interpreter each operation of each
# program costs a fixed overhead, so its tiles are made tall.
GPU_ROWS = {"mask": 64, "cross": 64, "reduce": 16}
GPU_ROWS_F64 = {"mask": 32, "cross": 32, "reduce": 16}
INTERPRETER_ROWS = {"mask": 512, "cross": 512, "reduce": 64}


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
def _load_boxes(boxes_ptr, pos, ok, CDT: tl.constexpr):
    # (x1, y1, x2, y2) and area of the boxes at sorted positions ``pos``, in the compute dtype.
    p = boxes_ptr + pos * 4
    x1 = tl.load(p, mask=ok, other=0.0).to(CDT)
    y1 = tl.load(p + 1, mask=ok, other=0.0).to(CDT)
    x2 = tl.load(p + 2, mask=ok, other=0.0).to(CDT)
    y2 = tl.load(p + 3, mask=ok, other=0.0).to(CDT)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


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


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["c0", "chunk_len"])
def _nms_mask_kernel(boxes_ptr, seg_ptr, thr_ptr, mask_ptr, c0, chunk_len,
                     W: tl.constexpr, F64: tl.constexpr, ROWS: tl.constexpr):
    """Suppression bits of one [ROWS rows, 64 columns] tile of a chunk (upper triangle only).

    boxes_ptr: Tensor[T, 4] sorted boxes (fp16/bf16/fp32/fp64), contiguous.
    seg_ptr: int32 Tensor[T], segment id of each sorted box (non-decreasing).
    thr_ptr: fp64 Tensor[1], the decision value (see ``_suppresses``).
    mask_ptr: int64 Tensor[C, W] out; bit b of word w of row r is set when sorted box
        ``c0 + r`` suppresses box ``c0 + 64 * w + b`` (same segment, later, IoU > thr).
        Words of tiles that share no segment are not written (never read).
    """
    CDT: tl.constexpr = tl.float64 if F64 else tl.float32
    w = tl.program_id(0)
    rb = tl.program_id(1)
    c_end = c0 + chunk_len
    first_row = c0 + rb * ROWS
    first_col = c0 + w * WORD
    last_row = tl.minimum(first_row + ROWS, c_end) - 1
    if first_col + WORD - 1 > first_row:  # some pair has column > row
        # Rows and columns are sorted by segment: they share one only if the last row's
        # segment reaches the first column's. Skipping the rest is what makes 80 classes
        # cheap: their mask is block diagonal.
        if tl.load(seg_ptr + last_row) >= tl.load(seg_ptr + first_col):
            offs = tl.arange(0, WORD)
            rows = first_row + tl.arange(0, ROWS)
            cols = first_col + offs
            row_ok = rows < c_end
            col_ok = cols < c_end
            # ROWS + 64 boxes read once per tile, ROWS * 64 pairs tested in registers.
            rx1, ry1, rx2, ry2, r_area = _load_boxes(boxes_ptr, rows, row_ok, CDT)
            cx1, cy1, cx2, cy2, c_area = _load_boxes(boxes_ptr, cols, col_ok, CDT)
            r_seg = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
            c_seg = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
            thr = tl.load(thr_ptr)
            sup = _suppresses(rx1[:, None], ry1[:, None], rx2[:, None], ry2[:, None], r_area[:, None],
                              cx1[None, :], cy1[None, :], cx2[None, :], cy2[None, :], c_area[None, :],
                              thr, F64)
            sup = sup & (cols[None, :] > rows[:, None]) & (r_seg[:, None] == c_seg[None, :])
            # Pack each row's 64 bits into one word: 1 bit per pair written instead of 1 byte.
            bit = tl.full([WORD], 1, tl.int64) << offs.to(tl.int64)
            words = tl.sum(tl.where(sup, bit[None, :], 0), axis=1)
            tl.store(mask_ptr + (rows - c0) * W + w, words, mask=row_ok)


@triton.jit(do_not_specialize=["c0", "chunk_len"])
def _nms_cross_kernel(boxes_ptr, seg_ptr, seg_begin_ptr, keep_ptr, thr_ptr, removed_ptr, c0, chunk_len,
                      F64: tl.constexpr, ROWS: tl.constexpr):
    """Whether boxes kept in earlier chunks suppress 64 columns of this chunk.

    boxes_ptr: Tensor[T, 4] sorted boxes, contiguous.
    seg_ptr: int32 Tensor[T], segment id of each sorted box.
    seg_begin_ptr: int32 Tensor[T], first sorted position of each box's segment.
    keep_ptr: int8 Tensor[T], keep decisions (final for positions < c0).
    thr_ptr: fp64 Tensor[1], the decision value (see ``_suppresses``).
    removed_ptr: int64 Tensor[W] out; bit b of word q: box ``c0 + 64 * q + b`` is suppressed.
    """
    CDT: tl.constexpr = tl.float64 if F64 else tl.float32
    q = tl.program_id(0)
    offs = tl.arange(0, WORD)
    cols = c0 + q * WORD + offs
    col_ok = cols < c0 + chunk_len
    cx1, cy1, cx2, cy2, c_area = _load_boxes(boxes_ptr, cols, col_ok, CDT)
    c_seg = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
    thr = tl.load(thr_ptr)
    hit = tl.zeros([WORD], dtype=tl.int32)
    # Only rows from the first column's segment start can share a segment with the columns.
    # The rows' keep flags are final, so this is an OR over rows with no sequential part,
    # and no earlier-chunk bits are ever stored.
    # (while loops rather than range() over loaded bounds: Triton 3.6's interpreter cannot
    # take a loaded value as a range bound.)
    r0 = tl.load(seg_begin_ptr + c0 + q * WORD)
    while r0 < c0:
        rows = r0 + tl.arange(0, ROWS)
        kept = tl.load(keep_ptr + rows, mask=rows < c0, other=0) != 0
        rx1, ry1, rx2, ry2, r_area = _load_boxes(boxes_ptr, rows, kept, CDT)
        r_seg = tl.load(seg_ptr + rows, mask=kept, other=-1)
        sup = _suppresses(rx1[:, None], ry1[:, None], rx2[:, None], ry2[:, None], r_area[:, None],
                          cx1[None, :], cy1[None, :], cx2[None, :], cy2[None, :], c_area[None, :],
                          thr, F64)
        sup = sup & kept[:, None] & (r_seg[:, None] == c_seg[None, :])
        hit = tl.maximum(hit, tl.max(sup.to(tl.int32), axis=0))
        r0 += ROWS
    bit = tl.full([WORD], 1, tl.int64) << offs.to(tl.int64)
    tl.store(removed_ptr + q, tl.sum(tl.where(hit != 0, bit, 0), axis=0))


@triton.jit(do_not_specialize=["c0", "chunk_len"])
def _nms_reduce_kernel(mask_ptr, removed_ptr, valid_ptr, next_start_ptr, keep_ptr, c0, chunk_len,
                       W: tl.constexpr, HAS_REMOVED: tl.constexpr, HAS_VALID: tl.constexpr,
                       SUB_ROWS: tl.constexpr, OR_BY_BITS: tl.constexpr):
    """Greedy NMS walk over the segments that start in one 64-box block of a chunk.

    mask_ptr: int64 Tensor[C, W], the chunk's suppression bits (``_nms_mask_kernel``).
    removed_ptr: int64 Tensor[W], boxes of the chunk suppressed by earlier chunks
        (read when HAS_REMOVED).
    valid_ptr: int8 Tensor[T], 0 for padding boxes (never kept, suppress nothing; read
        when HAS_VALID).
    next_start_ptr: int32 Tensor[T + 1], first segment start at or after each position
        (``next_start[T] = T``).
    keep_ptr: int8 Tensor[T] out, 1 = kept; this program writes the positions it owns.
    """
    p = tl.program_id(0)
    c_end = c0 + chunk_len
    blk0 = c0 + p * WORD
    blk_end = tl.minimum(blk0 + WORD, c_end)
    # This program owns the segments starting in block p, up to the next segment start after
    # the block (program 0 also owns the tail of a segment begun in an earlier chunk).
    # Segments never suppress each other, so the owners run in parallel.
    s = tl.where(p == 0, c0, tl.load(next_start_ptr + blk0))
    if s < blk_end:
        e = tl.minimum(tl.load(next_start_ptr + blk_end), c_end)
        last_blk = (e - 1 - c0) // WORD
        offs_w = tl.arange(0, W)
        if HAS_REMOVED:
            removed = tl.load(removed_ptr + offs_w)
        else:
            removed = tl.zeros([W], dtype=tl.int64)
        offs = tl.arange(0, WORD)
        offs64 = offs.to(tl.int64)
        bit = tl.full([WORD], 1, tl.int64) << offs64
        k = p
        while k <= last_blk:
            pos = c0 + k * WORD + offs
            mine = (pos >= s) & (pos < e)
            if HAS_VALID:
                mine_valid = mine & (tl.load(valid_ptr + pos, mask=mine, other=0) != 0)
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
            diag = tl.load(mask_ptr + rows * W + k, mask=c0 + rows < e, other=0)
            kept = ~r
            new = ~(r | _or_rows(tl.where(((kept >> offs64) & 1) != 0, diag, 0), OR_BY_BITS))
            while new != kept:
                kept = new
                new = ~(r | _or_rows(tl.where(((kept >> offs64) & 1) != 0, diag, 0), OR_BY_BITS))
            tl.store(keep_ptr + pos, ((kept >> offs64) & 1).to(tl.int8), mask=mine)
            # Push the kept rows' words (to the end of each row's segment) into `removed`;
            # removed rows are not read at all.
            for sub in tl.static_range(WORD // SUB_ROWS):
                rb = sub * SUB_ROWS + tl.arange(0, SUB_ROWS)
                rpos = c0 + k * WORD + rb
                rkept = ((kept >> rb.to(tl.int64)) & 1) != 0
                seg_end = tl.load(next_start_ptr + rpos + 1, mask=rkept, other=0)
                last_w = (tl.minimum(seg_end, c_end) - 1 - c0) // WORD
                ld = rkept[:, None] & (offs_w[None, :] > k) & (offs_w[None, :] <= last_w[:, None])
                words = tl.load(mask_ptr + (rpos - c0)[:, None] * W + offs_w[None, :], mask=ld, other=0)
                removed = removed | _or_rows(words, OR_BY_BITS)
            k += 1


# --------------------------------------------------------------------------- launcher


def fp32_decision_value(iou_threshold: float) -> float:
    """``m`` such that, for fp32 ``inter`` and ``union > 0``, torchvision's
    ``float32(inter / union) > iou_threshold`` holds exactly when ``inter > m * union``.

    ``m`` is the midpoint between the smallest fp32 above the threshold and its predecessor:
    a correctly rounded quotient reaches that float exactly when the true quotient passes
    the midpoint. (It never equals it: see the module docstring. This holds for thresholds
    in fp32's normal range, i.e. above 1.2e-38 in magnitude or zero.)
    """
    thr = torch.tensor(iou_threshold, dtype=torch.float64)
    up = thr.to(torch.float32)  # round to nearest, then step up to the smallest fp32 > thr
    if up.to(torch.float64) <= thr:
        up = torch.nextafter(up, torch.tensor(float("inf")))
    down = torch.nextafter(up, torch.tensor(float("-inf")))
    return float((up.to(torch.float64) + down.to(torch.float64)) / 2)  # exact: 25 significant bits


def nms_sorted_keep(boxes: torch.Tensor, seg: torch.Tensor, seg_begin: torch.Tensor, next_start: torch.Tensor,
                    valid: torch.Tensor | None, iou_threshold: float, *, max_chunk: int = MAX_CHUNK,
                    poison: bool = False, or_by_bits: bool | None = None) -> torch.Tensor:
    """Greedy NMS keep flags of boxes sorted into segments: int8 Tensor[T], 1 = kept.

    ``boxes``: Tensor[T, 4] contiguous, sorted by segment then decreasing score; ``seg``:
    int32 Tensor[T] segment ids; ``seg_begin``: int32 Tensor[T] first position of each box's
    segment; ``next_start``: int32 Tensor[T + 1] first segment start at or after each
    position; ``valid``: optional int8 Tensor[T] (0 = padding). ``max_chunk``: a power of two
    >= 64 (tests use small chunks to exercise the cross-chunk pass). ``poison``: fill the
    outputs and scratch with values that fail the tests if a kernel leaves them unwritten.
    ``or_by_bits``: how the reduce kernel ORs words (see ``_or_rows``); default: by bits
    under the interpreter, ``tl.reduce`` on the GPU.
    """
    t = boxes.shape[0]
    dev = boxes.device

    def alloc(shape, dtype, poison_value):
        if poison:
            return torch.full(shape, poison_value, dtype=dtype, device=dev)
        return torch.empty(shape, dtype=dtype, device=dev)

    keep = alloc((t,), torch.int8, 2)
    if t == 0:
        return keep
    chunk = min(triton.next_power_of_2(max(t, WORD_BITS)), max_chunk)  # power of two: few compiled variants
    w = chunk // WORD_BITS
    # Scratch poisoned with all bits set: reading an unwritten word would remove boxes.
    mask = alloc((chunk, w), torch.int64, -1)
    removed = alloc((w,), torch.int64, -1)
    f64 = boxes.dtype == torch.float64
    value = float(iou_threshold) if f64 else fp32_decision_value(iou_threshold)
    thr = torch.full((1,), value, dtype=torch.float64, device=dev)  # a fill kernel, no copy
    valid_arg = valid if valid is not None else keep
    rows = (GPU_ROWS_F64 if f64 else GPU_ROWS) if gpu_launch(dev) else INTERPRETER_ROWS
    if or_by_bits is None:
        or_by_bits = not gpu_launch(dev)
    for c0 in range(0, t, chunk):
        n = min(chunk, t - c0)
        nw = triton.cdiv(n, WORD_BITS)
        if c0 > 0:
            # One program per 64 columns of the chunk.
            _nms_cross_kernel[(nw,)](
                boxes_ptr=boxes, seg_ptr=seg, seg_begin_ptr=seg_begin, keep_ptr=keep, thr_ptr=thr,
                removed_ptr=removed, c0=c0, chunk_len=n, F64=f64, ROWS=rows["cross"],
                num_warps=8, enable_fp_fusion=False)
        # One program per (column word, block of ROWS rows) of the chunk; tiles wholly
        # below the diagonal exit at once.
        _nms_mask_kernel[(nw, triton.cdiv(n, rows["mask"]))](
            boxes_ptr=boxes, seg_ptr=seg, thr_ptr=thr, mask_ptr=mask, c0=c0, chunk_len=n,
            W=w, F64=f64, ROWS=rows["mask"], num_warps=8, enable_fp_fusion=False)
        # One program per 64-box block; only blocks where a segment starts (and block 0) work.
        _nms_reduce_kernel[(nw,)](
            mask_ptr=mask, removed_ptr=removed, valid_ptr=valid_arg, next_start_ptr=next_start, keep_ptr=keep,
            c0=c0, chunk_len=n, W=w, HAS_REMOVED=c0 > 0, HAS_VALID=valid is not None,
            SUB_ROWS=rows["reduce"], OR_BY_BITS=or_by_bits, num_warps=4)
    return keep
