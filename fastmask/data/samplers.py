"""Samplers: an endless, resumable training stream and a sharded inference order.

Training is counted in iterations, not epochs. :class:`TrainBatchSampler` yields batches
forever; batch ``k`` is a pure function of ``(seed, rank, world_size, k)``, so a run resumed
at iteration ``k`` draws exactly the batches the uninterrupted run would have drawn, and a
different worker count changes nothing. Epoch ``e`` is a permutation of the dataset drawn
from ``default_rng((seed, e))``; rank ``r`` of ``W`` takes every ``W``-th element of it.
With aspect-ratio grouping, images wait in one bucket per orientation (landscape or
portrait) until a bucket holds a batch, so a batch never mixes orientations and padding
to a common size stays small (images left in a bucket at the end of an epoch go into the
next one's batches).

Each element is ``(dataset_index, augmentation_seed)``: the dataset seeds its transforms
with it, so the augmentation of a sample is also fixed by the position in the stream.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


def orientation_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """0 for landscape or square images (width >= height), 1 for portrait ones."""
    return [0 if a >= 1.0 else 1 for a in aspect_ratios]


class TrainBatchSampler(torch.utils.data.Sampler):
    """Endless batches of ``(index, seed)`` for one rank; starts at batch ``start_iter``."""

    def __init__(self, groups: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_iter: int = 0, grouping: bool = True):
        if len(groups) == 0:
            raise ValueError("the training dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.groups = np.asarray(groups, dtype=np.int64) if grouping else np.zeros(len(groups), np.int64)
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_iter = start_iter

    def _stream(self) -> Iterator[list[tuple[int, int]]]:
        buckets: dict[int, list[tuple[int, int]]] = {}
        epoch = 0
        n = len(self.groups)
        while True:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(n)
            aug_seeds = rng.integers(0, 2**62, size=n)
            # Every rank visits the same count per epoch: the order wraps round to fill the last turn.
            per_rank = -(-n // self.world_size)
            positions = np.arange(self.rank, per_rank * self.world_size, self.world_size) % n
            for p in positions:
                index = int(order[p])
                bucket = buckets.setdefault(int(self.groups[index]), [])
                bucket.append((index, int(aug_seeds[p])))
                if len(bucket) == self.batch_size:
                    yield bucket[:]
                    bucket.clear()
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stream = self._stream()
        for _ in range(self.start_iter):
            next(stream)
        return stream


class InferenceSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + W, ...``: each image is evaluated once across the ``W`` ranks."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
