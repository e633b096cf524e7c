"""Shared helpers of the model tests (test_model_*.py); this module holds no tests.

- images that look like photographs at a small scale: a smooth colour field with a few
  filled ellipses and a little noise (pure noise would make every proposal alike);
- a seeded torchvision Mask R-CNN whose random weights give varied, non-degenerate outputs;
- ground-truth targets with boxes and masks that agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

# Small inputs: short side 224, long side at most 320 (the batch pads to 224x320 or 320x224).
SMALL = dict(min_size=224, max_size=320)


def make_image(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Float Tensor[3, h, w] in [0, 1]: smooth background, five textured ellipses, mild noise."""
    base = F.interpolate(torch.rand(1, 3, 4, 5, generator=g), size=(h, w), mode="bicubic", align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    img = base * 0.6 + 0.2
    for _ in range(5):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        ry, rx = ((0.1 + 0.25 * torch.rand(2, generator=g)) * torch.tensor([h, w])).tolist()
        color = torch.rand(3, 1, 1, generator=g)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = torch.where(inside, color * (0.8 + 0.2 * torch.cos(xx / 7 + yy / 11)), img)
    return (img + 0.02 * torch.randn(3, h, w, generator=g)).clamp(0, 1)


def make_target(h: int, w: int, n: int, num_classes: int, g: torch.Generator) -> dict:
    """``n`` objects: boxes inside the image, uint8 masks filling an ellipse in each box."""
    boxes = []
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    for j in range(n):
        x1, y1 = (torch.rand(2, generator=g) * torch.tensor([w * 0.6, h * 0.6])).tolist()
        bw, bh = (torch.rand(2, generator=g) * torch.tensor([w * 0.35, h * 0.35]) + 16).tolist()
        x2, y2 = min(x1 + bw, w), min(y1 + bh, h)
        boxes.append([x1, y1, x2, y2])
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks[j] = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).to(torch.uint8)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.randint(1, num_classes, (n,), generator=g), "masks": masks}


def randomize_(model: torch.nn.Module, g: torch.Generator) -> None:
    """Make a freshly initialised Mask R-CNN's outputs varied (works on torchvision's and ours:
    the module names are the same).

    FrozenBatchNorm statistics are drawn around a contracting scale so that features neither
    vanish nor explode through 50 layers; the RPN objectness and the class scores are
    scaled up so that scores are spread (a fresh RPN gives sigmoid(~0) = 0.5 to every anchor,
    and equal scores leave the order of proposals to the sort's tie-breaking).
    """
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__ == "FrozenBatchNorm2d":
                c = mod.weight.shape[0]
                mod.weight.copy_(0.3 + 0.4 * torch.rand(c, generator=g))
                mod.bias.copy_(0.1 * torch.randn(c, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
        head = model.rpn.head
        head.cls_logits.weight.copy_(0.3 * torch.randn(head.cls_logits.weight.shape, generator=g))
        head.cls_logits.bias.copy_(torch.randn(head.cls_logits.bias.shape, generator=g))
        head.bbox_pred.weight.mul_(5.0)
        pred = model.roi_heads.box_predictor
        pred.cls_score.weight.mul_(20.0)
        pred.cls_score.bias.copy_(0.3 * torch.randn(pred.cls_score.bias.shape, generator=g))


def torchvision_mask_rcnn(num_classes: int, seed: int = 0, **kwargs) -> TVMaskRCNN:
    """torchvision's Mask R-CNN R50-FPN as ``maskrcnn_resnet50_fpn`` builds it for a pretrained
    backbone (FrozenBatchNorm, last three stages trainable), seeded and randomised."""
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    model = TVMaskRCNN(backbone, num_classes=num_classes, **kwargs)
    randomize_(model, torch.Generator().manual_seed(seed + 1))
    return model


def capture_proposals(model: torch.nn.Module, store: dict, key: str):
    """Record the RPN's proposals (per-image lists) in ``store[key]`` on every call: its forward's
    first output, or, for fastmask's inference path, what ``propose_padded`` returns, trimmed."""
    if not hasattr(model.rpn, "propose_padded"):
        return model.rpn.register_forward_hook(lambda m, i, o: store.__setitem__(key, [p.detach() for p in o[0]]))
    propose = model.rpn.propose_padded

    def recorded(*args, **kwargs):
        boxes, counts = propose(*args, **kwargs)
        store[key] = [b[:c].detach() for b, c in zip(boxes, counts.tolist())]
        return boxes, counts

    model.rpn.propose_padded = recorded
    return recorded
