"""The model, optimizer and learning-rate schedule of a run, built from its config."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, SolverConfig
from .checkpoint import CheckpointError

log = logging.getLogger(__name__)

def model_arch(cfg: ModelConfig, num_classes: int) -> dict:
    """The settings that fix the model's tensor shapes (stored in checkpoints and compared on load)."""
    return {"backbone": cfg.backbone, "norm": cfg.norm, "fpn_channels": cfg.fpn_channels,
            "box_head_dim": cfg.box_head_dim, "mask_head_channels": list(cfg.mask_head_channels),
            "head_norm": cfg.head_norm, "num_classes": num_classes}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``fastmask.models.build_mask_rcnn`` with the config's backbone, head sizes and options.

    Lighter heads than torchvision's (``fpn_channels``, ``box_head_dim``,
    ``mask_head_channels``) or normalised ones (``head_norm``) train and evaluate like any
    other model but no longer load torchvision checkpoints.
    """
    from ..models import build_mask_rcnn

    own = dict(backbone=cfg.backbone, norm=cfg.norm, trainable_layers=cfg.trainable_layers, backend=cfg.backend,
               min_size=tuple(cfg.min_size) if isinstance(cfg.min_size, list) else cfg.min_size,
               max_size=cfg.max_size, fpn_channels=cfg.fpn_channels, box_head_dim=cfg.box_head_dim,
               mask_head_channels=cfg.mask_head_channels, head_norm=cfg.head_norm)
    shadowed = sorted(set(cfg.options) & set(own))
    if shadowed:
        raise ConfigError(f"model.options.{shadowed[0]} is a setting of its own: write it as model.{shadowed[0]}")
    try:
        return build_mask_rcnn(num_classes, **own, **cfg.options)
    except TypeError as exc:
        raise ConfigError(f"model.options holds a keyword the model does not take: {exc}") from None


def compile_model(model: nn.Module, backend: str) -> None:
    """``torch.compile`` the model's dense parts in place (``Module.compile``: parameter names and
    checkpoints unchanged): the backbone with its FPN, the RPN head, the box and mask heads and
    predictors. The detection logic between them (proposals, sampling, NMS, paste) stays eager:
    its shapes depend on the data. ``backend``: a ``torch.compile`` backend name."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"compile: {backend!r} is not a torch.compile backend "
                          f"(one of {sorted(torch._dynamo.list_backends(exclude_tags=()))})")
    heads = model.roi_heads
    for part in (model.backbone, model.rpn.head, heads.box_head, heads.box_predictor, heads.mask_head,
                 heads.mask_predictor):
        part.compile(backend=backend)
    log.info("compiled the backbone, the RPN head and the box and mask heads with torch.compile(backend=%r); "
             "the first calls compile them", backend)


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """ImageNet weights of the ResNet alone (torchvision's ``resnet50`` layout; ``fc.*`` ignored)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"backbone weights {path!r} do not exist") from None
    except Exception as exc:  # torch.load raises many types for a foreign or truncated file
        raise CheckpointError(f"backbone weights {path!r} cannot be read: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"backbone weights {path!r} are not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    body = model.backbone.body
    own = body.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"backbone weights {path!r} do not fit a {model_backbone_name(model)} trunk: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}, shapes differ {shapes[:4]}")
    body.load_state_dict(state)


def model_backbone_name(model: nn.Module) -> str:
    return type(model.backbone.body).__name__


# --------------------------------------------------------------------------- optimizer


NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm)


def build_optimizer(cfg: SolverConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum; normalisation parameters get ``weight_decay_norm`` (when set)."""
    norm_params, other = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            (norm_params if isinstance(module, NORM_TYPES) else other).append(p)
    wd_norm = cfg.weight_decay if cfg.weight_decay_norm is None else cfg.weight_decay_norm
    groups = [{"params": other, "weight_decay": cfg.weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": wd_norm})
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)


class LRSchedule:
    """Multiplier of ``base_lr`` at an iteration: linear warmup, then step or cosine decay.

    A plain object (not a lambda), so that ``LambdaLR.state_dict()`` can be pickled.
    """

    def __init__(self, cfg: SolverConfig):
        self.max_iter = cfg.max_iter
        self.warmup_iters = cfg.warmup_iters
        self.warmup_factor = cfg.warmup_factor
        self.schedule = cfg.schedule
        self.steps = list(cfg.steps)
        self.gamma = cfg.gamma
        self.min_lr_factor = cfg.min_lr_factor

    def __call__(self, it: int) -> float:
        if self.schedule == "step":
            factor = self.gamma ** sum(1 for s in self.steps if it >= s)
        else:
            t = min(it, self.max_iter) / max(self.max_iter, 1)
            factor = self.min_lr_factor + (1 - self.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_scheduler(cfg: SolverConfig, optimizer: torch.optim.Optimizer,
                    iteration: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``cfg`` (``base_lr`` times :class:`LRSchedule`) placed at
    ``iteration``.

    Sets every group's learning rate to the schedule's value there. Built from the config at every
    start, resumed or not: a checkpoint gives only the iteration, so a run resumed under another
    ``max_iter``, ``steps`` or ``base_lr`` follows the schedule of its own config from that iteration on.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.base_lr  # LambdaLR's base; a resumed optimizer state holds the old run's
    # LambdaLR steps once when built, to ``iteration``.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg), last_epoch=iteration - 1)
