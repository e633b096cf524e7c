"""Inference over a dataset and COCO evaluation (box and segm).

The evaluator is pycocotools' COCOeval, or, where the optional ``faster-coco-eval`` package is
installed (``pip install "fastmask[fast-eval]"``), its C++ port of the same evaluation
(``evaluator="faster-coco-eval"``): the same 12 numbers (within 1e-12), 3-4x faster on the
generated sets of ``python -m benchmarks.bench_eval``.

Masks reach the RLE encoder as bool and box-local: a fastmask model is run with
``mask_threshold`` set and ``mask_output="box"``, so it pastes each mask into its own box only,
one bool per pixel (``fastmask.ops.paste_masks_in_boxes``), and the RLEs are made from those
slabs (:func:`box_masks_to_rle`): no full-image mask exists on the device or the host. Another
model's full-image masks are encoded a few at a time (:func:`masks_to_rle`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ..data import InferenceSampler, collate
from ..ops.masks import BoxMasks
from . import distributed as du

log = logging.getLogger(__name__)

# The 12 numbers of COCOeval.summarize(), in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# Probability above which a mask pixel belongs to the object (COCO practice, torchvision's reference).
MASK_THRESHOLD = 0.5
# Masks encoded per call to pycocotools: bounds the CPU copy to this many H x W byte planes.
RLE_CHUNK = 32
# The COCO evaluators ``coco_evaluate`` runs; the first is the default (and a dependency).
EVALUATORS = ("pycocotools", "faster-coco-eval")
FAST_EVAL_INSTALL = 'pip install "fastmask[fast-eval]"'


def masks_to_rle(masks: torch.Tensor) -> list[dict]:
    """COCO compressed RLEs (``counts`` as str) of bool/uint8 Tensor[N, H, W] masks."""
    out = []
    for chunk in masks.split(RLE_CHUNK):
        # pycocotools wants an [H, W, N] Fortran-ordered uint8 array: that is [N, W, H] in C order.
        planes = chunk.to(device="cpu", dtype=torch.uint8).transpose(1, 2).contiguous().numpy()
        rles = mask_utils.encode(planes.transpose(2, 1, 0))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        out.extend(rles)
    return out


def box_masks_to_rle(box_masks: BoxMasks, image_size: tuple[int, int]) -> list[dict]:
    """COCO compressed RLEs of box-local masks (``BoxMasks`` with windows clipped to the image,
    as ``paste_masks_in_boxes(..., image_size=...)`` returns them), made from the slabs alone:
    no full-image mask is ever built. The same RLEs as :func:`masks_to_rle` of the pasted masks.

    COCO's RLE runs over the image in column-major order. Each slab column, padded with a zero
    above and below, holds its own runs (they never cross into the next column), so the run
    boundaries are the slab's value changes mapped to image positions; a one-run ending at the
    image's bottom row and one starting at the top of the next column meet at the same
    position, and that boundary pair is dropped (the runs join, as the encoder joins them);
    so is the boundary at the image's end (no empty last run, as the encoder writes none).
    """
    h, w = image_size
    masks, windows = box_masks
    n = masks.shape[0]
    if n == 0:
        return []
    if masks.dtype != torch.bool:
        masks = masks > MASK_THRESHOLD
    slab = masks.to(device="cpu", dtype=torch.int8).numpy()
    win = windows.cpu().numpy()
    sh, sw = slab.shape[1:]
    cols = np.zeros((n, sw, sh + 2), dtype=np.int8)
    cols[:, :, 1:-1] = slab.transpose(0, 2, 1)
    mask_id, pos = np.nonzero(np.diff(cols.reshape(n, -1), axis=1))
    pos = pos + 1  # the first position of each new run, in the padded column-major slab
    col, row = np.divmod(pos, sh + 2)
    at = (win[mask_id, 0] + col) * h + win[mask_id, 1] - 1 + row
    joined = (at[1:] == at[:-1]) & (mask_id[1:] == mask_id[:-1])
    keep = at < h * w  # a one-run ending with the image has no zero-run after it
    keep[1:] &= ~joined
    keep[:-1] &= ~joined
    mask_id, at = mask_id[keep], at[keep]
    bounds = np.searchsorted(mask_id, np.arange(n + 1))
    runs = [{"size": [h, w], "counts": np.diff(np.concatenate(([0], at[a:b], [h * w]))).tolist()}
            for a, b in zip(bounds[:-1], bounds[1:])]
    out = mask_utils.frPyObjects(runs, h, w)
    for rle in out:
        rle["counts"] = rle["counts"].decode("ascii")
    return out


def detections_to_coco(output: dict, image_id: int, label_to_cat_id: dict[int, int],
                       image_size: tuple[int, int] | None = None) -> tuple[list, list]:
    """One image's model output as COCO results: ``(bbox results, segm results)``. Masks are
    full-image Tensor[N, 1, H, W], or box-local ``BoxMasks`` (then ``image_size`` is needed)."""
    boxes = output["boxes"].float().cpu()
    scores = output["scores"].float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    masks = output["masks"]
    if isinstance(masks, BoxMasks):
        if image_size is None:
            raise ValueError("box-local masks need the image size to be encoded")
        rles = box_masks_to_rle(masks, image_size)
    else:
        if masks.dtype != torch.bool:
            masks = masks > MASK_THRESHOLD
        rles = masks_to_rle(masks[:, 0]) if len(labels) else []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    bbox_res, segm_res = [], []
    for b, s, l, rle in zip(xywh, scores, labels, rles):
        cat = label_to_cat_id[int(l)]
        bbox_res.append({"image_id": image_id, "category_id": cat, "bbox": [round(v, 2) for v in b], "score": s})
        segm_res.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": s})
    return bbox_res, segm_res


def images_to_device(images, device: torch.device) -> list[torch.Tensor]:
    """uint8 CHW images -> float CHW in [0, 1] on ``device`` (converted after the copy: 4x fewer bytes moved)."""
    return [img.to(device, non_blocking=True).float().div_(255.0) for img in images]


@contextlib.contextmanager
def _mask_settings(model, threshold):
    """The model thresholds its masks while pasting and, where it can (fastmask's MaskRCNN),
    returns them box-local: no full-image mask is made on the device or copied to the host."""
    old = getattr(model, "mask_threshold", None), getattr(model, "mask_output", None)
    model.mask_threshold = threshold
    if old[1] is not None:
        model.mask_output = "box"
    try:
        yield
    finally:
        model.mask_threshold = old[0]
        if old[1] is not None:
            model.mask_output = old[1]


@torch.no_grad()
def run_inference(model, dataset, device: torch.device, *, batch_size: int = 1, num_workers: int = 0,
                  autocast_dtype: torch.dtype | None = None, progress: bool = True) -> tuple[list, list, int]:
    """COCO results (bbox, segm) of ``model`` on this rank's share of ``dataset``, and the share's size."""
    info = du.env_dist_info() if du.is_initialized() else du.DistInfo()
    sampler = InferenceSampler(len(dataset), info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate)
    was_training = model.training
    model.eval()
    bbox_res, segm_res = [], []
    bar = tqdm(total=len(sampler), desc="evaluate", unit="img", disable=not (progress and info.is_main),
               dynamic_ncols=True, leave=False)
    try:
        with _mask_settings(model, MASK_THRESHOLD):
            for images, targets in loader:
                images = images_to_device(images, device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    outputs = model(images)
                for out, target, image in zip(outputs, targets, images):
                    b, s = detections_to_coco(out, int(target["image_id"]), dataset.label_to_cat_id,
                                              tuple(image.shape[-2:]))
                    bbox_res.extend(b)
                    segm_res.extend(s)
                bar.update(len(images))
    finally:
        bar.close()
        model.train(was_training)
    return bbox_res, segm_res, len(sampler)


def gather_results(bbox_res: list, segm_res: list, num_images: int) -> tuple[list, list, int]:
    """All ranks' results joined, and the number of images they covered."""
    parts = du.all_gather_object((bbox_res, segm_res, num_images))
    return [r for p in parts for r in p[0]], [r for p in parts for r in p[1]], sum(p[2] for p in parts)


def _results_coco(coco_gt: COCO, results: list, iou_type: str) -> COCO:
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    # loadRes cannot take an empty list: an empty result set scores zero, area by area.
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                     "categories": copy.deepcopy(coco_gt.dataset["categories"])}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def check_evaluator(evaluator: str):
    """The ``faster_coco_eval`` module for ``"faster-coco-eval"``, None for ``"pycocotools"``;
    ValueError for another name, ImportError (saying how to install it) when it is missing."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"unknown COCO evaluator {evaluator!r}: one of {', '.join(EVALUATORS)}")
    if evaluator == "pycocotools":
        return None
    try:
        import faster_coco_eval
    except ImportError as exc:
        raise ImportError(f"the COCO evaluator 'faster-coco-eval' needs the faster-coco-eval package, which is "
                          f"not installed: {FAST_EVAL_INSTALL}") from exc
    return faster_coco_eval


def _faster_gt(fce, coco_gt: COCO):
    """``coco_gt``'s annotations as a faster-coco-eval COCO.

    Its evaluator writes keys of its own ("rle", "ignore") into the ground truth's annotation
    dicts: each is copied (shallowly: the polygons and RLEs are only read), so the caller's
    pycocotools COCO stays as it was, at the cost of one dict per annotation rather than a
    deep copy of the whole set.
    """
    dataset = dict(coco_gt.dataset)
    dataset["annotations"] = [dict(a) for a in coco_gt.dataset.get("annotations", [])]
    dataset.setdefault("categories", [])
    with warnings.catch_warnings():
        # It warns of an annotation id 0 (taken for "unmatched" in its matching). pycocotools'
        # matching has the same limitation, silently: the warning would tell nothing new here.
        warnings.simplefilter("ignore", UserWarning)
        return fce.COCO(dataset)


def _faster_stats(fce, coco_gt, results: list, iou_type: str, image_ids) -> tuple[list, str]:
    """faster-coco-eval's 12 numbers and summary table of ``results`` against ``coco_gt`` (its COCO)."""
    # loadRes adds keys ("id", "area", "iscrowd", a box's polygon) to the result dicts it is given:
    # it gets copies, as pycocotools' loadRes gets a deep copy above. An empty list is its own
    # empty result set (loadRes handles it, unlike pycocotools').
    coco_dt = coco_gt.loadRes([dict(r) for r in results])
    lines: list[str] = []
    ev = fce.COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.print_function = lines.append
    ev.summarize()
    # It also prints and computes AR at IoU 0.5 and 0.75 (all_stats[12:14]); the table keeps
    # pycocotools' 12 lines so that both evaluators write the same tables.
    return [float(v) for v in ev.stats[:len(STAT_NAMES)]], "\n".join(lines[:len(STAT_NAMES)])


def coco_evaluate(coco_gt: COCO, bbox_res: list, segm_res: list, image_ids=None, *,
                  evaluator: str = "pycocotools") -> dict:
    """``{"bbox": {AP, AP50, ...}, "segm": {...}, "tables": {"bbox": str, "segm": str}}``.

    ``coco_gt`` is a pycocotools COCO whichever the ``evaluator`` (one of ``EVALUATORS``):
    faster-coco-eval reads a copy of its annotations.
    """
    fce = check_evaluator(evaluator)
    out: dict = {"tables": {}}
    if fce is not None:
        gt = _faster_gt(fce, coco_gt)
        for iou_type, results in (("bbox", bbox_res), ("segm", segm_res)):
            stats, table = _faster_stats(fce, gt, results, iou_type, image_ids)
            out[iou_type] = dict(zip(STAT_NAMES, stats))
            out["tables"][iou_type] = table
        return out
    for iou_type, results in (("bbox", bbox_res), ("segm", segm_res)):
        coco_dt = _results_coco(coco_gt, results, iou_type)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            ev.summarize()
        out[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
        out["tables"][iou_type] = summary.getvalue().rstrip()
    return out


def evaluate(model, dataset, device: torch.device, *, batch_size: int = 1, num_workers: int = 0,
             autocast_dtype: torch.dtype | None = None, progress: bool = True,
             evaluator: str = "pycocotools") -> dict | None:
    """Run inference on every rank, then COCO evaluation on rank 0 (other ranks return None).

    ``evaluator``: "pycocotools" or "faster-coco-eval" (``coco_evaluate``).
    """
    # Checked before inference, so that a missing package fails at once rather than after it.
    check_evaluator(evaluator)
    t0 = time.perf_counter()
    bbox_res, segm_res, n = run_inference(model, dataset, device, batch_size=batch_size, num_workers=num_workers,
                                          autocast_dtype=autocast_dtype, progress=progress)
    bbox_res, segm_res, n = gather_results(bbox_res, segm_res, n)
    if du.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    t1 = time.perf_counter()
    result = coco_evaluate(dataset.coco, bbox_res, segm_res, image_ids=dataset.ids, evaluator=evaluator)
    result["evaluator"] = evaluator
    result["num_images"] = n
    result["num_detections"] = len(bbox_res)
    result["inference_s"] = round(t1 - t0, 3)
    result["cocoeval_s"] = round(time.perf_counter() - t1, 3)
    return result


def format_tables(result: dict) -> str:
    lines = []
    for iou_type in ("bbox", "segm"):
        lines.append(f"{iou_type}:")
        lines.append(result["tables"][iou_type])
    return "\n".join(lines)
