"""Timing and reporting shared by the benchmarks.

Timing method (DESIGN.md, "Benchmarks"): warm up first (compilation, autotuning and
allocation stay out of the numbers), then take the median of many runs. On CUDA this is
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); on the CPU a
``perf_counter`` loop. Callers that pass several input sets get them rotated, so repeated
runs do not measure a cache holding one input.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

import torch


def _cycle(fn: Callable, inputs: Sequence | None) -> Callable[[], object]:
    if not inputs:
        return fn
    it = itertools.cycle(inputs)
    return lambda: fn(*next(it))


def bench(fn: Callable, inputs: Sequence | None = None, *, device: str = "cuda", warmup_ms: float = 50,
          rep_ms: float = 200, min_runs: int = 5) -> dict:
    """Median, 20th and 80th percentile time in ms of ``fn(*inputs[i])`` (i rotating)."""
    call = _cycle(fn, inputs)
    if device.startswith("cuda"):
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
    call()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def row(op: str, case: str, provider: str, dtype, timing: dict, nbytes: float | None = None, **extra) -> dict:
    """One result row; ``gbps`` is the bytes-moved floor over the median time."""
    r = {"op": op, "case": case, "provider": provider, "dtype": str(dtype).replace("torch.", ""), **timing, **extra}
    if nbytes is not None:
        r["bytes"] = nbytes
        r["gbps"] = nbytes / (timing["median_ms"] * 1e-3) / 1e9
    return r


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
