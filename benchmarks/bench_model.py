"""Whole-model benchmark: fastmask (triton / torch backends) against torchvision's Mask R-CNN.

Same weights in all three (torchvision's random init loaded strictly into fastmask).
On a GPU: inference at batch 1 and 2 on 800x1333 images and a training step (forward,
backward, SGD step) at batch 2, in fp32, TF32 and bf16 autocast; channels-last as an extra
case. On the CPU (``--device cpu``): fp32 inference at batch 1 on 512x512 and 800x1333 images
and a training step at batch 2 on 512x512, every provider side by side (the torch backend is
the CPU path).
``box_score_thresh=0`` so that every image keeps ``box_detections_per_img=100``
detections, as a trained model does on a busy image: post-processing then does its full
work (100 masks pasted per image).

Inference providers, per batch and precision:
- ``torchvision``, ``fastmask-<backend>``: eager ``model(images)``, per-image lists out (for
  fastmask: the static path, then one host sync to trim the padding);
- ``torchvision accelerated``: torchvision's model after ``fastmask.accelerate`` (its RoI
  poolers, proposal step, box post-processing and mask paste on fastmask's ops), fp32 and
  bf16, inference and training;
- ``fastmask-<backend> static``: ``model.forward_padded(images)``, padded outputs left on the
  device (no host sync); timed for the backend that is the product on the device (Triton on
  a GPU, the reference on the CPU);
- ``fastmask-triton cuda-graph`` (CUDA only): the static path captured per (batch,
  precision) by ``fastmask.inference.capture`` and replayed (bf16 through the model's
  ``autocast_dtype`` setting, which the graph bakes in).

Also the detections against torchvision's (``model(images)`` and the static path trimmed),
and a breakdown of inference time (backbone, RPN, RoI heads, the rest: transform and
post-processing) from the PyTorch profiler, for fastmask and torchvision.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .common import bench, record, row, sync

ACCELERATED = "torchvision accelerated"
# Image sizes (each model built with min_size / max_size of the size, so that the images reach
# the backbone at that size), batches, the training step's batch (at the first size).
FULL = {"sizes": [(800, 1333)], "batches": (1, 2), "train_batch": 2}
# The CPU run (``--device cpu`` without --quick): fp32 only, batch 1, five timed calls each.
CPU = {"sizes": [(512, 512), (800, 1333)], "batches": (1,), "train_batch": 2}
QUICK = {"sizes": [(192, 256)], "batches": (1,), "train_batch": 1}


def _models(device: str, quick: bool, hw):
    import torchvision

    import fastmask

    kw = {"box_score_thresh": 0.0, "min_size": min(hw), "max_size": max(hw)}
    if quick:
        kw.update(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=20)
    torch.manual_seed(0)
    # The fine-tuning set-up both libraries default to with pretrained weights: frozen
    # BatchNorm and the last three ResNet stages trained (``maskrcnn_resnet50_fpn(weights=None)``
    # would instead train every stage with trainable BatchNorm).
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, trainable_layers=3)
    tv = torchvision.models.detection.MaskRCNN(backbone, num_classes=91, **kw)
    # torchvision's own model with fastmask's ops swapped in (fastmask.accelerate): what a
    # torchvision user gets from one call, keeping their model and training code.
    accelerated = copy.deepcopy(tv)
    fastmask.accelerate(accelerated, backend="triton" if device.startswith("cuda") else "torch")
    models = {"torchvision": tv, ACCELERATED: accelerated}
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
def _precision(mode: str, device: str, autocast: bool = True):
    """TF32 on for ``"tf32"`` (off otherwise); bf16 autocast around the call for ``"bf16"``
    unless ``autocast=False`` (the CUDA graph rows get bf16 from the model's setting)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = mode == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    bf16 = mode == "bf16" and autocast
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
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


def _timed_method(obj, attr: str, label: str, stack: contextlib.ExitStack) -> None:
    """Replace the bound method ``obj.attr`` by one that runs inside ``record_function(label)``
    until ``stack`` closes (which restores the method)."""
    from torch.profiler import record_function

    original = getattr(obj, attr)
    own = attr in vars(obj)  # an instance attribute already (rare): put it back as it was

    def timed(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(obj, attr, timed)
    if own:
        stack.callback(setattr, obj, attr, original)
    else:  # deleting the instance attribute uncovers the class's method again
        stack.callback(delattr, obj, attr)


def _timed_module(mod, label: str, stack: contextlib.ExitStack) -> None:
    """Run ``mod``'s forward inside ``record_function(label)`` (hooks) until ``stack`` closes."""
    from torch.profiler import record_function

    ranges = []

    def pre(_m, _i):
        ranges.append(record_function(label))
        ranges[-1].__enter__()

    def post(_m, _i, _o):
        ranges.pop().__exit__(None, None, None)

    for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)):
        stack.callback(h.remove)


def breakdown(model, images, device: str) -> dict:
    """Milliseconds of one inference spent in backbone, rpn, roi_heads, and the rest.

    The backbone is timed through module hooks. fastmask's inference calls
    ``rpn.propose_padded`` and ``roi_heads.detect``, not the modules' forward (whose hooks
    then never fire): those methods are timed instead, wrapped for the call; torchvision's
    RPN and RoI heads through hooks."""
    from torch.profiler import ProfilerActivity, profile, record_function

    parts = {"backbone": (model.backbone, None), "rpn": (model.rpn, "propose_padded"),
             "roi_heads": (model.roi_heads, "detect")}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with contextlib.ExitStack() as stack:
        for name, (mod, method) in parts.items():
            if method is not None and hasattr(mod, method):
                _timed_method(mod, method, f"part::{name}", stack)
            else:
                _timed_module(mod, f"part::{name}", stack)
        with torch.no_grad():
            model(images)
            sync(device)
            with profile(activities=acts) as prof:
                with record_function("part::total"):
                    model(images)
                sync(device)
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("part::"):
            dev = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
            t = dev if device.startswith("cuda") and dev else e.cpu_time_total
            out[e.key[6:]] = t / 1e3
    if "total" in out:
        out["rest (transform, post-processing)"] = out["total"] - sum(out.get(k, 0.0) for k in parts)
    return out


def _graph_timing(model, batch: int, hw, mode: str, device: str, inputs, timing: dict) -> dict:
    """Capture ``model``'s static path in a CUDA graph for ``batch`` images of ``hw`` under
    ``mode`` and time the replays (``detector(images)``: copy in, replay; outputs stay in the
    graph's buffers).

    bf16 comes from the model's ``autocast_dtype`` setting during the capture (the graph holds
    the bf16 kernels; an autocast around a replay would do nothing), restored after; the TF32
    flags are set for both the capture and the replays. The graph and its memory are released
    on return: one capture per (batch, mode) at a time."""
    from fastmask.inference import capture

    previous = model.autocast_dtype
    with _precision(mode, device, autocast=False):
        if mode == "bf16":
            model.autocast_dtype = torch.bfloat16
        try:
            detector = capture(model, batch, hw)
        finally:
            model.autocast_dtype = previous
        return bench(detector, inputs, device=device, **timing)


def _inference(models: dict, hw, batches, modes, timed, static_provider: str, device: str, timing: dict) -> list[dict]:
    """Inference rows of every provider at one image size, and their detections against torchvision's."""
    on_gpu = device.startswith("cuda")
    size = f"{hw[0]}x{hw[1]}"
    rows = []
    for batch in batches:
        inputs = [(_images(batch, hw, device, s),) for s in range(3)]
        for mode in modes:
            for name, m in models.items():
                if not timed(name, mode, batch):
                    continue
                m.eval()

                def infer(images, m=m, mode=mode):
                    with torch.no_grad(), _precision(mode, device):
                        return m(images)

                t = bench(infer, inputs, device=device, **timing)
                rows.append(row("model", f"inference batch {batch} {size}", name, mode, t, **{"pass": "inference"}))
                if name != static_provider:
                    continue

                def infer_static(images, m=m, mode=mode):
                    with torch.no_grad(), _precision(mode, device):
                        return m.forward_padded(images)  # padded outputs stay on the device: no sync

                t = bench(infer_static, inputs, device=device, **timing)
                rows.append(row("model", f"inference batch {batch} {size}", f"{name} static", mode, t,
                                **{"pass": "inference"}))
                if on_gpu:  # CUDA graphs: the GPU only, so never in the quick CPU run
                    t = _graph_timing(m, batch, hw, mode, device, inputs, timing)
                    rows.append(row("model", f"inference batch {batch} {size}", f"{name} cuda-graph", mode, t,
                                    **{"pass": "inference"}))
    # Same outputs: each fastmask backend against torchvision, batch 1, fp32 (no TF32); and the
    # static path trimmed (model(images) is that by construction; compared all the same, so
    # that the timed static rows are known to compute the same detections).
    from fastmask.inference import trim

    with torch.no_grad(), _precision("fp32", device):
        imgs = _images(1, hw, device, 7)
        ref = models["torchvision"].eval()(imgs)

        def parity(provider: str, detections: list[dict]) -> dict:
            return record({"op": "model", "case": f"output parity vs torchvision {size}", "provider": provider,
                           "dtype": "fp32", "median_ms": float("nan"), "p20_ms": float("nan"),
                           "p80_ms": float("nan"), **_max_output_diff(detections, ref)})

        for name, m in models.items():
            if name == "torchvision":
                continue
            rows.append(parity(name, m.eval()(imgs)))
            if name == static_provider:
                rows.append(parity(f"{name} static", trim(m.forward_padded(imgs), [tuple(hw)])))
    return rows


def run(quick: bool = False, device: str = "cuda") -> list[dict]:
    on_gpu = device.startswith("cuda")
    cfg = QUICK if quick else (FULL if on_gpu else CPU)
    modes = ["fp32", "tf32", "bf16"] if on_gpu and not quick else ["fp32"]
    rep = 100 if quick else 500
    # CPU runs: one warm-up call and a fixed number of timed ones per provider (two quick, five
    # in the full CPU run, where a call takes seconds).
    timing = dict(warmup_ms=rep / 4, rep_ms=rep) if on_gpu else dict(warmup_ms=0, rep_ms=0, min_runs=2 if quick else 5)

    def timed(name: str, mode: str, batch: int, train: bool = False) -> bool:
        # On the GPU the torch backend (the CPU path, 0.5-1 s a call there) is timed once, fp32
        # inference at batch 1, to show what the kernels replace; the rest is the product.
        # The accelerated torchvision model: fp32 and bf16 (TF32 adds nothing to its story); in
        # the quick CPU run its inference only (the run is a smoke test with a time budget).
        if name == ACCELERATED:
            return mode != "tf32" and not (quick and train)
        return not (on_gpu and name == "fastmask-torch" and (train or mode != "fp32" or batch != 1))

    # The fastmask model timed on the static path too: the product on the device (the Triton
    # backend on a GPU; on the CPU the torch backend, the CPU path).
    static_provider = "fastmask-triton" if on_gpu else "fastmask-torch"
    rows, first = [], None
    for hw in cfg["sizes"]:  # models built per size (their transform resizes to it)
        models = _models(device, quick, hw)
        rows += _inference(models, hw, cfg["batches"], modes, timed, static_provider, device, timing)
        first = first or models
    models, hw = first, cfg["sizes"][0]
    size = f"{hw[0]}x{hw[1]}"
    # Training step.
    b = cfg["train_batch"]
    train_inputs = [(_images(b, hw, device, s), _targets(_images(b, hw, "cpu", s), device, s))
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
            rows.append(row("model", f"train step batch {b} {size}", name, mode, t,
                            **{"pass": "train"}))
    if not quick and on_gpu:
        for name, m in models.items():
            if not timed(name, "bf16", 1) or name == ACCELERATED:
                continue
            m.eval()
            # fastmask: its channels_last setting (weights NHWC, and the batch made NHWC before
            # the backbone); torchvision: its weights converted, as before. Restored after.
            fastmask_model = name.startswith("fastmask")
            if fastmask_model:
                m.channels_last = True
            else:
                m.to(memory_format=torch.channels_last)
            inputs = [(_images(1, hw, device, s),) for s in range(3)]

            def infer_cl(images, m=m):
                with torch.no_grad(), _precision("bf16", device):
                    return m(images)

            try:
                t = bench(infer_cl, inputs, device=device, warmup_ms=500, rep_ms=rep)
            finally:
                if fastmask_model:
                    m.channels_last = False
                else:
                    m.to(memory_format=torch.contiguous_format)
            rows.append(row("model", "inference batch 1 channels-last", name, "bf16", t, **{"pass": "inference"}))
    imgs = _images(1, hw, device, 9)
    for name, m in models.items():
        if quick and name == ACCELERATED:
            continue
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
