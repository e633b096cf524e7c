"""The built-in synthetic shapes dataset: generated once, then read as ordinary COCO files.

Each image has a textured background (a colour gradient plus stripes, a checkerboard or
smooth blotches, plus pixel noise) and 1 to ``max_objects`` shapes (circles, rotated
rectangles, triangles, ...) of random colour and shading, sized ``min_object_frac`` to
``max_object_frac`` of the shorter image side. Shapes may overlap: a later shape hides part of
an earlier one and the earlier one's mask keeps only what is visible; a placement that would
hide more than ``max_occlusion`` of an earlier shape is drawn again elsewhere, so every
visible shape is annotated. Everything is drawn from
``numpy.random.default_rng((seed, split, index))``, so the dataset is the same on every
machine and in every process.

The files are written once under ``cache_dir/<name>/`` (name from a hash of the settings):
``train.json``, ``val.json`` (COCO format, masks as compressed RLE) and ``train/``, ``val/``
folders of PNG images. They are written into a temporary folder that is renamed into place,
so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ..config import SyntheticConfig

SHAPES = ("circle", "rectangle", "triangle", "star")
# Version of the generator: part of the cache name, so a change here regenerates the files.
GENERATOR_VERSION = 3
# Placement attempts per shape before it is left out.
PLACEMENT_TRIES = 20
# Minimum RGB distance between a shape's colour and the mean background colour under it,
# so that shapes stay visible (0..441 scale).
MIN_CONTRAST = 90.0
# Shapes are drawn at this many times the image resolution and averaged down, so their
# edges are anti-aliased like a photographed object's.
SUPERSAMPLE = 2


def dataset_dir(cfg: SyntheticConfig) -> Path:
    """The cache folder for these settings (it exists once :func:`ensure_synthetic` ran)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    settings["version"] = GENERATOR_VERSION
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.cache_dir) / f"shapes-{digest}"


def ensure_synthetic(cfg: SyntheticConfig) -> dict[str, tuple[str, str]]:
    """Generate the dataset unless it is already cached.

    Returns ``{"train": (annotations_json, image_dir), "val": (...)}``.
    """
    for name in cfg.classes:
        if name not in SHAPES:
            raise ValueError(f"data.synthetic.classes: unknown shape {name!r}; available: {', '.join(SHAPES)}")
    if len(set(cfg.classes)) != len(cfg.classes) or not cfg.classes:
        raise ValueError(f"data.synthetic.classes must be distinct and non-empty, got {cfg.classes}")
    root = dataset_dir(cfg)
    paths = {split: (str(root / f"{split}.json"), str(root / split)) for split in ("train", "val")}
    if (root / "val.json").is_file() and (root / "train.json").is_file():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
            coco = generate_split(cfg, split, count, tmp / split)
            # The JSON files are written last: their presence marks a complete split.
            (tmp / f"{split}.json").write_text(json.dumps(coco))
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first (it renamed its copy into place): use that one.
            if not (root / "val.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def generate_split(cfg: SyntheticConfig, split: str, count: int, image_dir: Path) -> dict:
    """Draw ``count`` images into ``image_dir`` and return their COCO dictionary."""
    image_dir.mkdir(parents=True, exist_ok=True)
    split_key = {"train": 0, "val": 1}[split]
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng((cfg.seed, split_key, index))
        image, masks, labels = draw_image(cfg, rng)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(image_dir / file_name, optimize=False, compress_level=1)
        h, w = image.shape[:2]
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for mask, label in zip(masks, labels):
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": float(mask.sum()), "bbox": [x, y, bw, bh], "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(cfg.classes)]
    return {"info": {"description": f"fastmask synthetic shapes ({split})", "version": str(GENERATOR_VERSION)},
            "images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------- drawing


def draw_image(cfg: SyntheticConfig, rng: np.random.Generator):
    """One image: ``(uint8 [H, W, 3], list of bool [H, W] visible masks, list of category ids)``."""
    short = cfg.image_size
    long = int(round(short * rng.uniform(1.0, cfg.max_aspect) / 8)) * 8
    h, w = (short, long) if rng.random() < 0.5 else (long, short)
    image = _background(h, w, rng, cfg.texture_contrast)
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    masks: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(n_objects):
        label = int(rng.integers(len(cfg.classes)))
        shape = cfg.classes[label]
        for _ in range(PLACEMENT_TRIES):
            size = rng.uniform(cfg.min_object_frac, cfg.max_object_frac) * short
            coverage = _shape_coverage(shape, size, h, w, cfg.max_rotation, rng)
            new = coverage > 0.5
            if new.sum() < 4:
                continue
            if all((m & new).sum() <= cfg.max_occlusion * m.sum() for m in masks):
                break
        else:
            continue
        colour = _contrasting_colour(image, new, rng)
        _paint(image, coverage, colour, rng)
        masks = [m & ~new for m in masks]
        masks.append(new)
        labels.append(label + 1)
    keep = [i for i, m in enumerate(masks) if m.any()]
    return image, [masks[i] for i in keep], [labels[i] for i in keep]


def _background(h: int, w: int, rng: np.random.Generator, contrast: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle))
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = rng.integers(4)
    amp = rng.uniform(contrast / 3, contrast)
    if kind == 0:    # stripes of random frequency and orientation
        period = rng.uniform(4, 24)
        a = rng.uniform(0, math.pi)
        tex = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(4, 16))
        tex = ((xx // cell + yy // cell) % 2) * 2.0 - 1.0
    elif kind == 2:  # smooth blotches: coarse noise upsampled
        coarse = rng.uniform(-1, 1, (h // 16 + 2, w // 16 + 2)).astype(np.float32)
        tex = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC))
    else:            # plain gradient
        tex = np.zeros((h, w), np.float32)
    tint = rng.uniform(0.5, 1.0, 3)
    img = img + amp * tex[..., None] * tint
    img = img + rng.normal(0, rng.uniform(2, 10), (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(shape: str, size: float, max_rotation: float, rng: np.random.Generator):
    """Vertices ``[V, 2]`` (numpy) around the origin for polygonal shapes; None for a circle.

    At rotation 0 a rectangle is axis-aligned and a triangle or star points up; the shape is
    turned by up to ``max_rotation`` degrees either way.
    """
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))
    if shape == "circle":
        return None
    if shape == "rectangle":
        aspect = rng.uniform(0.45, 1.0)
        half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * [size / 2, size * aspect / 2]
        pts = half
    elif shape == "triangle":
        base = np.array([-math.pi / 2, math.pi / 6, 5 * math.pi / 6]) + rng.uniform(-0.25, 0.25, 3)
        pts = np.stack([np.cos(base), np.sin(base)], 1) * (size / 2) * 1.15
    else:  # star: five points, inner radius 0.45 of the outer
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.45) * size / 2
        a = k * math.pi / 5 - math.pi / 2
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T


def _shape_coverage(shape: str, size: float, h: int, w: int, max_rotation: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Fraction of each pixel covered by a randomly placed shape: float32 [H, W] in [0, 1]."""
    margin = size * 0.3  # a shape may be cut by the image border by up to this much
    cx = rng.uniform(size / 2 - margin, w - size / 2 + margin)
    cy = rng.uniform(size / 2 - margin, h - size / 2 + margin)
    pts = _shape_polygon(shape, size, max_rotation, rng)
    if pts is None:
        r = size / 2 * rng.uniform(0.85, 1.0)
        pts_extent = np.array([[-r, -r], [r, r]])
    else:
        pts_extent = pts
    # Draw only inside the shape's bounding window (clipped to the image), supersampled.
    x0 = max(int(np.floor(cx + pts_extent[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(cy + pts_extent[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(cx + pts_extent[:, 0].max())) + 1, w)
    y1 = min(int(np.ceil(cy + pts_extent[:, 1].max())) + 1, h)
    coverage = np.zeros((h, w), np.float32)
    if x1 <= x0 or y1 <= y0:
        return coverage
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    ox, oy = cx - x0, cy - y0
    if pts is None:
        draw.ellipse([(ox - r) * s, (oy - r) * s, (ox + r) * s, (oy + r) * s], fill=255)
    else:
        draw.polygon([((x + ox) * s, (y + oy) * s) for x, y in pts], fill=255)
    big = np.asarray(canvas, np.float32) / 255.0
    coverage[y0:y1, x0:x1] = big.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return coverage


def _contrasting_colour(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    under = image[mask].astype(np.float32).mean(0)
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            return colour
    return 255.0 - under


def _paint(image: np.ndarray, coverage: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Blend a shaded, slightly noisy fill of ``colour`` into ``image`` by ``coverage``."""
    h, w = coverage.shape
    rows, cols = np.nonzero(coverage.any(1))[0], np.nonzero(coverage.any(0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    shade = ((xx * math.cos(a) + yy * math.sin(a)) / max(h, w)) * rng.uniform(-40, 40)
    fill = colour + shade[..., None] + rng.normal(0, 4, (y1 - y0, x1 - x0, 3))
    alpha = coverage[y0:y1, x0:x1, None]
    window = image[y0:y1, x0:x1].astype(np.float32)
    image[y0:y1, x0:x1] = np.clip(window * (1 - alpha) + fill * alpha, 0, 255).astype(np.uint8)
