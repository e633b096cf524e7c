"""Region Proposal Network: head, anchors, proposal selection and the RPN losses.

Proposal selection is ``fastmask.ops.proposals.rpn_proposals``, torchvision's
``RegionProposalNetwork.filter_proposals`` for every image of the batch at once: per level
keep the ``pre_nms_top_n`` highest objectness logits, decode those anchors with their
deltas, clip to the image, drop boxes narrower or lower than ``min_size`` and scores below
``score_thresh``, run NMS per (image, level) and keep the ``post_nms_top_n`` best of what
survives.

Training matches every anchor to the ground truth (IoU >= ``fg_iou_thresh`` object,
< ``bg_iou_thresh`` background, best anchor of each object always positive), samples
``batch_size_per_image`` anchors per image with ``positive_fraction`` positives and returns
``loss_objectness`` (binary cross-entropy) and ``loss_rpn_box_reg`` (smooth L1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastmask import ops
from fastmask.ops.proposals import rpn_proposals, rpn_proposals_padded

from .losses import rpn_losses
from .sampling import Matcher, pad_boxes, sample_balanced
from .transform import ImageList

# Smallest proposal side kept, in pixels (torchvision's RPN min_size): removes boxes that
# decode to (nearly) zero width or height before NMS.
RPN_MIN_BOX_SIZE = 1e-3
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # the RPN regresses unweighted deltas (as rpn_proposals decodes)
FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))  # one size per level P2..P6
ANCHOR_ASPECT_RATIOS = (0.5, 1.0, 2.0)


@dataclass
class RPNConfig:
    """RPN settings, named and defaulted as torchvision's ``rpn_*`` keyword arguments."""

    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    score_thresh: float = 0.0
    anchor_sizes: tuple = FPN_ANCHOR_SIZES  # per feature map, finest first
    aspect_ratios: tuple = ANCHOR_ASPECT_RATIOS  # h / w; one tuple for all maps, or one per map


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then 1x1 convs for objectness (A per location) and deltas (4A).

    ``forward(features: list of Tensor[B, C, H_l, W_l]) -> (logits per level Tensor[B, A, H_l, W_l],
    deltas per level Tensor[B, 4A, H_l, W_l])``.
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        # Nested Sequential: parameter names conv.0.0.* as in torchvision's checkpoints.
        self.conv = nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1),
                                                nn.ReLU(inplace=True)))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for f in features:  # one pass per pyramid level (they differ in size), shared weights
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def full_precision(t: Tensor) -> Tensor:
    """``t`` in fp32 unless it is fp32/fp64 already: box coordinates and losses are computed in
    full precision under autocast (bf16 cannot even hold pixel coordinates above 256 exactly)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _anchor_grids(feats: list[Tensor]) -> list[Tensor]:
    """What the anchor generator reads of the feature maps: their grid sizes, device and dtype.

    Anchors take the maps' dtype; under autocast (fp16/bf16 maps) empty fp32 stand-ins with
    the same grid sizes make them fp32 without copying the maps."""
    return [f if f.dtype in (torch.float32, torch.float64)
            else f.new_empty((f.shape[0], 0, f.shape[2], f.shape[3]), dtype=torch.float32) for f in feats]


def flatten_levels(per_level: list[Tensor], values_per_anchor: int) -> Tensor:
    """Per level Tensor[B, A*V, H, W] -> Tensor[B, sum(H*W*A), V], ordered (level, y, x, anchor)
    as the anchors are."""
    out = []
    for t in per_level:
        b, _, h, w = t.shape
        out.append(t.view(b, -1, values_per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, values_per_anchor))
    return torch.cat(out, dim=1)


class RegionProposalNetwork(nn.Module):
    """``forward(images: ImageList, features: OrderedDict, targets=None) -> (proposals, losses)``.

    ``proposals``: one Tensor[P_i, 4] per image (at most ``post_nms_top_n``), sorted by
    decreasing objectness; ``losses``: ``loss_objectness`` and ``loss_rpn_box_reg`` in training,
    else empty. Targets must already be resized to the batch (as the transform returns them).
    """

    def __init__(self, in_channels: int, cfg: RPNConfig, anchor_generator: nn.Module | None = None,
                 head: nn.Module | None = None, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        if anchor_generator is None:
            anchor_generator = ops.AnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios, backend=backend)
        self.anchor_generator = anchor_generator
        self.head = RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0]) if head is None else head
        self.matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)
        self.backend = backend

    def _top_n(self, train: bool) -> tuple[int, int]:
        c = self.cfg
        return (c.pre_nms_top_n_train, c.post_nms_top_n_train) if train else (c.pre_nms_top_n_test,
                                                                              c.post_nms_top_n_test)

    def assign_targets(self, anchors: Tensor, gt_boxes: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Match the anchors Tensor[A, 4] (shared by the images) to each image's ground truth.

        Returns labels Tensor[B, A] float (1 object, 0 background, -1 ignored), the index of
        each anchor's ground truth int64 Tensor[B, A] (meaningful where the label is 1) and the
        ground truth padded to Tensor[B, G, 4].
        """
        gt, gt_valid = pad_boxes(gt_boxes, anchors.dtype)
        matches = self.matcher(ops.box_iou(gt, anchors[None]), gt_valid)
        labels = (matches >= 0).to(anchors.dtype)
        labels = torch.where(matches == Matcher.BETWEEN_THRESHOLDS, -1.0, labels)
        return labels, matches.clamp(min=0), gt

    def _head(self, images: ImageList, features: dict[str, Tensor]):
        """The head's outputs flattened over levels (objectness Tensor[B, A], deltas
        Tensor[B, A, 4], in full precision), the anchors and the anchors per level."""
        feats = list(features.values())
        logits, deltas = self.head(feats)
        num_anchors_per_level = [level[0].numel() for level in logits]
        objectness = full_precision(flatten_levels(logits, 1)[..., 0])  # [B, A]
        deltas = full_precision(flatten_levels(deltas, 4))  # [B, A, 4]
        # fastmask's generator describes the anchors (the fused proposal kernel computes the
        # ones it needs); another generator lists them per image, as torchvision's does.
        gen = self.anchor_generator
        grids = _anchor_grids(feats)
        anchors = gen.geometry(images, grids) if hasattr(gen, "geometry") else gen(images, grids)
        return objectness, deltas, anchors, num_anchors_per_level

    def _select(self, select, objectness: Tensor, deltas: Tensor, anchors, images: ImageList,
                num_anchors_per_level: list[int]):
        pre_nms_top_n, post_nms_top_n = self._top_n(self.training)
        # Proposals are not back-propagated through (Faster R-CNN's approximate joint training).
        return select(objectness.detach(), deltas.detach(), anchors, images.image_sizes, num_anchors_per_level,
                      pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n, nms_thresh=self.cfg.nms_thresh,
                      score_thresh=self.cfg.score_thresh, min_size=RPN_MIN_BOX_SIZE, backend=self.backend)

    def propose_padded(self, images: ImageList, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Proposals with static shapes and no host sync: Tensor[B, M, 4] (image i's are its
        first ``counts[i]`` rows, by decreasing objectness) and counts int64 Tensor[B],
        M = ``post_nms_top_n`` (or fewer when the levels hold fewer candidates)."""
        objectness, deltas, anchors, per_level = self._head(images, features)
        boxes, _, counts = self._select(rpn_proposals_padded, objectness, deltas, anchors, images, per_level)
        return boxes, counts

    def forward(self, images: ImageList, features: dict[str, Tensor], targets: list[dict] | None = None):
        objectness, deltas, anchors, num_anchors_per_level = self._head(images, features)
        proposals, _ = self._select(rpn_proposals, objectness, deltas, anchors, images, num_anchors_per_level)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            # torchvision's anchors depend only on the padded batch size: every image has the same.
            anchors = anchors.anchors() if hasattr(anchors, "anchors") else anchors[0]
            labels, matched, gt = self.assign_targets(anchors, [t["boxes"] for t in targets])
            s = sample_balanced(labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction)
            # Regression targets of the sampled positives only (torchvision encodes every anchor
            # and then reads the positives; the values are the same).
            a = labels.shape[1]
            pos_gt = gt[s.pos // a, matched.reshape(-1)[s.pos]]
            pos_targets = ops.encode_boxes(pos_gt, anchors[s.pos % a], RPN_BOX_WEIGHTS, backend=self.backend)
            loss_objectness, loss_box = rpn_losses(objectness.reshape(-1), deltas.reshape(-1, 4), labels.reshape(-1),
                                                   pos_targets, s.pos, s.neg)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return proposals, losses
