"""NMS benchmark: batched NMS of 1k-100k detection-like boxes, and the RPN's batched case.

Cases: 1k, 5k, 20k and 100k boxes with 1 or 80 classes at IoU 0.5 and 0.7 (``batched_nms``;
with one class it is plain ``nms``), plus the RPN case: 2 images x 5 FPN levels x 1000
proposals, NMS per (image, level) at IoU 0.7.

Providers:
- ``torchvision``: ``torchvision.ops.batched_nms`` (``nms`` for one class); for the RPN case
  a loop over images as torchvision's RPN does;
- ``reference``: ``fastmask.ops.nms.nms_ref`` (``nms_keep_mask_ref`` for the RPN case), the
  spec. Its work grows as N x kept and it synchronises with the host once per tile of
  ``REF_TILE`` boxes, so it is skipped above ``REFERENCE_MAX_BOXES`` (said in the table);
- ``torch`` (CPU only): ``batched_nms(..., backend="torch")`` (``nms_keep_mask`` for the RPN
  case), the CPU path;
- ``triton``: ``batched_nms(..., backend="triton")`` (``nms_keep_mask`` for the RPN case).

Bytes counted (``gbps``): the inputs read once and the result written once,
``N * (16 + 4 + 8) + N * 8`` bytes (fp32 boxes, fp32 scores, int64 classes; at most N int64
indices). NMS is bound by its sequential greedy walk and by the O(N^2) IoU tests, not by
memory, so this is a small fraction of the bandwidth; it is given for comparison only.
``--quick`` runs on the CPU in seconds: small sizes. The CPU run stops at 20k boxes.
"""

from __future__ import annotations

import os

import torch

from .common import bench, main, row

FULL_SIZES = [1_000, 5_000, 20_000, 100_000]
CPU_SIZES = [1_000, 5_000, 20_000]  # the CPU run (torchvision's CPU NMS takes seconds at 100k)
QUICK_SIZES = [300, 1_000]
CLASSES = [1, 80]
THRESHOLDS = [0.5, 0.7]
# The reference is O(N * kept) with a host sync per tile; above this it takes seconds.
REFERENCE_MAX_BOXES = 20_000
RPN = (2, 5, 1000)  # images, levels, proposals per level
IMAGE = (800, 1333)


def make_boxes(n: int, seed: int, image=IMAGE, objects_per_box: float = 1 / 20):
    """Detection-like fp32 boxes in an ``image`` (h, w): jittered copies of ``n / 20`` object
    boxes of 16-400 px (jitter proportional to the size, so IoUs spread over [0, 1]), and
    uniform scores."""
    g = torch.Generator().manual_seed(seed)
    h, w = image
    k = max(1, int(n * objects_per_box))
    size = 16 + torch.rand(k, 2, generator=g) * 384
    xy = torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - size).clamp(min=1)
    pick = torch.randint(0, k, (n,), generator=g)
    jitter = torch.randn(n, 4, generator=g) * 0.15 * size[pick].repeat(1, 2)
    b = torch.cat([xy[pick], xy[pick] + size[pick]], dim=1) + jitter
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 1)
    return b, torch.rand(n, generator=g)


def _nbytes(n: int) -> int:
    return n * (16 + 4 + 8) + n * 8


def run(quick: bool, device: str) -> list[dict]:
    import torchvision

    from fastmask.ops import batched_nms, nms_keep_mask
    from fastmask.ops.nms import nms_keep_mask_ref, nms_ref

    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    # Triton on the GPU; on the CPU only through the interpreter and not in --quick mode.
    with_triton = device.startswith("cuda") or (interpreter and not quick)
    sizes = QUICK_SIZES if quick else (FULL_SIZES if device.startswith("cuda") else CPU_SIZES)
    rep = dict(warmup_ms=10, rep_ms=50) if quick else {}
    rows = []
    for n in sizes:
        boxes, scores = make_boxes(n, n)
        boxes, scores = boxes.to(device), scores.to(device)
        for num_classes in CLASSES:
            idxs = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(1)).to(device)
            for thr in THRESHOLDS:
                case = f"{n} boxes, {num_classes} class{'es' if num_classes > 1 else ''}, iou {thr}"
                provs = {}
                if num_classes == 1:
                    provs["torchvision"] = lambda: torchvision.ops.nms(boxes, scores, thr)
                else:
                    provs["torchvision"] = lambda: torchvision.ops.batched_nms(boxes, scores, idxs, thr)
                if not device.startswith("cuda"):
                    provs["torch"] = lambda: batched_nms(boxes, scores, idxs, thr, backend="torch")
                if n <= REFERENCE_MAX_BOXES:
                    provs["reference"] = lambda: nms_ref(boxes, scores, thr, idxs if num_classes > 1 else None)
                if with_triton:
                    provs["triton"] = lambda: batched_nms(boxes, scores, idxs, thr, backend="triton")
                for name, fn in provs.items():
                    rows.append(row("nms", case, name, torch.float32, bench(fn, device=device, **rep), _nbytes(n)))
    # The RPN: NMS per (image, level), padded batch in one call.
    b, levels, per = RPN
    if quick:
        b, levels, per = 2, 5, 100
    n = levels * per
    made = [make_boxes(n, 100 + i) for i in range(b)]
    boxes = torch.stack([m[0] for m in made]).to(device)
    scores = torch.stack([m[1] for m in made]).to(device)
    lvl = torch.arange(levels).repeat_interleave(per).to(device)
    lvl_b = lvl.repeat(b, 1)
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    case = f"RPN {b} images x {levels} levels x {per}, iou 0.7"

    def tv_rpn():
        return [torchvision.ops.batched_nms(boxes[i], scores[i], lvl, 0.7) for i in range(b)]

    provs = {"torchvision": tv_rpn, "reference": lambda: nms_keep_mask_ref(boxes, scores, 0.7, lvl_b, valid)}
    if not device.startswith("cuda"):
        provs["torch"] = lambda: nms_keep_mask(boxes, scores, 0.7, lvl_b, valid, backend="torch")
    if with_triton:
        provs["triton"] = lambda: nms_keep_mask(boxes, scores, 0.7, lvl_b, valid, backend="triton")
    for name, fn in provs.items():
        rows.append(row("nms", case, name, torch.float32, bench(fn, device=device, **rep), _nbytes(b * n)))
    return rows


if __name__ == "__main__":
    _, args = main(run, __doc__)
    if any(n > REFERENCE_MAX_BOXES for n in (QUICK_SIZES if args.quick else FULL_SIZES)):
        print(f"reference skipped above {REFERENCE_MAX_BOXES} boxes: O(N * kept) work and a host sync per tile")
