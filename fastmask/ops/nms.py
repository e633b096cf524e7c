"""Non-maximum suppression (NMS), plain and batched, with torchvision's semantics.

Greedy NMS visits the boxes by decreasing score (a stable sort: equal scores keep their
input order) and keeps a box unless an already kept box of the same group has
``IoU > iou_threshold`` with it (an IoU exactly equal to the threshold keeps the box).
Groups are the class ``idxs`` of ``batched_nms`` (and the image of ``nms_keep_mask``'s
batched form): a box only suppresses boxes of its own group, tested by equality of the
indices, never by offsetting coordinates.

IoU is computed operation by operation as torchvision's CPU kernel does, in the box dtype
(fp16/bf16 boxes in fp32): ``area = (x2 - x1) * (y2 - y1)``,
``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))``,
``iou = inter / (area_i + area_j - inter)``, and ``iou > iou_threshold`` is decided in
float64. The reference and the Triton kernels round the same way, on every device, so:

- ``nms`` keeps exactly the indices of ``torchvision.ops.nms`` on the CPU. (torchvision's
  CUDA kernel sorts unstably, so where scores are equal it may keep another box than its
  CPU kernel; fastmask keeps the CPU's choice.)
- ``batched_nms`` (and ``nms_keep_mask`` with ``idxs``) keeps exactly the boxes of
  torchvision's per-class NMS, ``torchvision.ops.nms`` run on each class's boxes: what
  ``torchvision.ops.batched_nms`` itself computes above 1000 boxes on the CPU and above
  25,000 on CUDA (``boxes.numel() > 4000`` / ``> 100_000``; 5,000 on CUDA before
  torchvision 0.22). Below those sizes torchvision instead shifts each box by its class
  times (max coordinate + 1) and runs one NMS; the shifted fp32 coordinates are rounded,
  which moves IoUs by up to about 1e-3 for small boxes at box-head coordinates, so there
  torchvision's own ``batched_nms`` can keep or drop a box whose IoU is that close to the
  threshold where the per-class result does not.

The reference (``nms_ref``, ``nms_keep_mask_ref``) sorts the boxes once and resolves them in
tiles of ``REF_TILE`` sorted boxes: a tile is first suppressed by the boxes already kept in
earlier tiles (one [kept, tile] IoU matrix), then resolved internally by the fixed-point
iteration ``keep[i] = not suppressed[i] and not any(keep[j] and iou[j, i] > thr, j < i)``,
which agrees with greedy NMS on its first k boxes after k rounds and so reaches it in at
most ``REF_TILE`` rounds (a few in practice). It holds a [kept, tile] matrix at a time;
its work grows as N * kept. The kernels instead write the IoU test of every upper-triangle
pair once as bits (N^2 / 8 bytes, in bounded chunks) and walk the bits on the GPU.

``backend="torch"`` runs the CPU path (``greedy_sorted_cpu``): the same tiles and iteration,
with the groups padded into rows and every group's s-th tile resolved in one step (section
"the CPU path" below); it keeps exactly the reference's boxes (tested).

Limits: the kernels take up to 2**31 - 1 boxes per call (all images of ``nms_keep_mask``
together; positions are int32; ValueError beyond) and allocate at most
``fastmask.kernels.nms.scratch_bytes(N)``: one chunk of suppression bits (at most 128 MiB,
up to 32,768 boxes in one chunk; 8 MiB per chunk of 8192 beyond, so 8 MiB at 100k boxes)
plus 64 bytes per box. The reference takes any N in memory linear in N, but its work
grows as N * kept (77 s for 100k boxes in 80 classes on a 2-core CPU). The CPU path's padded
rows hold at most ``PADDED_ROOM`` times the boxes (plus ``PADDED_SLACK``); a call past that
(one long group among very many short ones) runs the reference.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._backend import resolve_backend
from ._checks import check_finite, check_same_device, check_tensor, compute_dtype, data_checks_enabled
from ._library import register

# Sorted boxes the reference resolves together. Larger tiles mean fewer Python steps but
# a longer fixed-point iteration and a bigger [kept, tile] matrix; of 64-512, 128 was the
# fastest on the CPU at 1k-5k boxes (one thread).
REF_TILE = 128

INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# --------------------------------------------------------------------------- checks


def _check_threshold(iou_threshold) -> float:
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise TypeError(f"iou_threshold must be a float, got {type(iou_threshold).__name__}")
    thr = float(iou_threshold)
    if not math.isfinite(thr):
        raise ValueError(f"iou_threshold must be a finite number, got {thr}")
    return thr


def _check_inputs(boxes, scores, iou_threshold, idxs=None, valid=None, *, batched_ok=False,
                  idxs_required=False) -> float:
    """Validate NMS inputs; returns the threshold as a float.

    ``boxes``: Tensor[N, 4] (or Tensor[B, N, 4] when ``batched_ok``); ``scores``, ``idxs`` and
    ``valid`` have the boxes' leading shape. ``idxs`` may be None unless ``idxs_required``.
    """
    check_tensor("boxes", boxes, last_dim=4)
    if boxes.dim() != 2 and not (batched_ok and boxes.dim() == 3):
        shapes = "[N, 4] or [B, N, 4]" if batched_ok else "[N, 4]"
        raise ValueError(f"boxes must have shape {shapes}, got {tuple(boxes.shape)}")
    lead = tuple(boxes.shape[:-1])
    check_tensor("scores", scores)
    if tuple(scores.shape) != lead:
        raise ValueError(f"scores must have shape {list(lead)} to match boxes {tuple(boxes.shape)}, "
                         f"got {tuple(scores.shape)}")
    if idxs is not None or idxs_required:
        check_tensor("idxs", idxs, dtypes=INDEX_DTYPES)
        if tuple(idxs.shape) != lead:
            raise ValueError(f"idxs must have shape {list(lead)} to match boxes {tuple(boxes.shape)}, "
                             f"got {tuple(idxs.shape)}")
    if valid is not None:
        check_tensor("valid", valid, dtypes=(torch.bool,))
        if tuple(valid.shape) != lead:
            raise ValueError(f"valid must have shape {list(lead)} to match boxes {tuple(boxes.shape)}, "
                             f"got {tuple(valid.shape)}")
    check_same_device(boxes=boxes, scores=scores, idxs=idxs, valid=valid)
    if data_checks_enabled(boxes):
        check_finite("boxes", boxes if valid is None else boxes[valid])
    return _check_threshold(iou_threshold)


# --------------------------------------------------------------------------- reference


def iou_exceeds_ref(a: Tensor, b: Tensor, iou_threshold: float) -> Tensor:
    """Bool Tensor[A, B]: ``IoU(a[i], b[j]) > iou_threshold``, rounded as torchvision's CPU kernel.

    ``a``: Tensor[A, 4], ``b``: Tensor[B, 4], both in the compute dtype.
    """
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h
    iou = inter / (area_a[:, None] + area_b[None, :] - inter)
    # torchvision compares the IoU (in the box dtype) with the threshold as a double.
    return iou.to(torch.float64) > iou_threshold


def _greedy_sorted_ref(boxes: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS over boxes sorted by group, then by decreasing score within each group.

    ``boxes``: Tensor[T, 4] in the compute dtype; ``groups``: int64 Tensor[T], non-decreasing
    (a box only suppresses boxes of its own group, so each tile is compared only with the
    kept boxes of the groups it holds, which start at its first box's group). Returns bool
    Tensor[T], True = kept.
    """
    t = boxes.shape[0]
    keep = torch.zeros(t, dtype=torch.bool, device=boxes.device)
    # First sorted position of each box's group (groups are contiguous runs).
    group_start = torch.searchsorted(groups, groups, right=False)
    for start in range(0, t, REF_TILE):
        tile, tile_groups = boxes[start:start + REF_TILE], groups[start:start + REF_TILE]
        n = tile.shape[0]
        # Suppression by the boxes kept in earlier tiles of the same groups: their decisions
        # are final. Host sync: the reference sizes this comparison by the kept count.
        lo = int(group_start[start])
        kept = keep[lo:start].nonzero().squeeze(1) + lo
        by_earlier = (iou_exceeds_ref(boxes[kept], tile, iou_threshold)
                      & (groups[kept][:, None] == tile_groups[None, :])).any(dim=0)
        # Within the tile: sup[j, i] = box j (earlier in the order) would suppress box i.
        sup = (iou_exceeds_ref(tile, tile, iou_threshold)
               & (tile_groups[:, None] == tile_groups[None, :])
               & torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu(diagonal=1))
        tile_keep = ~by_earlier
        while True:  # at most n rounds: round k fixes box k for good
            new = ~by_earlier & ~(tile_keep[:, None] & sup).any(dim=0)
            if torch.equal(new, tile_keep):
                break
            tile_keep = new
        keep[start:start + n] = tile_keep
    return keep


# --------------------------------------------------------------------------- the CPU path
#
# ``backend="torch"`` resolves the sorted boxes with ``greedy_sorted_cpu``: the reference's greedy
# NMS in tiles of sorted boxes (the reference is the readable spec; tests/test_nms.py compares
# the two), with every group's s-th tile resolved in the same step. The groups (classes, or
# (image, level) pairs in the RPN) are padded into [G, L] rows, longest first; step s resolves
# the s-th tile of every group still that long against the boxes each group kept in earlier
# steps (a running [G, kept] buffer), so a call takes ceil(L / CPU_TILE) steps where the
# reference takes one per tile of the whole sorted list (3 against 156 at 20k boxes in 80
# classes), with fewer operations per step.

# Sorted boxes per group and step.
CPU_TILE = REF_TILE
# The padded rows may hold this many times the boxes (plus PADDED_SLACK); past that (one long
# group among very many short ones) the CPU path runs the reference.
PADDED_ROOM = 8
PADDED_SLACK = 1 << 16


def _threshold_for(dtype: torch.dtype, iou_threshold: float) -> float:
    """A threshold ``t`` in ``dtype`` with ``iou > t`` (compared in ``dtype``) exactly when
    ``float64(iou) > iou_threshold``: the largest value of ``dtype`` at most the threshold."""
    t = torch.tensor(iou_threshold, dtype=dtype)
    if t.item() > iou_threshold:
        t = torch.nextafter(t, t.new_tensor(-math.inf))
    return t.item()


def _exceeds(a: Tensor, area_a: Tensor, b: Tensor, area_b: Tensor, threshold: float) -> Tensor:
    """:func:`iou_exceeds_ref` over leading batch dims, boxes coordinate-major (``a``: [4, ..., A],
    ``b``: [4, ..., B]; each coordinate contiguous, so every step is a vectorised [..., A, B] pass),
    with the areas given and ``threshold`` from :func:`_threshold_for`: the same operations in
    the same order as the reference, so the same rounding."""
    w = (torch.minimum(a[2, ..., :, None], b[2, ..., None, :]) - torch.maximum(a[0, ..., :, None], b[0, ..., None, :]))
    h = (torch.minimum(a[3, ..., :, None], b[3, ..., None, :]) - torch.maximum(a[1, ..., :, None], b[1, ..., None, :]))
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter) > threshold


def _area(b: Tensor) -> Tensor:
    """Areas of coordinate-major boxes [4, ...]."""
    return (b[2] - b[0]) * (b[3] - b[1])


def _resolve(sup: Tensor, alive: Tensor) -> Tensor:
    """Greedy NMS of sorted boxes given ``sup[..., j, i]`` (earlier box j would suppress box i;
    strictly upper triangular) and ``alive`` (boxes not already suppressed): the fixed point of
    ``keep = alive & ~any_j(keep[j] & sup[j, i])``, reached from ``alive``. After round r the first
    r boxes are final, so it ends within T rounds (a few in practice). Bool Tensor[..., T]."""
    keep = alive
    while True:  # rounds of the iteration, each over every box at once
        new = alive & ~(keep[..., :, None] & sup).any(dim=-2)
        if torch.equal(new, keep):
            return new
        keep = new


def greedy_sorted_cpu(boxes: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """:func:`_greedy_sorted_ref`, the CPU path's way (same arguments and result)."""
    t = boxes.shape[0]
    dev = boxes.device
    if t == 0:
        return torch.zeros(0, dtype=torch.bool, device=dev)
    threshold = _threshold_for(boxes.dtype, iou_threshold)
    _, dense, counts = torch.unique_consecutive(groups, return_inverse=True, return_counts=True)
    # Rows of the padded layout: the longest group first, so that the groups still holding
    # boxes at step s are the first rows.
    by_length = torch.sort(counts, descending=True, stable=True)
    lengths = by_length.values.tolist()  # host list (the CPU path has no device to wait for)
    g, longest = len(lengths), lengths[0]
    if g * longest > PADDED_ROOM * t + PADDED_SLACK:  # one long group among very many short ones
        return _greedy_sorted_ref(boxes, groups, iou_threshold)
    rank = torch.empty_like(by_length.indices)
    rank[by_length.indices] = torch.arange(g, device=dev)
    row = rank[dense]
    col = torch.arange(t, device=dev) - (torch.cumsum(counts, 0) - counts)[dense]
    padded = boxes.new_zeros((4, g, longest))  # coordinate-major: each coordinate a contiguous [G, L]
    padded[:, row, col] = boxes.t()
    alive = torch.zeros((g, longest), dtype=torch.bool, device=dev)
    alive[row, col] = True
    area = _area(padded)
    keep = torch.zeros_like(alive)
    kept, kept_area = torch.zeros_like(padded), torch.zeros_like(area)  # each group's kept boxes, in order
    n_kept = torch.zeros(g, dtype=torch.int64, device=dev)
    mask = torch.ones(CPU_TILE, CPU_TILE, dtype=torch.bool, device=dev).triu_(diagonal=1)
    for s in range(0, longest, CPU_TILE):  # steps over tiles (each depends on the earlier ones)
        e = min(longest, s + CPU_TILE)
        active = sum(1 for n in lengths if n > s)  # groups with boxes in this tile
        tile, tile_area, tile_alive = padded[:, :active, s:e], area[:active, s:e], alive[:active, s:e]
        most = int(n_kept[:active].max()) if s else 0
        if most:  # suppression by each group's boxes kept in earlier steps
            hit = _exceeds(kept[:, :active, :most], kept_area[:active, :most], tile, tile_area, threshold)
            hit &= (torch.arange(most, device=dev) < n_kept[:active, None])[:, :, None]
            tile_alive = tile_alive & ~hit.any(dim=1)
        sup = _exceeds(tile, tile_area, tile, tile_area, threshold) & mask[:e - s, :e - s]
        tile_keep = _resolve(sup, tile_alive)
        keep[:active, s:e] = tile_keep
        gi, ci = tile_keep.nonzero(as_tuple=True)
        slot = (n_kept[:active, None] + tile_keep.cumsum(dim=1) - 1)[gi, ci]
        kept[:, gi, slot], kept_area[gi, slot] = tile[:, gi, ci], tile_area[gi, ci]
        n_kept[:active] += tile_keep.sum(dim=1)
    return keep[row, col]


def _group_order(scores: Tensor, groups: Tensor) -> Tensor:
    """Indices sorted by group, then by decreasing score (equal scores: input order)."""
    by_score = _sorted_order(scores)
    return by_score[torch.sort(groups[by_score], stable=True).indices]


def _sorted_order(scores: Tensor) -> Tensor:
    """Indices by decreasing score; equal scores keep their input order (torchvision's CPU sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def nms_keep_mask_ref(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None,
                      valid: Tensor | None = None) -> Tensor:
    """Reference of ``nms_keep_mask``: bool Tensor[N] or Tensor[B, N], True = kept, in input order.

    The images of a batch and the classes in ``idxs`` are groups: boxes suppress only boxes
    of their own image and class. ``valid=False`` boxes are neither kept nor suppress others.
    """
    return _keep_mask(boxes, scores, iou_threshold, idxs, valid, _greedy_sorted_ref)


def nms_ref(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None) -> Tensor:
    """Reference NMS: int64 indices of the kept boxes by decreasing score (equal scores: input order).

    ``boxes``: Tensor[N, 4] ``(x1, y1, x2, y2)``; ``scores``: Tensor[N]; ``idxs``: optional
    integer Tensor[N] of classes (then it is ``batched_nms``).
    """
    return _kept(boxes, scores, iou_threshold, idxs, _greedy_sorted_ref)


def nms_keep_mask_cpu(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None,
                      valid: Tensor | None = None) -> Tensor:
    """``nms_keep_mask`` on the CPU path (``backend="torch"``): :func:`nms_keep_mask_ref`'s result."""
    return _keep_mask(boxes, scores, iou_threshold, idxs, valid, greedy_sorted_cpu)


def _keep_mask(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None, valid: Tensor | None,
               greedy) -> Tensor:
    """``nms_keep_mask`` with ``greedy`` (:func:`_greedy_sorted_ref` or the CPU path's) resolving the sorted boxes."""
    lead = boxes.shape[:-1]
    flat_boxes = boxes.reshape(-1, 4).to(compute_dtype(boxes.dtype))
    flat_scores = scores.reshape(-1)
    image = torch.arange(lead.numel(), device=boxes.device) // max(lead[-1], 1)
    cls = idxs.reshape(-1).to(torch.int64) if idxs is not None else torch.zeros_like(image)
    # One group id per (image, class) pair.
    groups = torch.unique(torch.stack([image, cls], dim=1), dim=0, return_inverse=True)[1]
    candidates = torch.arange(lead.numel(), device=boxes.device)
    if valid is not None:
        candidates = candidates[valid.reshape(-1)]
    order = candidates[_group_order(flat_scores[candidates], groups[candidates])]
    keep_sorted = greedy(flat_boxes[order], groups[order], iou_threshold)
    keep = torch.zeros(lead.numel(), dtype=torch.bool, device=boxes.device)
    keep[order] = keep_sorted
    return keep.reshape(lead)


def _kept(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None, greedy) -> Tensor:
    """``nms`` / ``batched_nms`` with ``greedy`` resolving the sorted boxes."""
    by_score = _sorted_order(scores)
    if idxs is None:
        groups = torch.zeros_like(by_score)
        return by_score[greedy(boxes.to(compute_dtype(boxes.dtype))[by_score], groups, iou_threshold)]
    groups = idxs.to(torch.int64)
    order = _group_order(scores, groups)
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    keep[order] = greedy(boxes.to(compute_dtype(boxes.dtype))[order], groups[order], iou_threshold)
    return by_score[keep[by_score]]


# --------------------------------------------------------------------------- registered ops
#
# ``fastmask::nms``, ``fastmask::batched_nms`` and ``fastmask::nms_keep_mask`` are registered ops
# (see ``_library``) taking the backend already resolved ("triton" or "torch"). The keep mask has a static
# shape; the kept indices have a data-dependent length (their fake declares an unbacked size).
# No gradients (NMS selects boxes); not autocast-aware (IoU is computed in fp32, fp64 for fp64).


def _kept_indices(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None, backend: str) -> Tensor:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if backend == "triton":
        return kept_indices_triton(boxes, scores, iou_threshold, idxs)  # one host sync, at the end
    return _kept(boxes, scores, iou_threshold, idxs, greedy_sorted_cpu)


def _kept_indices_fake(boxes: Tensor, *args) -> Tensor:
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@register("nms(Tensor boxes, Tensor scores, float iou_threshold, str backend) -> Tensor", _kept_indices_fake)
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float, backend: str) -> Tensor:
    return _kept_indices(boxes, scores, iou_threshold, None, backend)


@register("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, str backend) -> Tensor",
          _kept_indices_fake)
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, backend: str) -> Tensor:
    return _kept_indices(boxes, scores, iou_threshold, idxs, backend)


def _keep_mask_fake(boxes, scores, iou_threshold, idxs, valid, backend):
    return boxes.new_empty(boxes.shape[:-1], dtype=torch.bool)


@register("nms_keep_mask(Tensor boxes, Tensor scores, float iou_threshold, Tensor? idxs, Tensor? valid, str backend) "
          "-> Tensor", _keep_mask_fake)
def _nms_keep_mask_op(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None, valid: Tensor | None,
                      backend: str) -> Tensor:
    if boxes.shape[-2] == 0:
        return torch.zeros(boxes.shape[:-1], dtype=torch.bool, device=boxes.device)
    if backend == "triton":
        lead = boxes.shape[:-1]
        b3 = boxes.reshape(-1, lead[-1], 4)
        keep = keep_mask_triton(b3, scores.reshape(b3.shape[:2]), iou_threshold,
                                None if idxs is None else idxs.reshape(b3.shape[:2]),
                                None if valid is None else valid.reshape(b3.shape[:2]))
        return keep.reshape(lead)
    return nms_keep_mask_cpu(boxes, scores, iou_threshold, idxs, valid)


# --------------------------------------------------------------------------- public ops


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, backend: str | None = None) -> Tensor:
    """Non-maximum suppression, as ``torchvision.ops.nms``.

    ``boxes``: Tensor[N, 4] ``(x1, y1, x2, y2)`` (fp16, bf16, fp32 or fp64; fp16/bf16 are
    compared in fp32); ``scores``: Tensor[N] float. A box is removed when a kept box with a
    higher score has ``IoU > iou_threshold`` with it. Returns int64 Tensor[K], the kept
    indices by decreasing score. ``backend``: see ``fastmask.ops._backend``; the Triton path
    runs entirely on the GPU except for the final count of kept boxes.
    """
    thr = _check_inputs(boxes, scores, iou_threshold)
    return torch.ops.fastmask.nms(boxes, scores, thr, _backend(backend, boxes, "nms"))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *,
                backend: str | None = None) -> Tensor:
    """NMS within each class, as ``torchvision.ops.batched_nms``.

    ``boxes``: Tensor[N, 4]; ``scores``: Tensor[N]; ``idxs``: integer Tensor[N], the class of
    each box (boxes of different classes never suppress each other). Returns int64 Tensor[K],
    the kept indices by decreasing score. The kept set is exactly torchvision's per-class
    NMS; on small inputs ``torchvision.ops.batched_nms`` offsets coordinates by class instead,
    which can differ for IoUs within about 1e-3 of the threshold (see the module docstring).
    """
    thr = _check_inputs(boxes, scores, iou_threshold, idxs, idxs_required=True)
    return torch.ops.fastmask.batched_nms(boxes, scores, idxs, thr, _backend(backend, boxes, "batched_nms"))


def nms_keep_mask(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None,
                  valid: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """NMS as a fixed-shape keep mask, with no host synchronisation on the Triton path.

    ``boxes``: Tensor[N, 4] or a padded batch Tensor[B, N, 4]; ``scores``: Tensor[N] /
    Tensor[B, N]; ``idxs``: optional integer classes of the same shape (e.g. the FPN level
    for the RPN); ``valid``: optional bool Tensor of the same shape, False for padding.
    Boxes suppress only boxes of the same image and class. Returns bool Tensor[N] /
    Tensor[B, N] in input order, True = kept: ``nms_keep_mask(b, s, t, i)[k]`` is True
    exactly when ``k`` is in ``batched_nms(b, s, i, t)``. The caller sorts or takes top-k.
    """
    thr = _check_inputs(boxes, scores, iou_threshold, idxs, valid, batched_ok=True)
    return torch.ops.fastmask.nms_keep_mask(boxes, scores, thr, idxs, valid, _backend(backend, boxes, "nms_keep_mask"))


def _backend(backend: str | None, boxes: Tensor, op: str) -> str:
    return resolve_backend(backend, boxes, op)


# --------------------------------------------------------------------------- Triton path


def keep_mask_triton(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None,
                     valid: Tensor | None, *, max_chunk: int | None = None, max_window: int | None = None,
                     poison: bool = False, or_by_bits: bool | None = None, unroll: bool | None = None) -> Tensor:
    """Bool Tensor[B, N] keep mask in input order of a padded batch, with no host sync.

    ``boxes``: Tensor[B, N, 4]; ``scores``, ``idxs`` (optional classes), ``valid`` (optional,
    False = padding): Tensor[B, N], any strides. Boxes suppress only boxes of their own image
    and class. Device launches at up to 8192 boxes: the sort-key kernel, one ``torch.sort``,
    the mask and reduce kernels (4; 5 with fp64 scores, which are sorted once more); past
    8192, one zero fill and 2 more per further 8192 (see ``fastmask.kernels.nms``); no
    data-dependent shapes. ``max_chunk``, ``max_window``, ``poison``, ``or_by_bits``, ``unroll``: test hooks
    of ``fastmask.kernels.nms.keep_mask``.
    """
    from fastmask.kernels import nms as nms_kernels

    return nms_kernels.keep_mask(boxes, scores, iou_threshold, idxs, valid, max_chunk=max_chunk,
                                 max_window=max_window, poison=poison, or_by_bits=or_by_bits, unroll=unroll)


def kept_indices_triton(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None, *,
                        max_chunk: int | None = None, max_window: int | None = None, poison: bool = False) -> Tensor:
    """int64 Tensor[K]: the indices ``nms`` / ``batched_nms`` keep, by decreasing score (equal
    scores: input order).

    ``boxes``: Tensor[N, 4]; ``scores``: Tensor[N]; ``idxs``: optional classes Tensor[N]. The
    keep-mask launches, plus one stable ``torch.sort`` of the reduce kernel's per-box rank
    (kept boxes' score bits, the others last) and one read of the kept count, which the
    reduce kernel accumulates: the one host sync, at the very end.
    """
    from fastmask.kernels import nms as nms_kernels

    _, rank, count = nms_kernels.keep_mask(boxes[None], scores[None], iou_threshold,
                                           None if idxs is None else idxs[None], None, ranks=True,
                                           max_chunk=max_chunk, max_window=max_window, poison=poison)
    by_score = torch.sort(rank, stable=True).indices
    return by_score[:int(count.item())]  # host sync: the number of kept boxes


def keep_mask_presorted_triton(boxes: Tensor, groups: Tensor, valid: Tensor | None, iou_threshold: float, *,
                               max_chunk: int | None = None, max_window: int | None = None, poison: bool = False,
                               or_by_bits: bool | None = None, unroll: bool | None = None) -> Tensor:
    """``keep_mask_triton(boxes, scores, iou_threshold, groups, valid)`` for the RPN's candidates,
    with no sort: each image's row is already sorted by group (``groups``: int64 Tensor[B, N],
    non-decreasing along each row, e.g. the FPN level) and by non-increasing score inside each
    group (top-k per level, then a monotone sigmoid). Then the result is the same for any such
    scores, which are not needed. The precondition is not checked (that would cost launches).
    Launches: the mask and reduce kernels only, at up to 8192 boxes in all.
    """
    from fastmask.kernels import nms as nms_kernels

    return nms_kernels.keep_mask_presorted(boxes, groups, valid, iou_threshold, max_chunk=max_chunk,
                                           max_window=max_window, poison=poison, or_by_bits=or_by_bits,
                                           unroll=unroll)
