"""NMS against torchvision: reference (backend="torch") and Triton kernels (interpreter / CUDA).

Both backends round IoU as torchvision's CPU kernel does, so the kept indices must equal
torchvision's exactly, also for IoUs exactly at the threshold: ``nms`` against
``torchvision.ops.nms``, ``batched_nms`` against ``torchvision.ops.nms`` run class by class
(``tv_batched``). torchvision's CPU sort is stable, as ours: tied scores are resolved by input
order on both sides. The only freedom left is the order of tied scores in ``batched_nms``'s
output (torchvision's final sort is not stable); see ``assert_same_keep``.
"""

import importlib

import pytest
import torch
import torchvision
from helpers import BACKEND_IDS, BACKENDS, TRITON_DEVICES, random_boxes, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from fastmask.ops import batched_nms, nms, nms_keep_mask
from fastmask.ops.nms import (keep_mask_presorted_triton, keep_mask_triton, kept_indices_triton, nms_keep_mask_ref,
                              nms_ref)

nms_module = importlib.import_module("fastmask.ops.nms")  # the module (the package exports the op)
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
@pytest.mark.parametrize("chunk,window", [(64, None), (128, None), (None, 64), (256, 64)])
def test_triton_chunks_write_everything(device, chunk, window):
    """Small chunks force the cross-chunk pass and runs that span chunks, small windows the
    push of each window's kept rows into the later columns; outputs and scratch are
    poisoned, so a position left unwritten (or an unwritten mask word read) shows. Two
    images, padding, and one class or three; sorted and presorted paths."""
    b, n = 2, 230
    boxes = torch.stack([box_set("clustered", n, 3 + i) for i in range(b)])
    scores = torch.stack([scores_for(n, 3 + i) for i in range(b)])
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(b, n, generator=g) > 0.1
    for idxs in (None, torch.randint(0, 3, (b, n), generator=g)):
        keep = keep_mask_triton(boxes.to(device), scores.to(device), 0.5, None if idxs is None else idxs.to(device),
                                valid.to(device), max_chunk=chunk, max_window=window, poison=True)
        assert keep.dtype == torch.bool and keep.shape == (b, n)
        assert keep.view(torch.uint8).max() <= 1, "positions left unwritten"
        for i in range(b):
            v = valid[i].nonzero().squeeze(1)
            cls = torch.zeros(n, dtype=torch.int64) if idxs is None else idxs[i]
            expected = v[tv_batched(boxes[i][v], scores[i][v], cls[v], 0.5)]
            assert set(keep[i].cpu().nonzero().squeeze(1).tolist()) == set(expected.tolist()), \
                f"chunk={chunk} window={window} classes={idxs is not None} image {i}"
        # The same boxes presorted (by class, then decreasing score, per image).
        cls = torch.zeros(b, n, dtype=torch.int64) if idxs is None else idxs
        order = torch.stack([torch.sort(cls[i][torch.sort(scores[i], descending=True, stable=True).indices],
                                        stable=True).indices for i in range(b)])
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices.gather(1, order)
        pre = keep_mask_presorted_triton(boxes.gather(1, order[..., None].expand(b, n, 4)).to(device),
                                         cls.gather(1, order).to(device), valid.gather(1, order).to(device), 0.5,
                                         max_chunk=chunk, max_window=window, poison=True)
        assert pre.view(torch.uint8).max() <= 1, "presorted: positions left unwritten"
        assert torch.equal(pre.cpu(), keep.cpu().gather(1, order)), f"presorted chunk={chunk} window={window}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("chunk,window", [(64, None), (None, 64), (256, 64)])
def test_triton_long_runs_over_chunks_and_windows(device, chunk, window):
    """Long runs over many small chunks or windows: every chunk's cross-chunk pass has one
    program per (64 columns, earlier chunk), every window's push one per (64 later words,
    rows of the window), their words ORed together atomically; one class (every program
    works), a few classes and 80 (most exit at once), against torchvision."""
    n = 700
    boxes, scores = box_set("clustered", n, 13), scores_for(n, 13, ties=True)
    for classes in (1, 3, 80):
        idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(classes))
        got = kept_indices_triton(boxes.to(device), scores.to(device), 0.5, idxs.to(device), max_chunk=chunk,
                                  max_window=window, poison=True)
        assert_same_keep(got, tv_batched(boxes, scores, idxs, 0.5), scores, f"{classes} classes")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_tree_or_path(device):
    """The GPU's OR reduction (``tl.reduce``) on a small case; the interpreter defaults to the
    bit-wise path because its ``tl.reduce`` runs element by element. Both ways of the reduce
    kernel's push (unrolled, as on the GPU up to W = 128, or a loop skipping row groups)."""
    n = 90
    boxes, scores = box_set("clustered", n, 4).to(device), scores_for(n, 4).to(device)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.5)] = True
    for by_bits in (False, True):
        for unroll in (False, True):  # the reduce kernel's two ways of pushing kept rows
            keep = keep_mask_triton(boxes[None], scores[None], 0.5, None, None, poison=True, or_by_bits=by_bits,
                                    unroll=unroll)
            assert torch.equal(keep[0].cpu(), expected), (by_bits, unroll)


# --------------------------------------------------------------------------- Triton entry points


def _batch(b, n, seed, kind="clustered", ties=False):
    boxes = torch.stack([box_set(kind, n, seed + i) for i in range(b)])
    scores = torch.stack([scores_for(n, seed + i, ties=ties) for i in range(b)])
    return boxes, scores


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_keep_mask_triton_matches_reference(device):
    """``keep_mask_triton`` against the reference over what the sort key must get right:
    batches, padding, many classes, classes that only differ above the key's class bits
    (int32/int64: compared pair by pair), narrow and negative classes, tied, negative and
    signed-zero scores, strided inputs."""
    g = torch.Generator().manual_seed(21)
    b, n = 3, 150
    boxes, scores = _batch(b, n, 30, ties=True)
    valid = torch.rand(b, n, generator=g) > 0.15
    valid[1, :40] = False
    boxes[~valid] = float("nan")  # padding holds garbage
    small = torch.randint(0, 4, (b, n), generator=g)
    cases = {
        "no classes": None,
        "int64 classes": small,
        "80 classes": torch.randint(0, 80, (b, n), generator=g),
        # Equal low 30 bits, different classes: must not suppress each other.
        "int64 beyond the key's bits": small * (2**40 + 2**30) - 2**35,
        "int32 beyond the key's bits": (small * 2**30 - 7).to(torch.int32),
        "int16 negative": (small - 2).to(torch.int16),
        "uint8": (small * 60).to(torch.uint8),
        "broadcast (stride 0)": torch.arange(n).remainder(5).expand(b, n),
    }
    for what, idxs in cases.items():
        expected = nms_keep_mask_ref(boxes, scores, 0.5, idxs, valid)
        got = keep_mask_triton(boxes.to(device), scores.to(device), 0.5, None if idxs is None else idxs.to(device),
                               valid.to(device), poison=True)
        assert got.dtype == torch.bool and got.shape == (b, n) and got.device.type == device
        assert torch.equal(got.cpu(), expected), what
    # Scores around zero: -0.0 ties with +0.0 (input order decides), negatives sort last.
    zs = torch.tensor([0.0, -0.0, -1.0, 0.5, -0.0, 0.0, -3e-39, 2.0])[torch.randint(0, 8, (b, n), generator=g)]
    same = torch.tensor([1.0, 1.0, 5.0, 5.0]).repeat(b, n, 1) + torch.rand(b, n, 1, generator=g) * 0.5
    for bx in (boxes, same):
        expected = nms_keep_mask_ref(bx, zs, 0.6, small, valid)
        got = keep_mask_triton(bx.to(device), zs.to(device), 0.6, small.to(device), valid.to(device))
        assert torch.equal(got.cpu(), expected), "signed zeros"
    # Strided scores and boxes (views of larger tensors), no padding.
    wide_s = torch.zeros(b, n, 3)
    wide_s[..., 1] = scores
    wide_b = torch.zeros(b, n, 4, 2)
    wide_b[..., 0] = torch.nan_to_num(boxes, nan=1.0)
    expected = nms_keep_mask_ref(wide_b[..., 0], wide_s[..., 1], 0.5, small)
    got = keep_mask_triton(wide_b[..., 0].to(device), wide_s[..., 1].to(device), 0.5, small.to(device), None)
    assert torch.equal(got.cpu(), expected), "strided inputs"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_keep_mask_triton_dtypes(device, dtype):
    """fp16/bf16/fp64 boxes and scores (fp64 scores are ranked by a first sort), tied
    scores, against the reference; a small chunk adds the cross-chunk pass."""
    b, n = 2, 140
    boxes, scores = _batch(b, n, 40, ties=True)
    boxes, scores = (boxes * 3).to(dtype), scores.to(dtype)
    idxs = torch.randint(0, 3, (b, n), generator=torch.Generator().manual_seed(4))
    valid = torch.rand(b, n, generator=torch.Generator().manual_seed(5)) > 0.1
    expected = nms_keep_mask_ref(boxes, scores, 0.5, idxs, valid)
    for chunk in (None, 64):
        got = keep_mask_triton(boxes.to(device), scores.to(device), 0.5, idxs.to(device), valid.to(device),
                               max_chunk=chunk, poison=True)
        assert torch.equal(got.cpu(), expected), f"chunk={chunk}"
    # fp64 scores that fp32 cannot tell apart: their order still decides.
    close = torch.full((1, n), 0.5, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)[None] * 1e-12
    same = torch.tensor([0.0, 0.0, 4.0, 4.0], dtype=dtype).repeat(1, n, 1)
    expected = nms_keep_mask_ref(same, close, 0.5)
    assert torch.equal(keep_mask_triton(same.to(device), close.to(device), 0.5, None, None).cpu(), expected)
    assert expected[0, -1] and expected.sum() == 1


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kept_indices_triton_matches_reference(device):
    """``kept_indices_triton``: the indices ``nms_ref`` returns, in its order (by decreasing
    score, ties in input order), with and without classes, fp32 and fp64 scores, small chunks."""
    n = 260
    for seed, (kind, ties, idxs, dtype, chunk) in enumerate([
            ("clustered", False, None, torch.float32, None),
            ("grid", True, None, torch.float32, 64),
            ("clustered", True, torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(1)), torch.float32,
             None),
            ("spread", True, torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(2)), torch.float32,
             128),
            ("clustered", True, torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(3)),
             torch.float64, 64)]):
        boxes, scores = box_set(kind, n, 50 + seed).to(dtype), scores_for(n, 50 + seed, ties=ties).to(dtype)
        expected = nms_ref(boxes, scores, 0.5, idxs)
        got = kept_indices_triton(boxes.to(device), scores.to(device), 0.5, None if idxs is None else idxs.to(device),
                                  max_chunk=chunk, poison=True)
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), expected), f"case {seed}"
    empty = kept_indices_triton(torch.zeros(0, 4, device=device), torch.zeros(0, device=device), 0.5, None)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def rpn_like(b, levels, per_level, seed, pad=0.2):
    """The RPN's candidates: per image and level, the top scores (sorted), sigmoid applied
    (saturated logits tie at 1.0), padding where the candidate box is too small."""
    g = torch.Generator().manual_seed(seed)
    n = levels * per_level
    boxes = torch.stack([box_set("clustered", n, seed + i) for i in range(b)])
    logits = torch.randn(b, levels, per_level, generator=g) * 6
    logits[:, :, :3] = 40.0  # sigmoid == 1.0: tied scores
    scores = torch.sigmoid(logits.sort(dim=2, descending=True).values).reshape(b, n)
    groups = torch.arange(levels).repeat_interleave(per_level).expand(b, n)
    valid = torch.rand(b, n, generator=g) > pad
    boxes[~valid] = float("nan")
    return boxes, scores, groups, valid


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_keep_mask_presorted_matches_reference(device):
    """The RPN's presorted path: several images and levels, padding, an image with no valid
    box, tied scores; the same mask as ``keep_mask_triton`` and the reference."""
    boxes, scores, groups, valid = rpn_like(3, 4, 70, 60)
    valid[2] = False
    expected = nms_keep_mask_ref(boxes, scores, 0.7, groups, valid)
    assert torch.equal(keep_mask_triton(boxes.to(device), scores.to(device), 0.7, groups.to(device),
                                        valid.to(device)).cpu(), expected)
    for chunk, window in ((None, None), (128, None), (None, 64)):
        got = keep_mask_presorted_triton(boxes.to(device), groups.to(device), valid.to(device), 0.7, max_chunk=chunk,
                                         max_window=window, poison=True)
        assert got.dtype == torch.bool and got.shape == groups.shape
        assert torch.equal(got.cpu(), expected), f"chunk={chunk} window={window}"
    # No padding, one level per image, and levels not all present (groups 0, 2, 5).
    boxes, scores, groups, _ = rpn_like(2, 3, 50, 61)
    groups = torch.tensor([0, 2, 5]).repeat_interleave(50).expand(2, 150)
    expected = nms_keep_mask_ref(boxes, scores, 0.6, groups)
    assert torch.equal(keep_mask_presorted_triton(boxes.to(device), groups.to(device), None, 0.6).cpu(), expected)


# --------------------------------------------------------------------------- the CPU path


@pytest.mark.parametrize("tile", [16, 128])
@pytest.mark.parametrize("kind", ["spread", "clustered", "grid"])
def test_cpu_path_matches_reference(monkeypatch, tile, kind):
    """backend="torch" runs greedy_sorted_cpu (groups padded into rows, every group's s-th tile
    resolved in one step against its kept boxes); the reference is its spec: the same kept
    boxes. Groups of very different lengths (one of about half the boxes, many short, five of
    one box), ties, several steps per group (tiles of 16), fp16/fp32/fp64 boxes, and the
    batched keep mask with invalid boxes."""
    monkeypatch.setattr(nms_module, "CPU_TILE", tile)
    reference = nms_module._greedy_sorted_ref
    n = 400
    boxes, scores = box_set(kind, n, 3), scores_for(n, 3, ties=kind != "spread")
    g = torch.Generator().manual_seed(4)
    idxs = torch.where(torch.rand(n, generator=g) < 0.5, 0, torch.randint(1, 40, (n,), generator=g))
    idxs[:5] = torch.arange(100, 105)
    for thr in (0.3, 0.5, 0.7):
        for dtype in (torch.float16, torch.float32, torch.float64):
            b = boxes.to(dtype)
            assert torch.equal(batched_nms(b, scores, idxs, thr, backend="torch"), nms_ref(b, scores, thr, idxs))
            assert torch.equal(nms(b, scores, thr, backend="torch"), nms_ref(b, scores, thr))
    expected = nms_ref(boxes, scores, 0.5, idxs)
    monkeypatch.setattr(nms_module, "PADDED_ROOM", 0)  # past the padding's room: the reference runs
    monkeypatch.setattr(nms_module, "PADDED_SLACK", 0)
    calls = []
    monkeypatch.setattr(nms_module, "_greedy_sorted_ref", lambda *a: calls.append(1) or reference(*a))
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5, backend="torch"), expected) and calls == [1]
    monkeypatch.undo()
    monkeypatch.setattr(nms_module, "CPU_TILE", tile)
    valid = torch.rand(2, n // 2, generator=g) > 0.2
    b2, s2, i2 = boxes.view(2, n // 2, 4), scores.view(2, n // 2), idxs.view(2, n // 2)
    for idx in (i2, None):
        assert torch.equal(nms_keep_mask(b2, s2, 0.5, idx, valid, backend="torch"),
                           nms_keep_mask_ref(b2, s2, 0.5, idx, valid))


def test_cpu_path_threshold_is_the_fp64_test():
    """The CPU path compares IoUs in their dtype with the largest value of that dtype at most
    the threshold: the same decision as torchvision's float64 comparison."""
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        for thr in (0.5, 0.7, 1 / 3, 0.3, float(torch.tensor(0.7).float()), 0.0, 1.0):
            t = nms_module._threshold_for(dtype, thr)
            near = torch.tensor(thr, dtype=dtype) + torch.arange(-64, 65, dtype=dtype) * torch.finfo(dtype).eps / 4
            values = torch.cat([near, torch.rand(1000, generator=g, dtype=torch.float64).to(dtype)])
            assert torch.equal(values > t, values.double() > thr), (dtype, thr)


def test_fp32_decision_value_is_torchvisions_test():
    """``inter > m * union`` (exact in fp64) decides as ``float32(inter / union) > thr``, for
    thresholds at and around fractions an fp32 quotient can hit."""
    from fastmask.kernels.nms import fp32_decision_value

    g = torch.Generator().manual_seed(8)
    union = torch.randint(1, 2**12, (200_000,), generator=g).float()
    inter = (torch.rand(200_000, generator=g) * union).floor()
    quotient = (inter / union).double()
    for thr in (0.5, 1 / 3, 0.7, 0.3, 0.33333334, 0.3333334, float(torch.tensor(0.7).float()), 0.0, -0.25, 1.0):
        m = fp32_decision_value(thr)
        assert torch.equal(inter.double() > m * union.double(), quotient > thr), thr
    assert fp32_decision_value(1e39) == float("inf") and fp32_decision_value(-1e39) == float("-inf")


# --------------------------------------------------------------------------- launch count


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops run while active, except inside a Triton launch (the
    interpreter's own tensor copies)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


# Ops that launch no kernel: allocations without a fill, views, metadata; and the read of a
# scalar to the host (a copy and a sync, checked for separately).
NO_LAUNCH = ("aten.empty", "aten.empty_like", "aten.empty_strided", "aten.sym_size", "aten.sym_stride",
             "aten.sym_numel", "aten.sym_storage_offset", "aten.is_contiguous", "aten.lift_fresh",
             "aten._local_scalar_dense")


def _launches(monkeypatch, fn, run_kernels=True):
    """(kernel-launching aten ops + Triton kernel names, every aten op name, the result) of
    ``fn()``; ``run_kernels=False`` records the Triton launches without running them."""
    from triton.runtime.interpreter import InterpretedFunction

    recorder, kernels = _OpRecorder(), []
    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        kernels.append(self.fn.__name__)
        recorder.paused = True
        try:
            return real(self, *args, **kwargs) if run_kernels else None
        finally:
            recorder.paused = False

    monkeypatch.setattr(InterpretedFunction, "run", run)
    with recorder:
        out = fn()
    monkeypatch.undo()
    names = [str(f.overloadpacket) for f in recorder.ops]
    aten = [str(f) for f in recorder.ops if not f.is_view and str(f.overloadpacket) not in NO_LAUNCH]
    return aten + kernels, names, out


@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="counts launches through Triton's interpreter")
def test_keep_mask_launch_count(monkeypatch):
    """At 1k boxes, 1 and 80 classes: at most 6 device launches for the keep mask (aten ops
    that launch a kernel plus Triton launches), no host sync, no data-dependent shape."""
    n = 1000
    boxes, scores = box_set("clustered", n, 70, max_coord=800.0), scores_for(n, 70)
    counts = {}
    for classes in (1, 80):
        idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(classes))
        launches, names, keep = _launches(monkeypatch,
                                          lambda: keep_mask_triton(boxes[None], scores[None], 0.5, idxs[None], None))
        counts[classes] = launches
        assert len(launches) <= 6, launches
        syncs = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.index"}
        assert not syncs & set(names), names
        assert torch.equal(keep[0], nms_keep_mask_ref(boxes, scores, 0.5, idxs))
    # key kernel, sort, mask kernel, reduce kernel.
    assert counts[1] == counts[80] == ["aten.sort.stable", "_nms_key_kernel", "_nms_mask_kernel",
                                      "_nms_reduce_kernel"], counts
    # The presorted path: the two NMS kernels only.
    boxes, scores, groups, valid = rpn_like(2, 5, 100, 71)
    launches, names, _ = _launches(monkeypatch, lambda: keep_mask_presorted_triton(boxes, groups, valid, 0.7))
    assert launches == ["_nms_mask_kernel", "_nms_reduce_kernel"], launches


@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="counts launches through Triton's interpreter")
def test_launch_count_at_full_sizes(monkeypatch):
    """The host glue at 8192, 20k and 40k boxes, with the kernels recorded but not run: 8192
    boxes are one window (4 launches, 5 for kept indices: one more sort, plus the count read
    at the end); 20k boxes are one chunk of 3 windows of 8192, a push and a walk each after
    the first; 40k boxes take chunks of 8192, 3 launches each after the first, and one
    gather of the sorted boxes; past one window, one zero fill of the words the cross-chunk
    and push programs OR into."""
    g = torch.Generator().manual_seed(9)
    for n, chunks, windows in ((8192, 1, 1), (20_000, 1, 3), (40_000, 5, 5)):
        boxes, scores = random_boxes(n, 800.0, generator=g), torch.rand(n, generator=g)
        idxs = torch.randint(0, 80, (n,), generator=g)
        launches, names, _ = _launches(
            monkeypatch, lambda: keep_mask_triton(boxes[None], scores[None], 0.7, idxs[None], None), run_kernels=False)
        several = 3 * (chunks - 1) + (chunks > 1) + 2 * (windows - chunks) + (windows > 1)
        assert len(launches) == 2 + 2 + several, launches
        assert launches.count("_nms_cross_kernel") == chunks - 1
        assert launches.count("_nms_push_kernel") == windows - chunks
        assert launches.count("_nms_reduce_kernel") == windows
        assert launches.count("aten.zeros.default") == (windows > 1)
        assert not {"aten._local_scalar_dense", "aten.nonzero"} & set(names)
        launches, names, _ = _launches(monkeypatch, lambda: kept_indices_triton(boxes, scores, 0.7, idxs),
                                       run_kernels=False)
        assert len(launches) == 2 + 2 + several + 1, launches
        assert names.count("aten._local_scalar_dense") == 1 and "aten.nonzero" not in names


@pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="records launches through Triton's interpreter")
def test_reduce_widths_are_bucketed(monkeypatch):
    """The reduce kernel's W (a constexpr: one compiled variant each) is the smallest of
    W_BUCKETS that holds a window: 2 variants per flag set from 1 box to past one chunk,
    instead of one per power of two (kernels recorded, not run)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastmask.kernels.nms import W_BUCKETS

    widths = {}

    def run(self, *args, **kwargs):
        if self.fn.__name__ == "_nms_reduce_kernel":
            widths.setdefault(n, set()).add(kwargs["W"])

    monkeypatch.setattr(InterpretedFunction, "run", run)
    g = torch.Generator().manual_seed(12)
    expected = {5: 16, 1024: 16, 1025: 128, 8192: 128, 8193: 128, 32768: 128, 40000: 128}
    for n in expected:
        keep_mask_triton(random_boxes(n, 800.0, generator=g)[None], torch.rand(1, n, generator=g), 0.5, None, None)
    assert widths == {n: {w} for n, w in expected.items()}, widths
    assert set(expected.values()) == set(W_BUCKETS)
    for bad in (96, 16384):  # windows the walk cannot take: not whole words, wider than W_BUCKETS
        with pytest.raises(ValueError, match="max_window"):
            keep_mask_triton(random_boxes(300, 800.0, generator=g)[None], torch.rand(1, 300, generator=g), 0.5, None,
                             None, max_window=bad)


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
    """100k boxes: 13 chunks of 8192, the same indices as torchvision, and device memory
    within the stated bound (``scratch_bytes``: 8 MiB of bits + 64 bytes per box)."""
    from fastmask.kernels.nms import scratch_bytes

    n = 100_000
    boxes = box_set("clustered", n, 2, max_coord=4000.0)
    scores = scores_for(n, 2)
    boxes_d, scores_d = boxes.cuda(), scores.cuda()
    nms(boxes_d, scores_d, 0.7)  # compile first
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = nms(boxes_d, scores_d, 0.7)
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(got.cpu(), torchvision.ops.nms(boxes, scores, 0.7))
    assert peak <= scratch_bytes(n) + 8 * n, f"{peak} bytes at peak, bound {scratch_bytes(n) + 8 * n}"


def test_limits_stated_and_refused():
    """The kernels' limits: at most 2**31 - 1 boxes per call (refused before anything is
    allocated: the inputs here are expanded, so they take no memory), and scratch memory
    that stays bounded as N grows past one chunk."""
    from fastmask.kernels import nms as nms_kernels

    huge = torch.zeros(1, 1).expand(1, 2**31)
    with pytest.raises(ValueError, match=r"2147483648 boxes.*at most 2147483647"):
        nms_kernels.keep_mask(torch.zeros(1, 1, 4).expand(1, 2**31, 4), huge, 0.5, None, None)
    with pytest.raises(ValueError, match="at most"):
        nms_kernels.keep_mask_presorted(torch.zeros(1, 1, 4).expand(1, 2**31, 4),
                                        torch.zeros(1, 1, dtype=torch.int64).expand(1, 2**31), None, 0.5)
    mib = 2**20
    assert nms_kernels.scratch_bytes(20_000) <= 50 * mib + 64 * 20_000  # one chunk: T x ceil(T / 64) words
    assert nms_kernels.scratch_bytes(100_000) <= 8 * mib + 64 * 100_000  # chunks of 8192: 8 MiB of bits
    assert nms_kernels.scratch_bytes(10**7) - 64 * 10**7 == nms_kernels.scratch_bytes(10**5) - 64 * 10**5


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cuda_dtypes(dtype):
    boxes = box_set("clustered", 6000, 9, max_coord=1000.0).to(dtype)
    scores = scores_for(6000, 9)
    idxs = torch.randint(0, 10, (6000,), generator=torch.Generator().manual_seed(9))
    got = batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.6)
    ref_boxes = boxes if dtype == torch.float64 else boxes.float()
    assert_same_keep(got, tv_batched(ref_boxes, scores.to(ref_boxes.dtype), idxs, 0.6), scores)
