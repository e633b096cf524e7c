"""COCO-format instance segmentation datasets (pycocotools), checked when they are opened.

What is read, and how (COCO's own conventions):
- ``bbox`` is ``[x, y, width, height]`` in pixels; the model gets ``(x1, y1, x2, y2)`` clipped
  to the image.
- ``segmentation`` is a list of polygons ``[[x1, y1, x2, y2, ...], ...]``, an uncompressed RLE
  ``{"size": [h, w], "counts": [int, ...]}`` or a compressed one (``counts`` a string); the
  parts of one object are merged into one mask.
- ``iscrowd: 1`` marks a region of many objects: it is not a training target (COCOeval
  treats it as a region where detections are neither right nor wrong), as in COCO's own
  training recipes.
- Category ids may be any integers: sorted, they become the contiguous labels 1..K
  (0 is the background), so ``num_classes = K + 1`` comes from the file.
- Images without annotations stay in the dataset (they train the background).

Everything that would fail later is checked when the dataset is opened, and reported with
the file and the id at fault: a missing or corrupt JSON file, an annotation whose image or
category is unknown, whose id is missing or repeated, a malformed box, polygon, RLE, area or
iscrowd, a zero-area box, a missing image file. An image that cannot be decoded is reported
when it is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

log = logging.getLogger(__name__)

# How many offending ids an error message lists before "and N more".
MAX_LISTED = 5


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file and the id."""


# Annotation problems that ``invalid="skip"`` does not skip: they are mistakes of the whole
# file (or its ids), and skipping would silently drop most of it.
FATAL = ("unknown image", "unknown category", "a missing or invalid id", "a repeated id", "a missing or invalid area",
         "a missing or invalid iscrowd")


def _listing(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def read_coco_json(path: str | os.PathLike) -> dict:
    """The parsed annotation file, with its top-level structure checked."""
    path = str(path)
    if os.path.isdir(path):
        raise DatasetError(f"annotation file {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise DatasetError(f"annotation file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"annotation file {path!r} is not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"annotation file {path!r} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path!r} must hold a JSON object with images, annotations, categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"annotation file {path!r} has no {key!r} list")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise DatasetError(f"annotation file {path!r}: 'annotations' must be a list")
    if not data["categories"]:
        raise DatasetError(f"annotation file {path!r} defines no categories")
    return data


def _is_number(v) -> bool:
    """An int or float, not a bool (JSON's true would pass ``isinstance(v, int)``), and finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_id(v) -> bool:
    """COCO's ids are integers (they are sorted, and written back into results as numbers)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _rle_string_pixels(counts: str) -> int | None:
    """Pixels covered by a compressed RLE string (the sum of its runs), None when it is malformed.

    The format (pycocotools' ``rleToString``): each run is a signed number written 5 bits
    per character, offset by 48, with 0x20 as the continuation bit and 0x10 the sign of the
    last character; from the third run on, it is the difference to the run two before.
    """
    runs: list[int] = []
    i, n = 0, len(counts)
    while i < n:
        value, shift, more = 0, 0, True
        while more:
            if i == n:
                return None
            c = ord(counts[i]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            i += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return sum(runs)


def _segmentation_problem(segm, h: int, w: int) -> str | None:
    """Why ``segm`` cannot be decoded into an ``h x w`` mask, or None."""
    if isinstance(segm, list):
        if not segm:
            return "an empty polygon list"
        for poly in segm:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in poly):
                return "a polygon that is not a list of numbers"
            if len(poly) % 2 or len(poly) < 6:
                return f"an invalid polygon with {len(poly)} coordinates (needs an even number, at least 6)"
            if not all(math.isfinite(v) for v in poly):
                return "a polygon with non-finite coordinates"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2):
            return "an RLE without a [height, width] size"
        if list(size) != [h, w]:
            return f"an RLE of size {size} on an image of size [{h}, {w}]"
        if not isinstance(counts, (str, list)):
            return "an RLE whose counts are neither a string nor a list"
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                return "an uncompressed RLE whose counts are not all non-negative integers"
            if sum(counts) != h * w:
                return f"an uncompressed RLE whose counts add up to {sum(counts)}, not {h * w}"
            return None
        pixels = _rle_string_pixels(counts)
        if pixels is None:
            return "a compressed RLE whose counts string is malformed"
        if pixels != h * w:
            return f"a compressed RLE whose runs add up to {pixels} pixels, not {h * w}"
        return None
    return f"a segmentation of type {type(segm).__name__}"


def decode_segmentation(segm, h: int, w: int) -> np.ndarray:
    """One object's mask as uint8 [h, w] from polygons or RLE (parts merged)."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = {"size": segm["size"], "counts": segm["counts"].encode("ascii") if isinstance(segm["counts"], str)
               else segm["counts"]}
    return mask_utils.decode(rle)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO instance segmentation split.

    ``dataset[i]`` -> ``(image, target)``: ``image`` uint8 Tensor[3, H, W]; ``target`` has
    ``boxes`` float32 Tensor[N, 4] ``(x1, y1, x2, y2)``, ``labels`` int64 Tensor[N] in 1..K,
    ``masks`` uint8 Tensor[N, H, W], ``image_id`` (the COCO id) and ``area``; crowd regions
    are left out. ``dataset[(i, seed)]`` also applies ``transforms`` with a generator made
    from ``seed`` (the training sampler passes one per sample, so augmentation does not
    depend on which worker loads the image).

    ``invalid="error"`` raises :class:`DatasetError` on the first kind of bad annotation;
    ``"skip"`` drops such annotations (from training and from the evaluation ground truth)
    and logs how many.
    """

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike, *, transforms=None,
                 invalid: str = "error", check_files: bool = True):
        if invalid not in ("error", "skip"):
            raise ValueError(f"invalid must be 'error' or 'skip', got {invalid!r}")
        self.annotation_file = str(annotations)
        self.image_dir = str(images)
        self.transforms = transforms
        data = read_coco_json(self.annotation_file)
        data = self._check(data, invalid)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names = ["__background__"] + [str(self.coco.cats[c].get("name", c)) for c in self.cat_ids]
        self.num_classes = len(self.cat_ids) + 1
        if check_files:
            if not os.path.isdir(self.image_dir):
                raise DatasetError(f"image folder {self.image_dir!r} (for {self.annotation_file!r}) does not exist")
            missing = [f"{self.coco.imgs[i]['file_name']!r} (image id {i})" for i in self.ids
                       if not os.path.isfile(self._image_path(i))]
            if missing:
                raise DatasetError(f"{len(missing)} image file(s) listed in {self.annotation_file!r} are missing "
                                   f"from {self.image_dir!r}: {_listing(missing)}")

    # ------------------------------------------------------------------ checks

    def _check(self, data: dict, invalid: str) -> dict:
        path = self.annotation_file
        images = {}
        for img in data["images"]:
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise DatasetError(f"{path!r}: an image entry lacks 'id' or 'file_name': {str(img)[:120]}")
            if not _is_id(img["id"]):
                raise DatasetError(f"{path!r}: an image entry has id {img['id']!r}, not an integer")
            if not isinstance(img["file_name"], str) or not img["file_name"]:
                raise DatasetError(f"{path!r}: image id {img['id']} has file_name {img['file_name']!r}, not a "
                                   "file name")
            h, w = img.get("height"), img.get("width")
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
                raise DatasetError(f"{path!r}: image id {img['id']} needs positive integer height and width, "
                                   f"got {h!r} x {w!r}")
            if img["id"] in images:
                raise DatasetError(f"{path!r}: image id {img['id']} appears twice")
            images[img["id"]] = img
        cat_ids = set()
        for cat in data["categories"]:
            if not isinstance(cat, dict) or "id" not in cat:
                raise DatasetError(f"{path!r}: a category entry lacks 'id': {str(cat)[:120]}")
            if not _is_id(cat["id"]):
                raise DatasetError(f"{path!r}: a category entry has id {cat['id']!r}, not an integer")
            cat_ids.add(cat["id"])
        problems: dict[str, list] = {}
        kept = []
        seen_ids = set()
        for k, ann in enumerate(data["annotations"]):
            has_id = isinstance(ann, dict) and _is_id(ann.get("id"))
            ann_id = ann["id"] if has_id else f"#{k}"
            reason = self._annotation_problem(ann, images, cat_ids)
            if reason is None and ann["id"] in seen_ids:
                reason = "a repeated id", "appears twice (annotation ids must be unique)"
            if reason is None:
                seen_ids.add(ann["id"])
                kept.append(ann)
                continue
            kind, detail = reason
            if kind in FATAL or invalid == "error":
                who = f"annotation id {ann_id}" if has_id else f"annotation #{k} (counting from 0)"
                raise DatasetError(f"{path!r}: {who}: {detail}")
            problems.setdefault(kind, []).append(ann_id)
        for kind, ids in problems.items():
            log.warning("%s: skipped %d annotation(s) with %s: ids %s", path, len(ids), kind, _listing(ids))
        data = dict(data)
        data["annotations"] = kept
        return data

    @staticmethod
    def _annotation_problem(ann, images: dict, cat_ids: set) -> tuple[str, str] | None:
        if not isinstance(ann, dict):
            return "malformed entry", "is not a JSON object"
        if "id" not in ann:
            return "a missing or invalid id", "has no 'id'"
        if not _is_id(ann["id"]):
            return "a missing or invalid id", f"has id {ann['id']!r}, not an integer"
        if not _is_id(ann.get("image_id")) or ann["image_id"] not in images:
            return "unknown image", f"refers to image id {ann.get('image_id')!r}, which is not in 'images'"
        if not _is_id(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            return "unknown category", (f"has category id {ann.get('category_id')!r}, which is not in 'categories' "
                                        f"(known: {sorted(cat_ids)})")
        # COCO's evaluation reads both of these from every annotation.
        if "area" not in ann:
            return "a missing or invalid area", "has no 'area' (the object's pixel count; COCO's evaluation needs it)"
        if not _is_number(ann["area"]) or ann["area"] < 0:
            return "a missing or invalid area", f"has area {ann['area']!r}, not a non-negative number"
        if "iscrowd" not in ann:
            return "a missing or invalid iscrowd", "has no 'iscrowd' (0 or 1; COCO's evaluation needs it)"
        if ann["iscrowd"] not in (0, 1):
            return "a missing or invalid iscrowd", f"has iscrowd {ann['iscrowd']!r}, not 0 or 1"
        img = images[ann["image_id"]]
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            return "a malformed bbox", f"bbox must be four finite numbers [x, y, width, height], got {bbox!r}"
        x, y, bw, bh = bbox
        x1, y1 = max(x, 0), max(y, 0)
        x2, y2 = min(x + bw, img["width"]), min(y + bh, img["height"])
        if bw <= 0 or bh <= 0 or x2 <= x1 or y2 <= y1:
            return "a zero-area box", (f"has a zero-area box {bbox!r} (width and height must be positive and "
                                       f"overlap the {img['width']}x{img['height']} image {img['id']})")
        if "segmentation" not in ann:
            return "no segmentation", "has no 'segmentation' (instance masks are needed to train Mask R-CNN)"
        problem = _segmentation_problem(ann["segmentation"], img["height"], img["width"])
        if problem is not None:
            return "an invalid segmentation", f"has {problem}"
        return None

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.ids)

    def _image_path(self, image_id) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])

    def image_info(self, index: int) -> dict:
        return self.coco.imgs[self.ids[index]]

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the JSON (no image is opened)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def load_image(self, index: int) -> torch.Tensor:
        """uint8 Tensor[3, H, W] of the image at ``index``."""
        image_id = self.ids[index]
        path = self._image_path(image_id)
        info = self.coco.imgs[image_id]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                array = np.array(im)
        except FileNotFoundError:
            raise DatasetError(f"image file {path!r} (image id {image_id}) does not exist") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DatasetError(f"image file {path!r} (image id {image_id}) cannot be read: {exc}") from None
        if array.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(f"image file {path!r} (image id {image_id}) is {array.shape[0]}x{array.shape[1]} "
                               f"but {self.annotation_file!r} says {info['height']}x{info['width']}")
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def load_target(self, index: int) -> dict:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        if anns:
            masks = torch.from_numpy(np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns]))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        area = torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)
        return {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id, "area": area}

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
        else:
            index, seed = key, None
        image, target = self.load_image(index), self.load_target(index)
        if self.transforms is not None:
            rng = np.random.default_rng(seed)
            image, target = self.transforms(image, target, rng)
        return image, target


def collate(batch):
    """A list of ``(image, target)`` -> ``(list of images, list of targets)``."""
    return tuple(zip(*batch))
