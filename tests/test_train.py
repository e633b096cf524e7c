"""End to end on a tiny synthetic set: train, checkpoint, resume, evaluate, predict.

Uses configs/smoke.yaml (8 images of 64-96 px, a narrow ResNet-18-FPN, 4 iterations), run
in this process on one CPU thread.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastmask import evaluate as evaluate_cli
from fastmask import predict as predict_cli
from fastmask import train as train_cli
from fastmask.config import load_config
from fastmask.engine import trainer as trainer_mod
from fastmask.engine.builder import LRSchedule
from fastmask.engine.checkpoint import load_checkpoint
from fastmask.engine.cli import resolve_config_path
from fastmask.engine.evaluation import STAT_NAMES
from fastmask.engine.trainer import NonFiniteLossError, train

SMOKE_ITERS = 4


def smoke_overrides(out, cache) -> list[str]:
    return [f"output_dir={out}", f"data.synthetic.cache_dir={cache}", "num_threads=1", "device=cpu",
            f"solver.max_iter={SMOKE_ITERS}", "checkpoint_period=2", "log_period=1"]


def smoke_config(out, cache, *extra):
    return load_config(resolve_config_path("smoke"), smoke_overrides(out, cache) + list(extra))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """One uninterrupted smoke run through the command line entry point."""
    out = tmp_path_factory.mktemp("run")
    train_cli.main(["--config", "smoke", "--set", *smoke_overrides(out, cache)])
    return out


def _weights(path):
    return load_checkpoint(path)["model"]


def test_training_writes_its_outputs(trained):
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "checkpoint.pth", "model_final.pth", "eval.json",
                 "loss_curves.png"):
        assert (trained / name).is_file(), name
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["iteration"] for r in train_rows] == list(range(1, SMOKE_ITERS + 1))
    for r in train_rows:
        assert all(np.isfinite(r[k]) for k in trainer_mod.LOSS_NAMES) and r["images_per_s"] > 0
        assert r["loss"] == pytest.approx(sum(r[k] for k in trainer_mod.LOSS_NAMES))
    assert train_rows[0]["lr"] < train_rows[1]["lr"]  # warmup
    evals = [r for r in rows if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["iteration"] == SMOKE_ITERS
    result = json.loads((trained / "eval.json").read_text())
    assert list(result["bbox"]) == list(STAT_NAMES) and list(result["segm"]) == list(STAT_NAMES)
    ckpt = load_checkpoint(trained / "checkpoint.pth")
    assert ckpt["iteration"] == SMOKE_ITERS
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "meta"} <= set(ckpt)
    assert ckpt["meta"]["num_classes"] == 4 and ckpt["meta"]["class_names"][1:] == ["circle", "rectangle", "triangle"]
    assert len(ckpt["optimizer"]["state"]) > 0  # momentum buffers are saved
    with Image.open(trained / "loss_curves.png") as im:
        assert im.size[0] > 300


def test_resume_equals_uninterrupted(trained, cache, tmp_path, monkeypatch):
    """Interrupt after the iteration-2 checkpoint, resume, and end with the same weights bitwise."""
    cfg = smoke_config(tmp_path, cache)
    real_save = trainer_mod.save_atomic

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj.get("iteration") == 2:
            raise KeyboardInterrupt  # the process is killed right after writing the checkpoint

    monkeypatch.setattr(trainer_mod, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert load_checkpoint(tmp_path / "checkpoint.pth")["iteration"] == 2
    assert not (tmp_path / "model_final.pth").exists()
    monkeypatch.setattr(trainer_mod, "save_atomic", real_save)
    train(cfg, resume=True)
    resumed, uninterrupted = _weights(tmp_path / "model_final.pth"), _weights(trained / "model_final.pth")
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not differ, f"weights differ after resuming: {differ[:5]}"
    a = load_checkpoint(tmp_path / "checkpoint.pth")["optimizer"]["state"]
    b = load_checkpoint(trained / "checkpoint.pth")["optimizer"]["state"]
    assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in b)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["type"] == "train"] == list(range(1, SMOKE_ITERS + 1))


def test_resume_follows_the_schedule_of_its_own_config(cache, tmp_path):
    """A run resumed under another max_iter, schedule, steps and base_lr steps with the new config's rates."""
    first = smoke_config(tmp_path, cache, "solver.max_iter=2")
    train(first)
    longer = smoke_config(tmp_path, cache, "solver.max_iter=6", "solver.schedule=step", "solver.steps=[4]",
                          "solver.base_lr=0.02", "solver.warmup_iters=3")
    train(longer, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["iteration"]: r["lr"] for r in rows if r["type"] == "train"}
    # the rate iteration i steps with is base_lr times the schedule at i - 1 (iterations done before it)
    expected = {i: 0.01 * LRSchedule(first.solver)(i - 1) for i in (1, 2)}
    expected.update({i: 0.02 * LRSchedule(longer.solver)(i - 1) for i in range(3, 7)})
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[5] == pytest.approx(0.002)  # past the new config's step
    assert load_checkpoint(tmp_path / "checkpoint.pth")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        0.02 * LRSchedule(longer.solver)(6))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(cache, tmp_path, monkeypatch):
    real_build = trainer_mod.build_model

    def build_poisoned(cfg, num_classes):
        model = real_build(cfg, num_classes)
        forward, calls = model.forward, [0]

        def poisoned(images, targets=None):
            out = forward(images, targets)
            calls[0] += 1
            if model.training and calls[0] == 3:
                out["loss_mask"] = out["loss_mask"] * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(trainer_mod, "build_model", build_poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 3") as info:
        train(smoke_config(tmp_path, cache))
    assert "loss_mask=nan" in str(info.value) and "checkpoint.pth (iteration 2)" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model_final.pth").exists()


def test_evaluate_reproduces_the_training_evaluation(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    result = evaluate_cli.main(["--checkpoint", str(trained / "model_final.pth"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 12 and "bbox:" in printed and "segm:" in printed
    saved = json.loads(out.read_text())
    during_training = json.loads((trained / "eval.json").read_text())
    for kind in ("bbox", "segm"):
        assert saved[kind] == during_training[kind] == result[kind]


def test_predict_writes_overlays_and_coco_results(trained, cache, tmp_path, capsys):
    images = sorted((next(cache.iterdir()) / "val").glob("*.png"))[:2]
    out = tmp_path / "pred"
    results = predict_cli.main([str(p) for p in images] + ["--checkpoint", str(trained / "model_final.pth"),
                                                           "--out", str(out), "--score-thresh", "0"])
    for p in images:
        with Image.open(out / p.name) as overlay, Image.open(p) as original:
            assert overlay.mode == "RGB"
            assert overlay.size[0] % original.size[0] == 0 and overlay.size[0] >= original.size[0]
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and len(saved) > 0  # box_score_thresh 0 in the smoke config: detections exist
    assert {r["image_id"] for r in saved} <= {1, 2}
    for r in saved:
        assert set(r) >= {"image_id", "file_name", "category_id", "category_name", "bbox", "score", "segmentation"}
        assert r["category_id"] in (1, 2, 3) and len(r["bbox"]) == 4 and r["score"] >= 0
    assert "object(s)" in capsys.readouterr().out


def test_fine_tuning_from_weights_with_other_classes(trained, cache, tmp_path, capsys):
    """--weights loads a checkpoint with another class count, keeping the predictor's initial values."""
    train_cli.main(["--config", "smoke", "--weights", str(trained / "model_final.pth"), "--set",
                    *smoke_overrides(tmp_path, cache), "solver.max_iter=1", "data.synthetic.classes=[circle,star]"])
    assert "roi_heads.box_predictor.cls_score.weight" in (tmp_path / "log.txt").read_text()
    tuned, source = _weights(tmp_path / "model_final.pth"), _weights(trained / "model_final.pth")
    assert tuned["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    # one SGD step moved the loaded weights only a little from the source checkpoint
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.allclose(tuned[key], source[key], atol=1e-2)


def _exit_code(fn, argv):
    with pytest.raises(SystemExit) as info:
        fn(argv)
    return info.value.code


def test_checkpoint_of_another_architecture_is_refused(trained, tmp_path, capsys):
    final = trained / "model_final.pth"
    before = final.read_bytes()
    code = _exit_code(evaluate_cli.main, ["--checkpoint", str(final), "--set", "model.fpn_channels=64"])
    err = capsys.readouterr().err
    assert code == 1 and str(final) in err and "another architecture" in err and "fpn_channels" in err
    # a state dict of another architecture given to --checkpoint: read as bare weights, which
    # do not fit the model; the error names the file and says how it was read
    foreign = tmp_path / "foreign.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, foreign)
    code = _exit_code(predict_cli.main, [str(foreign), "--checkpoint", str(foreign), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "cannot be read" in err  # the image (a .pth) is checked first, by name
    img = next((trained / "..").glob("*/shapes-*/val/000000.png"), None) or next(
        p for p in trained.parent.rglob("000000.png"))
    code = _exit_code(predict_cli.main, [str(img), "--checkpoint", str(foreign), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "foreign.pth" in err and "not a fastmask training checkpoint" in err
    # --weights from another architecture: a clear error, and the run's checkpoint is untouched
    other = tmp_path / "other"
    code = _exit_code(train_cli.main, ["--config", "smoke", "--weights", str(final), "--set",
                                       f"output_dir={other}", "model.fpn_channels=64", "device=cpu",
                                       f"data.synthetic.cache_dir={tmp_path / 'c'}", "data.synthetic.num_train=2",
                                       "data.synthetic.num_val=1"])
    err = capsys.readouterr().err
    assert code == 1 and str(final) in err and "architecture" in err
    assert not (other / "checkpoint.pth").exists()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(before[: len(before) // 3])
    code = _exit_code(evaluate_cli.main, ["--checkpoint", str(truncated)])
    assert code == 1 and "truncated.pth" in capsys.readouterr().err
    assert final.read_bytes() == before


def test_commands_leave_the_thread_count_alone(trained, tmp_path):
    """The smoke config runs on one thread; the caller's setting is back afterwards."""
    before = torch.get_num_threads()
    evaluate_cli.main(["--checkpoint", str(trained / "model_final.pth"), "--out", str(tmp_path / "e.json")])
    img = next(trained.parent.rglob("000000.png"))
    predict_cli.main([str(img), "--checkpoint", str(trained / "model_final.pth"), "--out", str(tmp_path)])
    assert torch.get_num_threads() == before
