"""COCO evaluation benchmark (CPU): ``coco_evaluate`` with pycocotools and with faster-coco-eval.

``python -m benchmarks.bench_eval`` (``--quick``: 50 images, fewer repeats). A generated set
(``make_set``, fixed seed): 500 images of 256x256, 5 ground-truth objects each (polygons,
one in ten an RLE, one in twenty a crowd region), 20 detections each (boxes and compressed RLE
masks as ``detections_to_coco`` writes them: jittered copies of the objects, some with the
wrong category, and random false positives), 4 categories, objects from 8 to 160 pixels a
side so that the small, medium and large areas all have some. Each evaluator's whole
``coco_evaluate`` (box and segm: results loaded, matched, accumulated, summarised) is timed
as the median of a few runs, and its 24 numbers are compared with pycocotools'
(``max_abs_diff``; ``same_ap``: equal within 1e-12). The evaluation is CPU work whatever the
``--device``: rows say ``cpu``. faster-coco-eval is an optional extra (``pip install
"fastmask[fast-eval]"``); without it only the pycocotools row is made.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .common import bench, main, row

FULL_IMAGES = 500
QUICK_IMAGES = 50
IMAGE_SIZE = 256
OBJECTS_PER_IMAGE = 5
DETECTIONS_PER_IMAGE = 20
NUM_CATEGORIES = 4
# Numbers within this of pycocotools' count as the same: faster-coco-eval's precisions can
# differ from pycocotools' by one rounding (2.2e-16; see tests/test_evaluators.py).
SAME_AP_TOL = 1e-12


def _polygon(rng, cx: float, cy: float, w: float, h: float, size: int) -> list[float]:
    """A convex-ish polygon of 6 to 10 vertices on an ellipse of radii w/2, h/2, clipped to the image."""
    k = int(rng.integers(6, 11))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radius = rng.uniform(0.7, 1.0, k)
    xs = np.clip(cx + np.cos(angles) * radius * w / 2, 0, size - 1)
    ys = np.clip(cy + np.sin(angles) * radius * h / 2, 0, size - 1)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def _rle(polygon: list[float], size: int) -> dict:
    return mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))


def _as_json_rle(rle: dict) -> dict:
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box(rle: dict) -> list[float]:
    return [round(float(v), 2) for v in mask_utils.toBbox(rle)]


def make_set(n_images: int = FULL_IMAGES, seed: int = 0, *, size: int = IMAGE_SIZE,
             objects: int = OBJECTS_PER_IMAGE, detections: int = DETECTIONS_PER_IMAGE,
             num_categories: int = NUM_CATEGORIES) -> tuple[COCO, list, list]:
    """``(ground truth as a pycocotools COCO, bbox results, segm results)`` of a generated set.

    Detections share score, category and image between their box and mask result, as the
    model's do; scores are distinct floats (ties would leave the order of equal scores to
    each evaluator's sort).
    """
    rng = np.random.default_rng(seed)
    images, anns, bbox_res, segm_res = [], [], [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "height": size, "width": size, "file_name": f"{image_id:06d}.png"})
        shapes = []  # (category, cx, cy, w, h) of this image's objects
        for _ in range(objects):
            cat = int(rng.integers(1, num_categories + 1))
            w, h = rng.uniform(8, 160, 2)
            cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
            poly = _polygon(rng, cx, cy, w, h, size)
            rle = _rle(poly, size)
            crowd = rng.random() < 0.05
            segmentation = _as_json_rle(rle) if crowd or rng.random() < 0.1 else [poly]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": int(crowd),
                         "segmentation": segmentation, "area": float(mask_utils.area(rle)), "bbox": _box(rle)})
            shapes.append((cat, cx, cy, w, h))
        for k in range(detections):
            if k < 3 * objects:  # jittered copies of the objects, three each
                cat, cx, cy, w, h = shapes[k % objects]
                jitter = rng.normal(0, 0.08 * (k // objects + 1), 4)
                cx, cy = cx + jitter[0] * w, cy + jitter[1] * h
                w, h = w * np.exp(jitter[2]), h * np.exp(jitter[3])
                if rng.random() < 0.1:
                    cat = int(rng.integers(1, num_categories + 1))
            else:  # false positives anywhere
                cat = int(rng.integers(1, num_categories + 1))
                w, h = rng.uniform(8, 120, 2)
                cx, cy = rng.uniform(0, size, 2)
            rle = _rle(_polygon(rng, cx, cy, max(w, 2.0), max(h, 2.0), size), size)
            score = float(rng.uniform(0.05, 1.0))
            bbox_res.append({"image_id": image_id, "category_id": cat, "bbox": _box(rle), "score": score})
            segm_res.append({"image_id": image_id, "category_id": cat, "segmentation": _as_json_rle(rle),
                             "score": score})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_categories + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco, bbox_res, segm_res


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest difference between two ``coco_evaluate`` results' 24 numbers."""
    return max(abs(a[kind][name] - b[kind][name]) for kind in ("bbox", "segm") for name in a[kind])


def run(quick: bool, device: str) -> list[dict]:
    from fastmask.engine.evaluation import EVALUATORS, check_evaluator, coco_evaluate

    del device  # COCO evaluation runs on the CPU whatever the device of the other benchmarks
    n = QUICK_IMAGES if quick else FULL_IMAGES
    coco, bbox_res, segm_res = make_set(n)
    case = f"{n} images {IMAGE_SIZE}x{IMAGE_SIZE}, {len(coco.anns)} gt, {len(bbox_res)} dets"
    # Whole evaluations take seconds: a short window still gives min_runs runs, one warm-up apart.
    rep = dict(rep_ms=0, min_runs=3) if quick else dict(rep_ms=0, min_runs=7)
    rows, results = [], {}
    for evaluator in EVALUATORS:
        try:
            check_evaluator(evaluator)
        except ImportError:  # the optional one, not installed: no row
            continue

        def fn(evaluator=evaluator):
            with contextlib.redirect_stdout(io.StringIO()):
                results[evaluator] = coco_evaluate(coco, bbox_res, segm_res, evaluator=evaluator)

        timing = bench(fn, device="cpu", **rep)
        extra = {"bbox_AP": results[evaluator]["bbox"]["AP"], "segm_AP": results[evaluator]["segm"]["AP"]}
        if evaluator != EVALUATORS[0]:
            diff = max_abs_diff(results[evaluator], results[EVALUATORS[0]])
            extra.update(max_abs_diff=diff, same_ap=diff <= SAME_AP_TOL,
                         speedup_vs_pycocotools=rows[0]["median_ms"] / timing["median_ms"])
        rows.append(row("coco_eval", case, evaluator, "-", timing, **extra))
    return rows


if __name__ == "__main__":
    rows, _ = main(run, __doc__, columns=("same_ap", "speedup_vs_pycocotools"))
    # The table's two decimals would hide what matters here: the numbers at full precision.
    for r in rows:
        diff = f", max |diff| vs pycocotools {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        print(f"{r['provider']}: bbox AP {r['bbox_AP']:.6f}, segm AP {r['segm_AP']:.6f}{diff}")
