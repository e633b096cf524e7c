"""Bad inputs raise ValueError/TypeError saying what is wrong; builder arguments; the
fine-tuning loader (``load_weights``) on fastmask checkpoints and wrong architectures."""

import logging

import pytest
import torch
from test_model_common import make_image, make_target

import fastmask
from fastmask.models import MaskRCNN, build_mask_rcnn, load_weights

KW = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mask_rcnn(3, backbone="resnet18", **KW)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    images = [make_image(64, 80, g), make_image(60, 72, g)]
    targets = [make_target(64, 80, 2, 3, g), make_target(60, 72, 1, 3, g)]
    return images, targets


@pytest.mark.parametrize("images, error, match", [
    (torch.rand(2, 3, 64, 64), ValueError, "list of Tensor"),
    ([], ValueError, "empty list"),
    ([torch.rand(64, 64)], ValueError, r"images\[0\] must have shape \[3, H, W\]"),
    ([torch.rand(1, 64, 64)], ValueError, r"images\[0\] must have shape \[3, H, W\]"),
    ([torch.rand(3, 64, 64), torch.rand(4, 3, 64, 64)], ValueError, r"images\[1\]"),
    ([(torch.rand(3, 64, 64) * 255).to(torch.uint8)], TypeError, "float"),
    ([torch.rand(3, 64, 64), torch.full((3, 64, 64), float("nan"))], ValueError, r"images \[1\] hold NaN"),
    ([torch.rand(3, 0, 64)], ValueError, "empty"),
    (["image.png"], TypeError, "torch.Tensor"),
])
def test_bad_images(model, images, error, match):
    model.eval()
    with pytest.raises(error, match=match):
        model(images)


def _edit(targets, i, key, value):
    out = [dict(t) for t in targets]
    if value is None:
        del out[i][key]
    else:
        out[i][key] = value
    return out


def test_bad_targets(model, data):
    images, targets = data
    model.train()
    cases = [
        (None, ValueError, "targets must be given"),
        (targets[:1], ValueError, "one dict per image"),
        (_edit(targets, 0, "boxes", None), ValueError, r"targets\[0\] has no \['boxes'\]"),
        (_edit(targets, 1, "labels", None), ValueError, r"targets\[1\] has no \['labels'\]"),
        (_edit(targets, 1, "masks", None), ValueError, r"targets\[1\] has no \['masks'\]"),
        (_edit(targets, 0, "boxes", targets[0]["boxes"][:, :3]), ValueError, r"Tensor\[N, 4\]"),
        (_edit(targets, 0, "boxes", targets[0]["boxes"].long()), TypeError, "float"),
        (_edit(targets, 0, "labels", targets[0]["labels"][:1]), ValueError, "one label per box"),
        (_edit(targets, 0, "labels", targets[0]["labels"].int()), TypeError, "int64"),
        (_edit(targets, 0, "masks", targets[0]["masks"][:, :32]), ValueError, r"masks.*\[2, 64, 80\]"),
        (_edit(targets, 1, "masks", targets[0]["masks"]), ValueError, r"masks.*\[1, 60, 72\]"),
        (_edit(targets, 0, "boxes", torch.tensor([[10.0, 5, 30, 40], [30.0, 5, 10, 40]])), ValueError,
         r"targets\[0\]\[\"boxes\"\]\[1\].*x2 > x1"),
        (_edit(targets, 0, "boxes", torch.tensor([[10.0, 5, 30, 40], [1.0, float("nan"), 10, 40]])), ValueError,
         "finite"),
        ([targets[0], "not a dict"], ValueError, r"targets\[1\] must be a dict"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            model(images, bad)
    for t, orig in zip(targets, data[1]):  # the checks did not modify the caller's targets
        assert t is orig


def test_targets_are_not_modified(model, data):
    images, targets = data
    copies = [{k: v.clone() for k, v in t.items()} for t in targets]
    model.train()
    model(images, targets)
    for t, c in zip(targets, copies):
        assert t.keys() == c.keys() and all(torch.equal(t[k], c[k]) for k in t)


def test_eval_ignores_targets_and_can_threshold_masks(data):
    images, targets = data
    torch.manual_seed(0)
    model = build_mask_rcnn(3, backbone="resnet18", box_score_thresh=0.0, **KW).eval()
    with torch.no_grad():
        soft = model(images, targets)
        model.mask_threshold = 0.5
        hard = model(images)
    for s, h in zip(soft, hard):
        assert h["masks"].dtype == torch.bool and s["masks"].dtype == torch.float32
        assert torch.equal(h["masks"], s["masks"] > 0.5)
    model.roi_heads.cfg.score_thresh = 1.0  # no detection at all: empty outputs of the right shapes
    with torch.no_grad():
        empty = model(images)
    for r, im in zip(empty, images):
        assert r["boxes"].shape == (0, 4) and r["labels"].shape == (0,) and r["scores"].shape == (0,)
        assert r["masks"].shape == (0, 1, *im.shape[1:]) and r["masks"].dtype == torch.bool


def test_builder_arguments():
    m = fastmask.maskrcnn_resnet50_fpn(num_classes=3, min_size=(200, 224), box_nms_thresh=0.4,
                                       rpn_post_nms_top_n_test=77, bbox_reg_weights=(1.0, 2.0, 3.0, 4.0))
    assert isinstance(m, MaskRCNN) and isinstance(m, fastmask.MaskRCNN)
    assert m.transform.min_size == (200, 224) and m.transform.max_size == 1333
    assert m.rpn.cfg.post_nms_top_n_test == 77 and m.rpn.cfg.pre_nms_top_n_train == 2000
    assert m.roi_heads.cfg.nms_thresh == 0.4 and m.roi_heads.cfg.box_weights == (1.0, 2.0, 3.0, 4.0)
    assert m.roi_heads.cfg.score_thresh == 0.05 and m.roi_heads.cfg.detections_per_img == 100
    with pytest.raises(TypeError, match="box_nms_threshold"):
        build_mask_rcnn(3, backbone="resnet18", box_nms_threshold=0.5)
    with pytest.raises(ValueError, match="backbone"):
        build_mask_rcnn(3, backbone="resnet152")
    with pytest.raises(ValueError, match="norm"):
        build_mask_rcnn(3, backbone="resnet18", norm="layer")
    with pytest.raises(ValueError, match="trainable_layers"):
        build_mask_rcnn(3, backbone="resnet18", trainable_layers=6)
    with pytest.raises(ValueError, match="num_classes"):
        build_mask_rcnn(1, backbone="resnet18")
    with pytest.raises(ValueError, match="backend"):
        build_mask_rcnn(3, backbone="resnet18", backend="cuda")


def test_head_sizes_and_norm(data):
    """Lighter heads and GroupNorm heads: the layout of torchvision's ``norm_layer`` option,
    a training step that reaches the new parameters, and named errors."""
    from functools import partial

    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads as TVMaskHeads
    from torchvision.ops import FeaturePyramidNetwork as TVFPN

    torch.manual_seed(0)
    model = build_mask_rcnn(3, backbone="resnet18", norm="gn", trainable_layers=5, fpn_channels=32,
                            box_head_dim=48, mask_head_channels=(16, 24), head_norm="gn", **KW).train()
    gn = partial(torch.nn.GroupNorm, 8)
    tv_fpn = TVFPN([64, 128, 256, 512], 32, norm_layer=gn)
    tv_mask = TVMaskHeads(32, [16, 24], 1, norm_layer=gn)

    def layout(module):
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    assert layout(model.backbone.fpn) == layout(tv_fpn)
    assert layout(model.roi_heads.mask_head) == layout(tv_mask)
    assert model.roi_heads.box_head.fc7.out_features == 48
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 24
    images, targets = data
    losses = model(images, targets)
    sum(losses.values()).backward()
    for name in ("backbone.fpn.layer_blocks.0.1.weight", "roi_heads.mask_head.1.1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="head_norm"):
        build_mask_rcnn(3, backbone="resnet18", head_norm="bn")
    with pytest.raises(ValueError, match="mask_head_channels"):
        build_mask_rcnn(3, backbone="resnet18", mask_head_channels=())


def test_custom_backbone_module(data):
    """A user's backbone: a module returning an OrderedDict of maps with ``out_channels``."""
    from fastmask.models.fpn import ResNetFPN

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ResNetFPN(18, "gn", 5, out_channels=64)
            self.out_channels = 64

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model = build_mask_rcnn(3, backbone=Wrapped(), **KW).train()
    images, targets = data
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="out_channels"):
        build_mask_rcnn(3, backbone=torch.nn.ReLU())
    with pytest.raises(ValueError, match="fpn_channels=32"):
        build_mask_rcnn(3, backbone=Wrapped(), fpn_channels=32)


def test_single_map_backbone(data):
    """torchvision's example of a one-map backbone: anchors and RoI pools set to match."""
    from fastmask.ops import MultiScaleRoIAlign

    class Stride16(torch.nn.Module):
        out_channels = 32

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, stride=4, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(32, 32, 3, stride=4, padding=1))

        def forward(self, x):
            return self.body(x)  # a Tensor: the model names it "0"

    torch.manual_seed(0)
    model = build_mask_rcnn(3, backbone=Stride16(), rpn_anchor_sizes=((16, 32, 64),),
                            rpn_aspect_ratios=((0.5, 1.0, 2.0),), box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
                            mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), box_score_thresh=0.0, **KW)
    images, targets = data
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        out = model.eval()(images)
    assert out[0]["masks"].shape[1:] == (1, 64, 80) and len(out[0]["boxes"]) > 0


def test_load_weights_fastmask_checkpoint_file(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_mask_rcnn(5, backbone="resnet18")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "iteration": 10}, path)
    target = build_mask_rcnn(2, backbone="resnet18")
    with caplog.at_level(logging.INFO, logger="fastmask.models.mask_rcnn"):
        skipped = load_weights(target, str(path))
    assert skipped and all(k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits."))
                           for k in skipped)
    assert len(skipped) == 6 and "roi_heads.mask_predictor.mask_fcn_logits.weight" in caplog.text
    src = source.state_dict()
    for k, v in target.state_dict().items():
        if k not in skipped:
            assert torch.equal(v, src[k]), k
    # The same class count loads everything, also from a DistributedDataParallel state dict.
    same = build_mask_rcnn(5, backbone="resnet18")
    assert load_weights(same, {"module." + k: v for k, v in src.items()}) == []
    assert all(torch.equal(v, src[k]) for k, v in same.state_dict().items())


def test_load_weights_rejects_other_architectures():
    torch.manual_seed(0)
    r18 = build_mask_rcnn(3, backbone="resnet18")
    r34 = build_mask_rcnn(3, backbone="resnet34")
    with pytest.raises(ValueError, match=r"missing keys: backbone\.body\.layer1\.2"):
        load_weights(r34, r18.state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys: backbone\.body\.layer1\.2"):
        load_weights(r18, r34.state_dict())
    gn = build_mask_rcnn(3, backbone="resnet18", norm="gn")
    with pytest.raises(ValueError, match="running_mean"):
        load_weights(gn, r18.state_dict())
    with pytest.raises(ValueError, match="skip_mismatched"):
        load_weights(build_mask_rcnn(4, backbone="resnet18"), r18.state_dict(), skip_mismatched=False)
    with pytest.raises(ValueError, match="state dict"):
        load_weights(r18, {"model": [1, 2, 3]})
