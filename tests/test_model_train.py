"""Training: the five losses equal torchvision's for the same weights, images, targets and
seed (the samplers draw the same random numbers in the same order), gradients reach every
trainable parameter and agree with torchvision's, frozen stages stay frozen, and the
``norm`` options train.
"""

import pytest
import torch
import torchvision
from helpers import assert_close_verbose
from test_model_common import SMALL, capture_proposals, make_image, make_target, torchvision_mask_rcnn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

from fastmask.models import build_mask_rcnn, maskrcnn_resnet50_fpn

LOSS_NAMES = ["loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"]
NUM_CLASSES = 5
# Smaller samples than torchvision's 256 / 512 keep the run short; the code paths are the same.
TRAIN_KW = dict(SMALL, rpn_batch_size_per_image=64, box_batch_size_per_image=64, rpn_pre_nms_top_n_train=300,
                rpn_post_nms_top_n_train=200)

# A ResNet-18 on ~100-pixel images with few proposals: enough to run every code path quickly.
TINY_KW = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
               rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=32,
               box_batch_size_per_image=16, box_detections_per_img=5)


@pytest.fixture(scope="module")
def train_pair():
    tv = torchvision_mask_rcnn(NUM_CLASSES, seed=0, **TRAIN_KW).train()
    ours = maskrcnn_resnet50_fpn(num_classes=NUM_CLASSES, backend="torch", **TRAIN_KW).train()
    ours.load_state_dict(tv.state_dict(), strict=True)
    g = torch.Generator().manual_seed(7)
    images = [make_image(200, 260, g), make_image(180, 240, g)]
    # The second image has no objects: it must train (all its samples are background).
    targets = [make_target(200, 260, 3, NUM_CLASSES, g), make_target(180, 240, 0, NUM_CLASSES, g)]
    results = {}
    for name, model in (("tv", tv), ("ours", ours)):
        model.zero_grad()
        torch.manual_seed(123)
        losses = model(images, targets)
        sum(losses.values()).backward()
        results[name] = losses
    return dict(tv=tv, ours=ours, losses=results, images=images, targets=targets)


def test_losses_equal_torchvision(train_pair):
    expected, got = train_pair["losses"]["tv"], train_pair["losses"]["ours"]
    assert list(got) == LOSS_NAMES
    diffs = {}
    for k in LOSS_NAMES:
        assert got[k].dim() == 0 and torch.isfinite(got[k])
        assert_close_verbose(got[k].detach(), expected[k].detach(), 1e-6, 1e-5, k)
        diffs[k] = (got[k] - expected[k]).abs().item()
    assert got["loss_box_reg"] > 0 and got["loss_mask"] > 0 and got["loss_rpn_box_reg"] > 0
    print("\nlargest |ours - torchvision| per loss: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))


def test_gradients_reach_every_trainable_parameter(train_pair):
    ours, tv = train_pair["ours"], train_pair["tv"]
    tv_params = dict(tv.named_parameters())
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert {n for n, _ in trainable} == {n for n, p in tv_params.items() if p.requires_grad}
    worst = 0.0
    for name, p in trainable:
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
        ref = tv_params[name].grad
        scale = ref.abs().max().item()
        err = (p.grad - ref).abs().max().item()
        assert err <= 1e-3 * scale + 1e-7, f"{name}: gradient differs from torchvision's by {err:.3g} (max {scale:.3g})"
        worst = max(worst, err / max(scale, 1e-30))
    print(f"\nlargest gradient difference relative to the tensor's max: {worst:.3g}")
    frozen = [n for n, p in ours.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in frozen)


@pytest.mark.parametrize("trainable_layers", [0, 3, 5])
def test_trainable_layers_as_torchvision(trainable_layers):
    ours = build_mask_rcnn(3, backbone="resnet18", norm="bn", trainable_layers=trainable_layers)
    tv = _resnet_fpn_extractor(torchvision.models.resnet18(), trainable_layers)
    want = {"backbone." + n for n, p in tv.named_parameters() if p.requires_grad}
    got = {n for n, p in ours.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert got == want


@pytest.mark.parametrize("norm", ["gn", "bn"])  # frozen_bn: the other tests
def test_norm_options_train(norm):
    torch.manual_seed(0)
    model = build_mask_rcnn(4, backbone="resnet18", norm=norm, trainable_layers=5, **TINY_KW)
    kinds = {type(m).__name__ for m in model.backbone.body.modules()}
    assert {"gn": "GroupNorm", "bn": "BatchNorm2d"}[norm] in kinds and "FrozenBatchNorm2d" not in kinds
    g = torch.Generator().manual_seed(1)
    images = [make_image(96, 128, g), make_image(80, 100, g)]
    targets = [make_target(96, 128, 2, 4, g), make_target(80, 100, 1, 4, g)]
    model.train()
    losses = model(images, targets)
    assert list(losses) == LOSS_NAMES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    norm_params = [p for m in model.backbone.body.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))
                   for p in m.parameters()]
    assert norm_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in norm_params)


def test_batch_without_any_object_trains():
    torch.manual_seed(0)
    model = build_mask_rcnn(3, backbone="resnet18", **dict(TINY_KW, min_size=64, max_size=96)).train()
    g = torch.Generator().manual_seed(2)
    images = [make_image(64, 80, g), make_image(70, 64, g)]
    targets = [make_target(64, 80, 0, 3, g), make_target(70, 64, 0, 3, g)]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0 and losses["loss_rpn_box_reg"] == 0
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0
    sum(losses.values()).backward()


def test_autocast_keeps_boxes_in_fp32():
    """Under bf16 autocast the convolutions run in bf16 but anchors, proposals and decoded boxes
    stay fp32 (bf16 cannot hold pixel coordinates above 256 exactly)."""
    torch.manual_seed(0)
    model = build_mask_rcnn(3, backbone="resnet18", box_score_thresh=0.0,
                            **dict(TINY_KW, min_size=48, max_size=64)).eval()
    g = torch.Generator().manual_seed(4)
    store = {}
    capture_proposals(model, store, "proposals")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([make_image(48, 64, g)])
    assert store["proposals"][0].dtype == torch.float32 and len(store["proposals"][0]) > 0
    assert out[0]["boxes"].dtype == torch.float32 and out[0]["scores"].dtype == torch.float32
    assert len(out[0]["boxes"]) > 0 and out[0]["masks"].dtype == torch.float32


def test_frozen_batchnorm_cache_follows_its_buffers():
    """The cached scale and shift give torchvision's FrozenBatchNorm2d bitwise, and are renewed
    when a buffer is modified in place, reloaded or converted; gradients flow to the input."""
    from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

    from fastmask.models.resnet import FrozenBatchNorm2d

    ours, tv = FrozenBatchNorm2d(8, eps=0.0), TVFrozenBN(8, eps=0.0)
    g = torch.Generator().manual_seed(0)
    state = {"weight": torch.randn(8, generator=g), "bias": torch.randn(8, generator=g),
             "running_mean": torch.randn(8, generator=g), "running_var": torch.rand(8, generator=g) + 0.1}
    x = torch.randn(2, 8, 5, 5, generator=g)
    changes = [lambda m: m.load_state_dict(state), lambda m: m.running_var.mul_(2),
               lambda m: m.load_state_dict({k: v * 3 for k, v in state.items()}), lambda m: m.double()]
    for i, change in enumerate(changes):
        change(ours)
        change(tv)
        xi = x.to(ours.weight.dtype)
        with torch.inference_mode():
            ours(xi)  # a call in inference mode must not leave an inference tensor in the cache
        assert torch.equal(ours(xi), tv(xi)), f"after change {i}"
    xg = x.double().requires_grad_()
    ours(xg).sum().backward()
    assert xg.grad is not None and torch.equal(xg.grad, ours._affine()[0].expand_as(xg))
