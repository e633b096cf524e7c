"""Run every benchmark and record the results: ``python -m benchmarks.run``.

Options: ``--quick`` (small sizes, few repeats: the CI smoke run), ``--only OP`` (repeatable),
``--device cuda|cpu``, ``--out DIR``, ``--name STEM`` (file names; default ``<date>-<device>``),
``--budget [OP=]SECONDS`` (a time limit per benchmark: when it runs out, the rows it finished
are kept and the run goes on with the next), ``--no-chart``. Writes ``STEM.json`` (device,
versions, commit, shapes, medians, ratios, seconds per benchmark, failures, which ran out of
time), a Markdown table and a PNG chart of the speed-ups over torchvision. Every provider of a
case is timed in the same run. ``--only eval`` (COCO evaluation, pycocotools against
faster-coco-eval, on the CPU) runs only when named.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from . import BENCHMARKS
from .common import recorded_rows

BASELINE = "torchvision"
# Benchmarks that run only when named (``--only``): CPU work that measures no kernel of the
# device. They stay out of BENCHMARKS, so a default run (the GPU session's bench stage, its
# budgets and its summary's count) spends no time on them.
OPT_IN = {"eval": ".bench_eval"}


def environment(device: str) -> dict:
    import triton
    import torchvision

    # FASTMASK_COMMIT: set by gpu_session.sh, where the checkout may have been copied without its history.
    commit = os.environ.get("FASTMASK_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            commit = ""
        commit = commit or "unknown"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    return {"device": name, "device_type": device, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_torchvision`` on every row whose case also has a torchvision row."""
    key = lambda r: tuple((k, str(v)) for k, v in sorted(r.items()) if k in ("op", "case", "dtype", "pass", "layout"))  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["provider"] == BASELINE}
    for r in rows:
        b = base.get(key(r))
        if b is not None and _timed(r):
            r["speedup_vs_torchvision"] = b / r["median_ms"]


def _timed(r: dict) -> bool:
    return r["median_ms"] == r["median_ms"]  # not NaN: parity and breakdown rows carry no timing


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# fastmask benchmarks: {env['device']}", "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, torchvision {env['torchvision']}, "
             f"triton {env['triton']}. Medians in ms (20th-80th percentile); speed-up = torchvision median / median.", "",
             "| op | case | dtype | provider | median ms | p20-p80 ms | GB/s | speed-up vs torchvision |",
             "|---|---|---|---|---|---|---|---|"]
    for r in filter(_timed, rows):
        case = r["case"] + "".join(f", {k}={r[k]}" for k in ("pass", "layout") if k in r)
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
        sp = f"{r['speedup_vs_torchvision']:.2f}x" if "speedup_vs_torchvision" in r else ""
        lines.append(f"| {r['op']} | {case} | {r['dtype']} | {r['provider']} | {r['median_ms']:.3f} | "
                     f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {gbps} | {sp} |")
    parity = [r for r in rows if "same_counts" in r]
    if parity:
        lines += ["", "## Model outputs against torchvision (same weights and image, fp32)", "",
                  "Detections matched by label and nearest box; rank swaps: near-tied scores listed in "
                  "another order.", "",
                  "| provider | same detection counts | max box diff | max score diff | labels equal | rank swaps "
                  "| mask pixels agree |",
                  "|---|---|---|---|---|---|---|"]
        for r in parity:
            lines.append(f"| {r['provider']} | {r['same_counts']} | {r.get('boxes', '')} | {r.get('scores', '')} | "
                         f"{r.get('labels_equal', '')} | {r.get('rank_swaps', '')} | {r.get('mask_pixels_agree', '')} |")
    parts = [r for r in rows if "breakdown" in r]
    if parts:
        names = list(parts[0]["breakdown"])
        lines += ["", "## Where inference time goes (ms, PyTorch profiler, one run)", "",
                  "| provider | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in parts:
            lines.append(f"| {r['provider']} | " + " | ".join(f"{r['breakdown'].get(n, float('nan')):.1f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["provider"] != BASELINE and _timed(r) and "speedup_vs_torchvision" in r]
    if not pts:
        return
    labels = [f"{r['op']}: {r['case']} {r['dtype']} {r.get('pass', '')} [{r['provider']}]" for r in pts]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(pts) + 1.5))
    vals = [r["speedup_vs_torchvision"] for r in pts]
    ax.barh(range(len(pts)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(pts)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over torchvision (log scale; >1 is faster)")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_json(stem: Path, env: dict, quick: bool, rows: list[dict], failures: dict, seconds: dict,
                out_of_time: dict, complete: bool) -> None:
    """The run's JSON; ``complete`` is False while benchmarks are still to come."""
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, "quick": quick, "complete": complete, "seconds": seconds,
                               "out_of_time": out_of_time, "rows": rows, "failures": failures}, indent=1))
    tmp.replace(stem.with_suffix(".json"))


class OutOfTime(Exception):
    """A benchmark's time budget ran out."""


def _alarm(_signum, _frame):
    raise OutOfTime


def parse_budgets(specs: list[str] | None) -> dict[str | None, float]:
    """``["60", "model=120"]`` -> ``{None: 60.0, "model": 120.0}`` (None: every other benchmark)."""
    budgets: dict[str | None, float] = {}
    for spec in specs or []:
        name, _, value = spec.rpartition("=")
        if name and name not in BENCHMARKS and name not in OPT_IN:
            raise ValueError(f"--budget {spec}: no benchmark named {name!r} "
                             f"(one of {', '.join([*BENCHMARKS, *OPT_IN])})")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"--budget {spec}: {value!r} is not a number of seconds") from None
        if not seconds > 0:
            raise ValueError(f"--budget {spec}: the budget must be positive")
        budgets[name or None] = seconds
    return budgets


def run_with_budget(fn, seconds: float | None):
    """``fn()`` stopped by ``OutOfTime`` after ``seconds`` (wall clock; None: no limit).

    The alarm interrupts Python code wherever it runs, a timing loop included; GPU work
    already queued finishes on its own, and the next benchmark's first sync waits for it.
    """
    if seconds is None or not hasattr(signal, "setitimer"):
        return fn()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def default_out() -> Path:
    """``benchmarks/results`` of a checkout; installed, ``fastmask-bench-results`` in the working folder."""
    here = Path(__file__).resolve().parent
    return here / "results" if (here.parent / "pyproject.toml").is_file() else Path.cwd() / "fastmask-bench-results"


def cli() -> int:
    """Console entry point ``fastmask-bench``."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        print("error: the benchmarks compare against torchvision, which is not installed "
              "(pip install torchvision, or fastmask's [dev] extra)", file=sys.stderr)
        return 2
    return main()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    p.add_argument("--only", action="append", choices=sorted([*BENCHMARKS, *OPT_IN]),
                   help="run only this benchmark (repeatable); " + ", ".join(OPT_IN) + " only when named so")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(default_out()), help="results folder (default: %(default)s)")
    p.add_argument("--name", help="file name stem of the results (default: <date>-<device>[-quick])")
    p.add_argument("--budget", action="append", metavar="[OP=]SECONDS",
                   help="time limit of each benchmark, or of OP (repeatable); the rows finished in it are kept")
    p.add_argument("--no-chart", action="store_true", help="write no PNG chart")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA GPU is available")
    try:
        budgets = parse_budgets(args.budget)
    except ValueError as exc:
        p.error(str(exc))

    env = environment(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    stem = out / (args.name or f"{dt.date.today().isoformat()}-{tag}{'-quick' if args.quick else ''}")
    names = args.only or list(BENCHMARKS)
    rows, failures, seconds, out_of_time = [], {}, {}, {}
    for name in names:
        budget = budgets.get(name, budgets.get(None))
        print(f"== {name}" + (f" (budget {budget:g} s)" if budget else ""), flush=True)
        t0 = time.perf_counter()
        recorded_rows(reset=True)
        try:
            mod = importlib.import_module({**BENCHMARKS, **OPT_IN}[name], __package__)
            rows.extend(run_with_budget(lambda: mod.run(quick=args.quick, device=args.device), budget))
        except OutOfTime:
            done = recorded_rows()
            rows.extend(done)
            out_of_time[name] = f"budget of {budget:g} s ran out; {len(done)} rows finished"
            print(f"   OUT OF TIME: {out_of_time[name]}", file=sys.stderr, flush=True)
        except Exception as exc:  # record and go on: one broken benchmark must not lose the others
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"   FAILED: {failures[name]}", file=sys.stderr)
            traceback.print_exc()
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"   {name}: {seconds[name]} s", flush=True)
        # Written after every benchmark, so a run cut off by a time limit keeps what finished.
        add_ratios(rows)
        _write_json(stem, env, args.quick, rows, failures, seconds, out_of_time, complete=name == names[-1])
    md = markdown(env, rows)
    stem.with_suffix(".md").write_text(md)
    if not args.no_chart:
        chart(rows, stem.with_suffix(".png"), f"{env['device']} ({env['date'][:10]})")
    print(md)
    print(f"wrote {stem}.json/.md" + ("" if args.no_chart else "/.png"))
    return 1 if failures or out_of_time else 0


if __name__ == "__main__":
    sys.exit(main())
