"""Run configuration: plain dataclasses loaded from YAML, overridable from the command line.

A config file is a nested mapping whose keys are the dataclass fields below; a key that is
not a field raises :class:`ConfigError` naming it (``solver.base_lr`` rather than a silent
typo). ``--set key=value`` overrides use the same dotted names and are converted to the
field's type (``--set solver.max_iter=100 data.batch_size=4 model.options.box_score_thresh=0.1``).

A data split whose ``annotations`` is ``null`` is the built-in synthetic shapes dataset;
pointing ``data.train.annotations`` / ``data.train.images`` (and the ``val`` pair) at a COCO
JSON file and an image folder trains on that instead, with no code change.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


@dataclass
class SplitConfig:
    """One dataset split: a COCO JSON file and its image folder, or ``null`` for synthetic."""

    annotations: str | None = None
    images: str | None = None


@dataclass
class SyntheticConfig:
    """The built-in shapes dataset (generated once into ``cache_dir``; no download)."""

    num_train: int = 800
    num_val: int = 100
    image_size: int = 128          # shorter image side, pixels
    max_aspect: float = 1.5        # longer side is up to this times the shorter one
    min_objects: int = 1
    max_objects: int = 6
    min_object_frac: float = 0.08  # object size as a fraction of the shorter side
    max_object_frac: float = 0.5
    classes: list[str] = field(default_factory=lambda: ["circle", "rectangle", "triangle"])
    max_rotation: float = 180.0    # degrees a polygon may turn from upright / axis-aligned, either way
    max_occlusion: float = 0.5     # a new shape may hide at most this fraction of an earlier one
    texture_contrast: float = 45.0  # strongest background texture amplitude (0..255 scale)
    seed: int = 0
    cache_dir: str = ".cache/fastmask/synthetic"


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    batch_size: int = 2                 # images per process and iteration
    num_workers: int = 2                # loader processes per training process
    aspect_ratio_grouping: bool = True  # batch images of like orientation together
    hflip_prob: float = 0.5
    # Optional resize in the loader (shorter side drawn from the list, longer side capped);
    # empty: images reach the model at their own size and the model's transform resizes them.
    train_min_size: list[int] = field(default_factory=list)
    train_max_size: int = 1333
    # What to do with an annotation that cannot be used (invalid polygon, zero-area box):
    # "error" stops with a message naming it; "skip" drops it and logs how many were dropped.
    invalid_annotations: str = "error"


@dataclass
class ModelConfig:
    """Arguments of ``fastmask.models.build_mask_rcnn``."""

    backbone: str = "resnet50"
    norm: str = "frozen_bn"
    trainable_layers: int = 3
    backend: str | None = None
    min_size: int | list[int] = 800   # a list: one drawn per training batch (multi-scale)
    max_size: int = 1333
    # Head sizes; torchvision's (256, 1024, [256]*4) keep its checkpoint layout, smaller ones
    # make a lighter model for training from scratch.
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_channels: list[int] = field(default_factory=lambda: [256, 256, 256, 256])
    head_norm: str | None = None      # "gn": GroupNorm after every FPN and mask-head convolution
    # Any other keyword of the model with torchvision's names (rpn_*, box_*, ...).
    options: dict[str, Any] = field(default_factory=dict)
    # Local checkpoints to start from: a whole Mask R-CNN (torchvision or fastmask format,
    # mismatched predictor tensors skipped) and/or ImageNet weights of the ResNet alone.
    weights: str | None = None
    backbone_weights: str | None = None


@dataclass
class SolverConfig:
    max_iter: int = 3000
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float | None = 0.0   # normalisation weights and biases; null: weight_decay
    warmup_iters: int = 200
    warmup_factor: float = 0.001
    schedule: str = "cosine"                 # "step" or "cosine"
    steps: list[int] = field(default_factory=list)  # iterations where "step" multiplies by gamma
    gamma: float = 0.1
    min_lr_factor: float = 0.0               # cosine ends at base_lr * min_lr_factor
    clip_grad_norm: float | None = None
    amp: str = "bf16"                        # "bf16", "fp16" or "off"; autocast on CUDA only


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    output_dir: str = "runs/default"
    device: str = "auto"              # "auto" (CUDA if present), "cpu", "cuda", "cuda:1"
    seed: int = 0
    eval_period: int = 0              # iterations between evaluations; 0: at the end only
    checkpoint_period: int = 1000     # iterations between checkpoints (and at the end)
    log_period: int = 20              # iterations between metric lines
    num_threads: int = 0              # CPU threads for torch; 0: leave torch's default
    # Training: torch.compile backend for the model's dense parts (backbone, RPN head, box and
    # mask heads), e.g. "inductor"; null: eager (the default). The first calls compile (minutes).
    # evaluate / predict compile only when given --compile.
    compile: str | None = None


_ENUMS = {
    "data.invalid_annotations": ("error", "skip"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "model.norm": ("frozen_bn", "bn", "gn"),
    "model.backend": (None, "auto", "triton", "torch"),
    "model.head_norm": (None, "gn"),
    "solver.schedule": ("step", "cosine"),
    "solver.amp": ("bf16", "fp16", "off"),
}


# --------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """``value`` (parsed YAML) checked and converted to the annotated type ``tp``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key} must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls, mapping: dict, prefix: str = ""):
    """An instance of dataclass ``cls`` from a mapping, rejecting keys that are not fields."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key {full!r}; {cls.__name__} has: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check the choices and ranges that types alone do not express."""
    for key, allowed in _ENUMS.items():
        value = get_value(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    if not cfg.model.mask_head_channels or min(cfg.model.mask_head_channels) <= 0:
        raise ConfigError(f"model.mask_head_channels must be a non-empty list of positive ints, "
                          f"got {cfg.model.mask_head_channels}")
    positive = ("model.fpn_channels", "model.box_head_dim", "data.batch_size", "solver.max_iter",
                "data.synthetic.image_size", "checkpoint_period", "log_period", "data.synthetic.num_train",
                "data.synthetic.num_val", "data.synthetic.min_objects")
    for key in positive:
        if get_value(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {get_value(cfg, key)!r}")
    for key in ("data.num_workers", "eval_period", "solver.warmup_iters", "num_threads"):
        if get_value(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get_value(cfg, key)!r}")
    syn = cfg.data.synthetic
    if syn.max_objects < syn.min_objects:
        raise ConfigError("data.synthetic.max_objects must be >= data.synthetic.min_objects")
    if not 0 <= syn.max_rotation <= 180:
        raise ConfigError(f"data.synthetic.max_rotation must be in [0, 180] degrees, got {syn.max_rotation}")
    if not 0 <= syn.max_occlusion < 1:
        raise ConfigError(f"data.synthetic.max_occlusion must be in [0, 1), got {syn.max_occlusion}")
    if not 0 <= syn.texture_contrast <= 255:
        raise ConfigError(f"data.synthetic.texture_contrast must be in [0, 255], got {syn.texture_contrast}")
    if not 0 < syn.min_object_frac <= syn.max_object_frac <= 1:
        raise ConfigError("data.synthetic needs 0 < min_object_frac <= max_object_frac <= 1")
    if not 0 <= cfg.data.hflip_prob <= 1:
        raise ConfigError(f"data.hflip_prob must be in [0, 1], got {cfg.data.hflip_prob}")
    for split in ("train", "val"):
        s = getattr(cfg.data, split)
        if (s.annotations is None) != (s.images is None):
            raise ConfigError(f"data.{split}.annotations and data.{split}.images must be given together")
    if sorted(cfg.solver.steps) != cfg.solver.steps:
        raise ConfigError(f"solver.steps must be increasing, got {cfg.solver.steps}")
    return cfg


# --------------------------------------------------------------------------- public helpers


def from_dict(mapping: dict | None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a nested mapping (missing keys keep defaults)."""
    return validate(_build(TrainConfig, mapping or {}))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (``None``: the defaults) and apply ``key=value`` overrides."""
    mapping: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        if not isinstance(mapping, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        try:
            cfg = _build(TrainConfig, mapping)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    else:
        cfg = TrainConfig()
    return apply_overrides(cfg, overrides)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's reason and position on one line (its own message spans several, with a source excerpt)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value parsed as YAML (so 3, 0.1, [1,2], null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def get_value(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def apply_overrides(cfg: TrainConfig, overrides) -> TrainConfig:
    """A new config with each ``key=value`` applied, converted to the field's type."""
    mapping = to_dict(cfg)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node, cls, walked = mapping, TrainConfig, []
        for i, part in enumerate(parts):
            walked.append(part)
            last = i == len(parts) - 1
            if cls is None:  # inside a free-form mapping (model.options)
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                continue
            hints = typing.get_type_hints(cls)
            if part not in hints:
                raise ConfigError(f"unknown config key {'.'.join(walked)!r} in override {text!r}; "
                                  f"{cls.__name__} has: {', '.join(sorted(hints))}")
            tp = hints[part]
            if last:
                node[part] = _convert(value, tp, key)
            elif dataclasses.is_dataclass(tp):
                node, cls = node[part], tp
            elif typing.get_origin(tp) is dict:
                node, cls = node[part], None
            else:
                raise ConfigError(f"config key {'.'.join(walked)!r} is a value, not a section (override {text!r})")
    return from_dict(mapping)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
