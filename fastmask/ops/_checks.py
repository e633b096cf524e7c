"""Argument checks shared by the public ops.

Every message names the argument and says what was expected. Shape, dtype and device
checks read only metadata. Checks that read values (finite boxes, batch indices in range)
run only where :func:`data_checks_enabled` says so: by default on CPU tensors, where reading
a value costs no device sync; on CUDA only with ``FASTMASK_CHECKS=1`` (a debugging mode: each
such check then syncs). ``FASTMASK_CHECKS=0`` turns them off everywhere. They never run while
``torch.compile`` or ``torch.export`` traces (the values are not known then).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute inputs of ``dtype`` in, on both backends: fp64 for fp64,
    fp32 for the others (fp16/bf16 are widened, as torchvision's kernels do)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, value, *, ndim: int | None = None, last_dim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if last_dim is not None and value.shape[-1] != last_dim:
        raise ValueError(f"{name} must have size {last_dim} in its last dimension, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a dtype in ({names}), got {value.dtype}")
    return value


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


CHECKS_ENV_VAR = "FASTMASK_CHECKS"


def data_checks_enabled(value: torch.Tensor) -> bool:
    """Whether checks that read ``value``'s data run (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    mode = os.environ.get(CHECKS_ENV_VAR, "")
    if mode == "0":
        return False
    return mode == "1" or value.device.type == "cpu"


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise if ``value`` holds NaN or infinity (where :func:`data_checks_enabled`)."""
    if value.numel() and data_checks_enabled(value) and not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).nonzero()[:5].tolist()
        raise ValueError(f"{name} holds non-finite values (NaN or inf), first at index {bad}")


def check_boxes(name: str, boxes, *, allow_columns: Sequence[int] = (4,)) -> torch.Tensor:
    """A [K, 4] (or [K, 5] with a batch index) float tensor of finite boxes."""
    check_tensor(name, boxes, ndim=2)
    if boxes.shape[1] not in allow_columns:
        cols = " or ".join(str(c) for c in allow_columns)
        raise ValueError(f"{name} must have shape [K, {cols}], got {tuple(boxes.shape)}")
    check_finite(name, boxes)
    return boxes


def pair(name: str, value) -> tuple[int, int]:
    """An output size given as int or (h, w), both positive."""
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return value
