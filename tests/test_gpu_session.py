"""The one GPU command (``benchmarks/gpu_session.sh all``), proven on the CPU before any lease.

Its dry run goes through the same stages and writes the same files as on the GPU (the
interpreter, quick sizes); the summary it ends with, the benchmark runner's time budgets and
the register report are checked on their own with made-up inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS
from benchmarks import run as bench_run
from benchmarks.common import record, recorded_rows
from benchmarks.kernel_resources import signature
from benchmarks.session_summary import summarize

ROOT = Path(__file__).resolve().parents[1]
# What `all` leaves in OUT, on the GPU and in the dry run alike (a lease returns at most 8 files).
SESSION_FILES = {"session.txt", "kernels.txt", "kernels.xml", "model.txt", "model.xml", "bench.txt", "bench.json",
                 "bench.md"}
STAGES = ("env", "kernels", "model", "bench", "cubins")


@pytest.mark.slow
def test_dry_run_writes_the_files_of_a_gpu_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "all", str(out), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == SESSION_FILES
    session = (out / "session.txt").read_text()
    for stage in STAGES:
        assert f"   {stage}: exit 0, " in session, f"stage {stage} did not end with exit 0:\n{session}"
    last = session.strip().splitlines()[-1]
    assert last.startswith("SUMMARY: ") and last.endswith("; OK"), last
    assert proc.stdout.strip().splitlines()[-1] == last  # the command's last line is the summary
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] and set(bench["seconds"]) == set(BENCHMARKS)
    assert not bench["failures"] and not bench["out_of_time"]
    lines, ok = summarize(out)
    assert ok and "kernels: 0 passed" not in "\n".join(lines)
    assert seconds < 600  # the dry run must stay a small part of CI's budget (about 90 s on two free cores)


def _junit(path: Path, tests: int, failures: int, skipped: int = 0) -> None:
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" '
                    f'failures="{failures}" errors="0" skipped="{skipped}"></testsuite></testsuites>')


def _session(out: Path, exits: dict[str, int], cubins: str = "") -> None:
    text = "".join(f"== {s}\n   {s}: exit {rc}, 3 s\n" for s, rc in exits.items())
    (out / "session.txt").write_text(text + cubins)


def _bench(out: Path, finished, failures=None, out_of_time=None) -> None:
    ran = list(finished) + list(failures or {}) + list(out_of_time or {})
    (out / "bench.json").write_text(json.dumps({"seconds": {n: 1.0 for n in ran}, "rows": [{}] * 3,
                                                "failures": failures or {}, "out_of_time": out_of_time or {}}))


def test_summary_of_a_clean_run(tmp_path):
    _session(tmp_path, dict.fromkeys(STAGES, 0), "152 compiled kernel variants; 5 with spills (stack > 0)\n")
    _junit(tmp_path / "kernels.xml", 118, 0, 2)
    _junit(tmp_path / "model.xml", 1, 0)
    _bench(tmp_path, BENCHMARKS)
    lines, ok = summarize(tmp_path, 222)
    assert ok
    assert lines[0] == "kernels: 116 passed, 0 failed, 2 skipped [kernels.xml]"
    assert lines[-1] == ("SUMMARY: 117 passed, 0 failed; benchmarks finished 5 of 5: " + " ".join(BENCHMARKS)
                         + "; 5 of 152 compiled kernel variants spill; 222 s; OK")


def test_summary_says_what_went_wrong(tmp_path):
    _session(tmp_path, {"env": 1, "kernels": 124, "model": 0, "bench": 1, "cubins": 0})
    # kernels cut off before pytest wrote its XML: counted from the -v log
    (tmp_path / "kernels.txt").write_text(
        "tests/a.py::t[cuda] PASSED   [ 50%]\n[gw1] [ 60%] PASSED tests/a.py::u[cuda] \n"
        "[gw0] [ 70%] FAILED tests/b.py::v[cuda] \nFAILED tests/b.py::v[cuda] - AssertionError\n")
    _junit(tmp_path / "model.xml", 0, 0)  # selected nothing
    _bench(tmp_path, ["roi_align"], failures={"nms": "RuntimeError: x"}, out_of_time={"model": "budget of 9 s"})
    lines, ok = summarize(tmp_path)
    text = "\n".join(lines)
    assert not ok
    assert "env: exit 1" in text
    assert "kernels: 2 passed, 1 failed, 0 skipped [kernels.txt (no XML: the stage was cut off)]" in text
    assert "model: 0 passed, 0 failed, 0 skipped [model.xml]  <- no test ran" in text
    assert "nms FAILED (RuntimeError: x)" in text and "model out of time" in text
    assert "not run: proposals, mask_paste" in text
    assert lines[-1].startswith("SUMMARY: 2 passed, 1 failed; benchmarks finished 1 of 5: roi_align")
    assert lines[-1].endswith("NOT OK")


def test_summary_of_a_run_that_left_nothing(tmp_path):
    lines, ok = summarize(tmp_path)
    assert not ok and "kernels: no results" in lines[1] and "finished 0 of 5" in lines[-1]


def test_budget_keeps_the_rows_finished_in_time():
    recorded_rows(reset=True)

    def slow_benchmark():
        record({"op": "x", "median_ms": 1.0})
        record({"op": "y", "median_ms": 2.0})
        while True:
            time.sleep(0.01)

    t0 = time.monotonic()
    with pytest.raises(bench_run.OutOfTime):
        bench_run.run_with_budget(slow_benchmark, 0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    assert [r["op"] for r in recorded_rows(reset=True)] == ["x", "y"]
    assert bench_run.run_with_budget(lambda: 7, 5.0) == 7  # the alarm is cleared afterwards
    time.sleep(0.1)


def test_budget_arguments():
    assert bench_run.parse_budgets(["60", "model=120"]) == {None: 60.0, "model": 120.0}
    for bad, words in (("nope=3", "no benchmark named 'nope'"), ("model=x", "not a number"), ("0", "positive")):
        with pytest.raises(ValueError, match=words):
            bench_run.parse_budgets([bad])


def test_runner_records_a_benchmark_that_ran_out_of_time(tmp_path, monkeypatch):
    (tmp_path / "fake_slow_bench.py").write_text(
        "import time\nfrom benchmarks.common import row\n"
        "def run(quick, device):\n"
        "    rows = [row('fake', 'a', 'p', 'float32', {'median_ms': 1.0, 'p20_ms': 1.0, 'p80_ms': 1.0})]\n"
        "    while True:\n        time.sleep(0.01)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench_run, "BENCHMARKS", {"slow": "fake_slow_bench"})
    code = bench_run.main(["--device", "cpu", "--out", str(tmp_path / "res"), "--name", "b", "--budget", "0.5",
                           "--no-chart"])
    data = json.loads((tmp_path / "res" / "b.json").read_text())
    assert code == 1 and data["complete"]
    assert list(data["out_of_time"]) == ["slow"] and "1 rows finished" in data["out_of_time"]["slow"]
    assert [r["case"] for r in data["rows"]] == ["a"]
    assert not (tmp_path / "res" / "b.png").exists()


def test_register_report_reads_the_jit_signature():
    ttir = ('module {\n  tt.func public @k(%x: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("x"(#loc)), '
            '%y: !tt.ptr<bf16> loc("y"(#loc)), %n: i32 {tt.divisibility = 16 : i32} loc("n"(#loc)), '
            '%s: f32 loc("s"(#loc))) attributes {noinline = false} {\n')
    assert signature(ttir) == "x: *f32/16, y: *bf16, n: i32/16, s: f32"
    assert signature("no function here") == "?"
