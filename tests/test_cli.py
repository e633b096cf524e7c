"""Bad input to the commands: a clear message naming the file, id or key, and a non-zero exit."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastmask import predict as predict_cli
from fastmask import train as train_cli


def _dataset(root, edit=None):
    """A 2-image, 3-category COCO dataset (category ids 4, 6, 9) under ``root``; ``edit`` alters the JSON."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "img" / name)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64},
                   {"id": 2, "file_name": "b.png", "height": 48, "width": 64}],
        "categories": [{"id": 4, "name": "p"}, {"id": 6, "name": "q"}, {"id": 9, "name": "r"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 4, "bbox": [5, 5, 20, 20], "iscrowd": 0, "area": 400,
             "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]]},
            {"id": 11, "image_id": 2, "category_id": 9, "bbox": [30, 10, 20, 30], "iscrowd": 0, "area": 300,
             "segmentation": [[30, 10, 50, 10, 40, 40]]},
        ],
    }
    if edit:
        edit(data)
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json", root / "img"


def test_custom_coco_dataset_trains_without_code_changes(tmp_path):
    """3 categories with ids 4, 6, 9 and an image without objects: labels 1..3, results in the file's ids."""
    def add_empty_image(d):
        d["images"].append({"id": 3, "file_name": "a.png", "height": 48, "width": 64})

    ann, img = _dataset(tmp_path, add_empty_image)
    out = tmp_path / "out"
    train_cli.main(["--config", "smoke", "--set", f"output_dir={out}", "device=cpu", "num_threads=1",
                    f"data.train.annotations={ann}", f"data.train.images={img}", f"data.val.annotations={ann}",
                    f"data.val.images={img}", "solver.max_iter=3", "data.batch_size=1",
                    "data.aspect_ratio_grouping=false"])
    meta = torch.load(out / "model_final.pth", weights_only=True)["meta"]
    assert meta["num_classes"] == 4 and meta["class_names"] == ["__background__", "p", "q", "r"]
    assert meta["label_to_cat_id"] == {1: 4, 2: 6, 3: 9}
    results = predict_cli.main([str(img / "a.png"), "--checkpoint", str(out / "model_final.pth"),
                                "--out", str(tmp_path / "pred"), "--score-thresh", "0"])
    assert results and {r["category_id"] for r in results} <= {4, 6, 9}
    assert json.loads((out / "eval.json").read_text())["num_images"] == 3


def _run_train(tmp_path, ann, img, *extra):
    argv = ["--config", "smoke", "--set", f"output_dir={tmp_path / 'out'}", "device=cpu", "num_threads=1",
            f"data.train.annotations={ann}", f"data.train.images={img}",
            f"data.val.annotations={ann}", f"data.val.images={img}", *extra]
    with pytest.raises(SystemExit) as info:
        train_cli.main(argv)
    return info.value.code


def test_unknown_config_key(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--config", "smoke", "--set", "solver.bse_lr=0.1", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "solver.bse_lr" in err and "unknown config key" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--config", str(bad)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "model.backbon" in err and "bad.yaml" in err
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--config", str(tmp_path / "nope.yaml")])
    assert info.value.code == 2 and "nope.yaml" in capsys.readouterr().err


def test_missing_and_corrupt_annotation_files(tmp_path, capsys):
    ann, img = _dataset(tmp_path)
    assert _run_train(tmp_path, tmp_path / "missing.json", img) == 1
    err = capsys.readouterr().err
    assert "missing.json" in err and "does not exist" in err and "Traceback" not in err
    ann.write_text(ann.read_text()[:100])
    assert _run_train(tmp_path, ann, img) == 1
    err = capsys.readouterr().err
    assert "ann.json" in err and "not valid JSON" in err


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["annotations"][1].update(segmentation=[[30, 10, 50, 10]]), ["annotation id 11", "invalid polygon"]),
    (lambda d: d["annotations"][0].update(bbox=[5, 5, 20, 0]), ["annotation id 10", "zero-area box"]),
    (lambda d: d["annotations"][1].update(category_id=77), ["annotation id 11", "category id 77"]),
    (lambda d: d["images"][1].update(file_name="gone.png"), ["gone.png", "image id 2", "missing"]),
])
def test_bad_annotations(tmp_path, capsys, edit, words):
    ann, img = _dataset(tmp_path, edit)
    assert _run_train(tmp_path, ann, img) == 1
    err = capsys.readouterr().err
    assert str(ann) in err or "gone.png" in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_unreadable_image_found_by_a_loader_worker(tmp_path, capsys):
    ann, img = _dataset(tmp_path)
    (img / "b.png").write_bytes(b"not a png at all")
    assert _run_train(tmp_path, ann, img, "data.num_workers=1", "data.batch_size=1",
                      "data.aspect_ratio_grouping=false") == 1
    err = capsys.readouterr().err
    assert "b.png" in err and "image id 2" in err and "cannot be read" in err
    assert "Original Traceback" not in err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_predict_missing_image(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        predict_cli.main([str(tmp_path / "nope.jpg"), "--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "nope.jpg" in err and "does not exist" in err


def test_every_command_takes_device():
    """--device sets the config's device in train, evaluate and predict alike."""
    from fastmask import evaluate as evaluate_cli
    from fastmask.engine.cli import config_from_args

    args = train_cli.build_parser().parse_args(["--config", "smoke", "--device", "cuda:1"])
    assert config_from_args(args).device == "cuda:1"
    for cli, extra in ((evaluate_cli, ["--checkpoint", "x.pth"]), (predict_cli, ["a.png", "--checkpoint", "x.pth", "--out", "o"])):
        args = cli.build_parser().parse_args([*extra, "--device", "cpu"])
        assert config_from_args(args, base=config_from_args(train_cli.build_parser().parse_args([]))).device == "cpu"


def test_console_entry_points():
    """fastmask-train, -evaluate, -predict and -bench are installed and point at callables."""
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.name.startswith("fastmask-")}
    assert set(scripts) == {"fastmask-train", "fastmask-evaluate", "fastmask-predict", "fastmask-bench"}
    for entry in scripts.values():
        assert callable(entry.load())
    with pytest.raises(SystemExit) as info:
        scripts["fastmask-train"].load()(["--help"])
    assert info.value.code == 0


def test_compile_flag(tmp_path, monkeypatch, capsys):
    """--compile [BACKEND] compiles the model's dense parts in train, evaluate and predict (here with
    torch.compile's quick test backends): the same predictions as eager, checkpoints with the same
    parameter names; an unknown backend is one error line."""
    import fastmask.engine.builder as builder
    import fastmask.engine.trainer as trainer

    compiled, real = [], builder.compile_model

    def spy(model, backend):
        real(model, backend)
        compiled.append((backend, model.backbone._compiled_call_impl is not None,
                         model.roi_heads.mask_head._compiled_call_impl is not None))

    ann, img = _dataset(tmp_path)
    monkeypatch.setattr(trainer, "compile_model", spy)
    out = tmp_path / "out"
    train_cli.main(["--config", "smoke", "--compile", "eager", "--set", f"output_dir={out}", "device=cpu",
                    "num_threads=1", f"data.train.annotations={ann}", f"data.train.images={img}",
                    f"data.val.annotations={ann}", f"data.val.images={img}", "solver.max_iter=2", "data.batch_size=1"])
    assert compiled == [("eager", True, True)]
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in state)
    monkeypatch.setattr(builder, "compile_model", spy)
    argv = [str(img / "a.png"), "--checkpoint", str(out / "model_final.pth"), "--score-thresh", "0"]
    eager = predict_cli.main([*argv, "--out", str(tmp_path / "eager")])
    again = predict_cli.main([*argv, "--out", str(tmp_path / "compiled"), "--compile", "aot_eager"])
    assert compiled[1:] == [("aot_eager", True, True)]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in eager], abs=1e-5) and eager
    with pytest.raises(SystemExit) as info:
        predict_cli.main([*argv, "--out", str(tmp_path / "bad"), "--compile", "no-such-backend"])
    assert info.value.code == 2 and "no-such-backend" in capsys.readouterr().err
