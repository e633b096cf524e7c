"""Multi-level RoI Align: torchvision's MultiScaleRoIAlign vs the torch reference vs the Triton kernels.

Cases (FPN P2-P5 of an 800x1216 input, 256 channels, sampling ratio 2):
  box_train  2 images x 512 sampled RoIs, 7x7      box_eval   1 image x 1000 proposals, 7x7
  mask_train 2 images x 64 positive RoIs, 14x14    mask_eval  1 image x 100 detections, 14x14
each in fp32 and bf16, NCHW and channels-last, forward / backward / both.

Bytes-moved floor (the GB/s column divides it by the median time):
  forward   output written once (K*C*PH*PW) + the union over RoIs of the feature cells their
            bilinear taps touch, read once (C values per cell) + the RoIs (K*5*4 bytes);
  backward  output gradient read once (K*C*PH*PW) + every level's gradient written once
            (N*C*sum(H*W): the gradient maps are dense, zeros included);
  both      the sum.
Element sizes are the dtype's. The reference also materialises K*C*(2*PH*G)*(2*PW*G) gathered
values (G = samples per bin and axis), which is what the kernels avoid.

`run(quick, device)` returns one row per (case, layout, pass, dtype, provider) with the keys
op, case, provider, dtype, median_ms, p20_ms, p80_ms, bytes, gbps, pass, layout
(``benchmarks.common.row``). On the CPU: torchvision, the CPU path (``backend="torch"``) and
the reference, fp32 NCHW (the reference forward only at full sizes); Triton's interpreter is not
a timing target. Quick mode: tiny sizes. Run: ``python -m benchmarks.bench_roi_align``.
"""

from __future__ import annotations

import math

import torch

from .common import bench, main, row
from fastmask.ops import multiscale_roi_align
from fastmask.ops.roi_align import boxes_to_rois, infer_scales, level_range, map_levels, multiscale_roi_align_ref

OP = "multiscale_roi_align"
STRIDES = (4, 8, 16, 32)
# name: (images, RoIs per image, output size)
CASES = {
    "box_train": (2, 512, 7),
    "box_eval": (1, 1000, 7),
    "mask_train": (2, 64, 14),
    "mask_eval": (1, 100, 14),
}
QUICK_CASES = {"box_tiny": (2, 32, 7), "mask_tiny": (1, 16, 14)}
SAMPLING_RATIO = 2


def make_problem(n_images, rois_per_image, image_hw, channels, dtype, layout, device, seed=0):
    """Features P2..P5, per-image boxes spread over the levels (log-uniform sizes), image sizes."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    feats = [torch.randn(n_images, channels, math.ceil(h / s), math.ceil(w / s), generator=g) for s in STRIDES]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    feats = [f.to(device=device, dtype=dtype).contiguous(memory_format=fmt) for f in feats]
    boxes = []
    for _ in range(n_images):
        side = torch.exp(torch.empty(rois_per_image).uniform_(math.log(16), math.log(min(h, w)), generator=g))
        aspect = torch.exp(torch.empty(rois_per_image).uniform_(-1.0, 1.0, generator=g))
        bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
        x1 = torch.rand(rois_per_image, generator=g) * (w - bw).clamp(min=1)
        y1 = torch.rand(rois_per_image, generator=g) * (h - bh).clamp(min=1)
        boxes.append(torch.stack([x1, y1, x1 + bw, y1 + bh], 1).to(device))
    return feats, boxes, [(h, w)] * n_images


def _taps_1d(start, bin_size, bins, grid, size):
    """Feature indices touched along one axis by every sample of every RoI: Tensor[K, 2*bins*grid]."""
    i = torch.arange(bins * grid, dtype=torch.float64)
    coord = start[:, None] + (i // grid)[None] * bin_size[:, None] + ((i % grid) + 0.5)[None] * bin_size[:, None] / grid
    inside = (coord >= -1) & (coord <= size)
    c = coord.clamp(min=0)
    lo = c.floor().clamp(max=size - 1)
    hi = torch.where(lo >= size - 1, lo, lo + 1)
    return torch.cat([lo, hi], 1).long(), torch.cat([inside, inside], 1)


def floor_bytes(feats, boxes, image_sizes, output_size, esize):
    """(forward, backward) bytes-moved floors, as stated in the module docstring."""
    rois = boxes_to_rois([b.detach().double().cpu() for b in boxes])
    scales = infer_scales([f.shape[-2:] for f in feats], image_sizes)
    lvl = map_levels(rois[:, 1:], *level_range(scales))
    n, c = feats[0].shape[:2]
    touched = 0
    for level, f in enumerate(feats):
        sel = lvl == level
        if not sel.any():
            continue
        r = rois[sel]
        h, w = f.shape[-2:]
        sc = scales[level]
        x1, y1 = r[:, 1] * sc, r[:, 2] * sc
        rw = (r[:, 3] * sc - x1).clamp(min=1)
        rh = (r[:, 4] * sc - y1).clamp(min=1)
        ys, y_in = _taps_1d(y1, rh / output_size, output_size, SAMPLING_RATIO, h)
        xs, x_in = _taps_1d(x1, rw / output_size, output_size, SAMPLING_RATIO, w)
        cells = torch.zeros(n, h, w, dtype=torch.bool)
        ok = y_in[:, :, None] & x_in[:, None, :]
        b = r[:, 0].long()[:, None, None].expand_as(ok)
        cells[b[ok], ys[:, :, None].expand_as(ok)[ok], xs[:, None, :].expand_as(ok)[ok]] = True
        touched += int(cells.sum())
    k = rois.shape[0]
    out = k * c * output_size * output_size * esize
    fwd = out + touched * c * esize + k * 5 * 4
    bwd = out + sum(f.numel() for f in feats) * esize
    return fwd, bwd


def _providers(quick: bool, device: str):
    """GPU: torchvision, the reference, the kernels. CPU: torchvision, the CPU path (the public op
    with backend="torch") and the reference it replaces (the spec)."""
    if not device.startswith("cuda"):
        return ("torchvision", "torch", "reference")
    return ("torchvision", "reference") if quick else ("torchvision", "reference", "triton")


def _pooler_fn(provider, feats, boxes, image_sizes, output_size):
    if provider == "torchvision":
        import torchvision

        names = [str(i) for i in range(len(feats))]
        pooler = torchvision.ops.MultiScaleRoIAlign(names, output_size, SAMPLING_RATIO)
        return lambda fs: pooler(dict(zip(names, fs)), boxes, image_sizes)
    if provider == "reference":
        rois = boxes_to_rois(boxes)
        scales = infer_scales([f.shape[-2:] for f in feats], image_sizes)
        return lambda fs: multiscale_roi_align_ref(fs, rois, output_size, scales, SAMPLING_RATIO)
    backend = "torch" if provider == "torch" else "triton"
    return lambda fs: multiscale_roi_align(fs, boxes, output_size, image_sizes, SAMPLING_RATIO, backend=backend)


def run(quick: bool, device: str) -> list[dict]:
    """One row per (case, layout, pass, dtype, provider); see the module docstring."""
    image_hw, channels = ((96, 136), 16) if quick else ((800, 1216), 256)
    on_gpu = device.startswith("cuda")
    # The CPU run: fp32 and NCHW (the model's), and the reference (seconds a call) forward only.
    dtypes = (torch.float32, torch.bfloat16) if on_gpu and not quick else (torch.float32,)
    layouts = ("nchw", "channels_last") if on_gpu else ("nchw",)
    rows = []
    for case, (n_images, per_image, out_size) in (QUICK_CASES if quick else CASES).items():
        for layout in layouts:
            for dtype in dtypes:
                feats, boxes, image_sizes = make_problem(n_images, per_image, image_hw, channels, dtype, layout,
                                                         device)
                esize = torch.empty(0, dtype=dtype).element_size()
                fwd_bytes, bwd_bytes = floor_bytes(feats, boxes, image_sizes, out_size, esize)
                for provider in _providers(quick, device):
                    leaves = [f.detach().requires_grad_() for f in feats]
                    pool = _pooler_fn(provider, feats, boxes, image_sizes, out_size)
                    try:
                        out = pool(leaves)
                    except RuntimeError as e:  # e.g. a dtype a provider does not support on this device
                        print(f"# {provider} {case} {layout} {dtype}: skipped ({str(e).splitlines()[0]})")
                        continue
                    grad = torch.randn_like(out)

                    def backward(out=out, grad=grad, leaves=leaves):
                        for t in leaves:  # time the gradient, not its accumulation into .grad
                            t.grad = None
                        out.backward(grad, retain_graph=True)

                    def both(pool=pool, grad=grad, leaves=leaves):
                        for t in leaves:
                            t.grad = None
                        pool(leaves).backward(grad)

                    passes = {"fwd": (lambda pool=pool, leaves=leaves: pool(leaves), fwd_bytes),
                              "bwd": (backward, bwd_bytes), "both": (both, fwd_bytes + bwd_bytes)}
                    for name, (fn, nbytes) in passes.items():
                        if provider == "reference" and not on_gpu and not quick and name != "fwd":
                            continue
                        timing = bench(fn, device=device, rep_ms=50 if quick else 200)
                        rows.append(row(OP, f"{case} K={n_images * per_image} {out_size}x{out_size}", provider,
                                        dtype, timing, nbytes, **{"pass": name, "layout": layout}))
                    del out, grad, leaves
    return rows


if __name__ == "__main__":
    main(lambda quick, device: run(quick or not device.startswith("cuda"), device), __doc__)  # CPU: quick sizes
