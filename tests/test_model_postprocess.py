"""Detection post-processing and the box resize of the transform, checked on their own
(against torchvision's ``RoIHeads.postprocess_detections`` and ``resize_boxes``), and,
on CUDA, that the post-processing never syncs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection import transform as tv_transform

from fastmask.models.roi_heads import RoIHeads, RoIHeadsConfig
from fastmask.models.transform import resize_boxes
from helpers import TRITON_DEVICES, assert_close_verbose, requires_cuda


def _inputs(counts, num_classes, sizes, g, device="cpu"):
    """Padded proposals Tensor[B, M, 4] with their counts, and logits and deltas for every
    padded row (the rows past an image's count hold random values the heads must ignore);
    also the per-image lists torchvision takes."""
    m = max(counts)
    props = []
    for h, w in sizes:
        xy = torch.rand(m, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh = torch.rand(m, 2, generator=g) * 60 + 1
        props.append(torch.cat([xy, xy + wh], 1))
    padded = torch.stack(props).to(device)
    logits = (torch.randn(len(counts), m, num_classes, generator=g) * 3).to(device)
    reg = (torch.randn(len(counts), m, 4 * num_classes, generator=g) * 0.3).to(device)
    lists = ([logits[i, :c] for i, c in enumerate(counts)], [reg[i, :c] for i, c in enumerate(counts)],
             [padded[i, :c] for i, c in enumerate(counts)])
    padded_args = (logits.flatten(0, 1), reg.flatten(0, 1), padded, torch.tensor(counts, device=device))
    return padded_args, tuple(torch.cat(t) if j < 2 else t for j, t in enumerate(lists))


def _heads(num_classes, backend, **cfg):
    return RoIHeads(8, num_classes, RoIHeadsConfig(**cfg), backend=backend)


@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + [("triton", d) for d in TRITON_DEVICES])
@pytest.mark.parametrize("detections_per_img,candidates_per_img", [(3, 4096), (100, 4096), (100, 150)])
def test_postprocess_matches_torchvision(backend, device, detections_per_img, candidates_per_img):
    g = torch.Generator().manual_seed(3)
    num_classes, counts, sizes = 6, [50, 0, 35], [(120, 150), (90, 100), (150, 110)]
    padded_args, (logits, reg, props) = _inputs(counts, num_classes, sizes, g, device)
    ours = _heads(num_classes, backend, score_thresh=0.05, nms_thresh=0.5, detections_per_img=detections_per_img,
                  candidates_per_img=candidates_per_img)
    tv = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0),
                               0.05, 0.5, detections_per_img)
    got = ours.postprocess_padded(*padded_args, sizes)
    # torchvision on the same device: the scores are the same softmax op on the same device
    # there, so they must match bitwise (CUDA's softmax rounds differently from the CPU's).
    want = tv.postprocess_detections(logits, reg, props, sizes)
    want_counts = [len(b) for b in want[0]]
    if detections_per_img == 3:  # the cut must bite in the test
        assert want_counts == [3, 0, 3]
    assert got["counts"].tolist() == want_counts
    assert not got["truncated"].any()
    for i, c in enumerate(want_counts):
        # Scores are continuous (no ties), so the order is the same.
        assert torch.equal(got["labels"][i, :c].cpu(), want[2][i].cpu()), f"labels of image {i}"
        assert torch.equal(got["scores"][i, :c].cpu(), want[1][i].cpu()), f"scores of image {i}"
        assert_close_verbose(got["boxes"][i, :c].cpu(), want[0][i].cpu(), 1e-5, 0.0, f"boxes of image {i}")
        # The padding rows are zeros.
        for k in ("boxes", "scores", "labels"):
            assert not got[k][i, c:].any(), f"padding of {k}, image {i}"


def test_postprocess_truncation_flag():
    """With fewer NMS slots than passing candidates, the flag marks the images whose result
    may differ from torchvision's, and only those; where it is clear the result is exact."""
    g = torch.Generator().manual_seed(4)
    num_classes, counts, sizes = 4, [60, 60], [(120, 150), (90, 100)]
    padded_args, (logits, reg, props) = _inputs(counts, num_classes, sizes, g)
    tv = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 100)
    want = tv.postprocess_detections(logits, reg, props, sizes)
    for k, detections in ((20, 100), (20, 3)):
        ours = _heads(num_classes, "torch", score_thresh=0.05, detections_per_img=detections, candidates_per_img=k)
        got = ours.postprocess_padded(*padded_args, sizes)
        for i in range(len(counts)):
            exact = min(len(want[0][i]), detections)
            same = got["counts"][i].item() == exact and torch.equal(got["scores"][i, :exact], want[1][i][:exact])
            assert same or got["truncated"][i], f"image {i}: K={k}, D={detections} differs without the flag"
            if detections == 100:  # 20 candidates cannot fill 100 slots, more than 20 pass
                assert got["truncated"][i]
            else:  # 3 survivors among the best 20 candidates: exact
                assert not got["truncated"][i] and same


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_resize_boxes_bitwise_float32_ratios(dtype):
    """The host-computed ratios give the bits of torchvision's float32 tensor ratios."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        orig = tuple(torch.randint(1, 2000, (2,), generator=g).tolist())
        new = tuple(torch.randint(1, 2000, (2,), generator=g).tolist())
        boxes = (torch.rand(20, 4, generator=g) * 2000).to(dtype)
        ratio = [torch.tensor(float(s), dtype=torch.float32) / torch.tensor(float(o), dtype=torch.float32)
                 for s, o in zip(new, orig)]
        want = boxes * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])  # promotes fp16 to fp32
        got = resize_boxes(boxes, orig, new)
        assert got.dtype == want.dtype and torch.equal(got, want), (orig, new)
        if dtype != torch.float16:
            assert torch.equal(got, tv_transform.resize_boxes(boxes, orig, new))


@requires_cuda
def test_postprocess_host_syncs_cuda():
    """The padded post-processing never blocks the host."""
    g = torch.Generator().manual_seed(5)
    padded_args, _ = _inputs([1000, 1000], 91, [(800, 1199), (750, 1216)], g, "cuda")
    sizes = [(800, 1199), (750, 1216)]
    heads = _heads(91, None).cuda()
    heads.postprocess_padded(*padded_args, sizes)  # warm-up: kernel compilation, cached tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            heads.postprocess_padded(*padded_args, sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs
