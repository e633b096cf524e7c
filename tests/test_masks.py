"""Mask paste: parity with torchvision's paste_masks_in_image, box-local output, edge cases.

The reference runs on the CPU; the Triton kernel runs on the CPU through Triton's
interpreter (small images, one or a few tiles per mask) and, in the CUDA-marked tests, on the
GPU at realistic sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

import fastmask.ops.masks as masks_module
from fastmask.ops.masks import (BoxMasks, box_windows, expand_boxes_int, paste_masks, paste_masks_in_boxes,
                                paste_masks_in_boxes_ref, paste_masks_ref)
from helpers import TOL, TRITON_DEVICES, assert_close_verbose, requires_cuda
from fastmask.kernels.mask_paste import paste_masks_fwd

# docs/architecture.md: pasted masks agree on at least 99.9% of pixels after thresholding at 0.5.
MIN_AGREEMENT = 0.999
FLOAT_ATOL = 1e-5  # fp32 result vs torchvision's fp32 result


# --------------------------------------------------------------------------- cases and oracle


def mixed_boxes(n: int, h: int, w: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Boxes of every kind: inside, partly outside, wholly outside, under one pixel, on the border."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w + 16.0, h + 16.0]) - 8
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w * 0.6, h * 0.6])
    boxes = torch.cat([xy, xy + wh], dim=1)
    kinds = torch.arange(n) % 6
    tiny = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.9
    boxes[kinds == 1, 2:] = boxes[kinds == 1, :2] + tiny[kinds == 1]  # under one pixel
    f64 = dict(dtype=torch.float64)
    boxes[kinds == 2] = torch.tensor([0.0, 0.0, w - 1.0, h * 0.5], **f64)  # on the left, top and right borders
    boxes[kinds == 3] = torch.tensor([w * 0.5, h * 0.25, float(w), float(h)], **f64)  # touching right and bottom
    boxes[kinds == 4] += torch.tensor([w + 20.0, 0.0, w + 20.0, 0.0], **f64)  # wholly outside (right)
    boxes = torch.round(boxes * 4) / 4  # quarter pixels: expanded edges land on and near integers
    return boxes.to(dtype=dtype, device=device)


def random_masks(n: int, m: int, seed: int, dtype=torch.float32, device="cpu", logits=False, mh=None):
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (n, 1, mh or m, m)
    x = torch.randn(shape, generator=g) * 4 if logits else torch.rand(shape, generator=g)
    return x.to(dtype=dtype, device=device)


def torchvision_paste(masks: torch.Tensor, boxes: torch.Tensor, image_size, padding: int = 1) -> torch.Tensor:
    """torchvision's result, with zeros for boxes wholly outside the image (torchvision fails there).

    Which boxes are wholly outside is decided with torchvision's own box expansion.
    """
    h, w = image_size
    scale = float(masks.shape[-1] + 2 * padding) / masks.shape[-1]
    b = expand_boxes(boxes, scale).to(torch.int64)
    outside = (b[:, 0] >= w) | (b[:, 1] >= h) | (b[:, 2] < 0) | (b[:, 3] < 0)
    out = masks.new_zeros((masks.shape[0], 1, h, w))
    keep = (~outside).nonzero()[:, 0]
    if len(keep):
        out[keep] = paste_masks_in_image(masks[keep], boxes[keep], (h, w), padding)
    return out


def assert_agreement(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bool masks agree on at least MIN_AGREEMENT of the pixels."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.bool, what
    agree = (actual == expected).double().mean().item()
    assert agree >= MIN_AGREEMENT, f"{what}: {agree:.6f} of pixels agree, need {MIN_AGREEMENT}"


def run_paste(device: str, masks, boxes, image_size, **kw):
    backend = "torch" if device == "ref" else "triton"
    return paste_masks(masks, boxes, image_size, backend=backend, **kw)


PASTE_DEVICES = ["ref"] + TRITON_DEVICES  # "ref": backend="torch" on the CPU; else the kernel on that device


# --------------------------------------------------------------------------- parity with torchvision


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_float_matches_torchvision(where):
    h, w, n = 40, 56, 20
    dev = "cpu" if where == "ref" else where
    masks, boxes = random_masks(n, 28, 0), mixed_boxes(n, h, w, 0)
    expected = torchvision_paste(masks, boxes, (h, w))
    out = run_paste(where, masks.to(dev), boxes.to(dev), (h, w))
    assert_close_verbose(out.cpu(), expected, FLOAT_ATOL, 0.0, f"paste_masks[{where}] vs torchvision")
    assert (expected.flatten(1).amax(1) > 0).sum() >= n // 2, "most masks must paste something"
    assert_agreement(out.cpu() > 0.5, expected > 0.5, "thresholded at 0.5")


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_threshold_returns_bool(where):
    h, w, n = 40, 56, 20
    dev = "cpu" if where == "ref" else where
    masks, boxes = random_masks(n, 28, 1), mixed_boxes(n, h, w, 1)
    expected = torchvision_paste(masks, boxes, (h, w))
    out = run_paste(where, masks.to(dev), boxes.to(dev), (h, w), threshold=0.5).cpu()
    assert out.dtype == torch.bool and out.shape == (n, 1, h, w)
    assert_agreement(out, expected > 0.5, f"bool paste[{where}] vs torchvision")
    # Against the same computation in float, only pixels within rounding of the threshold may differ.
    ref = paste_masks_ref(masks, boxes, (h, w))
    differ = out != (ref > 0.5)
    assert ((ref[differ] - 0.5).abs() < 1e-6).all(), f"{int(differ.sum())} pixels differ away from the threshold"


@pytest.mark.parametrize("where", PASTE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits(where, dtype):
    """fp16/bf16 logits: computed in fp32, rounded once to the masks' dtype."""
    h, w, n = 40, 56, 12
    dev = "cpu" if where == "ref" else where
    masks, boxes = random_masks(n, 28, 2, dtype=dtype, logits=True), mixed_boxes(n, h, w, 2)
    expected = torchvision_paste(masks.float(), boxes, (h, w))
    out = run_paste(where, masks.to(dev), boxes.to(dev), (h, w)).cpu()
    assert_close_verbose(out, expected.to(dtype), *TOL[dtype], f"paste_masks[{where}] {dtype}")
    out_b = run_paste(where, masks.to(dev), boxes.to(dev), (h, w), threshold=0.0).cpu()
    assert_agreement(out_b, expected > 0.0, f"{dtype} logits thresholded at 0")


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_fp64_matches_torchvision(where):
    """fp64 masks are computed in fp64 on both backends (torchvision's interpolation of fp64)."""
    h, w, n = 40, 56, 18
    dev = "cpu" if where == "ref" else where
    masks, boxes = random_masks(n, 28, 3, dtype=torch.float64), mixed_boxes(n, h, w, 3, dtype=torch.float64)
    expected = torchvision_paste(masks, boxes, (h, w))
    out = run_paste(where, masks.to(dev), boxes.to(dev), (h, w)).cpu()
    assert out.dtype == torch.float64
    assert_close_verbose(out, expected, *TOL[torch.float64], f"fp64 paste[{where}]")
    out_b = run_paste(where, masks.to(dev), boxes.to(dev), (h, w), threshold=0.5).cpu()
    differ = out_b != (expected > 0.5)
    assert ((expected[differ] - 0.5).abs() < 1e-12).all(), f"{int(differ.sum())} pixels differ away from 0.5"


def test_reference_box_dtypes():
    h, w, n = 40, 56, 18
    masks = random_masks(n, 28, 3, dtype=torch.float64)
    m32 = masks.float()
    for bdt in (torch.float16, torch.bfloat16, torch.float64):
        b = mixed_boxes(n, h, w, 3, dtype=bdt)
        assert_close_verbose(paste_masks_ref(m32, b, (h, w)), torchvision_paste(m32, b, (h, w)),
                             FLOAT_ATOL, 0.0, f"reference, {bdt} boxes")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("box_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kernel_box_dtypes(device, box_dtype):
    """The kernel expands boxes in their own dtype, as torchvision does."""
    h, w, n = 40, 56, 12
    masks, boxes = random_masks(n, 28, 4), mixed_boxes(n, h, w, 4, dtype=box_dtype)
    expected = torchvision_paste(masks, boxes, (h, w))
    out = paste_masks(masks.to(device), boxes.to(device), (h, w), backend="triton").cpu()
    assert_close_verbose(out, expected, FLOAT_ATOL, 0.0, f"kernel, {box_dtype} boxes")


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.5, -0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cpu_path_matches_reference(monkeypatch, dtype, threshold, chunked):
    """backend="torch" runs the window-rows paste (``_paste_rows``); ``paste_masks_ref`` is its
    spec: the same values up to the order of the matmuls' sums, with the masks in one chunk or
    in several, with some masks' rows moved up to stay in the image, and with the tallest
    window spanning the whole image."""
    if chunked:  # 2-3 masks per chunk at these sizes
        monkeypatch.setattr(masks_module, "ROWS_CHUNK_PIXELS", 3 * 40 * 56)
    h, w, n = 40, 56, 14
    boxes = mixed_boxes(n, h, w, 12, dtype=dtype)
    windows = box_windows(expand_boxes_int(boxes, 28, 1), (h, w))
    rows = int((windows[:, 3] - windows[:, 1]).max())
    assert rows < h and (windows[:, 1] > h - rows).any(), "some mask's rows must start above its window"
    full = torch.cat([boxes, torch.tensor([[w * 0.3, 0.0, w * 0.6, float(h)]], dtype=dtype)])
    for b in (boxes, full):
        m = random_masks(len(b), 28, 13, dtype=dtype)
        got = paste_masks(m, b, (h, w), threshold=threshold, backend="torch")
        ref = paste_masks_ref(m, b, (h, w), threshold=threshold)
        assert got.dtype == ref.dtype and got.shape == ref.shape == (len(b), 1, h, w)
        if threshold is None:
            assert_close_verbose(got, ref, *TOL[dtype], "torch backend vs reference")
            continue
        exact = paste_masks_ref(m.double(), b.double(), (h, w))
        differ = got != ref
        assert ((exact[differ] - threshold).abs() < 1e-3).all(), f"{int(differ.sum())} pixels differ off the threshold"


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_box_expansion_exact(where):
    """Ones masks without padding paste exactly their integer window: each edge must be torchvision's.

    Integer and half-integer box edges make the truncated expansion sensitive to every rounding.
    """
    h, w, n = 24, 40, 32
    dev = "cpu" if where == "ref" else where
    g = torch.Generator().manual_seed(5)
    lo = torch.randint(-3, 30, (n, 2), generator=g).float() + torch.randint(0, 2, (n, 2), generator=g) * 0.5
    size = torch.rand(n, 2, generator=g) * 12
    boxes = torch.cat([lo, lo + size], dim=1)
    masks = torch.ones(n, 1, 7, 7)
    b = expand_boxes(boxes, 1.0).to(torch.int64)  # torchvision's expansion for padding 0
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    expected = ((ys >= b[:, 1, None, None]) & (ys <= b[:, 3, None, None])
                & (xs >= b[:, 0, None, None]) & (xs <= b[:, 2, None, None]))[:, None]
    out = run_paste(where, masks.to(dev), boxes.to(dev), (h, w), padding=0, threshold=0.5).cpu()
    bad = (out != expected).flatten(1).any(1).nonzero()[:, 0]
    assert len(bad) == 0, f"windows differ for boxes {boxes[bad[:4]].tolist()} (torchvision ints {b[bad[:4]].tolist()})"


# --------------------------------------------------------------------------- every pixel written


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("tile, threshold", [((16, 32), 0.5), ((64, 64), -0.25)])
def test_kernel_writes_every_pixel(device, tile, threshold):
    """Outputs poisoned before the launch (NaN / byte 7): every pixel must equal the reference.

    Several tiles per mask (some wholly outside the box) or one; a negative threshold makes the
    pixels outside the box True (``0 > threshold``).
    """
    h, w, n = 40, 56, 6
    masks, boxes = random_masks(n, 28, 6, logits=True), mixed_boxes(n, h, w, 6)
    ref = paste_masks_ref(masks, boxes, (h, w))[:, 0]
    m, b = masks[:, 0].to(device), boxes.to(device)
    out = torch.full((n, h, w), float("nan"), device=device)
    paste_masks_fwd(m, b, (h, w), out=out, block_h=tile[0], block_w=tile[1])
    assert_close_verbose(out.cpu(), ref, 1e-4, 1e-5, f"float, tile {tile}")
    out_b = torch.zeros((n, h, w), dtype=torch.bool, device=device)
    out_b.view(torch.uint8).fill_(7)
    paste_masks_fwd(m, b, (h, w), threshold=threshold, out=out_b, block_h=tile[0], block_w=tile[1])
    expected = (ref > threshold).to(torch.uint8)
    assert torch.equal(out_b.view(torch.uint8).cpu(), expected), f"bool, tile {tile}, threshold {threshold}"
    assert 0 < expected.float().mean() < 1


def flat_zero_boxes(h: int, w: int, seed: int) -> torch.Tensor:
    """Every kind of zero region: mixed boxes (empty windows among them), a window as wide as the
    image (no gaps between its rows), one covering the image (no zeros at all), one in the top-left
    corner (nothing before it) and one in the bottom-right corner (nothing after it)."""
    edges = torch.tensor([[3.0, 5, w - 4, h * 0.5], [-5.0, -5, w + 5, h + 5], [0.0, 0, 6, 4], [w - 7.0, h - 5, w, h]])
    return torch.cat([mixed_boxes(8, h, w, seed), edges])


def paste_poisoned(device, masks, boxes, image_size, *, offset: int, threshold=None, local_size=None, **launch):
    """``paste_masks_fwd`` into an output filled with NaN (or byte 7), ``offset`` elements past the
    start of its buffer: a canvas that starts off a 16-byte boundary."""
    n = masks.shape[0]
    h, w = local_size or image_size
    dtype = masks.dtype if threshold is None else torch.bool
    buf = torch.empty(n * h * w + offset, dtype=dtype, device=device)
    if threshold is None:
        buf.fill_(float("nan"))
    else:
        buf.view(torch.uint8).fill_(7)
    out = buf[offset:].view(n, h, w)
    paste_masks_fwd(masks, boxes, image_size, threshold=threshold, local_size=local_size, out=out, **launch)
    return out


# A launch that splits the canvases otherwise than the defaults (one program per canvas in the
# interpreter): 3 programs per canvas, zeros in steps of 64 elements (32 per gap), several tiles.
SPLIT_LAUNCH = dict(parts=3, flat_block=128, gap_rows=4, block_h=16, block_w=32)


def gpu_launch_shape(monkeypatch):
    """Launch with the GPU's shapes (tiles, steps, programs per canvas) in the interpreter too."""
    import fastmask.kernels._common

    monkeypatch.setattr(fastmask.kernels._common, "FORCE_GPU_LAUNCH", True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_kernel_flat_zeros(device, dtype, monkeypatch):
    """The zeros outside each window are flat ranges written in aligned 16-byte vectors (4 fp32,
    8 fp16, 2 fp64) plus their unaligned ends. Poisoned 37 x 53 outputs (each canvas starts at
    another offset from a vector boundary), also at an odd offset in their buffer, in several
    launch shapes: every element equals the reference's within rounding and the default
    launch's bit for bit."""
    h, w = 37, 53
    boxes = flat_zero_boxes(h, w, 13).to(device)
    masks = random_masks(boxes.shape[0], 28, 13, dtype=dtype, logits=True)[:, 0].to(device)
    ref = paste_masks_ref(masks.cpu(), boxes.cpu(), (h, w))[:, 0]
    default = paste_poisoned(device, masks, boxes, (h, w), offset=0)
    assert_close_verbose(default.cpu(), ref, *TOL[dtype], f"{dtype} paste, poisoned")
    split = paste_poisoned(device, masks, boxes, (h, w), offset=3, **SPLIT_LAUNCH)
    assert torch.equal(split, default), f"{dtype}: split launch at offset 3 differs from the default launch"
    gpu_launch_shape(monkeypatch)
    assert torch.equal(paste_poisoned(device, masks, boxes, (h, w), offset=1), default), f"{dtype}: GPU launch"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("threshold", [0.5, -0.25])
def test_kernel_flat_zeros_bool(device, threshold, monkeypatch):
    """As ``test_kernel_flat_zeros`` for bool output (16 per vector; with a negative threshold the
    outside value is True), full-image and box-local canvases."""
    h, w = 37, 53
    boxes = flat_zero_boxes(h, w, 14).to(device)
    masks = random_masks(boxes.shape[0], 28, 14, logits=True)[:, 0].to(device)
    values = paste_masks_ref(masks.cpu(), boxes.cpu(), (h, w))[:, 0]
    default = paste_poisoned(device, masks, boxes, (h, w), threshold=threshold, offset=0)
    assert default.view(torch.uint8).max() <= 1, "unwritten bool pixels"
    differ = default.cpu() != (values > threshold)
    assert ((values[differ] - threshold).abs() < 1e-5).all(), f"{int(differ.sum())} pixels differ from the reference"
    assert 0 < default.float().mean() < 1
    split = paste_poisoned(device, masks, boxes, (h, w), threshold=threshold, offset=5, **SPLIT_LAUNCH)
    assert torch.equal(split, default), "split launch at offset 5 differs from the default launch"
    # Box-local slabs: the crop of the full canvas inside the window, the outside value beyond.
    windows = paste_masks_in_boxes_ref(masks.cpu(), boxes.cpu(), image_size=(h, w)).windows
    slab = (int((windows[:, 3] - windows[:, 1]).max()), int((windows[:, 2] - windows[:, 0]).max()))
    expected = torch.full((len(boxes), *slab), 0 > threshold)
    for i, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        expected[i, :y1 - y0, :x1 - x0] = default[i, y0:y1, x0:x1].cpu()
    for offset, launch in ((0, {}), (9, SPLIT_LAUNCH)):
        local = paste_poisoned(device, masks, boxes, (h, w), threshold=threshold, local_size=slab, offset=offset,
                               **launch)
        assert torch.equal(local.view(torch.uint8).cpu(), expected.view(torch.uint8)), f"box-local, {launch}"
    gpu_launch_shape(monkeypatch)
    out = paste_poisoned(device, masks, boxes, (h, w), threshold=threshold, offset=1)
    assert torch.equal(out, default), "GPU launch"


def test_kernel_out_must_be_contiguous():
    """The zeros are flat ranges of each canvas, so the output must be one contiguous block."""
    masks, boxes = random_masks(2, 28, 15)[:, 0], mixed_boxes(2, 20, 24, 15)
    with pytest.raises(ValueError, match="contiguous"):
        paste_masks_fwd(masks, boxes, (20, 24), out=torch.zeros(2, 24, 20).transpose(1, 2))


# --------------------------------------------------------------------------- box-local output


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernel_64_bit_offsets_and_limits(device):
    """Masks whose offsets pass 2**31 elements (a strided view of a reserved buffer that is
    never touched but where the masks lie: no memory on the CPU) paste as their dense copy;
    a canvas of 2**31 pixels is refused before anything is allocated."""
    try:
        buf = torch.empty(3 * 2**30 + 28 * 28, device=device)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve 12 GiB of address space: {exc}")
    masks = buf.as_strided((3, 28, 28), (2**30 + 17, 28, 1), 5)  # mask 2 starts past element 2**31
    masks.copy_(random_masks(3, 28, 7).squeeze(1))
    boxes = mixed_boxes(3, 40, 56, 7, device=device)
    got = paste_masks_fwd(masks, boxes, (40, 56))
    assert torch.equal(got, paste_masks_fwd(masks.contiguous(), boxes, (40, 56)))
    assert got.abs().sum() > 0
    with pytest.raises(ValueError, match="2\\*\\*31 - 64 pixels per canvas"):
        paste_masks(masks[:, None], boxes, (2**16, 2**15), backend="triton")


def assert_local_is_crop(local: BoxMasks, full: torch.Tensor, image_size) -> None:
    """Each slab equals the full mask inside its window; the rest of the slab and image are 0."""
    h, w = image_size
    n = full.shape[0]
    assert local.windows.dtype == torch.int64 and local.windows.shape == (n, 4)
    for i in range(n):  # per-mask checks, in the test only
        x0, y0, x1, y1 = local.windows[i].tolist()
        slab = local.masks[i]
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, f"mask {i}: window {(x0, y0, x1, y1)} outside the image"
        assert torch.equal(slab[: y1 - y0, : x1 - x0], full[i, 0, y0:y1, x0:x1]), f"mask {i}: slab is not the crop"
        assert not slab[y1 - y0:].any() and not slab[:, x1 - x0:].any(), f"mask {i}: slab not zero beyond its window"
        rest = full[i, 0].clone()
        rest[y0:y1, x0:x1] = 0
        assert not rest.any(), f"mask {i}: full mask is non-zero outside the window"


@pytest.mark.parametrize("where", PASTE_DEVICES)
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_box_local_equals_crop(where, threshold):
    h, w, n = 40, 56, 12
    dev = "cpu" if where == "ref" else where
    backend = "torch" if where == "ref" else "triton"
    masks, boxes = random_masks(n, 28, 7), mixed_boxes(n, h, w, 7)
    full = paste_masks_ref(masks, boxes, (h, w), threshold=threshold)
    local = paste_masks_in_boxes(masks.to(dev), boxes.to(dev), threshold=threshold, image_size=(h, w), backend=backend)
    local = BoxMasks(local.masks.cpu(), local.windows.cpu())
    sizes = local.windows[:, 2:] - local.windows[:, :2]
    assert local.masks.shape == (n, int(sizes[:, 1].max()), int(sizes[:, 0].max()))
    assert local.masks.dtype == (torch.bool if threshold is not None else masks.dtype)
    if threshold is None and where != "ref":  # the kernel's slabs vs the reference's slabs: rounding only
        ref_local = paste_masks_in_boxes_ref(masks, boxes, image_size=(h, w))
        assert torch.equal(local.windows, ref_local.windows)
        assert_close_verbose(local.masks, ref_local.masks, FLOAT_ATOL, 0.0, "box-local kernel vs reference")
        local = ref_local._replace(masks=local.masks)
        full = paste_masks(masks.to(dev), boxes.to(dev), (h, w), backend=backend).cpu()
    assert_local_is_crop(local, full, (h, w))


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_box_local_unclipped(where):
    """Without image_size each slab is the whole expanded box: torchvision's resized padded mask."""
    n = 8
    dev = "cpu" if where == "ref" else where
    backend = "torch" if where == "ref" else "triton"
    masks, boxes = random_masks(n, 28, 8), mixed_boxes(n, 40, 56, 8)
    local = paste_masks_in_boxes(masks.to(dev), boxes.to(dev), image_size=None, backend=backend)
    windows, slabs = local.windows.cpu(), local.masks.cpu()
    b = expand_boxes(boxes, 30.0 / 28.0).to(torch.int64)
    assert torch.equal(windows, torch.cat([b[:, :2], b[:, 2:] + 1], dim=1)), "windows must be the expanded boxes"
    for i in range(n):
        hh, ww = int(b[i, 3] - b[i, 1] + 1), int(b[i, 2] - b[i, 0] + 1)
        resized = F.interpolate(F.pad(masks[i:i + 1], (1, 1, 1, 1)), size=(hh, ww), mode="bilinear",
                                align_corners=False)[0, 0]
        assert_close_verbose(slabs[i, :hh, :ww], resized, FLOAT_ATOL, 0.0, f"slab {i}")
        assert not slabs[i, hh:].any() and not slabs[i, :, ww:].any(), f"slab {i}: not zero beyond its window"


# --------------------------------------------------------------------------- edge cases and inputs


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_empty_and_single(where):
    dev = "cpu" if where == "ref" else where
    backend = "torch" if where == "ref" else "triton"
    empty = paste_masks(torch.zeros(0, 1, 28, 28, device=dev), torch.zeros(0, 4, device=dev), (30, 20), backend=backend)
    assert empty.shape == (0, 1, 30, 20) and empty.dtype == torch.float32
    empty_b = paste_masks(torch.zeros(0, 1, 28, 28, dtype=torch.float16, device=dev), torch.zeros(0, 4, device=dev),
                          (30, 20), threshold=0.5, backend=backend)
    assert empty_b.shape == (0, 1, 30, 20) and empty_b.dtype == torch.bool
    local = paste_masks_in_boxes(torch.zeros(0, 28, 28, device=dev), torch.zeros(0, 4, device=dev), backend=backend)
    assert local.masks.shape == (0, 0, 0) and local.windows.shape == (0, 4)

    masks, boxes = random_masks(1, 28, 9), torch.tensor([[3.2, 4.7, 30.1, 22.9]])
    out = run_paste(where, masks.to(dev), boxes.to(dev), (33, 45)).cpu()
    assert_close_verbose(out, torchvision_paste(masks, boxes, (33, 45)), FLOAT_ATOL, 0.0, "N=1")


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_wholly_outside_is_zero(where):
    dev = "cpu" if where == "ref" else where
    boxes = torch.tensor([[60.0, 5, 80, 20], [-30.0, 5, -12, 20], [5.0, -40, 20, -15], [5.0, 45, 20, 70]])
    masks = torch.ones(4, 1, 28, 28)
    out = run_paste(where, masks.to(dev), boxes.to(dev), (40, 56))
    out_b = run_paste(where, masks.to(dev), boxes.to(dev), (40, 56), threshold=0.5)
    assert not out.any() and not out_b.any()
    local = paste_masks_in_boxes(masks.to(dev), boxes.to(dev), image_size=(40, 56),
                                 backend="torch" if where == "ref" else "triton")
    assert (local.windows[:, 2:] == local.windows[:, :2]).any(1).all(), "windows must be empty"


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_layouts_and_shapes(where):
    """[N, M, M] input, non-contiguous masks and boxes, non-square masks, padding 0 and 2."""
    h, w, n = 40, 56, 8
    dev = "cpu" if where == "ref" else where
    masks, boxes = random_masks(n, 28, 10), mixed_boxes(n, h, w, 10)
    expected = torchvision_paste(masks, boxes, (h, w))
    m_t = masks.to(dev).transpose(-1, -2).contiguous().transpose(-1, -2)[:, 0]  # [N, M, M], column-major
    b_t = boxes.to(dev).t().contiguous().t()
    assert not m_t.is_contiguous() and not b_t.is_contiguous()
    out = run_paste(where, m_t, b_t, (h, w)).cpu()
    assert_close_verbose(out, expected, FLOAT_ATOL, 0.0, "non-contiguous [N, M, M] masks")
    rect = random_masks(n, 14, 10, mh=20)
    for padding in (0, 2):
        out = run_paste(where, rect.to(dev), boxes.to(dev), (h, w), padding=padding).cpu()
        assert_close_verbose(out, torchvision_paste(rect, boxes, (h, w), padding), FLOAT_ATOL, 0.0,
                             f"[N, 1, 20, 14] masks, padding {padding}")


@pytest.mark.parametrize("where", PASTE_DEVICES)
def test_inputs_not_modified(where):
    dev = "cpu" if where == "ref" else where
    masks, boxes = random_masks(6, 28, 11).to(dev), mixed_boxes(6, 40, 56, 11).to(dev)
    m0, b0 = masks.clone(), boxes.clone()
    run_paste(where, masks, boxes, (40, 56), threshold=0.5)
    paste_masks_in_boxes(masks, boxes, image_size=(40, 56), backend="torch" if where == "ref" else "triton")
    assert torch.equal(masks, m0) and torch.equal(boxes, b0)


def test_bad_inputs_raise():
    m, b = torch.rand(3, 1, 28, 28), mixed_boxes(3, 40, 56, 12)
    cases = [
        (ValueError, "masks", dict(masks=torch.rand(3, 28 * 28))),
        (ValueError, "masks", dict(masks=torch.rand(3, 2, 28, 28))),
        (ValueError, "masks", dict(masks=torch.rand(3, 1, 0, 28))),
        (TypeError, "masks", dict(masks=(m > 0.5))),
        (TypeError, "masks", dict(masks=m.numpy())),
        (ValueError, "boxes", dict(boxes=b[:, :3])),
        (ValueError, "boxes", dict(boxes=b[:2])),
        (ValueError, "boxes", dict(boxes=torch.tensor([[0.0, 0, float("nan"), 4]] * 3))),
        (TypeError, "boxes", dict(boxes=b.long())),
        (ValueError, "boxes", dict(boxes=b.to("meta"))),
        (ValueError, "image_size", dict(image_size=(0, 56))),
        (ValueError, "image_size", dict(image_size=(40.0, 56))),
        (ValueError, "image_size", dict(image_size=(40, 56, 3))),
        (ValueError, "image_size", dict(image_size=40)),
        (ValueError, "padding", dict(padding=-1)),
        (TypeError, "threshold", dict(threshold="0.5")),
        (TypeError, "threshold", dict(threshold=torch.tensor(0.5))),
        (ValueError, "threshold", dict(threshold=float("nan"))),
        (ValueError, "backend", dict(backend="cuda")),
    ]
    for exc, word, kw in cases:
        args = dict(masks=m, boxes=b, image_size=(40, 56))
        args.update(kw)
        with pytest.raises(exc, match=word):
            paste_masks(**args)
    with pytest.raises(ValueError, match="image_size"):
        paste_masks_in_boxes(m, b, image_size=(40, -1))


# --------------------------------------------------------------------------- CUDA, realistic sizes


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_full_size(dtype):
    h, w, n = 800, 1333, 100
    masks = random_masks(n, 28, 20, dtype=dtype)
    boxes = mixed_boxes(n, h, w, 20)
    expected = torchvision_paste(masks.cuda().float(), boxes.cuda(), (h, w))
    out = paste_masks(masks.cuda(), boxes.cuda(), (h, w))
    atol, rtol = (FLOAT_ATOL, 0.0) if dtype == torch.float32 else TOL[dtype]
    assert_close_verbose(out, expected.to(dtype), atol, rtol, f"800x1333, {dtype}")
    out_b = torch.zeros((n, h, w), dtype=torch.bool, device="cuda")
    out_b.view(torch.uint8).fill_(7)
    paste_masks_fwd(masks.cuda()[:, 0], boxes.cuda(), (h, w), threshold=0.5, out=out_b)
    assert out_b.view(torch.uint8).max() <= 1, "unwritten bool pixels"
    assert_agreement(out_b[:, None], expected > 0.5, "800x1333 bool")
    # Box-local output: each slab is the crop of the same kernel's full-image paste, bit for bit.
    full = paste_masks(masks.cuda(), boxes.cuda(), (h, w), threshold=0.5)
    assert_local_is_crop(paste_masks_in_boxes(masks.cuda(), boxes.cuda(), threshold=0.5, image_size=(h, w)),
                         full, (h, w))
    # Against the reference, a thresholded pixel may differ only where the reference's value lies
    # within rounding of the threshold: the compiled kernel contracts multiply-adds into FMAs,
    # which round once where the reference's separate ops round twice (a few fp32 ulps).
    ref = paste_masks_ref(masks.cuda().float(), boxes.cuda(), (h, w))  # fp32, as the kernel computes
    flips = full != (ref > 0.5)
    near = (ref[flips].float() - 0.5).abs()
    assert flips.sum() <= 1e-6 * flips.numel() and (near.max() if near.numel() else 0) < 1e-5, (
        f"{int(flips.sum())} bool pixels differ from the reference; largest |value - 0.5| among them "
        f"{near.max().item() if near.numel() else 0:.3g}")


@requires_cuda
def test_cuda_many_masks():
    h, w, n = 96, 128, 1000
    masks, boxes = random_masks(n, 28, 21, logits=True), mixed_boxes(n, h, w, 21)
    expected = torchvision_paste(masks.cuda(), boxes.cuda(), (h, w))
    out = torch.full((n, h, w), float("nan"), device="cuda")
    paste_masks_fwd(masks.cuda()[:, 0], boxes.cuda(), (h, w), out=out)
    assert_close_verbose(out[:, None], expected, 1e-4, 1e-5, "N=1000 logits")
    assert_agreement(paste_masks(masks.cuda(), boxes.cuda(), (h, w), threshold=0.0), expected > 0, "N=1000 bool")
