"""Matching boxes to ground truth and sampling a balanced training batch, for a whole batch of
images at once.

Both work on padded per-image tensors: ground truth as Tensor[B, G, 4] with a validity
mask Tensor[B, G] (images have different numbers of objects), candidates (anchors or
proposals) as Tensor[B, N, 4] with their own validity mask where counts differ.

:class:`Matcher` gives each candidate the index of its best ground-truth box, or
``BELOW_LOW_THRESHOLD`` / ``BETWEEN_THRESHOLDS``, with the same rules as torchvision's
``Matcher`` (including ``allow_low_quality_matches`` for the RPN).

:func:`sample_balanced` draws up to ``batch_size_per_image`` candidates per image, at most
``positive_fraction`` of them positive, with ``torch.randperm`` called in torchvision's order
(per image: positives, then negatives) so that a seeded run selects the very same samples
as torchvision's ``BalancedPositiveNegativeSampler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastmask.ops._device import to_device_async


class Matcher:
    """Match candidates to ground truth by an IoU matrix.

    ``matcher(iou: Tensor[B, G, N], gt_valid: Tensor[B, G] bool) -> int64 Tensor[B, N]``:
    the index in ``[0, G)`` of each candidate's best ground truth when its IoU is
    ``>= high``; ``BELOW_LOW_THRESHOLD`` (-1) when below ``low``; ``BETWEEN_THRESHOLDS`` (-2)
    in between. With ``allow_low_quality_matches``, every candidate whose IoU with some
    ground truth equals that ground truth's best IoU keeps its best match whatever its value
    (torchvision's rule, ties included). An image without ground truth gets -1 everywhere.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor, gt_valid: Tensor) -> Tensor:
        b, g, n = iou.shape
        if g == 0:
            return torch.full((b, n), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
        # Padded ground truth scores -1: below any real IoU (>= 0), so it never wins a max.
        iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
        best_iou, best_gt = iou.max(dim=1)  # [B, N]; ties go to the first ground truth, as torchvision
        matches = torch.where(best_iou < self.low_threshold, self.BELOW_LOW_THRESHOLD, best_gt)
        between = (best_iou >= self.low_threshold) & (best_iou < self.high_threshold)
        matches = torch.where(between, self.BETWEEN_THRESHOLDS, matches)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
            is_best = ((iou == best_per_gt) & gt_valid[:, :, None]).any(dim=1)
            matches = torch.where(is_best, best_gt, matches)
        return matches

    def __repr__(self) -> str:
        return (f"Matcher(high={self.high_threshold}, low={self.low_threshold}, "
                f"allow_low_quality_matches={self.allow_low_quality_matches})")


@dataclass
class Samples:
    """Sampled candidates of a batch, as flat indices into the padded [B, N] layout.

    ``pos`` and ``neg``: int64 Tensor, image-major and increasing within each image (the
    order torchvision's ``torch.where`` over its masks gives). ``num_pos`` / ``num_neg``:
    the count per image, on the host.
    """

    pos: Tensor
    neg: Tensor
    num_pos: list[int]
    num_neg: list[int]


def _nth_true(flags: Tensor) -> Tensor:
    """For a bool Tensor[B, N]: per row, the column indices of the True entries first, in
    increasing order (a stable sort, so no host sync is needed to gather them)."""
    return torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices


def sample_balanced(labels: Tensor, batch_size_per_image: int, positive_fraction: float) -> Samples:
    """Balanced positive/negative sampling, torchvision's ``BalancedPositiveNegativeSampler``.

    ``labels``: Tensor[B, N] with ``>= 1`` for positives, ``0`` for negatives and ``-1`` for
    candidates to ignore (and for padding). Per image, ``min(#pos, int(batch_size_per_image
    * positive_fraction))`` positives and ``min(#neg, batch_size_per_image - that)`` negatives
    are drawn uniformly without replacement.

    One host sync reads the per-image counts (``randperm`` needs them); the random draws are
    one ``randperm`` per image and kind, the calls torchvision makes, in its order.
    """
    is_pos, is_neg = labels >= 1, labels == 0
    b, n = labels.shape
    counts = torch.stack([is_pos.sum(1), is_neg.sum(1)], dim=1).tolist()  # host sync: sizes of the draws
    pos_order, neg_order = _nth_true(is_pos), _nth_true(is_neg)
    device = labels.device
    pos_picks, neg_picks, num_pos, num_neg = [], [], [], []
    for i, (n_pos, n_neg) in enumerate(counts):  # per image: randperm calls in torchvision's order
        k_pos = min(n_pos, int(batch_size_per_image * positive_fraction))
        k_neg = min(n_neg, batch_size_per_image - k_pos)
        pos_picks.append(torch.randperm(n_pos, device=device)[:k_pos] + i * n)
        neg_picks.append(torch.randperm(n_neg, device=device)[:k_neg] + i * n)
        num_pos.append(k_pos)
        num_neg.append(k_neg)
    offsets = torch.arange(b, device=device)[:, None] * n
    pos = (pos_order + offsets).flatten()[torch.cat(pos_picks)]
    neg = (neg_order + offsets).flatten()[torch.cat(neg_picks)]
    # Image-major, increasing within the image: each image's picks are offset by i * n.
    return Samples(pos.sort().values, neg.sort().values, num_pos, num_neg)


def pad_boxes(boxes: list[Tensor], dtype=None) -> tuple[Tensor, Tensor]:
    """Per-image Tensor[Ni, 4] -> (Tensor[B, max Ni, 4] zero-padded, bool valid mask Tensor[B, max Ni])."""
    padded = torch.nn.utils.rnn.pad_sequence([b.to(dtype) if dtype is not None else b for b in boxes],
                                             batch_first=True)
    if padded.dim() == 2:  # every image empty: pad_sequence gives [B, 0]
        padded = padded.reshape(len(boxes), 0, 4)
    counts = to_device_async([len(b) for b in boxes], torch.int64, padded.device)  # async: no host sync
    valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < counts[:, None]
    return padded, valid
