"""The last lines of ``gpu_session.sh all``: what each stage's files say, in a few lines.

``python -m benchmarks.session_summary OUT [--seconds S]`` reads ``OUT/kernels.xml`` and
``OUT/model.xml`` (pytest's JUnit XML; when a stage was killed before writing it, the
``-v`` log beside it) and ``OUT/bench.json``, prints one line per stage and then the summary
line, and exits 0 only if every test stage ran at least one test and none failed and every
benchmark finished within its budget.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from . import BENCHMARKS

TEST_STAGES = ("kernels", "model")
# One result line of pytest -v, with xdist ("[gw3] [  4%] PASSED tests/x.py::t[a]") or without
# ("tests/x.py::t[a] PASSED   [  4%]"); the short summary's "FAILED tests/x.py::t - ..." is neither.
_STATUS = r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
_RESULT_XDIST = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] {_STATUS} (\S+::\S*)")
_RESULT_PLAIN = re.compile(rf"^(\S+::\S*) {_STATUS}\b")


def test_counts(out: Path, stage: str) -> dict | None:
    """{"passed", "failed", "skipped", "source"} of a test stage, or None if it left nothing."""
    xml = out / f"{stage}.xml"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            total = sum(int(s.get("tests", 0)) for s in suites)
            failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
            skipped = sum(int(s.get("skipped", 0)) for s in suites)
            return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped, "source": xml.name}
    log = out / f"{stage}.txt"
    if not log.exists():
        return None
    status: dict[str, str] = {}  # test id -> its last result (a test's teardown error comes after its pass)
    for line in log.read_text(errors="replace").splitlines():
        if m := _RESULT_XDIST.match(line):
            status[m.group(2)] = m.group(1)
        elif m := _RESULT_PLAIN.match(line):
            status[m.group(1)] = m.group(2)
    counts = {k: 0 for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    for s in status.values():
        counts[s] += 1
    return {"passed": counts["PASSED"] + counts["XPASS"], "failed": counts["FAILED"] + counts["ERROR"],
            "skipped": counts["SKIPPED"] + counts["XFAIL"], "source": f"{log.name} (no XML: the stage was cut off)"}


def bench_status(out: Path) -> dict:
    """Which benchmarks finished, failed, ran out of time or never started."""
    path = out / "bench.json"
    if not path.exists():
        return {"finished": [], "failed": {}, "out_of_time": {}, "not_run": list(BENCHMARKS), "rows": 0}
    data = json.loads(path.read_text())
    failed, late = data.get("failures", {}), data.get("out_of_time", {})
    ran = list(data.get("seconds", {}))
    return {"finished": [n for n in ran if n not in failed and n not in late], "failed": failed,
            "out_of_time": late, "not_run": [n for n in BENCHMARKS if n not in ran], "rows": len(data["rows"])}


# A stage's closing line in session.txt, as gpu_session.sh's run_stage writes it.
_STAGE_END = re.compile(r"^   (\w+): exit (\d+), (\d+) s", re.M)


def stage_exits(out: Path) -> dict[str, int]:
    """{stage: exit status} from ``OUT/session.txt``."""
    path = out / "session.txt"
    text = path.read_text(errors="replace") if path.exists() else ""
    return {m.group(1): int(m.group(2)) for m in _STAGE_END.finditer(text)}


_CUBINS = re.compile(r"^(\d+) compiled kernel variants; (\d+) with spills", re.M)


def spills(out: Path) -> tuple[int, int] | None:
    """(compiled variants, variants with spills) from the cubins stage's lines in session.txt."""
    path = out / "session.txt"
    m = _CUBINS.search(path.read_text(errors="replace")) if path.exists() else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def summarize(out: Path, seconds: float | None = None) -> tuple[list[str], bool]:
    """(lines to print, whether everything passed and finished)."""
    lines, ok, passed, failed = [], True, 0, 0
    env = stage_exits(out).get("env")
    if env != 0:
        lines.append(f"env: {'did not run' if env is None else f'exit {env}'} (versions and GPU name missing)")
        ok = False
    for stage in TEST_STAGES:
        c = test_counts(out, stage)
        if c is None:
            lines.append(f"{stage}: no results (the stage did not run)")
            ok = False
            continue
        ran = c["passed"] + c["failed"]
        lines.append(f"{stage}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped [{c['source']}]"
                     + ("  <- no test ran" if ran == 0 else ""))
        ok &= c["failed"] == 0 and ran > 0
        passed += c["passed"]
        failed += c["failed"]
    b = bench_status(out)
    lines.append(f"bench: {b['rows']} rows; finished: {', '.join(b['finished']) or 'none'}"
                 + "".join(f"; {n} FAILED ({msg})" for n, msg in b["failed"].items())
                 + "".join(f"; {n} out of time ({msg})" for n, msg in b["out_of_time"].items())
                 + (f"; not run: {', '.join(b['not_run'])}" if b["not_run"] else ""))
    ok &= len(b["finished"]) == len(BENCHMARKS)
    # Spills are reported, not gated: a performance defect, which the compile test gates.
    sp = spills(out)
    compiled = f"; {sp[1]} of {sp[0]} compiled kernel variants spill" if sp else ""
    wall = f"; {seconds:.0f} s" if seconds is not None else ""
    lines.append(f"SUMMARY: {passed} passed, {failed} failed; benchmarks finished {len(b['finished'])} of "
                 f"{len(BENCHMARKS)}: {' '.join(b['finished']) or 'none'}{compiled}{wall}; {'OK' if ok else 'NOT OK'}")
    return lines, ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.session_summary", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the folder gpu_session.sh all wrote")
    p.add_argument("--seconds", type=float, help="the command's wall time so far, for the summary line")
    args = p.parse_args(argv)
    lines, ok = summarize(args.out, args.seconds)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
