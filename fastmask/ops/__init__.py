"""Public ops of fastmask: torchvision's semantics, Triton kernels on the GPU.

Every op takes ``backend=None | "auto" | "triton" | "torch"`` (see ``_backend``).
"""

from ._backend import BACKENDS, resolve_backend
from .anchors import AnchorGenerator, AnchorGeometry
from .boxes import box_area, box_iou, clip_boxes_to_image, decode_boxes, encode_boxes, remove_small_boxes
from .masks import BoxMasks, paste_masks, paste_masks_in_boxes
from .nms import batched_nms, nms, nms_keep_mask
from .proposals import rpn_proposals, rpn_proposals_padded
from .roi_align import MultiScaleRoIAlign, multiscale_roi_align, roi_align

__all__ = [
    "BACKENDS", "resolve_backend",
    "AnchorGenerator", "AnchorGeometry",
    "box_area", "box_iou", "clip_boxes_to_image", "decode_boxes", "encode_boxes", "remove_small_boxes",
    "BoxMasks", "paste_masks", "paste_masks_in_boxes",
    "batched_nms", "nms", "nms_keep_mask",
    "rpn_proposals", "rpn_proposals_padded",
    "MultiScaleRoIAlign", "multiscale_roi_align", "roi_align",
]
