"""Every Triton kernel compiles for an H100 (sm_90) in each variant the ops launch.

The interpreter, which runs the other kernel tests on the CPU, accepts programs that the GPU
compiler rejects (mixed dtypes in ``tl.where``, a shape that is not a constexpr, an
unsupported cast), and it launches with its own wide block shapes. So the ops are called
here once per variant (dtypes, layouts, forward and both backwards, thresholds, clipping
modes) on tiny inputs with the GPU's launch shapes and every launch recorded instead of run;
each recorded specialisation is then compiled ahead of time for sm_90 in a subprocess where
Triton is not in interpreter mode, and must not spill registers to local memory (a launch
shape too big for its warps). No GPU is needed: Triton brings its own assembler and
cuobjdump. What this cannot show (timing, numerics on the device) is for the CUDA tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import pyramid_boxes, random_boxes

from fastmask import ops
from fastmask.ops.boxes import per_row_image_sizes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches through Triton's interpreter (CPU runs)")

# torch dtypes as Triton names them in kernel signatures.
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                torch.bool: "i1"}
# Launch keywords that are compiler options, not kernel arguments.
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


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


def _runtime_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name} of unexpected type {type(value).__name__}")


@pytest.fixture
def recorded(monkeypatch):
    """Kernel launches with the GPU's launch shapes, recorded (not run) as
    ``{module, kernel, signature, constexprs, options}``; outputs stay uninitialised."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    import fastmask.kernels._common

    monkeypatch.setattr(fastmask.kernels._common, "FORCE_GPU_LAUNCH", True)
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
        signature, constexprs = {}, {}
        for name, param in params.items():
            value = bound.get(name, param.default)
            if _is_constexpr(param.annotation):
                signature[name] = "constexpr"
                constexprs[name] = _constexpr_value(value)
            else:
                signature[name] = _runtime_type(name, value)
        rec = {"module": self.fn.__module__, "kernel": self.fn.__name__, "signature": signature,
               "constexprs": constexprs, "options": options}
        records[json.dumps(rec, sort_keys=True)] = rec

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return records


def _drive_roi_align():
    g = torch.Generator().manual_seed(0)
    shapes = [(13, 17), (7, 9), (4, 5), (2, 3)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            # 256 channels, as the model's: the block shapes follow the channel count.
            feats = [torch.randn(2, 256, h, w, generator=g).to(dtype) for h, w in shapes]
            if channels_last:
                feats = [f.to(memory_format=torch.channels_last) for f in feats]
            feats = [f.requires_grad_() for f in feats]
            boxes = [pyramid_boxes(3, (52, 68), seed=i) for i in range(2)]
            for size, deterministic in ((7, False), (14, True)):
                out = ops.multiscale_roi_align(feats, boxes, size, [(52, 68)] * 2, backend="triton",
                                               deterministic=deterministic)
                out.float().sum().backward()
    single = torch.randn(1, 8, 11, 13, generator=g, requires_grad=True)
    rois = torch.cat([torch.zeros(4, 1), random_boxes(4, 40.0, generator=g)], 1)
    for aligned, ratio in ((False, -1), (True, 2)):
        ops.roi_align(single, rois, (5, 6), 0.25, ratio, aligned, backend="triton").sum().backward()


def _drive_nms():
    g = torch.Generator().manual_seed(1)
    # Box counts set the bitmask width (a constexpr): one, a few and many 64-box words.
    for n, dtypes in ((5, [torch.float32]), (300, [torch.float32, torch.float16, torch.bfloat16, torch.float64]),
                      (2100, [torch.float32])):
        boxes = random_boxes(n, 200.0, generator=g)
        scores = torch.rand(n, generator=g)
        for dtype in dtypes:
            ops.nms(boxes.to(dtype), scores.to(dtype), 0.5, backend="triton")
    boxes = random_boxes(300, 200.0, generator=g)
    ops.batched_nms(boxes, torch.rand(300, generator=g), torch.randint(0, 7, (300,), generator=g), 0.5,
                    backend="triton")
    boxes = random_boxes(2 * 50, 100.0, generator=g).reshape(2, 50, 4)
    ops.nms_keep_mask(boxes, torch.rand(2, 50, generator=g), 0.7, idxs=torch.randint(0, 3, (2, 50), generator=g),
                      valid=torch.rand(2, 50, generator=g) > 0.2, backend="triton")


def _drive_boxes_and_proposals():
    g = torch.Generator().manual_seed(2)
    anchors = random_boxes(30, 60.0, 1.0, generator=g)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        deltas = torch.randn(30, 4 * 3, generator=g).to(dtype)
        ops.decode_boxes(deltas, anchors.to(dtype), (10.0, 10.0, 5.0, 5.0), backend="triton")
        ops.decode_boxes(deltas, anchors.to(dtype), clip_to=(50, 70), backend="triton")
    sizes = per_row_image_sizes([(50, 70), (40, 64)], [10, 20], anchors.device)
    ops.decode_boxes(torch.randn(30, 8, generator=g), anchors, clip_to=sizes, backend="triton")

    gen = ops.AnchorGenerator(((8,), (16,)), ((0.5, 1.0, 2.0),) * 2)
    image_list = SimpleNamespace(tensors=torch.zeros(2, 3, 32, 40), image_sizes=[(30, 40), (32, 36)])
    feats = [torch.zeros(2, 1, 8, 10), torch.zeros(2, 1, 4, 5)]
    a = sum(h * w * 3 for h, w in ((8, 10), (4, 5)))
    objectness, deltas = torch.randn(2, a, generator=g), torch.randn(2, a, 4, generator=g) * 0.2
    kw = dict(pre_nms_top_n=50, post_nms_top_n=20, nms_thresh=0.7, backend="triton")
    # Anchors computed in the kernel from the geometry, and anchors read from tensors.
    ops.rpn_proposals(objectness, deltas, gen.geometry(image_list, feats), image_list.image_sizes, **kw)
    ops.rpn_proposals(objectness, deltas, list(gen(image_list, feats)), image_list.image_sizes, [240, 60], **kw)


def _drive_mask_paste():
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(5, 40.0, 2.0, generator=g)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        masks = torch.rand(5, 1, 28, 28, generator=g).to(dtype)
        ops.paste_masks(masks, boxes, (48, 56), backend="triton")
        ops.paste_masks(masks, boxes, (48, 56), threshold=0.5, backend="triton")
        ops.paste_masks_in_boxes(masks, boxes.to(dtype), threshold=0.5, backend="triton")


COMPILE = textwrap.dedent("""
    import importlib, json, os, sys, time
    from concurrent.futures import ProcessPoolExecutor

    def compile_one(rec):
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
        names = list(rec["signature"])
        consts = {}
        for name, value in rec["constexprs"].items():
            if isinstance(value, dict):
                value = tl.dtype(value["tl_dtype"])
            consts[(names.index(name),)] = value
        t0 = time.perf_counter()
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=rec["signature"], constexprs=consts),
                                    target=GPUTarget("cuda", 90, 32), options=rec["options"])
            error = None
        except Exception as exc:  # report every failing variant, not just the first
            error = (f"{rec['kernel']} {rec['constexprs']} {rec['signature']}: "
                     + str(exc).strip().splitlines()[-1][:400])
        else:
            stack = stack_bytes(kernel.asm["cubin"])
            if stack:  # registers spilled to local memory: a launch-shape regression
                error = f"{rec['kernel']} {rec['constexprs']} {rec['signature']}: spills ({stack}-byte stack)"
        print(f"{time.perf_counter() - t0:6.1f} s {rec['kernel']} {rec['constexprs']}", file=sys.stderr, flush=True)
        return error

    def stack_bytes(cubin):
        # Bytes of per-thread stack (register spills) in the cubin, from Triton's cuobjdump (0 if absent).
        import re, subprocess, tempfile
        import triton

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if not os.path.exists(tool):
            return 0
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        return max((int(v) for v in re.findall(r"STACK:(\\d+)", report)), default=0)

    if __name__ == "__main__":
        records = json.load(open(sys.argv[1]))
        with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            failures = [e for e in pool.map(compile_one, records) if e]
        print(json.dumps({"compiled": len(records) - len(failures), "failures": failures}))
""")


def test_every_kernel_variant_compiles_for_sm90(recorded, tmp_path):
    _drive_roi_align()
    _drive_nms()
    _drive_boxes_and_proposals()
    _drive_mask_paste()
    kernels = {r["kernel"] for r in recorded.values()}
    expected = {"_roi_align_fwd_kernel", "_roi_align_bwd_kernel", "_roi_align_bwd_det_kernel",
                "_nms_mask_kernel", "_nms_reduce_kernel", "_decode_boxes_kernel", "_rpn_candidates_kernel",
                "_paste_masks_kernel"}
    assert expected <= kernels, f"not launched: {sorted(expected - kernels)}"

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
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert result["compiled"] == len(recorded)
