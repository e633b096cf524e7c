"""Small host tables on the device without a host sync.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, which blocks the
host until the GPU has drained its queue. The helpers here build the table on the CPU and
copy it from pinned memory asynchronously (the caching host allocator keeps the pinned
block alive until the copy has run), or copy constants once and keep them.
"""

from __future__ import annotations

import collections
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


def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached ``dtype`` Tensor of the constants ``values`` on ``device``, copied once.

    Callers must not modify it. The one copy is blocking (a single sync, on first use), so
    the tensor is safe to read from any stream afterwards. It is built outside inference
    mode so that operations in normal mode can also save it for backward. While
    ``torch.compile`` or ``torch.export`` traces, it is a constant of the graph instead (a
    traced tensor must not enter the cache).
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _device_constant(values, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype).to(device)


# Tables of per-call host values (image sizes, level geometry) that repeat from call to call,
# keyed by (values, dtype, device, stream). Bounded: a stream of new image sizes drops the
# oldest first.
_TABLE_CACHE_SIZE = 256
_TABLES: collections.OrderedDict = collections.OrderedDict()


def cached_table(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The flat ``values`` as a ``dtype`` Tensor on ``device``, copied once per distinct value,
    device and stream, asynchronously, and kept. Callers must not modify it.

    A call that finds its table issues no copy: this is what lets a CUDA graph capture the
    model's path (a copy captured from pinned memory would replay whatever that memory holds
    at replay time; a cached table is already on the device and stays there). On CUDA the
    copy is from pinned memory on the current stream, so the table is ordered before that
    stream's later work; another stream gets its own copy. While ``torch.compile`` or
    ``torch.export`` traces, the table is a constant of the graph (never cached).
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (values, dtype, device, stream)
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table[0]
    with torch.inference_mode(False):  # usable in any mode, as device_constant
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        table = (host.to(device, non_blocking=True), host)  # the pinned source lives with the table
    _TABLES[key] = table
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table[0]
