"""Timing and reporting shared by the benchmarks.

Timing method (docs/architecture.md, "Benchmarks"): warm up first (compilation, autotuning and
allocation stay out of the numbers), then take the median of many runs. On CUDA this is
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); on the CPU a
``perf_counter`` loop. Callers that pass several input sets get them rotated, so repeated
runs do not measure a cache holding one input.
"""

from __future__ import annotations

import argparse
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


# Every row made since the runner last called ``recorded_rows(reset=True)``: what a benchmark
# had finished when its time budget ran out (the runner then keeps these instead of the list
# the benchmark would have returned).
_RECORDED: list[dict] = []


def record(r: dict) -> dict:
    """Keep ``r`` as a finished result of the running benchmark; returns it."""
    _RECORDED.append(r)
    return r


def recorded_rows(reset: bool = False) -> list[dict]:
    rows = list(_RECORDED)
    if reset:
        _RECORDED.clear()
    return rows


def row(op: str, case: str, provider: str, dtype, timing: dict, nbytes: float | None = None, **extra) -> dict:
    """One result row; ``gbps`` is the bytes-moved floor over the median time."""
    r = {"op": op, "case": case, "provider": provider, "dtype": str(dtype).replace("torch.", ""), **timing, **extra}
    if nbytes is not None:
        r["bytes"] = nbytes
        r["gbps"] = nbytes / (timing["median_ms"] * 1e-3) / 1e9
    return record(r)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def table(rows: list[dict], columns: Sequence[str] = ()) -> str:
    """Rows as a fixed-width text table: case, provider, dtype, the ``pass`` / ``layout`` keys
    where rows have them, the timings and GB/s, the ``columns`` given, and the speed-up over
    torchvision (``speedup_vs_torchvision``; blank where the case has no torchvision row)."""
    keys = [k for k in ("pass", "layout") if any(k in r for r in rows)]

    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    head = ["case", "provider", "dtype", *keys, "median ms", "p20-p80 ms", "GB/s", *columns, "vs torchvision"]
    body = [[r["case"], r["provider"], r["dtype"], *(str(r.get(k, "")) for k in keys),
             f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", fmt(r.get("gbps", "")),
             *(fmt(r.get(k, "")) for k in columns),
             f"{r['speedup_vs_torchvision']:.2f}x" if "speedup_vs_torchvision" in r else ""] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    n_text = 3 + len(keys)  # text columns align left, numbers right
    return "\n".join("  ".join(c.ljust(w) if i < n_text else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [head, *body])


def main(run_fn: Callable[[bool, str], list[dict]], doc: str, columns: Sequence[str] = ()):
    """Command line of one ``bench_<op>.py``: ``--quick`` / ``--device``, run, print a table.

    ``run_fn(quick, device)`` is the benchmark's ``run``; ``doc`` its module docstring (the
    first line describes the command); ``columns``: row keys to show besides the standard ones.
    Returns ``(rows, args)`` so that a benchmark can print lines of its own after the table.
    """
    from .run import add_ratios, environment

    parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = run_fn(args.quick, args.device)
    add_ratios(rows)
    env = environment(args.device)
    print(f"{env['device']}: torch {env['torch']}, torchvision {env['torchvision']}, triton {env['triton']}, "
          f"commit {env['commit']}")
    print(table(rows, columns))
    return rows, args
