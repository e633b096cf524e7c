"""Shared test helpers: one tolerance table, valid random boxes, verbose comparisons."""

from __future__ import annotations

import os

import pytest
import torch

# (atol, rtol) by dtype, used by every parity test. fp32 atol follows DESIGN.md (1e-4 for
# RoI Align); fp16/bf16 are compared after the reference ran in fp32 on the same inputs.
TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}

requires_cuda = pytest.mark.cuda
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs Triton kernels on the CPU through Triton's interpreter")

# Devices on which a Triton kernel can be run in this session.
TRITON_DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else [])


def random_boxes(n: int, max_coord: float = 100.0, min_size: float = 0.0, *, generator=None,
                 dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``n`` valid boxes ``(x1, y1, x2, y2)`` with x2 >= x1 + min_size, y2 >= y1 + min_size."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_coord
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_coord / 2 + min_size
    return torch.cat([xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """assert_close that prints the worst mismatching indices and values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~(torch.isclose(a, e, atol=atol, rtol=rtol) | (torch.isnan(a) & torch.isnan(e)))
    if bad.any():
        idx = bad.nonzero()[:8]
        rows = "\n".join(f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}"
                         for i in idx)
        err = (a - e).abs()[bad].max().item()
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} values differ (max abs err {err:.3g}, "
                             f"atol {atol}, rtol {rtol}):\n{rows}")
