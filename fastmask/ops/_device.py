"""Small host tables on the device without a host sync.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, which blocks the
host until the GPU has drained its queue. The helpers here build the table on the CPU and
copy it from pinned memory asynchronously (the caching host allocator keeps the pinned
block alive until the copy has run), or copy constants once and keep them.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor


def to_device_async(values: Sequence | Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``values`` (nested Python numbers or a CPU tensor) as a ``dtype`` Tensor on ``device``.

    The values are converted on the host exactly as ``torch.tensor(values, dtype=dtype)``
    does; on CUDA the copy is asynchronous from pinned memory (no host sync).
    """
    t = values.to(dtype) if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached ``dtype`` Tensor of the constants ``values`` on ``device``, copied once.

    Callers must not modify it. The one copy is blocking (a single sync, on first use), so
    the tensor is safe to read from any stream afterwards. It is built outside inference
    mode so that operations in normal mode can also save it for backward.
    """
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).to(device)
