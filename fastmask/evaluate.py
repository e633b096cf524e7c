"""``python -m fastmask.evaluate --checkpoint CKPT|--weights PTH``: COCO box and mask AP of a model.

The model and the validation data come from the config stored in the checkpoint; change
them with ``--config`` / ``--set`` (for example ``--set data.val.annotations=B.json
data.val.images=DIR``). Prints COCOeval's two 12-number tables (bbox, segm) and writes them
as JSON (``--out``, default ``eval_<checkpoint name>.json`` next to the checkpoint).
Runs on several processes under ``torchrun`` too (each evaluates a share of the images).

``--evaluator faster-coco-eval`` scores with the faster-coco-eval package (an optional extra:
``pip install "fastmask[fast-eval]"``) instead of pycocotools: the same numbers, computed
faster on large validation sets.

``--weights PTH`` evaluates bare weights (a torchvision or fastmask ``state_dict``): the
model and the data come from ``--config`` (default ``coco_r50_fpn_1x``: torchvision's
architecture, COCO val2017 under datasets/coco). Their classes are the data's categories in
id order when the counts match; 91 classes are read as torchvision's COCO labels (label =
category id); any other count is refused. torchvision's own COCO weights were made with
``--set model.options.frozen_bn_eps=0.0`` (torchvision sets it when it loads them).

    python -m fastmask.evaluate --weights maskrcnn_resnet50_fpn_coco.pth \\
        --set data.val.annotations=instances_val2017.json data.val.images=val2017
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .engine.cli import (CommandParser, UsageError, add_config_arguments, add_model_file_arguments,
                         check_output_folder, load_for_inference, model_file_arg, resolve_classes, run_command)
from .engine.evaluation import EVALUATORS, check_evaluator


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m fastmask.evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_file_arguments(parser)
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--out", default=None, metavar="JSON", help="where to write the results")
    parser.add_argument("--evaluator", choices=EVALUATORS, default=EVALUATORS[0],
                        help="the COCO evaluation code: pycocotools (default) or faster-coco-eval, the same "
                             "numbers faster (optional: pip install \"fastmask[fast-eval]\")")
    return parser


def main(argv=None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Before the model is loaded and run: a missing package is reported at once.
        check_evaluator(args.evaluator)
    except ImportError as exc:
        parser.error(str(exc))
    result: dict = {}

    def run():
        from .data import DatasetError, build_dataset
        from .engine import distributed as du
        from .engine.evaluation import evaluate, format_tables
        from .engine.builder import compile_model
        from .engine.trainer import autocast_dtype, main_process_first, torch_threads

        info = du.env_dist_info()
        source = model_file_arg(args)
        model, cfg, meta = load_for_inference(args)
        ckpt = Path(source)
        path = Path(args.out) if args.out else ckpt.with_name(f"eval_{ckpt.stem}.json")
        if info.is_main:  # checked before the evaluation, not after it
            if path.is_dir():
                raise UsageError(f"--out {str(path)!r} is a folder; give the path of a JSON file")
            check_output_folder(path.parent, "the folder of --out" if args.out else
                                "the results folder (the checkpoint's; choose another with --out)")
        device = du.resolve_device(cfg.device, info)
        model.to(device)
        if args.compile:  # the command's flag only (a checkpoint's config may name the training run's)
            compile_model(model, args.compile)
        du.init_distributed(device, info)
        try:
            dataset = main_process_first(lambda: build_dataset(cfg.data, "val", train=False), info)
            if meta["label_to_cat_id"] is None:  # bare weights: their classes are read against this data
                categories = [(c, dataset.class_names[k + 1]) for k, c in enumerate(dataset.cat_ids)]
                resolve_classes(meta, categories, f"the annotations {dataset.annotation_file!r}", source,
                                strict=True)
                # Evaluation maps labels to category ids with the dataset's map: give it the weights'
                # (it differs for torchvision's COCO labels, which are the category ids themselves).
                dataset.label_to_cat_id = dict(meta["label_to_cat_id"])
            expected = {int(k): int(v) for k, v in meta["label_to_cat_id"].items()}
            if dataset.label_to_cat_id != expected:
                raise DatasetError(f"the categories of {dataset.annotation_file!r} (ids {dataset.cat_ids}) differ "
                                   f"from those the checkpoint was trained on (ids {sorted(expected.values())})")
            with torch_threads(cfg.num_threads):
                out = evaluate(model, dataset, device, num_workers=cfg.data.num_workers,
                               autocast_dtype=autocast_dtype(cfg.solver.amp, device), evaluator=args.evaluator)
        finally:
            du.cleanup()
        if out is None:
            return
        print(f"{source}: {len(dataset)} images of {dataset.annotation_file}")
        print(format_tables(out))
        # "checkpoint" names the evaluated file, whichever flag gave it (the key readers know).
        record = {"checkpoint": str(source), "annotations": dataset.annotation_file,
                  **{k: v for k, v in out.items() if k != "tables"}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)
        print(f"wrote {path}")
        result.update(out)

    run_command(run, debug=args.debug)
    return result


def cli() -> None:
    """Console entry point ``fastmask-evaluate``: ``main`` without its return value (which is not an exit status)."""
    main()


if __name__ == "__main__":
    main()
