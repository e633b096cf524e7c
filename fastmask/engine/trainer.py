"""The training loop: read it top to bottom.

``train(cfg)`` builds the datasets, the model, the optimizer and the schedule, optionally
resumes from ``output_dir/checkpoint.pth``, then runs ``solver.max_iter`` iterations of
SGD, writing metrics, checkpoints and evaluations under ``output_dir``:

- ``config.yaml`` (the resolved config), ``log.txt``, ``metrics.jsonl``;
- ``checkpoint.pth`` (rewritten atomically every ``checkpoint_period`` iterations) and
  ``model_final.pth`` (weights and metadata) at the end;
- ``eval.json`` (the final COCO tables) and ``loss_curves.png``.

The parts, in the order ``_train`` calls them: :func:`setup` (model, optimizer, scaler, and
:func:`resume_from` or the initial weights, then :func:`.builder.build_scheduler`), the loader,
:func:`run_step` once per iteration, :func:`save_checkpoint` and :func:`evaluate_at` every
period, :func:`finish`.

Resuming is exact: the data order and augmentations are a function of the iteration
(:class:`fastmask.data.TrainBatchSampler`), the checkpoint holds the optimizer, gradient
scaler and every random generator, and the learning rate is a function of the config and the
iteration, so a run interrupted and resumed ends with the same weights as one that was not
(bitwise on the CPU). A run resumed under another schedule (a longer ``max_iter``, other
``steps`` or ``base_lr``) follows its own config's schedule from the checkpoint's iteration.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from .. import config as config_mod
from ..config import TrainConfig
from ..data import DatasetError, TrainBatchSampler, build_dataset, collate, orientation_groups
from . import distributed as du
from .builder import build_model, build_optimizer, build_scheduler, compile_model, load_backbone_weights, model_arch
from .checkpoint import (FINAL, FORMAT, LAST, CheckpointError, check_architecture, load_checkpoint,
                         load_model_state, read_model_file, rng_state, save_atomic, set_rng_state)
from .evaluation import evaluate, format_tables, images_to_device
from .metrics import MetricsWriter, plot_loss_curves

log = logging.getLogger("fastmask")

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or infinite; the run stops before they reach the weights."""


# --------------------------------------------------------------------------- set-up helpers


class _TqdmHandler(logging.Handler):
    """Console log lines that do not break the progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(output_dir: Path | None, is_main: bool) -> None:
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    log.addHandler(console)
    if output_dir is not None and is_main:
        file_handler = logging.FileHandler(output_dir / "log.txt")
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)
    # Messages of the library modules (dataset checks, weight loading) go to the same place.
    for name in ("fastmask.data", "fastmask.models", "fastmask.engine"):
        sub = logging.getLogger(name)
        sub.handlers = list(log.handlers)
        sub.setLevel(log.level)
        sub.propagate = False


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to ``n`` (0: unchanged) inside the block, the caller's again after it."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA; full precision on the CPU (autocast there is slower, not faster)."""
    if device.type != "cuda" or amp == "off":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def main_process_first(fn, info: du.DistInfo):
    """Run ``fn`` on rank 0 first (it may generate the synthetic files), then on the others.

    A failure on rank 0 is re-raised on every rank instead of leaving them waiting.
    """
    if not info.distributed:
        return fn()
    error = None
    if info.is_main:
        try:
            result = fn()
        except (DatasetError, CheckpointError, config_mod.ConfigError) as exc:
            error = (type(exc).__name__, str(exc))
    error = du.broadcast_object(error)
    if error is not None:
        kind = {"DatasetError": DatasetError, "CheckpointError": CheckpointError}.get(error[0], config_mod.ConfigError)
        raise kind(error[1])
    if not info.is_main:
        result = fn()
    return result


def build_datasets(cfg: TrainConfig, info: du.DistInfo):
    def make():
        return build_dataset(cfg.data, "train", train=True), build_dataset(cfg.data, "val", train=False)

    train_ds, val_ds = main_process_first(make, info)
    if train_ds.cat_ids != val_ds.cat_ids:
        raise DatasetError(f"the categories of {val_ds.annotation_file!r} (ids {val_ds.cat_ids}) differ from those "
                           f"of {train_ds.annotation_file!r} (ids {train_ds.cat_ids})")
    return train_ds, val_ds


def dataset_meta(ds, cfg: TrainConfig) -> dict:
    return {"num_classes": ds.num_classes, "class_names": ds.class_names,
            "label_to_cat_id": {int(k): int(v) for k, v in ds.label_to_cat_id.items()},
            "arch": model_arch(cfg.model, ds.num_classes)}


def load_initial_weights(model, cfg: TrainConfig, weights: str | None) -> None:
    """``--weights`` / ``model.weights`` (a whole Mask R-CNN) and ``model.backbone_weights`` (a ResNet)."""
    from ..models import load_weights

    if cfg.model.backbone_weights:
        load_backbone_weights(model, cfg.model.backbone_weights)
        log.info("loaded backbone weights from %s", cfg.model.backbone_weights)
    path = weights or cfg.model.weights
    if path:
        # The same reader as evaluate/predict --weights: a fastmask checkpoint gives its model, a
        # torchvision or fastmask state_dict is taken as it is; anything else is refused by name.
        src = read_model_file(path, "weights")
        try:
            skipped = load_weights(model, src.state)
        except ValueError as exc:
            raise CheckpointError(f"weights {path!r}: {exc}") from None
        kind = "the model of a fastmask checkpoint" if src.kind == "checkpoint" else "a state dict"
        log.info("loaded weights from %s (%s)%s", path, kind, f"; kept initial values for {len(skipped)} tensors "
                 f"whose shapes differ (another class count): {', '.join(skipped)}" if skipped else "")


def to_device_targets(targets, device: torch.device) -> list[dict]:
    return [{"boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device, non_blocking=True),
             "masks": t["masks"].to(device, non_blocking=True)} for t in targets]


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, *, resume: bool = False, weights: str | None = None) -> dict:
    """Train as ``cfg`` says; returns the final evaluation (on rank 0; ``{}`` elsewhere)."""
    info = du.env_dist_info()
    device = du.resolve_device(cfg.device, info)
    du.init_distributed(device, info)
    try:
        with torch_threads(cfg.num_threads):
            return _train(cfg, info, device, resume, weights)
    finally:
        du.cleanup()


def _train(cfg: TrainConfig, info: du.DistInfo, device: torch.device, resume: bool, weights: str | None) -> dict:
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save_config(cfg, out / "config.yaml")
    du.barrier()
    setup_logging(out, info.is_main)
    log.info("device %s, %d process(es), %d CPU thread(s); output in %s", device, info.world_size,
             torch.get_num_threads(), out)

    train_ds, val_ds = build_datasets(cfg, info)
    log.info("train: %d images from %s; val: %d images; %d class(es): %s", len(train_ds), train_ds.annotation_file,
             len(val_ds), train_ds.num_classes - 1, ", ".join(train_ds.class_names[1:]))
    state = setup(cfg, info, device, dataset_meta(train_ds, cfg), out / LAST, resume, weights)
    loader = build_train_loader(cfg, train_ds, info, device, state.start_iter)
    metrics = MetricsWriter(out / "metrics.jsonl", resume_iteration=state.start_iter if state.resumed else None) \
        if info.is_main else None

    max_iter = cfg.solver.max_iter
    log.info("training iterations %d..%d, %d image(s) per iteration", state.start_iter, max_iter,
             cfg.data.batch_size * info.world_size)
    progress = Progress(cfg, info, state.start_iter, metrics)
    state.train_model.train()
    data_iter = iter(loader)
    try:
        for iteration in range(state.start_iter + 1, max_iter + 1):
            images, targets = next(data_iter)
            loss_values, lr = run_step(state, images, targets, iteration)
            progress.update(iteration, loss_values, lr)
            if iteration % cfg.checkpoint_period == 0 or iteration == max_iter:
                save_checkpoint(state, iteration)
            if cfg.eval_period and iteration % cfg.eval_period == 0 and iteration != max_iter:
                evaluate_at(state, val_ds, metrics, iteration)
    finally:
        progress.close()
        del data_iter  # stops the loader's worker processes
    log.info("training finished in %.1f s", progress.elapsed())
    return finish(state, val_ds, metrics)


# --------------------------------------------------------------------------- the parts of a run


@dataclass
class TrainState:
    """The objects a run trains with, and where it stands; built by :func:`setup`."""

    cfg: TrainConfig
    info: du.DistInfo
    meta: dict                            # dataset_meta(): saved in every checkpoint
    device: torch.device
    model: torch.nn.Module                # the bare model: checkpoints and evaluation
    train_model: torch.nn.Module          # what runs forward and backward: DistributedDataParallel(model) or model
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    checkpoint: Path                      # output_dir/checkpoint.pth
    start_iter: int                       # iterations done before this process started
    resumed: bool                         # start_iter and the training state come from the checkpoint
    params: list[torch.nn.Parameter] = field(init=False)  # those with gradients: norm and clipping

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]


def setup(cfg: TrainConfig, info: du.DistInfo, device: torch.device, meta: dict, checkpoint: Path, resume: bool,
          weights: str | None) -> TrainState:
    """The model, optimizer, gradient scaler and schedule of ``cfg``, resumed from ``checkpoint`` if asked and it
    exists, else with the initial weights (``weights``, ``model.weights``, ``model.backbone_weights``)."""
    seed_all(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, meta["num_classes"])
    model.to(device)
    if cfg.compile:
        compile_model(model, cfg.compile)
    optimizer = build_optimizer(cfg.solver, model)
    amp_dtype = autocast_dtype(cfg.solver.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    seed_all(cfg.seed + 1 + info.rank)  # each rank draws its own training samples

    resumed = resume and checkpoint.is_file()
    if resumed:
        start_iter = resume_from(checkpoint, model, optimizer, scaler, meta["arch"], info)
    else:
        if resume:
            log.info("no checkpoint at %s: starting from iteration 0", checkpoint)
        load_initial_weights(model, cfg, weights)
        start_iter = 0
    scheduler = build_scheduler(cfg.solver, optimizer, start_iter)

    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainState(cfg=cfg, info=info, meta=meta, device=device, model=model, train_model=train_model,
                      optimizer=optimizer, scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype,
                      checkpoint=checkpoint, start_iter=start_iter, resumed=resumed)


def resume_from(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                arch: dict, info: du.DistInfo) -> int:
    """Restore the weights, optimizer, gradient scaler and random generators saved at ``path``; returns its iteration.

    The learning-rate schedule is not restored: :func:`.builder.build_scheduler` makes it from this run's config at the
    returned iteration.
    """
    ckpt = load_checkpoint(path)
    missing = [k for k in ("optimizer", "scaler", "rng", "iteration") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {', '.join(missing)}: it holds a model, "
                              "not a training state to resume (start from its weights with --weights)")
    check_architecture(ckpt, arch, str(path))
    load_model_state(model, ckpt["model"], str(path))
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == info.world_size:
        set_rng_state(ckpt["rng"][info.rank])
    else:
        log.warning("checkpoint was written by %d process(es), this run has %d: random streams restart",
                    len(ckpt["rng"]), info.world_size)
    iteration = int(ckpt["iteration"])
    log.info("resumed from %s at iteration %d", path, iteration)
    return iteration


def build_train_loader(cfg: TrainConfig, train_ds, info: du.DistInfo, device: torch.device, start_iter: int):
    """The training batches from iteration ``start_iter`` on (this rank's share)."""
    sampler = TrainBatchSampler(orientation_groups(train_ds.aspect_ratios()), cfg.data.batch_size, seed=cfg.seed,
                                rank=info.rank, world_size=info.world_size, start_iter=start_iter,
                                grouping=cfg.data.aspect_ratio_grouping)
    # A private generator: creating the loader's iterator must not draw from the global
    # random stream, or a resumed run would diverge from an uninterrupted one.
    return torch.utils.data.DataLoader(
        train_ds, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))


def run_step(state: TrainState, images, targets, iteration: int) -> tuple[list[float], float]:
    """Iteration ``iteration`` (counted from 1) on one batch; returns the losses (``LOSS_NAMES``, averaged across
    ranks) and the learning rate it stepped with.

    Raises :class:`NonFiniteLossError` before the optimizer step if a loss or the gradient norm is not finite.
    """
    images = images_to_device(images, state.device)
    targets = to_device_targets(targets, state.device)
    with torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.amp_dtype is not None):
        loss_dict = state.train_model(images, targets)
    losses = torch.stack([loss_dict[k].float() for k in LOSS_NAMES])
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(losses.sum()).backward()
    if state.scaler.is_enabled():
        state.scaler.unscale_(state.optimizer)
    clip = state.cfg.solver.clip_grad_norm
    if clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in state.params
                                                          if p.grad is not None]))
    # One host sync per iteration, unavoidable: the losses and the gradient norm must be
    # checked before the optimizer step so that a NaN never reaches the weights or a
    # checkpoint (the values also feed the progress bar and the metrics).
    checked = du.all_reduce_mean(torch.cat([losses.detach(), grad_norm.detach().float()[None]])).tolist()
    loss_values, norm_value = checked[:-1], checked[-1]
    # With fp16 the gradient scaler skips steps with overflowing gradients by design.
    _check_finite(loss_values, None if state.scaler.is_enabled() else norm_value, iteration, state.checkpoint)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    lr = state.optimizer.param_groups[0]["lr"]
    state.scheduler.step()
    return loss_values, lr


class Progress:
    """The progress bar, and a ``train`` metrics line of the losses averaged over every ``log_period`` iterations."""

    def __init__(self, cfg: TrainConfig, info: du.DistInfo, start_iter: int, metrics: MetricsWriter | None):
        self.max_iter, self.log_period, self.metrics = cfg.solver.max_iter, cfg.log_period, metrics
        self.images_per_iter = cfg.data.batch_size * info.world_size
        self.bar = tqdm(total=self.max_iter, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                        disable=not info.is_main, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.window = torch.zeros(len(LOSS_NAMES), dtype=torch.float64)
        self.window_n, self.window_t0 = 0, time.perf_counter()
        self.run_t0 = self.window_t0
        self.rate = None

    def update(self, iteration: int, loss_values: list[float], lr: float) -> None:
        self.window += torch.tensor(loss_values, dtype=torch.float64)
        self.window_n += 1
        now = time.perf_counter()
        if iteration % self.log_period == 0 or iteration == self.max_iter:
            self.rate = self.window_n * self.images_per_iter / max(now - self.window_t0, 1e-9)
            avg = (self.window / self.window_n).tolist()
            record = {"type": "train", "iteration": iteration, "loss": sum(avg), **dict(zip(LOSS_NAMES, avg)),
                      "lr": lr, "images_per_s": self.rate, "time_s": now - self.run_t0}
            if self.metrics is not None:
                self.metrics.write(record)
            log.debug("iter %d: %s", iteration, record)
            self.window.zero_()
            self.window_n, self.window_t0 = 0, now
        self.bar.set_postfix(loss=f"{sum(loss_values):.3f}", lr=f"{lr:.2e}",
                             img_s=f"{self.rate:.1f}" if self.rate else "-", refresh=False)
        self.bar.update(1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.run_t0

    def close(self) -> None:
        self.bar.close()


def save_checkpoint(state: TrainState, iteration: int) -> None:
    """``checkpoint.pth``: everything a resume needs, with every rank's random generators."""
    states = du.all_gather_object(rng_state())  # every rank's generators, so each resumes its own
    if state.info.is_main:
        save_atomic({"format": FORMAT, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                     "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(), "rng": states,
                     "iteration": iteration, "config": config_mod.to_dict(state.cfg), "meta": state.meta},
                    state.checkpoint)


def evaluate_at(state: TrainState, val_ds, metrics: MetricsWriter | None, iteration: int) -> dict | None:
    """COCO evaluation of the model on ``val_ds``, logged and written as an ``eval`` metrics line (rank 0)."""
    result = evaluate(state.model, val_ds, state.device, num_workers=state.cfg.data.num_workers,
                      autocast_dtype=state.amp_dtype)
    if result is not None:
        log.info("evaluation at iteration %d (%d images, %.1f s):\n%s", iteration, len(val_ds),
                 result["inference_s"] + result["cocoeval_s"], format_tables(result))
        log.info("bbox AP %.4f, segm AP %.4f", result["bbox"]["AP"], result["segm"]["AP"])
        metrics.write({"type": "eval", "iteration": iteration, "bbox": result["bbox"], "segm": result["segm"]})
    return result


def finish(state: TrainState, val_ds, metrics: MetricsWriter | None) -> dict:
    """The final evaluation, ``model_final.pth``, ``eval.json`` and ``loss_curves.png``; returns the evaluation."""
    cfg, out = state.cfg, state.checkpoint.parent
    result = evaluate_at(state, val_ds, metrics, cfg.solver.max_iter) or {}
    if state.info.is_main:
        save_atomic({"format": FORMAT, "model": state.model.state_dict(), "iteration": cfg.solver.max_iter,
                     "config": config_mod.to_dict(cfg), "meta": state.meta}, out / FINAL)
        if result:
            _write_json(out / "eval.json", {k: v for k, v in result.items() if k != "tables"})
        if plot_loss_curves(out / "metrics.jsonl", out / "loss_curves.png"):
            log.info("wrote %s", out / "loss_curves.png")
        log.info("wrote %s and %s", out / FINAL, out / "metrics.jsonl")
    du.barrier()
    return result


def _check_finite(loss_values: list[float], grad_norm: float | None, iteration: int, ckpt_path: Path) -> None:
    """Raise :class:`NonFiniteLossError` naming the iteration, the losses and the last good checkpoint."""
    bad_loss = not all(math.isfinite(v) for v in loss_values)
    if not bad_loss and (grad_norm is None or math.isfinite(grad_norm)):
        return
    detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_NAMES, loss_values))
    last = f"{ckpt_path} (iteration {_checkpoint_iteration(ckpt_path)})" if ckpt_path.is_file() else "none yet"
    raise NonFiniteLossError(
        f"non-finite {'loss' if bad_loss else 'gradient norm'} at iteration {iteration} ({detail}, grad norm "
        f"{'not checked' if grad_norm is None else format(grad_norm, '.4g')}); stopped before updating the weights. "
        f"Last good checkpoint: {last}. Try a lower solver.base_lr, a longer solver.warmup_iters or "
        f"solver.clip_grad_norm.")


def _checkpoint_iteration(path: Path) -> str:
    try:
        return str(load_checkpoint(path)["iteration"])
    except CheckpointError:
        return "unknown"


def _write_json(path: Path, obj) -> None:
    import json

    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
