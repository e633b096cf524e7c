"""Count what each public op issues per call: aten ops, device launches, Triton launches, syncs.

Also one whole-model inference (``--model``): torchvision's Mask R-CNN, fastmask's
``model(images)`` and its static path ``model.forward_padded(images)``, same weights.

Host work decides the speed of small calls on a GPU (every aten op is a dispatch and most are
a kernel launch; every read of a device value is a sync), and it can be counted on the CPU:
:class:`DispatchCounter` is a ``TorchDispatchMode`` that records every aten op dispatched while
it is active, including the ops inside fastmask's registered ops (``fastmask::*``, which it
enters), and every Triton launch (the kernels run in Triton's interpreter on the CPU). Ops the
interpreter itself dispatches while it runs a kernel are not counted: on the GPU they do not
exist.

    python -m benchmarks.dispatch_count            # the table recorded in benchmarks/NOTES.md
    python -m benchmarks.dispatch_count --model    # whole-model inference: torchvision, fastmask eager, static

Categories:
- ``launches``: aten ops that launch a device kernel (everything except allocations, views and
  metadata; see ``NO_LAUNCH``) plus Triton launches;
- ``syncs``: ops that read a device value on the host or produce a data-dependent shape
  (``SYNC_OPS``), and the Tensor methods that read values without an aten op (``HOST_READS``:
  ``tolist``, ``numpy``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no device kernel: allocations, views, metadata.
NO_LAUNCH = frozenset({
    "aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default",
    "aten.new_empty_strided.default", "aten.empty_like.default", "aten.view.default", "aten._unsafe_view.default",
    "aten.as_strided.default", "aten.slice.Tensor", "aten.select.int", "aten.expand.default",
    "aten.permute.default", "aten.t.default", "aten.transpose.int", "aten.unsqueeze.default", "aten.squeeze.dim",
    "aten.squeeze.default", "aten.squeeze.dims", "aten.detach.default", "aten.alias.default",
    "aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int", "aten.diagonal.default",
    "aten.lift_fresh.default", "aten.reshape.default", "aten._reshape_alias.default", "aten.unfold.default",
    "aten.is_same_size.default", "aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
    "aten.set_.source_Storage_storage_offset", "aten.resize_.default", "aten.flatten.using_ints",
    "aten.view.dtype", "aten.detach_.default",
})
# aten ops that read device data on the host or give a data-dependent shape.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default", "aten.nonzero_static.default",
    "aten.masked_select.default", "aten.unique_dim.default", "aten._unique2.default", "aten.unique_consecutive.default",
    "aten.equal.default", "aten.is_nonzero.default", "aten.repeat_interleave.Tensor",
    "aten.index.Tensor[bool mask]", "aten.index_put.default[bool mask]", "aten.index_put_.default[bool mask]",
})
# Tensor methods that read device data without dispatching an aten op (seen by a
# TorchFunctionMode; recorded as syncs under these names).
HOST_READS = {"tolist": "Tensor.tolist", "numpy": "Tensor.numpy"}
_HOST_READ_NAMES = frozenset(HOST_READS.values())
# Indexing ops whose index may be a bool mask (then counted as a sync, see DispatchCounter).
MASK_INDEXING = frozenset({"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"})


def _custom_op_impl(func):
    """The Python implementation of a ``fastmask::`` registered op (what its kernel runs)."""
    from fastmask.ops._library import IMPLS

    return IMPLS[func._schema.name.split("::", 1)[1]]


class DispatchCounter(TorchDispatchMode):
    """Records the aten ops and Triton launches of the code run under it (see the module docs)."""

    def __init__(self, enter_ops: bool = True):
        """``enter_ops=False`` counts each ``fastmask::`` op as one op without entering it (what
        the code around the ops issues)."""
        super().__init__()
        self.enter_ops = enter_ops
        self.ops: list[str] = []
        self.triton: list[str] = []
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        name = str(func)
        if name in MASK_INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                                                   else ())):
            name += "[bool mask]"  # indexing by a mask: a data-dependent shape (a nonzero inside)
        self.ops.append(name)
        if func.namespace == "fastmask" and self.enter_ops:
            with self:  # count the ops inside the registered op too
                return _custom_op_impl(func)(*args, **kwargs)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def _count_host_reads(self):
        counter = self

        class HostReads(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = HOST_READS.get(getattr(func, "__name__", None))
                if name is not None and not counter._paused:
                    counter.ops.append(name)
                return func(*args, **(kwargs or {}))

        with HostReads():
            yield

    @contextlib.contextmanager
    def _count_triton(self):
        patched = []
        try:
            from triton.runtime import interpreter, jit
        except ImportError:
            yield
            return
        counter = self
        for cls in (interpreter.InterpretedFunction, jit.JITFunction):
            original = cls.run

            def run(fn_self, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False):
                    counter.triton.append(getattr(fn_self, "__name__", None) or fn_self.fn.__name__)
                counter._paused += 1
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    counter._paused -= 1

            cls.run = run
            patched.append((cls, original))
        try:
            yield
        finally:
            for cls, original in patched:
                cls.run = original

    def __enter__(self):
        # Re-entered for the ops inside a registered op: the outermost entry sets up the
        # Triton and host-read recorders, once.
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth == 1:
            self._contexts = contextlib.ExitStack()
            self._contexts.enter_context(self._count_triton())
            self._contexts.enter_context(self._count_host_reads())
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            self._contexts.__exit__(*exc)
        return out

    # ------------------------------------------------------------------ summaries

    @property
    def aten(self) -> list[str]:
        """aten ops, without the ``fastmask::`` ops that contain them (and without HOST_READS)."""
        return [o for o in self.ops if not o.startswith("fastmask.") and o not in _HOST_READ_NAMES]

    @property
    def syncs(self) -> list[str]:
        return [o for o in self.ops if o in SYNC_OPS or o in _HOST_READ_NAMES]

    @property
    def launches(self) -> int:
        return sum(o not in NO_LAUNCH for o in self.aten) + len(self.triton)

    def summary(self) -> dict:
        return {"aten_ops": len(self.aten), "launches": self.launches, "triton": len(self.triton),
                "syncs": len(self.syncs)}


@contextlib.contextmanager
def data_checks(enabled: bool):
    """Turn the ops' data checks on or off (``FASTMASK_CHECKS``) for the duration."""
    from fastmask.ops._checks import CHECKS_ENV_VAR

    old = os.environ.get(CHECKS_ENV_VAR)
    os.environ[CHECKS_ENV_VAR] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[CHECKS_ENV_VAR]
        else:
            os.environ[CHECKS_ENV_VAR] = old


def count(fn, *args, checks: bool = False, warmup: bool = True, enter_ops: bool = True, **kwargs) -> DispatchCounter:
    """Run ``fn(*args, **kwargs)`` under a fresh counter; returns the counter.

    ``warmup``: call it once before, uncounted, so that what is counted is a steady-state call
    (host-side caches filled). ``checks=False`` (default) counts what a call on CUDA tensors
    issues: the data checks that run by default on CPU tensors only are off."""
    with data_checks(checks):
        if warmup:
            fn(*args, **kwargs)
        with DispatchCounter(enter_ops) as counter:
            fn(*args, **kwargs)
    return counter


# --------------------------------------------------------------------------- standard cases


def standard_cases(backend: str, device: str = "cpu") -> dict:
    """name -> zero-argument callable: each public op at a model-like size (small enough for
    Triton's interpreter), on ``device``. Inputs are made here, outside the count."""
    from fastmask import ops
    from fastmask.models.transform import ImageList
    from fastmask.ops.anchors import AnchorGenerator

    g = torch.Generator().manual_seed(0)

    def boxes(n, size=512.0):
        xy = torch.rand(n, 2, generator=g) * size
        wh = torch.rand(n, 2, generator=g) * size / 4 + 1
        return torch.cat([xy, xy + wh], dim=1).to(device)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    feats = [rand(1, 16, 128 // s, 128 // s) for s in (4, 8, 16, 32)]
    box_list = [boxes(64, 128.0)]
    rois = torch.cat([torch.zeros(64, 1, device=device), box_list[0]], dim=1)
    b1k, s1k = boxes(1000), torch.rand(1000, generator=g).to(device)
    cls1k = torch.randint(0, 80, (1000,), generator=g).to(device)
    masks = torch.rand(20, 28, 28, generator=g).to(device)
    mboxes = boxes(20, 100.0)
    codes, ref_boxes = rand(100, 4 * 8, scale=0.1), boxes(100)
    anchor_gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    image_list = ImageList(torch.zeros(1, 3, 128, 128, device=device), [(128, 128)])
    rpn_feats = [torch.zeros(1, 1, 128 // s, 128 // s, device=device) for s in (4, 8, 16, 32, 64)]
    geometry = anchor_gen.geometry(image_list, rpn_feats)
    a = sum(geometry.num_anchors_per_level)
    objectness, deltas = rand(1, a), rand(1, a, 4, scale=0.1)
    kw = dict(backend=backend)
    return {
        "roi_align (64 RoIs, 16 ch, 7x7)": lambda: ops.roi_align(feats[0], rois, 7, 0.25, 2, True, **kw),
        "multiscale_roi_align (64 RoIs, 4 levels)": lambda: ops.multiscale_roi_align(
            feats, box_list, 7, [(128, 128)], 2, **kw),
        "nms (1000 boxes)": lambda: ops.nms(b1k, s1k, 0.5, **kw),
        "batched_nms (1000 boxes, 80 classes)": lambda: ops.batched_nms(b1k, s1k, cls1k, 0.5, **kw),
        "nms_keep_mask (1000 boxes, 80 classes)": lambda: ops.nms_keep_mask(b1k, s1k, 0.5, cls1k, **kw),
        "decode_boxes (100 x 8 classes, clipped)": lambda: ops.decode_boxes(
            codes, ref_boxes, (10.0, 10.0, 5.0, 5.0), clip_to=(128, 128), **kw),
        "rpn_proposals_padded (128x128, pre 1000, post 1000)": lambda: ops.rpn_proposals_padded(
            objectness, deltas, geometry, [(128, 128)], pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7,
            **kw),
        "paste_masks (20 masks -> 100x100)": lambda: ops.paste_masks(masks, mboxes, (100, 100), **kw),
    }


def table(backend: str) -> list[tuple[str, dict]]:
    return [(name, count(fn).summary()) for name, fn in standard_cases(backend).items()]


# --------------------------------------------------------------------------- whole model

# The smallest Mask R-CNN that still runs every stage (transform, backbone, RPN, box head and
# its NMS, mask head, paste) on the CPU, Triton's interpreter included: a ResNet-18 FPN,
# 96-128 pixel images, few proposals and detections. box_score_thresh=0 keeps every detection
# slot filled, so post-processing does its full work.
MODEL_KW_CPU = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                    box_detections_per_img=10, box_score_thresh=0.0)
MODEL_IMAGE_CPU = (96, 120)
# On a GPU: the R50-FPN at the benchmark size, torchvision's defaults otherwise.
MODEL_KW_CUDA = dict(box_score_thresh=0.0)
MODEL_IMAGE_CUDA = (800, 1333)


def model_cases(backend: str, device: str = "cpu") -> dict:
    """name -> zero-argument callable: one inference of ``"torchvision eager"`` (torchvision's
    ``MaskRCNN``), ``"fastmask eager"`` (``model(images)``) and ``"fastmask static"``
    (``model.forward_padded(images)``, outputs left padded), the same weights in both
    (torchvision's random initialisation loaded strictly into fastmask), one image.

    On the CPU the model is a ResNet-18 FPN at ``MODEL_IMAGE_CPU`` (``MODEL_KW_CPU``); on
    CUDA the ResNet-50 FPN at 800x1333. ``backend`` is fastmask's ("triton" on CPU tensors
    needs ``TRITON_INTERPRET=1``). The models and the image are made here, outside the count."""
    # torchvision is a test and benchmark dependency, not one of the library's.
    from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from fastmask.models import build_mask_rcnn

    on_gpu = torch.device(device).type == "cuda"
    backbone, num_classes = ("resnet50", 91) if on_gpu else ("resnet18", 4)
    kw, hw = (MODEL_KW_CUDA, MODEL_IMAGE_CUDA) if on_gpu else (MODEL_KW_CPU, MODEL_IMAGE_CPU)
    torch.manual_seed(0)
    tv = TorchvisionMaskRCNN(resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=3),
                             num_classes=num_classes, **kw)
    fm = build_mask_rcnn(num_classes, backbone=backbone, backend=backend, **kw)
    fm.load_state_dict(tv.state_dict(), strict=True)
    tv, fm = tv.to(device).eval(), fm.to(device).eval()
    images = [torch.rand(3, *hw, generator=torch.Generator().manual_seed(0)).to(device)]

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn(images)
        return call

    return {"torchvision eager": no_grad(tv), "fastmask eager": no_grad(fm),
            "fastmask static": no_grad(fm.forward_padded)}


def _names(ops: list[str]) -> str:
    """``["a", "b", "a"]`` -> ``"a x2, b"`` (first-seen order)."""
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in collections.Counter(ops).items())


def model_table(backends, device: str = "cpu") -> list[dict]:
    """One row per (case, backend, whether fastmask's ops are entered), each a steady-state
    inference counted after a warm-up call.

    torchvision is counted once (it has no fastmask ops to enter; its own ``torchvision::``
    ops count as one aten op each). fastmask is counted around its ops (``entered=False``:
    what the model's own code issues, the registered ops' inner aten ops left out; their
    Triton launches are still counted) for every backend, and
    inside them too for the Triton backend, whose ops' host code is what runs on a GPU; the
    reference backend is not counted inside its ops (its NMS resolves tiles on the host by
    design: the specification, not a GPU path)."""
    rows = []
    for i, backend in enumerate(backends):
        cases = model_cases(backend, device)
        if i == 0:
            rows.append({"case": "torchvision eager", "backend": "-", "entered": False,
                         "counter": count(cases["torchvision eager"], enter_ops=False)})
        for name in ("fastmask eager", "fastmask static"):
            for entered in ((True, False) if backend == "triton" else (False,)):
                rows.append({"case": name, "backend": backend, "entered": entered,
                             "counter": count(cases[name], enter_ops=entered)})
    for r in rows:
        c = r["counter"]
        r.update(c.summary(), fastmask_ops=sum(o.startswith("fastmask.") for o in c.ops), sync_ops=_names(c.syncs))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("triton", "torch"), nargs="*", default=["triton", "torch"])
    parser.add_argument("--model", action="store_true",
                        help="count whole-model inferences (model_cases) instead of the single ops")
    parser.add_argument("--device", default="cpu", help="device of the --model cases (default: cpu)")
    args = parser.parse_args(argv)
    # The Triton kernels run on CPU tensors in Triton's interpreter, which Triton reads from
    # TRITON_INTERPRET when it is first imported: by fastmask's kernels or torchvision, both
    # imported lazily, after this line. Not for the model cases on a GPU, where the kernels run
    # on the device.
    if not (args.model and torch.device(args.device).type == "cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.model:
        # "inside fastmask ops": whether the aten ops the registered ops run are counted; Triton
        # launches are counted either way (the counter sees them wherever they happen).
        print("| case | backend | fastmask ops | inside fastmask ops | aten ops | launches | of them Triton | syncs "
              "| sync ops |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in model_table(args.backend, args.device):
            inside = "counted" if r["entered"] else ("-" if r["backend"] == "-" else "not counted")
            print(f"| {r['case']} | {r['backend']} | {r['fastmask_ops']} | {inside} | {r['aten_ops']} | "
                  f"{r['launches']} | {r['triton']} | {r['syncs']} | {r['sync_ops'] or '-'} |")
        return
    print("| op | backend | aten ops | launches | of them Triton | syncs |")
    print("|---|---|---|---|---|---|")
    for backend in args.backend:
        for name, s in table(backend):
            print(f"| {name} | {backend} | {s['aten_ops']} | {s['launches']} | {s['triton']} | {s['syncs']} |")


if __name__ == "__main__":
    main()
