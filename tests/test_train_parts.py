"""Training parts that need no model: RLE encoding and COCOeval wiring, checkpoints, schedule."""

import math
import os
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fastmask.config import ConfigError, SolverConfig
from fastmask.engine.builder import LRSchedule, build_optimizer, build_scheduler
from fastmask.engine.checkpoint import (FORMAT, CheckpointError, load_checkpoint, load_model_state, rng_state,
                                        save_atomic, set_rng_state)
from fastmask.engine.evaluation import STAT_NAMES, coco_evaluate, detections_to_coco, masks_to_rle


def _gt(n_images=3, seed=0):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        h, w = 48, 40 + 8 * i
        images.append({"id": i, "height": h, "width": w, "file_name": f"{i}.png"})
        for _ in range(3):
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
            m[y:y + rng.integers(6, 16), x:x + rng.integers(6, 16)] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice([3, 8])), "iscrowd": 0,
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                         "area": float(m.sum()), "bbox": bbox})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 3}, {"id": 8}]}
    coco.createIndex()
    return coco


def test_masks_to_rle_matches_pycocotools():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(70, 23, 31, generator=g) > 0.6  # more than one encoding chunk
    rles = masks_to_rle(masks)
    assert len(rles) == 70
    for m, rle in zip(masks, rles):
        ref = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        assert rle["counts"] == ref["counts"].decode() and list(rle["size"]) == [23, 31]
    # a non-contiguous (transposed) input encodes its own values
    t = masks[:5].transpose(1, 2)
    for m, rle in zip(t, masks_to_rle(t)):
        assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}), m.numpy())
    assert masks_to_rle(torch.zeros(0, 5, 5, dtype=torch.bool)) == []


def _as_output(coco, image_id, label_of):
    anns = coco.imgToAnns[image_id]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns])
    masks = torch.stack([torch.from_numpy(coco.annToMask(a)).bool() for a in anns])[:, None]
    return {"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(anns)), "masks": masks,
            "labels": torch.tensor([label_of[a["category_id"]] for a in anns])}


def test_perfect_detections_score_one():
    coco = _gt()
    label_of, cat_of = {3: 1, 8: 2}, {1: 3, 2: 8}
    bbox_res, segm_res = [], []
    for image_id in coco.imgs:
        b, s = detections_to_coco(_as_output(coco, image_id, label_of), image_id, cat_of)
        bbox_res += b
        segm_res += s
    assert {r["category_id"] for r in bbox_res} <= {3, 8}
    result = coco_evaluate(coco, bbox_res, segm_res)
    for kind in ("bbox", "segm"):
        assert list(result[kind]) == list(STAT_NAMES)
        assert result[kind]["AP"] == pytest.approx(1.0) and result[kind]["AP50"] == pytest.approx(1.0)
        assert "Average Precision" in result["tables"][kind]


def test_float_masks_are_thresholded_and_wrong_labels_score_zero():
    coco = _gt()
    out = _as_output(coco, 1, {3: 1, 8: 2})
    out["masks"] = out["masks"].float() * 0.7
    _, segm = detections_to_coco(out, 1, {1: 3, 2: 8})
    assert mask_utils.area([{"size": s["segmentation"]["size"], "counts": s["segmentation"]["counts"].encode()}
                            for s in segm]).tolist() == [a["area"] for a in coco.imgToAnns[1]]
    swapped = {1: 8, 2: 3}
    bbox_res = []
    for image_id in coco.imgs:
        labels = {a["category_id"]: (1 if a["category_id"] == 3 else 2) for a in coco.imgToAnns[image_id]}
        bbox_res += detections_to_coco(_as_output(coco, image_id, labels), image_id, swapped)[0]
    assert coco_evaluate(coco, bbox_res, [])["bbox"]["AP"] < 0.5


def test_no_detections_score_zero():
    result = coco_evaluate(_gt(), [], [])
    assert result["bbox"]["AP"] == 0 and result["segm"]["AR100"] == 0


# --------------------------------------------------------------------------- checkpoints


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pth"
    save_atomic({"format": FORMAT, "model": {"w": torch.ones(2)}, "iteration": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"format": FORMAT, "model": {}, "bad": Unsaveable()}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pth"]  # no temporary file left


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pth")
    good = tmp_path / "good.pth"
    save_atomic({"format": FORMAT, "model": {}, "iteration": 3}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(truncated)
    assert "truncated.pth" in str(info.value)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a fastmask training checkpoint"):
        load_checkpoint(foreign)


def test_model_state_mismatch_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    state = {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(4), "1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        load_model_state(model, state, "x.pth")
    assert "x.pth" in str(info.value) and "1.weight" in str(info.value) and "0.weight" in str(info.value)


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    save_atomic({"format": FORMAT, "model": {}, "rng": [state]}, tmp_path / "r.pth")
    first = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"][0])
    second = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])


# --------------------------------------------------------------------------- optimizer and schedule


def test_schedule_warmup_step_and_cosine():
    step = LRSchedule(SolverConfig(max_iter=100, warmup_iters=10, warmup_factor=0.1, schedule="step", steps=[50, 80]))
    assert step(0) == pytest.approx(0.1) and step(5) == pytest.approx(0.55) and step(10) == 1.0
    assert step(49) == 1.0 and step(50) == pytest.approx(0.1) and step(80) == pytest.approx(0.01)
    cos = LRSchedule(SolverConfig(max_iter=100, warmup_iters=0, schedule="cosine", min_lr_factor=0.1))
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    assert all(cos(i) >= cos(i + 1) for i in range(100))
    assert math.isclose(LRSchedule(SolverConfig(max_iter=10, warmup_iters=0))(5), 0.5)


def test_schedule_placed_at_an_iteration_equals_one_stepped_there():
    solver = SolverConfig(max_iter=20, base_lr=0.1, warmup_iters=5, schedule="step", steps=[8, 15])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8))  # two parameter groups
    optimizer = build_optimizer(solver, model)
    scheduler = build_scheduler(solver, optimizer, 0)
    rates = []
    for _ in range(20):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates[0] == [0.1 * 0.001] * 2 and rates[8] == [pytest.approx(0.01)] * 2
    other_solver = SolverConfig(max_iter=10, base_lr=0.5)
    other = build_optimizer(other_solver, model)
    build_scheduler(other_solver, other, 3)  # the state of a run under another config
    for it in (1, 4, 8, 19):
        resumed = build_optimizer(solver, model)
        resumed.load_state_dict(other.state_dict())
        build_scheduler(solver, resumed, it)
        assert [g["lr"] for g in resumed.param_groups] == rates[it], it


def test_norm_parameters_get_their_own_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 2, 1))
    opt = build_optimizer(SolverConfig(weight_decay=1e-4, weight_decay_norm=0.0, base_lr=0.1), model)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[1].weight)] == 0.0 and decays[id(model[0].weight)] == 1e-4
    assert len(decays) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


# --------------------------------------------------------------------------- backbone weights


def test_imagenet_backbone_weights_load(tmp_path):
    """model.backbone_weights takes torchvision's ImageNet ResNet layout (fc ignored)."""
    torchvision = pytest.importorskip("torchvision")
    from fastmask.config import ModelConfig
    from fastmask.engine.builder import build_model, load_backbone_weights

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    cfg = ModelConfig(backbone="resnet18", norm="frozen_bn", min_size=64, max_size=96, fpn_channels=32,
                      box_head_dim=32, mask_head_channels=[16])
    model = build_model(cfg, num_classes=3)
    load_backbone_weights(model, str(path))
    body = model.backbone.body.state_dict()
    assert torch.equal(body["layer3.1.conv2.weight"], resnet.state_dict()["layer3.1.conv2.weight"])
    assert torch.equal(body["bn1.running_var"], resnet.state_dict()["bn1.running_var"])
    gn_model = build_model(ModelConfig(backbone="resnet18", norm="gn", fpn_channels=32, box_head_dim=32,
                                       mask_head_channels=[16]), num_classes=3)
    with pytest.raises(CheckpointError, match="resnet18.pth"):
        load_backbone_weights(gn_model, str(path))


def test_model_options_cannot_shadow_model_settings():
    """A head size or norm written under model.options is pointed to its own setting."""
    from fastmask.config import ModelConfig
    from fastmask.engine.builder import build_model

    with pytest.raises(ConfigError, match=r"model\.head_norm"):
        build_model(ModelConfig(backbone="resnet18", options={"head_norm": "gn"}), num_classes=3)
    with pytest.raises(ConfigError, match="does not take"):
        build_model(ModelConfig(backbone="resnet18", options={"rpn_nms_threshold": 0.5}), num_classes=3)
