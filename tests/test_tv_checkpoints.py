"""torchvision checkpoints in every command: ``--weights`` / ``--checkpoint`` told apart by content.

A fastmask model's ``state_dict`` has torchvision's keys, so the smoke model's weights saved
bare stand for a torchvision file in most tests (and must give exactly what the training
checkpoint gives); a few use a real torchvision ``maskrcnn_resnet50_fpn`` (untrained, 91
classes) at a small image size.
"""

import argparse
import json

import pytest
import torch

from fastmask import evaluate as evaluate_cli
from fastmask import predict as predict_cli
from fastmask import train as train_cli
from fastmask.engine.checkpoint import FORMAT, CheckpointError, read_model_file
from fastmask.engine.cli import COCO_CLASS_NAMES

from test_cli import _dataset


def _exit_code(fn, argv):
    with pytest.raises(SystemExit) as info:
        fn(argv)
    return info.value.code


def _data_args(ann, img):
    return [f"data.train.annotations={ann}", f"data.train.images={img}",
            f"data.val.annotations={ann}", f"data.val.images={img}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-iteration smoke run on the 3-category set of test_cli (ids 4, 6, 9), and its model saved bare."""
    root = tmp_path_factory.mktemp("tvck")
    ann, img = _dataset(root / "data")
    out = root / "run"
    train_cli.main(["--config", "smoke", "--set", f"output_dir={out}", "device=cpu", "num_threads=1",
                    *_data_args(ann, img), "solver.max_iter=2", "data.batch_size=1",
                    "data.aspect_ratio_grouping=false"])
    final = out / "model_final.pth"
    bare = root / "bare.pth"
    torch.save(torch.load(final, weights_only=True)["model"], bare)
    return {"root": root, "ann": ann, "img": img, "final": final, "bare": bare}


def _smoke(run, *extra):
    """--config smoke on the run's data, on the CPU."""
    return ["--config", "smoke", "--set", "device=cpu", "num_threads=1", *_data_args(run["ann"], run["img"]), *extra]


# --------------------------------------------------------------------------- reading files


def test_read_model_file_tells_kinds_apart(tmp_path):
    state = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(5, 8),
             "backbone.body.conv1.weight": torch.ones(2)}
    torch.save(state, tmp_path / "sd.pth")
    src = read_model_file(tmp_path / "sd.pth")
    assert src.kind == "weights" and src.ckpt is None and src.num_classes == 5
    # the pre-zip format (torchvision's published weights), a DDP prefix, a "model" entry of another trainer
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert read_model_file(tmp_path / "legacy.pth").state.keys() == state.keys()
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": torch.tensor(3)}, tmp_path / "o.pth")
    assert read_model_file(tmp_path / "o.pth").state.keys() == state.keys()
    torch.save({"format": FORMAT, "model": state, "iteration": 2}, tmp_path / "ck.pth")
    src = read_model_file(tmp_path / "ck.pth")
    assert src.kind == "checkpoint" and src.ckpt["iteration"] == 2 and src.state.keys() == state.keys()


@pytest.mark.parametrize("name, make, words", [
    ("nope.pth", None, ["does not exist"]),
    ("text.pth", lambda p: p.write_text("not weights"), ["cannot be read", "corrupt"]),
    ("empty.pth", lambda p: p.write_bytes(b""), ["cannot be read"]),
    ("cut.pth", lambda p: (torch.save({"a": torch.zeros(1000)}, p), p.write_bytes(p.read_bytes()[:300])),
     ["cannot be read"]),
    ("list.pth", lambda p: torch.save([torch.zeros(1)], p),
     ["neither a fastmask training checkpoint nor model weights"]),
    ("ns.pth", lambda p: torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, p),
     ["argparse.Namespace", "state_dict alone"]),
])
def test_read_model_file_errors_name_the_file(tmp_path, name, make, words):
    path = tmp_path / name
    if make:
        make(path)
    with pytest.raises(CheckpointError) as info:
        read_model_file(path, "checkpoint")
    message = str(info.value)
    assert message.startswith(f"checkpoint file {str(path)!r}")
    for w in words:
        assert w in message, message


def test_coco_class_names_are_torchvisions():
    torchvision = pytest.importorskip("torchvision")
    weights = torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    assert list(COCO_CLASS_NAMES) == weights.meta["categories"]


# --------------------------------------------------------------------------- the commands


def test_predict_with_bare_weights_matches_the_checkpoint(run, tmp_path, capsys):
    """A state dict through --weights (class names from the config's annotations) gives the checkpoint's output."""
    image = str(run["img"] / "a.png")
    from_ckpt = predict_cli.main([image, "--checkpoint", str(run["final"]), "--out", str(tmp_path / "c"),
                                  "--score-thresh", "0", "--device", "cpu"])
    capsys.readouterr()
    from_weights = predict_cli.main([image, "--weights", str(run["bare"]), "--out", str(tmp_path / "w"),
                                     "--score-thresh", "0", *_smoke(run)])
    err = capsys.readouterr().err
    assert "4 classes" in err and "in id order" in err and "Traceback" not in err
    assert from_weights and from_weights == from_ckpt  # same boxes, scores, category ids and names
    assert {r["category_id"] for r in from_weights} <= {4, 6, 9}
    assert json.loads((tmp_path / "w" / "results.json").read_text()) == from_weights
    assert (tmp_path / "w" / "a.png").is_file()


def test_predict_names_classes_it_cannot_match(run, tmp_path, capsys):
    """No annotation file with as many categories: labels are written as ids, named class_k."""
    results = predict_cli.main([str(run["img"] / "a.png"), "--weights", str(run["bare"]), "--out", str(tmp_path),
                                "--score-thresh", "0", *_smoke(run), f"data.val.annotations={tmp_path / 'no.json'}"])
    assert results and all(r["category_name"] == f"class_{r['category_id']}" for r in results)
    assert "class_1..class_3" in capsys.readouterr().err


def test_evaluate_with_bare_weights_matches_the_checkpoint(run, tmp_path, capsys):
    expected = evaluate_cli.main(["--checkpoint", str(run["final"]), "--out", str(tmp_path / "c.json"),
                                  "--device", "cpu"])
    capsys.readouterr()
    got = evaluate_cli.main(["--weights", str(run["bare"]), "--out", str(tmp_path / "w.json"), *_smoke(run)])
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 12 and "bbox:" in printed and "segm:" in printed
    assert got["bbox"] == expected["bbox"] and got["segm"] == expected["segm"]
    saved = json.loads((tmp_path / "w.json").read_text())
    assert saved["checkpoint"] == str(run["bare"]) and saved["segm"] == expected["segm"]


def test_either_flag_takes_either_kind_of_file(run, tmp_path, capsys):
    """A state dict given to --checkpoint, a training checkpoint given to --weights: read by content, said so."""
    result = evaluate_cli.main(["--checkpoint", str(run["bare"]), "--out", str(tmp_path / "e.json"), *_smoke(run)])
    err = capsys.readouterr().err
    assert result["num_images"] == 2
    assert "bare.pth is not a fastmask training checkpoint but bare weights" in err
    results = predict_cli.main([str(run["img"] / "b.png"), "--weights", str(run["final"]), "--out", str(tmp_path),
                                "--score-thresh", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert results and "model_final.pth is a fastmask training checkpoint" in err


def test_flag_mistakes_and_misfits_are_refused_clearly(run, tmp_path, capsys):
    image = str(run["img"] / "a.png")
    # one of --checkpoint / --weights, not both or neither
    assert _exit_code(predict_cli.main, [image, "--out", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert _exit_code(evaluate_cli.main, ["--checkpoint", "a.pth", "--weights", "b.pth"]) == 2
    assert "not allowed with" in capsys.readouterr().err
    # no --config: torchvision's architecture, which the smoke model's weights do not fit
    code = _exit_code(predict_cli.main, [image, "--weights", str(run["bare"]), "--out", str(tmp_path),
                                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and str(run["bare"]) in err and "coco_r50_fpn_1x" in err and "--config" in err
    assert "Traceback" not in err
    # evaluation on data with another number of categories would score nonsense: refused
    ann2, img2 = _dataset(tmp_path / "two", lambda d: (d["categories"].pop(1)))
    code = _exit_code(evaluate_cli.main, ["--weights", str(run["bare"]), "--config", "smoke", "--set",
                                          "device=cpu", f"data.val.annotations={ann2}", f"data.val.images={img2}"])
    err = capsys.readouterr().err
    assert code == 1 and str(run["bare"]) in err and "3 classes" in err and "2 categories" in err
    # a corrupt file given to either flag
    bad = tmp_path / "bad.pth"
    bad.write_bytes(run["bare"].read_bytes()[:1000])
    for flag in ("--weights", "--checkpoint"):
        code = _exit_code(predict_cli.main, [image, flag, str(bad), "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 1 and str(bad) in err and "cannot be read" in err


def test_train_fine_tunes_from_bare_weights_with_another_class_count(run, tmp_path):
    """--weights with a state dict of 4 classes into a 3-class run: the predictors are replaced."""
    ann, img = _dataset(tmp_path / "two", lambda d: (d["categories"].pop(1)))
    out = tmp_path / "out"
    train_cli.main(["--config", "smoke", "--weights", str(run["bare"]), "--set", f"output_dir={out}", "device=cpu",
                    "num_threads=1", *_data_args(ann, img), "solver.max_iter=1", "data.batch_size=1",
                    "data.aspect_ratio_grouping=false"])
    log = (out / "log.txt").read_text()
    assert "(a state dict)" in log and "roi_heads.box_predictor.cls_score.weight" in log
    tuned = torch.load(out / "model_final.pth", weights_only=True)["model"]
    source = torch.load(run["bare"], weights_only=True)
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    key = "backbone.fpn.layer_blocks.0.0.weight"  # one small step away from the loaded value
    assert torch.allclose(tuned[key], source[key], atol=1e-2)


# --------------------------------------------------------------------------- torchvision's own model


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory):
    """torchvision's maskrcnn_resnet50_fpn, untrained (BatchNorm with step counters), 91 classes, saved bare."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path_factory.mktemp("tv") / "tv_maskrcnn.pth"
    torch.save(model.state_dict(), path)
    return path


# torchvision's architecture (the default config of bare weights) at a size a CPU test affords:
# small images, and fewer proposals, sampled RoIs and detections (none of which change a shape).
SMALL = ["device=cpu", "num_threads=1", "data.num_workers=0", "model.min_size=96", "model.max_size=128",
         *(f"model.options.{k}={v}" for k, v in (
             ("rpn_pre_nms_top_n_train", 200), ("rpn_post_nms_top_n_train", 100), ("rpn_pre_nms_top_n_test", 200),
             ("rpn_post_nms_top_n_test", 100), ("box_batch_size_per_image", 64), ("box_detections_per_img", 10)))]


def test_predict_with_torchvision_weights(tv_weights, run, tmp_path, capsys):
    results = predict_cli.main([str(run["img"] / "a.png"), "--weights", str(tv_weights), "--out", str(tmp_path),
                                "--score-thresh", "0", "--set", *SMALL])
    err = capsys.readouterr().err
    assert "coco_r50_fpn_1x" in err and "torchvision's COCO labels" in err
    assert results and (tmp_path / "a.png").is_file() and (tmp_path / "results.json").is_file()
    for r in results:
        assert 1 <= r["category_id"] <= 90 and r["category_name"] == COCO_CLASS_NAMES[r["category_id"]]


def test_evaluate_with_torchvision_weights(tv_weights, run, tmp_path, capsys):
    """91 classes on a set whose category ids (4, 6, 9) are COCO ids: labels are taken as the ids."""
    out = tmp_path / "eval.json"
    result = evaluate_cli.main(["--checkpoint", str(tv_weights), "--out", str(out), "--set", *SMALL,
                                *_data_args(run["ann"], run["img"])])
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 12 and result["num_images"] == 2
    assert json.loads(out.read_text())["checkpoint"] == str(tv_weights)


def test_train_fine_tunes_from_torchvision_weights(tv_weights, run, tmp_path):
    """COCO's 91-class head replaced by a 4-class one; everything else loaded."""
    out = tmp_path / "out"
    train_cli.main(["--config", "coco_r50_fpn_1x", "--weights", str(tv_weights), "--set", f"output_dir={out}",
                    *SMALL, *_data_args(run["ann"], run["img"]), "solver.max_iter=1", "solver.warmup_iters=1",
                    "data.batch_size=1"])
    tuned = torch.load(out / "model_final.pth", weights_only=True)["model"]
    source = torch.load(tv_weights, weights_only=True)
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)
    assert tuned["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    key = "backbone.body.conv1.weight"  # frozen by trainable_layers=3: exactly torchvision's
    assert torch.equal(tuned[key], source[key])
