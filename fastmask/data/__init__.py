"""Datasets, transforms and samplers for training and evaluation.

:func:`build_dataset` is the one entry point the commands use: a split configured with an
annotation file is read as COCO; a split without one is the built-in synthetic shapes
dataset, generated on first use and then read through the same COCO loader.
"""

from __future__ import annotations

from ..config import DataConfig
from .coco import CocoDetection, DatasetError, collate, decode_segmentation, read_coco_json
from .samplers import InferenceSampler, TrainBatchSampler, orientation_groups
from .synthetic import ensure_synthetic
from .transforms import Compose, RandomHorizontalFlip, ResizeShortestEdge, build_train_transforms


def split_paths(cfg: DataConfig, split: str) -> tuple[str, str]:
    """(annotation file, image folder) of ``split`` ("train" or "val"); generates synthetic data if needed."""
    s = getattr(cfg, split)
    if s.annotations is not None:
        return s.annotations, s.images
    return ensure_synthetic(cfg.synthetic)[split]


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> CocoDetection:
    annotations, images = split_paths(cfg, split)
    transforms = build_train_transforms(cfg.train_min_size, cfg.train_max_size, cfg.hflip_prob) if train else None
    dataset = CocoDetection(annotations, images, transforms=transforms, invalid=cfg.invalid_annotations)
    if len(dataset) == 0:
        raise DatasetError(f"annotation file {annotations!r} (data.{split}) lists no images")
    return dataset


__all__ = [
    "CocoDetection", "DatasetError", "collate", "decode_segmentation", "read_coco_json",
    "InferenceSampler", "TrainBatchSampler", "orientation_groups",
    "ensure_synthetic",
    "Compose", "RandomHorizontalFlip", "ResizeShortestEdge", "build_train_transforms",
    "build_dataset", "split_paths",
]
