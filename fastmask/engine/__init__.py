"""Training, evaluation and checkpoints: the machinery behind the three commands."""

from .builder import LRSchedule, build_model, build_optimizer, build_scheduler, model_arch
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .evaluation import STAT_NAMES, coco_evaluate, evaluate, masks_to_rle
from .trainer import NonFiniteLossError, train

__all__ = [
    "LRSchedule", "build_model", "build_optimizer", "build_scheduler", "model_arch",
    "CheckpointError", "load_checkpoint", "save_atomic",
    "STAT_NAMES", "coco_evaluate", "evaluate", "masks_to_rle",
    "NonFiniteLossError", "train",
]
