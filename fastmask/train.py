"""``python -m fastmask.train``: train Mask R-CNN.

With no arguments it trains the light synthetic-shapes model of ``configs/synthetic.yaml``
(data generated on first use, no download) on the GPU if there is one, else on the CPU,
and writes checkpoints, metrics, the COCO evaluation and a loss plot under ``runs/``.

    python -m fastmask.train
    python -m fastmask.train --config configs/coco_r50_fpn_1x.yaml --set data.train.annotations=...
    python -m fastmask.train --set solver.max_iter=500 output_dir=runs/short --resume
    python -m fastmask.train --config coco_r50_fpn_1x --weights maskrcnn_resnet50_fpn_coco.pth --set ...
    torchrun --nproc_per_node=8 -m fastmask.train --config coco_r50_fpn_1x      # DDP
"""

from __future__ import annotations

import argparse

from .engine.cli import (DEFAULT_CONFIG, CommandParser, add_config_arguments, check_device, check_output_folder,
                         config_from_args, run_command)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m fastmask.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config=DEFAULT_CONFIG)
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/checkpoint.pth (model, optimizer, schedule, RNG, iteration)")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="fine-tune from Mask R-CNN weights: a torchvision or fastmask state_dict, or the model "
                             "of a fastmask checkpoint (told apart by content). With another class count the "
                             "box and mask predictors keep their initial values (head replacement); every other "
                             "tensor must fit the config's model")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    def run():
        from .engine import distributed as du
        from .engine.trainer import train

        cfg = config_from_args(args)
        check_device(cfg.device)
        if du.env_dist_info().is_main:
            check_output_folder(cfg.output_dir, "output_dir")
        train(cfg, resume=args.resume, weights=args.weights)

    run_command(run, debug=args.debug,
                interrupted="interrupted; the last checkpoint is intact (continue with --resume)")


if __name__ == "__main__":
    main()
