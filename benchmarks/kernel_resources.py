"""Registers, spill stack and shared memory of every kernel the GPU compiled.

``python -m benchmarks.kernel_resources CACHE_DIR`` reads a Triton cache (``TRITON_CACHE_DIR``
of a run on the GPU, which holds each compiled variant's cubin and IR) and prints one line
per variant: kernel, warps, registers per thread, stack bytes (register spills), static
shared memory, and the runtime signature as the JIT specialised it (``x: *f32/16``: a pointer
known 16-byte aligned; ``n: i32/16``: an integer known divisible by 16; an integer equal to 1
becomes a constant and leaves the signature). These are the real launches' figures, to
compare with the ahead-of-time compile check of the CPU tests. Needs cuobjdump (Triton
ships one); prints nothing but a note for a cache without cubins (the interpreter's runs).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)")


def cuobjdump() -> str | None:
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def cubin_resources(cubin: Path, tool: str) -> tuple[int, int, int] | None:
    """(registers, stack bytes, static shared bytes) of a cubin's kernels (the largest of each
    if it holds several), from ``cuobjdump -res-usage``; None if it reports none."""
    report = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    found = [tuple(int(v) for v in m) for m in _RES.findall(report)]
    return tuple(max(col) for col in zip(*found)) if found else None


def _split_args(text: str) -> list[str]:
    """The top-level comma-separated items of ``text`` (commas inside (), <>, {} do not split)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "(<{[":
            depth += 1
        elif ch in ")>}]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [t.strip() for t in items if t.strip()]


def signature(ttir: str) -> str:
    """``x: *f32/16, n: i32, ...`` from the kernel's function line in its Triton IR."""
    head = ttir.find("tt.func")
    open_ = ttir.find("(", head)
    if head < 0 or open_ < 0:
        return "?"
    depth, end = 0, open_
    for end in range(open_, len(ttir)):
        depth += {"(": 1, ")": -1}.get(ttir[end], 0)
        if depth == 0:
            break
    out = []
    for arg in _split_args(ttir[open_ + 1:end]):
        m = re.match(r"%(\w+):\s*(!tt\.ptr<(\w+)>|\w+)", arg)
        if not m:
            continue
        name = f"*{m.group(3)}" if m.group(3) else m.group(2)
        if "tt.divisibility = 16" in arg:
            name += "/16"
        out.append(f"{m.group(1)}: {name}")
    return ", ".join(out)


def report(cache: Path, tool: str) -> list[dict]:
    rows = []
    for cubin in sorted(cache.glob("*/*.cubin")):
        res = cubin_resources(cubin, tool)
        if res is None:
            continue
        meta = cubin.with_suffix(".json")
        warps = re.search(r'"num_warps":\s*(\d+)', meta.read_text()).group(1) if meta.exists() else "?"
        ttir = cubin.with_suffix(".ttir")
        rows.append({"kernel": cubin.stem, "warps": warps, "regs": res[0], "stack": res[1], "shared": res[2],
                     "signature": signature(ttir.read_text()) if ttir.exists() else "?"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.split("\n")[0])
    p.add_argument("cache", type=Path, nargs="?", default=os.environ.get("TRITON_CACHE_DIR"),
                   help="Triton cache folder (default: $TRITON_CACHE_DIR)")
    args = p.parse_args(argv)
    if args.cache is None or not Path(args.cache).is_dir():
        print(f"no Triton cache folder at {args.cache}")
        return 1
    tool = cuobjdump()
    if tool is None:
        print("no cuobjdump found (Triton's own or on PATH): cannot read register counts")
        return 1
    rows = report(Path(args.cache), tool)
    if not rows:
        print(f"no compiled kernels in {args.cache} (nothing ran on a GPU)")
        return 0
    spills = [r for r in rows if r["stack"]]
    print(f"{len(rows)} compiled kernel variants; {len(spills)} with spills (stack > 0)")
    print(f"{'kernel':<28} {'warps':>5} {'regs':>5} {'stack':>5} {'shared':>7}  signature")
    for r in sorted(rows, key=lambda r: (r["kernel"], -r["regs"])):
        print(f"{r['kernel']:<28} {r['warps']:>5} {r['regs']:>5} {r['stack']:>5} {r['shared']:>7}  {r['signature']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
