"""Detection post-processing and the box resize of the transform, checked on their own
(against torchvision's ``RoIHeads.postprocess_detections`` and ``resize_boxes``), and,
on CUDA, the number of host syncs of the post-processing."""

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
    props = []
    for n, (h, w) in zip(counts, sizes):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh = torch.rand(n, 2, generator=g) * 60 + 1
        props.append(torch.cat([xy, xy + wh], 1).to(device))
    n = sum(counts)
    logits = (torch.randn(n, num_classes, generator=g) * 3).to(device)
    reg = (torch.randn(n, 4 * num_classes, generator=g) * 0.3).to(device)
    return logits, reg, props


def _heads(num_classes, backend, **cfg):
    return RoIHeads(8, num_classes, RoIHeadsConfig(**cfg), backend=backend)


@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + [("triton", d) for d in TRITON_DEVICES])
@pytest.mark.parametrize("detections_per_img", [3, 100])
def test_postprocess_detections_matches_torchvision(backend, device, detections_per_img):
    g = torch.Generator().manual_seed(3)
    num_classes, counts, sizes = 6, [50, 0, 35], [(120, 150), (90, 100), (150, 110)]
    logits, reg, props = _inputs(counts, num_classes, sizes, g, device)
    ours = _heads(num_classes, backend, score_thresh=0.05, nms_thresh=0.5, detections_per_img=detections_per_img)
    tv = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0),
                               0.05, 0.5, detections_per_img)
    got = ours.postprocess_detections(logits, reg, props, sizes)
    # torchvision on the same device: the scores are the same softmax op on the same device
    # there, so they must match bitwise (CUDA's softmax rounds differently from the CPU's).
    want = tv.postprocess_detections(logits, reg, props, sizes)
    if detections_per_img == 3:  # the cut must bite in the test
        assert [len(b) for b in want[0]] == [3, 0, 3]
    for i in range(len(counts)):
        # Scores are continuous (no ties), so the order is the same.
        assert torch.equal(got[2][i].cpu(), want[2][i].cpu()), f"labels of image {i}"
        assert torch.equal(got[1][i].cpu(), want[1][i].cpu()), f"scores of image {i}"
        assert_close_verbose(got[0][i].cpu(), want[0][i].cpu(), 1e-5, 0.0, f"boxes of image {i}")


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
def test_postprocess_detections_host_syncs_cuda():
    """Two host syncs: the candidate count and the output lengths (nothing else blocks)."""
    g = torch.Generator().manual_seed(5)
    counts, sizes = [1000, 1000], [(800, 1199), (750, 1216)]
    logits, reg, props = _inputs(counts, 91, sizes, g, "cuda")
    heads = _heads(91, None).cuda()
    heads.postprocess_detections(logits, reg, props, sizes)  # warm-up: kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            heads.postprocess_detections(logits, reg, props, sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2, syncs
