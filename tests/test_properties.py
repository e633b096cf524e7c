"""Property-based tests (Hypothesis) of every public op of ``fastmask.ops``: the Triton backend
against the pure-PyTorch reference on random shapes, dtypes, memory layouts and box
distributions (degenerate, inverted, huge, negative, outside the image), plus properties that
need no reference (greedy NMS's definition, the anchor formula, box-local masks as crops).

Budget: without a GPU the kernels run in Triton's interpreter (about 0.1 ms per Triton
operation), so sizes stay small (a few RoIs, <= 16 channels, maps <= 24x24, <= 300 boxes for
NMS, images <= 24x32 for mask paste) and every test runs a fixed, small number of examples:
the file takes under a minute on a 2-core CPU. Counts start at one box or RoI (the per-op
test files cover empty inputs), so that no example of the small budget is spent on nothing.

Environment:
    FASTMASK_HYPOTHESIS_EXAMPLES=<n>  run n examples in every property test instead of its
        default (e.g. 200 for a long search: about 7 minutes per 100 examples on 2 cores).

Profiles (registered in tests/conftest.py): "fastmask", the default and CI's, draws the same
examples on every run (derandomize=True); ``pytest --hypothesis-profile=fastmask-explore``
draws new ones and replays failures first. A failure prints the drawn arguments (the tensors
are generated from a drawn ``seed``), which reproduce it.

Inputs the ops' docstrings leave undefined are not drawn: NaN or infinite features, masks,
deltas or scores. Non-finite boxes are drawn where the ops document a ``ValueError``
(``test_non_finite_boxes_are_refused``), and garbage (NaN, inf) in NMS padding rows, which
``nms_keep_mask`` documents as ignored.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import TOL, TRITON_DEVICES, assert_close_verbose
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fastmask.ops import (AnchorGenerator, MultiScaleRoIAlign, batched_nms, decode_boxes, encode_boxes,
                          multiscale_roi_align, nms, nms_keep_mask, paste_masks, paste_masks_in_boxes, roi_align,
                          rpn_proposals)
from fastmask.ops.boxes import BBOX_XFORM_CLIP, decode_boxes_ref
from fastmask.ops.masks import expand_boxes_int
from fastmask.ops.proposals import rpn_candidates_ref, rpn_candidates_triton, select_proposals
from fastmask.ops.roi_align import _channels_last

pytestmark = pytest.mark.skipif(not TRITON_DEVICES, reason="no device can run the Triton kernels")

# Where the Triton backend runs: the CPU through the interpreter, or the GPU.
DEVICE = TRITON_DEVICES[0] if TRITON_DEVICES else "cpu"

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALVES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- budget


EXAMPLES_ENV = "FASTMASK_HYPOTHESIS_EXAMPLES"


def _examples_override() -> int | None:
    value = os.environ.get(EXAMPLES_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{EXAMPLES_ENV} must be a positive integer, got {value!r}")
    return int(value)


EXAMPLES_OVERRIDE = _examples_override()


def examples(n: int) -> settings:
    """A test's settings: ``n`` examples (``FASTMASK_HYPOTHESIS_EXAMPLES`` overrides), the rest
    from the profile in force (tests/conftest.py). The defaults are sized by each example's cost
    in the interpreter so that the file stays near a minute."""
    return settings(max_examples=EXAMPLES_OVERRIDE or n)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The examples are many small CPU ops; on a shared 2-core machine intra-op threads only add
    contention (as tests/test_nms.py found), so this module runs with one, then restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- shared strategies


def seeds():
    return st.integers(0, 2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def finite(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


LAYOUTS = ("contiguous", "channels_last", "strided", "channels_last_strided", "permuted", "broadcast")


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A Tensor[N, C, H, W] with ``x``'s shape and dtype in another memory layout.

    strided: a view into a larger buffer (gaps between channels, rows and columns, a storage
    offset); channels_last_strided: channels innermost (stride 1) but with gaps; permuted: H and
    W strides swapped; broadcast: batch stride 0, so every image holds ``x[0]``'s values."""
    n, c, h, w = x.shape
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        big = torch.zeros(n, 2 * c + 1, h + 2, 2 * w + 1, dtype=x.dtype, device=x.device)
        view = big[:, 1::2, 1:h + 1, 1::2]
        view.copy_(x)
        return view
    if layout == "channels_last_strided":
        big = torch.zeros(n, h + 1, w, c + 3, dtype=x.dtype, device=x.device)
        view = big[:, 1:, :, 2:c + 2].permute(0, 3, 1, 2)
        view.copy_(x)
        return view
    if layout == "permuted":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "broadcast":
        return x[:1].expand(n, c, h, w)
    return x.contiguous()


def leaf_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf with ``x``'s values and strides (and ``dtype``), requiring grad."""
    y = torch.empty_strided(x.shape, x.stride(), dtype=dtype or x.dtype, device=x.device)
    if x.stride(0) == 0:  # broadcast: an ordinary dense leaf instead (a leaf cannot alias itself)
        y = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return y.copy_(x).requires_grad_()


def roi_tol(dtype: torch.dtype) -> tuple[float, float]:
    """RoI Align tolerance (tests/helpers.py ``TOL``): fp32 atol 1e-4 (docs/architecture.md), the
    reference and the kernel summing the same bilinear samples in another order; fp16/bf16 are
    compared with the reference run in fp32 on the same rounded inputs, then rounded once, so
    one rounding of the result in that dtype; fp64 1e-10."""
    return TOL[dtype]


# --------------------------------------------------------------------------- RoI Align: boxes


# Box kinds, per axis in feature cells: lo is the first edge, ext = x2 - x1.
ROI_KINDS = ("inside", "around", "outside", "point", "line", "inverted", "subcell", "edge", "huge")


def _axis(draw, kind: str, size: int, cap: float, huge: float) -> tuple[float, float]:
    if kind == "inside":
        return draw(finite(0, size)), draw(finite(0, min(size, cap)))
    if kind in ("around", "line"):
        return draw(finite(-2, size + 1)), draw(finite(0, min(size + 3, cap)))
    if kind == "outside":  # wholly before -1 or after the map along this axis
        ext = draw(finite(0, min(size, cap)))
        after = draw(st.booleans())
        return (draw(finite(size + 1, 3 * size + 2)) if after else draw(finite(-3 * size - 2, -1.5)) - ext), ext
    if kind == "point":
        return draw(finite(-2, size + 2)), 0.0
    if kind == "inverted":  # x2 < x1
        return draw(finite(-1, size + 1)), -draw(finite(0.01, min(size, cap)))
    if kind == "subcell":
        return draw(finite(-1, size)), draw(finite(0, 1))
    if kind == "edge":  # samples exactly at -1, 0, the last cell and the map's end
        return (draw(st.sampled_from([-1.5, -1.0, -0.5, 0.0, 0.5, size - 1.0, size - 0.5, float(size), size + 0.5])),
                min(cap, draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))))
    # huge: coordinates far beyond the map, covering it or not
    lo = draw(finite(-huge, huge))
    return lo, draw(finite(0, huge))


@st.composite
def roi_rows(draw, n_images: int, h: int, w: int, scale: float, cap: float, huge: float, max_k: int = 6):
    """Float64 Tensor[K, 5] ``(batch_index, x1, y1, x2, y2)`` in image pixels for a map of h x w
    cells at ``scale`` cells per pixel. ``cap``: the largest box extent in cells (bounds the
    adaptive sample grid); ``huge``: the largest |coordinate| in cells of the "huge" kind."""
    rows = []
    for _ in range(draw(st.integers(1, max_k))):  # at least one RoI: the empty case costs an example for nothing
        kind = draw(st.sampled_from(ROI_KINDS if huge > 0 else ROI_KINDS[:-1]))
        kinds = [kind, kind]
        if kind in ("line", "inverted"):  # a zero or negative extent on one axis, or both
            which = draw(st.sampled_from([(0,), (1,), (0, 1)]))
            kinds = [kind if i in which else "around" for i in (0, 1)]
        (x, wx), (y, wy) = (_axis(draw, k, s, cap, huge) for k, s in zip(kinds, (w, h)))
        if kinds[0] == "line":
            wx = 0.0
        if kinds[1] == "line":
            wy = 0.0
        box = [x / scale, y / scale, (x + wx) / scale, (y + wy) / scale]
        snap = draw(st.sampled_from([None, 1.0, 4.0]))  # whole or quarter pixels: samples on cell edges
        if snap is not None:
            box = [round(v * snap) / snap for v in box]
        rows.append([float(draw(st.integers(0, n_images - 1)))] + box)
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)


def as_box_argument(rows: torch.Tensor, n_images: int, as_list: bool, dtype: torch.dtype):
    """The boxes argument of roi_align: Tensor[K, 5] or a list of per-image Tensor[Ki, 4]."""
    if not as_list:
        return rows.to(dtype)
    return [rows[rows[:, 0] == i, 1:].to(dtype) for i in range(n_images)]


def box_dtypes():
    """Any float dtype for the boxes (fp16 ones get smaller "huge" coordinates: it tops out at
    65504, and an infinite box is refused)."""
    return st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


ROI_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --------------------------------------------------------------------------- RoI Align (one level)


@st.composite
def roi_align_case(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 16))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    ph, pw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 0.3, 1.7]))
    sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    # The adaptive grid is ceil(extent / output size) samples per bin and axis: extents up to 6
    # bins keep it <= 6 x 6 (the interpreter loops over it); fixed grids allow any box.
    adaptive = sampling_ratio <= 0
    cap = 6.0 * min(ph, pw) if adaptive else 3.0 * max(h, w)
    bdt = draw(box_dtypes())
    huge = 0.0 if adaptive else (1e4 if bdt == torch.float16 else 1e6) * scale
    return dict(seed=draw(seeds()), n=n, c=c, h=h, w=w, output_size=(ph, pw), scale=scale,
                sampling_ratio=sampling_ratio, aligned=draw(st.booleans()), layout=draw(st.sampled_from(LAYOUTS)),
                rows=draw(roi_rows(n, h, w, scale, cap, huge)), as_list=draw(st.booleans()), box_dtype=bdt)


def _roi_inputs(case, dtype):
    x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=generator(case["seed"]),
                    dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    x = in_layout(x, case["layout"])
    boxes = as_box_argument(case["rows"], case["n"], case["as_list"], case["box_dtype"])
    boxes = [b.to(DEVICE) for b in boxes] if isinstance(boxes, list) else boxes.to(DEVICE)
    return x, boxes


def _roi_args(case):
    return case["output_size"], case["scale"], case["sampling_ratio"], case["aligned"]


@pytest.mark.parametrize("dtype", ROI_DTYPES)
@examples(16)
@given(case=roi_align_case())
def test_roi_align_forward(dtype, case):
    """Triton == reference within ``roi_tol``; shape, dtype, the documented output layout
    (channels-last when the input is), inputs unchanged."""
    x, boxes = _roi_inputs(case, dtype)
    x_before = x.clone()
    got = roi_align(x, boxes, *_roi_args(case), backend="triton")
    expected = roi_align(x, boxes, *_roi_args(case), backend="torch")
    k = case["rows"].shape[0]
    assert got.shape == (k, case["c"], *case["output_size"]) and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    assert_close_verbose(got.cpu(), expected.cpu(), *roi_tol(dtype), what="roi_align forward")
    assert torch.equal(x, x_before), "input modified"


@pytest.mark.parametrize("dtype", ROI_DTYPES)
@examples(8)
@given(case=roi_align_case(), deterministic=st.booleans())
def test_roi_align_backward(dtype, case, deterministic):
    """The gradient w.r.t. the input (atomic or deterministic backward) == the reference's
    autograd gradient, computed in fp32 (fp64 for fp64) and rounded to the input's dtype."""
    x, boxes = _roi_inputs(case, dtype)
    grad = torch.randn(case["rows"].shape[0], case["c"], *case["output_size"], generator=generator(case["seed"] + 1),
                       dtype=torch.float64)
    grad = grad.to(dtype=dtype, device=DEVICE)  # the reference gets the same rounded values, upcast
    leaf = leaf_like(x)
    roi_align(leaf, boxes, *_roi_args(case), backend="triton", deterministic=deterministic).backward(grad)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    ref_leaf = leaf_like(x, cdt)
    roi_align(ref_leaf, boxes, *_roi_args(case), backend="torch").backward(grad.to(cdt))
    assert leaf.grad.dtype == dtype
    assert_close_verbose(leaf.grad.cpu(), ref_leaf.grad.to(dtype).cpu(), *roi_tol(dtype), what="roi_align grad")


# --------------------------------------------------------------------------- multi-level RoI Align


# Box kinds in image pixels. "inverted": both axes (positive area); "inverted_one": one axis
# (negative area: no level, so zeros, as torchvision's level mapper).
MS_KINDS = ("spread", "boundary", "degenerate", "inverted", "inverted_one", "outside", "huge")


@st.composite
def ms_boxes(draw, image_hw, canonical_scale, cap, huge, min_k=0):
    """Float64 Tensor[Ki, 4] of one image. ``cap``: the largest side in pixels (bounds the
    adaptive grid); ``huge``: the largest |coordinate| of the "huge" kind (0: none)."""
    ih, iw = image_hw
    out = []
    for _ in range(draw(st.integers(min_k, 4))):
        kind = draw(st.sampled_from(MS_KINDS if huge else MS_KINDS[:-1]))
        x, y = draw(finite(-0.25 * iw, iw)), draw(finite(-0.25 * ih, ih))
        if kind == "boundary":
            # sqrt(area) exactly canonical_scale * 2**j (w * h exact in binary), or a few ulps off
            side = canonical_scale * 2.0 ** draw(st.integers(-5, 1))
            a = 2.0 ** draw(st.integers(-1, 1))
            bw, bh = side * a, side / a
            ulps = draw(st.integers(-3, 3))
            bw = float(torch.tensor(bw, dtype=torch.float32).double() * (1 + ulps * 2.0 ** -23))
            bw, bh = min(bw, cap), min(bh, cap)
        elif kind == "degenerate":
            bw, bh = draw(st.sampled_from([(0.0, 0.0), (0.0, 5.0), (3.0, 0.0)]))
        elif kind == "huge":
            x, y = draw(finite(-huge, 0)), draw(finite(-huge, 0))
            bw, bh = draw(finite(0, 2 * huge)), draw(finite(0, 2 * huge))
        else:  # spread, inverted, outside: sides log-uniform from under a pixel to the cap
            bw = math.exp(draw(finite(math.log(0.25), math.log(cap))))
            bh = math.exp(draw(finite(math.log(0.25), math.log(cap))))
            if kind == "inverted":
                bw, bh = -bw, -bh
            elif kind == "inverted_one":
                bw, bh = (-bw, bh) if draw(st.booleans()) else (bw, -bh)
            elif kind == "outside":
                x = draw(st.sampled_from([iw + 2.0, -bw - 2.0]))
        out.append([x, y, x + bw, y + bh])
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


@st.composite
def multiscale_case(draw):
    levels, k0 = draw(st.integers(1, 5)), draw(st.sampled_from([2, 3]))
    h0, w0 = draw(st.integers(1, 24)), draw(st.integers(1, 24))  # the finest map
    # Backbone-like sizes (each pyramid level half the previous, rounded up), the padded image
    # 2**k0 times the finest map; the images no larger. The maps given are consecutive pyramid
    # levels or skip some (strides 4 and 16: level indices past the last map pool zeros). The
    # scales are inferred from the sizes as torchvision does (on tiny maps two levels may get
    # the same scale, as in torchvision).
    steps = [0] + [draw(st.sampled_from([1, 1, 2])) for _ in range(levels - 1)]
    pyramid = [sum(steps[:i + 1]) for i in range(levels)]
    sizes = [(-(-h0 // 2**lvl), -(-w0 // 2**lvl)) for lvl in pyramid]
    ph_img, pw_img = h0 * 2**k0, w0 * 2**k0
    n = draw(st.integers(1, 2))
    image_sizes = [(draw(st.integers(1, ph_img)), draw(st.integers(1, pw_img))) for _ in range(n)]
    tallest = draw(st.integers(0, n - 1))
    image_sizes[tallest] = (ph_img, image_sizes[tallest][1])
    out = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 2, 3]))
    canonical_scale = draw(st.sampled_from([224.0, 56.0, 28.0, 16.5, 8.0]))
    canonical_level = draw(st.integers(k0 - 1, k0 + levels))
    # Adaptive grids: a side of at most 6 bins on the finest level; fixed grids: any box.
    cap = 6.0 * min(out) * 2**k0 if sampling_ratio <= 0 else 4.0 * max(ph_img, pw_img)
    bdt = draw(box_dtypes())
    huge = 0.0 if sampling_ratio <= 0 else (2e4 if bdt == torch.float16 else 1e6)
    # an image may have no box, but not all of them
    boxes = [draw(ms_boxes(s, canonical_scale, cap, huge, min_k=int(i == 0))) for i, s in enumerate(image_sizes)]
    return dict(seed=draw(seeds()), c=draw(st.integers(1, 16)), sizes=sizes, image_sizes=image_sizes,
                output_size=out, sampling_ratio=sampling_ratio, canonical_scale=canonical_scale,
                canonical_level=canonical_level, layouts=[draw(st.sampled_from(LAYOUTS)) for _ in sizes],
                boxes=boxes, box_dtype=bdt, module=draw(st.booleans()))


def _ms_inputs(case, dtype):
    g = generator(case["seed"])
    n = len(case["image_sizes"])
    feats = [in_layout(torch.randn(n, case["c"], h, w, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE),
                       layout) for (h, w), layout in zip(case["sizes"], case["layouts"])]
    boxes = [b.to(dtype=case["box_dtype"], device=DEVICE) for b in case["boxes"]]
    return feats, boxes


def _ms_call(case, feats, boxes, backend, deterministic=None):
    args = (case["output_size"], case["sampling_ratio"])
    kw = dict(canonical_scale=case["canonical_scale"], canonical_level=case["canonical_level"], backend=backend,
              deterministic=deterministic)
    if case["module"]:  # the nn.Module form, fed a dict holding one map it must skip
        names = [f"p{i}" for i in range(len(feats))]
        pooler = MultiScaleRoIAlign(names, *args, **kw)
        maps = dict(zip(names, feats))
        maps["pool_unlisted"] = feats[-1][..., :1, :1]
        return pooler(maps, boxes, case["image_sizes"])
    return multiscale_roi_align(feats, boxes, case["output_size"], case["image_sizes"], case["sampling_ratio"],
                                case["canonical_scale"], case["canonical_level"], backend=backend,
                                deterministic=deterministic)


@pytest.mark.parametrize("dtype", ROI_DTYPES)
@examples(12)
@given(case=multiscale_case())
def test_multiscale_roi_align_forward(dtype, case):
    """``multiscale_roi_align`` / ``MultiScaleRoIAlign``: Triton == reference within ``roi_tol``
    over 1-5 maps (mixed layouts, adjacent pyramid levels or not), boxes of any dtype on and a
    few ulps off the level boundaries (both backends map them in the features' compute dtype);
    a box of negative area pools zeros when there are several maps (no level, as torchvision);
    the output is channels-last exactly when every map is (the registered op's fake says so)."""
    feats, boxes = _ms_inputs(case, dtype)
    got = _ms_call(case, feats, boxes, "triton")
    expected = _ms_call(case, feats, boxes, "torch")
    assert got.shape == (sum(len(b) for b in boxes), case["c"], *case["output_size"]) and got.dtype == dtype
    cl = all(_channels_last(f) for f in feats)
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert_close_verbose(got.cpu(), expected.cpu(), *roi_tol(dtype), what="multiscale forward")
    if len(feats) > 1:
        rows = torch.cat(boxes).to(torch.float64 if dtype == torch.float64 else torch.float32).cpu()
        negative = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1]) < 0
        assert not got.cpu()[negative].any(), "a box of negative area pooled something"


@pytest.mark.parametrize("dtype", ROI_DTYPES)
@examples(6)
@given(case=multiscale_case(), deterministic=st.booleans())
def test_multiscale_roi_align_backward(dtype, case, deterministic):
    """Gradients w.r.t. every level == the reference's (fp32, fp64 for fp64), rounded to dtype."""
    feats, boxes = _ms_inputs(case, dtype)
    k = sum(len(b) for b in boxes)
    grad = torch.randn(k, case["c"], *case["output_size"], generator=generator(case["seed"] + 1), dtype=torch.float64)
    grad = grad.to(dtype=dtype, device=DEVICE)  # the reference gets the same rounded values, upcast
    leaves = [leaf_like(f) for f in feats]
    _ms_call(case, leaves, boxes, "triton", deterministic).backward(grad)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    ref_leaves = [leaf_like(f, cdt) for f in feats]
    _ms_call(case, ref_leaves, boxes, "torch").backward(grad.to(cdt))
    for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
        if b.grad is None:  # no RoI at all: neither backend has a gradient to give
            assert a.grad is None or not a.grad.any(), f"level {i}"
            continue
        assert_close_verbose(a.grad.cpu(), b.grad.to(dtype).cpu(), *roi_tol(dtype), what=f"multiscale grad level {i}")


# --------------------------------------------------------------------------- NMS


def iou_exceeds(boxes: torch.Tensor, thr: float) -> torch.Tensor:
    """Bool [N, N]: IoU(i, j) > thr, rounded as the nms module documents (torchvision's CPU
    kernel): in fp32 (fp64 for fp64 boxes), the comparison in fp64; 0/0 = NaN never exceeds."""
    b = boxes.to(torch.float64 if boxes.dtype == torch.float64 else torch.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h
    return (inter / (area[:, None] + area[None, :] - inter)).double() > thr


def assert_greedy_nms(keep: torch.Tensor, boxes, scores, thr: float, classes=None, what=""):
    """``keep`` is greedy NMS by its definition (the nms module docstring), no reference needed:
    the visiting order is by decreasing score, ties in input order; ``keep`` lists the kept boxes
    in that order; no kept box exceeds ``thr`` with an earlier kept box of its class; every other
    box exceeds it with an earlier kept box of its class. These determine the result uniquely."""
    n = scores.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep] = True
    assert torch.equal(keep, order[kept[order]]), f"{what}: not the kept boxes in visiting order"
    over = iou_exceeds(boxes, thr)
    if classes is not None:
        over &= classes[:, None] == classes[None, :]
    earlier = rank[:, None] < rank[None, :]  # [i, j]: i is visited before j
    suppressed_by_kept = (over & earlier & kept[:, None]).any(dim=0)
    assert not (suppressed_by_kept & kept).any(), f"{what}: a kept box overlaps an earlier kept box"
    assert (suppressed_by_kept | kept).all(), f"{what}: a removed box overlaps no earlier kept box"


@st.composite
def nms_case(draw, max_n: int = 300, classes: bool = False):
    """A recipe for boxes and scores (drawn as parameters, generated from ``seed``: 300 boxes are
    too many values for Hypothesis to draw one by one)."""
    n = draw(st.integers(1, max_n))
    dtype = draw(st.sampled_from(FLOATS))
    case = dict(seed=draw(seeds()), n=n, dtype=dtype,
                score_dtype=draw(st.sampled_from([dtype, torch.float32, torch.float64, torch.float16])),
                kind=draw(st.sampled_from(["spread", "clustered", "grid", "nested"])),
                # coordinates' magnitude (fp16 holds up to 65504) and offset
                magnitude=draw(st.sampled_from([1.0, 100.0, 1e4] + ([] if dtype == torch.float16 else [1e6]))),
                offset=draw(st.sampled_from([0.0, -0.5, -1.0])),
                degenerate=draw(st.sampled_from([0.0, 0.1, 0.5])),  # fraction of zero width or height
                inverted=draw(st.sampled_from([0.0, 0.1, 0.5])),  # fraction with x2 < x1 and/or y2 < y1
                scores=draw(st.sampled_from(["distinct", "ties", "few", "signed_zeros"])),
                thr=draw(st.one_of(st.sampled_from([0.5, 0.7, 0.3, 1 / 3, 0.0, 1.0, -0.1, 1.5]), finite(0, 1))),
                layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])))
    if classes:
        case["idx_dtype"] = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]))
        case["num_classes"] = draw(st.integers(1, 80))
    return case


def nms_inputs(case):
    """(boxes, scores, classes or None) on the CPU, in the case's dtypes."""
    g = generator(case["seed"])
    n, mag = case["n"], case["magnitude"]
    f64 = dict(dtype=torch.float64)
    if case["kind"] == "grid":  # small integers: IoUs exact simple fractions, many exactly at 1/2, 1/3
        xy = torch.randint(0, 6, (n, 2), generator=g).double()
        boxes = torch.cat([xy, xy + torch.randint(0, 4, (n, 2), generator=g)], 1)
    elif case["kind"] == "clustered":  # jittered copies of a few boxes: long suppression chains
        centres = torch.rand(max(1, n // 20), 4, generator=g, **f64)
        centres[:, 2:] = centres[:, :2] + 0.05 + torch.rand(centres.shape[0], 2, generator=g, **f64) * 0.5
        boxes = centres[torch.randint(0, centres.shape[0], (n,), generator=g)]
        boxes = boxes + (torch.rand(n, 4, generator=g, **f64) - 0.5) * 0.04
    elif case["kind"] == "nested":  # boxes inside each other (IoU = area ratio)
        c = torch.rand(n, 2, generator=g, **f64)
        half = torch.rand(n, 1, generator=g, **f64) * 0.3
        boxes = torch.cat([c - half, c + half], 1)
    else:
        xy = torch.rand(n, 2, generator=g, **f64)
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g, **f64) * 0.5], 1)
    if case["kind"] != "grid":
        boxes = boxes * mag
    boxes = boxes + case["offset"] * mag
    flat = torch.rand(n, generator=g) < case["degenerate"]
    axis = torch.randint(0, 2, (n,), generator=g)
    boxes[flat & (axis == 0), 2] = boxes[flat & (axis == 0), 0]
    boxes[flat & (axis == 1), 3] = boxes[flat & (axis == 1), 1]
    inv = torch.rand(n, 2, generator=g) < case["inverted"]
    boxes[inv[:, 0]] = boxes[inv[:, 0]][:, [2, 1, 0, 3]]
    boxes[inv[:, 1]] = boxes[inv[:, 1]][:, [0, 3, 2, 1]]
    kind = case["scores"]
    if kind == "distinct":
        scores = (torch.randperm(n, generator=g).double() + 1) / (n + 1)
    elif kind == "ties":
        scores = torch.randint(0, 8, (n,), generator=g).double() / 8
    elif kind == "few":  # two values: almost everything tied
        scores = torch.randint(0, 2, (n,), generator=g).double()
    else:  # -0.0 ties with +0.0, negatives last
        scores = torch.tensor([0.0, -0.0, -1.0, 0.5, 2.0], **f64)[torch.randint(0, 5, (n,), generator=g)]
    classes = None
    if "idx_dtype" in case:
        info = torch.iinfo(case["idx_dtype"])
        # class ids spread over the dtype's range (int64: equal low bits, different high bits)
        ids = torch.randint(0, case["num_classes"], (n,), generator=g)
        if case["idx_dtype"] == torch.int64:
            classes = ids * (2**40 + 2**30) - 2**35
        else:
            lut = torch.randint(info.min, info.max + 1, (case["num_classes"],), generator=g)
            classes = lut[ids]
        classes = classes.to(case["idx_dtype"])
    return boxes.to(case["dtype"]), scores.to(case["score_dtype"]), classes


def in_nms_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (Tensor[N] or [N, 4]) as a non-contiguous view, or contiguous."""
    if layout == "strided":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device) if t.dim() > 1 else \
            torch.zeros(t.shape[0] * 3, dtype=t.dtype, device=t.device)
        view = big[..., ::2] if t.dim() > 1 else big[1::3]
        view.copy_(t)
        return view
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    return t


@examples(18)
@given(case=nms_case())
def test_nms(case):
    """``nms``: Triton == reference exactly (same indices in the same order: both sort stably and
    round IoU as torchvision's CPU kernel, so ties of scores and IoUs exactly at the threshold,
    which the strategies produce on purpose, are decided the same documented way), and the
    result is greedy NMS by definition."""
    boxes, scores, _ = nms_inputs(case)
    b, s = in_nms_layout(boxes.to(DEVICE), case["layout"]), in_nms_layout(scores.to(DEVICE), case["layout"])
    got = nms(b, s, case["thr"], backend="triton")
    expected = nms(boxes, scores, case["thr"], backend="torch")
    assert got.dtype == torch.int64 and got.device.type == torch.device(DEVICE).type
    assert torch.equal(got.cpu(), expected), f"triton {got.tolist()[:20]} vs reference {expected.tolist()[:20]}"
    assert_greedy_nms(got.cpu(), boxes, scores, case["thr"], what="nms")


@examples(15)
@given(case=nms_case(classes=True))
def test_batched_nms(case):
    """``batched_nms``: Triton == reference exactly, and per-class greedy NMS by definition, for
    every index dtype, class ids far apart in the high bits (int64) and negative ids."""
    boxes, scores, classes = nms_inputs(case)
    b, s = in_nms_layout(boxes.to(DEVICE), case["layout"]), in_nms_layout(scores.to(DEVICE), case["layout"])
    got = batched_nms(b, s, classes.to(DEVICE), case["thr"], backend="triton")
    expected = batched_nms(boxes, scores, classes, case["thr"], backend="torch")
    assert torch.equal(got.cpu(), expected), f"triton {got.tolist()[:20]} vs reference {expected.tolist()[:20]}"
    assert_greedy_nms(got.cpu(), boxes, scores, case["thr"], classes.long(), what="batched_nms")


@st.composite
def keep_mask_case(draw):
    case = draw(nms_case(max_n=100, classes=draw(st.booleans())))
    case.update(batch=draw(st.integers(1, 3)), padding=draw(st.sampled_from([None, 0.0, 0.3, 1.0])),
                garbage=draw(st.sampled_from(["nan", "inf", "huge", "zero"])))
    return case


@examples(14)
@given(case=keep_mask_case())
def test_nms_keep_mask(case):
    """``nms_keep_mask`` on a padded batch [B, N, 4]: Triton == reference exactly; padding rows
    (``valid=False``) hold garbage, NaN and inf included, which is documented as neither kept nor
    suppressing; and ``keep[i][k]`` is exactly ``k in batched_nms(image i)`` (its docstring)."""
    per_image = [nms_inputs({**case, "seed": case["seed"] + i}) for i in range(case["batch"])]
    boxes = torch.stack([p[0] for p in per_image])
    scores = torch.stack([p[1] for p in per_image])
    classes = None if per_image[0][2] is None else torch.stack([p[2] for p in per_image])
    valid = None
    if case["padding"] is not None:
        valid = torch.rand(boxes.shape[:2], generator=generator(case["seed"] + 7)) >= case["padding"]
        fill = {"nan": math.nan, "inf": math.inf, "huge": 3e38, "zero": 0.0}[case["garbage"]]
        boxes[~valid] = torch.tensor(fill).to(boxes.dtype)  # fp16/bf16: huge becomes inf
    dev = [None if t is None else t.to(DEVICE) for t in (boxes, scores, classes, valid)]
    got = nms_keep_mask(dev[0], dev[1], case["thr"], dev[2], dev[3], backend="triton")
    expected = nms_keep_mask(boxes, scores, case["thr"], classes, valid, backend="torch")
    assert got.dtype == torch.bool and got.shape == boxes.shape[:2]
    assert torch.equal(got.cpu(), expected)
    for i in range(case["batch"]):
        v = torch.ones(boxes.shape[1], dtype=torch.bool) if valid is None else valid[i]
        idx = v.nonzero().squeeze(1)
        cls = torch.zeros(len(idx), dtype=torch.int64) if classes is None else classes[i][idx]
        kept = idx[batched_nms(boxes[i][idx], scores[i][idx], cls, case["thr"], backend="torch")]
        member = torch.zeros(boxes.shape[1], dtype=torch.bool)
        member[kept] = True
        assert torch.equal(got[i].cpu(), member), f"image {i}: keep mask is not batched_nms's set"


# --------------------------------------------------------------------------- box coder


def decode_tol(dtype: torch.dtype, scale: float) -> tuple[float, float]:
    """tests/test_boxes.py's ``decode_tol``: fp32 atol 1e-5 (docs/architecture.md) or two ulps of
    the coordinate scale, whichever is larger (a corner ``cx - w / 2`` is the difference of two
    values of that scale, and NumPy's exp (interpreter) and torch's may differ by an ulp)."""
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else TOL[dtype]
    return max(atol, 2 * torch.finfo(dtype).eps * scale), rtol


@st.composite
def decode_case(draw):
    dtype = draw(st.sampled_from(FLOATS))
    half = dtype in HALVES
    return dict(
        seed=draw(seeds()), n=draw(st.integers(1, 40)), k=draw(st.integers(1, 5)), dtype=dtype,
        # fp16: results must stay below 65504 (a larger fp64 result rounds to inf in the kernel, where
        # the fp64 decode is finite): smaller boxes, deltas and weights >= 1 for the halves
        magnitude=draw(st.sampled_from([1.0, 100.0, 1000.0] + ([] if half else [1e5]))),
        offset=draw(st.sampled_from([0.0, -0.5, -2.0])),
        box_kind=draw(st.sampled_from(["normal", "degenerate", "inverted"])),
        delta_scale=draw(st.sampled_from([0.0, 0.5, 3.0] + ([] if half else [30.0]))),
        beyond_clamp=draw(st.booleans()),  # some dw, dh far above bbox_xform_clip (clamped before exp)
        weights=draw(st.one_of(st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]),
                               st.tuples(*[finite(1.0 if half else 0.1, 20.0)] * 4))),
        clip=draw(st.sampled_from([BBOX_XFORM_CLIP] if half else [BBOX_XFORM_CLIP, 0.0, -1.0, 10.0])),
        clip_to=draw(st.sampled_from([None, "pair", "rows", "int_rows"])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])))


def _decode_inputs(case):
    g = generator(case["seed"])
    n, k, mag = case["n"], case["k"], case["magnitude"]
    f64 = dict(dtype=torch.float64)
    xy = (torch.rand(n, 2, generator=g, **f64) + case["offset"]) * mag
    wh = torch.rand(n, 2, generator=g, **f64) * mag / 2
    if case["box_kind"] == "degenerate":
        wh[torch.rand(n, 2, generator=g) < 0.5] = 0.0
    elif case["box_kind"] == "inverted":
        wh = -wh
    boxes = torch.cat([xy, xy + wh], 1)
    codes = torch.randn(n, 4 * k, generator=g, **f64) * case["delta_scale"]
    if case["beyond_clamp"] and n and k:
        codes[::3, 2::4] = 12.0 * case["weights"][2]
        codes[1::3, 3::4] = -30.0
    clip_to = None
    if case["clip_to"] == "pair":
        clip_to = (int(mag) + 1, int(mag * 0.7) + 1)
    elif case["clip_to"] in ("rows", "int_rows"):
        clip_to = (torch.rand(n, 2, generator=g, **f64) * mag).ceil()
        clip_to = clip_to.long() if case["clip_to"] == "int_rows" else clip_to.float()
    return codes.to(case["dtype"]), boxes.to(case["dtype"]), clip_to


def _decode_layout(t, layout):
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "strided":
        big = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype, device=t.device)
        view = big[:, 1::2]
        view.copy_(t)
        return view
    return t


@examples(40)
@given(case=decode_case())
def test_decode_boxes(case):
    """``decode_boxes``: fp32/fp64 Triton == reference within ``decode_tol``; fp16/bf16, which the
    kernel documents as computed in fp32 and rounded once (the reference computes in the half
    dtype, as torchvision), within half an ulp of the fp64 decode of the same inputs plus fp32
    rounding of the coordinate scale (tests/test_boxes.py's half-precision bound)."""
    codes, boxes, clip_to = _decode_inputs(case)
    dev = lambda t: _decode_layout(t.to(DEVICE), case["layout"])  # noqa: E731
    clip_dev = clip_to.to(DEVICE) if isinstance(clip_to, torch.Tensor) else clip_to
    got = decode_boxes(dev(codes), dev(boxes), case["weights"], case["clip"], clip_to=clip_dev, backend="triton")
    assert got.dtype == case["dtype"] and got.shape == codes.shape
    exact = decode_boxes_ref(codes.double(), boxes.double(), case["weights"], case["clip"],
                             clip_to.double() if isinstance(clip_to, torch.Tensor) else clip_to)
    unclipped = decode_boxes_ref(codes.double(), boxes.double(), case["weights"], case["clip"])
    scale = max([1.0] + [float(t.abs().max()) for t in (boxes.double(), unclipped) if t.numel()])
    note(f"coordinate scale {scale:.4g}")
    if case["dtype"] in HALVES:
        assert_close_verbose(got.cpu().double(), exact, atol=1e-6 * scale, rtol=torch.finfo(case["dtype"]).eps / 2,
                             what="half-precision decode vs fp64")
    else:
        expected = decode_boxes(codes, boxes, case["weights"], case["clip"], clip_to=clip_to, backend="torch")
        assert_close_verbose(got.cpu(), expected, *decode_tol(case["dtype"], scale), what="decode")


@st.composite
def encode_case(draw):
    return dict(seed=draw(seeds()), n=draw(st.integers(1, 30)), dtype=draw(st.sampled_from([torch.float32,
                                                                                             torch.float64])),
                magnitude=draw(st.sampled_from([1.0, 100.0, 1e4])), offset=draw(st.sampled_from([0.0, -1.0])),
                weights=draw(st.one_of(st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]),
                                       st.tuples(*[finite(0.1, 20.0)] * 4))))


@examples(30)
@given(case=encode_case())
def test_encode_decode_round_trip(case):
    """``encode_boxes`` has no kernel (every backend runs the torch code, as documented): the
    backends give identical bits; and the Triton ``decode_boxes`` inverts it: decoding the
    targets against their proposals gives back the target boxes (positive sizes, size ratios
    inside the exp() clamp), within 16 ulps of the coordinate scale: encode and decode round
    about ten times each at that scale, and log / exp add a few ulps of the size."""
    g = generator(case["seed"])
    n, mag = case["n"], case["magnitude"]
    f64 = dict(dtype=torch.float64)
    p_xy = (torch.rand(n, 2, generator=g, **f64) + case["offset"]) * mag
    p_wh = (torch.rand(n, 2, generator=g, **f64) + 0.01) * mag
    t_ctr = p_xy + p_wh * (torch.rand(n, 2, generator=g, **f64) * 4 - 1.5)
    t_wh = p_wh * torch.exp(torch.rand(n, 2, generator=g, **f64) * 8 - 4)  # ratios e^-4 .. e^4 < 1000/16
    proposals = torch.cat([p_xy, p_xy + p_wh], 1).to(case["dtype"])
    targets = torch.cat([t_ctr - t_wh / 2, t_ctr + t_wh / 2], 1).to(case["dtype"])
    codes = encode_boxes(targets, proposals, case["weights"], backend="torch")
    assert torch.equal(encode_boxes(targets, proposals, case["weights"], backend="triton"), codes)
    back = decode_boxes(codes.to(DEVICE), proposals.to(DEVICE), case["weights"], backend="triton")
    scale = max([1.0] + [float(t.abs().max()) for t in (proposals, targets) if t.numel()])
    assert_close_verbose(back.cpu(), targets, 16 * torch.finfo(case["dtype"]).eps * scale, 0.0, what="round trip")


# --------------------------------------------------------------------------- anchors


@st.composite
def anchor_case(draw):
    levels = draw(st.integers(1, 5))
    sizes = tuple(tuple(draw(st.lists(st.one_of(st.integers(1, 600), finite(0.5, 600)), min_size=1, max_size=3)))
                  for _ in range(levels))
    ratios = tuple(tuple(draw(st.lists(finite(0.1, 10.0), min_size=1, max_size=3))) for _ in range(levels))
    padded = (draw(st.integers(1, 200)), draw(st.integers(1, 200)))
    grids = [(draw(st.integers(1, min(padded[0], 40))), draw(st.integers(1, min(padded[1], 40))))
             for _ in range(levels)]
    return dict(sizes=sizes, ratios=ratios, padded=padded, grids=grids, batch=draw(st.integers(1, 2)),
                dtype=draw(st.sampled_from(FLOATS)), backend=draw(st.sampled_from([None, "torch", "triton"])))


@examples(40)
@given(case=anchor_case())
def test_anchor_generator(case):
    """``AnchorGenerator`` has no kernel (anchors are torch ops on every backend; the Triton
    proposal kernel computes them from ``geometry`` instead: see test_rpn_proposals). Properties:
    torchvision's anchors bit for bit, in every dtype; the geometry lists the same anchors; and
    the module docstring's formula for anchor j of level l holds."""
    images = ImageList(torch.zeros(case["batch"], 1, *case["padded"]), [case["padded"]] * case["batch"])
    feats = [torch.zeros(case["batch"], 1, h, w, dtype=case["dtype"]) for h, w in case["grids"]]
    gen = AnchorGenerator(case["sizes"], case["ratios"], backend=case["backend"])
    ours = gen(images, feats)
    theirs = TVAnchorGenerator(case["sizes"], case["ratios"])(images, feats)
    assert len(ours) == case["batch"]
    assert all(torch.equal(a, b) and a.dtype == case["dtype"] for a, b in zip(ours, theirs))
    geometry = gen.geometry(images, feats)
    assert torch.equal(geometry.anchors(), ours[0])
    start = 0
    for (gh, gw), (sy, sx), cell in zip(geometry.grid_sizes, geometry.strides, geometry.cell_anchors):
        assert (sy, sx) == (case["padded"][0] // gh, case["padded"][1] // gw)
        a = cell.shape[0]
        j = torch.arange(gh * gw * a)
        p, c = j // a, j % a
        row, col = p // gw, p % gw
        shift = torch.stack([col * sx, row * sy, col * sx, row * sy], 1)
        assert torch.equal(ours[0][start:start + len(j)], cell[c] + shift), "anchor formula"
        assert torch.equal(cell, cell.round()), "cell anchors are integers"
        start += len(j)
    assert start == ours[0].shape[0] == sum(geometry.num_anchors_per_level)


# --------------------------------------------------------------------------- mask paste


# "partly_outside" keeps the default draw: corners from -0.3 of the image to its far side.
PASTE_KINDS = ("inside", "partly_outside", "wholly_outside", "subpixel", "edges", "degenerate", "inverted", "huge")


@st.composite
def paste_boxes(draw, n: int, h: int, w: int, huge: float):
    """Float64 Tensor[n, 4] of mixed kinds for an h x w image (``huge``: 0 for none)."""
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(PASTE_KINDS if huge else PASTE_KINDS[:-1]))
        x, y = draw(finite(-0.3 * w, w)), draw(finite(-0.3 * h, h))
        bw, bh = draw(finite(0, w)), draw(finite(0, h))
        if kind == "inside":
            x, y = abs(x), abs(y)
        elif kind == "wholly_outside":
            x = draw(st.sampled_from([w + 3.0, -bw - 3.0]))
        elif kind == "subpixel":
            bw, bh = draw(finite(0, 1)), draw(finite(0, 1))
        elif kind == "edges":  # whole and half pixels: the expanded edges land on and near integers
            x, y = round(x * 2) / 2, round(y * 2) / 2
            bw, bh = round(bw * 2) / 2, round(bh * 2) / 2
        elif kind == "degenerate":
            bw, bh = draw(st.sampled_from([(0.0, 0.0), (0.0, bh), (bw, 0.0)]))
        elif kind == "inverted":  # x2 < x1 and/or y2 < y1 (nothing pasted where the truncated box is inverted)
            flip = draw(st.sampled_from([(1, 0), (0, 1), (1, 1)]))
            bw, bh = -bw - 0.5 if flip[0] else bw, -bh - 0.5 if flip[1] else bh
        elif kind == "huge":
            x, y = draw(finite(-huge, 0)), draw(finite(-huge, 0))
            bw, bh = draw(finite(0, 2 * huge)), draw(finite(0, 2 * huge))
        out.append([x, y, x + bw, y + bh])
    return torch.tensor(out, dtype=torch.float64).reshape(n, 4)


@st.composite
def paste_case(draw, local: bool = False):
    n = draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 32))
    box_dtype = draw(st.sampled_from(FLOATS))
    # Box-local slabs without image_size are as large as the expanded boxes: no huge ones there.
    # fp16 boxes are expanded in fp16, by up to (1 + 2 * 3) / 1 = 7: kept below 65504.
    clipped = draw(st.booleans()) if local else True
    huge = 0.0 if not clipped else (2e3 if box_dtype == torch.float16 else 1e6)
    return dict(seed=draw(seeds()), n=n, h=h, w=w, mh=draw(st.integers(1, 14)), mw=draw(st.integers(1, 14)),
                three_d=draw(st.booleans()), dtype=draw(st.sampled_from((torch.float32,) + HALVES)),
                box_dtype=box_dtype, padding=draw(st.integers(0, 3)),
                values=draw(st.sampled_from(["probabilities", "logits", "quantized"])),
                threshold=draw(st.one_of(st.sampled_from([0.5, 0.0, -0.25, 1.0]), finite(-1.0, 1.5))),
                layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
                boxes=draw(paste_boxes(n, h, w, huge)), clipped=clipped)


def _paste_inputs(case):
    g = generator(case["seed"])
    shape = (case["n"], case["mh"], case["mw"])
    if case["values"] == "logits":
        m = torch.randn(shape, generator=g) * 4
    elif case["values"] == "quantized":  # 0, 1/2, 1: many pixels exactly at a 0.5 threshold
        m = torch.randint(0, 3, shape, generator=g) / 2
    else:
        m = torch.rand(shape, generator=g)
    m = m.to(case["dtype"])
    if case["layout"] == "transposed":
        m = m.transpose(1, 2).contiguous().transpose(1, 2)
    elif case["layout"] == "strided":
        big = torch.zeros(case["n"], 2 * case["mh"], case["mw"] + 1, dtype=m.dtype)
        big[:, ::2, 1:] = m
        m = big[:, ::2, 1:]
    if not case["three_d"]:
        m = m[:, None]
    return m, case["boxes"].to(case["box_dtype"])


def paste_tol(masks: torch.Tensor) -> tuple[float, float]:
    """tests/test_masks.py: fp32 atol 1e-5 on probabilities (the kernel's four-tap sums and the
    reference's matrix products round differently), scaled by the largest |mask| (logits: the
    1e-4 at 4x scale used there); fp16/bf16 ``TOL`` (each rounds an fp32 value once)."""
    if masks.dtype in HALVES:
        return TOL[masks.dtype]
    return 1e-5 * max(1.0, float(masks.abs().max()) if masks.numel() else 1.0), 0.0


def assert_bool_paste(got: torch.Tensor, expected: torch.Tensor, values: torch.Tensor, threshold: float, atol: float,
                      what: str):
    """Bool pastes equal, except pixels whose (reference, fp32) value lies within the float
    tolerance of the threshold: there the two roundings may fall on either side."""
    assert got.dtype == expected.dtype == torch.bool and got.shape == expected.shape, what
    differ = got != expected
    if differ.any():
        gap = (values[differ].double() - threshold).abs().max().item()
        assert gap <= atol, f"{what}: {int(differ.sum())} pixels differ, one {gap:.3g} from the threshold"


@examples(15)
@given(case=paste_case())
def test_paste_masks(case):
    """``paste_masks``, float and bool (``threshold``): Triton == reference (float within
    ``paste_tol``; bool equal up to pixels within that tolerance of the threshold), for every
    box kind: outside, sub-pixel, inverted (nothing pasted), huge; box dtypes; layouts."""
    masks, boxes = _paste_inputs(case)
    size = (case["h"], case["w"])
    m_dev, b_dev = masks.to(DEVICE), boxes.to(DEVICE)
    got = paste_masks(m_dev, b_dev, size, case["padding"], backend="triton")
    expected = paste_masks(masks, boxes, size, case["padding"], backend="torch")
    assert got.shape == (case["n"], 1, *size) and got.dtype == case["dtype"]
    atol, rtol = paste_tol(masks)
    assert_close_verbose(got.cpu(), expected, atol, rtol, what="float paste")
    got_b = paste_masks(m_dev, b_dev, size, case["padding"], case["threshold"], backend="triton")
    expected_b = paste_masks(masks, boxes, size, case["padding"], case["threshold"], backend="torch")
    # the reference's pixel as both backends threshold it: fp32, not rounded to the masks' dtype
    values = paste_masks(masks.float(), boxes, size, case["padding"], backend="torch")
    assert_bool_paste(got_b.cpu(), expected_b, values, case["threshold"], paste_tol(masks.float())[0], "bool paste")
    # Nothing outside the box: the expanded box truncated to integers (module docstring, step 1)
    # bounds the pasted pixels; an inverted one (bx2 < bx1) pastes nothing. (Not "x2 < x1":
    # truncation towards zero maps e.g. x1 = 0, x2 = -0.5 to the one pixel column 0.)
    ib = expand_boxes_int(boxes, case["mw"], case["padding"])
    ys, xs = torch.arange(case["h"])[:, None], torch.arange(case["w"])[None, :]
    inside = ((ys >= ib[:, 1, None, None]) & (ys <= ib[:, 3, None, None])
              & (xs >= ib[:, 0, None, None]) & (xs <= ib[:, 2, None, None]))
    assert not got.cpu()[:, 0][~inside].any(), "a pixel outside the truncated expanded box is non-zero"


@examples(14)
@given(case=paste_case(local=True), threshold=st.booleans())
def test_paste_masks_in_boxes(case, threshold):
    """``paste_masks_in_boxes``: the same windows as the reference (exactly) and the same slabs
    (as ``test_paste_masks``); with ``image_size`` each Triton slab is, bit for bit, the crop of
    the Triton full-image paste at its window (the docstring), and 0 (or ``0 > threshold``)
    beyond its window."""
    masks, boxes = _paste_inputs(case)
    size = (case["h"], case["w"]) if case["clipped"] else None
    thr = case["threshold"] if threshold else None
    got = paste_masks_in_boxes(masks.to(DEVICE), boxes.to(DEVICE), case["padding"], thr, size, backend="triton")
    expected = paste_masks_in_boxes(masks, boxes, case["padding"], thr, size, backend="torch")
    assert torch.equal(got.windows.cpu(), expected.windows)
    assert got.masks.shape == expected.masks.shape
    slabs = got.masks.cpu()
    if thr is None:
        assert_close_verbose(slabs, expected.masks, *paste_tol(masks), what="box-local float")
    else:
        values = paste_masks_in_boxes(masks.float(), boxes, case["padding"], None, size, backend="torch").masks
        assert_bool_paste(slabs, expected.masks, values, thr, paste_tol(masks.float())[0], "box-local bool")
    outside = (0 > thr) if thr is not None else 0
    full = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), size, case["padding"], thr, backend="triton").cpu() \
        if size is not None else None
    for i, (x0, y0, x1, y1) in enumerate(got.windows.cpu().tolist()):
        slab = slabs[i]
        beyond = torch.ones_like(slab, dtype=torch.bool)
        beyond[:y1 - y0, :x1 - x0] = False
        assert (slab[beyond] == outside).all(), f"mask {i}: slab beyond its window"
        if full is not None:
            assert torch.equal(slab[:y1 - y0, :x1 - x0], full[i, 0, y0:y1, x0:x1]), f"mask {i}: slab is not the crop"


# --------------------------------------------------------------------------- RPN proposals


@st.composite
def rpn_case(draw):
    levels = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(FLOATS))
    return dict(
        seed=draw(seeds()), batch=draw(st.integers(1, 2)), dtype=dtype,
        padded=(draw(st.integers(8, 64)), draw(st.integers(8, 64))), stride=draw(st.sampled_from([4, 8, 16])),
        sizes=tuple(tuple(draw(st.lists(st.integers(4, 128), min_size=1, max_size=2))) for _ in range(levels)),
        ratios=tuple(tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 0.3]), min_size=1, max_size=3,
                                         unique=True))) for _ in range(levels)),
        image_frac=[(draw(finite(0.1, 1)), draw(finite(0.1, 1))) for _ in range(2)],
        pre_nms_top_n=draw(st.integers(1, 40)), post_nms_top_n=draw(st.integers(0, 60)),
        nms_thresh=draw(st.one_of(st.sampled_from([0.7, 0.5, 0.0, 1.0]), finite(0, 1))),
        score_thresh=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
        min_size=draw(st.sampled_from([1e-3, 0.0, 2.0, 6.5])),
        delta_scale=draw(st.sampled_from([0.0, 0.2, 1.0, 3.0])),
        wild=draw(st.booleans()),  # some deltas beyond the exp() clamp, some moving boxes out of the image
        logits=draw(st.sampled_from(["normal", "ties", "saturated"])),
        anchors_as=draw(st.sampled_from(["geometry", "list"])),
        layout=draw(st.sampled_from(["batched", "flat", "strided"])))


def _rpn_inputs(case):
    b, (ph, pw) = case["batch"], case["padded"]
    image_sizes = [(max(1, int(ph * fh)), max(1, int(pw * fw))) for fh, fw in case["image_frac"][:b]]
    images = ImageList(torch.zeros(b, 1, ph, pw), image_sizes)
    feats = [torch.zeros(b, 1, max(1, -(-ph // (case["stride"] * 2**lvl))), max(1, -(-pw // (case["stride"] * 2**lvl))),
                         dtype=case["dtype"], device=DEVICE) for lvl in range(len(case["sizes"]))]
    gen = AnchorGenerator(case["sizes"], case["ratios"])
    geometry = gen.geometry(images, feats)
    anchors = gen(images, feats)
    a = sum(geometry.num_anchors_per_level)
    g = generator(case["seed"])
    logits = torch.randn(b, a, generator=g, dtype=torch.float64) * 4
    if case["logits"] == "ties":
        logits = logits.round()
    elif case["logits"] == "saturated":  # sigmoid == 1.0: tied scores after the top-k
        logits[:, ::3] = 40.0
    deltas = torch.randn(b, a, 4, generator=g, dtype=torch.float64) * case["delta_scale"]
    if case["wild"]:
        deltas[:, ::5, 2:] = 9.0
        deltas[:, 1::7, 0] = 60.0
    return geometry, anchors, logits.to(case["dtype"]).to(DEVICE), deltas.to(case["dtype"]).to(DEVICE), image_sizes


def _rpn_layout(case, obj, deltas):
    if case["layout"] == "flat":  # torchvision's layout: [B * A, 1] and [B * A, 4]
        return obj.reshape(-1, 1), deltas.reshape(-1, 4)
    if case["layout"] == "strided":
        return obj.t().contiguous().t(), deltas.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    return obj, deltas


def min_size_in(dtype: torch.dtype, value: float) -> float:
    """``value`` as torch compares it with a ``dtype`` tensor (rounded to that dtype)."""
    return torch.tensor(value, dtype=dtype).item()


@examples(14)
@given(case=rpn_case())
def test_rpn_proposals(case):
    """``rpn_proposals`` in two steps, because its NMS may legitimately decide differently where
    the Triton decode (NumPy's exp in the interpreter, fp32 for half inputs) moves an IoU across
    the threshold:
    - the Triton candidates (top-k, decode with the anchors computed from the geometry or read
      from the list, clip, flags) == the reference candidates: boxes within ``decode_tol`` (fp16/
      bf16: within half an ulp of the fp64 decode, as documented), scores and levels exact,
      flags exact except for sides within the tolerance of ``min_size``;
    - the op's proposals == the reference selection (per-level NMS, top ``post_nms_top_n``)
      applied to those Triton candidates, exactly: the presorted NMS kernel is exact.
    When both backends' candidates are identical, the two ops' outputs are identical."""
    geometry, anchors, obj, deltas, image_sizes = _rpn_inputs(case)
    napl = geometry.num_anchors_per_level
    anchors_arg = geometry if case["anchors_as"] == "geometry" else anchors
    args = (image_sizes, napl, case["pre_nms_top_n"], case["score_thresh"], case["min_size"])
    cand_t = rpn_candidates_triton(obj, deltas, geometry if case["anchors_as"] == "geometry" else torch.stack(anchors),
                                   *args)
    cand_r = rpn_candidates_ref(obj, deltas, geometry.anchors(), *args)
    dtype = case["dtype"]
    # the coordinate scale of the decode: the largest unclipped decoded coordinate (fp64)
    decoded = decode_boxes_ref(deltas.double().reshape(-1, 4), geometry.anchors().double().repeat(case["batch"], 1))
    scale = max(float(decoded.abs().max()), float(max(case["padded"])))
    assert torch.equal(cand_t[1], cand_r[1]) and torch.equal(cand_t[2], cand_r[2]), "scores or levels"
    sides = cand_t[0][..., 2:] - cand_t[0][..., :2]
    if dtype in HALVES:
        exact = rpn_candidates_ref(obj.double(), deltas.double(), geometry.anchors().double(), *args)
        assert_close_verbose(cand_t[0].double(), exact[0], atol=1e-6 * scale, rtol=torch.finfo(dtype).eps / 2,
                             what="half-precision candidate boxes vs fp64")
        # the flags are decided on the stored (rounded) boxes, as torchvision does
        flags = (sides >= min_size_in(dtype, case["min_size"])).all(-1) & (cand_t[1] >= case["score_thresh"])
        assert torch.equal(cand_t[3], flags), "flags"
    else:
        atol, rtol = decode_tol(dtype, scale)  # tests/test_proposals.py's box_tol is the same bound
        assert_close_verbose(cand_t[0], cand_r[0], atol, rtol, what="candidate boxes")
        near = ((sides - case["min_size"]).abs() <= atol + rtol * case["min_size"]).any(-1)
        assert torch.equal(cand_t[3] | near, cand_r[3] | near), "flags away from min_size"
    kw = dict(pre_nms_top_n=case["pre_nms_top_n"], post_nms_top_n=case["post_nms_top_n"],
              nms_thresh=case["nms_thresh"], score_thresh=case["score_thresh"], min_size=case["min_size"])
    got = rpn_proposals(*_rpn_layout(case, obj, deltas), anchors_arg, image_sizes, napl, backend="triton", **kw)
    boxes, scores, counts = select_proposals(*cand_t, case["nms_thresh"], case["post_nms_top_n"], "torch")
    for i, c in enumerate(counts.tolist()):
        assert torch.equal(got[0][i], boxes[i, :c]) and torch.equal(got[1][i], scores[i, :c]), f"image {i}"
    if torch.equal(cand_t[0], cand_r[0]) and torch.equal(cand_t[3], cand_r[3]):
        ref = rpn_proposals(obj, deltas, anchors_arg, image_sizes, napl, backend="torch", **kw)
        for i in range(case["batch"]):
            assert torch.equal(got[0][i], ref[0][i]) and torch.equal(got[1][i], ref[1][i]), f"ops differ, image {i}"


# --------------------------------------------------------------------------- non-finite boxes


def _finite_boxes(n, g):
    xy = torch.rand(n, 2, generator=g) * 20
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 10 + 1], 1)


@examples(40)
@given(op=st.sampled_from(["roi_align", "multiscale_roi_align", "nms", "batched_nms", "nms_keep_mask",
                           "decode_boxes", "paste_masks", "paste_masks_in_boxes", "rpn_proposals"]),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]), seed=seeds(), backend=st.sampled_from(["torch", "triton"]))
def test_non_finite_boxes_are_refused(op, bad, seed, backend):
    """A NaN or infinite box (anchor, for ``rpn_proposals``) raises ValueError naming the non-finite
    values on both backends (the ops' documented argument checks, on by default for CPU tensors;
    the GPU runs them only with FASTMASK_CHECKS=1)."""
    if torch.device(DEVICE).type != "cpu" and os.environ.get("FASTMASK_CHECKS") != "1":
        pytest.skip("value checks run on GPU tensors only with FASTMASK_CHECKS=1")
    g = generator(seed)
    n = int(torch.randint(1, 5, (1,), generator=g))
    boxes = _finite_boxes(n, g)
    boxes.view(-1)[int(torch.randint(0, 4 * n, (1,), generator=g))] = bad
    boxes = boxes.to(DEVICE)
    scores = torch.rand(n, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match="non-finite"):
        if op == "roi_align":
            roi_align(torch.randn(1, 2, 8, 8, device=DEVICE), [boxes], 2, backend=backend)
        elif op == "multiscale_roi_align":
            multiscale_roi_align([torch.randn(1, 2, 8, 8, device=DEVICE)], [boxes], 2, [(32, 32)], backend=backend)
        elif op == "nms":
            nms(boxes, scores, 0.5, backend=backend)
        elif op == "batched_nms":
            batched_nms(boxes, scores, torch.zeros(n, dtype=torch.int64, device=DEVICE), 0.5, backend=backend)
        elif op == "nms_keep_mask":
            nms_keep_mask(boxes[None], scores[None], 0.5, valid=torch.ones(1, n, dtype=torch.bool, device=DEVICE),
                          backend=backend)
        elif op == "decode_boxes":
            decode_boxes(torch.zeros(n, 4, device=DEVICE), boxes, backend=backend)
        elif op == "paste_masks":
            paste_masks(torch.rand(n, 1, 5, 5, device=DEVICE), boxes, (16, 16), backend=backend)
        elif op == "paste_masks_in_boxes":
            paste_masks_in_boxes(torch.rand(n, 1, 5, 5, device=DEVICE), boxes, backend=backend)
        else:
            rpn_proposals(torch.zeros(1, n, device=DEVICE), torch.zeros(1, n, 4, device=DEVICE), [boxes], [(32, 32)],
                          [n], pre_nms_top_n=5, post_nms_top_n=5, nms_thresh=0.7, backend=backend)
