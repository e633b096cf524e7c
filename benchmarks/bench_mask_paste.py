"""Mask paste benchmark: 100 masks of 28x28 pasted into 800x1333 and 480x640 images.

Providers, each writing float masks and bool masks (``> 0.5``):
- ``torchvision``: ``paste_masks_in_image`` (one interpolate and copy per mask; bool is a
  compare on its float result);
- ``grid_sample``: a detectron2-style paste written here: ``F.grid_sample`` of every mask at
  the pixel centres of its box, in chunks of masks bounded by ``GRID_SAMPLE_CHUNK_BYTES``;
  the same kind of output, not bit-for-bit torchvision's pixel model;
- ``torch``: ``paste_masks(..., backend="torch")``, the CPU path: the two matmuls over the rows
  the boxes span, through one reused buffer, copied into the image;
- ``reference``: ``fastmask.ops.masks.paste_masks_ref`` (two batched matmuls over the whole
  image), the specification;
- ``triton``: ``paste_masks(..., backend="triton")``, one launch, bool written directly;
- ``write_floor``: ``out.fill_(0)`` of the same output: the time to write it at the
  device's write bandwidth.

Bytes counted (the floor of every provider): the output, ``N * H * W`` elements written
(4 bytes for fp32, 1 for bool); the ``N * 28 * 28`` mask values and boxes read are under
0.1% of it. ``gbps`` is that count over the median time; ``copy_gbps`` is the device's
copy bandwidth (read + write of a 512 MiB buffer) measured in the same run, and
``frac_of_copy`` = gbps / copy_gbps.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .common import bench, main, row

FULL_CASES = [(100, 28, (800, 1333)), (100, 28, (480, 640))]
QUICK_CASES = [(10, 28, (120, 160))]
# Output bytes the grid_sample provider makes at once (detectron2 bounds its chunks the
# same way): 1 GiB keeps the float32 intermediate of 100 masks at 800x1333 in one chunk.
GRID_SAMPLE_CHUNK_BYTES = 1 << 30
COPY_BYTES = 512 << 20


def make_inputs(n: int, m: int, hw, device: str, seed: int = 0):
    """Logit-like masks through a sigmoid and boxes of 16 to 45% of the image side."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    masks = torch.sigmoid(torch.randn(n, 1, m, m, generator=g) * 3)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = (torch.rand(n, 2, generator=g) * 0.29 + 0.16) * torch.tensor([float(w), float(h)])
    boxes = torch.cat([xy, xy + wh], dim=1)
    return masks.to(device), boxes.to(device)


def grid_sample_paste(masks: torch.Tensor, boxes: torch.Tensor, hw, threshold: float | None = None) -> torch.Tensor:
    """Paste by sampling each mask at the pixel centres of the whole image (detectron2-style).

    Pixel (y, x) maps to the mask coordinate ``((y + 0.5 - y1) / (y2 - y1)) * 2 - 1`` (the
    box spans the mask's [-1, 1] extent); ``grid_sample`` with zero padding leaves pixels
    outside the box at 0. Chunks of masks keep the float intermediate bounded.
    """
    n = masks.shape[0]
    h, w = hw
    out = torch.empty((n, 1, h, w), dtype=torch.bool if threshold is not None else masks.dtype, device=masks.device)
    chunk = max(1, GRID_SAMPLE_CHUNK_BYTES // (h * w * 4 * 3))  # grid (2 values) + result per pixel
    ys = torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5
    for s in range(0, n, chunk):  # chunks of masks, not single masks
        b = boxes[s:s + chunk].float()
        x1, y1, x2, y2 = (b[:, i, None] for i in range(4))
        gy = (ys[None] - y1) / (y2 - y1).clamp(min=1e-6) * 2 - 1
        gx = (xs[None] - x1) / (x2 - x1).clamp(min=1e-6) * 2 - 1
        k = b.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, h, w), gy[:, :, None].expand(k, h, w)], dim=3)
        img = F.grid_sample(masks[s:s + chunk].float(), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        out[s:s + chunk] = img > threshold if threshold is not None else img
    return out


def _providers(device: str, interpreter: bool):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from fastmask.ops.masks import paste_masks, paste_masks_ref

    def tv(masks, boxes, hw, threshold):
        out = paste_masks_in_image(masks, boxes, hw, 1)
        return out if threshold is None else out > threshold

    provs = {
        "torchvision": tv,
        "grid_sample": grid_sample_paste,
        "torch": lambda m, b, hw, t: paste_masks(m, b, hw, 1, t, backend="torch"),
        "reference": lambda m, b, hw, t: paste_masks_ref(m, b, hw, 1, t),
    }
    if device.startswith("cuda") or interpreter:
        provs["triton"] = lambda m, b, hw, t: paste_masks(m, b, hw, 1, t, backend="triton")
    return provs


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written over the median time)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device=device)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def run(quick: bool, device: str) -> list[dict]:
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    cases = QUICK_CASES if quick else FULL_CASES
    rep = dict(warmup_ms=10, rep_ms=50) if quick else {}
    copy_gbps = copy_bandwidth(device, (16 << 20) if quick else COPY_BYTES)
    rows = []
    for n, m, hw in cases:
        masks, boxes = make_inputs(n, m, hw, device)
        for threshold, kind in ((None, "float32"), (0.5, "bool")):
            case = f"{n} masks {m}x{m} -> {hw[0]}x{hw[1]}"
            elem = 4 if threshold is None else 1
            nbytes = n * hw[0] * hw[1] * elem
            extra = dict(output=kind, copy_gbps=copy_gbps)
            provs = dict(_providers(device, interpreter))
            for name, fn in provs.items():
                if quick and name == "triton" and device == "cpu":
                    masks_q, boxes_q = masks[:2], boxes[:2]  # the interpreter pays per program
                    t = bench(lambda: fn(masks_q, boxes_q, hw, threshold), device=device, **rep)
                    r = row("mask_paste", case.replace(f"{n} masks", "2 masks"), name, kind, t,
                            2 * hw[0] * hw[1] * elem, **extra)
                else:
                    t = bench(lambda: fn(masks, boxes, hw, threshold), device=device, **rep)
                    r = row("mask_paste", case, name, kind, t, nbytes, **extra)
                r["frac_of_copy"] = r["gbps"] / copy_gbps
                rows.append(r)
            out = torch.empty((n, 1, *hw), dtype=torch.float32 if threshold is None else torch.bool, device=device)
            t = bench(lambda: out.fill_(0), device=device, **rep)
            r = row("mask_paste", case, "write_floor", kind, t, nbytes, **extra)
            r["frac_of_copy"] = r["gbps"] / copy_gbps
            rows.append(r)
    return rows


if __name__ == "__main__":
    results, _ = main(run, __doc__, columns=("frac_of_copy",))
    print(f"device copy bandwidth: {results[0]['copy_gbps']:.0f} GB/s (frac_of_copy = GB/s over it)")
