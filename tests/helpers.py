"""Shared test helpers: one tolerance table, valid random boxes, verbose comparisons."""

from __future__ import annotations

import math
import os

import pytest
import torch

# (atol, rtol) by dtype, used by every parity test. fp32 atol follows docs/architecture.md (1e-4 for
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

# (backend, device) pairs for a test with one body for both backends: the reference on the CPU, the
# Triton kernels on every device that can run them; ids such as "torch-cpu", "triton-cuda".
BACKENDS = [("torch", "cpu")] + [("triton", d) for d in TRITON_DEVICES]
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


def random_boxes(n: int, max_coord: float = 100.0, min_size: float = 0.0, *, generator=None,
                 dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``n`` valid boxes ``(x1, y1, x2, y2)`` with x2 >= x1 + min_size, y2 >= y1 + min_size."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_coord
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_coord / 2 + min_size
    return torch.cat([xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                         what: str = "") -> None:
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


def pyramid_boxes(k, image_hw, seed, device="cpu"):
    """Boxes whose sizes spread over every level, some partly outside the image, plus boxes
    whose sqrt(area) is exactly 224 * 2**j (on the boundary between two levels)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    side = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(math.log(6), math.log(400), generator=g))
    aspect = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(-0.7, 0.7, generator=g))
    bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
    x1 = torch.rand(k, generator=g, dtype=torch.float64) * w - bw / 4
    y1 = torch.rand(k, generator=g, dtype=torch.float64) * h - bh / 4
    boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], 1)
    edge = torch.tensor([[5.0, 7.0, 5.0 + 224 * 2.0 ** j, 7.0 + 224 * 2.0 ** j] for j in (-2, -1, 0, 1)]
                        + [[3.0, 2.0, 3.0 + 112.0, 2.0 + 448.0]], dtype=torch.float64)
    return torch.cat([boxes, edge]).float().to(device)
