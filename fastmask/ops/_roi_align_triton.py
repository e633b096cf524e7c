"""Triton backend of RoI Align: the autograd Function around the kernels in ``kernels/roi_align.py``.

Forward and backward are one kernel launch each over every FPN level; each RoI's level is
computed in the kernel, so neither pass reads a value back to the host. Only the RoIs and the
feature shapes and layouts are saved for backward, not the feature maps.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastmask.kernels.roi_align import MAX_LEVELS, is_channels_last, roi_align_bwd, roi_align_fwd


class _RoIAlignFunction(torch.autograd.Function):
    """RoI Align over one or more levels; differentiable w.r.t. every level, not the RoIs."""

    @staticmethod
    def forward(ctx, rois: Tensor, geometry: dict, deterministic: bool, *features: Tensor) -> Tensor:
        out = roi_align_fwd(list(features), rois, **geometry)
        ctx.save_for_backward(rois)
        ctx.geometry = geometry
        ctx.deterministic = deterministic
        ctx.shapes = [tuple(f.shape) for f in features]
        ctx.channels_last = [is_channels_last(f) for f in features]
        ctx.dtype = features[0].dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (rois,) = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        if not any(needs):
            return (None, None, None) + (None,) * len(needs)
        grads = roi_align_bwd(grad_out, rois, ctx.shapes, ctx.channels_last, deterministic=ctx.deterministic,
                              grad_dtype=ctx.dtype, **ctx.geometry)
        return (None, None, None) + tuple(g if need else None for g, need in zip(grads, needs))


def roi_align_triton(features: Sequence[Tensor], rois: Tensor, output_size: tuple[int, int],
                     scales: Sequence[float], sampling_ratio: int, aligned: bool, *,
                     canonical_scale: float = 224.0, canonical_level: int = 4, k_min: int = 0, k_max: int = 0,
                     deterministic: bool | None = None) -> Tensor:
    """RoI Align of ``rois`` (Tensor[K, 5]) over ``features`` (Tensor[N, C, H_l, W_l] per level).

    One level: every RoI is pooled from it at ``scales[0]``. Several levels: each RoI is pooled
    from the level torchvision's LevelMapper picks (``canonical_scale``, ``canonical_level``,
    clamped to ``[k_min, k_max]``), computed in the kernel. Arguments are validated by the
    public ops. ``deterministic``: bitwise reproducible backward (no float atomics); None
    follows ``torch.are_deterministic_algorithms_enabled()``.

    Returns Tensor[K, C, PH, PW] in the features' dtype, channels-last when they are.
    """
    if len(features) > MAX_LEVELS:
        raise RuntimeError(f"roi_align: the Triton kernel takes at most {MAX_LEVELS} feature levels, got "
                           f"{len(features)}; use backend='torch'")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    geometry = dict(output_size=tuple(output_size), scales=[float(s) for s in scales],
                    sampling_ratio=int(sampling_ratio), aligned=bool(aligned), canonical_scale=float(canonical_scale),
                    canonical_level=int(canonical_level), k_min=int(k_min), k_max=int(k_max))
    rois = rois.detach().to(torch.float32).contiguous()
    return _RoIAlignFunction.apply(rois, geometry, bool(deterministic), *features)
