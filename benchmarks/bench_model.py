"""Whole-model benchmark: fastmask (triton / torch backends) against torchvision's Mask R-CNN.

Same weights in all three (torchvision's random init loaded strictly into fastmask).
Inference at batch 1 and 2 on 800x1333 images and a training step (forward, backward,
SGD step) at batch 2, in fp32, TF32 and bf16 autocast; channels-last as an extra case.
``box_score_thresh=0`` so that every image keeps ``box_detections_per_img=100``
detections, as a trained model does on a busy image: post-processing then does its full
work (100 masks pasted per image).

Also a breakdown of inference time (backbone, RPN, RoI heads, the rest: transform and
post-processing) from the PyTorch profiler, for fastmask and torchvision.
"""

from __future__ import annotations

import contextlib

import torch

from .common import bench, record, row, sync

FULL = {"hw": (800, 1333), "batches": (1, 2), "train_batch": 2}
QUICK = {"hw": (192, 256), "batches": (1,), "train_batch": 1, "min_size": 192, "max_size": 256}


def _models(device: str, quick: bool):
    import torchvision

    import fastmask

    kw = {"box_score_thresh": 0.0}
    if quick:
        kw.update(min_size=QUICK["min_size"], max_size=QUICK["max_size"], rpn_pre_nms_top_n_test=200,
                  rpn_post_nms_top_n_test=100, box_detections_per_img=20)
    torch.manual_seed(0)
    # The fine-tuning set-up both libraries default to with pretrained weights: frozen
    # BatchNorm and the last three ResNet stages trained (``maskrcnn_resnet50_fpn(weights=None)``
    # would instead train every stage with trainable BatchNorm).
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, trainable_layers=3)
    tv = torchvision.models.detection.MaskRCNN(backbone, num_classes=91, **kw)
    models = {"torchvision": tv}
    backends = ["triton", "torch"] if device.startswith("cuda") else ["torch"]
    for b in backends:
        m = fastmask.maskrcnn_resnet50_fpn(backend=b, **kw)
        m.load_state_dict(tv.state_dict(), strict=True)
        models[f"fastmask-{b}"] = m
    return {k: v.to(device) for k, v in models.items()}


def _images(n: int, hw, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *hw, generator=g).to(device) for _ in range(n)]


def _targets(images, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for img in images:
        h, w = img.shape[-2:]
        k = 8
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for i, b in enumerate(boxes.round().long().tolist()):  # benchmark set-up, not timed
            masks[i, b[1]:b[3], b[0]:b[2]] = 1
        out.append({"boxes": boxes.to(device), "labels": torch.randint(1, 91, (k,), generator=g).to(device),
                    "masks": masks.to(device)})
    return out


@contextlib.contextmanager
def _precision(mode: str, device: str):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _max_output_diff(a: list[dict], b: list[dict]) -> dict:
    """Largest differences between two models' detections (same weights and images).

    Each detection of ``a`` is matched to the nearest box of the same label in ``b``, not to
    the row of the same rank: with random weights many scores agree to within rounding, and
    two implementations may list such near-ties in another order (``rank_swaps`` counts the
    rows matched to another rank).
    """
    d = {"same_counts": all(len(x["boxes"]) == len(y["boxes"]) for x, y in zip(a, b))}
    if not d["same_counts"]:
        return d
    boxes = scores = 0.0
    agree, swaps = 1.0, 0
    for x, y in zip(a, b):
        if not len(x["boxes"]):
            continue
        dist = (x["boxes"][:, None] - y["boxes"][None]).abs().amax(-1)
        dist = dist.masked_fill(x["labels"][:, None] != y["labels"][None], float("inf"))
        best, j = dist.min(1)
        boxes = max(boxes, best.max().item())
        scores = max(scores, (x["scores"] - y["scores"][j]).abs().max().item())
        swaps += int((j != torch.arange(len(j), device=j.device)).sum())
        agree = min(agree, ((x["masks"] > 0.5) == (y["masks"][j] > 0.5)).float().mean().item())
    d.update(boxes=boxes, scores=scores, labels_equal=all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b)),
             rank_swaps=swaps, mask_pixels_agree=agree)
    return d


def breakdown(model, images, device: str) -> dict:
    """Milliseconds of one inference spent in backbone, rpn, roi_heads, and the rest."""
    from torch.profiler import ProfilerActivity, profile, record_function

    parts = {"backbone": model.backbone, "rpn": model.rpn, "roi_heads": model.roi_heads}
    handles, stack = [], []
    for name, mod in parts.items():
        def pre(_m, _i, name=name):
            stack.append(record_function(f"part::{name}"))
            stack[-1].__enter__()

        def post(_m, _i, _o):
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        with torch.no_grad():
            model(images)
            sync(device)
            with profile(activities=acts) as prof:
                with record_function("part::total"):
                    model(images)
                sync(device)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("part::"):
            dev = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
            t = dev if device.startswith("cuda") and dev else e.cpu_time_total
            out[e.key[6:]] = t / 1e3
    if "total" in out:
        out["rest (transform, post-processing)"] = out["total"] - sum(out.get(k, 0.0) for k in parts)
    return out


def run(quick: bool = False, device: str = "cuda") -> list[dict]:
    cfg = QUICK if quick else FULL
    models = _models(device, quick)
    modes = ["fp32"] if quick else ["fp32", "tf32", "bf16"]
    rep = 100 if quick else 500
    # Quick (CPU smoke) runs: one warm-up call and two timed ones per provider.
    timing = dict(warmup_ms=0, rep_ms=0, min_runs=2) if quick else dict(warmup_ms=rep / 4, rep_ms=rep)
    on_gpu = device.startswith("cuda")

    def timed(name: str, mode: str, batch: int, train: bool = False) -> bool:
        # On the GPU the torch backend (the readable reference, 0.5-1 s a call) is timed once,
        # fp32 inference at batch 1, to show what the kernels replace; the rest is the product.
        return not (on_gpu and name == "fastmask-torch" and (train or mode != "fp32" or batch != 1))

    rows = []
    for batch in cfg["batches"]:
        inputs = [(_images(batch, cfg["hw"], device, s),) for s in range(3)]
        for mode in modes:
            for name, m in models.items():
                if not timed(name, mode, batch):
                    continue
                m.eval()

                def infer(images, m=m, mode=mode):
                    with torch.no_grad(), _precision(mode, device):
                        return m(images)

                t = bench(infer, inputs, device=device, **timing)
                rows.append(row("model", f"inference batch {batch} {cfg['hw'][0]}x{cfg['hw'][1]}", name, mode, t,
                                **{"pass": "inference"}))
    # Same outputs: each fastmask backend against torchvision, batch 1, fp32 (no TF32).
    with torch.no_grad(), _precision("fp32", device):
        imgs = _images(1, cfg["hw"], device, 7)
        ref = models["torchvision"].eval()(imgs)
        for name, m in models.items():
            if name != "torchvision":
                rows.append(record({"op": "model", "case": "output parity vs torchvision", "provider": name,
                                    "dtype": "fp32", "median_ms": float("nan"), "p20_ms": float("nan"),
                                    "p80_ms": float("nan"), **_max_output_diff(m.eval()(imgs), ref)}))
    # Training step.
    b = cfg["train_batch"]
    train_inputs = [(_images(b, cfg["hw"], device, s), _targets(_images(b, cfg["hw"], "cpu", s), device, s))
                    for s in range(2)]
    for mode in modes:
        for name, m in models.items():
            if not timed(name, mode, b, train=True):
                continue
            m.train()
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)

            def step(images, targets, m=m, opt=opt, mode=mode):
                with _precision(mode, device):
                    losses = m(images, targets)
                sum(losses.values()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t = bench(step, train_inputs, device=device, **timing)
            rows.append(row("model", f"train step batch {b} {cfg['hw'][0]}x{cfg['hw'][1]}", name, mode, t,
                            **{"pass": "train"}))
    if not quick and device.startswith("cuda"):
        for name, m in models.items():
            if not timed(name, "bf16", 1):
                continue
            m.eval().to(memory_format=torch.channels_last)
            inputs = [(_images(1, cfg["hw"], device, s),) for s in range(3)]

            def infer_cl(images, m=m):
                with torch.no_grad(), _precision("bf16", device):
                    return m(images)

            t = bench(infer_cl, inputs, device=device, warmup_ms=500, rep_ms=rep)
            rows.append(row("model", "inference batch 1 channels-last", name, "bf16", t, **{"pass": "inference"}))
            m.to(memory_format=torch.contiguous_format)
    imgs = _images(1, cfg["hw"], device, 9)
    for name, m in models.items():
        rows.append(record({"op": "model", "case": "inference breakdown ms (profiler)", "provider": name,
                            "dtype": "fp32", "median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan"),
                            "breakdown": breakdown(m.eval(), imgs, device)}))
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    for r in run(a.quick, a.device):
        print(r)
