"""The benchmark runner: quick mode runs on the CPU and writes JSON, Markdown and a chart; and
the whole-model counts of ``python -m benchmarks.dispatch_count --model``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import dispatch_count
from benchmarks.run import add_ratios, markdown

ROOT = Path(__file__).resolve().parents[1]


def test_ratios_and_markdown():
    rows = [
        {"op": "nms", "case": "1k", "provider": "torchvision", "dtype": "float32", "median_ms": 2.0, "p20_ms": 1.9, "p80_ms": 2.1},
        {"op": "nms", "case": "1k", "provider": "triton", "dtype": "float32", "median_ms": 0.5, "p20_ms": 0.4, "p80_ms": 0.6},
        {"op": "nms", "case": "5k", "provider": "triton", "dtype": "float32", "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1},
    ]
    add_ratios(rows)
    assert rows[1]["speedup_vs_torchvision"] == 4.0
    assert "speedup_vs_torchvision" not in rows[2]  # no torchvision row for that case
    env = {"device": "X", "date": "d", "commit": "c", "torch": "t", "torchvision": "v", "triton": "r"}
    md = markdown(env, rows)
    assert "| nms | 1k | float32 | triton | 0.500 | 0.400-0.600 |  | 4.00x |" in md


def test_quick_run_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", "mask_paste", "--device", "cpu",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    assert data["env"]["torch"] and data["quick"] is True and not data["failures"]
    assert data["complete"] is True and data["seconds"]["mask_paste"] > 0
    providers = {r["provider"] for r in data["rows"]}
    assert {"torchvision", "torch", "reference"} <= providers
    assert all(r["median_ms"] > 0 for r in data["rows"])
    assert js.with_suffix(".md").exists() and js.with_suffix(".png").exists()


@pytest.mark.model
def test_model_dispatch_counts_on_cpu():
    """``benchmarks.dispatch_count.model_cases`` counted as ``--model`` counts them: the static
    path reads nothing on the host, ``model(images)`` exactly once (the counts, at the end),
    and torchvision's Mask R-CNN syncs on its own (its per-mask paste reads box coordinates).
    One uncounted call only (the static path's, which fills the caches the eager path shares):
    whole-model calls are the slow part of this test."""
    cases = dispatch_count.model_cases("torch")
    out = cases["fastmask static"]()
    assert out["boxes"].shape == (1, dispatch_count.MODEL_KW_CPU["box_detections_per_img"], 4)
    assert int(out["counts"][0]) > 0  # detections were made: every stage ran
    static = dispatch_count.count(cases["fastmask static"], enter_ops=False, warmup=False)
    eager = dispatch_count.count(cases["fastmask eager"], enter_ops=False, warmup=False)
    tv = dispatch_count.count(cases["torchvision eager"], enter_ops=False, warmup=False)
    assert static.syncs == [], static.syncs
    assert "aten.lift_fresh.default" not in static.aten  # no per-call host table after the first call
    assert eager.syncs == ["Tensor.tolist"], eager.syncs
    assert len(tv.syncs) > 0 and static.launches > 0
