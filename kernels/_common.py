"""``@triton.jit`` helpers shared by several kernels of ``kernels/``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch shapes differ between the GPU and Triton's interpreter, whose cost is per operation
# per program (so it wants few, wide programs). The ahead-of-time compile test sets this to
# record the GPU's launch shapes for CPU tensors; nothing else changes it.
FORCE_GPU_LAUNCH = False


def gpu_launch(device: torch.device) -> bool:
    """Whether a launch on ``device`` takes the GPU's block shapes and options."""
    return device.type == "cuda" or FORCE_GPU_LAUNCH


@triton.jit
def div_rn(a, b):
    """``a / b`` correctly rounded, as torch divides: ``div_rn`` in fp32 (Triton's fp32 division
    is approximate), the plain division in fp64 (which is already)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt_rn(x):
    """``sqrt(x)`` correctly rounded in fp32 and fp64 (Triton's fp32 ``sqrt`` is approximate)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def round_to_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), returned as fp32.

    The rounding is done on the bits with integer ops: Triton's interpreter truncates fp32 ->
    bf16 casts while the GPU rounds, and this is the same on both. The result is exactly
    representable in bf16, so a later cast to bf16 is exact everywhere.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
