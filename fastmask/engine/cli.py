"""What the three commands share: config arguments, model loading, and error reporting.

``evaluate`` and ``predict`` take their model from ``--checkpoint`` (a fastmask training
checkpoint: weights, config and class names) or ``--weights`` (bare weights: a torchvision
or fastmask ``state_dict``). Either flag accepts either kind of file: the file's content
decides how it is read, and a line on stderr says so when it is not what the flag names.
Bare weights carry no config: the model is built from ``--config`` (default
``coco_r50_fpn_1x``, torchvision's ``maskrcnn_resnet50_fpn`` architecture) with the class
count of the weights' box predictor; their class names and category ids come from the data
the command uses (see :func:`resolve_classes`).

Expected failures end the command with one line, ``error: <message>``, on stderr and no
Python traceback: exit status 2 for command-line and config mistakes (an unknown option or
config key, a bad value, a missing or malformed config file, an unusable ``--device``, an
output folder that cannot be written), 1 for the rest (a broken dataset or image, an
unusable checkpoint, a NaN loss, an OSError). ``--debug`` lets them propagate instead, with
their full traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from ..config import ConfigError, DataConfig, TrainConfig, apply_overrides, from_dict, load_config
from ..data import DatasetError
from .checkpoint import CheckpointError, ModelFile, check_architecture, load_model_state, read_model_file

log = logging.getLogger(__name__)

# The project's configs/: in a checkout (or an editable install) beside the package, in an
# installed package inside it (pyproject.toml installs configs/ as fastmask/configs).
CONFIG_DIRS = (Path(__file__).resolve().parents[2] / "configs", Path(__file__).resolve().parents[1] / "configs")
DEFAULT_CONFIG = "synthetic"
# The model config of bare --weights when no --config is given: torchvision's
# maskrcnn_resnet50_fpn layout, the architecture a torchvision state_dict has.
DEFAULT_WEIGHTS_CONFIG = "coco_r50_fpn_1x"

# torchvision's COCO label order: label k is COCO category id k, "N/A" where COCO has no
# category (its 91-class checkpoints score all 91 labels).
COCO_CLASS_NAMES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


class UsageError(Exception):
    """A command-line mistake (exit status 2); the message names the argument."""


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``error:`` line, like the commands' other errors."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def resolve_config_path(name: str) -> Path:
    """A path as given, or a name from the project's ``configs/`` folder (``synthetic``, ``coco_r50_fpn_1x``)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config file {name!r} is a folder, not a file")
    for folder in CONFIG_DIRS:
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    where = next((f for f in CONFIG_DIRS if f.is_dir()), CONFIG_DIRS[0])
    raise ConfigError(f"config file {name!r} does not exist (nor does {str(where / (name + '.yaml'))!r})")


def add_config_arguments(parser: argparse.ArgumentParser, *, default_config: str | None) -> None:
    parser.add_argument("--config", default=default_config, metavar="YAML",
                        help="config file, or the name of one in configs/" +
                             (f" (default: {default_config})" if default_config else
                              " (default: the config stored in the checkpoint; for bare --weights "
                              f"{DEFAULT_WEIGHTS_CONFIG}, torchvision's architecture)"))
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set solver.max_iter=100 data.batch_size=4")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                        help="kernel backend of the model's ops (default: model.backend, else FASTMASK_BACKEND)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: the config's device; 'auto': the GPU if there is one)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the model's backbone and heads (off by default; BACKEND defaults to "
                             "inductor). The first calls compile, which takes minutes on a CPU")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, raise it with its full Python traceback instead of printing one line")


def add_model_file_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` or ``--weights``: one of them, naming the model to run."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", metavar="CKPT",
                       help="a fastmask training checkpoint (.pth): the model with its config and class names")
    group.add_argument("--weights", metavar="PTH",
                       help="bare Mask R-CNN weights: a torchvision or fastmask state_dict (e.g. torchvision's "
                            "maskrcnn_resnet50_fpn weights). The model comes from --config (default "
                            f"{DEFAULT_WEIGHTS_CONFIG}), the class count from the weights. Either flag takes "
                            "either kind of file: the content decides")


def config_from_args(args, base: TrainConfig | None = None, default: str | None = None) -> TrainConfig:
    """The config of ``--config`` (else ``default``, else ``base``, else the defaults) with the overrides."""
    overrides = list(args.overrides)
    if args.backend is not None:
        overrides.append(f"model.backend={args.backend}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if getattr(args, "compile", None) is not None:
        overrides.append(f"compile={args.compile}")
    name = args.config if args.config is not None else default
    if name is not None:
        return load_config(resolve_config_path(name), overrides)
    return apply_overrides(base if base is not None else TrainConfig(), overrides)


def check_device(name: str) -> None:
    """Raise :class:`ConfigError` when the config's ``device`` cannot be used on this machine."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device name (cpu, cuda, cuda:N or auto)") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available ({why}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")


def check_output_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, or :class:`UsageError`.

    ``what`` names the argument ("--out", "output_dir") in the message.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        blocker = next((p for p in folder.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UsageError(f"{what} {str(folder)!r} cannot be created: {str(blocker)!r} is a file") from None
        raise UsageError(f"{what} {str(folder)!r} cannot be written: {exc.strerror or exc}") from None
    return folder


def short_message(exc: BaseException) -> str:
    """The error's message on one line; for one re-raised from a DataLoader worker, its original last line."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or type(exc).__name__}: {str(exc.filename)!r}"
        return text + (f" -> {str(exc.filename2)!r}" if exc.filename2 is not None else "")
    text = str(exc)
    if "Original Traceback" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last = lines[-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def exit_status(exc: BaseException) -> int | None:
    """The exit status of an expected failure, None for anything else (a bug: it keeps its traceback)."""
    from .trainer import NonFiniteLossError

    if isinstance(exc, (ConfigError, UsageError)):
        return 2
    if isinstance(exc, (DatasetError, CheckpointError, NonFiniteLossError, OSError)):
        return 1
    return None


def run_command(fn, *, debug: bool = False, interrupted: str = "interrupted") -> None:
    """Call ``fn()`` and turn the expected failures into one ``error:`` line and a non-zero exit.

    With ``debug`` they propagate (with their traceback). ``interrupted`` is the line
    printed on Ctrl-C.
    """
    try:
        fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        status = exit_status(exc)
        if status is None or debug:
            raise
        print(f"error: {short_message(exc)}", file=sys.stderr)
        sys.exit(status)


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (not the one at set-up, which a caller may have replaced)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _setup_notes() -> None:
    """This module's INFO lines go to stderr as ``info: ...``, from the main process only."""
    from . import distributed as du

    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("info: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if du.env_dist_info().is_main else logging.WARNING)


def model_file_arg(args) -> str:
    """The file given to ``--checkpoint`` or ``--weights``."""
    return args.checkpoint if args.checkpoint is not None else args.weights


def load_for_inference(args):
    """The model of ``--checkpoint`` / ``--weights`` (eval mode, on the CPU), its config and metadata.

    For a fastmask checkpoint: its config (with the command's ``--config`` / ``--set``) and
    its metadata. For bare weights: the config of ``--config`` (default
    :data:`DEFAULT_WEIGHTS_CONFIG`) and ``{"num_classes": n, "class_names": None,
    "label_to_cat_id": None}``, which the command completes with :func:`resolve_classes`.
    """
    _setup_notes()
    flag = "--checkpoint" if args.checkpoint is not None else "--weights"
    path = model_file_arg(args)
    src = read_model_file(path, "checkpoint" if flag == "--checkpoint" else "weights")
    if src.kind == "checkpoint":
        # Its config and class names are worth more than the model alone: used whatever the flag.
        model, cfg, meta = _load_checkpoint_model(src, args)
        if flag == "--weights":
            log.info("%s is a fastmask training checkpoint: read with its config and class names, as "
                     "--checkpoint reads it", path)
        return model, cfg, meta
    try:
        model, cfg, meta = _load_bare_weights(src, args)
    except CheckpointError as exc:
        if flag == "--checkpoint":
            raise CheckpointError(f"{exc} ({path!r} is not a fastmask training checkpoint: it holds a state dict, "
                                  "so it was read as --weights reads one)") from None
        raise
    if flag == "--checkpoint":
        # Friendlier than refusing: bare weights are all the command needs besides a config.
        log.info("%s is not a fastmask training checkpoint but bare weights (a state dict): read as --weights "
                 "reads them", path)
    return model, cfg, meta


def _load_checkpoint_model(src: ModelFile, args):
    from .builder import build_model, model_arch

    ckpt, path = src.ckpt, src.path
    if "config" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"checkpoint {path!r} has no config or metadata")
    try:
        saved_cfg = from_dict(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path!r} holds a config this version cannot read: {exc}") from None
    cfg = config_from_args(args, base=saved_cfg)
    check_device(cfg.device)
    meta = ckpt["meta"]
    num_classes = int(meta["num_classes"])
    check_architecture(ckpt, model_arch(cfg.model, num_classes), path)
    model = build_model(cfg.model, num_classes)
    load_model_state(model, src.state, path)
    model.eval()
    return model, cfg, meta


def _load_bare_weights(src: ModelFile, args):
    from ..models import load_weights
    from .builder import build_model

    # The class count is the weights' own: a config has none (training takes it from the data),
    # and a torchvision COCO state_dict's 91 classes would fit no dataset-derived count anyway.
    num_classes = src.num_classes
    name = args.config if args.config is not None else DEFAULT_WEIGHTS_CONFIG
    cfg = config_from_args(args, default=DEFAULT_WEIGHTS_CONFIG)
    check_device(cfg.device)
    if args.config is None:
        log.info("bare weights carry no config: the model is built from config %r (torchvision's "
                 "maskrcnn_resnet50_fpn layout); name another with --config", name)
    model = build_model(cfg.model, num_classes)
    try:
        # The fine-tuning loader: it drops BatchNorm step counters (torchvision's untrained models
        # have them) and names the keys that do not fit; nothing may be skipped here.
        load_weights(model, src.state, skip_mismatched=False)
    except ValueError as exc:
        m = cfg.model
        raise CheckpointError(
            f"weights {src.path!r} do not fit the model of config {name!r} (backbone {m.backbone}, norm {m.norm}, "
            f"fpn_channels {m.fpn_channels}, box_head_dim {m.box_head_dim}, mask_head_channels "
            f"{list(m.mask_head_channels)}, head_norm {m.head_norm}, {num_classes} classes): {exc}. Give the config "
            "the weights were made with (--config, --set model.KEY=VALUE)") from None
    model.eval()
    log.info("%s: bare weights with %d classes (background included)", src.path, num_classes)
    return model, cfg, {"num_classes": num_classes, "class_names": None, "label_to_cat_id": None}


def resolve_classes(meta: dict, categories: list[tuple[int, str]] | None, where: str, path: str, *,
                    strict: bool) -> dict:
    """Give bare weights' ``meta`` class names and a label -> category id map, in place.

    ``categories`` (``(id, name)`` pairs of the data the command uses, or None) decide:

    - as many categories as the weights have classes: label k is the k-th category in id
      order, as fastmask's training numbers them;
    - else 91 classes and category ids within 1..90 (or no categories): torchvision's COCO
      convention, label k is COCO category id k, named by :data:`COCO_CLASS_NAMES`;
    - else, when ``strict`` (evaluation, whose scores would be meaningless): CheckpointError;
      otherwise (prediction) labels stand for category ids and are named ``class_k``.
    """
    n = int(meta["num_classes"]) - 1
    if categories is not None and len(categories) == n:
        cats = sorted(categories)
        meta["class_names"] = ["__background__"] + [str(name) for _, name in cats]
        meta["label_to_cat_id"] = {k + 1: int(c) for k, (c, _) in enumerate(cats)}
        log.info("the weights' %d classes are the categories of %s, in id order", n, where)
    elif n == len(COCO_CLASS_NAMES) - 1 and (categories is None or all(1 <= c <= n for c, _ in categories)):
        meta["class_names"] = list(COCO_CLASS_NAMES)
        meta["label_to_cat_id"] = {k: k for k in range(1, n + 1)}
        log.info("the weights' 91 classes are read as torchvision's COCO labels (label = COCO category id)%s",
                 "" if categories is None else f"; {where} has {len(categories)} of those categories")
    elif strict:
        ids = sorted(c for c, _ in categories or [])
        raise CheckpointError(
            f"weights {path!r} score {n} classes, but {where} has {len(ids)} categories (ids {ids[:10]}"
            f"{', ...' if len(ids) > 10 else ''}): evaluate them on the data they were trained for "
            "(--set data.val.annotations=JSON data.val.images=DIR), or use a fastmask checkpoint, which "
            "stores its categories")
    else:
        meta["class_names"] = ["__background__"] + [f"class_{k}" for k in range(1, n + 1)]
        meta["label_to_cat_id"] = {k: k for k in range(1, n + 1)}
        log.info("%s has no class names and %s does not have its %d classes: labels are written as category "
                 "ids and named class_1..class_%d", path, where, n, n)
    return meta


def config_categories(data: DataConfig) -> tuple[list[tuple[int, str]] | None, str]:
    """``(id, name)`` pairs of the validation split the config describes, without building it, and where from.

    None when its annotation file is absent or unreadable: prediction does not need it.
    """
    from ..data import read_coco_json

    split = data.val
    if split.annotations is None:
        # The synthetic generator numbers its categories 1..K in the order of data.synthetic.classes.
        return [(k + 1, name) for k, name in enumerate(data.synthetic.classes)], "data.synthetic.classes"
    where = f"the annotations {split.annotations!r}"
    if not os.path.isfile(split.annotations):
        return None, where
    try:
        cats = read_coco_json(split.annotations)["categories"]
        return [(int(c["id"]), str(c.get("name", c["id"]))) for c in cats], where
    except (DatasetError, KeyError, TypeError, ValueError) as exc:
        log.info("class names not read from %s: %s", split.annotations, exc)
        return None, where
