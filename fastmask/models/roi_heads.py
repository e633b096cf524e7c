"""RoI heads: the box branch (TwoMLPHead + FastRCNNPredictor) and the mask branch (four 3x3
convs + MaskRCNNPredictor), their training targets and losses, and detection post-processing.

Module and parameter names follow torchvision (``box_head.fc6``, ``box_predictor.cls_score``,
``mask_head.0.0``, ``mask_predictor.conv5_mask``, ...) so its checkpoints load unchanged.

Training (torchvision's ``RoIHeads.select_training_samples``): the ground-truth boxes are
added to the proposals, each proposal is matched to the ground truth (IoU >= ``fg_iou_thresh``
object, < ``bg_iou_thresh`` background), ``batch_size_per_image`` proposals per image are
sampled with ``positive_fraction`` positives, and the box branch is trained on them, the mask
branch on the positives. The whole batch is handled at once on padded [B, N] tensors.

Inference (torchvision's ``postprocess_detections``): per proposal and foreground class, the
decoded box (clipped to the image) with its softmax score; candidates scoring above
``score_thresh`` with sides >= :data:`MIN_DETECTION_SIZE` go through NMS per (image, class)
and the ``detections_per_img`` best per image are kept; masks are predicted for those. It runs
on padded [B, M] proposals and returns padded [B, D] detections with a count per image:
static shapes and no host sync (see :meth:`RoIHeads.postprocess_padded`).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmask import ops

from .fpn import conv_norm
from .losses import fastrcnn_losses, mask_loss, mask_targets
from .rpn import full_precision
from .sampling import Matcher, pad_boxes, sample_balanced

BOX_ROI_SIZE = 7  # RoI Align output of the box branch (7x7, as the FPN paper)
MASK_ROI_SIZE = 14  # RoI Align output of the mask branch; the predictor upsamples it to 28x28
ROI_SAMPLING_RATIO = 2  # bilinear samples per bin and axis in both RoI Aligns (torchvision's)
REPRESENTATION_SIZE = 1024  # width of the two fully connected layers of the box head
MASK_HEAD_CHANNELS = (256, 256, 256, 256)
# Detections with a side below this (pixels, in the resized image) are dropped before NMS.
MIN_DETECTION_SIZE = 1e-2
FEATURE_NAMES = ("0", "1", "2", "3")  # P2..P5: the RoI heads do not pool from "pool" (P6)


@dataclass
class RoIHeadsConfig:
    """Box and mask head settings, named and defaulted as torchvision's ``box_*`` arguments."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    # Candidates (proposal, class) per image sent to NMS at inference, the best by score (see
    # RoIHeads.postprocess_padded); not a torchvision argument. 4096 holds every candidate of
    # a 1000-proposal image averaging four classes above the score threshold.
    candidates_per_img: int = 4096
    bbox_reg_weights: tuple[float, float, float, float] | None = None  # None: (10, 10, 5, 5)

    @property
    def box_weights(self) -> tuple[float, float, float, float]:
        return tuple(self.bbox_reg_weights) if self.bbox_reg_weights is not None else (10.0, 10.0, 5.0, 5.0)


class TwoMLPHead(nn.Module):
    """Flatten the pooled RoI features and apply two fully connected layers with ReLU."""

    def __init__(self, in_channels: int, representation_size: int = REPRESENTATION_SIZE):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class FastRCNNPredictor(nn.Module):
    """Class logits Tensor[K, C] and per-class box deltas Tensor[K, 4C]."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNHeads(nn.Sequential):
    """3x3 conv (+ GroupNorm when ``norm="gn"``) + ReLU layers on the 14x14 pooled features,
    one per entry of ``layers`` (torchvision: four of 256; names ``{i}.0.weight``)."""

    def __init__(self, in_channels: int, layers=MASK_HEAD_CHANNELS, norm: str | None = None):
        blocks, c = [], in_channels
        for width in layers:
            blocks.append(conv_norm(c, width, 3, norm, relu=True))
            c = width
        super().__init__(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class MaskRCNNPredictor(nn.Sequential):
    """2x transposed-conv upsampling + ReLU, then per-class mask logits Tensor[K, C, 28, 28]."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__(OrderedDict([
            ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
        ]))
        for name, p in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")


def _split(t: Tensor, counts: list[int]) -> list[Tensor]:
    return list(t.split(counts))


class RoIHeads(nn.Module):
    """``forward(features, proposals, image_sizes, targets=None) -> (detections, losses)``.

    ``detections``: per image ``{"boxes": [N, 4], "labels": [N] int64, "scores": [N],
    "masks": [N, 1, 28, 28] probabilities}`` in the resized image's coordinates (eval);
    ``losses``: ``loss_classifier``, ``loss_box_reg``, ``loss_mask`` (training).
    """

    def __init__(self, in_channels: int, num_classes: int, cfg: RoIHeadsConfig, backend: str | None = None,
                 box_roi_pool: nn.Module | None = None, mask_roi_pool: nn.Module | None = None, *,
                 box_head_dim: int = REPRESENTATION_SIZE, mask_head_channels=MASK_HEAD_CHANNELS,
                 head_norm: str | None = None):
        """``box_roi_pool`` / ``mask_roi_pool``: optional replacements of the RoI Aligns over
        ``"0".."3"`` (e.g. ``MultiScaleRoIAlign(["0"], 7, 2)`` for a one-map backbone), called
        as ``pool(features, boxes, image_sizes)``; they must return 7x7 and 14x14 maps.
        ``box_head_dim``, ``mask_head_channels``: head widths (torchvision's 1024 and four
        convs of 256 keep its checkpoint layout); ``head_norm="gn"``: GroupNorm in the mask head."""
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background + at least one class), got {num_classes!r}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.backend = backend
        if box_roi_pool is None:
            box_roi_pool = ops.MultiScaleRoIAlign(FEATURE_NAMES, BOX_ROI_SIZE, ROI_SAMPLING_RATIO, backend=backend)
        if mask_roi_pool is None:
            mask_roi_pool = ops.MultiScaleRoIAlign(FEATURE_NAMES, MASK_ROI_SIZE, ROI_SAMPLING_RATIO, backend=backend)
        self.box_roi_pool = box_roi_pool
        self.box_head = TwoMLPHead(in_channels * BOX_ROI_SIZE ** 2, box_head_dim)
        self.box_predictor = FastRCNNPredictor(box_head_dim, num_classes)
        self.mask_roi_pool = mask_roi_pool
        if len(mask_head_channels) == 0:
            raise ValueError("mask_head_channels must name at least one layer width")
        self.mask_head = MaskRCNNHeads(in_channels, mask_head_channels, head_norm)
        width = mask_head_channels[-1]
        self.mask_predictor = MaskRCNNPredictor(width, width, num_classes)
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=False)

    # ------------------------------------------------------------------ training

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict]):
        """Sampled proposals per image; for the flat sampled rows their labels and matched ground
        truth (index within the image); the rows of the positives, their regression targets,
        and the number of positives per image."""
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        candidates = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)]  # the ground truth is a proposal too
        cand, cand_valid = pad_boxes(candidates)  # [B, N, 4]
        gt, gt_valid = pad_boxes(gt_boxes)  # [B, G, 4]
        n = cand.shape[1]
        matches = self.matcher(ops.box_iou(gt, cand), gt_valid)  # [B, N]
        matched = matches.clamp(min=0)
        if gt.shape[1]:
            gt_labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
            labels = gt_labels.gather(1, matched)
        else:
            labels = torch.zeros_like(matches)
        labels = torch.where(matches == Matcher.BELOW_LOW_THRESHOLD, 0, labels)
        labels = torch.where((matches == Matcher.BETWEEN_THRESHOLDS) | ~cand_valid, -1, labels)  # -1: ignored

        s = sample_balanced(labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction)
        rows = torch.cat([s.pos, s.neg]).sort().values  # image-major, increasing within the image
        counts = [p + q for p, q in zip(s.num_pos, s.num_neg)]
        sampled_boxes = cand.reshape(-1, 4)[rows]
        sampled_labels = labels.reshape(-1)[rows]
        sampled_matched = matched.reshape(-1)[rows]
        pos_rows = torch.searchsorted(rows, s.pos)  # where the positives sit among the sampled rows
        # Regression targets of the positives only, the rows the box loss reads (torchvision
        # encodes every sampled row; the values are the same).
        pos_gt = gt[s.pos // n, sampled_matched[pos_rows]]
        pos_targets = ops.encode_boxes(pos_gt, sampled_boxes[pos_rows], self.cfg.box_weights, backend=self.backend)
        return (_split(sampled_boxes, counts), sampled_labels, sampled_matched, pos_targets, pos_rows, s.num_pos)

    # ------------------------------------------------------------------ inference

    def postprocess_padded(self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor,
                           proposal_counts: Tensor, image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        """:func:`postprocess_padded` with this head's settings."""
        cfg = self.cfg
        return postprocess_padded(class_logits, box_regression, proposals, proposal_counts, image_sizes,
                                  box_weights=cfg.box_weights, score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                                  detections_per_img=cfg.detections_per_img,
                                  candidates_per_img=cfg.candidates_per_img, backend=self.backend)

    def detect(self, features: dict[str, Tensor], proposals: Tensor, proposal_counts: Tensor,
               image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        """Inference on a padded batch of proposals (Tensor[B, M, 4] and their counts, as
        ``ops.rpn_proposals_padded`` returns them): :meth:`postprocess_padded`'s outputs plus
        ``masks`` Tensor[B, D, 1, 28, 28], the probability mask of each detection's class
        (zeros on the padding rows). Static shapes, no host sync."""
        box_features = self.box_head(self.box_roi_pool(features, list(proposals.unbind(0)), image_sizes))
        class_logits, box_regression = map(full_precision, self.box_predictor(box_features))
        det = self.postprocess_padded(class_logits, box_regression, proposals, proposal_counts, image_sizes)
        boxes = det["boxes"]
        b, d = boxes.shape[:2]
        mask_logits = full_precision(self.mask_predictor(self.mask_head(
            self.mask_roi_pool(features, list(boxes.unbind(0)), image_sizes))))
        # The mask of each detection's own class; sigmoid after the selection (same values,
        # C times fewer). Padding rows get zeros, so pasting them gives empty masks.
        labels = det["labels"].reshape(-1)
        probs = mask_logits[torch.arange(b * d, device=labels.device), labels].sigmoid()
        is_det = torch.arange(d, device=labels.device) < det["counts"][:, None]
        det["masks"] = torch.where(is_det.reshape(-1, 1, 1), probs, 0.0).reshape(b, d, 1, *probs.shape[-2:])
        return det

    # ------------------------------------------------------------------ forward

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None):
        if not self.training:  # torchvision's interface: per-image lists in, per-image dicts out
            padded, valid = pad_boxes(proposals)
            return trim(self.detect(features, padded, valid.sum(dim=1), image_sizes)), {}
        if targets is None:
            raise ValueError("targets must be given in training mode")
        proposals, labels, matched, pos_targets, pos_rows, num_pos = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = map(full_precision, self.box_predictor(box_features))
        loss_classifier, loss_box_reg = fastrcnn_losses(class_logits, box_regression, labels, pos_targets, pos_rows)
        pos_boxes = _split(torch.cat(proposals)[pos_rows], num_pos)
        mask_logits = full_precision(
            self.mask_predictor(self.mask_head(self.mask_roi_pool(features, pos_boxes, image_sizes))))
        targets_m = mask_targets([t["masks"] for t in targets], pos_boxes, _split(matched[pos_rows], num_pos),
                                 mask_logits.shape[-1], backend=self.backend)
        loss_m = mask_loss(mask_logits, labels[pos_rows], targets_m)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_m}


def postprocess_padded(class_logits: Tensor, box_regression: Tensor, proposals: Tensor, proposal_counts: Tensor,
                       image_sizes: list[tuple[int, int]], *, box_weights=(10.0, 10.0, 5.0, 5.0),
                       bbox_xform_clip: float = ops.boxes.BBOX_XFORM_CLIP, score_thresh: float = 0.05,
                       nms_thresh: float = 0.5, detections_per_img: int = 100, candidates_per_img: int = 4096,
                       backend: str | None = None) -> dict[str, Tensor]:
    """Boxes, scores and labels of a padded batch (see the module docs), with static shapes
    and no host sync.

    ``proposals``: Tensor[B, M, 4], image i's proposals its first ``proposal_counts[i]``
    rows; ``class_logits`` Tensor[B * M, C] and ``box_regression`` Tensor[B * M, 4C] for
    those rows (the other rows' values are ignored). Returns ``boxes`` Tensor[B, D, 4],
    ``scores`` Tensor[B, D], ``labels`` int64 Tensor[B, D], ``counts`` int64 Tensor[B] and
    ``truncated`` bool Tensor[B], D = ``detections_per_img``: image i's detections are its
    first ``counts[i]`` rows by decreasing score; the rows after them are zeros.

    torchvision sends every candidate (proposal, class) that passes the score and size
    tests to NMS; this sends the best ``candidates_per_img`` of them (K). Greedy NMS
    decides a box from higher-scored boxes only, so the result is the same unless more
    than K candidates pass and fewer than D of the best K survive NMS: ``truncated`` marks
    those images (raise ``candidates_per_img``, the model's ``box_candidates_per_img``, to
    widen the bound). The other arguments: the box head's settings (torchvision's names).
    """
    b, m = proposals.shape[:2]
    num_classes = class_logits.shape[-1]
    c = num_classes - 1  # foreground classes: candidate r * c + (label - 1) is proposal r with label
    device = proposals.device
    clip_to = ops.boxes.per_row_image_sizes(image_sizes, [m] * b, device)
    boxes = ops.decode_boxes(box_regression, proposals.reshape(-1, 4), box_weights, bbox_xform_clip,
                             clip_to=clip_to, backend=backend).reshape(b, m, num_classes, 4)[:, :, 1:].reshape(b, m * c, 4)
    scores = F.softmax(class_logits, -1)[:, 1:].reshape(b, m * c)
    is_proposal = torch.arange(m, device=device) < proposal_counts[:, None]
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = ((scores > score_thresh) & (wh >= MIN_DETECTION_SIZE).all(dim=-1)
             & is_proposal[:, :, None].expand(b, m, c).reshape(b, m * c))
    # The best K valid candidates of each image, by decreasing score; a stable sort keeps
    # equal scores in candidate order, the order NMS breaks ties in.
    k = min(candidates_per_img, m * c)
    order = torch.where(valid, scores, -math.inf).sort(dim=1, descending=True, stable=True).indices[:, :k]
    cand_boxes = boxes.gather(1, order[:, :, None].expand(b, k, 4))
    cand_scores = scores.gather(1, order)
    cand_valid = valid.gather(1, order)
    cand_labels = order % c + 1
    # One NMS for the batch, groups (image, class); a keep mask needs no sync.
    kept = ops.nms_keep_mask(cand_boxes, cand_scores, nms_thresh, cand_labels, cand_valid, backend=backend)
    # The candidates are in score order: the first D kept of each image are its detections.
    d = detections_per_img
    chosen = kept & (torch.cumsum(kept, dim=1) <= d)
    counts = chosen.sum(dim=1)
    width = min(d, k)
    # The chosen positions first, still in order (a stable sort of a 0/1 key).
    pos = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    is_det = torch.arange(width, device=device) < counts[:, None]
    out = {"boxes": torch.where(is_det[:, :, None], cand_boxes.gather(1, pos[:, :, None].expand(b, width, 4)), 0.0),
           "scores": torch.where(is_det, cand_scores.gather(1, pos), 0.0),
           "labels": torch.where(is_det, cand_labels.gather(1, pos), 0)}
    if width < d:  # fewer candidates than detection slots: pad to D rows
        out = {key: F.pad(v, (0, 0, 0, d - width) if v.dim() == 3 else (0, d - width)) for key, v in out.items()}
    out["counts"] = counts
    out["truncated"] = (valid.sum(dim=1) > k) & (counts < d)
    return out


def trim(detections: dict[str, Tensor], image_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
    """Per-image dicts (``boxes``, ``labels``, ``scores``, ``masks``) of the first ``counts[i]``
    rows of padded detections; ``image_sizes`` crops image i's masks to its size. One host
    sync (the counts, and the ``truncated`` flags with them), at the user's boundary; warns
    when an image was truncated (see :meth:`RoIHeads.postprocess_padded`)."""
    counts = detections["counts"]
    if "truncated" in detections:
        counts, truncated = torch.stack([counts, detections["truncated"].to(counts.dtype)]).tolist()  # host sync
        if any(truncated):
            warnings.warn(f"images {[i for i, t in enumerate(truncated) if t]}: more candidates passed the score "
                          "threshold than the box head's NMS takes (box_candidates_per_img), and fewer than "
                          "box_detections_per_img of those it took survived; their detections may differ from "
                          "torchvision's. Raise box_candidates_per_img.", stacklevel=2)
    else:
        counts = counts.tolist()  # host sync: the per-image lengths
    out = []
    for i, c in enumerate(counts):
        det = {k: detections[k][i, :c] for k in ("boxes", "labels", "scores", "masks") if k in detections}
        if image_sizes is not None and "masks" in det:
            h, w = image_sizes[i]
            det["masks"] = det["masks"][..., :h, :w].contiguous()
        out.append(det)
    return out
