"""The RPN's proposal step, the same proposals as torchvision's ``RegionProposalNetwork``.

For each image, torchvision's ``filter_proposals`` (applied to the deltas decoded on every
anchor) does, in order:

1. per FPN level, keep the ``pre_nms_top_n`` anchors of highest objectness logit;
2. decode them (``BoxCoder((1, 1, 1, 1))``, dw/dh clamped at ``log(1000 / 16)``) and clip
   them to the image;
3. drop boxes with a side ``< min_size`` and boxes with ``sigmoid(logit) < score_thresh``;
4. NMS at ``nms_thresh``, each level separately;
5. keep the ``post_nms_top_n`` survivors of highest score, by decreasing score.

Decoding only the top-k anchors gives the same boxes as decoding all of them (the decode is
per box). Steps 2-3 produce fixed-shape candidates ``[B, N]`` (N = sum over levels of
``min(pre_nms_top_n, A_l)``) with a ``valid`` flag instead of removing boxes, so the whole
path runs without a host sync until the final variable-length lists (one ``.tolist()``).

The reference (``rpn_candidates_ref``) gathers the top-k deltas and anchors and decodes them
with ``decode_boxes_ref``; it reads the materialised anchors. The Triton kernel
(``fastmask.kernels.box_decode.rpn_candidates``) does steps 2-3 for all images and levels in one
launch and computes each anchor from the :class:`~fastmask.ops.anchors.AnchorGeometry`
(stride, grid width, cell anchors) instead of reading a [B, A, 4] anchor table: per image it
reads N indices, N probabilities and N*4 deltas and writes N*4 boxes, N flags and N levels.
torchvision instead decodes all A anchors (~240k per 800x1216 image, ~15 elementwise passes
over [A, 4]) and filters with several host syncs per image and level.

Bytes the stage must move (``benchmarks/bench_proposals.py`` divides them by the time): per
image ``4 A`` (fp32 logits, all read by the top-k) + ``16 N`` (the gathered deltas) + ``20``
per returned proposal. About 2.3 MB for two 800x1216 images: the stage is bound by kernel
launches and the top-k, not by memory traffic.

Ties: equal objectness logits are ordered by ``torch.topk`` as in torchvision; survivors with
equal scores are returned in candidate order (level, then top-k rank), where torchvision's
unstable sort may order them differently.
"""

from __future__ import annotations

import functools
import itertools
import numbers
from typing import Sequence

import torch
from torch import Tensor

from ._backend import resolve_backend
from ._checks import check_finite, check_same_device, check_tensor
from ._device import cached_table
from ._library import register
from .anchors import AnchorGeometry
from .boxes import BBOX_XFORM_CLIP, _image_size, decode_boxes_ref, per_row_image_sizes
from .nms import keep_mask_presorted_triton, nms_keep_mask_cpu

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- shared steps


def level_topk(objectness: Tensor, num_anchors_per_level: Sequence[int], pre_nms_top_n: int):
    """Per level top-k of Tensor[B, A] logits, as torchvision's ``_get_top_n_idx``.

    Returns (logits Tensor[B, N], index *within its level* int64 Tensor[B, N], per-level k).
    A loop over the levels (5 for FPN), each one batched ``topk`` over the images.
    """
    vals, idx, ks, start = [], [], [], 0
    for count in num_anchors_per_level:
        k = min(pre_nms_top_n, count)
        v, i = objectness[:, start:start + count].topk(k, dim=1)
        vals.append(v)
        idx.append(i)
        ks.append(k)
        start += count
    return torch.cat(vals, dim=1), torch.cat(idx, dim=1), ks


def select_proposals(boxes: Tensor, scores: Tensor, levels: Tensor, valid: Tensor, nms_thresh: float,
                     post_nms_top_n: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 4-5: per image and level NMS of the valid candidates, then the best
    ``post_nms_top_n`` by decreasing score. Inputs are [B, N] (boxes [B, N, 4]); ``backend``
    resolved. Returns padded (boxes Tensor[B, M, 4], scores Tensor[B, M], counts int64
    Tensor[B]) with M = min(post_nms_top_n, N): image i's proposals are its first counts[i]
    rows (the rows after them are suppressed candidates, not proposals). No host sync."""
    b, n = scores.shape
    keep = candidates_keep(boxes, scores, levels, valid, nms_thresh, backend)
    # Survivors first, by decreasing score; a stable sort keeps tied scores in candidate order.
    order = torch.where(keep, scores, -1.0).sort(dim=1, descending=True, stable=True).indices
    m = min(post_nms_top_n, n)
    order = order[:, :m]
    chosen_boxes = boxes.gather(1, order[:, :, None].expand(b, m, 4))
    chosen_scores = scores.gather(1, order)
    return chosen_boxes, chosen_scores, keep.sum(dim=1).clamp(max=m)


def candidates_keep(boxes: Tensor, scores: Tensor, levels: Tensor, valid: Tensor, nms_thresh: float,
                    backend: str) -> Tensor:
    """Step 4's keep mask [B, N]: NMS per image and level of the valid candidates."""
    if backend == "triton":
        # The candidates are already sorted by level and, within a level, by decreasing score
        # (top-k per level, then the monotone sigmoid): the kernels walk them without a sort.
        return keep_mask_presorted_triton(boxes, levels, valid, nms_thresh)
    return nms_keep_mask_cpu(boxes, scores, nms_thresh, levels, valid)


# --------------------------------------------------------------------------- reference


def rpn_candidates_ref(objectness: Tensor, deltas: Tensor, anchors: Tensor, image_sizes: Sequence[Sequence[int]],
                       num_anchors_per_level: Sequence[int], pre_nms_top_n: int, score_thresh: float = 0.0,
                       min_size: float = 1e-3, bbox_xform_clip: float = BBOX_XFORM_CLIP):
    """Steps 1-3 in plain torch. ``objectness`` Tensor[B, A] logits, ``deltas`` Tensor[B, A, 4],
    ``anchors`` Tensor[A, 4] (shared) or Tensor[B, A, 4].

    Returns (boxes Tensor[B, N, 4] clipped, in the deltas' dtype; scores Tensor[B, N]
    probabilities; levels int64 Tensor[B, N]; valid bool Tensor[B, N]).
    """
    b = objectness.shape[0]
    device = objectness.device
    logits, idx, ks = level_topk(objectness, num_anchors_per_level, pre_nms_top_n)
    n = idx.shape[1]
    starts = list(itertools.accumulate(num_anchors_per_level[:-1], initial=0))
    levels = torch.cat([torch.full((k,), lvl, dtype=torch.int64, device=device) for lvl, k in enumerate(ks)])
    levels = levels[None].expand(b, n)
    offsets = torch.cat([torch.full((k,), s, dtype=torch.int64, device=device) for s, k in zip(starts, ks)])
    a = idx + offsets  # index within all anchors of the image
    sel_deltas = deltas.gather(1, a[:, :, None].expand(b, n, 4))
    sel_anchors = anchors[a] if anchors.dim() == 2 else anchors.gather(1, a[:, :, None].expand(b, n, 4))
    clip_to = per_row_image_sizes(image_sizes, [n] * b, device)
    boxes = decode_boxes_ref(sel_deltas.reshape(-1, 4), sel_anchors.reshape(-1, 4), RPN_WEIGHTS, bbox_xform_clip,
                             clip_to=clip_to).reshape(b, n, 4)
    scores = torch.sigmoid(logits)
    ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    valid = (ws >= min_size) & (hs >= min_size) & (scores >= score_thresh)
    return boxes, scores, levels, valid


# --------------------------------------------------------------------------- Triton path


def rpn_candidates_triton(objectness: Tensor, deltas: Tensor, anchors: Tensor | AnchorGeometry,
                          image_sizes: Sequence[Sequence[int]], num_anchors_per_level: Sequence[int],
                          pre_nms_top_n: int, score_thresh: float = 0.0, min_size: float = 1e-3,
                          bbox_xform_clip: float = BBOX_XFORM_CLIP, poison: bool = False):
    """Steps 1-3 with the fused kernel; same inputs and outputs as :func:`rpn_candidates_ref`,
    except that ``anchors`` may be an :class:`AnchorGeometry` (then no anchor is read).
    ``anchors`` as a tensor must be Tensor[B, A, 4]."""
    from fastmask.kernels.box_decode import rpn_candidates

    b = objectness.shape[0]
    device = objectness.device
    logits, idx, ks = level_topk(objectness, num_anchors_per_level, pre_nms_top_n)
    scores = torch.sigmoid(logits)
    # One small int64 table, copied to the device once per geometry (cached): per level
    # (start column, first anchor, cells per location, grid width, stride_y, stride_x), then
    # the cell anchors padded to the widest level, then each image's (h, w).
    num_levels = len(ks)
    col_starts = list(itertools.accumulate(ks[:-1], initial=0))
    anchor_starts = list(itertools.accumulate(num_anchors_per_level[:-1], initial=0))
    if isinstance(anchors, AnchorGeometry):
        cells = anchors.cell_values
        geo = [(len(c), gw, sy, sx) for c, (_, gw), (sy, sx) in zip(cells, anchors.grid_sizes, anchors.strides)]
    else:
        cells = ((),) * num_levels
        geo = [(1, 1, 0, 0)] * num_levels
    max_cells = max(1, max(len(c) for c in cells))
    values = []
    for lvl in range(num_levels):
        values += [col_starts[lvl], anchor_starts[lvl], *geo[lvl]]
    for c in cells:
        values += [int(v) for row in c for v in row] + [0] * (4 * (max_cells - len(c)))
    for h, w in image_sizes:
        values += [int(h), int(w)]
    table = cached_table(tuple(values), torch.int64, device)  # a repeat call copies nothing
    n_level = num_levels * 6
    n_cells = num_levels * max_cells * 4
    level_table = table[:n_level].view(num_levels, 6)
    cell_table = table[n_level:n_level + n_cells].view(num_levels, max_cells, 4)
    size_table = table[n_level + n_cells:].view(b, 2)
    min_size_q = _rounded(min_size, deltas.dtype)
    score_thresh_q = _rounded(score_thresh, scores.dtype)
    boxes, valid, levels = rpn_candidates(
        idx, scores, deltas, None if isinstance(anchors, AnchorGeometry) else anchors, cell_table, level_table,
        size_table, bbox_xform_clip=bbox_xform_clip, min_size=min_size_q, score_thresh=score_thresh_q,
        poison=poison)
    return boxes, scores, levels, valid


@functools.lru_cache(maxsize=64)
def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as torch rounds a Python scalar compared with a tensor
    (computed once per value on the host, not on every call)."""
    return torch.tensor(value, dtype=dtype).item()


# --------------------------------------------------------------------------- public op


def _check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def rpn_proposals(objectness: Tensor, pred_bbox_deltas: Tensor, anchors: AnchorGeometry | Sequence[Tensor],
                  image_sizes: Sequence[Sequence[int]], num_anchors_per_level: Sequence[int] | None = None, *,
                  pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float, score_thresh: float = 0.0,
                  min_size: float = 1e-3, backend: str | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """RPN proposals per image: torchvision's ``RegionProposalNetwork.filter_proposals``
    applied to ``box_coder.decode(pred_bbox_deltas, anchors)`` (see the module docs).

    Arguments as :func:`rpn_proposals_padded`. Returns (boxes, scores): per image
    Tensor[K_i, 4] ``(x1, y1, x2, y2)`` in the deltas' dtype and Tensor[K_i] probabilities, by
    decreasing score, K_i <= post_nms_top_n. Nothing is differentiable (torchvision detaches
    the proposals too). Only the final split into per-image lists synchronises with the device.
    """
    boxes, scores, counts = rpn_proposals_padded(
        objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n=pre_nms_top_n,
        post_nms_top_n=post_nms_top_n, nms_thresh=nms_thresh, score_thresh=score_thresh, min_size=min_size,
        backend=backend)
    counts = counts.tolist()  # the one host sync: the per-image lists have variable lengths
    return [boxes[i, :c] for i, c in enumerate(counts)], [scores[i, :c] for i, c in enumerate(counts)]


def rpn_proposals_padded(objectness: Tensor, pred_bbox_deltas: Tensor,
                         anchors: AnchorGeometry | Sequence[Tensor], image_sizes: Sequence[Sequence[int]],
                         num_anchors_per_level: Sequence[int] | None = None, *, pre_nms_top_n: int,
                         post_nms_top_n: int, nms_thresh: float, score_thresh: float = 0.0, min_size: float = 1e-3,
                         backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rpn_proposals` with fixed-shape outputs and no host sync (static shapes for
    ``torch.compile``, ``torch.export`` and CUDA graphs).

    Args:
        objectness: logits, Tensor[B, A] or torchvision's flat Tensor[B * A, 1]; anchors
            ordered as the anchor generator lists them (level, location, cell anchor).
        pred_bbox_deltas: Tensor[B, A, 4] or flat Tensor[B * A, 4].
        anchors: the batch's :class:`AnchorGeometry` (``AnchorGenerator.geometry``; the
            Triton kernel then computes each anchor instead of reading it), or the list of B
            per-image Tensor[A, 4] that ``AnchorGenerator`` returns.
        image_sizes: each image's ``(h, w)`` before padding, to clip to.
        num_anchors_per_level: anchors per level (sum A); may be None with a geometry.
        pre_nms_top_n: candidates kept per level and image before NMS (torchvision: 2000
            in training, 1000 in eval).
        post_nms_top_n: proposals kept per image after NMS.
        nms_thresh: IoU threshold of the per-level NMS (0.7).
        score_thresh: minimum objectness probability (``>=``).
        min_size: minimum box width and height after clipping (``>=``).
        backend: None, "auto", "triton" or "torch" (see ``fastmask.ops``); also used for NMS.

    Returns fixed-shape (boxes Tensor[B, M, 4] ``(x1, y1, x2, y2)`` in the deltas' dtype,
    scores Tensor[B, M] probabilities, counts int64 Tensor[B]), M = min(post_nms_top_n, N):
    image i's proposals are its first ``counts[i]`` rows, by decreasing score. No host sync;
    nothing is differentiable (torchvision detaches the proposals too).
    """
    if not isinstance(image_sizes, (list, tuple)):
        raise ValueError("image_sizes must be a list of (h, w), one per image")
    b = len(image_sizes)
    for i, s in enumerate(image_sizes):
        _image_size(f"image_sizes[{i}]", s)
    check_tensor("objectness", objectness)
    check_tensor("pred_bbox_deltas", pred_bbox_deltas, last_dim=4)
    check_same_device(objectness=objectness, pred_bbox_deltas=pred_bbox_deltas)
    geometry = anchors if isinstance(anchors, AnchorGeometry) else None
    if geometry is not None:
        if num_anchors_per_level is None:
            num_anchors_per_level = geometry.num_anchors_per_level
        elif list(num_anchors_per_level) != geometry.num_anchors_per_level:
            raise ValueError(f"num_anchors_per_level {list(num_anchors_per_level)} does not match the anchor "
                             f"geometry's {geometry.num_anchors_per_level}")
        if geometry.num_images != b:
            raise ValueError(f"anchors describe {geometry.num_images} images but image_sizes has {b}")
        if geometry.device != objectness.device:
            raise ValueError(f"anchors are on {geometry.device} but objectness is on {objectness.device}")
    if num_anchors_per_level is None or not isinstance(num_anchors_per_level, (list, tuple)) or \
            len(num_anchors_per_level) == 0:
        raise ValueError("num_anchors_per_level must be a non-empty list of ints (anchors per level)")
    num_anchors_per_level = [_check_count(f"num_anchors_per_level[{i}]", c)
                             for i, c in enumerate(num_anchors_per_level)]
    a_total = sum(num_anchors_per_level)
    if objectness.numel() != b * a_total:
        raise ValueError(f"objectness must hold B * A = {b} * {a_total} logits (Tensor[B, A] or [B * A, 1]), "
                         f"got shape {tuple(objectness.shape)}")
    if pred_bbox_deltas.numel() != b * a_total * 4:
        raise ValueError(f"pred_bbox_deltas must be Tensor[B, A, 4] or [B * A, 4] with B * A = {b} * {a_total}, "
                         f"got shape {tuple(pred_bbox_deltas.shape)}")
    if geometry is None:
        if not isinstance(anchors, (list, tuple)) or len(anchors) != b:
            raise ValueError(f"anchors must be an AnchorGeometry or a list of {b} Tensor[A, 4] (one per image)")
        for i, a in enumerate(anchors):
            check_tensor(f"anchors[{i}]", a, ndim=2, last_dim=4)
            if a.shape[0] != a_total:
                raise ValueError(f"anchors[{i}] has {a.shape[0]} anchors but num_anchors_per_level sums to {a_total}")
            check_same_device(objectness=objectness, **{f"anchors[{i}]": a})
            check_finite(f"anchors[{i}]", a)
    pre_nms_top_n = _check_count("pre_nms_top_n", pre_nms_top_n, 1)
    post_nms_top_n = _check_count("post_nms_top_n", post_nms_top_n, 0)
    nms_thresh = _check_float("nms_thresh", nms_thresh, 0.0, 1.0)
    score_thresh = _check_float("score_thresh", score_thresh, 0.0, 1.0)
    min_size = _check_float("min_size", min_size, 0.0, float("inf"))
    if b == 0:
        return (pred_bbox_deltas.new_empty((0, 0, 4)), objectness.new_empty((0, 0)),
                torch.zeros(0, dtype=torch.int64, device=objectness.device))

    objectness = objectness.detach().reshape(b, a_total)
    deltas = pred_bbox_deltas.detach().reshape(b, a_total, 4)
    name = resolve_backend(backend, deltas, "rpn_proposals")
    if geometry is not None:
        geo_args, anchor_table = geometry.flat(), None
    else:
        geo_args, anchor_table = ([], [], [], []), torch.stack([a.detach() for a in anchors])
    return torch.ops.fastmask.rpn_proposals(
        objectness, deltas, anchor_table, *geo_args, [int(v) for hw in image_sizes for v in hw],
        num_anchors_per_level, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size, name)


def _rpn_proposals_fake(objectness, deltas, anchors, cell_anchors, cell_values, grid_sizes, strides, image_sizes,
                        num_anchors_per_level, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size,
                        backend):
    b = objectness.shape[0]
    m = min(post_nms_top_n, sum(min(pre_nms_top_n, a) for a in num_anchors_per_level))
    return (deltas.new_empty((b, m, 4)), objectness.new_empty((b, m)),
            objectness.new_empty((b,), dtype=torch.int64))


@register("rpn_proposals(Tensor objectness, Tensor deltas, Tensor? anchors, Tensor[] cell_anchors, "
          "float[] cell_values, int[] grid_sizes, int[] strides, int[] image_sizes, int[] num_anchors_per_level, "
          "int pre_nms_top_n, int post_nms_top_n, float nms_thresh, float score_thresh, float min_size, str backend) "
          "-> (Tensor, Tensor, Tensor)", _rpn_proposals_fake)
def _rpn_proposals_op(objectness: Tensor, deltas: Tensor, anchors: Tensor | None, cell_anchors: Sequence[Tensor],
                      cell_values: Sequence[float], grid_sizes: Sequence[int], strides: Sequence[int],
                      image_sizes: Sequence[int], num_anchors_per_level: Sequence[int], pre_nms_top_n: int,
                      post_nms_top_n: int, nms_thresh: float, score_thresh: float, min_size: float,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Registered op behind :func:`rpn_proposals`, with fixed-shape outputs (see
    :func:`select_proposals`): ``objectness`` Tensor[B, A], ``deltas`` Tensor[B, A, 4], and either
    ``anchors`` Tensor[B, A, 4] or the anchor geometry flattened (per level: the cell anchors,
    their values ``(x1, y1, x2, y2)`` row by row, ``(H, W)`` and ``(stride_y, stride_x)``).
    ``image_sizes``: ``(h, w)`` per image, flattened. The backend already resolved."""
    b = objectness.shape[0]
    sizes = [(image_sizes[i], image_sizes[i + 1]) for i in range(0, len(image_sizes), 2)]
    levels = list(num_anchors_per_level)
    if anchors is None:
        anchors = AnchorGeometry.from_flat(cell_anchors, cell_values, grid_sizes, strides, b)
    if backend == "triton":
        cand = rpn_candidates_triton(objectness, deltas, anchors, sizes, levels, pre_nms_top_n, score_thresh, min_size)
    else:
        table = anchors.anchors() if isinstance(anchors, AnchorGeometry) else anchors
        cand = rpn_candidates_ref(objectness, deltas, table, sizes, levels, pre_nms_top_n, score_thresh, min_size)
    return select_proposals(*cand, nms_thresh, post_nms_top_n, backend)
