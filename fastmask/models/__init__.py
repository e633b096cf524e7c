"""The hand-written Mask R-CNN: ResNet-FPN backbone, RPN, RoI heads, input transform.

Built on ``fastmask.ops`` only; ``state_dict()`` matches torchvision's ``maskrcnn_resnet50_fpn``.
"""

from .fpn import FeaturePyramidNetwork, ResNetFPN
from .mask_rcnn import MaskRCNN, build_mask_rcnn, load_weights, maskrcnn_resnet50_fpn
from .resnet import FrozenBatchNorm2d, ResNet
from .roi_heads import RoIHeads, RoIHeadsConfig
from .rpn import RegionProposalNetwork, RPNConfig
from .transform import ImageList, RCNNTransform, TransformConfig

__all__ = [
    "MaskRCNN", "build_mask_rcnn", "load_weights", "maskrcnn_resnet50_fpn",
    "ResNet", "FrozenBatchNorm2d", "ResNetFPN", "FeaturePyramidNetwork",
    "RegionProposalNetwork", "RPNConfig", "RoIHeads", "RoIHeadsConfig",
    "RCNNTransform", "TransformConfig", "ImageList",
]
