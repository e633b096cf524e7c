"""``python -m fastmask.predict IMAGE... --checkpoint CKPT|--weights PTH --out DIR``: detect and draw.

The model comes from a fastmask training checkpoint (``--checkpoint``) or from bare weights
(``--weights``: a torchvision or fastmask ``state_dict``, built with ``--config``, default
``coco_r50_fpn_1x``, torchvision's architecture). Bare weights name their classes after the
categories of the config's validation data when their number matches (the synthetic shapes,
or the annotation file when it exists), after COCO's categories for 91 classes (torchvision's
labels), else ``class_1``, ``class_2``, ... torchvision's own COCO weights were made with
``--set model.options.frozen_bn_eps=0.0`` (torchvision sets it when it loads them).

    python -m fastmask.predict image.jpg --weights maskrcnn_resnet50_fpn_coco.pth --out out/

For each image writes ``DIR/<name>.png``: the image with each detected object's mask
(translucent, outlined), box, class name and score. Also writes ``DIR/results.json``:
the detections in COCO results format (``image_id`` counts the images from 1 in the order
given; ``file_name`` names the image; masks as compressed RLE).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .engine.cli import (CommandParser, add_config_arguments, add_model_file_arguments, check_output_folder,
                         config_categories, load_for_inference, model_file_arg, resolve_classes, run_command)

# Detections listed per image on the console (all of them go to results.json).
MAX_PRINTED = 8


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m fastmask.predict", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    add_model_file_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the overlays and results.json")
    parser.add_argument("--score-thresh", type=_fraction, default=0.5,
                        help="keep detections at least this confident (default 0.5; 0 keeps all)")
    add_config_arguments(parser, default_config=None)
    return parser


def read_image(path: str):
    """uint8 Tensor[3, H, W] of an image file, or DatasetError naming it."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from .data import DatasetError

    if os.path.isdir(path):
        raise DatasetError(f"image file {path!r} is a folder, not an image file")
    try:
        with Image.open(path) as im:
            array = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image file {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"image file {path!r} cannot be read: {exc}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    results: list[dict] = []

    def run():
        import torch

        from .engine import distributed as du
        from .engine.evaluation import MASK_THRESHOLD, detections_to_coco, images_to_device
        from .engine.builder import compile_model
        from .engine.trainer import autocast_dtype, torch_threads
        from .engine.visualize import draw_detections
        from .ops import BoxMasks

        images = [read_image(p) for p in args.images]  # every file is checked before the model loads
        out_dir = check_output_folder(args.out, "--out")
        model, cfg, meta = load_for_inference(args)
        if meta["label_to_cat_id"] is None:  # bare weights: names from the config's data, if they fit
            categories, where = config_categories(cfg.data)
            resolve_classes(meta, categories, where, model_file_arg(args), strict=False)
        device = du.resolve_device(cfg.device, du.DistInfo())
        model.to(device)
        if args.compile:  # the command's flag only (a checkpoint's config may name the training run's)
            compile_model(model, args.compile)
        model.mask_threshold = MASK_THRESHOLD
        model.mask_output = "box"  # each mask pasted into its own box: no full-image mask is built
        amp = autocast_dtype(cfg.solver.amp, device)
        class_names = list(meta["class_names"])
        label_to_cat = {int(k): int(v) for k, v in meta["label_to_cat_id"].items()}
        cat_names = {cat: class_names[label] for label, cat in label_to_cat.items()}
        used: set[str] = set()
        for k, (path, image) in enumerate(zip(args.images, images)):
            with torch_threads(cfg.num_threads), torch.no_grad(), \
                    torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                det = model(images_to_device([image], device))[0]
            keep = det["scores"] >= args.score_thresh
            det = {key: BoxMasks(*(t[keep] for t in v)) if key == "masks" else v[keep] for key, v in det.items()}
            size = tuple(image.shape[-2:])
            boxes, segms = detections_to_coco(det, k + 1, label_to_cat, image_size=size)
            for b, s in zip(boxes, segms):
                results.append({"image_id": k + 1, "file_name": str(path), "category_id": b["category_id"],
                                "category_name": cat_names[b["category_id"]],
                                "bbox": b["bbox"], "score": b["score"], "segmentation": s["segmentation"]})
            overlay = draw_detections(image.permute(1, 2, 0).numpy(), det["boxes"].float().cpu().numpy(),
                                      det["labels"].cpu().tolist(), det["scores"].float().cpu().tolist(),
                                      tuple(t.cpu().numpy() for t in det["masks"]), class_names)
            name = Path(path).stem
            if name in used:
                name = f"{name}_{k + 1}"
            used.add(name)
            overlay.save(out_dir / f"{name}.png")
            found = ", ".join(f"{class_names[int(l)]} {float(s):.2f}"
                              for l, s in zip(det["labels"][:MAX_PRINTED].tolist(), det["scores"].tolist()))
            if len(det["scores"]) > MAX_PRINTED:
                found += ", ..."
            print(f"{path}: {len(det['scores'])} object(s){': ' + found if found else ''} -> "
                  f"{out_dir / (name + '.png')}")
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(results))
        os.replace(tmp, out_dir / "results.json")
        print(f"wrote {out_dir / 'results.json'} ({len(results)} detections)")

    run_command(run, debug=args.debug)
    return results


def cli() -> None:
    """Console entry point ``fastmask-predict``: ``main`` without its return value (which is not an exit status)."""
    main()


if __name__ == "__main__":
    main()
