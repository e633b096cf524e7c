"""Host cost of one RoI Align launch: the Python work per call of ``roi_align_fwd`` and
``roi_align_bwd`` at a tiny RoI count, where the kernel itself takes a few microseconds.

On the H200 the op sat on 0.2-0.6 ms of host work per call whatever the RoI count, most of
it the launch of a 53-59 argument kernel; the kernels now take a level descriptor (one
device table) and 15-19 arguments. This script measures that cost, on a GPU or without one.

  python -m benchmarks.launch_overhead                   # CUDA if available, else --dry
  python -m benchmarks.launch_overhead --dry             # no GPU needed (see below)
  python -m benchmarks.launch_overhead --module OLD.py   # another version of kernels/roi_align.py,
                                                         # e.g. `git show REV:kernels/roi_align.py`
  python -m benchmarks.launch_overhead --ops [--dry]     # every public op's whole call instead (the
                                                         # sizes of benchmarks.dispatch_count)

Cases: FPN P2-P5 of a 512x512 image, 256 channels, batch 2, fp32, 8 RoIs, 7x7 output:
forward (NCHW and channels-last), atomic backward and deterministic backward (NCHW; both
into a preallocated gradient buffer, so the zero fill, a separate launch, is not counted),
and the forward with its descriptor cache cleared before each call (the cost of a new
geometry: building the table and its copy to the device).

What is timed, per call (median of ``--repeats`` loops of ``--calls`` calls):
  host_us    perf_counter around the loop / calls (and its minimum over the loops, steadier on
             a busy machine). On CUDA the kernels are queued, so this is the Python side: plan
             lookup, allocation, Triton's JITFunction.run (binder, cache key) and its C launcher.
  device_us  CUDA only: CUDA events around the same loop / calls; equal to host_us when the
             loop is host-bound (the GPU waits on Python), lower bound of the kernel otherwise.
  binder_us  Triton's binder alone on the arguments of the op's last launch: the generated
             ``dynamic_func`` (binding and specialising every argument) plus
             ``compute_cache_key``, what JITFunction.run does per argument before launching.
--dry (CPU): the same calls on CPU tensors through Triton's JIT, not its interpreter: a
stand-in driver reports an sm_90 device and the compiled kernel is replaced by a stub, so
nothing is compiled or run. host_us is then fastmask's Python plus JITFunction.run up to
the launch; the stub's launch only asks each tensor argument for its address, as the C
launcher does, and the launcher's own argument unpacking and cuLaunchKernel are not counted.
Times on the CPU are the machine's, comparable between versions on one machine only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

SHAPES = [(128, 128), (64, 64), (32, 32), (16, 16)]  # P2-P5 of 512x512
CHANNELS, BATCH, ROIS, OUTPUT = 256, 2, 8, 7


def _dry_setup():
    """Triton's JIT as on an sm_90 device, without one: must run before Triton is imported."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class Sm90Driver:  # what JITFunction.run asks of the active driver
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class NoLaunch:  # a compiled kernel whose launch only reads the pointers, as the C launcher does
        function, packed_metadata = None, None

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            for a in args[9:]:
                if hasattr(a, "data_ptr"):
                    a.data_ptr()

    def no_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = NoLaunch()
        self.device_caches[device][0][key] = kernel
        return kernel

    driver.set_active(Sm90Driver())
    JITFunction._do_compile = no_compile
    import fastmask.kernels._common as common

    common.FORCE_GPU_LAUNCH = True  # the GPU's block shapes and grids
    return triton


def _load(module_path: str | None):
    if module_path is None:
        import fastmask.kernels.roi_align as mod

        return mod
    name = "fastmask.kernels._roi_align_timed"  # inside the package, for its relative imports
    import fastmask.kernels  # noqa: F401

    spec = importlib.util.spec_from_file_location(name, module_path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _problem(device, torch):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(BATCH, CHANNELS, h, w, generator=g).to(device) for h, w in SHAPES]
    side = torch.rand(ROIS, generator=g) * 400 + 16
    x1, y1 = torch.rand(ROIS, generator=g) * 100, torch.rand(ROIS, generator=g) * 100
    rois = torch.stack([torch.arange(ROIS) % BATCH, x1, y1, x1 + side, y1 + side], 1).float().contiguous().to(device)
    return feats, rois


def _recorded_launch(mod, fn):
    """Run ``fn`` once with JITFunction.run wrapped; return [(kernel, args, kwargs)] of its launches."""
    from triton.runtime.jit import JITFunction

    seen, real = [], JITFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, dict(kwargs)))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = spy
    try:
        fn()
    finally:
        JITFunction.run = real
    return seen


def _binder_us(launch, calls: int) -> float:
    """Triton's binder plus cache key on one recorded launch, in us per call."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    kernel, args, kwargs = launch
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    device = next(iter(kernel.device_caches))
    _, key_cache, _, _, binder = kernel.device_caches[device]
    t0 = time.perf_counter()
    for _ in range(calls):
        _, specialization, options = binder(*args, **kwargs)
        compute_cache_key(key_cache, specialization, options)
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="no GPU: Triton's JIT up to the launch (see above)")
    parser.add_argument("--module", help="a kernels/roi_align.py to time instead of the installed one")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--ops", action="store_true",
                        help="time each public op's whole call (glue, registered op, launches) instead")
    args = parser.parse_args(argv)

    dry = args.dry
    if not dry:
        import torch

        dry = not torch.cuda.is_available()
        if dry and "triton" in sys.modules:
            parser.error("no CUDA device; run with --dry in a fresh process")
    if dry:
        if "triton" in sys.modules:
            parser.error("--dry must set up Triton before it is imported: run it in a fresh process")
        _dry_setup()
    import torch
    from triton.runtime.jit import JITFunction

    if args.ops:
        return _time_ops(dry, args)
    mod = _load(args.module)
    if not isinstance(mod._roi_align_fwd_kernel, JITFunction):
        parser.error("Triton is in interpreter mode (TRITON_INTERPRET=1): unset it")
    device = torch.device("cpu" if dry else "cuda")
    feats, rois = _problem(device, torch)
    feats_cl = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    scales = [1.0 / s for s in (4, 8, 16, 32)]
    geometry = dict(output_size=(OUTPUT, OUTPUT), scales=scales, sampling_ratio=2, aligned=False,
                    canonical_scale=224.0, canonical_level=4, k_min=2, k_max=5)
    shapes = [tuple(f.shape) for f in feats]
    grad = torch.randn(ROIS, CHANNELS, OUTPUT, OUTPUT, device=device)
    total = sum(BATCH * CHANNELS * h * w for h, w in SHAPES)
    buf = torch.zeros(total, device=device)

    def clear_plans():
        for name in ("_FWD_PLANS", "_BWD_PLANS"):
            getattr(mod, name, {}).clear()

    def fwd_miss():
        clear_plans()
        mod.roi_align_fwd(feats, rois, **geometry)

    cases = {
        "fwd nchw": lambda: mod.roi_align_fwd(feats, rois, **geometry),
        "fwd channels_last": lambda: mod.roi_align_fwd(feats_cl, rois, **geometry),
        "bwd nchw atomic": lambda: mod.roi_align_bwd(grad, rois, shapes, [False] * 4, out=buf, **geometry),
        "bwd nchw deterministic": lambda: mod.roi_align_bwd(grad, rois, shapes, [False] * 4, deterministic=True,
                                                            out=buf, **geometry),
    }
    if hasattr(mod, "_FWD_PLANS"):
        cases["fwd nchw, new geometry"] = fwd_miss

    rows = []
    for name, fn in cases.items():
        launches = _recorded_launch(mod, fn)  # also the warm-up: compiles on first use
        kernel = launches[-1][0]
        n_args = sum(1 for p in kernel.params if not p.is_constexpr)
        host, dev = [], []
        for _ in range(args.repeats):
            if not dry:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn()
            host.append((time.perf_counter() - t0) / args.calls * 1e6)
            if not dry:
                end.record()
                torch.cuda.synchronize()
                dev.append(start.elapsed_time(end) / args.calls * 1e3)
        row = {"case": name, "kernel": kernel.fn.__name__, "runtime_args": n_args, "params": len(kernel.params),
               "host_us": statistics.median(host), "host_min_us": min(host),
               "binder_us": _binder_us(launches[-1], args.calls * 5)}
        if dev:
            row["device_us"] = statistics.median(dev)
        rows.append(row)

    import triton

    where = "dry (CPU, sm_90 JIT up to the launch)" if dry else torch.cuda.get_device_name()
    print(f"# {args.module or 'fastmask.kernels.roi_align'}; {where}; torch {torch.__version__}, "
          f"triton {triton.__version__}; {args.repeats} x {args.calls} calls")
    print(f"{'case':26s} {'kernel':28s} {'args':>4s} {'params':>6s} {'host_us':>8s} {'(min)':>7s} {'device_us':>9s} "
          f"{'binder_us':>9s}")
    for r in rows:
        print(f"{r['case']:26s} {r['kernel']:28s} {r['runtime_args']:4d} {r['params']:6d} {r['host_us']:8.1f} "
              f"{r['host_min_us']:7.1f} {r.get('device_us', float('nan')):9.1f} {r['binder_us']:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"where": where, "module": args.module, "torch": torch.__version__,
                                               "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


def _time_ops(dry: bool, args) -> int:
    """Host time of one whole call of each public op (Triton backend): the Python glue, the
    registered op's dispatch, the torch ops around the kernels and the launches. With --dry the
    torch ops run on CPU tensors (their CPU time, not a launch) and the kernels do not run."""
    import torch
    import triton

    from .dispatch_count import data_checks, standard_cases

    if dry:
        # fastmask allows backend="triton" on CPU tensors only under the interpreter flag, which
        # triton.jit also reads when a kernel is defined: the kernels are imported first, so
        # their real JIT (stubbed) is what runs.
        import fastmask.kernels.box_decode, fastmask.kernels.mask_paste  # noqa: E401, F401
        import fastmask.kernels.nms, fastmask.kernels.roi_align  # noqa: E401, F401

        os.environ["TRITON_INTERPRET"] = "1"
    device = "cpu" if dry else "cuda"
    rows = []
    with data_checks(False):
        for name, fn in standard_cases("triton", device).items():
            fn()  # warm-up: compiles, fills the host-side caches
            host = []
            for _ in range(args.repeats):
                if not dry:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                host.append((time.perf_counter() - t0) / args.calls * 1e6)
            rows.append({"case": name, "host_us": statistics.median(host), "host_min_us": min(host)})
    where = "dry (CPU, sm_90 JIT up to the launch)" if dry else torch.cuda.get_device_name()
    print(f"# public ops, Triton backend; {where}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{args.repeats} x {args.calls} calls")
    print(f"{'op':54s} {'host_us':>8s} {'(min)':>7s}")
    for r in rows:
        print(f"{r['case']:54s} {r['host_us']:8.1f} {r['host_min_us']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"where": where, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
