"""Triton kernels for box decoding: the box head's class-specific decode, and the RPN's fused
proposal step (anchor generation + decode + clip + small-box and score flags).

Both follow torchvision's ``BoxCoder.decode_single`` operation by operation:

    w = x2 - x1;  cx = x1 + 0.5 * w;  dx /= wx;  dw = min(dw / ww, clip)
    pcx = dx * w + cx;  pw = exp(dw) * w;  box = (pcx - 0.5 * pw, ..., pcx + 0.5 * pw, ...)

Computation is in fp32 (fp64 for fp64 inputs); fp16/bf16 are rounded once when stored. The
launchers turn off fused multiply-add contraction (``enable_fp_fusion=False``: torch's eager
kernels never fuse across ops) and round as torch does on the device (``CUDA_MATH``): on
the GPU libdevice's ``exp`` (the ``expf`` of torch's CUDA kernels) and a division by a
weight as a multiplication by its fp32 reciprocal (torch's CUDA division by a scalar), so
the result is torchvision's bit for bit; under Triton's interpreter an exact division, as
torch's CPU kernels, and NumPy's ``exp``, which is 1 ulp from torch's CPU ``exp`` on about
a quarter of the inputs: the only difference from torchvision there (tested). Weights of
1 are skipped at compile time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import gpu_launch, round_to_bf16

# Elements one program handles. On the GPU: 1024 (box head) and 512 (proposals) keep every
# thread busy at 4 warps; the proposal stage has only ~10k candidates, so it is launch-bound.
# Under the interpreter each program costs a fixed overhead, so programs are made wide.
GPU_BLOCK = 1024
GPU_PROPOSAL_BLOCK = 512
INTERPRETER_BLOCK = 8192


# --------------------------------------------------------------------------- shared pieces


@triton.jit
def _exp(x, CUDA_MATH: tl.constexpr):
    if CUDA_MATH:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _const(v: tl.constexpr, dt: tl.constexpr):
    # A Python float as a scalar of the compute dtype. Used directly in arithmetic, a float
    # constexpr is rounded to fp32 by some Triton releases (3.6) even next to fp64 tensors;
    # an fp64 decode must use the exact double that torch uses.
    return tl.full([], v, dt)


@triton.jit
def _unweight(d, W: tl.constexpr, F64: tl.constexpr, CUDA_MATH: tl.constexpr):
    # d / W as torch computes it: fp64 divides; fp32 multiplies by the fp32 reciprocal on the
    # GPU (torch's CUDA division by a scalar) and divides exactly on the CPU (torch's CPU
    # kernels); W == 1 costs nothing.
    if W != 1.0:
        if F64:
            d = d / _const(W, tl.float64)
        elif CUDA_MATH:
            d = d * (1.0 / W)
        else:
            d = tl.div_rn(d, _const(W, tl.float32))
    return d


@triton.jit
def _decode(dx, dy, dw, dh, x1, y1, x2, y2, WX: tl.constexpr, WY: tl.constexpr, WW: tl.constexpr,
            WH: tl.constexpr, XFORM_CLIP: tl.constexpr, F64: tl.constexpr, CUDA_MATH: tl.constexpr):
    """BoxCoder.decode_single on one block of (delta, reference box) pairs, in registers."""
    widths = x2 - x1
    heights = y2 - y1
    ctr_x = x1 + 0.5 * widths
    ctr_y = y1 + 0.5 * heights
    dx = _unweight(dx, WX, F64, CUDA_MATH)
    dy = _unweight(dy, WY, F64, CUDA_MATH)
    clamp = _const(XFORM_CLIP, tl.float64 if F64 else tl.float32)
    dw = tl.minimum(_unweight(dw, WW, F64, CUDA_MATH), clamp, propagate_nan=tl.PropagateNan.ALL)
    dh = tl.minimum(_unweight(dh, WH, F64, CUDA_MATH), clamp, propagate_nan=tl.PropagateNan.ALL)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (_exp(dw, CUDA_MATH) * widths)
    half_h = 0.5 * (_exp(dh, CUDA_MATH) * heights)
    return pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h


@triton.jit
def _clip(v, hi):
    # clamp(v, 0, hi) with torch's NaN propagation
    v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _to_out(x, out_ptr):
    # x rounded to out_ptr's element type, to nearest even (bf16 through round_to_bf16, the
    # same in the interpreter and on the GPU).
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    if out_ty == tl.bfloat16:
        return round_to_bf16(x.to(tl.float32)).to(tl.bfloat16)
    else:
        return x.to(out_ty)


# --------------------------------------------------------------------------- box head decode


@triton.jit(do_not_specialize=["N"])
def _decode_boxes_kernel(
    codes_ptr, boxes_ptr, sizes_ptr, out_ptr,
    N, K, clip_h, clip_w,
    stride_cn, stride_ck, stride_bn, stride_bk, stride_sn, stride_sk,
    WX: tl.constexpr, WY: tl.constexpr, WW: tl.constexpr, WH: tl.constexpr, XFORM_CLIP: tl.constexpr,
    CLIP_MODE: tl.constexpr, F64: tl.constexpr, CUDA_MATH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode a [BLOCK_N rows, BLOCK_K boxes] tile of class-specific deltas.

    codes_ptr: Tensor[N, 4K] deltas (dx, dy, dw, dh) per box, any strides.
    boxes_ptr: Tensor[N, 4] reference boxes (proposals), any strides.
    sizes_ptr: Tensor[N, 2] per-row (h, w) to clip to (read only when CLIP_MODE == 2).
    out_ptr: Tensor[N, 4K] contiguous, decoded (x1, y1, x2, y2) in the codes' dtype.
    CLIP_MODE: 0 no clipping, 1 clip every row to (clip_h, clip_w), 2 per-row sizes.
    """
    cdt: tl.constexpr = tl.float64 if F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)

    # Reference box of each row: 4 values per row, read once per tile instead of once per
    # class (the reference broadcasts them through [N, K] temporaries).
    bp = boxes_ptr + rows64 * stride_bn
    x1 = tl.load(bp, mask=row_ok, other=0.0).to(cdt)[:, None]
    y1 = tl.load(bp + stride_bk, mask=row_ok, other=0.0).to(cdt)[:, None]
    x2 = tl.load(bp + 2 * stride_bk, mask=row_ok, other=0.0).to(cdt)[:, None]
    y2 = tl.load(bp + 3 * stride_bk, mask=row_ok, other=0.0).to(cdt)[:, None]

    # The 4 deltas of each (row, class): strided loads that together read each 16-byte
    # group of the row once; no temporaries are written.
    cp = codes_ptr + rows64[:, None] * stride_cn + (4 * cols)[None, :].to(tl.int64) * stride_ck
    dx = tl.load(cp, mask=mask, other=0.0).to(cdt)
    dy = tl.load(cp + stride_ck, mask=mask, other=0.0).to(cdt)
    dw = tl.load(cp + 2 * stride_ck, mask=mask, other=0.0).to(cdt)
    dh = tl.load(cp + 3 * stride_ck, mask=mask, other=0.0).to(cdt)

    bx1, by1, bx2, by2 = _decode(dx, dy, dw, dh, x1, y1, x2, y2, WX, WY, WW, WH, XFORM_CLIP, F64, CUDA_MATH)

    # Clipping to the image in the same pass: saves the box head a read and a write of
    # the [N, 4K] boxes (and torchvision's per-image loop of clamp + stack launches).
    if CLIP_MODE == 1:
        bx1, by1 = _clip(bx1, clip_w), _clip(by1, clip_h)
        bx2, by2 = _clip(bx2, clip_w), _clip(by2, clip_h)
    elif CLIP_MODE == 2:
        sp = sizes_ptr + rows64 * stride_sn
        h = tl.load(sp, mask=row_ok, other=0.0).to(cdt)[:, None]
        w = tl.load(sp + stride_sk, mask=row_ok, other=0.0).to(cdt)[:, None]
        bx1, by1, bx2, by2 = _clip(bx1, w), _clip(by1, h), _clip(bx2, w), _clip(by2, h)

    op = out_ptr + rows64[:, None] * (4 * K) + (4 * cols)[None, :]
    tl.store(op, _to_out(bx1, out_ptr), mask=mask)
    tl.store(op + 1, _to_out(by1, out_ptr), mask=mask)
    tl.store(op + 2, _to_out(bx2, out_ptr), mask=mask)
    tl.store(op + 3, _to_out(by2, out_ptr), mask=mask)


def decode_boxes(rel_codes: torch.Tensor, boxes: torch.Tensor, weights, bbox_xform_clip: float, clip_to=None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the box-head decode: Tensor[N, 4K] codes + Tensor[N, 4] boxes -> Tensor[N, 4K].

    ``clip_to``: None, ``(h, w)`` or Tensor[N, 2] per-row sizes. ``out``: optional contiguous
    Tensor[N, 4K] to write into (tests pass one filled with NaN to catch unwritten values).
    """
    n, k4 = rel_codes.shape
    k = k4 // 4
    if out is None:
        out = torch.empty((n, k4), dtype=rel_codes.dtype, device=rel_codes.device)
    if n == 0 or k == 0:
        return out
    clip_mode, clip_h, clip_w, sizes = 0, 0.0, 0.0, boxes
    if isinstance(clip_to, torch.Tensor):
        clip_mode, sizes = 2, clip_to
    elif clip_to is not None:
        clip_mode, clip_h, clip_w = 1, float(clip_to[0]), float(clip_to[1])
    on_gpu = gpu_launch(rel_codes.device)
    block_k = min(triton.next_power_of_2(k), 128)
    block_n = max(1, (GPU_BLOCK if on_gpu else INTERPRETER_BLOCK) // block_k)
    block_n = min(block_n, triton.next_power_of_2(n))
    # One program per tile of BLOCK_N rows x BLOCK_K boxes (classes) of those rows.
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    wx, wy, ww, wh = (float(w) for w in weights)
    _decode_boxes_kernel[grid](
        codes_ptr=rel_codes, boxes_ptr=boxes, sizes_ptr=sizes, out_ptr=out,
        N=n, K=k, clip_h=clip_h, clip_w=clip_w,
        stride_cn=rel_codes.stride(0), stride_ck=rel_codes.stride(1),
        stride_bn=boxes.stride(0), stride_bk=boxes.stride(1),
        stride_sn=sizes.stride(0), stride_sk=sizes.stride(1),
        WX=wx, WY=wy, WW=ww, WH=wh, XFORM_CLIP=float(bbox_xform_clip),
        CLIP_MODE=clip_mode, F64=rel_codes.dtype == torch.float64, CUDA_MATH=on_gpu,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False,
    )
    return out


# --------------------------------------------------------------------------- RPN proposals


@triton.jit(do_not_specialize=["N", "stride_ib", "stride_pb", "stride_db", "stride_da", "stride_ab"])
def _rpn_candidates_kernel(
    idx_ptr, prob_ptr, deltas_ptr, anchors_ptr, cells_ptr, levels_ptr, sizes_ptr,
    boxes_out_ptr, valid_out_ptr, level_out_ptr,
    N,
    stride_ib, stride_pb, stride_db, stride_da, stride_dk, stride_ab, stride_aa, stride_ak,
    NUM_LEVELS: tl.constexpr, MAX_CELLS: tl.constexpr, GENERATE_ANCHORS: tl.constexpr,
    XFORM_CLIP: tl.constexpr, MIN_SIZE: tl.constexpr, SCORE_THRESH: tl.constexpr,
    F64: tl.constexpr, CUDA_MATH: tl.constexpr, BLOCK: tl.constexpr,
):
    """Turn one block of one image's top-k candidates into clipped proposal boxes and flags.

    idx_ptr: int64 Tensor[B, N], each candidate's anchor index within its level (the
        concatenated per-level top-k indices; level l fills columns [start_l, start_l+k_l)).
    prob_ptr: Tensor[B, N], the candidates' objectness probabilities (sigmoid of the logits).
    deltas_ptr: Tensor[B, A, 4], the RPN's deltas of every anchor (only N per image are read).
    anchors_ptr: Tensor[B, A, 4] anchors, read only when GENERATE_ANCHORS is false.
    cells_ptr: int64 Tensor[L, MAX_CELLS, 4], each level's zero-centred cell anchors (integers).
    levels_ptr: int64 Tensor[L, 6]: per level (start column in N, first anchor index in A,
        cell anchors per location, grid width, stride_y, stride_x).
    sizes_ptr: int64 Tensor[B, 2], each image's (h, w).
    boxes_out_ptr: Tensor[B, N, 4] contiguous, the clipped boxes, in the deltas' dtype.
    valid_out_ptr: bool Tensor[B, N]: width and height >= MIN_SIZE and prob >= SCORE_THRESH.
    level_out_ptr: int64 Tensor[B, N], the FPN level of each candidate.
    MIN_SIZE, SCORE_THRESH: already rounded to the boxes' and probabilities' dtypes, as torch
        rounds a Python scalar before comparing.
    """
    cdt: tl.constexpr = tl.float64 if F64 else tl.float32
    img = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pos < N

    # Level of each candidate from the level table's start columns (a few scalar loads).
    lvl = tl.zeros([BLOCK], dtype=tl.int32)
    for l in tl.static_range(1, NUM_LEVELS):
        start = tl.load(levels_ptr + l * 6)
        lvl += (pos >= start).to(tl.int32)
    lrow = levels_ptr + lvl * 6
    first_anchor = tl.load(lrow + 1, mask=mask, other=0)

    j = tl.load(idx_ptr + img * stride_ib + pos, mask=mask, other=0)  # index within the level
    a = first_anchor + j  # index within all anchors of the image

    # Gather only the top-k candidates' deltas: N*4 values per image out of A*4 (~2%).
    dp = deltas_ptr + img * stride_db + a * stride_da
    dx = tl.load(dp, mask=mask, other=0.0).to(cdt)
    dy = tl.load(dp + stride_dk, mask=mask, other=0.0).to(cdt)
    dw = tl.load(dp + 2 * stride_dk, mask=mask, other=0.0).to(cdt)
    dh = tl.load(dp + 3 * stride_dk, mask=mask, other=0.0).to(cdt)

    if GENERATE_ANCHORS:
        # The anchor from the level's geometry (see fastmask.ops.anchors): no [B, A, 4]
        # anchor table is built or read. Integer shifts + integer cell anchors: exact.
        n_cells = tl.load(lrow + 2, mask=mask, other=1)
        grid_w = tl.load(lrow + 3, mask=mask, other=1)
        stride_y = tl.load(lrow + 4, mask=mask, other=0)
        stride_x = tl.load(lrow + 5, mask=mask, other=0)
        loc = j // n_cells
        cell = j - loc * n_cells
        row = loc // grid_w
        col = loc - row * grid_w
        sx = (col * stride_x).to(cdt)
        sy = (row * stride_y).to(cdt)
        cp = cells_ptr + (lvl.to(tl.int64) * MAX_CELLS + cell) * 4
        x1 = sx + tl.load(cp, mask=mask, other=0.0).to(cdt)
        y1 = sy + tl.load(cp + 1, mask=mask, other=0.0).to(cdt)
        x2 = sx + tl.load(cp + 2, mask=mask, other=0.0).to(cdt)
        y2 = sy + tl.load(cp + 3, mask=mask, other=0.0).to(cdt)
    else:
        ap = anchors_ptr + img * stride_ab + a * stride_aa
        x1 = tl.load(ap, mask=mask, other=0.0).to(cdt)
        y1 = tl.load(ap + stride_ak, mask=mask, other=0.0).to(cdt)
        x2 = tl.load(ap + 2 * stride_ak, mask=mask, other=0.0).to(cdt)
        y2 = tl.load(ap + 3 * stride_ak, mask=mask, other=0.0).to(cdt)

    bx1, by1, bx2, by2 = _decode(dx, dy, dw, dh, x1, y1, x2, y2, 1.0, 1.0, 1.0, 1.0, XFORM_CLIP, F64, CUDA_MATH)

    # Clip to the image, round to the output dtype, then flag small boxes and low scores
    # on the rounded values (as torchvision tests the stored boxes): the clip, the size
    # test and the score test need no [B, N] temporaries and no host sync.
    h = tl.load(sizes_ptr + img * 2).to(cdt)
    w = tl.load(sizes_ptr + img * 2 + 1).to(cdt)
    bx1 = _to_out(_clip(bx1, w), boxes_out_ptr)
    by1 = _to_out(_clip(by1, h), boxes_out_ptr)
    bx2 = _to_out(_clip(bx2, w), boxes_out_ptr)
    by2 = _to_out(_clip(by2, h), boxes_out_ptr)
    ws = _to_out(bx2.to(cdt) - bx1.to(cdt), boxes_out_ptr).to(cdt)
    hs = _to_out(by2.to(cdt) - by1.to(cdt), boxes_out_ptr).to(cdt)
    prob = tl.load(prob_ptr + img * stride_pb + pos, mask=mask, other=0.0).to(cdt)
    min_size = _const(MIN_SIZE, cdt)
    ok = (ws >= min_size) & (hs >= min_size) & (prob >= _const(SCORE_THRESH, cdt))

    op = boxes_out_ptr + (img * N + pos) * 4
    tl.store(op, bx1, mask=mask)
    tl.store(op + 1, by1, mask=mask)
    tl.store(op + 2, bx2, mask=mask)
    tl.store(op + 3, by2, mask=mask)
    tl.store(valid_out_ptr + img * N + pos, ok, mask=mask)
    tl.store(level_out_ptr + img * N + pos, lvl.to(tl.int64), mask=mask)


def rpn_candidates(top_idx: torch.Tensor, probs: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor | None,
                   cells: torch.Tensor, level_table: torch.Tensor, image_sizes: torch.Tensor, *,
                   bbox_xform_clip: float, min_size: float, score_thresh: float, poison: bool = False):
    """Launch the proposal kernel for all images and levels at once.

    ``top_idx`` int64 [B, N], ``probs`` [B, N], ``deltas`` [B, A, 4], ``anchors`` [B, A, 4] or
    None (generate them from ``cells`` int64 [L, C, 4] and ``level_table`` int64 [L, 6]),
    ``image_sizes`` int64 [B, 2]. ``min_size`` / ``score_thresh`` must already be rounded to
    the deltas' / probs' dtypes. Returns (boxes [B, N, 4], valid bool [B, N], levels int64
    [B, N]). ``poison``: fill the outputs with NaN / True / -1 first (tests).
    """
    b, n = top_idx.shape
    dev = deltas.device
    top_idx, probs = top_idx.contiguous(), probs.contiguous()  # the kernel reads their rows densely
    if poison:
        boxes = torch.full((b, n, 4), float("nan"), dtype=deltas.dtype, device=dev)
        valid = torch.ones((b, n), dtype=torch.bool, device=dev)
        levels = torch.full((b, n), -1, dtype=torch.int64, device=dev)
    else:
        boxes = torch.empty((b, n, 4), dtype=deltas.dtype, device=dev)
        valid = torch.empty((b, n), dtype=torch.bool, device=dev)
        levels = torch.empty((b, n), dtype=torch.int64, device=dev)
    if b == 0 or n == 0:
        return boxes, valid, levels
    on_gpu = gpu_launch(dev)
    block = GPU_PROPOSAL_BLOCK if on_gpu else min(INTERPRETER_BLOCK, triton.next_power_of_2(n))
    src = deltas if anchors is None else anchors
    # One program per BLOCK candidates of one image: all images and levels in one launch.
    grid = (triton.cdiv(n, block), b)
    _rpn_candidates_kernel[grid](
        idx_ptr=top_idx, prob_ptr=probs, deltas_ptr=deltas, anchors_ptr=src, cells_ptr=cells,
        levels_ptr=level_table, sizes_ptr=image_sizes,
        boxes_out_ptr=boxes, valid_out_ptr=valid, level_out_ptr=levels,
        N=n,
        stride_ib=top_idx.stride(0), stride_pb=probs.stride(0),
        stride_db=deltas.stride(0), stride_da=deltas.stride(1), stride_dk=deltas.stride(2),
        stride_ab=src.stride(0), stride_aa=src.stride(1), stride_ak=src.stride(2),
        NUM_LEVELS=level_table.shape[0], MAX_CELLS=cells.shape[1], GENERATE_ANCHORS=anchors is None,
        XFORM_CLIP=float(bbox_xform_clip), MIN_SIZE=float(min_size), SCORE_THRESH=float(score_thresh),
        F64=deltas.dtype == torch.float64, CUDA_MATH=on_gpu, BLOCK=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return boxes, valid, levels
