"""Public ops of fastmask: torchvision's semantics, Triton kernels on the GPU.

Every op takes ``backend=None | "auto" | "triton" | "torch"`` (see ``_backend``).
"""

from ._backend import BACKENDS, resolve_backend
from .anchors import AnchorGenerator
from .boxes import box_area, box_iou, clip_boxes_to_image, decode_boxes, encode_boxes, remove_small_boxes
from .masks import paste_masks
from .nms import batched_nms, nms, nms_keep_mask
from .roi_align import MultiScaleRoIAlign, multiscale_roi_align, roi_align

__all__ = [
    "BACKENDS", "resolve_backend",
    "AnchorGenerator",
    "box_area", "box_iou", "clip_boxes_to_image", "decode_boxes", "encode_boxes", "remove_small_boxes",
    "paste_masks",
    "batched_nms", "nms", "nms_keep_mask",
    "MultiScaleRoIAlign", "multiscale_roi_align", "roi_align",
]
