"""RoI Align reference (backend="torch") against torchvision: forward, gradients, edge cases."""

import math

import pytest
import torch
import torchvision
from helpers import TOL, TRITON_DEVICES, assert_close_verbose, pyramid_boxes, random_boxes

from fastmask.ops import MultiScaleRoIAlign, multiscale_roi_align, roi_align
from fastmask.ops.roi_align import boxes_to_rois, map_levels, roi_align_ref


def make_rois(n_images, k, max_coord, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(k, max_coord, generator=g, dtype=torch.float64)
    boxes -= max_coord * 0.15  # some boxes start outside the image
    idx = torch.randint(0, n_images, (k, 1), generator=g).double()
    return torch.cat([idx, boxes], dim=1).to(dtype)


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


def test_roi_align_zero_boxes():
    x = torch.randn(2, 4, 5, 5)
    out = roi_align(x, torch.zeros(0, 5), 3, backend="torch")
    assert out.shape == (0, 4, 3, 3)
    out = roi_align(x, [torch.zeros(0, 4), torch.zeros(0, 4)], (2, 4), backend="torch")
    assert out.shape == (0, 4, 2, 4)
    # Differentiable even when empty, as torchvision's: the gradient is all zeros.
    x.requires_grad_()
    out = roi_align(x, torch.zeros(0, 5), 3, backend="torch")
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_roi_align_inputs_not_modified():
    x = torch.randn(2, 3, 7, 8)
    rois = make_rois(2, 9, 20.0, 5)
    x0, r0 = x.clone(), rois.clone()
    roi_align(x, rois, 3, 0.5, -1, True, backend="torch")
    assert torch.equal(x, x0) and torch.equal(rois, r0)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_backward_matches_torchvision(aligned, sampling_ratio):
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


# --------------------------------------------------------------------------- multi-level


def make_pyramid(n, c, image_hw, strides=(4, 8, 16, 32), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    return [torch.randn(n, c, math.ceil(h / s), math.ceil(w / s), generator=g, dtype=dtype) for s in strides]


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), (14, 2), ((5, 3), -1)])
def test_multiscale_matches_torchvision(levels, output_size, sampling_ratio):
    image_sizes = [(123, 150), (96, 160)]
    feats = make_pyramid(2, 4, (128, 160))[:levels]
    boxes = [pyramid_boxes(9, image_sizes[0], 1), pyramid_boxes(6, image_sizes[1], 2)]
    names = [f"p{i}" for i in range(levels)]
    tv = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)
    expected = tv(dict(zip(names, feats)), boxes, image_sizes)
    got = multiscale_roi_align(feats, boxes, output_size, image_sizes, sampling_ratio, backend="torch")
    assert_close_verbose(got, expected, *TOL[torch.float32])
    module = MultiScaleRoIAlign(names, output_size, sampling_ratio, backend="torch")
    assert_close_verbose(module(dict(zip(names, feats)), boxes, image_sizes), expected, *TOL[torch.float32])
    assert list(module.state_dict()) == []


def test_multiscale_backward_matches_torchvision():
    image_sizes = [(128, 160), (128, 140)]
    feats = make_pyramid(2, 3, (128, 160), dtype=torch.float64, seed=4)
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
    fn = lambda a, b: multiscale_roi_align([a, b], boxes, 2, [(32, 32)], 2, canonical_scale=16, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(feats))


def test_map_levels_boundaries():
    s = torch.tensor([112.0, 224.0, 448.0, 223.9, 10.0, 5000.0])
    boxes = torch.stack([torch.zeros_like(s), torch.zeros_like(s), s, s], 1)
    assert map_levels(boxes, 2, 5).tolist() == [1, 2, 3, 1, 0, 3]


def test_multiscale_zero_boxes_and_one_empty_image():
    feats = make_pyramid(2, 4, (64, 64))
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
    feats = make_pyramid(2, 4, (64, 64))
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
    feats = make_pyramid(2, 4, (64, 64))
    x = {"0": feats[0], "1": feats[1], "pool": feats[1][:, :, ::2, ::2]}
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 30.0]]), torch.tensor([[5.0, 1.0, 20.0, 60.0]])]
    sizes = [(64, 64)] * 2
    want = tv_ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(x, boxes, sizes)
    got = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, backend="torch")(x, boxes, sizes)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_reference_direct_call_matches_public_op():
    x = torch.randn(1, 2, 6, 6)
    rois = make_rois(1, 5, 20.0, 9)
    assert torch.equal(roi_align_ref(x, rois, 3, 0.5, 2, False), roi_align(x, rois, 3, 0.5, 2, False, backend="torch"))


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
    feats = make_pyramid(1, 2, (64, 64))
    with pytest.raises(ValueError, match=r"image_sizes\[0\] must be a pair of positive ints"):
        multiscale_roi_align(feats, [torch.zeros(1, 4)], 7, [(0, 0)], backend="torch")
    with pytest.raises(TypeError, match="canonical_level"):
        multiscale_roi_align(feats, [torch.zeros(1, 4)], 7, [(64, 64)], canonical_level=4.5, backend="torch")


MULTISCALE_BACKENDS = ["torch"] + (["triton"] if TRITON_DEVICES else [])


@pytest.mark.parametrize("backend", MULTISCALE_BACKENDS)
def test_multiscale_maps_that_are_not_adjacent_levels(backend):
    """Maps of strides 8 and 32 (torchvision's own export test): torchvision pools level index
    i from the i-th map given, so RoIs mapped to level 4 read the stride-32 map and those
    mapped to level 5 (index 2, past the last map) pool zeros; forward and backward alike."""
    g = torch.Generator().manual_seed(5)
    feats = {"s8": torch.randn(2, 3, 64, 64, generator=g), "s32": torch.randn(2, 3, 16, 16, generator=g)}
    boxes = [torch.tensor([[0.0, 0.0, 500.0, 500.0], [10.0, 10.0, 40.0, 40.0], [0.0, 0.0, 200.0, 200.0]]),
             torch.tensor([[5.0, 5.0, 120.0, 120.0], [3.0, 30.0, 460.0, 400.0]])]
    sizes = [(512, 512)] * 2
    leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
    tv_leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
    want = torchvision.ops.MultiScaleRoIAlign(["s8", "s32"], 7, 2)(tv_leaves, boxes, sizes)
    got = MultiScaleRoIAlign(["s8", "s32"], 7, 2, backend=backend)(leaves, boxes, sizes)
    levels = map_levels(torch.cat(boxes), 3, 5)
    assert set(levels.tolist()) == {0, 1, 2}, "the boxes must reach every level index"
    assert (want[levels == 2] == 0).all() and (want[levels != 2] != 0).any()
    assert_close_verbose(got, want, *TOL[torch.float32], what=backend)
    grad = torch.randn(want.shape, generator=g)
    want.backward(grad)
    got.backward(grad)
    for k in feats:
        assert_close_verbose(leaves[k].grad, tv_leaves[k].grad, *TOL[torch.float32], what=f"{backend} grad {k}")


@pytest.mark.parametrize("backend", MULTISCALE_BACKENDS)
def test_multiscale_box_with_one_inverted_axis_pools_zeros(backend):
    """A box of negative area (x2 < x1 only) has a NaN size, which torchvision's level mapper
    sends to no level: it pools zeros, beside a normal box, forward and backward."""
    g = torch.Generator().manual_seed(6)
    feats = {"a": torch.randn(1, 2, 16, 16, generator=g), "b": torch.randn(1, 2, 8, 8, generator=g)}
    boxes = [torch.tensor([[10.0, 5.0, 4.0, 30.0], [1.0, 1.0, 20.0, 20.0]])]
    want = torchvision.ops.MultiScaleRoIAlign(["a", "b"], 2, 2)(feats, boxes, [(64, 64)])
    leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
    got = MultiScaleRoIAlign(["a", "b"], 2, 2, backend=backend)(leaves, boxes, [(64, 64)])
    assert (got[0] == 0).all() and (got[1] != 0).any()
    assert_close_verbose(got.detach(), want, *TOL[torch.float32], what=backend)
    got[0].sum().backward()
    assert all((leaf.grad == 0).all() for leaf in leaves.values())


@pytest.mark.parametrize("backend", MULTISCALE_BACKENDS)
@pytest.mark.parametrize("box_dtype, box", [
    (torch.float64, [1.0, 1.0, 224.99984073664, 224.99984073664]),  # level 1 in fp64, level 2 in fp32
    (torch.float16, [1.0, 1.0, 301.0, 301.0]),  # area inf in fp16
])
def test_multiscale_levels_mapped_in_the_compute_dtype(backend, box_dtype, box):
    """Boxes of another dtype than the features are mapped to levels in the features' compute
    dtype (fp32 here) on both backends, as the fp32 boxes would be."""
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(1, 2, 64 // s, 64 // s, generator=g) for s in (1, 2, 4, 8)]
    got = multiscale_roi_align(feats, [torch.tensor([box], dtype=box_dtype)], 1, [(256, 256)], 2, backend=backend)
    same = multiscale_roi_align(feats, [torch.tensor([box], dtype=box_dtype).float()], 1, [(256, 256)], 2,
                                backend=backend)
    assert torch.equal(got, same)
