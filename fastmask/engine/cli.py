"""What the three commands share: config arguments, model loading, and error reporting.

Expected failures (a bad config key, a broken dataset, an unusable checkpoint, a NaN loss)
end the command with ``error: <message>`` on stderr and exit status 1 (2 for command-line
and config mistakes), without a Python traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError, TrainConfig, apply_overrides, from_dict, load_config
from ..data import DatasetError
from .checkpoint import CheckpointError, check_architecture, load_checkpoint, load_model_state

# The project's configs/: in a checkout (or an editable install) beside the package, in an
# installed package inside it (pyproject.toml installs configs/ as fastmask/configs).
CONFIG_DIRS = (Path(__file__).resolve().parents[2] / "configs", Path(__file__).resolve().parents[1] / "configs")
DEFAULT_CONFIG = "synthetic"


def resolve_config_path(name: str) -> Path:
    """A path as given, or a name from the project's ``configs/`` folder (``synthetic``, ``coco_r50_fpn_1x``)."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in CONFIG_DIRS:
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    where = next((f for f in CONFIG_DIRS if f.is_dir()), CONFIG_DIRS[0])
    raise ConfigError(f"config file {name!r} does not exist (nor {str(where)!r}/{name}.yaml)")


def add_config_arguments(parser: argparse.ArgumentParser, *, default_config: str | None) -> None:
    parser.add_argument("--config", default=default_config, metavar="YAML",
                        help="config file, or the name of one in configs/" +
                             (f" (default: {default_config})" if default_config else
                              " (default: the config stored in the checkpoint)"))
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set solver.max_iter=100 data.batch_size=4")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                        help="kernel backend of the model's ops (default: model.backend, else FASTMASK_BACKEND)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: the config's device; 'auto': the GPU if there is one)")


def config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    overrides = list(args.overrides)
    if args.backend is not None:
        overrides.append(f"model.backend={args.backend}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.config is not None:
        return load_config(resolve_config_path(args.config), overrides)
    return apply_overrides(base if base is not None else TrainConfig(), overrides)


def short_message(exc: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker, its original last line."""
    text = str(exc)
    if "Original Traceback" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


def run_command(fn) -> None:
    """Call ``fn()`` and turn the expected failures into a message and a non-zero exit."""
    from .trainer import NonFiniteLossError

    try:
        fn()
    except ConfigError as exc:
        print(f"error: {short_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except (DatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError) as exc:
        print(f"error: {short_message(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        sys.exit(130)


def load_for_inference(checkpoint: str, args):
    """The checkpoint's model (eval mode, on the CPU), its config (with the command's overrides) and metadata."""
    from .builder import build_model, model_arch

    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"checkpoint {checkpoint!r} has no config or metadata")
    try:
        saved_cfg = from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {checkpoint!r} holds a config this version cannot read: {exc}") from None
    cfg = config_from_args(args, base=saved_cfg)
    meta = ckpt["meta"]
    num_classes = int(meta["num_classes"])
    check_architecture(ckpt, model_arch(cfg.model, num_classes), checkpoint)
    model = build_model(cfg.model, num_classes)
    load_model_state(model, ckpt["model"], checkpoint)
    model.eval()
    return model, cfg, meta
