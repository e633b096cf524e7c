"""The five Mask R-CNN losses and the mask targets, with torchvision's definitions.

Every function takes the sampled elements of the whole batch at once (flat indices from
:func:`fastmask.models.sampling.sample_balanced`), in the order torchvision gathers them,
so that the sums run over the same elements in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmask import ops

# Smooth-L1 transition point for box regression (Detectron's and torchvision's value):
# deltas are small, so the loss is quadratic only for |error| < 1/9.
SMOOTH_L1_BETA = 1.0 / 9


def rpn_losses(objectness: Tensor, deltas: Tensor, labels: Tensor, pos_targets: Tensor, pos: Tensor,
               neg: Tensor) -> tuple[Tensor, Tensor]:
    """(loss_objectness, loss_rpn_box_reg) of the RPN.

    ``objectness``: Tensor[B*A] logits; ``deltas``: Tensor[B*A, 4]; ``labels``: Tensor[B*A]
    float (1 object, 0 background); ``pos``, ``neg``: flat indices of the sampled anchors;
    ``pos_targets``: Tensor[len(pos), 4] regression targets of the positives. The box loss is
    summed over the positives and divided by the number sampled.
    """
    sampled = torch.cat([pos, neg])
    box_loss = F.smooth_l1_loss(deltas[pos], pos_targets, beta=SMOOTH_L1_BETA, reduction="sum") / sampled.numel()
    objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
    return objectness_loss, box_loss


def fastrcnn_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, pos_targets: Tensor,
                    pos: Tensor) -> tuple[Tensor, Tensor]:
    """(loss_classifier, loss_box_reg) of the box head.

    ``class_logits``: Tensor[S, C]; ``box_regression``: Tensor[S, 4C]; ``labels``: int64
    Tensor[S]; ``pos``: row indices of the positives (label > 0); ``pos_targets``:
    Tensor[len(pos), 4] their regression targets. Only each positive's own class deltas are
    regressed; the sum is divided by S.
    """
    classification_loss = F.cross_entropy(class_logits, labels)
    per_class = box_regression.reshape(box_regression.shape[0], -1, 4)
    box_loss = F.smooth_l1_loss(per_class[pos, labels[pos]], pos_targets, beta=SMOOTH_L1_BETA, reduction="sum")
    return classification_loss, box_loss / labels.numel()


def mask_targets(gt_masks: list[Tensor], boxes: list[Tensor], matched: list[Tensor], size: int,
                 backend: str | None = None) -> Tensor:
    """Ground-truth masks cropped to the boxes and resampled to ``size x size`` (torchvision's
    ``project_masks_on_boxes``): RoI Align of each matched mask over its box, adaptive sampling.

    ``gt_masks[i]``: Tensor[G_i, H_i, W_i]; ``boxes[i]``: Tensor[K_i, 4]; ``matched[i]``: int64
    Tensor[K_i] index of the ground truth of each box. Returns float Tensor[sum K_i, size, size].

    Images whose resized sizes are equal share one RoI Align call; masks of different sizes
    cannot share one (padding would change the samples taken at the image border).
    """
    dtype = boxes[0].dtype
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(gt_masks):
        groups.setdefault(tuple(m.shape[-2:]), []).append(i)
    out = [None] * len(gt_masks)
    for members in groups.values():  # one call per distinct image size (usually one)
        masks = torch.cat([gt_masks[i] for i in members])[:, None].to(dtype)
        offsets, start = [], 0
        for i in members:
            offsets.append(start)
            start += gt_masks[i].shape[0]
        rois = torch.cat([torch.cat([(matched[i] + off).to(dtype)[:, None], boxes[i]], dim=1)
                          for i, off in zip(members, offsets)])
        if masks.shape[0] == 0:  # images without objects have no positives either
            crops = masks.new_zeros((rois.shape[0], size, size))
        else:
            crops = ops.roi_align(masks, rois, (size, size), 1.0, backend=backend)[:, 0]
        for i, part in zip(members, crops.split([len(boxes[i]) for i in members])):
            out[i] = part
    return torch.cat(out)


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel binary cross-entropy of each positive's own class mask (torchvision's
    ``maskrcnn_loss``). ``mask_logits``: Tensor[K, C, M, M]; ``labels``: Tensor[K];
    ``targets``: Tensor[K, M, M]. Zero (still connected to the graph) when K == 0."""
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    rows = torch.arange(labels.shape[0], device=labels.device)
    return F.binary_cross_entropy_with_logits(mask_logits[rows, labels], targets)
