"""Every Triton kernel compiles for an H100/H200 (sm_90) in each variant the ops launch.

The interpreter, which runs the other kernel tests on the CPU, accepts programs that the GPU
compiler rejects (mixed dtypes in ``tl.where``, a shape that is not a constexpr, an
unsupported cast), and it launches with its own wide block shapes. So the ops are called
here on inputs of the model's sizes (256 channels, batch 1 and 2, proposal and detection
counts, NMS past one chunk) and of the CUDA tests, with the GPU's launch shapes and
every launch recorded instead of run; each distinct variant is then compiled ahead of time
for sm_90 in a subprocess where Triton is not in interpreter mode.

What is compiled is what the GPU's JIT compiles: the arguments are passed through the JIT's
own binder (``create_function_from_signature`` and ``_pack_args``, as ``JITFunction.run``
does, for an sm_90 target), so pointers and integers get the same specialisation as on the
device (16-byte alignment and divisibility by 16 as attributes, integers equal to 1 as
constants, the kernels' ``do_not_specialize`` lists respected). Without it, the check
compiled other code than the GPU: ``_nms_reduce_kernel`` at W=128 needs 246 registers with
the real specialisation under Triton 3.6 and 168 without, and the first H200 run found two
RoI Align variants spilling that the check had passed.

What is gated, and why: a compile error fails the test with every Triton, since it is a
crash on the GPU whatever the release. Register spills (a stack in the cubin) fail it only
under Triton 3.6, the release of the GPU machine on which the project measures and tunes its
launch shapes (``.ci/oldest.txt``); a spill is a performance defect, and register allocation
changes with each Triton release, so under any other release the spills are reported as a
warning instead of failing a user's install. No GPU is needed: Triton brings its own
assembler and cuobjdump. What this cannot show (timing, numerics) is for the CUDA tests.

Every variant's registers, spill stack, shared memory and the blocks of it an H100/H200 SM
holds (occupancy) go into a table (``FASTMASK_COMPILE_REPORT=FILE`` writes it as FILE, JSON,
and FILE with ``.md``: the tables of benchmarks/NOTES.md). The variants the model launches
(256 channels, fp32/fp16/bf16) have a register budget per kernel (``REGISTER_BUDGET``):
under Triton 3.6 a model variant above its kernel's budget fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import pyramid_boxes, random_boxes

from fastmask import ops
from fastmask.kernels import nms as nms_kernels
from fastmask.ops.boxes import per_row_image_sizes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches through Triton's interpreter (CPU runs)")

# The Triton release whose spills fail the test: the GPU machine's (see the module docstring).
GATED_TRITON = "3.6"
# Launch keywords that are compiler options, not kernel arguments.
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")
# Registers per thread a variant on the model's path may take under Triton 3.6, per kernel:
# the budgets the kernels are held to (benchmarks/NOTES.md gives each kernel's figures and
# the occupancy they allow); a change that needs more must raise the budget here, in view.
REGISTER_BUDGET = {
    "_roi_align_fwd_kernel": 64,  # at most 64: four 8-warp blocks per SM
    "_roi_align_bwd_kernel": 64,
    "_roi_align_bin_kernel": 40,
    "_roi_align_bwd_det_kernel": 80,
    "_nms_key_kernel": 56,
    "_nms_gather_kernel": 32,
    "_nms_mask_kernel": 176,
    "_nms_cross_kernel": 80,
    "_nms_push_kernel": 104,
    "_nms_reduce_kernel": 255,
    "_decode_boxes_kernel": 32,
    "_rpn_candidates_kernel": 104,
    "_paste_masks_kernel": 48,
}
# An H100/H200 SM (sm_90): registers, warps, resident blocks, shared memory (bytes).
SM90 = {"registers": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024}


def blocks_per_sm(regs: int, warps: int, shared: int) -> int:
    """Blocks of a kernel one sm_90 SM holds at once: registers are allocated per warp in units
    of 256 (8 per thread), warps and blocks are capped, shared memory (1 KiB reserved per
    block) bounds the rest."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM90["registers"] // (per_warp * warps)
    by_shared = SM90["shared"] // (shared + 1024) if shared else SM90["blocks"]
    return min(SM90["blocks"], SM90["warps"] // warps, by_regs, by_shared)


def _is_constexpr(annotation) -> bool:
    return "constexpr" in (annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def _constexpr_value(value):
    """A JSON form of a constexpr argument (numbers, bools, None, or a Triton dtype)."""
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr of unexpected type {type(value).__name__}: {value!r}")


def _runtime_value(name: str, value) -> tuple[dict, tuple]:
    """(JSON form of a runtime argument, the part of it that decides its specialisation).

    A tensor is kept as its dtype and address modulo 128 (alignment is all the JIT looks
    at); a number as itself. The key folds values that specialise alike (an integer's
    equality to 1, divisibility by 16 and width) so that one variant is compiled once.
    """
    if isinstance(value, torch.Tensor):
        addr = value.data_ptr() % 128
        return {"tensor": str(value.dtype).replace("torch.", ""), "addr": addr}, ("t", str(value.dtype), addr % 16)
    if isinstance(value, bool):
        return {"bool": value}, ("b",)
    if isinstance(value, int):
        return {"int": value}, ("i", value == 1, value % 16 == 0, -2**31 <= value < 2**31)
    if isinstance(value, float):
        return {"float": value}, ("f",)
    raise TypeError(f"argument {name} of unexpected type {type(value).__name__}")


# Whether the launches being recorded are the model's (the drivers set it).
state = {"model": True}


@pytest.fixture
def recorded(monkeypatch):
    """Kernel launches with the GPU's launch shapes, recorded (not run) as
    ``{module, kernel, args, options, model}``, one per distinct specialisation (``model``:
    launched by a model-shaped call, in fp32/fp16/bf16); outputs stay zero."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    import fastmask.kernels._common

    monkeypatch.setattr(fastmask.kernels._common, "FORCE_GPU_LAUNCH", True)
    state["model"] = True
    # Kernels do not run, so the buffers they would fill are zeroed instead of left
    # uninitialised (the ops' own checks would otherwise see whatever memory held).
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: _real(*a, **k).zero_())
    records: dict[str, dict] = {}

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        bound = dict(zip(self.arg_names, args)) | kwargs
        values, key = {}, []
        for name, param in params.items():
            if name not in bound and param.default is not inspect.Parameter.empty:
                continue  # the JIT's binder fills defaults itself
            if _is_constexpr(param.annotation):
                values[name] = {"constexpr": _constexpr_value(bound[name])}
                key.append(json.dumps(values[name], sort_keys=True))
            else:
                values[name], k = _runtime_value(name, bound[name])
                key.append(k)
        model = state["model"] and not any(v.get("tensor") == "float64" for v in values.values())
        rec = {"module": self.fn.__module__, "kernel": self.fn.__name__, "args": values, "options": options,
               "model": False}
        rec = records.setdefault(json.dumps([rec["module"], rec["kernel"], key, options], sort_keys=True,
                                            default=str), rec)
        rec["model"] |= model

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return records


def _drive_roi_align():
    g = torch.Generator().manual_seed(0)
    shapes = [(13, 17), (7, 9), (4, 5), (2, 3)]
    # 256 channels (the model's) at batch 1 and 2, and the CUDA tests' small channel counts.
    for channels, batch in ((256, 1), (256, 2), (16, 2), (8, 1)):
        state["model"] = channels == 256
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for channels_last in (False, True):
                feats = [torch.randn(batch, channels, h, w, generator=g).to(dtype) for h, w in shapes]
                if channels_last:
                    feats = [f.to(memory_format=torch.channels_last) for f in feats]
                feats = [f.requires_grad_() for f in feats]
                boxes = [pyramid_boxes(3, (52, 68), seed=i) for i in range(batch)]
                for size, deterministic in ((7, False), (14, True), (7, True), (14, False)):
                    out = ops.multiscale_roi_align(feats, boxes, size, [(52, 68)] * batch, backend="triton",
                                                   deterministic=deterministic)
                    out.float().sum().backward()
    state["model"] = False  # below: single-level RoI Align, the CUDA tests' shapes
    single = torch.randn(1, 8, 11, 13, generator=g, requires_grad=True)
    rois = torch.cat([torch.zeros(4, 1), random_boxes(4, 40.0, generator=g)], 1)
    for aligned, ratio in ((False, -1), (True, 2)):
        ops.roi_align(single, rois, (5, 6), 0.25, ratio, aligned, backend="triton").sum().backward()
    # The single-level CUDA tests' shapes: odd channel counts, and a layout that is neither
    # NCHW nor channels-last (H and W strides swapped), whose strides specialise otherwise.
    x = torch.randn(2, 12, 13, 17, generator=g)
    for layout in (x, x.transpose(2, 3).contiguous().transpose(2, 3), x.to(memory_format=torch.channels_last)):
        for size in ((3, 5), (7, 7), (4, 3)):
            leaf = layout.detach().clone().requires_grad_()
            ops.roi_align(leaf, rois, size, 0.5, 2, True, backend="triton").sum().backward()
    # fp64 (gradcheck's dtype; not the model's): both layouts, both backwards.
    for layout in (x, x.to(memory_format=torch.channels_last)):
        leaf = layout.detach().double().requires_grad_()
        for deterministic in (False, True):
            ops.roi_align(leaf, rois.double(), (7, 7), 0.5, 2, True, backend="triton",
                          deterministic=deterministic).sum().backward()
    odd = torch.randn(2, 5, 8, 9, generator=g, requires_grad=True)
    ops.roi_align(odd, rois, (4, 5), 1.0, 3, False, backend="triton").sum().backward()
    # One RoI: K == 1 is specialised as a constant where the kernel lets it be.
    ops.roi_align(single, rois[:1], 7, 0.25, 2, True, backend="triton").sum().backward()
    state["model"] = True


def _drive_nms():
    g = torch.Generator().manual_seed(1)
    # Box counts set the walk's width W (a constexpr, from nms.W_BUCKETS): up to 1024 boxes
    # W=16, up to 8192 W=128, past one window of 8192 windows of W=128 and the push kernel,
    # and past one chunk the gather and cross-chunk kernels (over 8192 fp64 boxes, over 32768
    # of the others).
    for n, dtypes in ((5, [torch.float32]), (300, [torch.float32, torch.float16, torch.bfloat16, torch.float64]),
                      (2100, [torch.float32]), (8192, [torch.float32]), (9000, [torch.float32, torch.float64]),
                      (20000, [torch.float32]), (40000, [torch.float32])):
        boxes = random_boxes(n, 200.0, generator=g)
        scores = torch.rand(n, generator=g)
        for dtype in dtypes:
            ops.nms(boxes.to(dtype), scores.to(dtype), 0.5, backend="triton")
    boxes = random_boxes(300, 200.0, generator=g)
    ops.batched_nms(boxes, torch.rand(300, generator=g), torch.randint(0, 7, (300,), generator=g), 0.5,
                    backend="triton")
    # Presorted (the RPN's): two images of 5000 boxes in 5 groups, past one window.
    boxes = random_boxes(10000, 200.0, generator=g).reshape(2, 5000, 4)
    groups = torch.arange(5).repeat_interleave(1000).expand(2, 5000)
    nms_kernels.keep_mask_presorted(boxes, groups, None, 0.7)
    for images in (1, 2):
        boxes = random_boxes(images * 50, 100.0, generator=g).reshape(images, 50, 4)
        ops.nms_keep_mask(boxes, torch.rand(images, 50, generator=g), 0.7,
                          idxs=torch.randint(0, 3, (images, 50), generator=g),
                          valid=torch.rand(images, 50, generator=g) > 0.2, backend="triton")


def _drive_boxes_and_proposals():
    g = torch.Generator().manual_seed(2)
    anchors = random_boxes(30, 60.0, 1.0, generator=g)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        deltas = torch.randn(30, 4 * 3, generator=g).to(dtype)
        ops.decode_boxes(deltas, anchors.to(dtype), (10.0, 10.0, 5.0, 5.0), backend="triton")
        ops.decode_boxes(deltas, anchors.to(dtype), clip_to=(50, 70), backend="triton")
        ops.decode_boxes(deltas[:, :4], anchors.to(dtype), backend="triton")  # one class: K == 1
    sizes = per_row_image_sizes([(50, 70), (40, 64)], [10, 20], anchors.device)
    ops.decode_boxes(torch.randn(30, 8, generator=g), anchors, clip_to=sizes, backend="triton")

    gen = ops.AnchorGenerator(((8,), (16,)), ((0.5, 1.0, 2.0),) * 2)
    for images in (1, 2):
        image_list = SimpleNamespace(tensors=torch.zeros(images, 3, 32, 40),
                                     image_sizes=[(30, 40), (32, 36)][:images])
        feats = [torch.zeros(images, 1, 8, 10), torch.zeros(images, 1, 4, 5)]
        a = sum(h * w * 3 for h, w in ((8, 10), (4, 5)))
        objectness, deltas = torch.randn(images, a, generator=g), torch.randn(images, a, 4, generator=g) * 0.2
        kw = dict(pre_nms_top_n=50, post_nms_top_n=20, nms_thresh=0.7, backend="triton")
        # Anchors computed in the kernel from the geometry, and anchors read from tensors.
        ops.rpn_proposals(objectness, deltas, gen.geometry(image_list, feats), image_list.image_sizes, **kw)
        ops.rpn_proposals(objectness, deltas, list(gen(image_list, feats)), image_list.image_sizes,
                          [240, 60], **kw)


def _drive_mask_paste():
    g = torch.Generator().manual_seed(3)
    for n in (5, 1):
        boxes = random_boxes(n, 40.0, 2.0, generator=g)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            masks = torch.rand(n, 1, 28, 28, generator=g).to(dtype)
            ops.paste_masks(masks, boxes, (48, 56), backend="triton")
            ops.paste_masks(masks, boxes, (48, 56), threshold=0.5, backend="triton")
            ops.paste_masks_in_boxes(masks, boxes.to(dtype), threshold=0.5, backend="triton")
            ops.paste_masks_in_boxes(masks, boxes, backend="triton")


COMPILE = textwrap.dedent("""
    import importlib, json, os, sys, tempfile, time
    from concurrent.futures import ProcessPoolExecutor

    TARGET = ("cuda", 90, 32)


    class DevicePointer:
        # What the JIT's binder sees of a tensor argument: its dtype and its address.
        def __init__(self, dtype, addr):
            self.dtype, self._addr = dtype, addr

        def data_ptr(self):
            return self._addr


    def argument(value):
        import torch
        import triton.language as tl

        if "constexpr" in value:
            v = value["constexpr"]
            return tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v
        if "tensor" in value:  # a device-like address with the recorded alignment
            return DevicePointer(getattr(torch, value["tensor"]), 0x7F0000000000 + value["addr"])
        (v,) = value.values()
        return v


    def specialise(fn, kwargs):
        # JITFunction.run's path from arguments to compile inputs, minus the device query.
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        target = GPUTarget(*TARGET)
        backend = make_backend(target)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        return ASTSource(fn, signature, constexprs, attrs), target, options


    def compile_one(rec):
        import triton

        fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
        kwargs = {name: argument(v) for name, v in rec["args"].items()} | rec["options"]
        consts = {k: v["constexpr"] for k, v in rec["args"].items() if "constexpr" in v}
        t0 = time.perf_counter()
        # The variant's name: its constexprs, options and, where not fp32, its tensors' dtypes.
        dtypes = {k: v["tensor"] for k, v in rec["args"].items() if v.get("tensor", "float32") != "float32"}
        what = f"{rec['kernel']} {consts} {rec['options']}" + (f" {dtypes}" if dtypes else "")
        try:
            src, target, options = specialise(fn, kwargs)
            kernel = triton.compile(src, target=target, options=options.__dict__)
        except Exception as exc:  # report every failing variant, not just the first
            # The message's first line and last lines (a compile error ends with the source
            # line and a caret under it, after the reason).
            lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [repr(exc)]
            return {"error": f"{what}: " + " | ".join(dict.fromkeys(lines[:1] + lines[-4:]))[:1200]}
        regs, stack = resources(kernel.asm["cubin"])
        shared = int(getattr(kernel.metadata, "shared", 0) or 0)  # bytes of (dynamic) shared memory
        warps = int(kernel.metadata.num_warps)
        print(f"{time.perf_counter() - t0:6.1f} s {regs:4d} regs {stack:3d} B stack  {what}", file=sys.stderr,
              flush=True)
        return {"what": what, "kernel": rec["kernel"], "model": rec["model"], "regs": regs, "stack": stack,
                "shared": shared, "warps": warps}


    def resources(cubin):
        # (registers, bytes of per-thread stack: register spills), read as the GPU session's
        # register report reads them (the checkout is on PYTHONPATH).
        from pathlib import Path

        from benchmarks.kernel_resources import cubin_resources, cuobjdump

        tool = cuobjdump()
        if tool is None:
            return -1, 0
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            regs, stack, _shared = cubin_resources(Path(f.name), tool) or (-1, 0, 0)
        return regs, stack


    if __name__ == "__main__":
        import triton

        records = json.load(open(sys.argv[1]))
        with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            results = list(pool.map(compile_one, records))
        print(json.dumps({"triton": triton.__version__, "results": results}))
""")


def _table(report) -> str:
    """The report as a Markdown table: per kernel, its variants (worst registers first)."""
    lines = [f"sm_90 compile of every variant the ops launch, Triton {report['triton']} "
             "(tests/test_kernel_compile.py). model: launched by the model's shapes; blocks: per SM.", "",
             "| kernel | variant | warps | registers | budget | stack B | shared B | blocks | occupancy | model |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["results"], key=lambda r: (r["kernel"], -r["regs"], r["what"])):
        variant = r["what"][len(r["kernel"]) + 1:].replace("|", "/")
        budget = REGISTER_BUDGET.get(r["kernel"], "-")
        lines.append(f"| {r['kernel']} | {variant} | {r['warps']} | {r['regs']} | {budget} "
                     f"| {r['stack']} | {r['shared']} | {r['blocks_per_sm']} | {r['occupancy']:.0%} "
                     f"| {'yes' if r['model'] else ''} |")
    return "\n".join(lines) + "\n"


def test_every_kernel_variant_compiles_for_sm90(recorded, tmp_path):
    _drive_roi_align()
    _drive_nms()
    _drive_boxes_and_proposals()
    _drive_mask_paste()
    kernels = {r["kernel"] for r in recorded.values()}
    expected = {"_roi_align_fwd_kernel", "_roi_align_bwd_kernel", "_roi_align_bin_kernel", "_roi_align_bwd_det_kernel",
                "_nms_key_kernel", "_nms_gather_kernel", "_nms_mask_kernel", "_nms_cross_kernel", "_nms_push_kernel",
                "_nms_reduce_kernel",
                "_decode_boxes_kernel",
                "_rpn_candidates_kernel", "_paste_masks_kernel"}
    assert expected <= kernels, f"not launched: {sorted(expected - kernels)}"
    widths = {r["args"]["W"]["constexpr"] for r in recorded.values() if r["kernel"] == "_nms_reduce_kernel"}
    assert widths == set(nms_kernels.W_BUCKETS), f"NMS bitmask widths driven: {sorted(widths)}"

    path = tmp_path / "launches.json"
    path.write_text(json.dumps(list(recorded.values())))
    if os.environ.get("FASTMASK_KEEP_LAUNCHES"):
        Path(os.environ["FASTMASK_KEEP_LAUNCHES"]).write_text(json.dumps(list(recorded.values()), indent=1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = tmp_path / "compile_sm90.py"  # a file, so that the worker processes can import it
    script.write_text(COMPILE)
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert len(results) == len(recorded)
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, f"{len(errors)} of {len(results)} variants fail to compile:\n" + "\n".join(errors)
    assert all(r["regs"] > 0 for r in results), "cuobjdump gave no register counts"
    for r in results:
        r["blocks_per_sm"] = blocks_per_sm(r["regs"], r["warps"], r["shared"])
        r["occupancy"] = r["blocks_per_sm"] * r["warps"] / SM90["warps"]
    table = _table(report)
    assert table.count("\n| _") == len(results), "one table row per variant"
    if os.environ.get("FASTMASK_COMPILE_REPORT"):  # the per-variant figures, for benchmarks/NOTES.md
        out = Path(os.environ["FASTMASK_COMPILE_REPORT"])
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(table)
    unbudgeted = sorted(kernels - set(REGISTER_BUDGET))
    assert not unbudgeted, f"kernels without a register budget: {unbudgeted}"
    over = [f"{r['what']}: {r['regs']} registers, budget {REGISTER_BUDGET[r['kernel']]}" for r in results
            if r["model"] and r["regs"] > REGISTER_BUDGET[r["kernel"]]]
    if over and report["triton"].startswith(GATED_TRITON + "."):
        pytest.fail(f"{len(over)} model variants over their kernel's register budget:\n" + "\n".join(over))
    spills = [f"{r['what']}: {r['regs']} registers, {r['stack']}-byte stack" for r in results if r["stack"]]
    if spills:
        message = f"{len(spills)} of {len(results)} variants spill registers under Triton {report['triton']}:\n" \
                  + "\n".join(spills)
        if report["triton"].startswith(GATED_TRITON + "."):
            pytest.fail(message)
        warnings.warn(message)
