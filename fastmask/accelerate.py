"""Run an existing torchvision detection model on fastmask's ops: ``fastmask.accelerate(model)``.

For users who already train and serve torchvision's ``MaskRCNN``, ``FasterRCNN`` or
``KeypointRCNN`` (any builder, any backbone): one call swaps, in place and reversibly, the
hot paths where fastmask has a kernel, and leaves everything else (weights, backbone, heads,
losses, the user's training loop) as it is.

What is swapped (each only where the model holds torchvision's own component):

- ``roi_heads.box_roi_pool`` / ``mask_roi_pool`` / ``keypoint_roi_pool``: torchvision's
  ``MultiScaleRoIAlign`` -> :class:`fastmask.ops.MultiScaleRoIAlign` (one launch for all levels,
  differentiable);
- the RPN's proposal step: anchors (:class:`fastmask.ops.AnchorGenerator`, the same anchors),
  box decoding, clipping, small-box and score filtering, per-level NMS and top-k ->
  :func:`fastmask.ops.rpn_proposals` (one fused kernel and a keep-mask NMS); its losses stay
  torchvision's code;
- the box head's post-processing (decode, per-class NMS, top detections) -> fastmask's
  sync-free :func:`fastmask.models.roi_heads.postprocess_padded`;
- mask paste in the transform's post-processing -> :func:`fastmask.ops.paste_masks`.

The outputs equal the unaccelerated model's within the ops' parity tolerances (NMS keeps the
same boxes up to exactly tied scores). ``handle.undo()`` restores the original components
(the model's outputs are then bit-identical to before). torchvision is imported only when
this is called, to recognise what it was given.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastmask import ops
from fastmask.models.roi_heads import postprocess_padded, trim
from fastmask.ops._backend import check_backend_name
from fastmask.ops._device import to_device_async

__all__ = ["accelerate", "Acceleration"]

_MISSING = object()


@dataclass
class Acceleration:
    """What :func:`accelerate` swapped in a model, and how to take it back."""

    model: nn.Module
    swapped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # components left as they were, with the reason
    _undo: list[tuple[object, str, object]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Put every swapped component back (in reverse order); the model is then as before."""
        for obj, name, original in reversed(self._undo):
            if original is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, original)
        self._undo.clear()
        self.swapped.clear()
        self.model.__dict__.pop("_fastmask_acceleration", None)

    def summary(self) -> str:
        lines = [f"fastmask.accelerate({type(self.model).__name__}): {len(self.swapped)} swapped"]
        lines += [f"  swapped: {s}" for s in self.swapped] + [f"  kept: {k}" for k in self.kept]
        return "\n".join(lines)

    def _replace(self, obj, name: str, expected: type, make, what: str) -> None:
        """Swap ``obj.name`` for ``make(it)`` when it is exactly torchvision's ``expected``
        (a subclass may behave otherwise: kept, and reported); absent: nothing."""
        current = getattr(obj, name, None)
        if current is None:
            return
        if type(current) is expected:
            self._set(obj, name, make(current), f"{what}: {expected.__name__}")
        else:
            self.kept.append(f"{what}: {type(current).__name__} is not torchvision's {expected.__name__}")

    def _set(self, obj, name: str, value, what: str) -> None:
        """``obj.name = value``, remembering what to restore: a submodule, an instance attribute,
        or nothing (a method of the class, uncovered again by deleting the override)."""
        modules = getattr(obj, "_modules", {})
        original = modules[name] if name in modules else obj.__dict__.get(name, _MISSING)
        self._undo.append((obj, name, original))
        setattr(obj, name, value)
        self.swapped.append(what)


def accelerate(model: nn.Module, *, backend: str | None = None, verbose: bool = False) -> Acceleration:
    """Swap fastmask's ops into a torchvision detection model, in place (see the module docs).

    Args:
        model: a ``torchvision.models.detection`` ``MaskRCNN``, ``FasterRCNN`` or
            ``KeypointRCNN`` (any subclass of its ``GeneralizedRCNN``), in any mode.
        backend: the ops' backend (None, "auto", "triton", "torch"; see ``fastmask.ops``).
        verbose: print what was swapped and what was kept.

    Returns an :class:`Acceleration`: ``.swapped``, ``.kept``, ``.summary()`` and ``.undo()``.
    Raises TypeError for anything that is not such a model and ValueError for a model already
    accelerated (undo it first).
    """
    try:
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.roi_heads import RoIHeads
        from torchvision.models.detection.rpn import AnchorGenerator as TVAnchorGenerator
        from torchvision.models.detection.rpn import RegionProposalNetwork
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign
    except ImportError as e:
        raise TypeError("accelerate takes a torchvision detection model, and torchvision is not installed") from e
    if backend is not None:
        check_backend_name(backend)
    if not isinstance(model, GeneralizedRCNN):
        raise TypeError(f"accelerate takes a torchvision MaskRCNN, FasterRCNN or KeypointRCNN, got "
                        f"{type(model).__name__}; fastmask's own models use fastmask's ops already")
    if "_fastmask_acceleration" in model.__dict__:
        raise ValueError("this model is accelerated already; call .undo() on its Acceleration first")
    acc = Acceleration(model)

    heads = model.roi_heads
    if isinstance(heads, RoIHeads):
        for name in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
            acc._replace(heads, name, TVMultiScaleRoIAlign, lambda pool: _roi_pool(pool, backend), f"roi_heads.{name}")
        acc._set(heads, "postprocess_detections", types.MethodType(_make_postprocess(backend), heads),
                 "roi_heads.postprocess_detections: decode, per-class NMS, top detections")
    else:
        acc.kept.append(f"roi_heads: {type(heads).__name__} is not torchvision's RoIHeads")

    rpn = model.rpn
    if isinstance(rpn, RegionProposalNetwork):
        acc._replace(rpn, "anchor_generator", TVAnchorGenerator,
                     lambda gen: ops.AnchorGenerator(gen.sizes, gen.aspect_ratios, backend=backend),
                     "rpn.anchor_generator")
        acc._set(rpn, "forward", types.MethodType(_make_rpn_forward(backend), rpn),
                 "rpn proposals: decode, clip, filter, per-level NMS, top-k")
    else:
        acc.kept.append(f"rpn: {type(rpn).__name__} is not torchvision's RegionProposalNetwork")

    if isinstance(model.transform, GeneralizedRCNNTransform):
        acc._set(model.transform, "postprocess", types.MethodType(_make_transform_postprocess(backend),
                                                                  model.transform),
                 "transform.postprocess: mask paste")
    else:
        acc.kept.append(f"transform: {type(model.transform).__name__} is not torchvision's")
    model.__dict__["_fastmask_acceleration"] = acc
    if verbose:
        print(acc.summary())
    return acc


def _roi_pool(pool, backend) -> nn.Module:
    return ops.MultiScaleRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio,
                                  canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level,
                                  backend=backend)


def _make_rpn_forward(backend):
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    def forward(self, images, features: dict[str, Tensor], targets=None):
        """torchvision's ``RegionProposalNetwork.forward`` with the proposal step on fastmask's
        fused op (the losses are torchvision's code)."""
        feats = list(features.values())
        objectness, pred_bbox_deltas = self.head(feats)
        gen = self.anchor_generator
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # fastmask's generator describes the anchors (the kernel computes those it needs);
        # the losses need them listed.
        anchors = gen.geometry(images, feats) if hasattr(gen, "geometry") and not self.training else gen(images, feats)
        boxes, _ = ops.rpn_proposals(objectness.detach(), pred_bbox_deltas.detach(), anchors, images.image_sizes,
                                     num_anchors_per_level, pre_nms_top_n=self.pre_nms_top_n(),
                                     post_nms_top_n=self.post_nms_top_n(), nms_thresh=self.nms_thresh,
                                     score_thresh=self.score_thresh, min_size=self.min_size, backend=backend)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(objectness, pred_bbox_deltas, labels,
                                                                  regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses

    return forward


def _make_postprocess(backend):
    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]):
        """torchvision's ``RoIHeads.postprocess_detections`` on fastmask's padded path: the
        per-image lists padded to [B, M], processed without a host sync, trimmed at the end."""
        counts = [len(p) for p in proposals]
        b, m, device = len(proposals), max(counts, default=0), class_logits.device
        # Row r of image i goes to row i * m + r of the padded layout.
        rows = torch.cat([torch.arange(c, device=device) + i * m for i, c in enumerate(counts)])

        def padded(t: Tensor) -> Tensor:
            return t.new_zeros((b * m, t.shape[1])).index_copy_(0, rows, t)

        boxes = padded(torch.cat(proposals).to(box_regression.dtype)).view(b, m, 4)
        det = postprocess_padded(padded(class_logits), padded(box_regression), boxes,
                                 to_device_async(counts, torch.int64, device), image_shapes, box_weights=self.box_coder.weights,
                                 bbox_xform_clip=self.box_coder.bbox_xform_clip, score_thresh=self.score_thresh,
                                 nms_thresh=self.nms_thresh, detections_per_img=self.detections_per_img,
                                 backend=backend)
        out = trim(det)
        return [d["boxes"] for d in out], [d["scores"] for d in out], [d["labels"] for d in out]

    return postprocess_detections


def _make_transform_postprocess(backend):
    from torchvision.models.detection.transform import resize_boxes, resize_keypoints

    def postprocess(self, result, image_shapes, original_image_sizes):
        """torchvision's ``GeneralizedRCNNTransform.postprocess`` with fastmask's mask paste."""
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "masks" in pred:
                pred["masks"] = ops.paste_masks(pred["masks"], pred["boxes"], tuple(o_im_s), padding=1,
                                                backend=backend)
            if "keypoints" in pred:
                pred["keypoints"] = resize_keypoints(pred["keypoints"], im_s, o_im_s)
        return result

    return postprocess

