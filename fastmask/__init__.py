"""fastmask: Mask R-CNN (ResNet-50-FPN) in PyTorch with Triton kernels for its hot paths.

``fastmask.maskrcnn_resnet50_fpn(num_classes=91, backend=None, **kwargs)`` builds the model
(torchvision's keyword arguments and checkpoints); ``fastmask.ops`` holds the ops.
"""

__version__ = "0.1.0"

from .models import MaskRCNN, build_mask_rcnn, load_weights, maskrcnn_resnet50_fpn  # noqa: E402

__all__ = ["MaskRCNN", "build_mask_rcnn", "load_weights", "maskrcnn_resnet50_fpn", "__version__"]
