"""RPN proposals: parity with torchvision's RegionProposalNetwork.filter_proposals.

The oracle is torchvision's own RPN object: its box coder decodes every anchor and its
``filter_proposals`` selects, with the same logits and deltas. The CPU sizes (two images of
different sizes padded to 128x160, FPN P2-P6, pre-NMS top-k 200) leave the two coarsest
levels with fewer anchors than the top-k.
"""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as tv_box_ops

import fastmask.ops.proposals as proposals_module
from fastmask.ops import AnchorGenerator
from fastmask.ops.proposals import rpn_candidates_ref, rpn_candidates_triton, rpn_proposals
from helpers import TOL, TRITON_DEVICES, assert_close_verbose, requires_cuda

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
NMS_THRESH = 0.7


def box_tol(dtype, scale):
    """(atol, rtol) for decoded boxes at coordinates up to ``scale``: docs/architecture.md's 1e-5, or two
    ulps of the scale where a corner is the difference of two such values (see
    tests/test_boxes.py, ``decode_tol``)."""
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else TOL[dtype]
    return max(atol, 2 * torch.finfo(dtype).eps * scale), rtol



class Batch:
    """Logits, deltas and anchors of a padded batch, as the RPN head and generator give them."""

    def __init__(self, padded, image_sizes, seed, dtype=torch.float32, device="cpu", delta_scale=0.5):
        b = len(image_sizes)
        self.images = ImageList(torch.zeros(b, 3, *padded, device=device), image_sizes)
        feats = [torch.zeros(b, 1, -(-padded[0] // s), -(-padded[1] // s), device=device)
                 for s in (4, 8, 16, 32, 64)]
        gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS)
        self.geometry = gen.geometry(self.images, feats)
        self.anchors = gen(self.images, feats)
        self.num_anchors_per_level = self.geometry.num_anchors_per_level
        a = sum(self.num_anchors_per_level)
        g = torch.Generator().manual_seed(seed)
        self.objectness = torch.randn(b, a, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        deltas = torch.randn(b, a, 4, generator=g, dtype=torch.float64) * delta_scale
        top = self.objectness.double().cpu().argsort(dim=1, descending=True)
        deltas[0, top[0, :40], 2:] = 9.0  # far beyond the exp() clamp
        deltas[1, top[1, :40], 0] = 60.0  # moved right of the image: clipped to zero width
        self.deltas = deltas.to(dtype=dtype, device=device)
        self.image_sizes = image_sizes


def small_batch(seed=0, **kw):
    return Batch((128, 160), [(120, 160), (128, 100)], seed, **kw)


def tv_proposals(batch, pre_nms_top_n, post_nms_top_n, score_thresh=0.0, deltas=None):
    deltas = batch.deltas if deltas is None else deltas
    rpn = RegionProposalNetwork(TVAnchorGenerator(FPN_SIZES, FPN_RATIOS), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
                                dict(training=pre_nms_top_n, testing=pre_nms_top_n),
                                dict(training=post_nms_top_n, testing=post_nms_top_n), NMS_THRESH,
                                score_thresh=score_thresh).eval()
    b = deltas.shape[0]
    decoded = rpn.box_coder.decode(deltas.reshape(-1, 4), batch.anchors).view(b, -1, 4)
    return rpn.filter_proposals(decoded, batch.objectness.reshape(-1, 1), batch.image_sizes,
                                batch.num_anchors_per_level)


def ours(batch, anchors, pre_nms_top_n, post_nms_top_n, score_thresh=0.0, backend="torch", **kw):
    return rpn_proposals(kw.pop("objectness", batch.objectness), kw.pop("deltas", batch.deltas), anchors,
                         batch.image_sizes, batch.num_anchors_per_level, pre_nms_top_n=pre_nms_top_n,
                         post_nms_top_n=post_nms_top_n, nms_thresh=NMS_THRESH, score_thresh=score_thresh,
                         backend=backend, **kw)


def assert_same_proposals(actual, expected, exact, tol=box_tol(torch.float32, 160)):
    (boxes, scores), (tv_boxes, tv_scores) = actual, expected
    assert len(boxes) == len(tv_boxes) == len(scores)
    for i, (b, s, tb, ts) in enumerate(zip(boxes, scores, tv_boxes, tv_scores)):
        assert b.shape == tb.shape and b.dtype == tb.dtype, f"image {i}: {b.shape} {b.dtype} vs {tb.shape} {tb.dtype}"
        assert torch.equal(s, ts), f"image {i}: scores differ"
        if exact:
            assert torch.equal(b, tb), f"image {i}: boxes differ"
        else:
            assert_close_verbose(b, tb, *tol, what=f"image {i} boxes")


@pytest.fixture
def torch_nms(monkeypatch):
    """Run the proposals' NMS with the torch reference: the NMS kernels have their own tests
    (tests/test_nms.py) and are too slow for these sizes in Triton's interpreter."""
    real = proposals_module.candidates_keep

    def candidates_keep(*args):
        return real(*args[:-1], "torch")

    monkeypatch.setattr(proposals_module, "candidates_keep", candidates_keep)


# --------------------------------------------------------------------------- torch reference


@pytest.mark.parametrize("anchors_as, score_thresh", [("geometry", 0.0), ("list", 0.4)])
def test_reference_is_torchvision(anchors_as, score_thresh):
    batch = small_batch(seed=1)
    anchors = batch.geometry if anchors_as == "geometry" else batch.anchors
    expected = tv_proposals(batch, 200, 300, score_thresh)
    assert_same_proposals(ours(batch, anchors, 200, 300, score_thresh), expected, exact=True)
    assert sum(len(b) for b in expected[0]) > 300  # a real selection, not an empty one


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_candidates_are_torchvision(dtype):
    """torchvision's CPU NMS has no fp16/bf16 kernel, so half precision is checked up to NMS:
    the reference's top-k boxes are torchvision's half-precision decode + clip, bit for bit."""
    batch = small_batch(seed=2, dtype=dtype)
    boxes, scores, levels, valid = rpn_candidates_ref(batch.objectness, batch.deltas, torch.stack(batch.anchors),
                                                      batch.image_sizes, batch.num_anchors_per_level, 200)
    coder = RegionProposalNetwork(TVAnchorGenerator(), RPNHead(1, 3), 0.7, 0.3, 256, 0.5, {}, {}, 0.7).box_coder
    decoded = coder.decode(batch.deltas.reshape(-1, 4), batch.anchors).view(2, -1, 4)
    logits, idx, start = [], [], 0
    for count in batch.num_anchors_per_level:  # torchvision's _get_top_n_idx
        v, i = batch.objectness[:, start:start + count].topk(min(200, count), dim=1)
        logits.append(v)
        idx.append(i + start)
        start += count
    idx = torch.cat(idx, 1)
    for i, (h, w) in enumerate(batch.image_sizes):
        expected = tv_box_ops.clip_boxes_to_image(decoded[i, idx[i]], (h, w))
        assert torch.equal(boxes[i], expected)
        assert torch.equal(valid[i], (expected[:, 2:] - expected[:, :2] >= 1e-3).all(1))
    assert torch.equal(scores, torch.cat(logits, 1).sigmoid())


# --------------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("anchors_as", ["geometry", "list"])
def test_triton_matches_torchvision(device, anchors_as, torch_nms):
    batch = small_batch(seed=3, device=device)
    anchors = batch.geometry if anchors_as == "geometry" else batch.anchors
    expected = tv_proposals(batch, 200, 300)
    # torchvision's flat layouts: objectness [B*A, 1], deltas [B*A, 4]
    obj, deltas = batch.objectness.reshape(-1, 1), batch.deltas.reshape(-1, 4)
    copies = obj.clone(), deltas.clone(), [a.clone() for a in batch.anchors]
    actual = ours(batch, anchors, 200, 300, backend="triton", objectness=obj, deltas=deltas)
    assert_same_proposals(actual, expected, exact=False)
    assert torch.equal(obj, copies[0]) and torch.equal(deltas, copies[1])
    assert all(torch.equal(a, c) for a, c in zip(batch.anchors, copies[2]))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_candidates_match_reference(device, dtype):
    """Every output of the fused kernel (poisoned first) against the reference, on
    non-contiguous logits and deltas, with a score threshold."""
    batch = small_batch(seed=4, dtype=dtype, device=device)
    obj = batch.objectness.t().contiguous().t()  # [B, A] with column-major strides
    deltas = batch.deltas.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # [B, A, 4], batch innermost-but-one
    assert not obj.is_contiguous() and not deltas.is_contiguous()
    args = (batch.image_sizes, batch.num_anchors_per_level, 200, 0.3)
    ref = rpn_candidates_ref(obj, deltas, batch.geometry.anchors(), *args)
    for anchors in (batch.geometry, torch.stack(batch.anchors)):
        boxes, scores, levels, valid = rpn_candidates_triton(obj, deltas, anchors, *args, poison=True)
        assert_close_verbose(boxes, ref[0], *box_tol(dtype, 160), what="candidate boxes")
        assert torch.equal(scores, ref[1]) and torch.equal(levels, ref[2]) and torch.equal(valid, ref[3])
    assert levels[0].tolist() == sorted(levels[0].tolist()) and levels.max().item() == 4
    assert 0 < int(valid.sum()) < valid.numel()


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_candidates_half_precision(device, dtype):
    """Half-precision logits and deltas: the kernel decodes in fp32 and rounds once, so its
    boxes lie within half an ulp of the fp64 decode of the same inputs (plus fp32 rounding
    relative to the image scale); flags and levels are exact."""
    batch = small_batch(seed=5, dtype=dtype, device=device)
    args = (batch.image_sizes, batch.num_anchors_per_level, 200, 0.3)
    boxes, scores, levels, valid = rpn_candidates_triton(batch.objectness, batch.deltas, batch.geometry, *args,
                                                         poison=True)
    exact = rpn_candidates_ref(batch.objectness.double(), batch.deltas.double(), batch.geometry.anchors().double(),
                               *args)
    assert boxes.dtype == dtype
    assert_close_verbose(boxes.double(), exact[0], atol=160 * 1e-6, rtol=torch.finfo(dtype).eps / 2,
                         what=f"{dtype} candidate boxes")
    same_dtype = rpn_candidates_ref(batch.objectness, batch.deltas, batch.geometry.anchors(), *args)
    assert torch.equal(scores, same_dtype[1]) and torch.equal(levels, same_dtype[2])
    rounded = boxes.double()  # the flags are decided on the stored boxes, as torchvision does
    sides = (rounded[..., 2:] - rounded[..., :2]).to(dtype)
    assert torch.equal(valid, (sides >= 1e-3).all(-1) & (scores >= 0.3))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_DEVICES else []))
def test_no_box_survives(backend, torch_nms):
    batch = small_batch(seed=6)
    empty = ours(batch, batch.geometry, 50, 100, score_thresh=1.0, backend=backend)
    assert_same_proposals(empty, tv_proposals(batch, 50, 100, score_thresh=1.0), exact=True)
    assert [b.shape for b in empty[0]] == [(0, 4), (0, 4)] and [s.shape for s in empty[1]] == [(0,), (0,)]
    outside = batch.deltas.clone()
    outside[..., 0] = 100.0  # every box right of both images: clipped to zero width
    empty = ours(batch, batch.geometry, 50, 100, backend=backend, deltas=outside)
    assert_same_proposals(empty, tv_proposals(batch, 50, 100, deltas=outside), exact=True)
    assert [b.shape[0] for b in empty[0]] == [0, 0]


def test_bad_inputs_raise():
    batch = small_batch(seed=7)
    kw = dict(pre_nms_top_n=10, post_nms_top_n=10, nms_thresh=0.7)
    sizes, nums = batch.image_sizes, batch.num_anchors_per_level
    with pytest.raises(ValueError, match="objectness"):
        rpn_proposals(batch.objectness[:, 1:], batch.deltas, batch.geometry, sizes, nums, **kw)
    with pytest.raises(ValueError, match="pred_bbox_deltas"):
        rpn_proposals(batch.objectness, batch.deltas[:, 1:], batch.geometry, sizes, nums, **kw)
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        rpn_proposals(batch.objectness, batch.deltas, batch.geometry, sizes, nums[:4], **kw)
    with pytest.raises(ValueError, match="images"):
        rpn_proposals(batch.objectness, batch.deltas, batch.geometry, sizes[:1], nums, **kw)
    with pytest.raises(ValueError, match="anchors"):
        rpn_proposals(batch.objectness, batch.deltas, batch.anchors[:1], sizes, nums, **kw)
    with pytest.raises(ValueError, match="pre_nms_top_n"):
        rpn_proposals(batch.objectness, batch.deltas, batch.geometry, sizes, nums, **{**kw, "pre_nms_top_n": 0})
    with pytest.raises(ValueError, match="nms_thresh"):
        rpn_proposals(batch.objectness, batch.deltas, batch.geometry, sizes, nums, **{**kw, "nms_thresh": 1.5})
    with pytest.raises(ValueError, match="image_sizes"):
        rpn_proposals(batch.objectness, batch.deltas, batch.geometry, [(10,), (10, 10)], nums, **kw)
    with pytest.raises(TypeError, match="objectness"):
        rpn_proposals(batch.objectness.long(), batch.deltas, batch.geometry, sizes, nums, **kw)


# --------------------------------------------------------------------------- CUDA, full size


def match_fraction(boxes, other, tol=1e-3):
    """Fraction of ``boxes`` (Tensor[K, 4]) that also appear in ``other`` (within ``tol``)."""
    if len(boxes) == 0:
        return 1.0 if len(other) == 0 else 0.0
    diff = (boxes[:, None, :] - other[None, :, :]).abs().amax(-1)
    return (diff.amin(1) <= tol).float().mean().item() if len(other) else 0.0


@requires_cuda
@pytest.mark.parametrize("pre_nms_top_n, post_nms_top_n", [(1000, 1000), (2000, 2000)])
def test_full_size_matches_torchvision_cuda(pre_nms_top_n, post_nms_top_n):
    """800x1216 batch (about 240k anchors per image). torchvision's CUDA batched NMS offsets
    the boxes of each level, so a box whose IoU lies within rounding of the threshold may be
    decided differently: at most 0.5% of the proposals."""
    batch = Batch((800, 1216), [(800, 1199), (760, 1216)], seed=8, device="cuda", delta_scale=0.2)
    expected = tv_proposals(batch, pre_nms_top_n, post_nms_top_n)
    actual = ours(batch, batch.geometry, pre_nms_top_n, post_nms_top_n, backend="triton")
    reference = ours(batch, batch.geometry, pre_nms_top_n, post_nms_top_n, backend="torch")
    for (b, s), (tb, ts), (rb, rs) in zip(zip(*actual), zip(*expected), zip(*reference)):
        assert abs(len(b) - len(tb)) <= max(2, len(tb) // 200)
        assert match_fraction(b, tb) >= 0.995 and match_fraction(tb, b) >= 0.995
        assert match_fraction(b, rb, tol=1e-4) >= 0.999


@requires_cuda
def test_candidates_cuda_no_recompile():
    from fastmask.kernels.box_decode import _rpn_candidates_kernel

    batch = Batch((800, 1216), [(800, 1199), (760, 1216)], seed=9, device="cuda")
    args = (batch.image_sizes, batch.num_anchors_per_level)
    before = None
    for pre_nms_top_n in (1000, 2000, 1500):
        ref = rpn_candidates_ref(batch.objectness, batch.deltas, batch.geometry.anchors(), *args, pre_nms_top_n)
        out = rpn_candidates_triton(batch.objectness, batch.deltas, batch.geometry, *args, pre_nms_top_n, poison=True)
        assert_close_verbose(out[0], ref[0], *box_tol(torch.float32, 1216), what="cuda candidate boxes")
        assert torch.equal(out[2], ref[2]) and torch.equal(out[3], ref[3])
        compiled = len(_rpn_candidates_kernel.device_caches[torch.cuda.current_device()][0])
        assert before is None or compiled == before  # another top-k size compiles nothing new
        before = compiled
