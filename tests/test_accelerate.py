"""fastmask.accelerate on torchvision's own detection models: equal outputs and losses, undo.

Each torchvision builder is made with random weights (randomised so that the heads give
varied scores) at a small image size, then run plain, accelerated, and after ``undo``.
"""

import subprocess
import sys

import pytest
import torch
from helpers import assert_close_verbose
from test_model_common import make_image, make_target, randomize_

import fastmask

detection = pytest.importorskip("torchvision.models.detection")

SMALL = dict(weights=None, weights_backbone=None, min_size=160, max_size=224, rpn_pre_nms_top_n_test=200,
             rpn_post_nms_top_n_test=100, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
             box_detections_per_img=20, box_score_thresh=0.0)
BUILDERS = {
    "maskrcnn_resnet50_fpn": (detection.maskrcnn_resnet50_fpn, 5, {}),
    "maskrcnn_resnet50_fpn_v2": (detection.maskrcnn_resnet50_fpn_v2, 5, {}),
    "fasterrcnn_resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, 5, {}),
    "keypointrcnn_resnet50_fpn": (detection.keypointrcnn_resnet50_fpn, 2, dict(box_detections_per_img=8)),
    "fasterrcnn_mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn, 5, {}),
}
# Boxes are pixel coordinates up to ~220: fp32 rounding of the decode allows ~2e-4.
# fp32. masks: the random-weight mask head of maskrcnn_resnet50_fpn_v2 (four conv + BatchNorm
# layers and a deconvolution) turns RoI Align's summation-order rounding (within 5e-7 of
# torchvision's, tests/test_roi_align.py) into mask probabilities up to 1.6e-4 apart with the
# CPU path's embedding_bag sums and 7.5e-5 with the reference's gather-and-einsum; in fp64 the
# same model agrees within 3e-13 (test_accelerated_fp64_outputs_equal), so it is rounding.
ATOL = {"boxes": 5e-4, "scores": 1e-5, "masks": 3e-4, "keypoints": 5e-4, "keypoints_scores": 1e-3}


def _model(name: str):
    build, num_classes, extra = BUILDERS[name]
    torch.manual_seed(0)
    model = build(num_classes=num_classes, **dict(SMALL, **extra))
    randomize_(model, torch.Generator().manual_seed(1))
    return model


def _images(n=2):
    g = torch.Generator().manual_seed(0)
    return [make_image(h, w, g) for h, w in ((160, 200), (150, 220))[:n]]


@pytest.mark.model
@pytest.mark.parametrize("name", list(BUILDERS))
def test_accelerated_outputs_equal_and_undo_restores(name):
    model = _model(name).eval()
    images = _images(1 if name.startswith("keypoint") else 2)
    with torch.no_grad():
        want = model(images)
        acc = fastmask.accelerate(model, backend="torch")
        swapped = list(acc.swapped)
        got = model(images)
        acc.undo()
        back = model(images)
    assert not acc.swapped
    assert any("rpn proposals" in s for s in swapped) and any("postprocess_detections" in s for s in swapped)
    assert any("anchor_generator" in s for s in swapped) and any("transform.postprocess" in s for s in swapped)
    pools = 2 if name.startswith(("mask", "keypoint")) else 1  # box + mask / keypoint pooler
    assert sum("roi_pool" in s for s in swapped) == pools, swapped
    for i, (e, r, b) in enumerate(zip(want, got, back)):
        assert len(e["boxes"]) > 0, "the test model should detect something"
        assert set(r) == set(e)
        assert torch.equal(r["labels"], e["labels"]), f"{name}: labels of image {i}"
        for k in e:
            assert torch.equal(b[k], e[k]), f"{name}: after undo, {k} of image {i} is not bit-identical"
            if k != "labels":
                assert_close_verbose(r[k], e[k], ATOL[k], 1e-5, f"{name}: {k} of image {i}")


@pytest.mark.model
def test_accelerated_fp64_outputs_equal():
    """In fp64 the accelerated model's detections equal torchvision's to rounding (the fp32
    tolerances above cover the mask head's amplification of fp32 rounding, not a difference)."""
    name = "maskrcnn_resnet50_fpn_v2"
    model = _model(name).eval().double()
    images = [im.double() for im in _images(2)]
    with torch.no_grad():
        want = model(images)
        acc = fastmask.accelerate(model, backend="torch")
        got = model(images)
        acc.undo()
    for i, (e, r) in enumerate(zip(want, got)):
        assert len(e["boxes"]) > 0 and torch.equal(r["labels"], e["labels"]), f"{name}: labels of image {i}"
        for k in ("boxes", "scores", "masks"):
            assert_close_verbose(r[k], e[k], 1e-9, 1e-9, f"{name} fp64: {k} of image {i}")


@pytest.mark.model
@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_accelerated_training_losses_and_gradients(name):
    """Same losses as the plain model (same RNG draws: the swapped parts draw none), and the
    same gradients, flowing through fastmask's RoI Align into the backbone.

    Gradients are compared by norm against the whole gradient's norm (||diff|| <= 1% of it,
    for every parameter and for all together), not element by element: the pooled features
    agree to ~1e-6, which flips the few box-head ReLUs that sit that close to zero, and a
    flipped unit changes its whole row of the fc gradients (seen: 0.9% of the largest element
    of fc7's); MobileNet's trainable BatchNorm then spreads that into every backbone gradient,
    where the biases' own gradients are near zero (so relative to their own norm they differ
    by more than 100%; relative to the whole gradient, 0.15% in all)."""
    model = _model(name).train()
    g = torch.Generator().manual_seed(3)
    images = _images()
    targets = [make_target(im.shape[-2], im.shape[-1], 3, 5, g) for im in images]
    if "mask" not in name:
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    results = []
    for accelerated in (False, True):
        acc = fastmask.accelerate(model, backend="torch") if accelerated else None
        model.zero_grad()
        torch.manual_seed(5)
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        if acc is not None:
            acc.undo()
    (want, grads_w), (got, grads_g) = results
    assert set(got) == set(want)
    for k in want:
        assert_close_verbose(got[k].detach(), want[k].detach(), 1e-5, 1e-4, f"{name}: {k}")
    assert grads_w.keys() == grads_g.keys() and any(n.startswith("backbone") for n in grads_g)
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads_w.values()])).item()
    diffs = {n: torch.linalg.vector_norm(grads_g[n] - grads_w[n]).item() for n in grads_w}
    assert sum(d * d for d in diffs.values()) ** 0.5 <= 1e-2 * total
    for n, d in diffs.items():
        assert d <= 1e-2 * total, n


def test_accelerate_refuses_and_reports():
    with pytest.raises(TypeError, match="torchvision"):
        fastmask.accelerate(fastmask.build_mask_rcnn(3, backbone="resnet18"))
    with pytest.raises(TypeError, match="torchvision"):
        fastmask.accelerate(torch.nn.Linear(2, 2))
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
    custom = torch.nn.Identity()
    model.roi_heads.box_roi_pool = custom
    acc = fastmask.accelerate(model, backend="torch")
    assert any("box_roi_pool" in k for k in acc.kept) and "kept:" in acc.summary()
    with pytest.raises(ValueError, match="accelerated already"):
        fastmask.accelerate(model)
    acc.undo()
    assert model.roi_heads.box_roi_pool is custom and "forward" not in model.rpn.__dict__
    assert type(model.rpn.anchor_generator).__module__.startswith("torchvision")
    fastmask.accelerate(model, backend="torch").undo()  # again after an undo


def test_fastmask_import_does_not_import_torchvision():
    code = "import sys, fastmask; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
