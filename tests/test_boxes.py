"""Box helpers, encode and decode: parity with torchvision's box ops and BoxCoder."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import boxes as tv_boxes

from fastmask.ops import box_area, box_iou, clip_boxes_to_image, decode_boxes, encode_boxes, remove_small_boxes
from fastmask.ops.boxes import BBOX_XFORM_CLIP, decode_boxes_ref, per_row_image_sizes
from helpers import TOL, TRITON_DEVICES, assert_close_verbose, random_boxes, requires_cuda
from fastmask.kernels.box_decode import _decode_boxes_kernel, decode_boxes as decode_boxes_kernel

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def decode_tol(dtype, scale):
    """(atol, rtol) of a decode at coordinates up to ``scale`` pixels.

    docs/architecture.md asks fp32 decodes to agree within atol 1e-5. A corner ``x1 = cx - w / 2`` is a
    difference of two values of the image's scale, so an exp() one ulp apart (NumPy's in
    Triton's interpreter vs torch's CPU exp: the only difference, see
    ``test_interpreter_decode_differs_from_torchvision_by_exp_alone``) moves it by about one
    ulp *of the scale* even where x1 itself is near 0: 6e-5 at 1000 px. The bound is therefore
    1e-5 or two ulps of the coordinate scale, whichever is larger (they are equal at ~40 px).
    """
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else TOL[dtype]
    return max(atol, 2 * torch.finfo(dtype).eps * scale), rtol



def make_codes(n, k, seed, dtype=torch.float32, scale=1.0, device="cpu"):
    """Deltas of ``k`` boxes per row, a few of them far beyond the exp() clamp."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(n, 4 * k, generator=g, dtype=torch.float64) * scale
    if n and k:
        codes[: max(1, n // 8), 2::4] = 12.0  # dw above log(1000/16): clamped
        codes[-max(1, n // 8):, 3::4] = -9.0  # tiny heights
    return codes.to(dtype=dtype, device=device)


def tv_decode(codes, boxes, weights, clip_to=None):
    """torchvision's decode, then its clip_boxes_to_image per row (the oracle)."""
    out = BoxCoder(weights, BBOX_XFORM_CLIP).decode_single(codes, boxes)
    if clip_to is None:
        return out
    out = out.reshape(codes.shape[0], -1, 4)
    if isinstance(clip_to, tuple):
        return tv_boxes.clip_boxes_to_image(out, clip_to).flatten(1)
    rows = [tv_boxes.clip_boxes_to_image(r, (int(h), int(w))) for r, (h, w) in zip(out, clip_to.tolist())]
    return torch.stack(rows).flatten(1) if rows else out.flatten(1)


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_box_helpers_match_torchvision(dtype):
    g = torch.Generator().manual_seed(0)
    a = random_boxes(37, 60.0, generator=g, dtype=dtype)
    b = random_boxes(11, 60.0, generator=g, dtype=dtype)
    b[0] = a[0]  # identical boxes: IoU exactly 1
    a_copy, b_copy = a.clone(), b.clone()
    assert torch.equal(box_area(a), tv_boxes.box_area(a))
    assert torch.equal(box_iou(a, b), tv_boxes.box_iou(a, b))
    assert torch.equal(box_iou(a[None].expand(2, -1, -1), b[None].expand(2, -1, -1))[1], tv_boxes.box_iou(a, b))
    moved = a - 20
    assert torch.equal(clip_boxes_to_image(moved, (30, 45)), tv_boxes.clip_boxes_to_image(moved, (30, 45)))
    assert torch.equal(clip_boxes_to_image(moved.reshape(37, 1, 4), (30, 45)),
                       tv_boxes.clip_boxes_to_image(moved.reshape(37, 1, 4), (30, 45)))
    clipped = clip_boxes_to_image(moved, (30, 45))
    assert torch.equal(remove_small_boxes(clipped, 2.0), tv_boxes.remove_small_boxes(clipped, 2.0))
    assert torch.equal(a, a_copy) and torch.equal(b, b_copy)


def test_helpers_bad_inputs():
    with pytest.raises(ValueError, match="last dimension"):
        box_area(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="size"):
        clip_boxes_to_image(torch.zeros(3, 4), (10,))
    with pytest.raises(TypeError, match="boxes"):
        remove_small_boxes([[0, 0, 1, 1]], 1.0)


# --------------------------------------------------------------------------- torch reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights", [RPN_WEIGHTS, HEAD_WEIGHTS])
def test_reference_is_torchvision_bit_for_bit(dtype, weights):
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(64, 300.0, min_size=1.0, generator=g, dtype=dtype)
    codes = make_codes(64, 3, seed=2, dtype=dtype)
    ref_boxes = random_boxes(64, 300.0, min_size=1.0, generator=g, dtype=dtype)
    assert torch.equal(decode_boxes(codes, boxes, weights, backend="torch"), tv_decode(codes, boxes, weights))
    assert torch.equal(encode_boxes(ref_boxes, boxes, weights, backend="torch"),
                       BoxCoder(weights).encode_single(ref_boxes, boxes))


def test_reference_clip_equals_clip_after_decode():
    boxes = random_boxes(40, 120.0, min_size=1.0, generator=torch.Generator().manual_seed(3))
    codes = make_codes(40, 5, seed=4, scale=2.0)
    sizes = per_row_image_sizes([(50, 70), (90, 30)], [25, 15], "cpu")
    assert sizes.shape == (40, 2) and sizes[24].tolist() == [50, 70] and sizes[25].tolist() == [90, 30]
    for clip_to in [(50, 70), sizes]:
        assert torch.equal(decode_boxes(codes, boxes, HEAD_WEIGHTS, clip_to=clip_to, backend="torch"),
                           tv_decode(codes, boxes, HEAD_WEIGHTS, clip_to))


# --------------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights, clip", [(HEAD_WEIGHTS, "rows"), (HEAD_WEIGHTS, None), (RPN_WEIGHTS, "pair")])
def test_triton_decode_matches_torchvision(device, dtype, weights, clip):
    n, k = 203, 9  # odd sizes: partial tiles in both directions
    boxes = random_boxes(n, 400.0, min_size=0.5, generator=torch.Generator().manual_seed(5), dtype=dtype,
                         device=device)
    codes = make_codes(n, k, seed=6, dtype=dtype, scale=1.5, device=device)
    clip_to = {None: None, "pair": (321, 257),
               "rows": per_row_image_sizes([(300, 200), (180, 410)], [100, 103], device)}[clip]
    codes_copy, boxes_copy = codes.clone(), boxes.clone()
    expected = tv_decode(codes, boxes, weights, clip_to)
    out = torch.full_like(codes, float("nan"))  # poisoned: every value must be written
    decode_boxes_kernel(codes, boxes, weights, BBOX_XFORM_CLIP, clip_to=clip_to, out=out)
    assert_close_verbose(out, expected, *decode_tol(dtype, 600), what=f"decode {dtype} clip={clip}")
    public = decode_boxes(codes, boxes, weights, clip_to=clip_to, backend="triton")
    assert_close_verbose(public, expected, *decode_tol(dtype, 600), what="public decode_boxes")
    assert torch.equal(codes, codes_copy) and torch.equal(boxes, boxes_copy)


@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="runs the kernel in Triton's interpreter")
@pytest.mark.parametrize("weights", [RPN_WEIGHTS, HEAD_WEIGHTS])
def test_interpreter_decode_differs_from_torchvision_by_exp_alone(weights, monkeypatch):
    """Why ``decode_tol`` is wider than an ulp on the CPU: torchvision's decode with its one
    ``torch.exp`` replaced by NumPy's (the interpreter's ``exp``, 1 ulp from torch's on about a
    quarter of the inputs) gives the kernel's fp32 result bit for bit, so every other operation
    rounds as torchvision's does; deltas around the clamp (RPN weights, large boxes) make
    the exp ulp largest. On the GPU the kernel calls the CUDA ``expf`` torch uses."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(21)
    boxes = random_boxes(2000, 900.0, min_size=1.0, generator=g)
    codes = torch.randn(2000, 4, generator=g)
    codes[:, 2:] = BBOX_XFORM_CLIP + (torch.rand(2000, 2, generator=g) - 0.5) * 0.4  # around the clamp
    got = decode_boxes(codes, boxes, weights, backend="triton")
    assert not torch.equal(got, tv_decode(codes, boxes, weights)), "the exps must differ somewhere"
    torch_exp = torch.exp
    monkeypatch.setattr(torch, "exp", lambda t: torch.from_numpy(np.exp(t.numpy())) if t.dtype == torch.float32
                        else torch_exp(t))
    assert torch.equal(got, tv_decode(codes, boxes, weights))


@requires_cuda
@pytest.mark.parametrize("weights", [RPN_WEIGHTS, HEAD_WEIGHTS])
def test_cuda_decode_is_torchvision_bit_for_bit(weights):
    """On the GPU nothing differs: the same expf, no fused multiply-add, torch's scalar division."""
    g = torch.Generator().manual_seed(22)
    boxes = random_boxes(4000, 900.0, min_size=1.0, generator=g).cuda()
    codes = torch.randn(4000, 4, generator=g)
    codes[:, 2:] = BBOX_XFORM_CLIP + (torch.rand(4000, 2, generator=g) - 0.5) * 0.4
    codes = codes.cuda()
    assert torch.equal(decode_boxes(codes, boxes, weights, backend="triton"), tv_decode(codes, boxes, weights))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_decode_non_contiguous_inputs(device):
    n, k = 77, 4
    boxes_t = random_boxes(n, 200.0, min_size=1.0, generator=torch.Generator().manual_seed(7),
                           device=device).t().contiguous().t()  # column-major [N, 4]
    codes_t = make_codes(n, k, seed=8, device=device).t().contiguous().t()  # column-major [N, 4K]
    sizes = per_row_image_sizes([(150, 130)], [n], device).t().contiguous().t()
    assert not boxes_t.is_contiguous() and not codes_t.is_contiguous()
    out = decode_boxes(codes_t, boxes_t, HEAD_WEIGHTS, clip_to=sizes, backend="triton")
    expected = tv_decode(codes_t.contiguous(), boxes_t.contiguous(), HEAD_WEIGHTS, (150, 130))
    assert_close_verbose(out, expected, *decode_tol(torch.float32, 300), what="non-contiguous decode")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_decode_half_precision(device, dtype):
    """The kernel computes in fp32 and rounds once: within half an ulp of the fp64 result of
    the same (half-precision) inputs, plus fp32 rounding relative to the box scale."""
    n, k = 64, 3
    boxes = random_boxes(n, 300.0, min_size=1.0, generator=torch.Generator().manual_seed(9), dtype=dtype,
                         device=device)
    codes = make_codes(n, k, seed=10, dtype=dtype, device=device)
    out = decode_boxes(codes, boxes, HEAD_WEIGHTS, clip_to=(250, 280), backend="triton")
    assert out.dtype == dtype
    exact = decode_boxes_ref(codes.double(), boxes.double(), HEAD_WEIGHTS, clip_to=(250, 280))
    eps = torch.finfo(dtype).eps
    assert_close_verbose(out.double(), exact, atol=1e-5 * 300, rtol=eps / 2, what=f"{dtype} decode")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_decode_empty(device):
    assert decode_boxes(torch.zeros(0, 8, device=device), torch.zeros(0, 4, device=device),
                        backend="triton").shape == (0, 8)
    assert decode_boxes(torch.zeros(5, 0, device=device), torch.ones(5, 4, device=device),
                        backend="triton").shape == (5, 0)


def test_decode_bad_inputs():
    codes, boxes = torch.zeros(4, 8), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="4K"):
        decode_boxes(torch.zeros(4, 6), boxes)
    with pytest.raises(ValueError, match="rows"):
        decode_boxes(codes, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="dimensions"):
        decode_boxes(codes[None], boxes)
    with pytest.raises(TypeError, match="dtype"):
        decode_boxes(codes.long(), boxes)
    with pytest.raises(ValueError, match="weights"):
        decode_boxes(codes, boxes, (1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="clip_to"):
        decode_boxes(codes, boxes, clip_to=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="clip_to"):
        decode_boxes(codes, boxes, clip_to=(10, 20, 30))
    with pytest.raises(ValueError, match="non-finite"):
        decode_boxes(codes, torch.full((4, 4), math.nan))
    with pytest.raises(ValueError, match="backend"):
        decode_boxes(codes, boxes, backend="cuda")
    with pytest.raises(ValueError, match="rows"):
        encode_boxes(boxes, torch.zeros(3, 4))


def test_triton_backend_unavailable_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        decode_boxes(torch.zeros(2, 4), torch.ones(2, 4), backend="triton")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_decode_cuda_box_head_size(dtype):
    """The box head at eval size: 1000 proposals x 91 classes, vs torchvision on the GPU."""
    n, k = 1000, 91
    boxes = random_boxes(n, 1200.0, min_size=1.0, generator=torch.Generator().manual_seed(11), dtype=dtype,
                         device="cuda")
    codes = make_codes(n, k, seed=12, dtype=dtype, scale=0.5, device="cuda")
    sizes = per_row_image_sizes([(800, 1199), (750, 1216)], [600, 400], "cuda")
    out = torch.full_like(codes, float("nan"))
    decode_boxes_kernel(codes, boxes, HEAD_WEIGHTS, BBOX_XFORM_CLIP, clip_to=sizes, out=out)
    expected = tv_decode(codes, boxes, HEAD_WEIGHTS, sizes)
    assert_close_verbose(out, expected, *decode_tol(dtype, 1800), what="cuda decode")
    # Another number of boxes must not compile the kernel again.
    before = compiled_variants(_decode_boxes_kernel)
    decode_boxes(codes[:517], boxes[:517], HEAD_WEIGHTS, clip_to=sizes[:517], backend="triton")
    assert compiled_variants(_decode_boxes_kernel) == before


def compiled_variants(kernel) -> int:
    """Kernels compiled for the current GPU (Triton keeps one cache per device)."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])
