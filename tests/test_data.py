"""Datasets: the COCO loader (polygons, RLE, crowd, category mapping, bad input), the synthetic
generator, transforms and samplers. No model is involved."""

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from fastmask.config import SyntheticConfig
from fastmask.data import (CocoDetection, DatasetError, RandomHorizontalFlip, ResizeShortestEdge, TrainBatchSampler,
                           collate, ensure_synthetic, orientation_groups)
from fastmask.data.synthetic import dataset_dir, generate_split

H, W = 40, 50


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def _coco_dict() -> dict:
    crowd = np.zeros((H, W), np.uint8)
    crowd[30:38, 2:20] = 1
    rle_mask = np.zeros((H, W), np.uint8)
    rle_mask[5:15, 30:45] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    return {
        "images": [{"id": 7, "file_name": "a.png", "height": H, "width": W},
                   {"id": 8, "file_name": "b.png", "height": H, "width": W},
                   {"id": 11, "file_name": "c.png", "height": W, "width": H}],
        "categories": [{"id": 17, "name": "kite"}, {"id": 5, "name": "ball"}, {"id": 9, "name": "box"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [4, 6, 16, 12], "area": 150.0, "iscrowd": 0,
             "segmentation": [[4, 6, 20, 6, 20, 18, 4, 18]]},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [2, 30, 18, 8], "area": 144.0, "iscrowd": 1,
             "segmentation": _rle_uncompressed(crowd)},
            {"id": 3, "image_id": 7, "category_id": 17, "bbox": [30, 5, 15, 10], "area": 150.0, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
            {"id": 4, "image_id": 11, "category_id": 5, "bbox": [2, 2, 30, 40], "area": 300.0, "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [20, 30, 32, 30, 32, 42, 20, 42]]},
        ],
    }


def _write_dataset(root, data=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for img in _coco_dict()["images"]:  # the files as they should be, whatever the JSON says
        Image.fromarray(rng.integers(0, 255, (img["height"], img["width"], 3), dtype=np.uint8)).save(
            root / "images" / img["file_name"])
    path = root / "ann.json"
    path.write_text(json.dumps(data or _coco_dict()))
    return str(path), str(root / "images")


@pytest.fixture
def coco_files(tmp_path):
    return _write_dataset(tmp_path)


# --------------------------------------------------------------------------- COCO loader


def test_categories_become_contiguous_labels(coco_files):
    ds = CocoDetection(*coco_files)
    assert ds.num_classes == 4  # three categories + background, read from the file
    assert ds.cat_ids == [5, 9, 17]
    assert ds.cat_id_to_label == {5: 1, 9: 2, 17: 3}
    assert ds.label_to_cat_id == {1: 5, 2: 9, 3: 17}
    assert ds.class_names == ["__background__", "ball", "box", "kite"]
    assert len(ds) == 3 and ds.ids == [7, 8, 11]


def test_targets_polygon_rle_and_crowd(coco_files):
    ds = CocoDetection(*coco_files)
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    # the crowd region (id 2) is not a training target
    assert target["labels"].tolist() == [2, 3]
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 6, 20, 18], [30, 5, 45, 15]]))
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    anns = {a["id"]: a for a in ds.coco.dataset["annotations"]}
    for k, ann_id in enumerate([1, 3]):
        expected = ds.coco.annToMask(anns[ann_id])
        assert np.array_equal(target["masks"][k].numpy(), expected), f"annotation {ann_id}"
    assert target["masks"][1, 5:15, 30:45].all() and target["masks"][1].sum() == 150
    assert target["image_id"] == 7


def test_multi_part_polygon_is_merged(coco_files):
    ds = CocoDetection(*coco_files)
    _, target = ds[2]
    m = target["masks"][0].numpy()
    assert target["masks"].shape == (1, W, H)
    assert m[5, 5] == 1 and m[35, 25] == 1 and m[20, 20] == 0


def test_image_without_annotations_is_kept(coco_files):
    ds = CocoDetection(*coco_files)
    image, target = ds[1]
    assert image.shape == (3, H, W)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, H, W)


def _broken(tmp_path, edit):
    data = _coco_dict()
    edit(data)
    return _write_dataset(tmp_path, data)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), ["annotation id 1", "invalid polygon"]),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5]]), ["annotation id 1", "invalid polygon"]),
    (lambda d: d["annotations"][2].update(bbox=[30, 5, 0, 10]), ["annotation id 3", "zero-area box"]),
    (lambda d: d["annotations"][0].update(bbox=[60, 6, 10, 10]), ["annotation id 1", "zero-area box"]),
    (lambda d: d["annotations"][0].update(category_id=99), ["annotation id 1", "category id 99"]),
    (lambda d: d["annotations"][0].update(image_id=1234), ["annotation id 1", "image id 1234"]),
    (lambda d: d["annotations"][2]["segmentation"].update(size=[10, 10]), ["annotation id 3", "RLE of size"]),
    (lambda d: d["annotations"][0].pop("segmentation"), ["annotation id 1", "segmentation"]),
    (lambda d: d["images"][0].update(height=0), ["image id 7", "height"]),
])
def test_bad_annotations_are_named(tmp_path, edit, words):
    files = _broken(tmp_path, edit)
    with pytest.raises(DatasetError) as info:
        CocoDetection(*files)
    message = str(info.value)
    assert files[0] in message
    for w in words:
        assert w in message, message


def test_skip_mode_drops_bad_annotations_with_a_warning(tmp_path, caplog):
    def edit(d):
        d["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
        d["annotations"][2]["bbox"] = [30, 5, 0, 10]

    files = _broken(tmp_path, edit)
    with caplog.at_level(logging.WARNING, logger="fastmask.data.coco"):
        ds = CocoDetection(*files, invalid="skip")
    assert "ids 1" in caplog.text and "ids 3" in caplog.text
    assert sorted(a["id"] for a in ds.coco.dataset["annotations"]) == [2, 4]
    assert ds[0][1]["labels"].numel() == 0
    # unknown categories are never skipped silently
    files = _broken(tmp_path / "other", lambda d: d["annotations"][0].update(category_id=99))
    with pytest.raises(DatasetError, match="category id 99"):
        CocoDetection(*files, invalid="skip")


def test_missing_and_corrupt_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as info:
        CocoDetection(tmp_path / "nope.json", tmp_path)
    assert "nope.json" in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON") as info:
        CocoDetection(bad, tmp_path)
    assert "bad.json" in str(info.value)
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="categories"):
        CocoDetection(bad, tmp_path)


def test_missing_and_unreadable_images(coco_files, tmp_path):
    ann, images = coco_files
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DatasetError) as info:
        CocoDetection(ann, images)
    assert "'b.png' (image id 8)" in str(info.value) and "missing" in str(info.value)
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = CocoDetection(ann, images)  # opening checks existence only; decoding fails on read
    with pytest.raises(DatasetError) as info:
        ds[1]
    assert "b.png" in str(info.value) and "image id 8" in str(info.value) and "cannot be read" in str(info.value)
    with pytest.raises(DatasetError, match="image folder"):
        CocoDetection(ann, tmp_path / "no_such_dir")


def test_image_size_must_match_the_json(coco_files, tmp_path):
    Image.new("RGB", (W + 1, H)).save(tmp_path / "images" / "a.png")
    ds = CocoDetection(*coco_files)
    with pytest.raises(DatasetError, match="a.png"):
        ds[0]


# --------------------------------------------------------------------------- synthetic


SMALL = SyntheticConfig(num_train=24, num_val=4, image_size=64, seed=3)


def test_synthetic_is_deterministic(tmp_path):
    a = generate_split(SMALL, "train", 6, tmp_path / "a")
    b = generate_split(SMALL, "train", 6, tmp_path / "b")
    assert a == b
    for i in range(6):
        name = f"{i:06d}.png"
        a_pixels, b_pixels = (np.asarray(Image.open(tmp_path / d / name)) for d in ("a", "b"))
        assert np.array_equal(a_pixels, b_pixels)
    c = generate_split(replace(SMALL, seed=4), "train", 6, tmp_path / "c")
    assert c["annotations"] != a["annotations"]


def test_synthetic_content(tmp_path):
    cfg = replace(SMALL, cache_dir=str(tmp_path))
    paths = ensure_synthetic(cfg)
    ds = CocoDetection(*paths["train"])
    assert ds.num_classes == len(cfg.classes) + 1 >= 4
    per_image = {i: [] for i in ds.ids}
    for a in ds.coco.dataset["annotations"]:
        per_image[a["image_id"]].append(a)
    counts = [len(v) for v in per_image.values()]
    assert min(counts) >= 1 and max(counts) <= cfg.max_objects and len(set(counts)) > 1
    assert {a["category_id"] for a in ds.coco.dataset["annotations"]} == {1, 2, 3}
    sides = []
    overlaps = 0
    for index in range(len(ds)):
        info = ds.image_info(index)
        short = min(info["height"], info["width"])
        image, target = ds[index]
        masks = target["masks"].bool()
        assert (masks.sum(0) <= 1).all(), "visible masks must not share pixels"
        assert (masks.flatten(1).any(1)).all()
        sides += (target["boxes"][:, 2:] - target["boxes"][:, :2]).amax(1).div(short).tolist()
        b = target["boxes"]
        lt = torch.max(b[:, None, :2], b[None, :, :2])
        rb = torch.min(b[:, None, 2:], b[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        overlaps += int((inter.triu(1) > 0).sum())
        # each box is the tight box of its (visible) mask
        for m, box in zip(masks, b):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert overlaps > 0
    assert min(sides) < 0.2 and max(sides) > 0.4  # sizes span the range (8% .. 50% of the side)
    assert max(sides) <= 1.0
    # aspect ratios vary in both orientations
    assert set(orientation_groups(ds.aspect_ratios())) == {0, 1}


def test_synthetic_rotation_setting(tmp_path):
    """max_rotation=0 draws axis-aligned rectangles (they fill their boxes); 180 turns them freely."""
    def rect_fill(cfg, folder):
        data = generate_split(cfg, "train", 12, tmp_path / folder)
        rect = 1 + cfg.classes.index("rectangle")
        return [a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in data["annotations"] if a["category_id"] == rect]

    upright = rect_fill(replace(SMALL, max_rotation=0.0, max_occlusion=0.0), "upright")
    turned = rect_fill(replace(SMALL, max_rotation=180.0, max_occlusion=0.0), "turned")
    assert len(upright) >= 3 and len(turned) >= 3
    assert min(upright) > 0.95
    assert min(turned) < 0.8


def test_synthetic_cache_is_reused(tmp_path):
    cfg = replace(SMALL, num_train=3, num_val=2, cache_dir=str(tmp_path))
    first = ensure_synthetic(cfg)
    stamp = (dataset_dir(cfg) / "train.json").stat().st_mtime_ns
    assert ensure_synthetic(cfg) == first
    assert (dataset_dir(cfg) / "train.json").stat().st_mtime_ns == stamp
    assert len(list(tmp_path.iterdir())) == 1  # no temporary folders left behind
    assert dataset_dir(replace(cfg, seed=9)) != dataset_dir(cfg)
    with pytest.raises(ValueError, match="hexagon"):
        ensure_synthetic(replace(cfg, classes=["circle", "hexagon"]))


# --------------------------------------------------------------------------- transforms


def _sample(tmp_path):
    cfg = replace(SMALL, num_train=4, num_val=1, cache_dir=str(tmp_path))
    return CocoDetection(*ensure_synthetic(cfg)["train"])


def test_hflip_moves_boxes_with_masks(tmp_path):
    ds = _sample(tmp_path)
    image, target = ds[0]
    fimage, ftarget = RandomHorizontalFlip(1.0)(image, target, np.random.default_rng(0))
    assert torch.equal(fimage, image.flip(-1))
    assert torch.equal(ftarget["masks"], target["masks"].flip(-1))
    w = image.shape[-1]
    assert torch.equal(ftarget["boxes"][:, [0, 2]], w - target["boxes"][:, [2, 0]])
    for m, box in zip(ftarget["masks"], ftarget["boxes"]):
        xs = torch.nonzero(m, as_tuple=True)[1]
        assert (xs.min().item(), xs.max().item() + 1) == (box[0].item(), box[2].item())
    same, _ = RandomHorizontalFlip(0.0)(image, target, np.random.default_rng(0))
    assert same is image


def test_resize_shortest_edge(tmp_path):
    ds = _sample(tmp_path)
    image, target = ds[0]
    h, w = image.shape[-2:]
    rimage, rtarget = ResizeShortestEdge([96], 1000)(image, target, np.random.default_rng(0))
    scale = 96 / min(h, w)
    assert min(rimage.shape[-2:]) == 96 and rimage.dtype == torch.uint8
    assert rtarget["masks"].shape[-2:] == rimage.shape[-2:]
    torch.testing.assert_close(rtarget["boxes"], target["boxes"] * scale, rtol=0, atol=1e-3)
    capped, _ = ResizeShortestEdge([96], 100)(image, target, np.random.default_rng(0))
    assert max(capped.shape[-2:]) <= 100


def test_augmentation_follows_the_seed(tmp_path):
    ds = _sample(tmp_path)
    ds.transforms = RandomHorizontalFlip(0.5)
    flips = set()
    for seed in range(8):
        a, b = ds[(0, seed)], ds[(0, seed)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
        flips.add(torch.equal(a[0], ds[0][0].flip(-1)))
    assert flips == {True, False}


# --------------------------------------------------------------------------- samplers


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_train_sampler_resumes_exactly():
    groups = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1]
    full = _take(TrainBatchSampler(groups, 2, seed=5), 20)
    assert _take(TrainBatchSampler(groups, 2, seed=5, start_iter=13), 7) == full[13:]
    assert _take(TrainBatchSampler(groups, 2, seed=6), 20) != full
    for batch in full:
        assert len({groups[i] for i, _ in batch}) == 1, "a batch mixes orientations"
    # every image is visited once per epoch (up to the images left waiting in a bucket)
    first_epoch = [i for batch in full[:4] for i, _ in batch]
    assert len(set(first_epoch)) == len(first_epoch)


def test_train_sampler_shards_ranks():
    groups = [0] * 10
    seen = [[i for b in _take(TrainBatchSampler(groups, 1, seed=0, rank=r, world_size=2), 5) for i, _ in b]
            for r in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_loader_workers_give_the_same_batches(tmp_path):
    ds = _sample(tmp_path)
    ds.transforms = RandomHorizontalFlip(0.5)
    groups = orientation_groups(ds.aspect_ratios())
    out = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=TrainBatchSampler(groups, 1, seed=1),
                                             num_workers=workers, collate_fn=collate)
        it = iter(loader)
        out.append([next(it) for _ in range(4)])
    for (ia, ta), (ib, tb) in zip(*out):
        assert all(torch.equal(a, b) for a, b in zip(ia, ib))
        assert all(torch.equal(a["masks"], b["masks"]) for a, b in zip(ta, tb))
