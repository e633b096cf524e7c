"""RoI Align, single- and multi-level: the reference (backend="torch") and the Triton kernels
(forward, atomic backward, deterministic backward) against torchvision and each other.

Tests parametrised over BACKENDS run the reference on the CPU and the kernels on every device
that can run them; on a machine without a GPU that is the CPU, through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so sizes here are small; the tests marked cuda use
realistic sizes.
"""

import importlib
import math

import pytest
import torch
import torchvision
from helpers import (BACKEND_IDS, BACKENDS, TOL, TRITON_DEVICES, assert_close_verbose, interpreter, pyramid_boxes,
                     random_boxes, requires_cuda)

from fastmask.ops import MultiScaleRoIAlign, multiscale_roi_align, roi_align
from fastmask.ops.roi_align import (boxes_to_rois, infer_scales, level_range, map_levels, multiscale_roi_align_ref,
                                    roi_align_backward_ref, roi_align_ref)

roi_align_module = importlib.import_module("fastmask.ops.roi_align")  # the module (the package exports the op)
needs_triton = pytest.mark.skipif(not TRITON_DEVICES, reason="no device can run the Triton kernels")

LAYOUTS = ["nchw", "channels_last"]
IMAGE_HW = (96, 136)  # P2..P5: 24x34, 12x17, 6x9, 3x5 (odd sizes)
IMAGE_SIZES = [(90, 136), (96, 121)]


# --------------------------------------------------------------------------- helpers


def to_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # same values, H and W strides swapped: neither NCHW nor channels-last
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x.contiguous()


def leaf(t, device, requires_grad=True):
    """A fresh leaf copy of ``t`` on ``device`` (never an alias of ``t``)."""
    return t.detach().clone().to(device).requires_grad_(requires_grad)


def make_rois(n_images, k, max_coord, seed, dtype=torch.float32, device="cpu"):
    """Tensor[K, 5] of random boxes, some starting or lying outside the image."""
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(k, max_coord, generator=g, dtype=torch.float64) - max_coord * 0.2
    idx = torch.randint(0, n_images, (k, 1), generator=g).double()
    return torch.cat([idx, boxes], dim=1).to(dtype=dtype, device=device)


def make_pyramid(n, c, levels=4, layout="nchw", dtype=torch.float32, seed=0, device="cpu", image_hw=IMAGE_HW):
    """The first ``levels`` maps of strides 4, 8, 16, 32 for images of ``image_hw`` (drawn in fp32)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    feats = [torch.randn(n, c, math.ceil(h / s), math.ceil(w / s), generator=g) for s in (4, 8, 16, 32)[:levels]]
    return [to_layout(f.to(dtype=dtype, device=device), layout) for f in feats]

def tv_multiscale(feats, boxes, output_size, sampling_ratio, image_sizes=IMAGE_SIZES):
    names = [f"p{i}" for i in range(len(feats))]
    pooler = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)
    return pooler(dict(zip(names, feats)), boxes, image_sizes)


def ref_grads(feats, boxes, output_size, sampling_ratio, grad, image_sizes=IMAGE_SIZES):
    """Gradients of the fp32 reference (through autograd) w.r.t. every level."""
    leaves = [f.detach().float().requires_grad_() for f in feats]
    scales = infer_scales([f.shape[-2:] for f in feats], image_sizes)
    out = multiscale_roi_align_ref(leaves, boxes_to_rois(boxes), output_size, scales, sampling_ratio)
    out.backward(grad.float())
    return [f.grad for f in leaves]


# --------------------------------------------------------------------------- both backends


ZERO_BOX_CASES = [("torch", "cpu", None)] + [("triton", d, det) for d in TRITON_DEVICES for det in (False, True)]


@pytest.mark.parametrize("backend,device,deterministic", ZERO_BOX_CASES,
                         ids=[f"{b}-{d}" + {None: "", False: "-atomic", True: "-deterministic"}[det]
                              for b, d, det in ZERO_BOX_CASES])
def test_zero_boxes(backend, device, deterministic):
    x = torch.randn(2, 4, 5, 5, device=device)
    assert roi_align(x, torch.zeros(0, 5, device=device), 3, backend=backend).shape == (0, 4, 3, 3)
    assert roi_align(x, torch.zeros(0, 5, device=device), (2, 4), backend=backend).shape == (0, 4, 2, 4)
    assert roi_align(x, [torch.zeros(0, 4, device=device)] * 2, (2, 4), backend=backend).shape == (0, 4, 2, 4)
    # Differentiable even when empty, as torchvision's: the gradient is all zeros.
    x.requires_grad_()
    out = roi_align(x, torch.zeros(0, 5, device=device), 3, backend=backend, deterministic=deterministic)
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    feats = [f.requires_grad_() for f in make_pyramid(2, 4, device=device)]
    out = multiscale_roi_align(feats, [torch.zeros(0, 4, device=device)] * 2, 7, IMAGE_SIZES, 2,
                               backend=backend, deterministic=deterministic)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert all(torch.equal(f.grad, torch.zeros_like(f)) for f in feats)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_inputs_not_modified(backend, device):
    x = torch.randn(2, 3, 7, 8, device=device)
    rois = make_rois(2, 9, 20.0, 5, device=device)
    x0, r0 = x.clone(), rois.clone()
    roi_align(x, rois, 3, 0.5, -1, True, backend=backend)
    assert torch.equal(x, x0) and torch.equal(rois, r0)
    feats = make_pyramid(2, 4, 3, "channels_last", seed=23, device=device)
    boxes = [pyramid_boxes(3, IMAGE_SIZES[0], 24, device), pyramid_boxes(2, IMAGE_SIZES[1], 25, device)]
    saved_f, saved_b = [f.clone() for f in feats], [b.clone() for b in boxes]
    leaves = [f.requires_grad_() for f in feats]
    multiscale_roi_align(leaves, boxes, 7, IMAGE_SIZES, 2, backend=backend).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(feats, saved_f))
    assert all(torch.equal(a, b) for a, b in zip(boxes, saved_b))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_multiscale_maps_that_are_not_adjacent_levels(backend, device):
    """Maps of strides 8 and 32 (torchvision's own export test): torchvision pools level index
    i from the i-th map given, so RoIs mapped to level 4 read the stride-32 map and those
    mapped to level 5 (index 2, past the last map) pool zeros; forward and backward alike."""
    g = torch.Generator().manual_seed(5)
    feats = {"s8": torch.randn(2, 3, 64, 64, generator=g), "s32": torch.randn(2, 3, 16, 16, generator=g)}
    boxes = [torch.tensor([[0.0, 0.0, 500.0, 500.0], [10.0, 10.0, 40.0, 40.0], [0.0, 0.0, 200.0, 200.0]]),
             torch.tensor([[5.0, 5.0, 120.0, 120.0], [3.0, 30.0, 460.0, 400.0]])]
    sizes = [(512, 512)] * 2
    leaves = {k: leaf(v, device) for k, v in feats.items()}
    tv_leaves = {k: leaf(v, "cpu") for k, v in feats.items()}
    want = torchvision.ops.MultiScaleRoIAlign(["s8", "s32"], 7, 2)(tv_leaves, boxes, sizes)
    got = MultiScaleRoIAlign(["s8", "s32"], 7, 2, backend=backend)(leaves, [b.to(device) for b in boxes], sizes)
    levels = map_levels(torch.cat(boxes), 3, 5)
    assert set(levels.tolist()) == {0, 1, 2}, "the boxes must reach every level index"
    assert (want[levels == 2] == 0).all() and (want[levels != 2] != 0).any()
    assert_close_verbose(got.cpu(), want, *TOL[torch.float32], what=backend)
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    got.backward(grad.to(device))
    for k in feats:
        assert_close_verbose(leaves[k].grad.cpu(), tv_leaves[k].grad, *TOL[torch.float32], what=f"{backend} grad {k}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_multiscale_box_with_one_inverted_axis_pools_zeros(backend, device):
    """A box of negative area (x2 < x1 only) has a NaN size, which torchvision's level mapper
    sends to no level: it pools zeros, beside a normal box, forward and backward."""
    g = torch.Generator().manual_seed(6)
    feats = {"a": torch.randn(1, 2, 16, 16, generator=g), "b": torch.randn(1, 2, 8, 8, generator=g)}
    boxes = [torch.tensor([[10.0, 5.0, 4.0, 30.0], [1.0, 1.0, 20.0, 20.0]])]
    want = torchvision.ops.MultiScaleRoIAlign(["a", "b"], 2, 2)(feats, boxes, [(64, 64)])
    leaves = {k: leaf(v, device) for k, v in feats.items()}
    got = MultiScaleRoIAlign(["a", "b"], 2, 2, backend=backend)(leaves, [b.to(device) for b in boxes], [(64, 64)])
    assert (got[0] == 0).all() and (got[1] != 0).any()
    assert_close_verbose(got.detach().cpu(), want, *TOL[torch.float32], what=backend)
    got[0].sum().backward()
    assert all((t.grad == 0).all() for t in leaves.values())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("box_dtype, box", [
    (torch.float64, [1.0, 1.0, 224.99984073664, 224.99984073664]),  # level 1 in fp64, level 2 in fp32
    (torch.float16, [1.0, 1.0, 301.0, 301.0]),  # area inf in fp16
])
def test_multiscale_levels_mapped_in_the_compute_dtype(backend, device, box_dtype, box):
    """Boxes of another dtype than the features are mapped to levels in the features' compute
    dtype (fp32 here) on both backends, as the fp32 boxes would be."""
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(1, 2, 64 // s, 64 // s, generator=g).to(device) for s in (1, 2, 4, 8)]
    box = torch.tensor([box], dtype=box_dtype, device=device)
    got = multiscale_roi_align(feats, [box], 1, [(256, 256)], 2, backend=backend)
    same = multiscale_roi_align(feats, [box.float()], 1, [(256, 256)], 2, backend=backend)
    assert torch.equal(got, same)


# --------------------------------------------------------------------------- reference (backend="torch"): single level


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_roi_align_matches_torchvision(dtype, aligned, sampling_ratio, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 11, 14, generator=g, dtype=dtype)
    rois = make_rois(2, 23, 40.0, seed, dtype)
    for out_size, scale in [((7, 7), 0.25), ((3, 5), 0.5), (4, 1.0)]:
        expected = torchvision.ops.roi_align(x, rois, out_size, scale, sampling_ratio, aligned)
        got = roi_align(x, rois, out_size, scale, sampling_ratio, aligned, backend="torch")
        assert_close_verbose(got, expected, *TOL[dtype], what=f"out={out_size} scale={scale}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_low_precision(dtype):
    x = torch.randn(2, 4, 9, 10).to(dtype)
    rois = make_rois(2, 17, 30.0, 3)
    got = roi_align(x, rois, 5, 0.5, 2, True, backend="torch")
    assert got.dtype == dtype
    # The reference accumulates in fp32: compare with torchvision on the same rounded values in fp32.
    expected = torchvision.ops.roi_align(x.float(), rois, 5, 0.5, 2, True).to(dtype)
    assert_close_verbose(got, expected, *TOL[dtype])


def test_roi_align_fp16_against_torchvision_fp16():
    """torchvision runs fp16 on the CPU in half arithmetic; the reference accumulates in fp32.

    Both must agree to within fp16 arithmetic error, and the reference must be at least as
    close as torchvision to the exact (fp64) result on the same fp16 inputs.
    """
    x = torch.randn(2, 4, 9, 10).half()
    rois = make_rois(2, 17, 30.0, 4).half()
    tv = torchvision.ops.roi_align(x, rois, 5, 0.5, 2, True)
    got = roi_align(x, rois, 5, 0.5, 2, True, backend="torch")
    exact = torchvision.ops.roi_align(x.double(), rois.double(), 5, 0.5, 2, True)
    assert got.dtype == tv.dtype == torch.float16
    assert_close_verbose(got.float(), tv.float(), atol=3e-2, rtol=1e-2, what="fp16 vs torchvision fp16")
    assert (got.double() - exact).abs().max() <= (tv.double() - exact).abs().max()


def test_roi_align_list_boxes_channels_last_and_noncontiguous():
    x = torch.randn(3, 6, 12, 13)
    boxes = [random_boxes(k, 40.0, generator=torch.Generator().manual_seed(k)) for k in (4, 0, 7)]
    expected = torchvision.ops.roi_align(x, boxes, 6, 0.3, 2, False)
    assert_close_verbose(roi_align(x, boxes, 6, 0.3, 2, False, backend="torch"), expected, *TOL[torch.float32])
    x_cl = x.to(memory_format=torch.channels_last)
    assert_close_verbose(roi_align(x_cl, boxes, 6, 0.3, 2, False, backend="torch"), expected, *TOL[torch.float32])
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, permuted strides
    assert not x_t.is_contiguous()
    assert_close_verbose(roi_align(x_t, boxes, 6, 0.3, 2, False, backend="torch"), expected, *TOL[torch.float32])


def test_roi_align_edge_boxes():
    x = torch.randn(1, 3, 8, 9, dtype=torch.float64)
    rois = torch.tensor([
        [0, -20, -20, -10, -10],   # wholly outside (top-left)
        [0, 30, 30, 50, 50],       # wholly outside (bottom-right)
        [0, 3, 3, 3, 3],           # degenerate: a point
        [0, 5, 2, 4, 6],           # x2 < x1
        [0, -3, -3, 20, 20],       # covers and exceeds the map
        [0, 7.9, 6.9, 8.6, 7.2],   # on the last row/column
    ], dtype=torch.float64)
    for aligned in (False, True):
        for sr in (-1, 1, 3):
            expected = torchvision.ops.roi_align(x, rois, (2, 3), 1.0, sr, aligned)
            got = roi_align(x, rois, (2, 3), 1.0, sr, aligned, backend="torch")
            assert_close_verbose(got, expected, *TOL[torch.float64], what=f"aligned={aligned} sr={sr}")


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_reference_backward_matches_torchvision(aligned, sampling_ratio):
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    rois = make_rois(2, 15, 36.0, 11, torch.float64)
    grad = torch.randn(15, 3, 4, 4, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    torchvision.ops.roi_align(x1, rois, 4, 0.4, sampling_ratio, aligned).backward(grad)
    x2 = x.clone().requires_grad_()
    roi_align(x2, rois, 4, 0.4, sampling_ratio, aligned, backend="torch").backward(grad)
    assert_close_verbose(x2.grad, x1.grad, *TOL[torch.float64])


def test_roi_align_gradcheck():
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 5.1], [0, 2.5, 1.0, 6.5, 3.3]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (3, 2), 1.0, 2, True, backend="torch"), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (-1, True), (3, True)])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_cpu_path_matches_reference(monkeypatch, dtype, sampling_ratio, aligned, chunked):
    """backend="torch" runs the CPU path (each bin's taps summed by embedding_bag); the
    reference (roi_align_ref, roi_align_backward_ref) is its spec: same values up to the order
    of the sums, forward and backward, with the RoIs in one chunk or in several."""
    if chunked:  # chunks of 1-2 RoIs at these sizes
        monkeypatch.setattr(roi_align_module, "REF_GATHER_BUDGET", 8 * 20 * 36 * 2)
    x = torch.randn(2, 3, 9, 11, dtype=dtype)
    rois = make_rois(2, 13, 30.0, 4, dtype=dtype)
    got = roi_align(x, rois, (4, 5), 0.4, sampling_ratio, aligned, backend="torch")
    assert_close_verbose(got, roi_align_ref(x, rois, (4, 5), 0.4, sampling_ratio, aligned), *TOL[dtype])
    grad = torch.randn_like(got)
    x1 = x.clone().requires_grad_()
    roi_align(x1, rois, (4, 5), 0.4, sampling_ratio, aligned, backend="torch").backward(grad)
    (expected,) = roi_align_backward_ref(grad, rois, [x.shape], (4, 5), [0.4], sampling_ratio, aligned)
    assert_close_verbose(x1.grad, expected, *TOL[dtype])
    # Multi-level: every RoI on its mapped level.
    feats = [f.requires_grad_() for f in make_pyramid(2, 3, dtype=dtype, seed=5)]
    boxes = [pyramid_boxes(9, IMAGE_HW, 1).to(dtype), pyramid_boxes(6, IMAGE_HW, 2).to(dtype)]
    got = multiscale_roi_align(feats, boxes, 3, [IMAGE_HW] * 2, sampling_ratio, backend="torch")
    scales = infer_scales([f.shape[-2:] for f in feats], [IMAGE_HW] * 2)
    all_rois = boxes_to_rois(boxes)
    assert_close_verbose(got, multiscale_roi_align_ref(feats, all_rois, 3, scales, sampling_ratio), *TOL[dtype])
    grad = torch.randn_like(got)
    grads = torch.autograd.grad(got, feats, grad)
    expected = roi_align_backward_ref(grad, all_rois, [f.shape for f in feats], (3, 3), scales, sampling_ratio, False)
    for g, e in zip(grads, expected):
        assert_close_verbose(g, e, *TOL[dtype])


# --------------------------------------------------------------------------- reference: multi-level


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), (14, 2), ((5, 3), -1)])
def test_multiscale_matches_torchvision(levels, output_size, sampling_ratio):
    image_sizes = [(123, 150), (96, 160)]
    feats = make_pyramid(2, 4, levels, image_hw=(128, 160))
    boxes = [pyramid_boxes(9, image_sizes[0], 1), pyramid_boxes(6, image_sizes[1], 2)]
    names = [f"p{i}" for i in range(levels)]
    tv = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)
    expected = tv(dict(zip(names, feats)), boxes, image_sizes)
    got = multiscale_roi_align(feats, boxes, output_size, image_sizes, sampling_ratio, backend="torch")
    assert_close_verbose(got, expected, *TOL[torch.float32])
    module = MultiScaleRoIAlign(names, output_size, sampling_ratio, backend="torch")
    assert_close_verbose(module(dict(zip(names, feats)), boxes, image_sizes), expected, *TOL[torch.float32])
    assert list(module.state_dict()) == []


def test_reference_multiscale_backward_matches_torchvision():
    image_sizes = [(128, 160), (128, 140)]
    feats = make_pyramid(2, 3, dtype=torch.float64, seed=4, image_hw=(128, 160))
    boxes = [pyramid_boxes(8, image_sizes[0], 5).double(), pyramid_boxes(5, image_sizes[1], 6).double()]
    names = ["0", "1", "2", "3"]
    grad = torch.randn(sum(len(b) for b in boxes), 3, 7, 7, dtype=torch.float64)
    f1 = [f.clone().requires_grad_() for f in feats]
    torchvision.ops.MultiScaleRoIAlign(names, 7, 2)(dict(zip(names, f1)), boxes, image_sizes).backward(grad)
    f2 = [f.clone().requires_grad_() for f in feats]
    multiscale_roi_align(f2, boxes, 7, image_sizes, 2, backend="torch").backward(grad)
    for i, (a, b) in enumerate(zip(f2, f1)):
        assert_close_verbose(a.grad, b.grad, *TOL[torch.float64], what=f"level {i}")
    assert any(float(b.grad.abs().sum()) > 0 for b in f1)


def test_multiscale_gradcheck():
    feats = [torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True),
             torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)]
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0], [3.0, 1.0, 30.0, 29.0]], dtype=torch.float64)]

    def fn(a, b):
        return multiscale_roi_align([a, b], boxes, 2, [(32, 32)], 2, canonical_scale=16, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(feats))


def test_map_levels_boundaries():
    s = torch.tensor([112.0, 224.0, 448.0, 223.9, 10.0, 5000.0])
    boxes = torch.stack([torch.zeros_like(s), torch.zeros_like(s), s, s], 1)
    assert map_levels(boxes, 2, 5).tolist() == [1, 2, 3, 1, 0, 3]


def test_multiscale_zero_boxes_and_one_empty_image():
    feats = make_pyramid(2, 4, image_hw=(64, 64))
    out = multiscale_roi_align(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], 7, [(64, 64)] * 2, backend="torch")
    assert out.shape == (0, 4, 7, 7)
    boxes = [torch.zeros(0, 4), pyramid_boxes(3, (64, 64), 0)]
    expected = torchvision.ops.MultiScaleRoIAlign(["a", "b", "c", "d"], 7, 2)(
        dict(zip("abcd", feats)), boxes, [(64, 64)] * 2)
    got = multiscale_roi_align(feats, boxes, 7, [(64, 64)] * 2, backend="torch")
    assert_close_verbose(got, expected, *TOL[torch.float32])


# --------------------------------------------------------------------------- bad input


def test_roi_align_bad_input():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="input must have 4 dimensions"):
        roi_align(x[0], torch.zeros(1, 5), 2, backend="torch")
    with pytest.raises(ValueError, match=r"shape \[K, 5\]"):
        roi_align(x, torch.zeros(3, 4), 2, backend="torch")
    with pytest.raises(ValueError, match="non-finite"):
        roi_align(x, torch.tensor([[0, 1.0, float("nan"), 2, 2]]), 2, backend="torch")
    with pytest.raises(TypeError, match="dtype"):
        roi_align(x.int(), torch.zeros(1, 5), 2, backend="torch")
    with pytest.raises(ValueError, match="output_size"):
        roi_align(x, torch.zeros(1, 5), 0, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        roi_align(x, torch.zeros(1, 5), 2, backend="cuda")
    with pytest.raises(TypeError, match="boxes"):
        boxes_to_rois([torch.zeros(1, 4, dtype=torch.int64)])


def test_multiscale_bad_input():
    feats = make_pyramid(2, 4, image_hw=(64, 64))
    boxes = [torch.zeros(1, 4), torch.zeros(1, 4)]
    with pytest.raises(ValueError, match="image_sizes"):
        multiscale_roi_align(feats, boxes, 7, [(64, 64)], backend="torch")
    with pytest.raises(ValueError, match="boxes has 1 images"):
        multiscale_roi_align(feats, boxes[:1], 7, [(64, 64)], backend="torch")
    with pytest.raises(ValueError, match=r"features\[1\]"):
        multiscale_roi_align([feats[0], feats[1][:, :2]], boxes, 7, [(64, 64)] * 2, backend="torch")
    with pytest.raises(ValueError, match="none of the maps"):
        MultiScaleRoIAlign(["x"], 7, 2)({"y": feats[0]}, boxes, [(64, 64)] * 2)


def test_multiscale_module_pools_the_listed_maps_present_as_torchvision():
    """Listed names missing from the features are skipped (torchvision's rule), e.g. a two-map
    backbone (MobileNet's FPN: "0", "1", "pool") with the default four names."""
    tv_ops = pytest.importorskip("torchvision.ops")
    feats = make_pyramid(2, 4, image_hw=(64, 64))
    x = {"0": feats[0], "1": feats[1], "pool": feats[1][:, :, ::2, ::2]}
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 30.0]]), torch.tensor([[5.0, 1.0, 20.0, 60.0]])]
    sizes = [(64, 64)] * 2
    want = tv_ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(x, boxes, sizes)
    got = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, backend="torch")(x, boxes, sizes)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_roi_align_bad_scalars_and_batch_index():
    x = torch.randn(2, 2, 5, 5)
    rois = torch.tensor([[0, 1.0, 1, 3, 3]])
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_align(x, rois, 2, None, backend="torch")
    with pytest.raises(TypeError, match="sampling_ratio"):
        roi_align(x, rois, 2, 1.0, 2.0, backend="torch")
    with pytest.raises(TypeError, match="aligned"):
        roi_align(x, rois, 2, 1.0, 2, 1, backend="torch")
    for bad in (-1.0, 2.0, 0.5):
        with pytest.raises(ValueError, match=r"boxes\[:, 0\] must be batch indices in \[0, 2\)"):
            roi_align(x, torch.tensor([[bad, 1.0, 1, 3, 3]]), 2, backend="torch")
    feats = make_pyramid(1, 2, image_hw=(64, 64))
    with pytest.raises(ValueError, match=r"image_sizes\[0\] must be a pair of positive ints"):
        multiscale_roi_align(feats, [torch.zeros(1, 4)], 7, [(0, 0)], backend="torch")
    with pytest.raises(TypeError, match="canonical_level"):
        multiscale_roi_align(feats, [torch.zeros(1, 4)], 7, [(64, 64)], canonical_level=4.5, backend="torch")


# --------------------------------------------------------------------------- Triton: single level


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS + ["permuted"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_forward_matches_torchvision(device, layout, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 13, 17, generator=g)
    rois = make_rois(2, 14, 60.0, seed=2)
    out_size, scale = ((7, 7), 0.25) if aligned else ((3, 5), 0.5)
    expected = torchvision.ops.roi_align(x, rois, out_size, scale, sampling_ratio, aligned)
    xd = to_layout(x.to(device), layout)
    got = roi_align(xd, rois.to(device), out_size, scale, sampling_ratio, aligned, backend="triton")
    assert_close_verbose(got.cpu(), expected, *TOL[torch.float32], what=f"{layout} out={out_size}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_roi_align_edge_rois(device, layout):
    x = torch.randn(2, 5, 8, 9)
    rois = torch.tensor([
        [0, -20, -20, -10, -10],   # wholly outside (top-left)
        [1, 30, 30, 50, 50],       # wholly outside (bottom-right)
        [0, 3, 3, 3, 3],           # a point
        [1, 5, 2, 4, 6],           # x2 < x1
        [0, -3, -3, 12, 11],       # covers and exceeds the map
        [1, 7.9, 6.9, 8.6, 7.2],   # on the last row and column
        [0, -1.0, -1.0, 0.5, 0.5], # samples between -1 and 0
    ])
    xd = to_layout(x.to(device), layout)
    for aligned in (False, True):
        for sr in (-1, 3):
            expected = torchvision.ops.roi_align(x, rois, (4, 5), 1.0, sr, aligned)
            got = roi_align(xd, rois.to(device), (4, 5), 1.0, sr, aligned, backend="triton")
            assert_close_verbose(got.cpu(), expected, *TOL[torch.float32], what=f"aligned={aligned} sr={sr}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_roi_align_backward_matches_torchvision(device, deterministic):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 11, 14, generator=g)
    rois = make_rois(2, 13, 48.0, seed=4)
    grad = torch.randn(13, 6, 4, 3, generator=g)
    for aligned, sr in ((True, -1), (False, 2)):
        x1 = leaf(x, "cpu")
        torchvision.ops.roi_align(x1, rois, (4, 3), 0.4, sr, aligned).backward(grad)
        x2 = leaf(x, device)
        roi_align(x2, rois.to(device), (4, 3), 0.4, sr, aligned, backend="triton",
                  deterministic=deterministic).backward(grad.to(device))
        assert_close_verbose(x2.grad.cpu(), x1.grad, *TOL[torch.float32], what=f"aligned={aligned} sr={sr}")


# --------------------------------------------------------------------------- Triton: multi-level


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multiscale_forward_matches_torchvision(device, levels, layout):
    feats = make_pyramid(2, 12, levels, seed=levels)
    boxes = [pyramid_boxes(9, IMAGE_SIZES[0], 1), pyramid_boxes(5, IMAGE_SIZES[1], 2)]  # 24 RoIs
    # 7x7 (box head) always, plus a mask-head size or a non-square one with adaptive sampling.
    extra = [(14, 2), ((4, 6), 1), (14, 2), ((6, 9), -1)][levels - 1]
    feats_d = [to_layout(f.to(device), layout) for f in feats]
    boxes_d = [b.to(device) for b in boxes]
    for out_size, sr in [(7, 2), extra]:
        expected = tv_multiscale(feats, boxes, out_size, sr)
        got = multiscale_roi_align(feats_d, boxes_d, out_size, IMAGE_SIZES, sr, backend="triton")
        assert_close_verbose(got.cpu(), expected, *TOL[torch.float32], what=f"out={out_size} sr={sr}")
    if levels == 4:
        names = [f"p{i}" for i in range(levels)]
        module = MultiScaleRoIAlign(names, 7, 2, backend="triton")
        assert_close_verbose(module(dict(zip(names, feats_d)), boxes_d, IMAGE_SIZES).cpu(),
                             tv_multiscale(feats, boxes, 7, 2), *TOL[torch.float32], what="module")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("levels,layout,deterministic", [
    (4, "channels_last", False), (4, "nchw", True), (2, "nchw", False)])
def test_multiscale_backward_matches_torchvision(device, levels, layout, deterministic):
    feats = make_pyramid(2, 12, levels, seed=5)
    boxes = [pyramid_boxes(8, IMAGE_SIZES[0], 6), pyramid_boxes(5, IMAGE_SIZES[1], 7)]
    grad = torch.randn(sum(len(b) for b in boxes), 12, 7, 7, generator=torch.Generator().manual_seed(8))
    f1 = [leaf(f, "cpu") for f in feats]
    tv_multiscale(f1, boxes, 7, 2).backward(grad)
    f2 = [leaf(to_layout(f.to(device), layout), device) for f in feats]
    out = multiscale_roi_align(f2, [b.to(device) for b in boxes], 7, IMAGE_SIZES, 2, backend="triton",
                               deterministic=deterministic)
    out.backward(grad.to(device))
    for i, (a, b) in enumerate(zip(f2, f1)):
        assert_close_verbose(a.grad.cpu(), b.grad, *TOL[torch.float32], what=f"level {i}")
        assert a.grad.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                    else torch.contiguous_format)
    assert all(float(b.grad.abs().sum()) > 0 for b in f1)  # every level received gradient


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multiscale_low_precision(device, dtype, layout):
    """fp16/bf16 accumulate in fp32: compared with the fp32 reference on the same rounded inputs."""
    feats = make_pyramid(2, 12, 4, layout, dtype=dtype, seed=9, device=device)
    boxes = [pyramid_boxes(7, IMAGE_SIZES[0], 10, device), pyramid_boxes(4, IMAGE_SIZES[1], 11, device)]
    scales = infer_scales([f.shape[-2:] for f in feats], IMAGE_SIZES)
    leaves = [f.detach().requires_grad_() for f in feats]
    got = multiscale_roi_align(leaves, boxes, 7, IMAGE_SIZES, 2, backend="triton")
    assert got.dtype == dtype
    expected = multiscale_roi_align_ref([f.float() for f in feats], boxes_to_rois(boxes), 7, scales, 2)
    assert_close_verbose(got.float(), expected.to(dtype).float(), *TOL[dtype], what="forward")
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(12)).to(device=device, dtype=dtype)
    got.backward(grad)
    for i, (leaf, ref) in enumerate(zip(leaves, ref_grads(feats, boxes, 7, 2, grad))):
        assert leaf.grad.dtype == dtype
        assert_close_verbose(leaf.grad.float(), ref.to(dtype).float(), *TOL[dtype], what=f"grad level {i}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_level_chosen_in_kernel_matches_level_mapper(device):
    """Five levels whose features are constant (10 * image + level): the pooled value of a box
    wholly inside the image says which level and image the kernel read."""
    n, c, image = 2, 3, 1024
    sizes = [(image // s, image // s) for s in (4, 8, 16, 32, 64)]  # levels k = 2..6, all five kernel slots
    feats = [torch.stack([torch.full((c, h, w), 10.0 * i + lvl) for i in range(n)]).to(device)
             for lvl, (h, w) in enumerate(sizes)]
    # sqrt(area) on both sides of and exactly on the boundaries 112, 224, 448 (square and not)
    side = torch.tensor([10.0, 111.99, 112.0, 112.01, 223.98, 224.0, 447.9, 448.0, 600.0, 1000.0])
    boxes = torch.stack([torch.ones_like(side), torch.ones_like(side), 1.0 + side, 1.0 + side], 1)
    boxes = torch.cat([boxes, torch.tensor([[2.0, 3.0, 114.0, 451.0], [3.0, 2.0, 451.0, 114.0]])])
    boxes = [boxes[:6].to(device), boxes[6:].to(device)]
    got = multiscale_roi_align(feats, boxes, 2, [(image, image)] * 2, 2, backend="triton")
    rois = boxes_to_rois([b.cpu() for b in boxes])
    k_min, k_max = level_range(infer_scales(sizes, [(image, image)]))
    assert (k_min, k_max) == (2, 6)
    expected = 10.0 * rois[:, 0] + map_levels(rois[:, 1:], k_min, k_max).float()
    assert set(map_levels(rois[:, 1:], k_min, k_max).tolist()) == {0, 1, 2, 3, 4}  # every level is used
    assert_close_verbose(got.cpu()[:, 0, 0, 0], expected, 1e-4, 0, what="10 * image + level")


# --------------------------------------------------------------------------- deterministic mode


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_deterministic_backward_is_bitwise_reproducible(device):
    feats = make_pyramid(2, 12, 2, "channels_last", seed=13, device=device)
    boxes = [pyramid_boxes(4, IMAGE_SIZES[0], 14, device), pyramid_boxes(3, IMAGE_SIZES[1], 15, device)]
    grad = torch.randn(sum(len(b) for b in boxes), 12, 7, 7, generator=torch.Generator().manual_seed(16)).to(device)
    runs = []
    previous = torch.are_deterministic_algorithms_enabled()
    for use_global_flag in (True, False):
        leaves = [f.detach().requires_grad_() for f in feats]
        if use_global_flag:  # deterministic=None follows torch.use_deterministic_algorithms
            torch.use_deterministic_algorithms(True)
            try:
                out = multiscale_roi_align(leaves, boxes, 7, IMAGE_SIZES, 2, backend="triton")
            finally:
                torch.use_deterministic_algorithms(previous)
        else:
            out = multiscale_roi_align(leaves, boxes, 7, IMAGE_SIZES, 2, backend="triton", deterministic=True)
        out.backward(grad)
        runs.append([f.grad for f in leaves])
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"level {i}: deterministic gradients differ between runs"
    for i, (a, ref) in enumerate(zip(runs[0], ref_grads(feats, boxes, 7, 2, grad))):
        assert_close_verbose(a, ref, *TOL[torch.float32], what=f"level {i}")


# --------------------------------------------------------------------------- Triton edge cases


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_one_image_without_boxes_and_partial_grads(device):
    feats = make_pyramid(2, 4, 4, seed=21)
    boxes = [torch.zeros(0, 4), pyramid_boxes(4, IMAGE_SIZES[1], 22)]
    f1 = [leaf(f, "cpu", i != 1) for i, f in enumerate(feats)]
    tv_multiscale(f1, boxes, 7, 2).sum().backward()
    f2 = [leaf(f, device, i != 1) for i, f in enumerate(feats)]
    out = multiscale_roi_align(f2, [b.to(device) for b in boxes], 7, IMAGE_SIZES, 2, backend="triton")
    out.sum().backward()
    assert f2[1].grad is None
    for i in (0, 2, 3):
        assert_close_verbose(f2[i].grad.cpu(), f1[i].grad, *TOL[torch.float32], what=f"level {i}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backend_refusals(device):
    feats = make_pyramid(1, 2, 4, device=device) + [torch.randn(1, 2, 2, 3, device=device),
                                                    torch.randn(1, 2, 1, 2, device=device)]
    with pytest.raises(RuntimeError, match="at most 5 feature levels"):
        multiscale_roi_align(feats, [torch.zeros(1, 4, device=device)], 7, [IMAGE_HW], 2, backend="triton")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64_matches_torchvision(device, layout):
    """fp64 features are computed in fp64 (RoIs, level mapping, taps, accumulation), as
    torchvision's fp64 kernel: equal within fp64 rounding, forward and both backwards."""
    x = to_layout(torch.randn(2, 3, 11, 14, generator=torch.Generator().manual_seed(3), dtype=torch.float64), layout)
    rois = make_rois(2, 9, 40.0, 3).double()
    for aligned, ratio in ((False, -1), (True, 2)):
        want = torchvision.ops.roi_align(x, rois, (3, 4), 0.25, ratio, aligned)
        got = roi_align(x.to(device), rois.to(device), (3, 4), 0.25, ratio, aligned, backend="triton")
        assert got.dtype == torch.float64
        assert_close_verbose(got.cpu(), want, *TOL[torch.float64], what=f"aligned={aligned}")
    feats = [f.double() for f in make_pyramid(2, 3, 3, layout)]
    boxes = [pyramid_boxes(6, IMAGE_HW, seed=i).double() for i in range(2)]
    want = tv_multiscale(feats, boxes, 5, 2)
    got = multiscale_roi_align([f.to(device) for f in feats], [b.to(device) for b in boxes], 5, IMAGE_SIZES,
                               backend="triton")
    assert_close_verbose(got.cpu(), want, *TOL[torch.float64], what="multiscale")
    # gradcheck needs fp64: the atomic and the deterministic backward are exact derivatives.
    small = leaf(x[:1, :1, :6, :7], device)
    small_rois = torch.tensor([[0, 1.2, 0.7, 5.3, 6.1], [0, -0.5, 2.0, 3.5, 4.75]], dtype=torch.float64, device=device)
    for deterministic in (False, True):
        assert torch.autograd.gradcheck(
            lambda t: roi_align(t, small_rois, (2, 3), 1.0, 2, True, backend="triton", deterministic=deterministic),
            (small,), fast_mode=True), f"deterministic={deterministic}"


# --------------------------------------------------------------------------- Triton kernel internals


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_output_written(device, layout):
    """Outputs pre-filled with NaN, with the block shapes the GPU uses (one RoI per program;
    channels-last: one bin per program) and with several channel blocks and a partial one."""
    from fastmask.kernels.roi_align import roi_align_bwd, roi_align_fwd

    feats = make_pyramid(2, 12, 2, layout, seed=17, device=device)
    boxes = [pyramid_boxes(1, IMAGE_SIZES[0], 18, device)[[0, 2]], pyramid_boxes(1, IMAGE_SIZES[1], 19, device)[[0]]]
    rois = boxes_to_rois(boxes).float().contiguous()
    scales = infer_scales([f.shape[-2:] for f in feats], IMAGE_SIZES)
    k_min, k_max = level_range(scales)
    out_size = (2, 2)
    expected = tv_multiscale([f.cpu() for f in feats], [b.cpu() for b in boxes], out_size, 2)
    # GPU shapes: channels-last one bin per program; NCHW flat runs of 32 (channel, bin)
    # elements (12 x 4 per RoI: one run full, one partial), and a tile of 2 channel blocks.
    if layout == "channels_last":
        shapes = [dict(block_r=1, block_p=1), {}]
    else:
        shapes = [dict(block_r=1, block_p=32, layout=2), dict(block_r=1, block_c=8), {}]
    for shape in shapes:
        out = torch.full((rois.shape[0], 12, *out_size), float("nan"), device=device)
        roi_align_fwd(feats, rois, out_size, scales, 2, False, k_min=k_min, k_max=k_max, out=out, **shape)
        assert_close_verbose(out.cpu(), expected, *TOL[torch.float32], what=f"forward {shape}")
    # The deterministic backward writes every element of its buffer (zeros where no RoI reaches).
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(20)).to(device)
    shapes = [tuple(f.shape) for f in feats]
    cl = [layout == "channels_last"] * len(feats)
    total = sum(math.prod(s) for s in shapes)
    ref = roi_align_bwd(grad, rois, shapes, cl, out_size, scales, 2, False, k_min=k_min, k_max=k_max)
    for block_r in (1, None):
        buf = torch.full((total,), float("nan"), device=device)
        got = roi_align_bwd(grad, rois, shapes, cl, out_size, scales, 2, False, k_min=k_min, k_max=k_max,
                            deterministic=True, out=buf, block_r=block_r)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert_close_verbose(a.cpu(), b.cpu(), *TOL[torch.float32], what=f"det block_r={block_r} level {i}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout,sampling_ratio", [("nchw", 2), ("permuted", -1)])
def test_flat_layout_matches_torchvision(device, layout, sampling_ratio):
    """The GPU's NCHW layout (one RoI per program, runs of (channel, bin) elements) through the
    interpreter: forward and atomic backward against torchvision, runs that straddle channels
    and a partial last run (12 channels x 9 bins = 108 = 64 + 44), fixed and adaptive sampling."""
    from fastmask.kernels.roi_align import roi_align_bwd, roi_align_fwd

    feats = make_pyramid(2, 12, 3, layout, seed=31, device=device)
    boxes = [pyramid_boxes(2, IMAGE_SIZES[0], 32, device), pyramid_boxes(1, IMAGE_SIZES[1], 33, device)]
    rois = boxes_to_rois(boxes).float().contiguous()
    scales = infer_scales([f.shape[-2:] for f in feats], IMAGE_SIZES)
    k_min, k_max = level_range(scales)
    leaves = [f.detach().cpu().requires_grad_() for f in feats]
    expected = tv_multiscale(leaves, [b.cpu() for b in boxes], (3, 3), sampling_ratio)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(34))
    expected.backward(grad)
    out = torch.full(expected.shape, float("nan"), device=device)
    roi_align_fwd(feats, rois, (3, 3), scales, sampling_ratio, False, k_min=k_min, k_max=k_max, out=out,
                  block_r=1, block_p=64, layout=2)
    assert_close_verbose(out.cpu(), expected.detach(), *TOL[torch.float32], what="forward")
    got = roi_align_bwd(grad.to(device), rois, [tuple(f.shape) for f in feats], [False] * 3, (3, 3), scales,
                        sampling_ratio, False, k_min=k_min, k_max=k_max, block_r=1, block_p=64, layout=2)
    for i, (a, b) in enumerate(zip(got, leaves)):
        assert_close_verbose(a.cpu(), b.grad, *TOL[torch.float32], what=f"backward level {i}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_deterministic_backward_gpu_shape(device, monkeypatch):
    """The GPU's deterministic configuration (one RoI per step) with the RoIs binned 4 per
    program (many binning programs, the last partial): gradients equal the atomic kernel's,
    and every element of the NaN-filled buffer is written."""
    import fastmask.kernels.roi_align as ra

    monkeypatch.setattr(ra, "BIN_ROIS_INTERPRETER", 4)
    feats = make_pyramid(2, 12, 2, "nchw", seed=23, device=device)
    boxes = [pyramid_boxes(6, IMAGE_SIZES[0], 24, device), pyramid_boxes(3, IMAGE_SIZES[1], 25, device)]
    rois = boxes_to_rois(boxes).float().contiguous()
    assert rois.shape[0] % 4
    scales = infer_scales([f.shape[-2:] for f in feats], IMAGE_SIZES)
    k_min, k_max = level_range(scales)
    out_size = (2, 2)
    grad = torch.randn(rois.shape[0], 12, *out_size, generator=torch.Generator().manual_seed(26)).to(device)
    shapes = [tuple(f.shape) for f in feats]
    cl = [False] * len(feats)
    ref = ra.roi_align_bwd(grad, rois, shapes, cl, out_size, scales, 2, False, k_min=k_min, k_max=k_max)
    buf = torch.full((sum(math.prod(s) for s in shapes),), float("nan"), device=device)
    got = ra.roi_align_bwd(grad, rois, shapes, cl, out_size, scales, 2, False, k_min=k_min, k_max=k_max,
                           deterministic=True, out=buf, block_r=1)
    assert all(a.abs().sum() > 0 for a in got)  # every level received gradient
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close_verbose(a.cpu(), b.cpu(), *TOL[torch.float32], what=f"det, one RoI per step, level {i}")


def _binned(monkeypatch, feats, rois, scales, out_size, **kw):
    """The deterministic backward's gradients and its binning: {tile: [RoIs]} as its kernel
    walks them (slices of the list between the prefix sums), and the number of tiles."""
    import fastmask.kernels.roi_align as ra

    seen = {}
    real = ra._bin_rois

    def spy(rois_, desc, k, n, num_tiles, *args):
        rois_list, ends, nb = real(rois_, desc, k, n, num_tiles, *args)
        seen.update(rois_list=rois_list.cpu(), ends=ends.cpu(), nb=nb, tiles=num_tiles)
        return rois_list, ends, nb

    monkeypatch.setattr(ra, "_bin_rois", spy)
    grad = torch.randn(rois.shape[0], feats[0].shape[1], *out_size, generator=torch.Generator().manual_seed(5))
    shapes = [tuple(f.shape) for f in feats]
    grads = ra.roi_align_bwd(grad, rois, shapes, [False] * len(feats), out_size, scales, 2, False,
                             deterministic=True, **kw)
    ends, nb = seen["ends"].tolist(), seen["nb"]
    lists = {}
    for t in range(seen["tiles"]):
        lo = ends[t * nb - 1] if t else 0
        lists[t] = seen["rois_list"][lo:ends[t * nb + nb - 1]].tolist()
    return grads, lists, seen["tiles"]


@interpreter  # CPU tensors through the kernels
def test_deterministic_backward_visits_only_the_tiles_each_roi_reaches(monkeypatch):
    """Each gradient tile walks exactly the RoIs whose gradient can land in it, in increasing
    order: a superset of the tiles each RoI's own gradient (the reference's, one RoI at a
    time) touches, within one tile of it. So the work is the (RoI, tile) pairs a RoI reaches,
    whatever the number of tiles and RoIs: the same RoIs on maps of 4x the area take the same
    steps over 4x the tiles, and twice the RoIs twice the steps."""
    import fastmask.kernels.roi_align as ra

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 24, 40, generator=g)
    rois = make_rois(2, 24, 90.0, seed=4)
    out_size, scale = (3, 3), 0.25
    th, tw = ra._det_config(torch.device("cpu"), [x.shape], 24, 3, 9)[:2]
    _, lists, tiles = _binned(monkeypatch, [x], rois, [scale], out_size)
    tiles_x, tiles_img = -(-40 // tw), -(-24 // th) * -(-40 // tw)
    for k in range(rois.shape[0]):
        leaf_x = x.clone().requires_grad_()
        roi_align(leaf_x, rois[k:k + 1], out_size, scale, 2, False, backend="torch").sum().backward()
        cells = leaf_x.grad.abs().sum(1).nonzero()  # (image, row, column) of every cell it touches
        touched = {int(n) * tiles_img + int(r) // th * tiles_x + int(c) // tw for n, r, c in cells}
        listed = {t for t, ks in lists.items() if k in ks}
        assert touched <= listed, f"RoI {k}: tiles {sorted(touched - listed)} get gradient but do not list it"
        near = {t + dy * tiles_x + dx for t in touched for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        assert not touched or listed <= near, f"RoI {k}: listed in tiles {sorted(listed - near)} it cannot reach"
    assert all(ks == sorted(ks) for ks in lists.values())
    pairs = sum(len(ks) for ks in lists.values())
    assert 0 < pairs < tiles * rois.shape[0] / 2  # far below every tile scanning every RoI

    # The same RoIs on maps of 4x the area, tiled alike (16x32 cells through the interpreter):
    # more than twice the tiles, the same pairs.
    big = torch.nn.functional.pad(x, (0, 40, 0, 24))
    _, big_lists, big_tiles = _binned(monkeypatch, [big], rois, [scale], out_size)
    assert ra._det_config(torch.device("cpu"), [big.shape], 24, 3, 9)[:2] == (th, tw)
    assert big_tiles > 2 * tiles and sum(len(ks) for ks in big_lists.values()) == pairs
    # Twice the RoIs: twice the pairs.
    _, double_lists, _ = _binned(monkeypatch, [x], torch.cat([rois, rois]), [scale], out_size)
    assert sum(len(ks) for ks in double_lists.values()) == 2 * pairs


# --------------------------------------------------------------------------- level descriptor


@needs_triton
def test_kernels_take_few_arguments():
    """Per-level values travel in the level descriptor, not as arguments (the launch's host
    cost grows with the argument count): at most 20 runtime arguments per kernel."""
    import inspect

    from fastmask.kernels import roi_align as ra

    for kernel in (ra._roi_align_fwd_kernel, ra._roi_align_bwd_kernel, ra._roi_align_bwd_det_kernel):
        params = inspect.signature(kernel.fn).parameters.values()
        runtime = [p.name for p in params if "constexpr" not in str(p.annotation)]
        assert "desc_ptr" in runtime
        assert len(runtime) <= 20, f"{kernel.fn.__name__}: {len(runtime)} arguments: {runtime}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_descriptor_cached_per_geometry(device):
    """A call with the geometry of an earlier one reuses its descriptor (no copy); new feature
    data with the same geometry is read through the new pointers; new scales or strides get
    their own descriptor, whose rows hold the sizes, strides and fp32 scale bits."""
    import struct

    from fastmask.kernels import roi_align as ra

    feats = make_pyramid(2, 12, 3, seed=30, device=device)
    boxes = [pyramid_boxes(4, IMAGE_SIZES[0], 31, device), pyramid_boxes(3, IMAGE_SIZES[1], 32, device)]
    rois = boxes_to_rois(boxes).float().contiguous()
    scales = infer_scales([f.shape[-2:] for f in feats], IMAGE_SIZES)
    k_min, k_max = level_range(scales)
    kw = dict(k_min=k_min, k_max=k_max)

    def plan_of(features, sc):
        key = (features[0].device, ra._stream_key(features[0].device), False, tuple(sc),
               tuple([(f.shape, f.stride()) for f in features]))
        return ra._FWD_PLANS[key]

    ra.roi_align_fwd(feats, rois, (3, 3), scales, 2, False, **kw)
    desc = plan_of(feats, scales)[0]
    assert desc.shape == (ra.MAX_LEVELS, ra.DESC_FIELDS) and desc.dtype == torch.int64
    table = desc.cpu()
    for lvl, f in enumerate(feats):
        row = table[lvl].tolist()
        align = plan_of(feats, scales)[2]
        assert row[ra.DESC_HEIGHT:ra.DESC_WIDTH + 1] == list(f.shape[2:])
        assert [row[ra.DESC_STRIDE_N] * align, row[ra.DESC_STRIDE_H] * align,
                row[ra.DESC_STRIDE_W] * align] == [f.stride(0), f.stride(2), f.stride(3)]
        assert struct.unpack("<f", struct.pack("<i", row[ra.DESC_SCALE]))[0] == pytest.approx(scales[lvl])
    assert torch.equal(table[len(feats):], table[:1].expand(ra.MAX_LEVELS - len(feats), -1))

    # Same geometry, other data: the same descriptor object, the new data's result.
    other = [f * 2.0 + 1.0 for f in feats]
    got = ra.roi_align_fwd(other, rois, (3, 3), scales, 2, False, **kw)
    assert plan_of(other, scales)[0] is desc
    expected = tv_multiscale([f.cpu() for f in other], [b.cpu() for b in boxes], (3, 3), 2)
    assert_close_verbose(got.cpu(), expected, *TOL[torch.float32], what="new data, cached descriptor")

    # Other scales (sizes unchanged): a new descriptor, and the result of those scales.
    half = [s / 2 for s in scales]
    lo, hi = level_range(half)
    got = ra.roi_align_fwd(feats, rois, (3, 3), half, 2, False, k_min=lo, k_max=hi)
    assert plan_of(feats, half)[0] is not desc
    expected = multiscale_roi_align_ref(feats, rois, (3, 3), half, 2)
    assert_close_verbose(got, expected, *TOL[torch.float32], what="other scales")

    # Other strides (channels-last): a new descriptor and a channels-last result.
    cl = [to_layout(f, "channels_last") for f in feats]
    got = ra.roi_align_fwd(cl, rois, (3, 3), scales, 2, False, **kw)
    assert plan_of(cl, scales)[0] is not desc
    assert got.is_contiguous(memory_format=torch.channels_last)
    expected = tv_multiscale([f.cpu() for f in feats], [b.cpu() for b in boxes], (3, 3), 2)
    assert_close_verbose(got.cpu(), expected, *TOL[torch.float32], what="channels-last descriptor")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_descriptor_cache_is_bounded(device, monkeypatch):
    from fastmask.kernels import roi_align as ra

    monkeypatch.setattr(ra, "_PLAN_CACHE_SIZE", 2)
    monkeypatch.setattr(ra, "_FWD_PLANS", {})
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]], device=device)
    for width in (7, 8, 9):
        ra.roi_align_fwd([torch.randn(1, 2, 6, width, device=device)], rois, (2, 2), [1.0], 2, True)
    assert [key[-1][0][0][3] for key in ra._FWD_PLANS] == [8, 9]  # the oldest geometry was dropped


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_index_64_kernels(device, layout, monkeypatch):
    """The kernels' 64-bit index variant (sizes or strides past int32, forced here on small
    inputs) gives the same forward and backward as the 32-bit one."""
    from fastmask.kernels import roi_align as ra

    feats = make_pyramid(2, 12, 2, layout, seed=33, device=device)
    boxes = [pyramid_boxes(3, IMAGE_SIZES[0], 34, device), pyramid_boxes(2, IMAGE_SIZES[1], 35, device)]
    rois = boxes_to_rois(boxes).float().contiguous()
    scales = infer_scales([f.shape[-2:] for f in feats], IMAGE_SIZES)
    geometry = dict(k_min=level_range(scales)[0], k_max=level_range(scales)[1])
    shapes, cl = [tuple(f.shape) for f in feats], [layout == "channels_last"] * 2
    grad = torch.randn(rois.shape[0], 12, 4, 4, generator=torch.Generator().manual_seed(36)).to(device)

    def run():
        out = ra.roi_align_fwd(feats, rois, (4, 4), scales, 2, False, **geometry)
        grads = [ra.roi_align_bwd(grad, rois, shapes, cl, (4, 4), scales, 2, False, deterministic=det, **geometry)
                 for det in (False, True)]
        return out, grads

    ref_out, ref_grads = run()
    real = ra._level_rows
    monkeypatch.setattr(ra, "_level_rows", lambda *a, **k: real(*a, **k)[:2] + (True,))
    monkeypatch.setattr(ra, "_FWD_PLANS", {})
    monkeypatch.setattr(ra, "_BWD_PLANS", {})
    out, grads = run()
    assert all(plan[-1] for plan in ra._FWD_PLANS.values()) and all(plan[-1] for plan in ra._BWD_PLANS.values())
    assert_close_verbose(out.cpu(), ref_out.cpu(), 1e-6, 0, what="forward")
    for det, (got, ref) in enumerate(zip(grads, ref_grads)):
        for i, (a, b) in enumerate(zip(got, ref)):
            assert_close_verbose(a.cpu(), b.cpu(), 1e-6, 0, what=f"backward det={bool(det)} level {i}")


# --------------------------------------------------------------------------- large inputs


def _giant_map(shape, layout, device):
    """A Tensor of more than 2**31 elements whose storage is mostly never touched (on the CPU
    the pages stay unallocated), with random values in its bottom-right 48 x 48 corner; that
    corner (a view) and the map. Skips where the address space cannot be reserved."""
    try:
        x = torch.empty(shape, device=device, memory_format=torch.channels_last if layout == "channels_last"
                        else torch.contiguous_format)
    except (RuntimeError, MemoryError) as exc:  # e.g. a machine that does not overcommit memory
        pytest.skip(f"cannot reserve {math.prod(shape) * 4 / 2**30:.1f} GiB of address space: {exc}")
    assert x.numel() > 2**31
    corner = x[:, :, -48:, -48:]
    corner.copy_(torch.randn(corner.shape, generator=torch.Generator().manual_seed(40)))
    return x, corner


# Boxes in the corner's coordinates whose sample positions are exact in fp32 even at 66,000
# pixels (quarter-pixel edges, bins of whole pixels), so the corner's own RoI Align is the
# oracle; the last box runs past the map's bottom-right edge, which is the corner's too.
CORNER_ROIS = [[0, 5.5, 7.25, 29.5, 27.25], [0, 20.0, 10.0, 44.0, 40.0], [0, 40.0, 41.0, 64.0, 61.0]]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout,shape", [("nchw", (1, 1, 66000, 33000)), ("channels_last", (1, 2, 33000, 33000))])
def test_more_than_2_31_elements(device, layout, shape):
    """A feature map of 2.18e9 elements, whose row (NCHW) or channels-last row offsets pass
    2**31 inside one image: the kernel indexes in 64 bits there (INDEX_64) and pools the
    same values as from a small copy of the region."""
    x, corner = _giant_map(shape, layout, device)
    local = torch.tensor(CORNER_ROIS, device=device)
    rois = local + torch.tensor([0, shape[3] - 48, shape[2] - 48, shape[3] - 48, shape[2] - 48], device=device)
    got = roi_align(x, rois, (5, 4), 1.0, 2, True, backend="triton")
    want = roi_align(corner.contiguous(), local, (5, 4), 1.0, 2, True, backend="triton")
    assert_close_verbose(got.cpu(), want.cpu(), 1e-6, 0, what=f"{layout} {shape}")
    if device == "cuda":  # the gradient buffer has the map's size: only where memory allows it
        leaf_x = x.requires_grad_()
        roi_align(leaf_x, rois, (5, 4), 1.0, 2, True, backend="triton").sum().backward()
        small = corner.detach().contiguous().requires_grad_()
        roi_align(small, local, (5, 4), 1.0, 2, True, backend="triton").sum().backward()
        assert_close_verbose(leaf_x.grad[:, :, -48:, -48:].cpu(), small.grad.cpu(), 1e-6, 0, what="backward")
        assert leaf_x.grad[:, :, :-48].abs().sum() == 0


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_5000_rois(device):
    """5000 RoIs over four levels (the box head's training count at batch 10), against the
    reference. The GPU takes one program per RoI (a grid of 5000 x channel blocks); the
    interpreter takes 256 RoIs per program here, to stay within a second."""
    from fastmask.kernels import roi_align as ra

    feats = make_pyramid(2, 4, 4, seed=41, device=device)
    boxes = [pyramid_boxes(2500, IMAGE_SIZES[i], 42 + i, device) for i in range(2)]
    scales = infer_scales([f.shape[-2:] for f in feats], IMAGE_SIZES)
    k_min, k_max = level_range(scales)
    got = ra.roi_align_fwd(feats, boxes_to_rois(boxes), (7, 7), scales, 2, False, k_min=k_min, k_max=k_max,
                           block_r=None if device == "cuda" else 256)
    want = multiscale_roi_align(feats, boxes, 7, IMAGE_SIZES, backend="torch")
    assert got.shape[0] == sum(len(b) for b in boxes) >= 5000
    assert_close_verbose(got.cpu(), want.cpu(), *TOL[torch.float32], what="5000 RoIs")


# --------------------------------------------------------------------------- the op and the kernels agree


@needs_triton
def test_gradient_layout_agrees_with_the_kernel():
    """The registered backward returns the kernel's flat gradient buffer and the op's autograd
    formula cuts it into per-level views with its own ``_grad_layout``: the two must agree."""
    from fastmask.kernels.roi_align import _grad_layout as kernel_layout
    from fastmask.ops.roi_align import _grad_layout as op_layout

    shapes = [(2, 16, 13, 17), (2, 16, 7, 9), (2, 16, 1, 1)]
    for channels_last in ([False] * 3, [True] * 3, [True, False, True]):
        strides, offsets, total = kernel_layout(shapes, channels_last)
        layout, op_total = op_layout(shapes, channels_last)
        assert op_total == total
        assert [(tuple(s), st, o) for s, st, o in layout] == list(zip(map(tuple, shapes), strides, offsets))


@needs_triton
def test_channels_last_rule_agrees_with_the_kernel():
    """The op's fake picks the output layout with the kernel's channels-last rule, restated on
    the op's side (which must not import Triton)."""
    from fastmask.kernels.roi_align import is_channels_last
    from fastmask.ops.roi_align import _channels_last

    x = torch.zeros(2, 5, 4, 6)
    cases = [x, x.to(memory_format=torch.channels_last), x[:, :1], x[:, :1].to(memory_format=torch.channels_last),
             torch.zeros(2, 5, 1, 1).to(memory_format=torch.channels_last), x.permute(0, 1, 3, 2)]
    assert [_channels_last(t) for t in cases] == [is_channels_last(t) for t in cases]
    assert _channels_last(cases[1]) and not _channels_last(cases[0])


# --------------------------------------------------------------------------- CUDA, realistic sizes


def _cuda_problem(dtype, layout, k_per_image=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_sizes = [(800, 1216), (800, 1067)]
    feats = [torch.randn(2, 256, 800 // s, 1216 // s, generator=g) for s in (4, 8, 16, 32)]
    feats = [to_layout(f.to(device="cuda", dtype=dtype), layout) for f in feats]
    boxes = []
    for i, (h, w) in enumerate(image_sizes):
        side = torch.exp(torch.empty(k_per_image).uniform_(math.log(8), math.log(800), generator=g))
        aspect = torch.exp(torch.empty(k_per_image).uniform_(-1, 1, generator=g))
        bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
        x1 = torch.rand(k_per_image, generator=g) * (w - bw / 2)
        y1 = torch.rand(k_per_image, generator=g) * (h - bh / 2)
        boxes.append(torch.stack([x1, y1, (x1 + bw).clamp(max=w), (y1 + bh).clamp(max=h)], 1).cuda())
    return feats, boxes, image_sizes


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_realistic_matches_torchvision(layout, dtype):
    feats, boxes, image_sizes = _cuda_problem(dtype, layout)
    names = ["0", "1", "2", "3"]
    leaves = [f.detach().requires_grad_() for f in feats]
    got = multiscale_roi_align(leaves, boxes, 7, image_sizes, 2, backend="triton")
    f32 = [f.detach().float().requires_grad_() for f in feats]
    expected = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)(dict(zip(names, f32)), boxes, image_sizes)
    assert_close_verbose(got.float(), expected.to(dtype).float(), *TOL[dtype], what="forward")
    grad = torch.randn_like(expected)
    got.backward(grad.to(dtype))
    expected.backward(grad)
    for i, (a, b) in enumerate(zip(leaves, f32)):
        assert_close_verbose(a.grad.float(), b.grad.to(dtype).float(), *TOL[dtype], what=f"grad level {i}")


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_deterministic_and_no_host_sync(layout):
    feats, boxes, image_sizes = _cuda_problem(torch.float32, layout, seed=1)
    grad = torch.randn(1000, 256, 7, 7, device="cuda")
    grads = []
    for deterministic in (True, True, False):
        warm = [f.detach().requires_grad_() for f in feats]  # compile outside the checked region
        multiscale_roi_align(warm, boxes, 7, image_sizes, 2, backend="triton",
                             deterministic=deterministic).backward(grad)
        leaves = [f.detach().requires_grad_() for f in feats]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # forward and backward must not wait on the GPU
        try:
            out = multiscale_roi_align(leaves, boxes, 7, image_sizes, 2, backend="triton",
                                       deterministic=deterministic)
            out.backward(grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        grads.append([f.grad for f in leaves])
    for i, (a, b, c) in enumerate(zip(*grads)):
        assert torch.equal(a, b), f"level {i}: deterministic gradients differ between runs"
        assert_close_verbose(c, b, *TOL[torch.float32], what=f"atomic vs deterministic, level {i}")


@requires_cuda
def test_cuda_new_box_count_does_not_recompile():
    from fastmask.kernels.roi_align import _roi_align_fwd_kernel

    feats, boxes, image_sizes = _cuda_problem(torch.float32, "channels_last", k_per_image=300)
    multiscale_roi_align(feats, boxes, 7, image_sizes, 2, backend="triton")
    compiled = sum(len(cache[0]) for cache in _roi_align_fwd_kernel.device_caches.values())
    for k in (1, 17, 299):
        multiscale_roi_align(feats, [b[:k] for b in boxes], 7, image_sizes, 2, backend="triton")
    assert sum(len(cache[0]) for cache in _roi_align_fwd_kernel.device_caches.values()) == compiled
