"""RPN proposal stage benchmark: 2 images padded to 800x1216 (FPN P2-P6, ~243k anchors each).

Each provider does the whole stage, from the RPN head's logits and deltas and the feature
map shapes to the per-image proposal lists:
- ``torchvision``: its RPN's ``AnchorGenerator`` + ``box_coder.decode`` of every anchor +
  ``filter_proposals`` (per-level top-k, clip, small boxes, score threshold, batched NMS);
- ``torch``: ``AnchorGenerator.geometry`` + ``rpn_proposals(backend="torch")`` (the CPU path);
- ``triton``: ``AnchorGenerator.geometry`` + ``rpn_proposals(backend="triton")`` (fused
  candidate kernel, anchors computed in the kernel, Triton NMS).

Cases: eval (pre-NMS top-k 1000 per level, 1000 kept) and training (2000 / 2000).

Bytes counted (the floor of any provider, see ``fastmask.ops.proposals``): per image the
logits read by the top-k (4 A bytes in fp32), the top-k deltas gathered (16 N) and the
proposals written (20 per kept box, at most ``post_nms_top_n``). That is about 2.3 MB for
the batch, a microsecond of H100 bandwidth: the stage is bound by launches and the top-k,
so ``gbps`` is low for every provider and the speed-up is the number to read.
"""

from __future__ import annotations

import os

import torch

from .common import bench, main, row

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = (4, 8, 16, 32, 64)
NMS_THRESH = 0.7
# (name, padded (h, w), image sizes, pre_nms_top_n, post_nms_top_n)
FULL_CASES = [
    ("800x1216 eval", (800, 1216), [(800, 1199), (760, 1216)], 1000, 1000),
    ("800x1216 train", (800, 1216), [(800, 1199), (760, 1216)], 2000, 2000),
]
QUICK_CASES = [("128x160 eval", (128, 160), [(120, 160), (128, 100)], 100, 100)]
# The interpreter runs every Triton program in Python: a smaller top-k keeps it to seconds.
INTERPRETER_CASES = [("128x160 top-20", (128, 160), [(120, 160), (128, 100)], 20, 50)]


class _ImageList:
    def __init__(self, tensors, image_sizes):
        self.tensors, self.image_sizes = tensors, image_sizes


def make_inputs(padded, image_sizes, device: str, seed: int = 0):
    """Head outputs of a batch: logits [B, A] and deltas [B, A, 4] as an RPN head gives them
    early in training (spread-out scores, deltas of a few tenths)."""
    b = len(image_sizes)
    images = _ImageList(torch.zeros(b, 1, *padded, device=device), image_sizes)
    feats = [torch.zeros(b, 1, -(-padded[0] // s), -(-padded[1] // s), device=device) for s in STRIDES]
    a = sum(f.shape[-2] * f.shape[-1] * 3 for f in feats)
    g = torch.Generator().manual_seed(seed)
    objectness = (torch.randn(b, a, generator=g) * 2).to(device)
    deltas = (torch.randn(b, a, 4, generator=g) * 0.3).to(device)
    return images, feats, objectness, deltas


def proposal_bytes(num_anchors_per_level, batch: int, pre_nms_top_n: int, post_nms_top_n: int) -> int:
    a = sum(num_anchors_per_level)
    n = sum(min(pre_nms_top_n, c) for c in num_anchors_per_level)
    return batch * (4 * a + 16 * n + 20 * min(post_nms_top_n, n))


def _providers(device: str, interpreter: bool, pre_nms_top_n: int, post_nms_top_n: int):
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    from fastmask.ops import AnchorGenerator
    from fastmask.ops.proposals import rpn_proposals

    tv = RegionProposalNetwork(TVAnchorGenerator(FPN_SIZES, FPN_RATIOS), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
                               dict(training=pre_nms_top_n, testing=pre_nms_top_n),
                               dict(training=post_nms_top_n, testing=post_nms_top_n), NMS_THRESH).eval()

    def torchvision_stage(images, feats, objectness, deltas):
        anchors = tv.anchor_generator(images, feats)
        num = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
        proposals = tv.box_coder.decode(deltas.reshape(-1, 4), anchors).view(len(anchors), -1, 4)
        return tv.filter_proposals(proposals, objectness.reshape(-1, 1), images.image_sizes, num)

    gen = AnchorGenerator(FPN_SIZES, FPN_RATIOS)

    def fastmask_stage(backend):
        def stage(images, feats, objectness, deltas):
            geometry = gen.geometry(images, feats)
            return rpn_proposals(objectness, deltas, geometry, images.image_sizes, pre_nms_top_n=pre_nms_top_n,
                                 post_nms_top_n=post_nms_top_n, nms_thresh=NMS_THRESH, backend=backend)
        return stage

    yield "torchvision", torchvision_stage
    yield "torch", fastmask_stage("torch")
    if device.startswith("cuda") or interpreter:
        yield "triton", fastmask_stage("triton")


def run(quick: bool, device: str) -> list[dict]:
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    on_cpu = not device.startswith("cuda")
    cases = QUICK_CASES if quick else FULL_CASES
    rep = dict(warmup_ms=10, rep_ms=50, min_runs=3) if quick else {}
    rows = []
    for name, padded, image_sizes, pre, post in cases:
        for provider, fn in _providers(device, interpreter, pre, post):
            case = (name, padded, image_sizes, pre, post)
            if provider == "triton" and on_cpu:
                case = INTERPRETER_CASES[0]
                fn = dict(_providers(device, interpreter, case[3], case[4]))["triton"]
            images, feats, objectness, deltas = make_inputs(case[1], case[2], device)
            nums = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
            t = bench(lambda: fn(images, feats, objectness, deltas), device=device,
                      **(dict(warmup_ms=0, rep_ms=0, min_runs=2) if provider == "triton" and on_cpu else rep))
            rows.append(row("rpn_proposals", f"{case[0]} (pre {case[3]}, post {case[4]})", provider,
                            objectness.dtype, t, proposal_bytes(nums, len(case[2]), case[3], case[4])))
    return rows


if __name__ == "__main__":
    main(run, __doc__)
