"""COCO evaluation with pycocotools and with faster-coco-eval (the optional ``fast-eval`` extra).

On the same predictions both give the same 12 box and 12 mask numbers: not always bit for bit,
but within 1e-12. faster-coco-eval's C++ accumulation writes a precision of exactly 1.0 where
pycocotools' ``tp / (tp + fp + np.spacing(1))`` gives 0.9999999999999998, so single precision
entries differ by at most 2.2e-16, and so do the means over them (seen: 7e-18 on AP). The
tests that need the package skip without it; the error that names the extra runs either way.
"""

import copy
import importlib.util
import json
import sys

import pytest
import torch

from benchmarks import BENCHMARKS, bench_eval
from benchmarks import run as bench_run
from fastmask import evaluate as evaluate_cli
from fastmask.engine.evaluation import EVALUATORS, STAT_NAMES, check_evaluator, coco_evaluate

from test_cli import _dataset

# The bound on the two evaluators' difference: orders of magnitude above the 2.2e-16 explained
# above, orders below any digit COCOeval prints.
TOL = 1e-12

needs_fce = pytest.mark.skipif(importlib.util.find_spec("faster_coco_eval") is None,
                               reason='faster-coco-eval is not installed (pip install "fastmask[fast-eval]")')


def _assert_same(a: dict, b: dict) -> None:
    for kind in ("bbox", "segm"):
        assert list(a[kind]) == list(b[kind]) == list(STAT_NAMES)
        for name in STAT_NAMES:
            assert abs(a[kind][name] - b[kind][name]) <= TOL, (kind, name, a[kind][name], b[kind][name])
    assert a["tables"] == b["tables"]  # printed to 3 decimals: the same text


@pytest.fixture(scope="module")
def generated():
    """20 generated 256x256 images: 100 objects (polygons, RLEs, crowds), 400 detections."""
    return bench_eval.make_set(20, seed=0)


@needs_fce
@pytest.mark.parametrize("variant", ["all images", "some images", "tied scores"])
def test_same_numbers_on_the_same_predictions(generated, variant):
    coco, bbox_res, segm_res = copy.deepcopy(generated)
    image_ids = None
    if variant == "some images":  # the dataset's ids, as evaluate() passes them
        image_ids = sorted(coco.imgs)[::2]
    elif variant == "tied scores":  # equal scores: both sort them stably, so the same order
        for r in bbox_res + segm_res:
            r["score"] = round(r["score"], 1)
    inputs = copy.deepcopy((coco.dataset, bbox_res, segm_res))
    fast = coco_evaluate(coco, bbox_res, segm_res, image_ids, evaluator="faster-coco-eval")
    # faster-coco-eval leaves the ground truth and the results as they were (pycocotools does not:
    # it writes "ignore" and its RLEs into the ground truth's annotations).
    assert (coco.dataset, bbox_res, segm_res) == inputs
    ref = coco_evaluate(coco, bbox_res, segm_res, image_ids)
    _assert_same(ref, fast)
    assert 0 < ref["bbox"]["AP"] < 1 and 0 < ref["segm"]["AP"] < 1  # neither trivially 0 nor 1


@needs_fce
def test_same_numbers_without_detections(generated):
    coco = copy.deepcopy(generated[0])
    fast = coco_evaluate(coco, [], [], evaluator="faster-coco-eval")
    _assert_same(coco_evaluate(coco, [], []), fast)
    assert fast["bbox"]["AP"] == 0 and fast["segm"]["AR100"] == 0


def test_evaluator_names_and_a_missing_package(monkeypatch, capsys):
    assert EVALUATORS[0] == "pycocotools" and check_evaluator("pycocotools") is None
    with pytest.raises(ValueError, match="unknown COCO evaluator 'fast'"):
        check_evaluator("fast")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "fastmask\[fast-eval\]"'):
        coco_evaluate(None, [], [], evaluator="faster-coco-eval")
    # The command says so before it reads the (here absent) checkpoint.
    with pytest.raises(SystemExit) as info:
        evaluate_cli.main(["--checkpoint", "absent.pth", "--evaluator", "faster-coco-eval"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and 'pip install "fastmask[fast-eval]"' in err and "absent.pth" not in err
    with pytest.raises(SystemExit) as info:
        evaluate_cli.main(["--checkpoint", "absent.pth", "--evaluator", "fast"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@needs_fce
def test_evaluate_command_with_faster_coco_eval(tmp_path, capsys):
    """The smoke model, untrained, on test_cli's 2 images: the same numbers and files from both evaluators."""
    from fastmask.config import load_config
    from fastmask.engine.builder import build_model
    from fastmask.engine.cli import resolve_config_path

    ann, img = _dataset(tmp_path / "data")
    torch.manual_seed(0)
    model = build_model(load_config(resolve_config_path("smoke")).model, 4)  # 3 categories + background
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    common = ["--weights", str(tmp_path / "bare.pth"), "--config", "smoke", "--set", "device=cpu", "num_threads=1",
              f"data.train.annotations={ann}", f"data.train.images={img}",
              f"data.val.annotations={ann}", f"data.val.images={img}"]
    ref = evaluate_cli.main([*common, "--out", str(tmp_path / "ref.json")])
    capsys.readouterr()
    fast = evaluate_cli.main([*common, "--out", str(tmp_path / "fast.json"), "--evaluator", "faster-coco-eval"])
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 12 and printed.count("Average Recall") == 12
    assert fast["num_detections"] == ref["num_detections"] > 0
    _assert_same(ref, fast)
    saved = json.loads((tmp_path / "fast.json").read_text())
    assert saved["evaluator"] == "faster-coco-eval" and saved["segm"] == fast["segm"]
    assert json.loads((tmp_path / "ref.json").read_text())["evaluator"] == "pycocotools"


@needs_fce
def test_benchmark_rows_and_runner(monkeypatch, tmp_path):
    """bench_eval's rows on 6 images, directly and through ``benchmarks.run --only eval``; the
    default run (and so the GPU session) leaves it out."""
    monkeypatch.setattr(bench_eval, "QUICK_IMAGES", 6)
    rows = bench_eval.run(quick=True, device="cpu")
    assert [r["provider"] for r in rows] == list(EVALUATORS)
    assert rows[1]["same_ap"] and rows[1]["max_abs_diff"] <= TOL and all(r["median_ms"] > 0 for r in rows)
    assert "eval" not in BENCHMARKS and "eval" in bench_run.OPT_IN
    assert bench_run.main(["--quick", "--only", "eval", "--device", "cpu", "--out", str(tmp_path), "--name", "e",
                           "--no-chart"]) == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert not data["failures"] and {r["provider"] for r in data["rows"]} == set(EVALUATORS)
