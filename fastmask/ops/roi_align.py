"""RoI Align, single-level and multi-level (FPN), with torchvision's semantics.

Pixel model (torchvision's): a box ``(x1, y1, x2, y2)`` in image coordinates is scaled by
``spatial_scale`` to feature coordinates. With ``aligned=False`` the box is used as given and
its size is clamped to at least one feature cell; with ``aligned=True`` half a cell is
subtracted so that the box edges fall on pixel edges, and no clamp is applied. Each output
bin averages ``grid_h * grid_w`` bilinear samples, where the grid is ``sampling_ratio`` per
axis or, when ``sampling_ratio <= 0``, ``ceil(roi_size / output_size)`` per axis (adaptive).
A sample further than one cell outside the feature map contributes zero; samples between -1
and 0 are clamped to the edge.

The reference below (``roi_align_ref``, ``multiscale_roi_align_ref``, ``roi_align_backward_ref``)
is the specification. It computes every level in one vectorised pass: the levels are flattened
into one [N, sum(H*W), C] table and each sample's four neighbours are gathered from it. It
materialises ``K * C * (2*PH*Gy) * (2*PW*Gx)`` values (G: samples per bin and axis) and writes
``K * C * PH * PW``; the kernel reads each needed feature value with no intermediate tables.

``backend="torch"`` runs the CPU path: the reference's taps and weights, summed per bin by
``embedding_bag`` (no tap table materialised; its backward adds each tap's weighted gradient
into its row). Same values as the reference up to the order of the sums (tested).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import check_backend_name, resolve_backend
from ._checks import (FLOAT_DTYPES, check_boxes, check_same_device, check_tensor, compute_dtype, data_checks_enabled,
                      pair)
from ._library import register

# Values the reference gathers at once (chunks of RoIs are processed in turn): 2**25 fp32
# values are 128 MiB, which keeps the reference within a few hundred MiB at any size. The CPU
# path's chunks hold an eighth as many taps (an int64 row and a weight each).
REF_GATHER_BUDGET = 1 << 25
# torchvision's LevelMapper: eps added before the floor so that a box of exactly the
# canonical size lands on the canonical level despite rounding in log2.
LEVEL_EPS = 1e-6


# --------------------------------------------------------------------------- helpers


def boxes_to_rois(boxes: Tensor | Sequence[Tensor], name: str = "boxes") -> Tensor:
    """Tensor[K, 5] ``(batch_index, x1, y1, x2, y2)`` from a list of per-image Tensor[Ki, 4]."""
    if isinstance(boxes, Tensor):
        check_boxes(name, boxes, allow_columns=(5,))
        return boxes
    if not isinstance(boxes, (list, tuple)) or len(boxes) == 0:
        raise ValueError(f"{name} must be a Tensor[K, 5] or a non-empty list of Tensor[Ki, 4]")
    for i, b in enumerate(boxes):
        check_boxes(f"{name}[{i}]", b)
    dtype, device = boxes[0].dtype, boxes[0].device
    for i, b in enumerate(boxes):
        if b.device != device:
            raise ValueError(f"{name}[{i}] is on {b.device} but {name}[0] is on {device}")
    idx = torch.cat([torch.full((len(b), 1), i, dtype=dtype, device=device) for i, b in enumerate(boxes)])
    return torch.cat([idx, torch.cat([b.to(dtype) for b in boxes])], dim=1)


def infer_scales(feature_sizes: Sequence[Sequence[int]], image_sizes: Sequence[Sequence[int]]) -> list[float]:
    """Each level's scale as torchvision infers it: 2**round(log2(feature_h / max_image_h))."""
    max_h = max(int(s[0]) for s in image_sizes)
    return [2.0 ** round(math.log2(float(h) / float(max_h))) for h, _ in feature_sizes]


def map_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224,
               canonical_level: int = 4, eps: float = LEVEL_EPS) -> Tensor:
    """FPN level index (0-based from ``k_min``) of each box, eq. (1) of the FPN paper.

    ``boxes``: Tensor[K, 4]. Returns int64 Tensor[K] in ``[0, k_max - k_min]``, or -1 for a
    box of negative area (one axis inverted: its size is NaN), which torchvision's level
    mapper sends to no level, so that it pools zeros.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    s = torch.sqrt(area)
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    lvl = torch.clamp(lvl, min=k_min, max=k_max) - k_min
    return torch.where(lvl.isnan(), -1, lvl.nan_to_num()).to(torch.int64)


def level_range(scales: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max): the pyramid levels of the finest and coarsest feature maps."""
    return int(-math.log2(scales[0])), int(-math.log2(scales[-1]))


def _axis_taps(coord: Tensor, size: Tensor):
    """torchvision's bilinear rule along one axis.

    ``coord``: sample positions; ``size``: the feature extent along the axis (broadcastable).
    Returns the two neighbour indices and their weights; a sample outside ``[-1, size]``
    gets zero weights.
    """
    outside = (coord < -1.0) | (coord > size)
    c = coord.clamp(min=0)
    lo = c.floor()
    at_edge = lo >= size - 1
    lo = torch.where(at_edge, size - 1, lo)
    hi = torch.where(at_edge, size - 1, lo + 1)
    c = torch.where(at_edge, lo, c)
    frac = c - lo
    w_lo = torch.where(outside, 0.0, 1.0 - frac)
    w_hi = torch.where(outside, 0.0, frac)
    return lo.long(), hi.long(), w_lo, w_hi


def _bin_samples(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, g_max: int, size: Tensor):
    """Sample taps along one axis for every RoI: indices and weights of shape [K, bins, 2*g_max]."""
    p = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(g_max, device=start.device, dtype=start.dtype)[None, None, :]
    b = bin_size[:, None, None]
    g = grid[:, None, None]
    coord = start[:, None, None] + p * b + (i + 0.5) * b / g.clamp(min=1)
    lo, hi, w_lo, w_hi = _axis_taps(coord, size[:, None, None])
    valid = i < g
    w_lo, w_hi = w_lo * valid, w_hi * valid
    k = start.shape[0]
    idx = torch.stack([lo, hi], dim=-1).reshape(k, bins, 2 * g_max)
    w = torch.stack([w_lo, w_hi], dim=-1).reshape(k, bins, 2 * g_max)
    return idx, w


def _axis_samples(heights: Tensor, widths: Tensor, scales: Tensor, rois: Tensor, levels: Tensor,
                  output_size: tuple[int, int], sampling_ratio: int, aligned: bool, cdt: torch.dtype):
    """Every RoI's bilinear taps along each axis (the bilinear weight is the product of both axes').

    ``heights``, ``widths``, ``scales``: per-level Tensor[L]; ``rois``: Tensor[K, 5]; ``levels``:
    int64 Tensor[K]. Returns ``(batch, iy, wy, ix, wx)``: each RoI's image (int64 Tensor[K]), the
    feature rows and weights of its taps per output row (int64 and ``cdt`` Tensor[K, PH, 2Gy], the
    weights divided by the bin's sample count) and the columns and weights per output column
    (Tensor[K, PW, 2Gx]). Bin (p, q) of RoI k is
    ``sum_ab wy[k, p, a] * wx[k, q, b] * feature[batch[k], :, iy[k, p, a], ix[k, q, b]]``.
    """
    ph, pw = output_size
    rois = rois.to(cdt)
    h, w = heights[levels].to(cdt), widths[levels].to(cdt)
    scale = scales[levels].to(cdt)
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - x1
    roi_h = rois[:, 4] * scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_h, float(sampling_ratio))
        gy = gx = sampling_ratio
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph).clamp(min=0), torch.ceil(roi_w / pw).clamp(min=0)
        # Host sync: the reference sizes its sample grid by the largest RoI (kernels do not).
        gy, gx = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    count = (grid_h * grid_w).clamp(min=1)
    iy, wy = _bin_samples(y1, bin_h, grid_h, ph, gy, h)
    ix, wx = _bin_samples(x1, bin_w, grid_w, pw, gx, w)
    return rois[:, 0].long(), iy, wy / count[:, None, None], ix, wx


def _sample_taps(heights: Tensor, widths: Tensor, offsets: Tensor, scales: Tensor, rois: Tensor, levels: Tensor,
                 output_size: tuple[int, int], sampling_ratio: int, aligned: bool, cdt: torch.dtype):
    """Every bilinear tap of every RoI, over levels flattened into one [N, S, C] table.

    Arguments as :func:`_axis_samples`, plus ``offsets``: each level's first table row. Returns
    ``(batch, flat, wy, wx)``: the image and table row (int64 Tensor[K, PH, 2Gy, PW, 2Gx]) of each
    tap and the per-axis weights. Bin (p, q) of RoI k is
    ``sum_ab wy[k, p, a] * wx[k, q, b] * table[batch[k], flat[k, p, a, q, b]]``.
    """
    batch, iy, wy, ix, wx = _axis_samples(heights, widths, scales, rois, levels, output_size, sampling_ratio,
                                          aligned, cdt)
    flat = (offsets[levels][:, None, None, None, None]
            + iy[:, :, :, None, None] * widths[levels][:, None, None, None, None]
            + ix[:, None, None, :, :])  # [K, PH, 2Gy, PW, 2Gx]
    return batch, flat, wy, wx


def _roi_chunks(k: int, flat: Tensor, c: int):
    """Memory-bounded ranges of RoIs (``REF_GATHER_BUDGET`` tap values each)."""
    chunk = max(1, REF_GATHER_BUDGET // max(1, flat[0].numel() * c))
    return [(s, min(k, s + chunk)) for s in range(0, k, chunk)]


def _roi_align_flat(table: Tensor, heights: Tensor, widths: Tensor, offsets: Tensor, scales: Tensor,
                    rois: Tensor, levels: Tensor, output_size: tuple[int, int], sampling_ratio: int,
                    aligned: bool) -> Tensor:
    """RoI Align over levels flattened into ``table``: Tensor[N, S, C] (S = sum of H*W).

    Arguments as :func:`_sample_taps`. Returns Tensor[K, C, PH, PW] in table's dtype.
    """
    k, c = rois.shape[0], table.shape[2]
    if k == 0:
        return table.new_empty((k, c, *output_size))
    batch, flat, wy, wx = _sample_taps(heights, widths, offsets, scales, rois, levels, output_size, sampling_ratio,
                                       aligned, table.dtype)
    parts = []
    for s, e in _roi_chunks(k, flat, c):  # loop over memory-bounded chunks of RoIs, not over RoIs
        vals = table[batch[s:e, None, None, None, None], flat[s:e]]  # [k, PH, 2Gy, PW, 2Gx, C]
        parts.append(torch.einsum("kpa,kpaqbc,kqb->kcpq", wy[s:e], vals, wx[s:e]))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _roi_align_flat_backward(grad: Tensor, table_shape: tuple[int, int, int], heights: Tensor, widths: Tensor,
                             offsets: Tensor, scales: Tensor, rois: Tensor, levels: Tensor,
                             output_size: tuple[int, int], sampling_ratio: int, aligned: bool) -> Tensor:
    """Gradient of :func:`_roi_align_flat` w.r.t. its table: each tap's weight times its bin's
    gradient, summed into the tap's row. ``grad``: Tensor[K, C, PH, PW]. Returns Tensor[N, S, C]."""
    out = grad.new_zeros(table_shape)
    k, c = rois.shape[0], table_shape[2]
    if k == 0:
        return out
    batch, flat, wy, wx = _sample_taps(heights, widths, offsets, scales, rois, levels, output_size, sampling_ratio,
                                       aligned, grad.dtype)
    for s, e in _roi_chunks(k, flat, c):
        vals = torch.einsum("kpa,kcpq,kqb->kpaqbc", wy[s:e], grad[s:e], wx[s:e])
        out.index_put_((batch[s:e, None, None, None, None].expand_as(flat[s:e]), flat[s:e]), vals, accumulate=True)
    return out


# The CPU path (backend "torch"): the reference's taps summed by ``embedding_bag``, whose CPU
# kernel adds each bin's weighted taps (rows of C channels of the flattened table) straight into
# the bin's output row, multi-threaded. The reference materialises every tap's C values first
# (K * PH * PW * 4G^2 * C: 200M values for 1000 RoIs at 7x7 bins, 2 samples, 256 channels); the
# bags read the same rows from cache and write only the K * PH * PW * C outputs. Its backward
# is ``embedding_bag``'s, which adds each tap's weighted bin gradient into its row.


def _bag_taps(heights: Tensor, widths: Tensor, offsets: Tensor, scales: Tensor, rois: Tensor, levels: Tensor,
              output_size: tuple[int, int], sampling_ratio: int, aligned: bool, rows_per_image: int,
              cdt: torch.dtype):
    """Per-axis taps (:func:`_axis_samples`) and each RoI's first row in the [N * S, C] table."""
    batch, iy, wy, ix, wx = _axis_samples(heights, widths, scales, rois, levels, output_size, sampling_ratio,
                                          aligned, cdt)
    return batch * rows_per_image + offsets[levels], widths[levels], iy, wy, ix, wx


def _bags(first: Tensor, width: Tensor, iy: Tensor, wy: Tensor, ix: Tensor, wx: Tensor) -> tuple[Tensor, Tensor]:
    """Each bin's taps as a bag, bin-major (k, p, q): their table rows (int64) and weights,
    Tensor[K * PH * PW * T] each (T = 2Gy * 2Gx taps per bin)."""
    rows = (first[:, None, None, None, None] + iy[:, :, None, :, None] * width[:, None, None, None, None]
            + ix[:, None, :, None, :])  # [K, PH, PW, 2Gy, 2Gx]
    weights = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    return rows.reshape(-1), weights.reshape(-1)


def _bag_chunks(k: int, output_size: tuple[int, int], taps: int):
    """RoI ranges of at most ``REF_GATHER_BUDGET // 8`` taps (an int64 row and a weight each)."""
    chunk = max(1, (REF_GATHER_BUDGET // 8) // max(1, output_size[0] * output_size[1] * taps))
    return [(s, min(k, s + chunk)) for s in range(0, k, chunk)]


def _roi_align_bags(table: Tensor, heights: Tensor, widths: Tensor, offsets: Tensor, scales: Tensor,
                    rois: Tensor, levels: Tensor, output_size: tuple[int, int], sampling_ratio: int,
                    aligned: bool) -> Tensor:
    """:func:`_roi_align_flat` with each bin's taps summed by ``embedding_bag`` (the CPU path)."""
    n, s, c = table.shape
    ph, pw = output_size
    k = rois.shape[0]
    out = table.new_empty((k, ph, pw, c))
    if k == 0:
        return out.permute(0, 3, 1, 2)
    first, width, iy, wy, ix, wx = _bag_taps(heights, widths, offsets, scales, rois, levels, output_size,
                                             sampling_ratio, aligned, s, table.dtype)
    taps = iy.shape[2] * ix.shape[2]
    weight = table.view(n * s, c)
    for a, b in _bag_chunks(k, output_size, taps):  # memory-bounded chunks of RoIs, not single RoIs
        rows, w = _bags(first[a:b], width[a:b], iy[a:b], wy[a:b], ix[a:b], wx[a:b])
        out[a:b] = F.embedding_bag(rows.view(-1, taps), weight, per_sample_weights=w.view(-1, taps),
                                   mode="sum").view(b - a, ph, pw, c)
    return out.permute(0, 3, 1, 2)


def _roi_align_bags_backward(grad: Tensor, table_shape: tuple[int, int, int], heights: Tensor, widths: Tensor,
                             offsets: Tensor, scales: Tensor, rois: Tensor, levels: Tensor,
                             output_size: tuple[int, int], sampling_ratio: int, aligned: bool) -> Tensor:
    """Gradient of :func:`_roi_align_bags` w.r.t. its table (``grad``: Tensor[K, C, PH, PW])."""
    n, s, c = table_shape
    ph, pw = output_size
    out = grad.new_zeros((n * s, c))
    if rois.shape[0] == 0:
        return out.view(table_shape)
    first, width, iy, wy, ix, wx = _bag_taps(heights, widths, offsets, scales, rois, levels, output_size,
                                             sampling_ratio, aligned, s, grad.dtype)
    taps = iy.shape[2] * ix.shape[2]
    g = grad.permute(0, 2, 3, 1)  # [K, PH, PW, C]: one row per bag
    for a, b in _bag_chunks(rois.shape[0], output_size, taps):
        rows, w = _bags(first[a:b], width[a:b], iy[a:b], wy[a:b], ix[a:b], wx[a:b])
        bags = (b - a) * ph * pw
        # embedding_bag's own backward over bags of ``taps`` taps: each tap's row gets its
        # weight times its bag's gradient (arguments: bag offsets, the bag of each tap, bag sizes).
        out += torch.ops.aten._embedding_bag_backward(
            g[a:b].reshape(bags, c), rows, torch.arange(0, bags * taps, taps, device=grad.device),
            torch.arange(bags, device=grad.device).repeat_interleave(taps),
            torch.full((bags,), taps, dtype=torch.int64, device=grad.device), rows.new_zeros(bags), n * s, False, 0,
            False, w, -1)
    return out.view(table_shape)


def _level_table(features: Sequence[Tensor], cdt: torch.dtype):
    """Flatten feature maps [N, C, H, W] into one [N, sum(H*W), C] table and its level tables."""
    n, c = features[0].shape[:2]
    table = features[0].new_empty((n, sum(f.shape[2] * f.shape[3] for f in features), c), dtype=cdt)
    start = 0
    for f in features:  # one copy per level into its slice of the table (a loop over levels)
        h, w = f.shape[2:]
        table[:, start:start + h * w].view(n, h, w, c).copy_(f.permute(0, 2, 3, 1))
        start += h * w
    return (table, *_level_sizes([f.shape for f in features], features[0].device))


def _level_sizes(shapes: Sequence[Sequence[int]], device: torch.device):
    """Per-level heights, widths and row offsets (int64 Tensor[L] each) of the flattened table."""
    sizes = torch.tensor([[s[2], s[3]] for s in shapes], dtype=torch.int64, device=device)
    heights, widths = sizes[:, 0], sizes[:, 1]
    offsets = torch.cumsum(heights * widths, 0) - heights * widths
    return heights, widths, offsets


def _roi_levels(rois: Tensor, scales: Sequence[float], canonical_scale: float, canonical_level: int,
                cdt: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Each RoI's map index (0 with one level, else :func:`map_levels` of the boxes in the
    compute dtype ``cdt``, as the kernels map them), clamped to the maps given, and which RoIs
    pool nothing (None when all pool).

    torchvision pools level index i from the i-th map given, whatever that map's stride: maps
    that are not adjacent pyramid levels (strides 8 and 32) leave indices past the last map,
    whose RoIs pool zeros, as do boxes of negative area (the Triton kernels do the same).
    """
    if len(scales) == 1:
        return torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device), None
    k_min, k_max = level_range(scales)
    levels = map_levels(rois[:, 1:].to(cdt), k_min, k_max, canonical_scale, canonical_level)
    unpooled = (levels < 0) | (levels >= len(scales))
    return levels.clamp(min=0, max=len(scales) - 1), unpooled


# --------------------------------------------------------------------------- reference


def roi_align_ref(input: Tensor, rois: Tensor, output_size, spatial_scale: float = 1.0,
                  sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Pure-PyTorch RoI Align: ``input`` Tensor[N, C, H, W], ``rois`` Tensor[K, 5].

    Returns Tensor[K, C, PH, PW] in ``input``'s dtype (fp16/bf16 are computed in fp32).
    Differentiable w.r.t. ``input`` through autograd.
    """
    return _levels_ref([input], rois, pair("output_size", output_size), [spatial_scale], sampling_ratio, aligned)


def multiscale_roi_align_ref(features: Sequence[Tensor], rois: Tensor, output_size, scales: Sequence[float],
                             sampling_ratio: int = 2, canonical_scale: float = 224, canonical_level: int = 4) -> Tensor:
    """Multi-level RoI Align, all levels in one vectorised pass (no per-level loop).

    ``features``: Tensor[N, C, H_l, W_l] per level, finest first; ``rois``: Tensor[K, 5];
    ``scales``: per-level spatial scale (1/stride). Each RoI is pooled from the level given
    by :func:`map_levels`. Returns Tensor[K, C, PH, PW] in the features' dtype.
    """
    return _levels_ref(features, rois, pair("output_size", output_size), scales, sampling_ratio, False,
                       canonical_scale, canonical_level)


def _levels_ref(features: Sequence[Tensor], rois: Tensor, output_size: tuple[int, int], scales: Sequence[float],
                sampling_ratio: int, aligned: bool, canonical_scale: float = 224, canonical_level: int = 4,
                pool=_roi_align_flat) -> Tensor:
    """The reference over one level (every RoI on it) or several (each RoI on its mapped level);
    ``pool=_roi_align_bags`` is the CPU path (the same result, summed in another order)."""
    cdt = compute_dtype(features[0].dtype)
    table, heights, widths, offsets = _level_table(features, cdt)
    levels, unpooled = _roi_levels(rois, scales, canonical_scale, canonical_level, cdt)
    scale_t = torch.tensor(list(scales), dtype=cdt, device=features[0].device)
    out = pool(table, heights, widths, offsets, scale_t, rois, levels, output_size, sampling_ratio, aligned)
    if unpooled is not None:
        out = out.masked_fill(unpooled[:, None, None, None], 0.0)
    return out.to(features[0].dtype)


def roi_align_backward_ref(grad: Tensor, rois: Tensor, shapes: Sequence[Sequence[int]], output_size: tuple[int, int],
                           scales: Sequence[float], sampling_ratio: int, aligned: bool, canonical_scale: float = 224,
                           canonical_level: int = 4, dtype: torch.dtype | None = None,
                           pool_backward=_roi_align_flat_backward) -> list[Tensor]:
    """Gradient of :func:`_levels_ref` w.r.t. each level, given ``grad`` Tensor[K, C, PH, PW].

    ``shapes``: each level's (N, C, H, W). Returns per level Tensor[N, C, H, W] in ``dtype``
    (default: ``grad``'s), computed in fp32 (fp64 for fp64) and contiguous.
    ``pool_backward=_roi_align_bags_backward`` is the CPU path's.
    """
    dtype = dtype or grad.dtype
    cdt = compute_dtype(dtype)
    n, c = shapes[0][:2]
    heights, widths, offsets = _level_sizes(shapes, grad.device)
    levels, unpooled = _roi_levels(rois, scales, canonical_scale, canonical_level, cdt)
    scale_t = torch.tensor(list(scales), dtype=cdt, device=grad.device)
    total = sum(int(s[2]) * int(s[3]) for s in shapes)
    grad = grad.to(cdt)
    if unpooled is not None:
        grad = grad.masked_fill(unpooled[:, None, None, None], 0.0)
    table = pool_backward(grad, (n, total, c), heights, widths, offsets, scale_t, rois, levels, output_size,
                          sampling_ratio, aligned)
    rows = [int(s[2]) * int(s[3]) for s in shapes]
    return [t.reshape(n, s[2], s[3], c).permute(0, 3, 1, 2).to(dtype).contiguous()
            for t, s in zip(table.split(rows, dim=1), shapes)]


# --------------------------------------------------------------------------- registered ops
#
# ``fastmask::roi_align`` and ``fastmask::multiscale_roi_align`` are registered ops (see
# ``_library``: ``opcheck``, ``torch.compile(fullgraph=True)`` and ``torch.export`` see one op
# with an exact fake), both differentiable through ``fastmask::roi_align_backward``. They take
# the backend already resolved ("triton" or "torch"). Autocast: not autocast-aware; they compute
# in the features' dtype (fp16/bf16 accumulate in fp32), as the public ops document.


def _forward_impl(features: Sequence[Tensor], rois: Tensor, output_size: Sequence[int], scales: Sequence[float],
                  sampling_ratio: int, aligned: bool, canonical_scale: float, canonical_level: int,
                  backend: str) -> Tensor:
    out_hw = (int(output_size[0]), int(output_size[1]))
    if backend == "triton":
        from fastmask.kernels.roi_align import roi_align_fwd

        k_min, k_max = level_range(scales) if len(features) > 1 else (0, 0)
        return roi_align_fwd(list(features), _kernel_rows(rois, features[0].dtype), out_hw, [float(s) for s in scales],
                             sampling_ratio, aligned, canonical_scale=canonical_scale, canonical_level=canonical_level,
                             k_min=k_min, k_max=k_max)
    out = _levels_ref(features, rois, out_hw, scales, sampling_ratio, aligned, canonical_scale, canonical_level,
                      pool=_roi_align_bags)
    return out.contiguous()


def _kernel_rows(rois: Tensor, dtype: torch.dtype) -> Tensor:
    """``rois`` as the kernels read them: contiguous, in the compute dtype of features of
    ``dtype`` (fp32; fp64 for fp64), which the kernels compute and accumulate in (no op when
    they already are)."""
    cdt = compute_dtype(dtype)
    return rois if rois.dtype == cdt and rois.is_contiguous() else rois.to(cdt).contiguous()


def _forward_fake(features: Sequence[Tensor], rois: Tensor, output_size: Sequence[int], backend: str) -> Tensor:
    f0 = features[0]
    channels_last = backend == "triton" and all(_channels_last(f) for f in features)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((rois.shape[0], f0.shape[1], output_size[0], output_size[1]), dtype=f0.dtype, device=f0.device,
                       memory_format=fmt)


def _channels_last(t: Tensor) -> bool:
    """Whether the Triton kernels treat ``t`` as channels-last: their ``is_channels_last``, restated
    here so that the torch backend never imports Triton (a test keeps the two equal)."""
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1 and not t.is_contiguous()


def _roi_align_fake(input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic, backend):
    return _forward_fake([input], rois, output_size, backend)


@register("roi_align(Tensor input, Tensor rois, int[] output_size, float spatial_scale, int sampling_ratio, "
          "bool aligned, bool deterministic, str backend) -> Tensor", _roi_align_fake)
def _roi_align_op(input: Tensor, rois: Tensor, output_size: Sequence[int], spatial_scale: float,
                  sampling_ratio: int, aligned: bool, deterministic: bool, backend: str) -> Tensor:
    return _forward_impl([input], rois, output_size, [spatial_scale], sampling_ratio, aligned, 224.0, 4, backend)


def _multiscale_fake(features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level,
                     deterministic, backend):
    return _forward_fake(features, rois, output_size, backend)


@register("multiscale_roi_align(Tensor[] features, Tensor rois, int[] output_size, float[] scales, "
          "int sampling_ratio, float canonical_scale, int canonical_level, bool deterministic, str backend) -> Tensor",
          _multiscale_fake)
def _multiscale_roi_align_op(features: Sequence[Tensor], rois: Tensor, output_size: Sequence[int],
                             scales: Sequence[float], sampling_ratio: int, canonical_scale: float,
                             canonical_level: int, deterministic: bool, backend: str) -> Tensor:
    return _forward_impl(features, rois, output_size, scales, sampling_ratio, False, canonical_scale,
                         canonical_level, backend)


def _grad_layout(shapes: Sequence[Sequence[int]], channels_last: Sequence[bool]):
    """Per level: (shape, strides, element offset) of its gradient inside one flat buffer, dense,
    channels-last where its input was. The Triton backward writes this layout (its own
    ``_grad_layout``, on the kernel side of the layering; a test keeps the two equal)."""
    out, total = [], 0
    for (n, c, h, w), cl in zip(shapes, channels_last):
        out.append(((n, c, h, w), (h * w * c, 1, w * c, c) if cl else (c * h * w, h * w, w, 1), total))
        total += n * c * h * w
    return out, total


def _backward_fake(grad, rois, shapes, channels_last, dtype, output_size, scales, sampling_ratio, aligned,
                   canonical_scale, canonical_level, deterministic, backend):
    return grad.new_empty((sum(math.prod(shapes[i:i + 4]) for i in range(0, len(shapes), 4)),), dtype=dtype)


@register("roi_align_backward(Tensor grad, Tensor rois, int[] shapes, bool[] channels_last, ScalarType dtype, "
          "int[] output_size, float[] scales, int sampling_ratio, bool aligned, float canonical_scale, "
          "int canonical_level, bool deterministic, str backend) -> Tensor", _backward_fake)
def _roi_align_backward_op(grad: Tensor, rois: Tensor, shapes: Sequence[int], channels_last: Sequence[bool],
                           dtype: torch.dtype, output_size: Sequence[int], scales: Sequence[float], sampling_ratio: int,
                           aligned: bool, canonical_scale: float, canonical_level: int, deterministic: bool,
                           backend: str) -> Tensor:
    """Gradients of every level, flattened into one buffer (see ``_grad_layout``; ``shapes`` is
    the levels' (N, C, H, W) concatenated). One output, so that no two outputs alias."""
    level_shapes = [tuple(shapes[i:i + 4]) for i in range(0, len(shapes), 4)]
    out_hw = (int(output_size[0]), int(output_size[1]))
    if backend == "triton":
        from fastmask.kernels.roi_align import roi_align_bwd

        k_min, k_max = level_range(scales) if len(level_shapes) > 1 else (0, 0)
        grads = roi_align_bwd(grad, _kernel_rows(rois, dtype), level_shapes, list(channels_last), out_hw,
                              [float(s) for s in scales], sampling_ratio, aligned, canonical_scale=canonical_scale,
                              canonical_level=canonical_level, k_min=k_min, k_max=k_max,
                              deterministic=deterministic, grad_dtype=dtype)
        # The kernel's gradients are views of one flat buffer in the same layout; return it.
        return grads[0].as_strided((sum(math.prod(s) for s in level_shapes),), (1,), 0)
    grads = roi_align_backward_ref(grad, rois, level_shapes, out_hw, scales, sampling_ratio, aligned, canonical_scale,
                                   canonical_level, dtype, pool_backward=_roi_align_bags_backward)
    return torch.cat([(g.permute(0, 2, 3, 1) if cl else g).reshape(-1) for g, cl in zip(grads, channels_last)])


def _save_for_backward(ctx, features: Sequence[Tensor], rois: Tensor, geometry: dict) -> None:
    ctx.save_for_backward(rois)
    ctx.geometry = geometry
    ctx.shapes = [int(v) for f in features for v in f.shape]
    ctx.channels_last = [geometry["backend"] == "triton" and _channels_last(f) for f in features]
    ctx.dtype = features[0].dtype


def _level_grads(ctx, grad: Tensor) -> list[Tensor]:
    (rois,) = ctx.saved_tensors
    g = ctx.geometry
    flat = torch.ops.fastmask.roi_align_backward(
        grad, rois, ctx.shapes, ctx.channels_last, ctx.dtype, g["output_size"], g["scales"], g["sampling_ratio"],
        g["aligned"], g["canonical_scale"], g["canonical_level"], g["deterministic"], g["backend"])
    shapes = [tuple(ctx.shapes[i:i + 4]) for i in range(0, len(ctx.shapes), 4)]
    layout, _ = _grad_layout(shapes, ctx.channels_last)
    return [flat.as_strided(shape, strides, offset) for shape, strides, offset in layout]


def _roi_align_setup(ctx, inputs, output):
    input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic, backend = inputs
    _save_for_backward(ctx, [input], rois, dict(
        output_size=list(output_size), scales=[spatial_scale], sampling_ratio=sampling_ratio, aligned=aligned,
        canonical_scale=224.0, canonical_level=4, deterministic=deterministic, backend=backend))


def _roi_align_grad(ctx, grad):
    return (_level_grads(ctx, grad)[0],) + (None,) * 7


def _multiscale_setup(ctx, inputs, output):
    (features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, deterministic,
     backend) = inputs
    _save_for_backward(ctx, features, rois, dict(
        output_size=list(output_size), scales=list(scales), sampling_ratio=sampling_ratio, aligned=False,
        canonical_scale=canonical_scale, canonical_level=canonical_level, deterministic=deterministic,
        backend=backend))


def _multiscale_grad(ctx, grad):
    return (_level_grads(ctx, grad),) + (None,) * 8


torch.library.register_autograd("fastmask::roi_align", _roi_align_grad, setup_context=_roi_align_setup)
torch.library.register_autograd("fastmask::multiscale_roi_align", _multiscale_grad, setup_context=_multiscale_setup)


# --------------------------------------------------------------------------- public ops


def _check_features(name: str, feats: Sequence[Tensor]) -> None:
    for i, f in enumerate(feats):
        check_tensor(f"{name}[{i}]" if len(feats) > 1 else name, f, ndim=4, dtypes=FLOAT_DTYPES)
    n, c = feats[0].shape[:2]
    for i, f in enumerate(feats[1:], 1):
        if f.shape[:2] != (n, c):
            raise ValueError(f"{name}[{i}] has batch and channels {tuple(f.shape[:2])}, {name}[0] has {(n, c)}")
        if f.dtype != feats[0].dtype or f.device != feats[0].device:
            raise ValueError(f"{name}[{i}] has dtype/device {f.dtype}/{f.device}, {name}[0] has {feats[0].dtype}/{feats[0].device}")


# Most levels the Triton kernel takes in one launch (P2-P6); ``auto`` uses the reference beyond.
KERNEL_MAX_LEVELS = 5


def _check_scalars(spatial_scale=1.0, sampling_ratio=-1, aligned=False, canonical_scale=224.0,
                   canonical_level=4) -> None:
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)) or not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    if isinstance(canonical_scale, bool) or not isinstance(canonical_scale, (int, float)) or not canonical_scale > 0:
        raise ValueError(f"canonical_scale must be a positive number, got {canonical_scale!r}")
    if isinstance(canonical_level, bool) or not isinstance(canonical_level, int):
        raise TypeError(f"canonical_level must be an int, got {canonical_level!r}")


def _check_batch_index(rois: Tensor, n: int) -> None:
    """boxes[:, 0] must hold whole numbers in [0, n) (where ``data_checks_enabled``: by default
    CPU tensors only; without the check the Triton kernel pools zeros for an out-of-range index)."""
    if rois.shape[0] == 0 or not data_checks_enabled(rois):
        return
    idx = rois[:, 0]
    bad = (idx != idx.round()) | (idx < 0) | (idx >= n)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"boxes[:, 0] must be batch indices in [0, {n}), got {idx[first].item()} at row {first}")


def _check_image_sizes(image_sizes, n: int) -> None:
    if not isinstance(image_sizes, (list, tuple)) or len(image_sizes) != n:
        raise ValueError(f"image_sizes must give (h, w) for each of the {n} images, got {image_sizes!r}")
    for i, s in enumerate(image_sizes):
        if len(s) != 2 or not all(int(v) == v and v > 0 for v in s):
            raise ValueError(f"image_sizes[{i}] must be a pair of positive ints (h, w), got {tuple(s)!r}")


def roi_align(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, *, backend: str | None = None,
              deterministic: bool | None = None) -> Tensor:
    """RoI Align, the same result as ``torchvision.ops.roi_align``.

    Args:
        input: Tensor[N, C, H, W] (NCHW or channels-last), fp16/bf16/fp32/fp64.
        boxes: Tensor[K, 5] ``(batch_index, x1, y1, x2, y2)`` or a list of N Tensor[Ki, 4].
        output_size: int or (PH, PW).
        spatial_scale: feature cells per input pixel (1 / stride).
        sampling_ratio: samples per bin and axis; <= 0 picks ``ceil(roi_size / output_size)``.
        aligned: shift boxes by half a cell so that pixel edges line up (see module docs).
        backend: None, "auto", "triton" or "torch" (see ``fastmask.ops``).
        deterministic: Triton backend only: a bitwise reproducible backward (no float atomics,
            slower); None follows ``torch.are_deterministic_algorithms_enabled()``.

    Returns Tensor[K, C, PH, PW] in ``input``'s dtype (the Triton backend returns it
    channels-last when ``input`` is); differentiable w.r.t. ``input``.

    Limits: features of any size (the kernels index in 64 bits where offsets inside one image
    pass 2**31 elements; the backward's gradient is one buffer of the features' size); RoIs
    up to what the GPU's grid takes (programs under 2**31, ValueError beyond: over 40 million
    RoIs at 7x7 bins and 256 channels); the CPU path and the reference work in chunks of RoIs
    (``REF_GATHER_BUDGET``), so their extra memory is bounded at any size.
    """
    _check_features("input", [input])
    _check_scalars(spatial_scale, sampling_ratio, aligned)
    rois = boxes_to_rois(boxes)
    check_same_device(input=input, boxes=rois)
    out_hw = pair("output_size", output_size)
    _check_batch_index(rois, input.shape[0])
    name = resolve_backend(backend, input, "roi_align")
    return torch.ops.fastmask.roi_align(input, rois.detach(), list(out_hw), float(spatial_scale), sampling_ratio,
                                        aligned, _deterministic(deterministic), name)


def multiscale_roi_align(features: Sequence[Tensor], boxes: Sequence[Tensor], output_size,
                         image_sizes: Sequence[Sequence[int]], sampling_ratio: int = 2,
                         canonical_scale: float = 224, canonical_level: int = 4, *,
                         backend: str | None = None, deterministic: bool | None = None) -> Tensor:
    """Multi-level RoI Align over FPN levels, the same result as torchvision's ``MultiScaleRoIAlign``.

    Args:
        features: per-level Tensor[N, C, H_l, W_l], finest level first (e.g. P2..P5).
        boxes: list of N Tensor[Ki, 4] in image coordinates ``(x1, y1, x2, y2)``.
        output_size: int or (PH, PW).
        image_sizes: the (h, w) of each image; the level scales are inferred from them as
            torchvision does.
        sampling_ratio, canonical_scale, canonical_level: see ``MultiScaleRoIAlign``.
        deterministic: as for :func:`roi_align`.

    Returns Tensor[sum Ki, C, PH, PW], differentiable w.r.t. every level. The Triton backend
    runs all levels in one launch.
    """
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        raise ValueError("features must be a non-empty list of Tensor[N, C, H, W]")
    _check_features("features", features)
    if not isinstance(boxes, (list, tuple)):
        raise ValueError("boxes must be a list of per-image Tensor[Ki, 4]")
    rois = boxes_to_rois(boxes)
    check_same_device(features=features[0], boxes=rois)
    if len(boxes) != features[0].shape[0]:
        raise ValueError(f"boxes has {len(boxes)} images but features have batch size {features[0].shape[0]}")
    _check_image_sizes(image_sizes, len(boxes))
    _check_scalars(sampling_ratio=sampling_ratio, canonical_scale=canonical_scale, canonical_level=canonical_level)
    out_hw = pair("output_size", output_size)
    scales = infer_scales([f.shape[-2:] for f in features], image_sizes)
    name = resolve_backend(backend, features[0], "multiscale_roi_align")
    if name == "triton" and len(features) > KERNEL_MAX_LEVELS:
        if check_backend_name(backend) == "triton":
            raise RuntimeError(f"multiscale_roi_align: the Triton kernel takes at most {KERNEL_MAX_LEVELS} feature "
                               f"levels, got {len(features)}; use backend='torch'")
        name = "torch"  # more levels than one launch takes: the reference handles any count
    return torch.ops.fastmask.multiscale_roi_align(list(features), rois.detach(), list(out_hw), scales, sampling_ratio,
                                                   float(canonical_scale), int(canonical_level),
                                                   _deterministic(deterministic), name)


def _deterministic(deterministic: bool | None) -> bool:
    """``deterministic`` as given, or None: ``torch.are_deterministic_algorithms_enabled()``."""
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``: ``m(features_dict, boxes, image_sizes)``.

    Holds no state between calls: the level scales are inferred on every call from the
    feature and image sizes (a few float operations on the host).
    """

    def __init__(self, featmap_names: Sequence[str], output_size, sampling_ratio: int, *,
                 canonical_scale: float = 224, canonical_level: int = 4, backend: str | None = None,
                 deterministic: bool | None = None):
        super().__init__()
        if isinstance(featmap_names, str) or not featmap_names:
            raise ValueError("featmap_names must be a non-empty list of feature map names")
        self.featmap_names = list(featmap_names)
        self.output_size = pair("output_size", output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.backend = backend
        self.deterministic = deterministic

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        # torchvision's rule: the maps of ``x`` whose names are listed, in ``x``'s order; listed
        # names missing from ``x`` are skipped (e.g. a two-map MobileNet FPN pooled by the
        # default four names).
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if not feats:
            raise ValueError(f"features has none of the maps {self.featmap_names}; it has {list(x)}")
        return multiscale_roi_align(feats, boxes, self.output_size, image_shapes, self.sampling_ratio,
                                    self.canonical_scale, self.canonical_level, backend=self.backend,
                                    deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return f"featmap_names={self.featmap_names}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
