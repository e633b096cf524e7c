"""NMS against torchvision: reference (backend="torch") and Triton kernels (interpreter / CUDA).

Both backends round IoU as torchvision's CPU kernel does, so the kept indices must equal
torchvision's exactly, also for IoUs exactly at the threshold: ``nms`` against
``torchvision.ops.nms``, ``batched_nms`` against ``torchvision.ops.nms`` run class by class
(``tv_batched``). torchvision's CPU sort is stable, as ours: tied scores are resolved by input
order on both sides. The only freedom left is the order of tied scores in ``batched_nms``'s
output (torchvision's final sort is not stable); see ``assert_same_keep``.
"""

import pytest
import torch
import torchvision
from helpers import TRITON_DEVICES, random_boxes, requires_cuda

from fastmask.ops import batched_nms, nms, nms_keep_mask
from fastmask.ops.nms import _sorted_keep_triton, nms_keep_mask_ref

BACKENDS = [("torch", "cpu")] + [("triton", d) for d in TRITON_DEVICES]
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]
ON_INTERPRETER = {"cpu": True, "cuda": False}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """NMS runs many small CPU ops; on a shared 2-core machine intra-op threads only add
    contention (up to 5x slower here), so this module runs with one, then restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def box_set(kind: str, n: int, seed: int, max_coord: float = 100.0) -> torch.Tensor:
    """fp32 boxes: 'spread' (uniform), 'clustered' (jittered copies of a few boxes, many
    overlaps and long suppression chains) or 'grid' (small integers: many IoUs that are
    exact simple fractions, i.e. exactly at thresholds like 1/2 or 1/3)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "spread":
        return random_boxes(n, max_coord, generator=g)
    if kind == "clustered":
        centres = random_boxes(max(1, n // 20), max_coord, min_size=max_coord / 20, generator=g).double()
        pick = torch.randint(0, centres.shape[0], (n,), generator=g)
        jitter = (torch.rand(n, 4, generator=g, dtype=torch.float64) - 0.5) * (max_coord / 25)
        b = centres[pick] + jitter
        b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2])
        return b.float()
    if kind == "grid":
        xy = torch.randint(0, 6, (n, 2), generator=g)
        wh = torch.randint(0, 4, (n, 2), generator=g)
        return torch.cat([xy, xy + wh], 1).float()
    raise ValueError(kind)


def scores_for(n: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    s = torch.rand(n, generator=g)
    return (s * 8).floor() / 8 if ties else s


def tv_batched(boxes, scores, idxs, thr):
    """torchvision's batched NMS computed class by class (``torchvision.ops.nms`` per class).

    This is what ``torchvision.ops.batched_nms`` computes above 1000 boxes on the CPU (25,000
    on CUDA). Below that it offsets coordinates by class times (max coordinate + 1), and the
    rounding of the shifted fp32 coordinates moves IoUs by up to ~1e-3 for small boxes, so it
    can differ near the threshold; per class is the exact semantics, and what fastmask keeps.
    """
    kept = [torch.nonzero(idxs == c).squeeze(1)[torchvision.ops.nms(boxes[idxs == c], scores[idxs == c], thr)]
            for c in torch.unique(idxs)]
    kept = torch.cat(kept) if kept else torch.empty(0, dtype=torch.int64)
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def assert_same_keep(actual: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor, what: str = ""):
    """Same kept set; same order except that boxes with equal scores may swap."""
    actual, expected, scores = actual.cpu(), expected.cpu(), scores.cpu().double()
    assert actual.dtype == torch.int64, f"{what}: dtype {actual.dtype}"
    a, e = set(actual.tolist()), set(expected.tolist())
    if a != e:
        extra, missing = sorted(a - e)[:8], sorted(e - a)[:8]
        raise AssertionError(f"{what}: {len(a - e)} extra kept {extra} (scores {scores[extra].tolist()}), "
                             f"{len(e - a)} missing {missing} (scores {scores[missing].tolist()}); "
                             f"kept {len(a)} vs {len(e)}")
    assert torch.equal(scores[actual], scores[expected]), f"{what}: kept boxes not by decreasing score"


def run_nms(backend, device, boxes, scores, thr, idxs=None):
    boxes, scores = boxes.to(device), scores.to(device)
    if idxs is None:
        return nms(boxes, scores, thr, backend=backend)
    return batched_nms(boxes, scores, idxs.to(device), thr, backend=backend)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", ["spread", "clustered", "grid"])
def test_nms_matches_torchvision(backend, device, kind):
    sizes = [1, 7, 64, 65, 300] if backend == "triton" else [1, 7, 64, 65, 300, 1000, 2500]
    for seed, n in enumerate(sizes):
        boxes, scores = box_set(kind, n, seed), scores_for(n, seed, ties=kind == "grid")
        for thr in (0.5, 1 / 3, 0.7) if kind == "grid" else (0.3, 0.7):
            got = run_nms(backend, device, boxes, scores, thr)
            expected = torchvision.ops.nms(boxes, scores, thr)
            # Stable sorts on both sides: exactly the same indices in the same order.
            assert torch.equal(got.cpu(), expected), \
                f"{kind} n={n} thr={thr}: {got.tolist()[:20]} vs {expected.tolist()[:20]}"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("num_classes", [1, 3, 80])
def test_batched_nms_matches_torchvision(backend, device, num_classes):
    sizes = [5, 200] if backend == "triton" else [5, 200, 1500, 3000]
    for seed, n in enumerate(sizes):
        for kind in ("spread", "clustered", "grid"):
            boxes, scores = box_set(kind, n, seed), scores_for(n, seed, ties=seed % 2 == 1)
            idxs = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
            got = run_nms(backend, device, boxes, scores, 0.5, idxs)
            assert_same_keep(got, tv_batched(boxes, scores, idxs, 0.5), scores, f"{kind} n={n}")
            if kind == "grid":  # small integer boxes: torchvision's class offsets round nothing, so
                # its batched_nms (offsets below 1000 boxes, per class above) must agree too
                assert_same_keep(got, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5), scores, f"{kind} n={n}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_iou_exactly_at_threshold(backend, device):
    # IoU 2/4 = 0.5 exactly: kept at thr=0.5, suppressed just below.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert run_nms(backend, device, boxes, scores, 0.5).tolist() == [0, 1]
    assert run_nms(backend, device, boxes, scores, 0.4999999).tolist() == [0]
    # IoU 1/3: fp32(1/3) is above the double 1/3, so torchvision suppresses at thr = 1/3.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    for thr in (1 / 3, float(torch.tensor(1 / 3, dtype=torch.float32)), 0.33333334, 0.3333334):
        assert run_nms(backend, device, boxes, scores, thr).tolist() == torchvision.ops.nms(boxes, scores, thr).tolist()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_degenerate_sets(backend, device):
    # Zero boxes, one box, all identical (the first in input order wins ties), zero area
    # (IoU 0/0 is NaN: never above the threshold, so all are kept), batched empty.
    empty = run_nms(backend, device, torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.shape == (0,) and empty.device.type == device
    assert run_nms(backend, device, torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.3]), 0.5).tolist() == [0]
    same = torch.tensor([[1.0, 1.0, 5.0, 5.0]]).repeat(70, 1)
    assert run_nms(backend, device, same, torch.full((70,), 0.5), 0.5).tolist() == [0]
    s = scores_for(70, 3)
    assert run_nms(backend, device, same, s, 0.99).tolist() == [int(s.argmax())]
    flat = torch.tensor([[2.0, 2.0, 2.0, 6.0]]).repeat(5, 1)
    got = run_nms(backend, device, flat, scores_for(5, 0), 0.5)
    assert got.tolist() == torchvision.ops.nms(flat, scores_for(5, 0), 0.5).tolist() and len(got) == 5
    assert nms_keep_mask(torch.zeros(2, 0, 4, device=device), torch.zeros(2, 0, device=device), 0.5,
                         backend=backend).shape == (2, 0)
    # Inverted boxes (x2 < x1: negative areas) and a negative threshold follow torchvision's formula.
    odd = box_set("grid", 60, 8)
    odd[::3, [0, 2]] = odd[::3, [2, 0]]
    odd[::5, [1, 3]] = odd[::5, [3, 1]]
    for thr in (0.5, -0.1):
        expected = torchvision.ops.nms(odd, scores_for(60, 8), thr)
        assert torch.equal(run_nms(backend, device, odd, scores_for(60, 8), thr).cpu(), expected), thr


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, device, dtype):
    boxes = box_set("clustered", 150, 5, max_coord=500.0).to(dtype)
    scores = scores_for(150, 5)
    got = run_nms(backend, device, boxes, scores.to(dtype), 0.5)
    # fp16/bf16 are compared in fp32: torchvision on the upcast boxes (and the same rounded
    # scores); fp64 natively.
    ref_boxes = boxes if dtype == torch.float64 else boxes.float()
    assert torch.equal(got.cpu(), torchvision.ops.nms(ref_boxes, scores.to(dtype).to(ref_boxes.dtype), 0.5))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_large_coordinates_and_noncontiguous(backend, device):
    boxes = box_set("clustered", 250, 7, max_coord=1e4)
    scores = scores_for(250, 7)
    expected = torchvision.ops.nms(boxes, scores, 0.6)
    strided = torch.zeros(250, 8)
    strided[:, ::2] = boxes  # a [250, 4] view with strides (8, 2)
    before = strided.clone()
    got = run_nms(backend, device, strided[:, ::2], scores, 0.6)
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(strided, before), "inputs modified"


# --------------------------------------------------------------------------- keep mask


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_keep_mask_batched_equals_per_image(backend, device):
    # The RPN's shape in small: images x levels, padded, idx = level.
    b, levels, per_level = 3, 4, 40
    n = levels * per_level
    g = torch.Generator().manual_seed(11)
    boxes = torch.stack([box_set("clustered", n, 20 + i) for i in range(b)])
    scores = torch.rand(b, n, generator=g)
    idxs = torch.arange(levels).repeat_interleave(per_level).repeat(b, 1)
    valid = torch.rand(b, n, generator=g) > 0.2
    valid[2] = False  # an image with no boxes at all
    boxes[~valid] = float("nan")  # padding holds garbage
    inputs = [t.clone() for t in (boxes, scores, idxs, valid)]
    got = nms_keep_mask(boxes.to(device), scores.to(device), 0.7, idxs.to(device), valid.to(device), backend=backend)
    assert got.dtype == torch.bool and got.shape == (b, n) and got.device.type == device
    for i in range(b):
        v = valid[i].nonzero().squeeze(1)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[v[tv_batched(boxes[i][v], scores[i][v], idxs[i][v], 0.7)]] = True
        assert torch.equal(got[i].cpu(), expected), f"image {i}"
    for t, before in zip((boxes, scores, idxs, valid), inputs):
        torch.testing.assert_close(t, before, rtol=0, atol=0, equal_nan=True, msg="inputs modified")
    # The unbatched form, without idxs: plain NMS.
    keep = nms_keep_mask(boxes[0, valid[0]].to(device), scores[0, valid[0]].to(device), 0.7, backend=backend)
    expected = torch.zeros(int(valid[0].sum()), dtype=torch.bool)
    expected[torchvision.ops.nms(boxes[0, valid[0]], scores[0, valid[0]], 0.7)] = True
    assert torch.equal(keep.cpu(), expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("chunk", [64, 128])
def test_triton_chunks_write_everything(device, chunk):
    """Small chunks force the cross-chunk pass and segments that span chunks; outputs and
    scratch are poisoned, so a position left unwritten (or an unwritten mask word read)
    shows. Two images, padding, and one class or three."""
    b, n = 2, 230
    boxes = torch.stack([box_set("clustered", n, 3 + i) for i in range(b)])
    scores = torch.stack([scores_for(n, 3 + i) for i in range(b)])
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(b, n, generator=g) > 0.1
    for idxs in (None, torch.randint(0, 3, (b, n), generator=g)):
        keep_sorted, src, _ = _sorted_keep_triton(
            boxes.to(device), scores.to(device), 0.5, None if idxs is None else idxs.to(device), valid.to(device),
            max_chunk=chunk, poison=True)
        assert set(keep_sorted.unique().tolist()) <= {0, 1}, "positions left unwritten"
        keep = torch.zeros(b * n, dtype=torch.bool)
        keep[src.cpu()] = keep_sorted.cpu().bool()
        keep = keep.reshape(b, n)
        for i in range(b):
            v = valid[i].nonzero().squeeze(1)
            cls = torch.zeros(n, dtype=torch.int64) if idxs is None else idxs[i]
            expected = v[tv_batched(boxes[i][v], scores[i][v], cls[v], 0.5)]
            assert set(keep[i].nonzero().squeeze(1).tolist()) == set(expected.tolist()), \
                f"chunk={chunk} classes={idxs is not None} image {i}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_tree_or_path(device):
    """The GPU's OR reduction (``tl.reduce``) on a small case; the interpreter defaults to the
    bit-wise path because its ``tl.reduce`` runs element by element."""
    n = 90
    boxes, scores = box_set("clustered", n, 4).to(device), scores_for(n, 4).to(device)
    order = torch.sort(scores, descending=True, stable=True).indices
    i32 = dict(dtype=torch.int32, device=device)
    zeros = torch.zeros(n, **i32)
    next_start = torch.cat([zeros, torch.full((1,), n, **i32)])
    next_start[1:n] = n
    from fastmask.kernels.nms import nms_sorted_keep
    for by_bits in (False, True):
        keep = nms_sorted_keep(boxes[order].contiguous(), zeros, zeros, next_start, None, 0.5, poison=True,
                               or_by_bits=by_bits)
        assert torch.equal(order[keep.bool()].cpu(), torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.5))


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise():
    b, s = torch.rand(4, 4), torch.rand(4)
    with pytest.raises(TypeError, match="boxes must be a torch.Tensor"):
        nms(b.tolist(), s, 0.5)
    with pytest.raises(ValueError, match="boxes must have shape"):
        nms(torch.rand(2, 4, 4), torch.rand(2, 4), 0.5)
    with pytest.raises(ValueError, match="last dimension"):
        nms(torch.rand(4, 5), s, 0.5)
    with pytest.raises(TypeError, match="boxes must have a dtype"):
        nms(b.long(), s, 0.5)
    with pytest.raises(ValueError, match="scores must have shape"):
        nms(b, torch.rand(5), 0.5)
    with pytest.raises(TypeError, match="scores must have a dtype"):
        nms(b, s.long(), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        nms(torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), torch.rand(1), 0.5)
    with pytest.raises(TypeError, match="iou_threshold must be a float"):
        nms(b, s, torch.tensor(0.5))
    with pytest.raises(ValueError, match="iou_threshold must be a finite"):
        nms(b, s, float("nan"))
    with pytest.raises(TypeError, match="idxs must have a dtype"):
        batched_nms(b, s, s, 0.5)
    with pytest.raises(ValueError, match="idxs must have shape"):
        batched_nms(b, s, torch.zeros(3, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="valid must have a dtype"):
        nms_keep_mask(b, s, 0.5, valid=torch.ones(4))
    with pytest.raises(ValueError, match="boxes must have shape"):
        nms_keep_mask(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 3), 0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        nms(b, s, 0.5, backend="cuda")


def test_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="nms: backend='triton' was asked for but cannot run"):
        nms(torch.rand(3, 4), torch.rand(3), 0.5, backend="triton")


# --------------------------------------------------------------------------- CUDA, full sizes


@requires_cuda
@pytest.mark.parametrize("n,num_classes", [(5000, 1), (5000, 80), (20000, 80), (30000, 1)])
def test_cuda_matches_torchvision_cpu(n, num_classes):
    boxes = box_set("clustered", n, 1, max_coord=1000.0)
    scores = scores_for(n, 1)
    idxs = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(1))
    got = batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5)
    # Rounded as torchvision's CPU kernel (no fused multiply-add), so the CPU result is exact.
    assert_same_keep(got, tv_batched(boxes, scores, idxs, 0.5), scores, f"n={n} classes={num_classes}")


@requires_cuda
def test_cuda_keep_mask_has_no_host_sync():
    b, levels, per_level = 2, 5, 1000
    n = levels * per_level
    boxes = torch.stack([box_set("clustered", n, i, max_coord=800.0) for i in range(b)]).cuda()
    scores = torch.rand(b, n).cuda()
    idxs = torch.arange(levels).repeat_interleave(per_level).repeat(b, 1).cuda()
    valid = (torch.rand(b, n) > 0.1).cuda()
    nms_keep_mask(boxes, scores, 0.7, idxs, valid)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep = nms_keep_mask(boxes, scores, 0.7, idxs, valid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = nms_keep_mask_ref(boxes.cpu(), scores.cpu(), 0.7, idxs.cpu(), valid.cpu())
    assert torch.equal(keep.cpu(), ref)


@requires_cuda
def test_cuda_100k_boxes_chunked():
    n = 100_000  # 13 chunks of 8192
    boxes = box_set("clustered", n, 2, max_coord=4000.0)
    scores = scores_for(n, 2)
    got = nms(boxes.cuda(), scores.cuda(), 0.7)
    assert torch.equal(got.cpu(), torchvision.ops.nms(boxes, scores, 0.7))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cuda_dtypes(dtype):
    boxes = box_set("clustered", 6000, 9, max_coord=1000.0).to(dtype)
    scores = scores_for(6000, 9)
    idxs = torch.randint(0, 10, (6000,), generator=torch.Generator().manual_seed(9))
    got = batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.6)
    ref_boxes = boxes if dtype == torch.float64 else boxes.float()
    assert_same_keep(got, tv_batched(ref_boxes, scores.to(ref_boxes.dtype), idxs, 0.6), scores)
