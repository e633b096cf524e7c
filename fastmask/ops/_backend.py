"""Backend selection shared by every op.

One readable rule (docs/architecture.md, "The backend rule"):
- ``backend=None`` reads ``FASTMASK_BACKEND`` (default ``"auto"``);
- ``"auto"``: Triton for CUDA tensors, the pure-PyTorch CPU path for CPU tensors;
- ``"triton"``: the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``
  (Triton's interpreter, which is how the kernels are tested without a GPU);
- ``"torch"``: the CPU path, pure PyTorch: the reference, except for RoI Align, NMS and mask
  paste, whose faster forms are tested against their references (``*_ref``). It never imports
  Triton.

Asking for ``"triton"`` where it cannot run raises ``RuntimeError`` saying why; nothing
falls back silently.
"""

from __future__ import annotations

import importlib.util
import os
import re

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTMASK_BACKEND"


# Looked up once (without importing triton): the backend rule then reads a constant, which
# torch.compile can trace.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_NOT_YET = object()
_blocker = _NOT_YET


def interpreter_blocker() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed packages, or None.

    Computed once and kept in a module variable, which ``torch.compile`` reads as a constant
    once it is set (the first eager call sets it; the test session's set-up does)."""
    global _blocker
    if _blocker is _NOT_YET:
        import numpy
        from importlib.metadata import version

        _blocker = interpreter_blocker_for(version("triton"), numpy.__version__)
    return _blocker


def interpreter_blocker_for(triton_version: str, numpy_version: str) -> str | None:
    """``interpreter_blocker`` for given versions.

    Triton 3.6's interpreter turns a scalar that a kernel computed (a loop bound such as RoI
    Align's adaptive sampling grid) into a Python int with ``int()`` of a one-element array,
    which NumPy 2.4 made an error; Triton 3.7 fixed it. The compiled (GPU) path is not affected.
    """
    def release(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", text)[:2])

    if release(triton_version) < (3, 7) and release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version} (it converts "
                "one-element arrays to Python ints, an error since NumPy 2.4); install 'numpy<2.4' or 'triton>=3.7'")
    return None


def check_backend_name(backend: str | None) -> str:
    """Return the backend name in force (``backend`` or the environment), validated."""
    name = os.environ.get(ENV_VAR, "auto") if backend is None else backend
    if name not in BACKENDS:
        source = f"environment variable {ENV_VAR}" if backend is None else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def _triton_unusable_reason(device: torch.device) -> str | None:
    if not _triton_installed():
        return "the triton package is not installed"
    if device.type == "cpu" and not interpreter_enabled():
        return "the tensors are on the CPU; set TRITON_INTERPRET=1 (before triton is imported) to run the kernels in Triton's interpreter, or use backend='torch'"
    if device.type == "cpu" and (blocker := interpreter_blocker()) is not None:
        return blocker
    if device.type not in ("cpu", "cuda"):
        return f"tensors on device type {device.type!r} are not supported by the Triton kernels"
    return None


def resolve_backend(backend: str | None, tensor: torch.Tensor, op: str) -> str:
    """Pick ``"triton"`` or ``"torch"`` for an op whose main input is ``tensor`` (every kernel
    takes every dtype its op accepts)."""
    name = check_backend_name(backend)
    if name == "torch":
        return "torch"
    reason = _triton_unusable_reason(tensor.device)
    if name == "auto":
        return "triton" if tensor.device.type == "cuda" and reason is None else "torch"
    if reason is not None:
        raise RuntimeError(f"{op}: backend='triton' was asked for but cannot run: {reason}")
    return "triton"
