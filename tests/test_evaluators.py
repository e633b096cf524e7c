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


# --------------------------------------------------------------------------- box-local masks


def test_box_masks_to_rle_equals_the_full_image_rle():
    """RLEs made from box-local slabs equal those of the pasted full-image masks, string for
    string: boxes inside, across the image's borders (bottom rows and first/last columns, where
    runs of neighbouring columns join), tiny, empty and covering the whole image."""
    from fastmask import ops
    from fastmask.engine.evaluation import box_masks_to_rle, masks_to_rle

    g = torch.Generator().manual_seed(0)
    h, w = 37, 53
    boxes = torch.tensor([[3.0, 4.0, 20.0, 30.0], [40.0, 20.0, 70.0, 45.0], [-5.0, -6.0, 10.0, 8.0],
                          [0.0, 0.0, 53.0, 37.0], [10.0, 10.0, 10.4, 10.6], [60.0, 50.0, 80.0, 70.0],
                          [0.0, 30.0, 53.0, 37.0]])
    probs = torch.rand(len(boxes), 1, 28, 28, generator=g)
    probs[-1] = 1.0  # a solid mask on the bottom rows: runs join across columns
    full = ops.paste_masks(probs, boxes, (h, w), threshold=0.5, backend="torch")
    local = ops.paste_masks_in_boxes(probs, boxes, threshold=0.5, image_size=(h, w), backend="torch")
    assert box_masks_to_rle(local, (h, w)) == masks_to_rle(full[:, 0])
    assert box_masks_to_rle(ops.paste_masks_in_boxes(probs[:0], boxes[:0], threshold=0.5, image_size=(h, w)),
                            (h, w)) == []


@pytest.mark.model
def test_box_local_evaluation_gives_the_full_size_numbers(tmp_path):
    """A model returning box-local masks (what evaluation now asks of fastmask's model) gives the
    same COCO results, RLE for RLE, and the same AP as the full-image masks, on a generated set."""
    from test_cli import _dataset
    from test_model_common import randomize_

    from fastmask.data.coco import CocoDetection
    from fastmask.engine.evaluation import coco_evaluate, run_inference
    from fastmask.models import build_mask_rcnn

    def more_images(data):  # 8 images: the two files reused under new ids, objects moved about
        for k in range(3, 9):
            data["images"].append({"id": k, "file_name": "ab"[k % 2] + ".png", "height": 48, "width": 64})
            x, y = 4 * k, 2 * k
            data["annotations"].append({"id": 10 + k, "image_id": k, "category_id": (4, 6, 9)[k % 3],
                                        "bbox": [x, y, 16, 14], "iscrowd": 0, "area": 224,
                                        "segmentation": [[x, y, x + 16, y, x + 16, y + 14, x, y + 14]]})

    dataset = CocoDetection(*_dataset(tmp_path, more_images))
    torch.manual_seed(0)
    model = build_mask_rcnn(4, backbone="resnet18", backend="torch", min_size=48, max_size=64,
                            rpn_post_nms_top_n_test=50, box_detections_per_img=10, box_score_thresh=0.0,
                            fpn_channels=32, box_head_dim=64, mask_head_channels=(32,))
    randomize_(model, torch.Generator().manual_seed(1))

    class FullMasks(torch.nn.Module):  # no mask_output setting: evaluation gets full-image masks
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images):
            return self.m(images)

    device = torch.device("cpu")
    box_bbox, box_segm, _ = run_inference(model, dataset, device, progress=False)
    full_bbox, full_segm, _ = run_inference(FullMasks(model), dataset, device, progress=False)
    assert model.mask_output == "image" and model.mask_threshold is None  # restored after evaluation
    assert len(box_segm) == 8 * 10 and box_segm == full_segm and box_bbox == full_bbox
    box_ap = coco_evaluate(dataset.coco, box_bbox, box_segm, dataset.ids)
    assert box_ap == coco_evaluate(dataset.coco, full_bbox, full_segm, dataset.ids)


def test_model_box_masks_fill_the_image_masks():
    """mask_output="box": each mask's slab, put at its window, is the full-image mask."""
    from test_model_common import make_image, randomize_

    from fastmask.models import build_mask_rcnn

    torch.manual_seed(0)
    model = build_mask_rcnn(4, backbone="resnet18", backend="torch", min_size=64, max_size=96,
                            rpn_post_nms_top_n_test=50, box_detections_per_img=10, box_score_thresh=0.0,
                            fpn_channels=32, box_head_dim=64, mask_head_channels=(32,), mask_threshold=0.5).eval()
    randomize_(model, torch.Generator().manual_seed(1))
    images = [make_image(64, 90, torch.Generator().manual_seed(2))]
    with torch.no_grad():
        full = model(images)[0]
        model.mask_output = "box"
        local = model(images)[0]
    assert torch.equal(local["boxes"], full["boxes"]) and len(full["boxes"]) > 0
    rebuilt = torch.zeros_like(full["masks"][:, 0])
    for i, (x0, y0, x1, y1) in enumerate(local["masks"].windows.tolist()):
        rebuilt[i, y0:y1, x0:x1] = local["masks"].masks[i, :y1 - y0, :x1 - x0]
    assert torch.equal(rebuilt, full["masks"][:, 0])
    with pytest.raises(ValueError, match="mask_output"):
        model.mask_output = "rle"
