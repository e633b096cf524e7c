"""The model against torchvision's Mask R-CNN R50-FPN: checkpoints and eval outputs.

The torchvision model is seeded and randomised (see ``test_model_common.randomize_``), its
weights are loaded into ours with ``strict=True``, and both run on the same images of
different sizes batched together. Run with ``-s`` to print the largest differences.
"""

import pytest
import torch
import torchvision
from helpers import TOL, assert_close_verbose
from test_model_common import SMALL, capture_proposals, make_image, torchvision_mask_rcnn

import fastmask
from fastmask.models import load_weights

ATOL, RTOL = TOL[torch.float32]
MASK_AGREEMENT = 0.999  # docs/architecture.md: pasted masks agree on >= 99.9% of pixels at 0.5

# Few proposals and detections keep the CPU run short; box_score_thresh is lowered so that a
# randomly initialised model still returns a full set of detections.
EVAL_KW = dict(SMALL, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_detections_per_img=30)


def _run_pair(num_classes, sizes, score_thresh, seed):
    kw = dict(EVAL_KW, box_score_thresh=score_thresh)
    tv = torchvision_mask_rcnn(num_classes, seed=seed, **kw).eval()
    ours = fastmask.maskrcnn_resnet50_fpn(num_classes=num_classes, backend="torch", **kw).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    g = torch.Generator().manual_seed(seed + 10)
    images = [make_image(h, w, g) for h, w in sizes]
    originals = [im.clone() for im in images]
    store = {}
    capture_proposals(tv, store, "tv")
    capture_proposals(ours, store, "ours")
    with torch.no_grad():
        expected = tv(images)
        got = ours(images)
    for im, orig in zip(images, originals):
        assert torch.equal(im, orig), "the model modified its input images"
    return dict(tv=tv, ours=ours, expected=expected, got=got, proposals=(store["tv"], store["ours"]))


@pytest.fixture(scope="module")
def coco_pair():
    """91 classes (COCO's head), three images of three sizes (landscape and portrait)."""
    return _run_pair(91, [(200, 260), (180, 240), (240, 200)], score_thresh=0.05, seed=0)


@pytest.fixture(scope="module")
def small_pair():
    """A custom class count (3) and box_score_thresh=0: every candidate reaches NMS."""
    return _run_pair(3, [(190, 250), (230, 210)], score_thresh=0.0, seed=3)


def _rows_sorted(boxes):
    """Rows in lexicographic order of (x1, y1, x2, y2)."""
    for col in (3, 2, 1, 0):
        boxes = boxes[torch.sort(boxes[:, col], stable=True).indices]
    return boxes


def _check_outputs(pair, what):
    tv_props, our_props = pair["proposals"]
    worst = {}
    for i, (p, q) in enumerate(zip(tv_props, our_props)):
        assert len(p) > 0 and q.shape == p.shape, f"{what}: proposals of image {i}: {tuple(q.shape)} vs {tuple(p.shape)}"
        # Proposals with exactly equal objectness may come in either order (torchvision's
        # CPU sort does not fix the order of ties, ours is stable): rows that differ by
        # position must be the same boxes, reordered among themselves.
        moved = ~torch.isclose(q, p, atol=ATOL, rtol=RTOL).all(dim=1)
        assert moved.sum() <= 0.05 * len(p), f"{what}: proposals of image {i}: {int(moved.sum())} rows out of place"
        assert_close_verbose(_rows_sorted(q[moved]), _rows_sorted(p[moved]), ATOL, RTOL,
                             f"{what}: reordered proposals of image {i}")
        worst["proposals"] = max(worst.get("proposals", 0.0), (_rows_sorted(q) - _rows_sorted(p)).abs().max().item())
    for i, (e, r) in enumerate(zip(pair["expected"], pair["got"])):
        assert set(r) == {"boxes", "labels", "scores", "masks"}
        assert len(e["boxes"]) > 0, "the test model should detect something"
        assert r["labels"].dtype == torch.int64 and r["masks"].dtype == torch.float32
        assert torch.equal(r["labels"], e["labels"]), f"{what}: labels of image {i}"
        for k in ("boxes", "scores", "masks"):
            assert_close_verbose(r[k], e[k], ATOL, RTOL, f"{what}: {k} of image {i}")
            worst[k] = max(worst.get(k, 0.0), (r[k] - e[k]).abs().max().item())
        agree = ((r["masks"] > 0.5) == (e["masks"] > 0.5)).float().mean().item()
        assert agree >= MASK_AGREEMENT, f"{what}: masks of image {i} agree on {agree:.5f} of the pixels"
        assert r["masks"].shape[-2:] == pair["expected"][i]["masks"].shape[-2:]
    print(f"\n{what}: largest |ours - torchvision|: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))


def test_eval_matches_torchvision_91_classes(coco_pair):
    _check_outputs(coco_pair, "91 classes")
    labels = torch.cat([r["labels"] for r in coco_pair["got"]])
    assert labels.unique().numel() > 1


def test_eval_matches_torchvision_custom_classes(small_pair):
    _check_outputs(small_pair, "3 classes")
    for r, size in zip(small_pair["got"], [(190, 250), (230, 210)]):
        assert r["masks"].shape[1:] == (1, *size)
        assert len(r["boxes"]) == EVAL_KW["box_detections_per_img"]


def test_state_dict_equals_torchvision(coco_pair):
    """Same keys in the same order and same shapes as torchvision's detection model."""
    ours, tv = coco_pair["ours"].state_dict(), coco_pair["tv"].state_dict()
    assert list(ours) == list(tv)
    assert all(ours[k].shape == tv[k].shape for k in ours)
    assert not any(k.endswith("num_batches_tracked") for k in ours)


def test_loads_torchvision_builder_checkpoint_strictly():
    """``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` uses trainable BatchNorm:
    its checkpoint has ``num_batches_tracked`` entries, which a strict load accepts."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7)
    ours = fastmask.maskrcnn_resnet50_fpn(num_classes=7)
    sd = tv.state_dict()
    ours.load_state_dict(sd, strict=True)
    mine = ours.state_dict()
    assert set(mine) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, v in mine.items():
        assert torch.equal(v, sd[k]), k


def test_load_weights_into_other_class_count(coco_pair):
    """A 91-class torchvision checkpoint into a 3-class model: only the predictors are skipped."""
    model = fastmask.maskrcnn_resnet50_fpn(num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = coco_pair["tv"].state_dict()
    skipped = load_weights(model, source)
    assert skipped == sorted([
        "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k] if k in skipped else source[k]), k
