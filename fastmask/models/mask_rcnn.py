"""Mask R-CNN assembled from its parts, the builders, and checkpoint loading for fine-tuning.

:class:`MaskRCNN` composes a transform, a backbone (ResNet-FPN by default), an RPN and RoI
heads; its ``state_dict`` equals torchvision's ``maskrcnn_resnet50_fpn`` key for key, so
torchvision checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import OrderedDict
from typing import Mapping

import torch
from torch import Tensor, nn

from fastmask import ops
from fastmask.ops._backend import check_backend_name

from .fpn import FPN_CHANNELS, ResNetFPN
from .resnet import NORMS
from .roi_heads import MASK_HEAD_CHANNELS, REPRESENTATION_SIZE, RoIHeads, RoIHeadsConfig, trim
from .rpn import RegionProposalNetwork, RPNConfig
from .transform import MASK_PASTE_PADDING, RCNNTransform, TransformConfig, check_images, check_targets

log = logging.getLogger(__name__)

BACKBONES = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)  # MaskRCNN.autocast_dtype
MASK_OUTPUTS = ("image", "box")  # MaskRCNN.mask_output
# Parameters whose shapes depend on the number of classes: the only ones a fine-tuning load
# may skip.
CLASS_DEPENDENT_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


class MaskRCNN(nn.Module):
    """Mask R-CNN: ``transform -> backbone -> rpn -> roi_heads -> transform.postprocess``.

    ``model(images)`` in eval mode: ``images`` is a list of float Tensor[3, H, W] in [0, 1];
    returns one dict per image with ``boxes`` Tensor[N, 4] ``(x1, y1, x2, y2)`` in the
    image's pixels, ``labels`` int64 Tensor[N], ``scores`` Tensor[N] and ``masks``
    Tensor[N, 1, H, W]: probabilities, or bool ``probability > mask_threshold`` when the model
    was built with a ``mask_threshold``.

    ``model(images, targets)`` in training mode: ``targets`` has one dict per image with
    ``boxes`` float Tensor[K, 4], ``labels`` int64 Tensor[K] and ``masks`` Tensor[K, H, W]
    (uint8/bool); returns ``loss_classifier``, ``loss_box_reg``, ``loss_mask``,
    ``loss_objectness`` and ``loss_rpn_box_reg``.
    """

    def __init__(self, backbone: nn.Module, transform: RCNNTransform, rpn: RegionProposalNetwork,
                 roi_heads: RoIHeads, mask_threshold: float | None = None, *, channels_last: bool = False,
                 autocast_dtype: torch.dtype | None = None, mask_output: str = "image"):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.mask_threshold = mask_threshold
        self._channels_last = False
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        self.mask_output = mask_output

    @property
    def mask_output(self) -> str:
        """How ``model(images)`` returns masks: ``"image"`` (Tensor[N, 1, H, W], the input
        image's size, as torchvision) or ``"box"`` (``fastmask.ops.BoxMasks``: each mask pasted
        into its own box only, with its window in the image; no full-image mask is made, e.g.
        100 bool masks at 800x1333 are 107 MB). ``forward_padded`` always pastes full images."""
        return self._mask_output

    @mask_output.setter
    def mask_output(self, value: str) -> None:
        if value not in MASK_OUTPUTS:
            raise ValueError(f"mask_output must be one of {MASK_OUTPUTS}, got {value!r}")
        self._mask_output = value

    @property
    def channels_last(self) -> bool:
        """Run the convolutions on channels-last (NHWC) tensors: the batch and every 4-d weight
        are stored channels-last. Setting it converts the weights in place (as
        ``model.to(memory_format=...)``); a ``state_dict`` is the same either way."""
        return self._channels_last

    @channels_last.setter
    def channels_last(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"channels_last must be a bool, got {value!r}")
        if value != self._channels_last:
            self.to(memory_format=torch.channels_last if value else torch.contiguous_format)
        self._channels_last = value

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """None (full precision), ``torch.bfloat16`` or ``torch.float16``: inference runs the
        backbone and heads under ``torch.autocast`` in this dtype (boxes, scores and mask
        probabilities are still computed and returned in fp32). Training is unaffected: mixed
        precision there is the trainer's ``--amp``."""
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, value: torch.dtype | None) -> None:
        if value not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {AUTOCAST_DTYPES}, got {value!r}")
        self._autocast_dtype = value

    def set_backend(self, backend: str | None) -> "MaskRCNN":
        """Switch every op of the model to ``backend`` (None, "auto", "triton" or "torch")."""
        if backend is not None:
            check_backend_name(backend)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        check_images(images)
        if not self.training:  # targets are not used for inference, as torchvision
            sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            if self._mask_output == "image":
                return trim(self._detect(images), sizes)
            detections = trim(self._detect(images, paste=False))
            for det, size in zip(detections, sizes):  # one host read per image: the largest box
                det["masks"] = ops.paste_masks_in_boxes(det["masks"], det["boxes"], MASK_PASTE_PADDING,
                                                        self.mask_threshold, size, backend=self.transform.backend)
            return detections
        check_targets(targets, images)
        image_list, targets = self.transform(images, targets)
        features = self._features(image_list)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        _, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**roi_losses, **rpn_losses}

    def forward_padded(self, images: list[Tensor] | Tensor) -> dict[str, Tensor]:
        """Inference with static shapes and no host sync: the path ``model(images)`` takes,
        before it trims the padding.

        ``images``: a list of float Tensor[3, H, W] in [0, 1], or a batch Tensor[B, 3, H, W].
        Returns a dict of tensors, D = ``box_detections_per_img``: ``boxes`` Tensor[B, D, 4],
        ``labels`` int64 Tensor[B, D], ``scores`` Tensor[B, D], ``masks`` Tensor[B, D, 1, H, W]
        (H, W the largest image size; image i's masks fill its own size), ``counts`` int64
        Tensor[B] (image i's detections are its first ``counts[i]`` rows, by decreasing
        score; the other rows are zeros), and ``truncated`` bool Tensor[B] (see
        ``RoIHeads.postprocess_padded``). Each output's shape depends only on the input shapes,
        so this path compiles with ``fullgraph=True``, exports with ``torch.export`` and
        runs in a CUDA graph (``fastmask.inference``). ``fastmask.models.roi_heads.trim``
        gives ``model(images)``'s lists.
        """
        if self.training:
            raise RuntimeError("forward_padded is for inference: call model.eval() first")
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be a list of Tensor[3, H, W] or a Tensor[B, 3, H, W], got "
                                 f"shape {tuple(images.shape)}")
            images = list(images.unbind(0))
        check_images(images)
        return self._detect(images)

    def _detect(self, images: list[Tensor], paste: bool = True) -> dict[str, Tensor]:
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, _ = self.transform(images)
        with self._autocast(images[0].device):
            features = self._features(image_list)
            proposals, counts = self.rpn.propose_padded(image_list, features)
            detections = self.roi_heads.detect(features, proposals, counts, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes, self.mask_threshold,
                                          paste=paste)

    def _features(self, image_list) -> dict[str, Tensor]:
        batch = image_list.tensors
        if self._channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.backbone(batch)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return features

    def _autocast(self, device: torch.device):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        # No cast cache: a graph capture would free the cached casts when the region ends (the
        # CUDA graph notes' rule); at inference each weight is cast about once per call anyway.
        return torch.autocast(device.type, dtype=self._autocast_dtype, cache_enabled=False)


def _pop_config(cls, kwargs: dict, prefix: str, renames: Mapping[str, str] | None = None):
    """Dataclass ``cls`` from the keyword arguments named ``prefix + field`` (or ``renames[field]``),
    which are removed from ``kwargs``."""
    values = {}
    for f in dataclasses.fields(cls):
        key = (renames or {}).get(f.name, prefix + f.name)
        if key in kwargs:
            values[f.name] = kwargs.pop(key)
    return cls(**values)


def build_mask_rcnn(num_classes: int = 91, *, backbone: str | nn.Module = "resnet50", norm: str = "frozen_bn",
                    trainable_layers: int = 3, backend: str | None = None, **kwargs) -> MaskRCNN:
    """Build a Mask R-CNN.

    Args:
        num_classes: classes including the background (91 for COCO's category ids).
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"`` (with an
            FPN on top), or your own module: it maps Tensor[B, 3, H, W] to an OrderedDict of
            feature maps (finest first; a single Tensor counts as ``"0"``) with an
            ``out_channels`` attribute. When it does not return the five FPN maps, pass
            ``rpn_anchor_sizes`` / ``rpn_aspect_ratios`` (one entry per map) and
            ``box_roi_pool`` / ``mask_roi_pool`` (e.g. ``ops.MultiScaleRoIAlign(["0"], 7, 2)``
            and ``(["0"], 14, 2)``; the default pools from ``"0".."3"``).
        norm: backbone normalisation, ``"frozen_bn"``, ``"bn"`` or ``"gn"`` (see ``resnet``).
        trainable_layers: ResNet stages trained, counted from the last (0..5; torchvision's 3).
        backend: None, "auto", "triton" or "torch", passed to every op.
        **kwargs: torchvision's ``MaskRCNN`` keyword arguments with its defaults: ``min_size``,
            ``max_size``, ``image_mean``, ``image_std``, ``size_divisible``, ``fixed_size``,
            ``rpn_pre_nms_top_n_train``/``_test``, ``rpn_post_nms_top_n_train``/``_test``,
            ``rpn_nms_thresh``, ``rpn_fg_iou_thresh``, ``rpn_bg_iou_thresh``,
            ``rpn_batch_size_per_image``, ``rpn_positive_fraction``, ``rpn_score_thresh``,
            ``rpn_anchor_generator``, ``box_roi_pool``, ``mask_roi_pool`` (modules),
            ``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``,
            ``box_fg_iou_thresh``, ``box_bg_iou_thresh``, ``box_batch_size_per_image``,
            ``box_positive_fraction``, ``bbox_reg_weights``; and
            ``rpn_anchor_sizes``, ``rpn_aspect_ratios``, ``mask_threshold`` (None: float masks),
            ``frozen_bn_eps`` (1e-5; torchvision's COCO checkpoint was made with 0.0);
            ``box_candidates_per_img`` (4096: candidates per image sent to the box head's NMS,
            see ``RoIHeads.postprocess_padded``); ``channels_last`` (False) and
            ``autocast_dtype`` (None, ``torch.bfloat16`` or ``torch.float16``) and
            ``mask_output`` (``"image"`` or ``"box"``), the inference settings of :class:`MaskRCNN`.
        Head sizes (defaults keep torchvision's layout; smaller ones make a lighter model
        that trains from scratch but no longer loads torchvision checkpoints):
        ``fpn_channels`` (256; only with a named backbone), ``box_head_dim`` (1024),
        ``mask_head_channels`` ((256,) * 4), ``head_norm`` (None or ``"gn"``: GroupNorm after
        every FPN and mask-head convolution).
    """
    if backend is not None:
        check_backend_name(backend)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    kwargs = dict(kwargs)
    mask_threshold = kwargs.pop("mask_threshold", None)
    channels_last = kwargs.pop("channels_last", False)
    autocast_dtype = kwargs.pop("autocast_dtype", None)
    mask_output = kwargs.pop("mask_output", "image")
    frozen_bn_eps = kwargs.pop("frozen_bn_eps", 1e-5)
    fpn_channels = kwargs.pop("fpn_channels", None)
    head_norm = kwargs.pop("head_norm", None)
    box_head_dim = kwargs.pop("box_head_dim", REPRESENTATION_SIZE)
    mask_head_channels = tuple(kwargs.pop("mask_head_channels", MASK_HEAD_CHANNELS))
    anchor_generator = kwargs.pop("rpn_anchor_generator", None)
    box_roi_pool, mask_roi_pool = kwargs.pop("box_roi_pool", None), kwargs.pop("mask_roi_pool", None)
    transform_cfg = _pop_config(TransformConfig, kwargs, "")
    rpn_cfg = _pop_config(RPNConfig, kwargs, "rpn_")
    roi_cfg = _pop_config(RoIHeadsConfig, kwargs, "box_", {"bbox_reg_weights": "bbox_reg_weights"})
    if kwargs:
        raise TypeError(f"build_mask_rcnn got unexpected keyword arguments {sorted(kwargs)}")

    if isinstance(backbone, str):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)} or an nn.Module, got {backbone!r}")
        width = FPN_CHANNELS if fpn_channels is None else fpn_channels
        backbone = ResNetFPN(BACKBONES[backbone], norm, trainable_layers, out_channels=width,
                             frozen_bn_eps=frozen_bn_eps, fpn_norm=head_norm)
    elif isinstance(backbone, nn.Module):
        if not isinstance(getattr(backbone, "out_channels", None), int):
            raise ValueError("a backbone module must have an int attribute out_channels (channels of its maps)")
        if fpn_channels is not None and fpn_channels != backbone.out_channels:
            raise ValueError(f"fpn_channels={fpn_channels} is for a named backbone; this backbone module "
                             f"has out_channels={backbone.out_channels}")
    else:
        raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
    channels = backbone.out_channels
    transform = RCNNTransform(transform_cfg, backend=backend)
    rpn = RegionProposalNetwork(channels, rpn_cfg, anchor_generator=anchor_generator, backend=backend)
    roi_heads = RoIHeads(channels, num_classes, roi_cfg, backend=backend, box_roi_pool=box_roi_pool,
                         mask_roi_pool=mask_roi_pool, box_head_dim=box_head_dim,
                         mask_head_channels=mask_head_channels, head_norm=head_norm)
    return MaskRCNN(backbone, transform, rpn, roi_heads, mask_threshold=mask_threshold, channels_last=channels_last,
                    autocast_dtype=autocast_dtype, mask_output=mask_output)


def maskrcnn_resnet50_fpn(num_classes: int = 91, backend: str | None = None, **kwargs) -> MaskRCNN:
    """Mask R-CNN with a ResNet-50-FPN backbone (frozen BatchNorm, last three stages trained),
    torchvision's ``maskrcnn_resnet50_fpn`` architecture and keyword arguments (see
    :func:`build_mask_rcnn`). Load torchvision weights with ``model.load_state_dict(sd)``."""
    kwargs.setdefault("trainable_layers", kwargs.pop("trainable_backbone_layers", 3))
    return build_mask_rcnn(num_classes, backbone="resnet50", backend=backend, **kwargs)


# --------------------------------------------------------------------------- checkpoints


def _read_state_dict(state_dict_or_path) -> dict[str, Tensor]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
    else:
        state = state_dict_or_path
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a fastmask training checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("the checkpoint must be a state dict (name -> tensor), or a dict holding one under 'model'")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def load_weights(model: nn.Module, state_dict_or_path, *, skip_mismatched: bool = True) -> list[str]:
    """Load a checkpoint (torchvision or fastmask format, a state dict or a file path) into
    ``model``, e.g. COCO weights (91 classes) into a model with another number of classes.

    The class-dependent predictor tensors whose shapes differ are skipped (kept at their
    initial values) when ``skip_mismatched``; the skipped names are logged and returned.
    Raises ValueError when the checkpoint is from another architecture (missing or
    unexpected keys, or other tensors of other shapes), naming a few of the keys.
    """
    state = _read_state_dict(state_dict_or_path)
    own = model.state_dict()
    # FrozenBatchNorm has no step counter; a checkpoint with trainable BatchNorm does.
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        parts = ([f"missing keys: {_few(missing)}"] if missing else []) + (
            [f"unexpected keys: {_few(unexpected)}"] if unexpected else [])
        raise ValueError("the checkpoint does not fit this model's architecture; " + "; ".join(parts))
    mismatched = sorted(k for k in own if state[k].shape != own[k].shape)
    not_skippable = [k for k in mismatched if not k.startswith(CLASS_DEPENDENT_PREFIXES)]
    if not_skippable:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in not_skippable[:5])
        raise ValueError(f"the checkpoint does not fit this model's architecture: shapes differ for {detail}")
    if mismatched and not skip_mismatched:
        raise ValueError(f"the checkpoint's predictor shapes differ from the model's ({_few(mismatched)}); pass "
                         "skip_mismatched=True to keep those tensors at their initial values")
    for k in mismatched:
        del state[k]
    model.load_state_dict(state, strict=False)
    if mismatched:
        log.info("load_weights: skipped %d tensors whose shapes differ (number of classes): %s", len(mismatched),
                 ", ".join(mismatched))
    return mismatched
